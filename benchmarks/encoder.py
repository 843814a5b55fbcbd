#!/usr/bin/env python
"""vitmha's encoder vs timm's, same arch and weights, measured alternately in one process.

Reports per-iteration median times (inference, train step), their ratio vitmha/timm, activation memory
(CUDA: peak allocated; CPU: bytes of tensors saved for backward), the explicit-attention path's cost, and
the fraction of this machine's measured fp32 GEMM rate that the forward pass reaches.

    python benchmarks/encoder.py [--arch vit_small_patch16_224] [--batch 8] [--img 224] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def gemm_rate(device, n=2048, iters=10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    t = timed(lambda: a @ b, device, iters)
    return 2 * n ** 3 / t


def saved_activation_bytes(model, x, y) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def peak_bytes(model, x, y, device) -> int:
    if device.type != "cuda":
        return saved_activation_bytes(model, x, y)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


def main(argv=None) -> int:
    import timm
    import vitmha

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    ap.add_argument("--iters", type=int, default=3, help="iterations per timing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    ref = timm.create_model(args.arch, pretrained=False, img_size=args.img).to(device)
    ours = vitmha.create_backbone(args.arch, pretrained=ref.state_dict(), img_size=args.img).to(device)
    explicit = vitmha.create_backbone(args.arch, pretrained=ref.state_dict(), img_size=args.img).to(device)
    explicit.set_fused_attn(False)
    models = {"timm": ref, "vitmha": ours, "vitmha-explicit": explicit}
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    y = torch.randint(0, ref.num_classes, (args.batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def infer(m):
        with torch.no_grad(), amp:
            m(x)

    def train_step(m, opt):
        with amp:
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # train steps change weights; use an optimiser with lr 0 so every model keeps computing the same thing
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.0) for k, m in models.items()}
    for k, m in models.items():  # warm up
        m.eval()
        infer(m)
        m.train()
        train_step(m, opts[k])
    times = {k: {"infer": [], "train": []} for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            m.eval()
            times[k]["infer"].append(timed(lambda: infer(m), device, args.iters))
            m.train()
            times[k]["train"].append(timed(lambda: train_step(m, opts[k]), device, args.iters))

    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            ours.eval()(x)
    fwd_flops = fc.get_total_flops()
    rate = gemm_rate(device)
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in times.items()}
    mem = {k: peak_bytes(m.train(), x, y, device) for k, m in models.items()}

    print(f"{args.arch}, batch {args.batch}, {args.img} px, {device.type} ({torch.get_num_threads()} threads), "
          f"{args.dtype}, median of {args.rounds} alternating rounds x {args.iters} iters")
    print(f"measured fp32 GEMM rate: {rate / 1e9:.1f} GFLOP/s; forward = {fwd_flops / 1e9:.2f} GFLOP")
    print()
    print("| model | inference ms | ratio vs timm | train step ms | ratio vs timm | activation MB | fwd % of GEMM rate |")
    print("|---|---|---|---|---|---|---|")
    for k in models:
        i, t = med[k]["infer"], med[k]["train"]
        print(f"| {k} | {i * 1e3:.1f} | {i / med['timm']['infer']:.3f} | {t * 1e3:.1f} | "
              f"{t / med['timm']['train']:.3f} | {mem[k] / 2 ** 20:.1f} | {100 * fwd_flops / i / rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
