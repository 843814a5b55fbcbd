"""Parity report: vitmha vs timm on every timm ViT arch with pretrained weights (timm's vision_transformer and
deit modules, DeiT's distilled archs included).

For each arch: build timm's model with random weights (depth reduced), load its state dict into
vitmha.create_backbone(arch, pretrained=state_dict), feed the same random image at the arch's default
input size, and compare forward_features and logits (relative error = max|a-b| / max|a|).

    vitmha parity [--depth 2] [--tol 1e-4] [--filter GLOB] [--out parity.csv]
"""
from __future__ import annotations

import argparse
import csv
import sys
import time

import torch



#: timm's modules whose archs are (DeiT's distilled subclass of) its VisionTransformer
VIT_MODULES = ("vision_transformer", "deit")


def pretrained_vit_archs(pattern: str = "*") -> list[str]:
    """The archs of timm's ViT modules (DeiT's distilled ones included) that have pretrained weights."""
    import timm

    names = [n for m in VIT_MODULES for n in timm.list_models(pattern, module=m, pretrained=True)]
    return sorted({n.split(".")[0] for n in names})


def check(arch: str, depth: int = 2, seed: int = 0) -> tuple[float, float]:
    """Relative errors (features, logits) of vitmha against timm on one arch."""
    import timm
    import vitmha

    torch.manual_seed(seed)
    ref = timm.create_model(arch, pretrained=False, depth=depth).eval()
    with torch.no_grad():  # make every parameter non-trivial (timm zero-inits heads, biases, layer scales)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = vitmha.create_backbone(arch, pretrained=ref.state_dict(), depth=depth).eval()
    x = torch.randn(2, *ref.pretrained_cfg["input_size"])
    with torch.no_grad():
        fa, fb = ref.forward_features(x), ours.forward_features(x)
        la, lb = ref.forward_head(fa), ours.forward_head(fb)
    rel = lambda a, b: ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    return rel(fa, fb), rel(la, lb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vitmha parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--filter", default="*", help="glob on arch names")
    ap.add_argument("--out", default=None, help="write a CSV of the results")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    archs = pretrained_vit_archs(args.filter)
    rows, ok = [], 0
    for i, arch in enumerate(archs, 1):
        t0 = time.time()
        try:
            ef, el = check(arch, args.depth)
            passed = ef < args.tol and el < args.tol
            why = "" if passed else "tolerance"
        except Exception as e:  # report, keep going
            ef = el = float("nan")
            passed, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        ok += passed
        rows.append(dict(arch=arch, features_rel_err=ef, logits_rel_err=el, passed=passed, note=why))
        print(f"[{i:3d}/{len(archs)}] {'PASS' if passed else 'FAIL'} {arch:55s} feat {ef:.2e} logits {el:.2e} "
              f"{time.time() - t0:5.1f}s {why}", flush=True)
    print(f"\n{ok}/{len(archs)} archs reproduce timm within {args.tol:g} ({100 * ok / max(len(archs), 1):.1f}%)")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0 if ok >= 0.95 * len(archs) else 1


if __name__ == "__main__":
    sys.exit(main())
