#!/usr/bin/env python
"""The last block for the class token only (``VisionTransformer.prune_last_block``) vs every token.

A class-token classifier reads one token of the last block's output. Tokens mix only in attention, so
that block needs every token's key and value but the query, projection and MLP of the class token alone.
Same model and weights, the two settings alternating in one process; median of ``--rounds`` x ``--iters``;
train step = forward + cross-entropy + backward + fused AdamW step (as the tasks run it on the CPU).
Also prints the largest logit and gradient difference between the two.

    python benchmarks/last_block.py [--rounds 5] [--iters 5] [--cases fmnist,vits224]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitmha.models import create_backbone  # noqa: E402

#: name -> (arch, batch, image side, patch side, what it stands for)
CASES = {
    "fmnist": ("vit_tiny_patch16_224", 128, 28, 7, "configs/fashion_mnist_finetune.yaml's step: ViT-Ti, 16 tokens"),
    "vits224": ("vit_small_patch16_224", 8, 224, 16, "ViT-S/16 at 224 px, 196 tokens"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--cases", default="fmnist,vits224", help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32; median of {args.rounds} "
          f"alternating rounds x {args.iters} iterations\n")
    print("| case | setting | train step ms | ratio | inference ms | ratio | max logit diff | max grad diff |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        arch, batch, img, patch, what = CASES[case]
        model = create_backbone(arch, img_size=img, patch_size=patch, num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # tiny lr: the weights barely move
        x, y = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def infer():
            with torch.no_grad():
                model(x)

        times = {(p, k): [] for p in (True, False) for k in ("train", "infer")}
        for _ in range(args.rounds):
            for prune in (True, False):
                model.prune_last_block = prune
                for kind, fn in (("train", step), ("infer", infer)):
                    model.train(kind == "train")
                    fn()  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        fn()
                    times[(prune, kind)].append((time.perf_counter() - t0) / args.iters * 1e3)
        diffs = {}
        model.eval()
        for prune in (True, False):
            model.prune_last_block = prune
            model.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out, y).backward()
            diffs[prune] = (out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
        dl = (diffs[True][0] - diffs[False][0]).abs().max().item()
        dg = (diffs[True][1] - diffs[False][1]).abs().max().item()
        med = {k: statistics.median(v) for k, v in times.items()}
        for prune in (False, True):
            name = "class token only" if prune else "every token"
            print(f"| {case} ({what}, batch {batch}) | {name} | {med[(prune, 'train')]:.1f} | "
                  f"{med[(prune, 'train')] / med[(False, 'train')]:.3f} | {med[(prune, 'infer')]:.1f} | "
                  f"{med[(prune, 'infer')] / med[(False, 'infer')]:.3f} | "
                  f"{f'{dl:.1e}' if prune else '-'} | {f'{dg:.1e}' if prune else '-'} |")


if __name__ == "__main__":
    main()
