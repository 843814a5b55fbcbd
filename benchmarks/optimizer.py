#!/usr/bin/env python
"""AdamW's three CPU implementations in torch over one ViT's parameter groups, alternating in one process.

torch picks the per-tensor Python loop on the CPU by default; vitmha's tasks ask for the fused kernel there
(vitmha.tasks.optim.make_optimizer). The same step of each (same groups, weight decay rules, gradients) is
timed in rounds that alternate the three; the table gives the median ms per step, the ratio to the loop,
the share of a whole training iteration it stands for (forward + backward of one batch, median of two), and the
largest difference of the updated weights from the loop's after the timed steps.

    python benchmarks/optimizer.py [--arch vit_tiny_patch16_224] [--img 28] [--patch 7] [--batch 128]
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
from vitmha.tasks.optim import param_groups  # noqa: E402

KINDS = {"loop (torch's CPU default)": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--img", type=int, default=28)
    ap.add_argument("--patch", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    nets = {k: create_backbone(args.arch, num_classes=10, img_size=args.img, patch_size=args.patch) for k in KINDS}
    first = next(iter(nets.values()))
    for net in nets.values():
        net.load_state_dict(first.state_dict())
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, 10, (args.batch,))
    fwd_bwd = []
    for _ in range(3):                                               # one iteration's forward + backward
        first.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        F.cross_entropy(first(x), y).backward()
        fwd_bwd.append(time.perf_counter() - t0)
    fwd_bwd = statistics.median(fwd_bwd[1:])
    grads = [p.grad.clone() for p in first.parameters()]
    opts = {}
    for k, net in nets.items():
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        groups = param_groups(net, [], lr=1e-3, weight_decay=0.05, layer_decay=1.0)
        opts[k] = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), **KINDS[k])
        opts[k].step()                                               # state allocated outside the timing
    times = {k: [] for k in KINDS}
    for _ in range(args.rounds):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
    ref = dict(nets["loop (torch's CPU default)"].named_parameters())
    n_params = sum(p.numel() for p in first.parameters())
    print(f"{args.arch}, {n_params / 1e6:.1f} M parameters, {len(list(first.parameters()))} tensors; "
          f"{torch.get_num_threads()} threads; forward + backward of {args.batch} images at {args.img} px: "
          f"{fwd_bwd * 1e3:.0f} ms\n")
    print("| AdamW | ms per step (median) | ratio to the loop | share of a training iteration | max weight diff vs loop |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["loop (torch's CPU default)"])
    for k, t in times.items():
        m = statistics.median(t)
        diff = max(float((p - ref[n]).detach().abs().max()) for n, p in nets[k].named_parameters())
        print(f"| {k} | {m:.1f} | {m / base:.2f} | {m / (m + fwd_bwd * 1e3) * 100:.1f} % | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
