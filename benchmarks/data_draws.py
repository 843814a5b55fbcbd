#!/usr/bin/env python
"""The in-memory fast paths against albumentations, with the same keyed per-(seed, epoch, index) draws.

vitmha's in-memory data modules do not run albumentations for their default augmentation: grey
classification (digits, Fashion-MNIST, MNIST-5k) warps each image with one cv2.warpAffine from draws of a keyed
SplitMix64 hash computed for the whole batch, and normalises the batch in numpy; the synthetic shape scenes
flip/rotate in numpy. This script measures whether that second engine pays, alternating in one process:

- fast path: the data module's own batches (``__getitems__``);
- fast path, one numpy generator per image: the same, its draws from ``sample_generator`` per image (the
  draws the hash replaced);
- albumentations: the same augmentation as an ``A.Compose`` (Affine / flips, Normalize, ToTensorV2) seeded per
  image from its key (``seed_pipeline``, as the file datasets are), batches stacked as the loader's collate does.

Each row also gives one training step of the recipe's model on such a batch (forward, cross-entropy, backward,
AdamW) to put the data time in proportion: the recipes load in the main process (``num_workers: 0``), so the
data time adds to every step. Milliseconds per batch, medians of alternating rounds.

    python benchmarks/data_draws.py [--quick] [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_image_generators(ds):
    """The same dataset drawing each image's augmentation from its own numpy generator."""
    import numpy as np

    from vitmha.data.sampling import sample_generator

    class PerImage(type(ds)):
        def _params(self, idx, epochs):
            return np.stack([sample_generator(self.seed, e, i).uniform(-1, 1, 5) for i, e in zip(idx, epochs)])

    clone = PerImage.__new__(PerImage)
    clone.__dict__.update(ds.__dict__)
    return clone


def albumentations_grey(ds, rotate: float, shift: float, scale, hflip: float) -> Callable:
    """``ds``'s augmentation as an albumentations pipeline on (S, S, 1) float images, seeded per key."""
    import albumentations as A
    import cv2
    import numpy as np
    import torch
    from albumentations.pytorch import ToTensorV2

    from vitmha.data.sampling import seed_pipeline

    pipeline = A.Compose([
        A.HorizontalFlip(p=hflip),
        A.Affine(scale=tuple(scale), translate_percent=(-shift, shift), rotate=(-rotate, rotate),
                 interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
        A.Normalize(mean=float(ds.mean.ravel()[0]), std=float(ds.std.ravel()[0]), max_pixel_value=1.0),
        ToTensorV2(),
    ])
    images = (ds.images.astype(np.float32) * ds.unit)[..., None]
    channels = ds.mean.size

    def batch(keys):
        out = []
        for key in keys:
            seed_pipeline(pipeline, ds.seed, key)
            out.append(pipeline(image=images[key[0]])["image"].expand(channels, -1, -1))
        return torch.stack(out), torch.from_numpy(ds.labels[[k[0] for k in keys]])

    return batch


def albumentations_shapes(ds, mean, std, hflip: float) -> Callable:
    """The shapes module's own albumentations pipeline (``shapes_train_transforms``, what a spec runs through)."""
    from vitmha.data.builtin import shapes_train_transforms
    from vitmha.data.datasets import _ArraySegmentation, collate_pairs

    slow = _ArraySegmentation(ds.images, ds.masks, shapes_train_transforms(mean, std, hflip))
    return lambda keys: collate_pairs([slow[k] for k in keys])


def recipe_step(model_kwargs: Dict, batch) -> Callable:
    """One training step of a recipe's model on ``batch``: forward, cross-entropy, backward, AdamW."""
    import torch
    import torch.nn.functional as F

    import vitmha
    from vitmha.tasks import SemanticSegmenter

    x, y = batch
    kwargs = dict(model_kwargs)
    if kwargs.pop("head", None):  # the segmentation quickstart: a linear head on the patch tokens
        model = SemanticSegmenter(num_classes=4, head="linear", backbone_kwargs=kwargs, warmup_epochs=0)
    else:
        model = vitmha.create_backbone("vit_tiny_patch16_224", num_classes=10, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cases(quick: bool) -> Dict[str, Dict]:
    import numpy as np

    from vitmha.data import DigitsDataModule, SyntheticShapesDataModule
    from vitmha.data.datasets import _FastShapes

    out = {}
    digits = DigitsDataModule(image_size=32)  # configs/quickstart.yaml: batch 64, rotate 10, shift 0.1, zoom 0.9-1.1
    digits.setup("fit")
    d = digits.datasets["train"]
    out["digits 32 px, batch 64 (quickstart)"] = dict(
        ds=d, batch=64, slow=albumentations_grey(d, 10.0, 0.1, (0.9, 1.1), 0.0),
        model=dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4))
    try:
        from vitmha.data import FashionMNISTDataModule

        fm = FashionMNISTDataModule(max_shift=0.036, scale=(1.0, 1.0))  # configs/fashion_mnist.yaml, batch 256
        fm.setup("fit")
        f = fm.datasets["train"]
        out["Fashion-MNIST 28 px, batch 256 (fashion_mnist.yaml)"] = dict(
            ds=f, batch=256, slow=albumentations_grey(f, 0.0, 0.036, (1.0, 1.0), 0.5),
            model=dict(img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=2, class_token=False,
                       global_pool="avg"))
    except Exception as e:  # noqa: BLE001 - the Debian package is optional
        print(f"(Fashion-MNIST skipped: {e})")
    shapes = SyntheticShapesDataModule(image_size=64, n_train=200 if quick else 1000)  # quickstart_seg.yaml
    shapes.setup()
    s = shapes.datasets["train"]
    assert isinstance(s, _FastShapes)
    out["shapes 64 px, batch 32 (quickstart_seg.yaml)"] = dict(
        ds=s, batch=32, slow=albumentations_shapes(s, shapes.mean, shapes.std, 0.5), per_image=None,
        model=dict(head="linear", img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3))
    for c in out.values():
        c.setdefault("per_image", per_image_generators(c["ds"]) if not isinstance(c["ds"], _FastShapes) else None)
        n = len(c["ds"])
        c["keys"] = [[(int(i), 3) for i in np.random.default_rng(b).permutation(n)[:c["batch"]]]
                     for b in range(3 if quick else 10)]
    return out


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small check that runs in under a minute")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the training step")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    rows = []
    for name, c in cases(args.quick).items():
        variants: Dict[str, Callable] = {"fast path": c["ds"].__getitems__, "albumentations": c["slow"]}
        if c["per_image"] is not None:
            variants["fast path, generator per image"] = c["per_image"].__getitems__
        step = recipe_step(c["model"], c["ds"].__getitems__(c["keys"][0])) if c["model"] else None
        times: Dict[str, List[float]] = {k: [] for k in [*variants, "training step"]}
        for _ in range(rounds):
            for k, fn in variants.items():
                t = time.perf_counter()
                for keys in c["keys"]:
                    fn(keys)
                times[k].append((time.perf_counter() - t) / len(c["keys"]) * 1e3)
            if step is not None:
                steps = 1 if args.quick else 3
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                times["training step"].append((time.perf_counter() - t) / steps * 1e3)
        rows.append((name, {k: statistics.median(v) for k, v in times.items() if v}))
    print(f"ms per batch, median of {rounds} alternating rounds; training step with {args.threads} threads")
    print("| data | fast path | generator per image | albumentations | albumentations / fast | training step | "
          "fast path share of a step | albumentations share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in rows:
        fast, slow, step = t["fast path"], t["albumentations"], t.get("training step")
        per = t.get("fast path, generator per image")
        share = (lambda d: f"{d / (d + step):.1%}") if step else (lambda d: "-")
        print(f"| {name} | {fast:.1f} | {'-' if per is None else f'{per:.1f}'} | {slow:.1f} | {slow / fast:.1f}x | "
              f"{'-' if step is None else f'{step:.0f}'} | {share(fast)} | {share(slow)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
