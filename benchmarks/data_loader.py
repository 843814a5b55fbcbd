#!/usr/bin/env python
"""Data pipeline throughput: vitmha's ImageFolder train loader against timm's, on the same JPEG folder.

Images per second per loader worker, at 224 px, batch 32, each library with its own default training
augmentation, alternating in one process (medians of the rounds; each round is one pass over the folder, the
loaders' persistent workers warmed up first):

- vitmha: ``ImageFolderDataModule(root, image_size=224).train_dataloader()`` (RandomResizedCrop scale 0.8-1 and
  the light colour/geometry ops, keyed per-(index, epoch) draws, normalised float32 batches);
- timm transforms: ``timm.data.ImageDataset`` + ``timm.data.create_transform(224, is_training=True)``
  (RandomResizedCrop 0.08-1, flip, colour jitter 0.4, normalised) through a torch ``DataLoader``;
- timm loader: ``timm.data.create_loader(..., is_training=True, device=cpu)``: its prefetcher sends uint8
  batches and normalises them in the main process (not counted in the workers' time; on a GPU it runs there).

The folders are written first, to a temporary directory: JPEGs (quality 90) tiled from crops of the two
photographs scikit-learn ships (``load_sample_images``), with random flips and colour gains so that every file
differs; ``imagenet``: 500x375, 375x500, 500x333, 333x500, 500x400 and 640x480, like ImageNet's photos;
``large``: 2048x1536 and 1536x2048, like a phone's pictures downsized once.

    python benchmarks/data_loader.py [--quick] [--images 400] [--large 64] [--workers 1 2] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (640, 480)]
LARGE_SIZES = [(2048, 1536), (1536, 2048)]
CLASSES = 4


def write_jpegs(root: Path, n: int, sizes: Sequence[Tuple[int, int]], seed: int = 0) -> Path:
    """``root/train/c{0..3}/*.jpg`` and a small ``root/val``: ``n`` photos of the given (W, H) sizes, in turn."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]  # two 640x427 photographs
    g = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        canvas = np.empty((h, w, 3), np.uint8)
        y = 0
        while y < h:  # rows of tiles, each tile a crop of one photo at its own resolution
            th, x = min(h - y, int(g.integers(200, 428))), 0
            while x < w:
                tw = min(w - x, int(g.integers(200, 641)))
                p = photos[int(g.integers(len(photos)))]
                py, px = int(g.integers(0, p.shape[0] - th + 1)), int(g.integers(0, p.shape[1] - tw + 1))
                tile = p[py:py + th, px:px + tw]
                canvas[y:y + th, x:x + tw] = tile[:, ::-1] if g.random() < 0.5 else tile
                x += tw
            y += th
        canvas = np.clip(canvas * g.uniform(0.8, 1.2, 3), 0, 255).astype(np.uint8)
        for split in ("train",) + (("val",) if i < CLASSES else ()):
            d = root / split / f"c{i % CLASSES}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).save(d / f"{i:04d}.jpg", quality=90)
    return root


def vitmha_loader(root: Path, workers: int, batch: int):
    from vitmha.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(root), image_size=224, batch_size=batch, num_workers=workers, pin_memory=False,
                               persistent_workers=True, check_files=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    return loader, loader.sampler.set_epoch


def timm_transform_loader(root: Path, workers: int, batch: int):
    from timm.data import ImageDataset, create_transform
    from torch.utils.data import DataLoader

    ds = ImageDataset(str(root / "train"), transform=create_transform(224, is_training=True))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True)
    return loader, None


def timm_create_loader(root: Path, workers: int, batch: int):
    import torch
    from timm.data import ImageDataset, create_loader

    ds = ImageDataset(str(root / "train"))
    loader = create_loader(ds, input_size=(3, 224, 224), batch_size=batch, is_training=True, num_workers=workers,
                           device=torch.device("cpu"), persistent_workers=True)
    return loader, None


LOADERS: Dict[str, Callable] = {"vitmha": vitmha_loader, "timm transforms": timm_transform_loader,
                                "timm create_loader": timm_create_loader}


def one_pass(loader, set_epoch, epoch: int) -> Tuple[float, int]:
    if set_epoch is not None:
        set_epoch(epoch)
    n, t = 0, time.perf_counter()
    for x, _ in loader:
        n += int(x.shape[0])
    return time.perf_counter() - t, n


def measure(root: Path, workers: int, rounds: int, batch: int) -> Dict[str, float]:
    """Median images/s per worker of each loader, alternating rounds."""
    loaders = {name: make(root, workers, batch) for name, make in LOADERS.items()}
    for i, (loader, set_epoch) in enumerate(loaders.values()):  # start the workers, fill the page cache
        one_pass(loader, set_epoch, 1000 + i)
    rates: Dict[str, List[float]] = {name: [] for name in loaders}
    for r in range(rounds):
        for name, (loader, set_epoch) in loaders.items():
            seconds, n = one_pass(loader, set_epoch, r)
            rates[name].append(n / seconds / workers)
    del loaders
    return {name: statistics.median(v) for name, v in rates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small check that runs in under a minute")
    ap.add_argument("--images", type=int, default=400, help="ImageNet-sized JPEGs")
    ap.add_argument("--large", type=int, default=64, help="2048x1536 JPEGs (0: skip that folder)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.large, args.workers, args.rounds = 64, 32, [1], 3
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"imagenet": write_jpegs(Path(tmp) / "imagenet", args.images, IMAGENET_SIZES)}
        if args.large:
            folders["large"] = write_jpegs(Path(tmp) / "large", args.large, LARGE_SIZES, seed=1)
        rows = []
        for fname, root in folders.items():
            for w in args.workers:
                rows.append((fname, w, measure(root, w, args.rounds, args.batch_size)))
    names = list(LOADERS)
    print(f"images/s per worker, 224 px, batch {args.batch_size}, median of {args.rounds} alternating passes "
          f"(imagenet: {args.images} JPEGs, large: {args.large})")
    print("| folder | workers | " + " | ".join(names) + " | vitmha / timm transforms | vitmha / timm create_loader |")
    print("|---" * (len(names) + 4) + "|")
    for fname, w, r in rows:
        cells = " | ".join(f"{r[n]:.1f}" for n in names)
        print(f"| {fname} | {w} | {cells} | {r['vitmha'] / r['timm transforms']:.2f} | "
              f"{r['vitmha'] / r['timm create_loader']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
