#!/usr/bin/env python
"""Does a long run leak? Trains a tiny ViT for thousands of steps through the same CLI as tools/train.py
and samples the process's resident memory (RSS) every 100 steps; prints the growth after warm-up.

    python benchmarks/memory.py [--epochs 12] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    from lightning.pytorch.callbacks import Callback

    from vitmha.cli import cli_main

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    samples: list[tuple[int, float]] = []

    class RSS(Callback):
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step % 100 == 0:
                samples.append((trainer.global_step, rss_mb()))

    RSS.__module__ = __name__
    sys.modules[__name__].RSS = RSS
    with tempfile.TemporaryDirectory() as tmp:
        cli_main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs", str(args.epochs),
                  "--trainer.default_root_dir", tmp, "--trainer.enable_progress_bar", "false",
                  "--data.init_args.batch_size", str(args.batch_size), "--trainer.callbacks+=" + __name__ + ".RSS"])
    warm = [s for s in samples if s[0] >= 500]
    print("step  RSS MB")
    for step, mb in samples[:: max(1, len(samples) // 12)]:
        print(f"{step:5d}  {mb:7.1f}")
    if len(warm) >= 2:
        print(f"\n{samples[-1][0]} steps; RSS after warm-up (step {warm[0][0]}): {warm[0][1]:.1f} MB, "
              f"at the end: {warm[-1][1]:.1f} MB, growth {warm[-1][1] - warm[0][1]:+.1f} MB, "
              f"max {max(m for _, m in warm):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
