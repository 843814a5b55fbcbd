#!/usr/bin/env python
"""One training step (forward, cross-entropy, backward, AdamW) in fp32 and under bf16 autocast (what
Lightning's ``precision: bf16-mixed`` runs), vitmha beside timm, in one process.

    python benchmarks/train_step.py --quick    # ViT-Ti, 112 px, batch 4, 3 rounds (under a minute)
    python benchmarks/train_step.py            # ViT-Ti/S/B, 224 px, batch 8, 7 rounds

Both models hold the same random weights (timm's, loaded key for key into vitmha), each with its own AdamW;
each round times every row once in a rotated order, and the table gives img/s from the median wall time
and its ratio to timm fp32. bf16 is fast only on CPUs with AMX or AVX512-BF16 (printed in the header).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import ARCHS, header, median_times, models  # noqa: E402


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def main(argv=None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-Ti, 112 px, batch 4, 3 rounds")
    p.add_argument("--archs", nargs="+", default=None, choices=list(ARCHS))
    p.add_argument("--batch", type=int, default=None, help="default 8; 4 with --quick")
    p.add_argument("--img-size", type=int, default=None, help="default 224; 112 with --quick")
    p.add_argument("--rounds", type=int, default=None, help="alternating repeats (default 7; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.archs or (["ViT-Ti"] if args.quick else list(ARCHS))
    batch = args.batch or (4 if args.quick else 8)
    size = args.img_size or (112 if args.quick else 224)
    rounds = args.rounds or (3 if args.quick else 7)
    print(header(f"training step, {size} px, batch {batch}, medians of {rounds} alternating rounds"))
    print(f"{'arch':7} {'row':20} {'img/s':>9} {'vs timm fp32':>12}")
    results = []
    for arch in archs:
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        fns = {}
        for bf16 in (False, True):  # fresh models per row: the optimiser steps change the weights
            ref, ours = models(ARCHS[arch], size)
            tag = "bf16-mixed" if bf16 else "fp32"
            fns[f"timm {tag}"] = step_fn(ref, x, y, bf16)
            fns[f"vitmha {tag}"] = step_fn(ours, x, y, bf16)
        t = median_times(fns, rounds)
        for name in fns:
            row = {"arch": arch, "row": name, "img_s": batch / t[name], "ratio": t["timm fp32"] / t[name]}
            results.append(row)
            print(f"{arch:7} {name:20} {row['img_s']:9.1f} {row['ratio']:11.2f}x")
    return results


if __name__ == "__main__":
    main()
