#!/usr/bin/env python
"""Augmentation draws of the in-memory grey datasets: one numpy generator per image (the earlier way, kept
here as the reference) vs one keyed SplitMix64 hash per batch (what every in-memory data module uses).

Both build the same Fashion-MNIST train batches (same keys, same warp and normalisation); they alternate in
one process and the table gives milliseconds per batch (median over rounds) and the ratio.

    python benchmarks/data_draws.py [--batch-size 256] [--batches 40] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

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


def main(argv=None) -> int:
    from vitmha.data import FashionMNISTDataModule

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    dm = FashionMNISTDataModule(max_shift=0.036, scale=(1.0, 1.0))
    dm.setup()
    variants = {False: per_image_generators(dm.datasets["train"]), True: dm.datasets["train"]}
    keys = [[(i * args.batch_size + j, 0) for j in range(args.batch_size)] for i in range(args.batches)]
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for mode in (False, True):
            t = time.perf_counter()
            for k in keys:
                variants[mode].__getitems__(k)
            times[mode].append((time.perf_counter() - t) / args.batches * 1e3)
    per_image, batch = statistics.median(times[False]), statistics.median(times[True])
    print(f"Fashion-MNIST train batches of {args.batch_size}, {args.batches} batches x {args.rounds} rounds")
    print("| draws | ms per batch |\n|---|---|")
    print(f"| one generator per image | {per_image:.1f} |\n| one keyed hash per batch | {batch:.1f} |")
    print(f"\nratio {per_image / batch:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
