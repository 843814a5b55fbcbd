#!/usr/bin/env python
"""Rare classes: does reweighting the loss or rebalancing the sampler pay? The quickstart digits written as an
ImageFolder, with three classes cut to 5 % of their training images (val and test untouched), trained with
the quickstart recipe three ways (plain, ``class_weights: auto``, ``sampler: balanced``), several seeds; prints
macro F1 on the test split (mean ± sd), the rare classes' F1 and recall, and accuracy.

    python benchmarks/imbalance.py [--rare 3 5 8] [--keep 0.05] [--epochs 35] [--seeds 0 1 2] [--root DIR]

Data: scikit-learn's 1,797 real 8×8 digits, split as DigitsDataModule splits them (stratified 80/20, split
seed 0: 1,437 train, 360 held out), written by ``vitmha.data.export_digits_folder`` as 32-px grey PNGs. Of
each ``--rare`` class ``--keep`` of the training images stay (chosen with a fixed seed, at least one); the
other classes keep all theirs. The held-out 360 are both ``val/`` and ``test/`` (as in the quickstart,
where val doubles as test); nothing is selected on them: the weights scored are those after the last
epoch (the EMA the recipe keeps), and validation is skipped while training.

Recipe: configs/quickstart.yaml's model settings (read, not copied: a 4-block ViT from scratch, AdamW lr 1e-3,
2 warmup epochs then cosine, label smoothing 0.1, drop-path 0.1, EMA 0.998) and its epochs and batch size, on
``vitmha.data.ImageFolderDataModule`` (its default augmentation, 32 px, the backbone's mean/std as the CLI
gives them). Every arm takes the same number of steps: the balanced sampler draws as many images per epoch
as the plain one shuffles.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {"unweighted": {}, "class_weights: auto": {"class_weights": "auto"},
        "sampler: balanced": {"sampler": "balanced"}}


def make_folder(root: Path, rare: List[int], keep: float, seed: int = 0) -> Dict[int, int]:
    """Write the digits folder with ``rare`` classes cut to ``keep`` of their train images; {class: train count}."""
    from vitmha.data import export_digits_folder

    if (root / "test").is_dir():
        shutil.rmtree(root)
    export_digits_folder(str(root))
    rng = np.random.default_rng(seed)
    for c in rare:
        files = sorted((root / "train" / str(c)).glob("*.png"))
        n = max(1, int(round(keep * len(files))))
        for f in [files[i] for i in sorted(rng.permutation(len(files))[n:])]:
            f.unlink()
    shutil.copytree(root / "val", root / "test")
    return {c: len(list((root / "train" / str(c)).glob("*.png"))) for c in range(10)}


def recipe() -> Dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())


def run(root: Path, arm: Dict[str, Any], seed: int, epochs: int) -> Dict[str, Any]:
    import lightning as L

    from vitmha.data import ImageFolderDataModule
    from vitmha.tasks import ImageClassifier

    cfg = recipe()
    model_args = dict(cfg["model"]["init_args"])
    data_args = dict(cfg["data"]["init_args"])
    L.seed_everything(seed, verbose=False)
    data = ImageFolderDataModule(str(root), image_size=data_args["image_size"], batch_size=data_args["batch_size"],
                                 num_workers=0, backbone=model_args["backbone"],
                                 sampler=arm.get("sampler", "random"))
    model = ImageClassifier(num_classes=10, class_weights=arm.get("class_weights"), **model_args)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        precision=cfg["trainer"].get("precision", "32-true"))
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
        logged = trainer.test(model, datamodule=data, verbose=False)[0]
    conf = model.test_confusion.double()
    tp, fp, fn = conf.diag(), conf.sum(0) - conf.diag(), conf.sum(1) - conf.diag()
    f1 = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).numpy()
    recall = (tp / conf.sum(1).clamp_min(1)).numpy()
    if abs(float(f1.mean()) - float(logged["test/f1"])) > 1e-5:  # the logged macro F1, checked by hand
        raise RuntimeError(f"logged test/f1 {logged['test/f1']:.6f} != {f1.mean():.6f} from the confusion matrix")
    return {"f1": float(logged["test/f1"]), "acc": float(logged["test/acc"]), "per_class_f1": f1,
            "per_class_recall": recall, "seconds": time.time() - t0}


def _ms(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rare", type=int, nargs="+", default=[3, 5, 8], help="classes cut down")
    ap.add_argument("--keep", type=float, default=0.05, help="share of a rare class's train images kept")
    ap.add_argument("--epochs", type=int, default=None, help="default: the quickstart's (35)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--root", default=None, help="folder to write the data to (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    epochs = args.epochs or int(recipe()["trainer"]["max_epochs"])
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="vitmha_imbalance_"))
    counts = make_folder(root / "digits_imbalanced", args.rare, args.keep)
    print(f"train images per class: {counts} (rare: {args.rare}); val = test: 360 digits, 36 per class", flush=True)

    results: Dict[str, List[Dict[str, Any]]] = {a: [] for a in args.arms}
    t0 = time.time()
    for seed in args.seeds:
        for name in args.arms:
            r = run(root / "digits_imbalanced", ARMS[name], seed, epochs)
            results[name].append(r)
            rare_f1 = float(np.mean(r["per_class_f1"][args.rare]))
            print(f"seed {seed} {name:22s} test macro F1 {r['f1']:.4f}  rare-class F1 {rare_f1:.4f}  "
                  f"acc {r['acc']:.4f}  ({r['seconds']:.0f} s; {time.time() - t0:.0f} s in all)", flush=True)

    print(f"\nDigits folder, classes {args.rare} at {args.keep:.0%} of their train images, quickstart recipe, "
          f"{epochs} epochs, seeds {args.seeds}, {time.time() - t0:.0f} s in all")
    print("| arm | test macro F1 | rare classes' F1 | rare classes' recall | other classes' F1 | test acc | s / run |")
    print("|---|---|---|---|---|---|---|")
    others = [c for c in range(10) if c not in args.rare]
    for name in args.arms:
        rs = results[name]
        print(f"| {name} | {_ms([r['f1'] for r in rs])} "
              f"| {_ms([float(np.mean(r['per_class_f1'][args.rare])) for r in rs])} "
              f"| {_ms([float(np.mean(r['per_class_recall'][args.rare])) for r in rs])} "
              f"| {_ms([float(np.mean(r['per_class_f1'][others])) for r in rs])} "
              f"| {_ms([r['acc'] for r in rs])} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    base = [r["f1"] for r in results.get("unweighted", [])]
    for name in args.arms:
        if name == "unweighted" or not base:
            continue
        diffs = [r["f1"] - b for r, b in zip(results[name], base)]
        t = "" if len(diffs) < 2 else \
            f" (paired t = {statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)) + 1e-12):.1f})"
        print(f"{name} - unweighted, paired by seed: {_ms(diffs)} macro F1{t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
