#!/usr/bin/env python
"""Inference throughput at each precision, vitmha beside timm, in one process.

    python benchmarks/inference.py --quick     # ViT-Ti, 112 px, batch 4, 3 rounds (under a minute)
    python benchmarks/inference.py             # ViT-Ti/S/B, 224 px, batch 1 and 32, 7 rounds

Rows: timm fp32, timm under ``torch.autocast("cpu", torch.bfloat16)``, vitmha fp32, vitmha under the same
autocast, vitmha converted with ``.to(torch.bfloat16)`` (bf16 inputs), vitmha int8 (torchao dynamic int8
linear layers, ``vitmha.precision.quantize_int8``), vitmha fp32 with ToMe r = 8 and 16. Every model holds
the same random weights (timm's, loaded key for key into vitmha); each round times every row once in a
rotated order, and the table gives img/s from the median wall time, its ratio to timm fp32, and the max
|logit - timm fp32 logit| relative to the largest fp32 logit. bf16 is fast only on CPUs with AMX or
AVX512-BF16 (``vitmha.precision.cpu_bf16_support()``, printed in the header); elsewhere it is emulated.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {"ViT-Ti": "vit_tiny_patch16_224", "ViT-S": "vit_small_patch16_224", "ViT-B": "vit_base_patch16_224"}


def median_times(fns: Dict[str, Callable[[], object]], rounds: int, iters: int = 1) -> Dict[str, float]:
    """Median wall seconds per call of each function; each round calls every one ``iters`` times, the order
    rotated round by round so that drifts of a shared machine fall on all of them alike."""
    names = list(fns)
    for name in names:  # warm-up: first-call allocations, lazy kernels
        fns[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / iters)
    return {n: statistics.median(v) for n, v in times.items()}


def header(title: str) -> str:
    import timm

    from vitmha.precision import cpu_bf16_support

    return (f"{title}\n{platform.processor() or platform.machine()}, torch {torch.__version__}, timm "
            f"{timm.__version__}, {torch.get_num_threads()} threads, CPU bf16: {cpu_bf16_support()}")


def models(arch: str, img_size: int):
    """(timm model, vitmha model) with the same random weights, eval mode."""
    import timm

    import vitmha

    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, img_size=img_size).eval()
    with torch.no_grad():
        for p in ref.parameters():  # timm zero-inits the head: give the logits something to differ by
            p.add_(torch.randn_like(p) * 0.02)
    ours = vitmha.create_backbone(arch, pretrained=False, img_size=img_size).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def rows(arch: str, img_size: int, batch: int, tome: Sequence[int]) -> Dict[str, Callable[[], torch.Tensor]]:
    from vitmha.models.tome import apply_tome
    from vitmha.precision import quantize_int8

    ref, ours = models(arch, img_size)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    xb = x.to(torch.bfloat16)
    bf = copy.deepcopy(ours).to(torch.bfloat16)
    q = quantize_int8(copy.deepcopy(ours))

    def autocast(model):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        return run

    out = {"timm fp32": lambda: ref(x), "timm bf16 autocast": autocast(ref), "vitmha fp32": lambda: ours(x),
           "vitmha bf16 autocast": autocast(ours), "vitmha bf16 weights": lambda: bf(xb),
           "vitmha int8": lambda: q(x)}
    for r in tome:
        merged = apply_tome(copy.deepcopy(ours), r)
        out[f"vitmha ToMe r={r}"] = (lambda m: (lambda: m(x)))(merged)
    return out


def main(argv=None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-Ti, 112 px, batch 4, 3 rounds")
    p.add_argument("--archs", nargs="+", default=None, choices=list(ARCHS))
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="default 224; 112 with --quick")
    p.add_argument("--rounds", type=int, default=None, help="alternating repeats (default 7; 3 with --quick)")
    p.add_argument("--tome", nargs="*", type=int, default=[8, 16], help="ToMe r values (default 8 16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.archs or (["ViT-Ti"] if args.quick else list(ARCHS))
    batches = args.batch or ([4] if args.quick else [1, 32])
    rounds = args.rounds or (3 if args.quick else 7)
    args.img_size = args.img_size or (112 if args.quick else 224)
    print(header(f"inference, {args.img_size} px, medians of {rounds} alternating rounds"))
    results = []
    print(f"{'arch':7} {'batch':>5}  {'row':22} {'img/s':>9} {'vs timm fp32':>12} {'max rel logit diff':>18}")
    for arch in archs:
        for batch in batches:
            fns = rows(ARCHS[arch], args.img_size, batch, args.tome)
            with torch.inference_mode():
                ref = fns["timm fp32"]().float()
                diffs = {n: float((f().float() - ref).abs().max() / ref.abs().max()) for n, f in fns.items()}
                t = median_times(fns, rounds)
            for name in fns:
                row = {"arch": arch, "batch": batch, "row": name, "img_s": batch / t[name],
                       "ratio": t["timm fp32"] / t[name], "max_rel_diff": diffs[name]}
                results.append(row)
                print(f"{arch:7} {batch:5d}  {name:22} {row['img_s']:9.1f} {row['ratio']:11.2f}x "
                      f"{row['max_rel_diff']:18.2e}")
    return results


if __name__ == "__main__":
    main()
