#!/usr/bin/env python
"""Inference cost of the fused models of docs/guides/ensembles.md, side by side in one process, and the tables of
its measured runs.

    python benchmarks/fusion.py --quick              # timing only, 3 rounds (well under a minute)
    python benchmarks/fusion.py                      # timing, 9 rounds
    python benchmarks/fusion.py --collect runs/fusion  # + the tables of the runs in runs/fusion (docs/guides/ensembles.md)

Timing: the models of the Fashion-MNIST runs (28 x 28 images, 7 x 7 patches, 16 tokens + the class token, fp32,
inference mode, random weights: speed does not depend on them): the 12-block ViT-Ti (one fine-tune, a soup or a
WiSE-FT model: all the same network), the 4-block student (``keep_blocks: 4``), and the probability ensemble
of 5 ViT-Ti (``vitmha.fusion.EnsembleTask``, each member's softmax averaged). Each round times every model
once, in a rotated order; the table gives img/s from the median wall-clock time, its ratio to the 12-block
model, and the ratio of the median process CPU times (the steadier estimate on a shared machine).

``--collect DIR``: test accuracy of each fine-tune, of the soups and of the ensemble (``DIR/eval/*/summary.json``,
written by ``vitmha evaluate``), the validation accuracies the greedy soup selected on
(``DIR/ckpt/greedy.ckpt``), the WiSE-FT sweep (``DIR/wise/wise.csv``) and the distillation runs
(``DIR/eval/student*``, ``DIR/eval/distilled*``), as markdown.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitmha.models import create_backbone  # noqa: E402

ARCH = "vit_tiny_patch16_224"
SMALL_IMAGES = dict(img_size=28, patch_size=7, num_classes=10)


class Ensemble(torch.nn.Module):
    """The mean of the members' softmax, as vitmha.fusion.EnsembleTask computes it for plain classifiers."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)


def models() -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    out = {"ViT-Ti, 12 blocks (single, soup, WiSE-FT)": create_backbone(ARCH, **SMALL_IMAGES),
           "student, 4 blocks (keep_blocks 4)": create_backbone(ARCH, depth=4, **SMALL_IMAGES),
           "ensemble of 5 ViT-Ti": Ensemble([create_backbone(ARCH, **SMALL_IMAGES) for _ in range(5)])}
    return {k: m.eval() for k, m in out.items()}


def timing(batch: int, rounds: int, iters: int) -> List[Dict[str, Any]]:
    """Per model: median wall and CPU seconds per batch over ``rounds`` rounds of ``iters`` forwards."""
    nets = models()
    names = list(nets)
    x = torch.randn(batch, 3, 28, 28)
    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for m in nets.values():
            m(x)  # warm-up
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:  # rotated order
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    nets[n](x)
                wall[n].append((time.perf_counter() - w0) / iters)
                cpu[n].append((time.process_time() - c0) / iters)
    base = names[0]
    rows = []
    for n in names:
        w, c = statistics.median(wall[n]), statistics.median(cpu[n])
        rows.append({"model": n, "img_s": batch / w, "ratio": statistics.median(wall[base]) / w,
                     "cpu_ratio": statistics.median(cpu[base]) / c,
                     "params_M": sum(p.numel() for p in nets[n].parameters()) / 1e6})
    return rows


def markdown(rows: List[Dict[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ --collect
def _summary(root: Path, name: str) -> Dict[str, Any]:
    path = root / "eval" / name / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(root: Path) -> str:
    """The markdown tables of docs/guides/ensembles.md from the runs under ``root``."""
    out = []
    greedy = root / "ckpt" / "greedy.ckpt"
    info = torch.load(greedy, weights_only=True, map_location="cpu").get("vitmha_fusion", {}) if greedy.is_file() else {}
    val = {Path(p).stem: v for p, v in (info.get("alone") or {}).items()}
    fts = sorted(p.name for p in (root / "eval").glob("ft*"))
    rows = [{"model": n, "val/acc": val.get(n, float("nan")),
             "test/acc": _summary(root, n).get("metrics", {}).get("test/acc", float("nan"))} for n in fts]
    if rows:
        best = max(rows, key=lambda r: r["val/acc"])
        table = [dict(r) for r in rows]
        table.append({"model": f"best single by val ({best['model']})", **{k: best[k] for k in ("val/acc", "test/acc")}})
        uni = torch.load(root / "ckpt" / "uniform.ckpt", weights_only=True, map_location="cpu").get("vitmha_fusion", {}) \
            if (root / "ckpt" / "uniform.ckpt").is_file() else {}
        table.append({"model": f"uniform soup of {len(uni.get('members', []))}", "val/acc": uni.get("score", float("nan")),
                      "test/acc": _summary(root, "uniform").get("metrics", {}).get("test/acc", float("nan"))})
        kept = [Path(p).stem for p in info.get("ingredients", [])]
        table.append({"model": f"greedy soup ({', '.join(kept)})", "val/acc": info.get("score", float("nan")),
                      "test/acc": _summary(root, "greedy").get("metrics", {}).get("test/acc", float("nan"))})
        ens = _summary(root, "ensemble")
        table.append({"model": f"ensemble of {len((ens.get('ensemble') or {}).get('members', []))} (mean probabilities)",
                      "val/acc": float("nan"), "test/acc": ens.get("metrics", {}).get("test/acc", float("nan"))})
        out += ["### Soups and ensembles (Fashion-MNIST test, 10,000 images)", markdown(table, ["model", "val/acc", "test/acc"])]
    wise = root / "wise" / "wise.csv"
    if wise.is_file():
        rows = [{k: (float(v) if k != "robustness_samples" else v) for k, v in r.items()} for r in csv.DictReader(open(wise))]
        cols = ["alpha", "test/acc", "clean_subset", "corruption_mean"]
        cols += [c for c in rows[0] if "@" in c]
        out += ["### WiSE-FT", markdown(rows, [c for c in cols if c in rows[0]])]
    dist = []
    for kind in ("student", "distilled"):
        accs = [_summary(root, f"{kind}{s}").get("metrics", {}).get("test/acc") for s in range(3)]
        accs = [a for a in accs if a is not None]
        if accs:
            dist.append({"run": kind, "seeds": len(accs), "test/acc per seed": ", ".join(f"{a:.4f}" for a in accs),
                         "mean": statistics.mean(accs), "spread (max-min)": max(accs) - min(accs)})
    if dist:
        out += ["### Distillation (4-block student)", markdown(dist, list(dist[0]))]
    return "\n\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds at batch 32")
    p.add_argument("--collect", default=None, metavar="DIR", help="also print the tables of the runs in DIR")
    args = p.parse_args(argv)
    batch, rounds, iters = (32, 3, 2) if args.quick else (128, 9, 3)
    print(f"threads {torch.get_num_threads()}, batch {batch}, {rounds} rounds of {iters} forwards per model")
    print(markdown(timing(batch, rounds, iters), ["model", "params_M", "img_s", "ratio", "cpu_ratio"]))
    if args.collect:
        print()
        print(collect(Path(args.collect)))


if __name__ == "__main__":
    main()
