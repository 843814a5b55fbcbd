#!/usr/bin/env python
"""How faithful are the explanations of vitmha.explain? Per method: deletion AUC (lower is better), insertion
AUC (higher is better) and the share of the relevance that falls on the object, against a random ranking.

    python benchmarks/faithfulness.py \\
        [--weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors] \\
        [--more-photos] [--checkpoint fashion_mnist_run/checkpoints/best.ckpt --n 500] [--samples 500] [--quick]

(a) The sample photos data/samples/{chelsea,coffee,astronaut}.jpg (with ``--more-photos`` also scikit-learn's
china.jpg and flower.jpg and matplotlib's grace_hopper.jpg, installed with those packages) with timm's real
ImageNet ViT-Ti (resized whole to 224 px, as `vitmha explain` shows them), each explained for its top-1
ImageNet class. The object
share is measured on the hand-drawn cat outline (data/samples/chelsea_cat_outline.json): on the photo and on
the cat pasted at half size onto a grey canvas (benchmarks/attention_share.py's two scenes).
(b) With ``--checkpoint``: a fine-tuned Fashion-MNIST classifier on the first ``--n`` images of the official
test set (as its data module feeds them), each explained for its predicted class; the object is the garment
(pixels brighter than 10 % of white; the background is black).

Deletion fills the most relevant patches first with the image's mean colour ("mean") or with its blur
("blur", σ = half a patch); insertion puts them back into the blurred image. The x-axis is the fraction of
patches, so every AUC is in [0, 1]. "random" ranks the patches at random (one seeded draw per image). The
last column is each map's cost per image in seconds (LIME and KernelSHAP: ``--samples`` forwards each).
``--quick``: chelsea.jpg alone, no object share, 8-step curves, 32 samples (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vitmha.explain import (DEFAULT_SAMPLES, METHODS, Target, area_share, auc, deletion_curve,  # noqa: E402
                            explain, insertion_curve, relevance_share)

SAMPLES = ROOT / "data" / "samples"
PHOTOS = ("chelsea", "coffee", "astronaut")
# more real photos that come with installed dependencies (no download): scikit-learn's and matplotlib's samples
MORE_PHOTOS = {"china": ("sklearn", "datasets/images/china.jpg"), "flower": ("sklearn", "datasets/images/flower.jpg"),
               "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")}


def photo_paths(more: bool) -> Dict[str, Path]:
    """{name: file}: the sample photos, and with ``more`` the packaged photos that are installed."""
    import importlib

    paths = {n: SAMPLES / f"{n}.jpg" for n in PHOTOS}
    if more:
        for name, (package, rel) in MORE_PHOTOS.items():
            f = Path(importlib.import_module(package).__file__).parent / rel
            if f.is_file():
                paths[name] = f
            else:
                print(f"{name}: {f} not found, skipped", file=sys.stderr)
    return paths
NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
COLUMNS = ("del_mean", "del_blur", "ins")


def relevance_maps(model, backbone, x, target, methods, seed: int, samples: int = DEFAULT_SAMPLES):
    """{method: map} plus "random", and {method: seconds} of computing each."""
    maps, secs = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        maps[m] = explain(model, backbone, x, target, [m], samples=samples)[m]
        secs[m] = time.perf_counter() - t0
    grid = next(iter(maps.values())).shape
    maps["random"] = torch.rand(grid, generator=torch.Generator().manual_seed(seed))
    secs["random"] = 0.0
    return maps, secs


def curves(model, x, target, relevance, patch, steps: int) -> Dict[str, float]:
    """The three AUCs of one map."""
    return {"del_mean": auc(*deletion_curve(model, x, target, relevance, patch, baseline="mean", steps=steps)),
            "del_blur": auc(*deletion_curve(model, x, target, relevance, patch, baseline="blur", steps=steps)),
            "ins": auc(*insertion_curve(model, x, target, relevance, patch, baseline="blur", steps=steps))}


def _mean_sem(v: List[float]) -> str:
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return f"{v.mean():.3f}" if len(v) else "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}"


def photos(weights: str, methods, steps: int, more: bool = False, samples: int = DEFAULT_SAMPLES,
           quick: bool = False) -> None:
    from attention_share import cat_scenes

    from vitmha.inference import eval_transform, pretrained_backbone, read_image

    bb, pre = pretrained_backbone(NAME, weights)
    pre.crop_pct = None  # the whole image, as `vitmha explain` shows it
    tf = eval_transform(pre, "classification")
    patch = tuple(bb.patch_embed.patch_size)
    rows = {m: {c: [] for c in COLUMNS} for m in (*methods, "random")}
    per_photo, secs = [], {m: [] for m in (*methods, "random")}
    paths = {"chelsea": SAMPLES / "chelsea.jpg"} if quick else photo_paths(more)
    for k, (name, path) in enumerate(paths.items()):
        x = tf(image=read_image(str(path)))["image"][None]
        with torch.no_grad():
            p = bb(x).softmax(-1)[0]
        target = Target(int(p.argmax()))
        maps, sec = relevance_maps(bb, bb, x, target, methods, seed=k, samples=samples)
        line = {}
        for m, r in maps.items():
            a = curves(bb, x, target, r, patch, steps)
            for c in COLUMNS:
                rows[m][c].append(a[c])
            secs[m].append(sec[m])
            line[m] = a
        per_photo.append((name, pre.classes[target.class_index], float(p.max()), line))
        print(f"{name}: {pre.classes[target.class_index]} ({float(p.max()):.2f})", file=sys.stderr)
    shares = {m: [] for m in rows}
    chance = []
    for k, (_, image, mask) in enumerate([] if quick else cat_scenes()):
        x = tf(image=image)["image"][None]
        with torch.no_grad():
            target = Target(int(bb(x).argmax()))
        maps, _ = relevance_maps(bb, bb, x, target, methods, seed=100 + k, samples=samples)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        chance.append(area_share(mask, bb.patch_embed.grid_size))
        for m, r in maps.items():
            shares[m].append(relevance_share(r, mask))
    print(f"\n(a) sample photos, real ViT-Ti ({NAME}), 224 px, {bb.patch_embed.grid_size[0]}² patches, "
          f"{steps} steps; mean over {', '.join(paths)}")
    share_heads = [f"share on the cat, photo (chance {chance[0]:.2f})",
                   f"share on the cat on grey (chance {chance[1]:.2f})"] if chance else []
    print("\n| method | deletion AUC, mean fill ↓ | deletion AUC, blur fill ↓ | insertion AUC ↑ | "
          + "".join(f"{h} | " for h in share_heads) + "s per image |")
    print("|---|" + "---|" * (4 + len(share_heads)))
    for m, r in rows.items():
        print(f"| {m} | {np.mean(r['del_mean']):.3f} | {np.mean(r['del_blur']):.3f} | {np.mean(r['ins']):.3f} | "
              + "".join(f"{v:.2f} | " for v in shares[m]) + f"{np.mean(secs[m]):.2f} |")
    print("\nper photo (deletion mean fill / deletion blur fill / insertion):\n")
    print("| method | " + " | ".join(f"{n}: {c} ({q:.2f})" for n, c, q, _ in per_photo) + " |")
    print("|---|" + "---|" * len(per_photo))
    for m in rows:
        print(f"| {m} | " + " | ".join(f"{a[m]['del_mean']:.3f} / {a[m]['del_blur']:.3f} / {a[m]['ins']:.3f}"
                                       for *_, a in per_photo) + " |")


def fashion(checkpoint: str, n: int, methods, steps: int, samples: int = DEFAULT_SAMPLES) -> None:
    from vitmha.data import FashionMNISTDataModule
    from vitmha.inference import backbone_of, load_task, preprocess_config, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    task = load_task(checkpoint, ckpt=ckpt)
    pre = preprocess_config(task, ckpt)
    bb = backbone_of(task)
    dm_args = {k: v for k, v in pre.datamodule.items() if not k.startswith("_")}
    dm = FashionMNISTDataModule(**dm_args)
    dm.setup("test")
    test = dm.datasets["test"]
    patch = tuple(bb.patch_embed.patch_size)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    rows = {m: {c: [] for c in COLUMNS} for m in (*methods, "random")}
    shares = {m: [] for m in rows}
    secs = {m: [] for m in rows}
    chance, correct = [], 0
    t_start = time.time()
    for i in range(n):
        x, y = test[i]
        x = x[None]
        with torch.no_grad():
            pred = int(task(x).argmax())
        correct += pred == y
        target = Target(pred)
        maps, sec = relevance_maps(task, bb, x, target, methods, seed=i, samples=samples)
        garment = ((x[0] * std + mean).mean(0) > 0.1).float()
        grid = next(iter(maps.values())).shape
        chance.append(area_share(garment, tuple(grid), patch))
        for m, r in maps.items():
            a = curves(task, x, target, r, patch, steps)
            for c in COLUMNS:
                rows[m][c].append(a[c])
            shares[m].append(relevance_share(r, garment, patch))
            secs[m].append(sec[m])
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{n} images, {time.time() - t_start:.0f} s", file=sys.stderr)
    size = x.shape[-1]
    print(f"\n(b) Fashion-MNIST test images 0-{n - 1}, {Path(checkpoint).name} ({task.hparams.backbone}, {size} px, "
          f"{grid[0]}×{grid[1]} patches of {patch[0]} px), explained for the predicted class "
          f"({correct}/{n} correct); mean ± s.e.m. over the images")
    print("\n| method | deletion AUC, mean fill ↓ | deletion AUC, blur fill ↓ | insertion AUC ↑ | "
          "share on the garment "
          f"(chance {np.mean(chance):.2f}) | deletion (mean fill) below attention's | s per image |")
    print("|---|---|---|---|---|---|---|")
    ref = np.asarray(rows["attention"]["del_mean"]) if "attention" in rows else None
    for m, r in rows.items():
        wins = "" if ref is None else f"{np.mean(np.asarray(r['del_mean']) < ref) * 100:.0f} %"
        print(f"| {m} | {_mean_sem(r['del_mean'])} | {_mean_sem(r['del_blur'])} | {_mean_sem(r['ins'])} | "
              f"{_mean_sem(shares[m])} | {wins} | {np.mean(secs[m]):.3f} |")
    paired_differences(rows)


def paired_differences(rows: Dict[str, Dict[str, List[float]]]) -> None:
    """Each method's deletion AUC minus raw attention's and rollout's on the same image: mean ± s.e.m. of the
    per-image differences (negative = deletes better), the comparison the images' own spread would blur."""
    refs = [r for r in ("attention", "rollout") if r in rows]
    if not refs:
        return
    print("\nPaired per image, deletion AUC minus the reference's (mean ± s.e.m.; below 0 = better than it):\n")
    print("| method | " + " | ".join(f"− {r}, {fill} fill" for r in refs for fill in ("mean", "blur")) + " |")
    print("|---|" + "---|" * (2 * len(refs)))
    for m, r in rows.items():
        if m in refs:
            continue
        cells = [_mean_sem(list(np.asarray(r[c]) - np.asarray(rows[ref][c])))
                 for ref in refs for c in ("del_mean", "del_blur")]
        print(f"| {m} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", "--pretrained", dest="weights",
                    default=str(ROOT.parent / "shared" / "weights" / f"{NAME}.safetensors"),
                    help="timm's ViT-Ti weights for the photos ('' skips them)")
    ap.add_argument("--checkpoint", default=None, help="a Fashion-MNIST ImageClassifier checkpoint (part b)")
    ap.add_argument("--n", type=int, default=500, help="Fashion-MNIST test images (default 500)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default all)")
    ap.add_argument("--more-photos", action="store_true",
                    help="add scikit-learn's china/flower and matplotlib's grace_hopper photos to the three samples")
    ap.add_argument("--photo-steps", type=int, default=49, help="curve steps on the photos (196 patches; default 49)")
    ap.add_argument("--fashion-steps", type=int, default=64,
                    help="curve steps on Fashion-MNIST (at most one per patch)")
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                    help=f"LIME and KernelSHAP samples per map (default {DEFAULT_SAMPLES}, as vitmha explain)")
    ap.add_argument("--quick", action="store_true", help="chelsea.jpg only, 8-step curves, 32 samples (a smoke run)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        args.photo_steps, args.samples, args.n = 8, 32, min(args.n, 5)
    if args.weights:
        photos(args.weights, methods, args.photo_steps, args.more_photos, args.samples, args.quick)
    if args.checkpoint:
        fashion(args.checkpoint, args.n, methods, args.fashion_steps, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
