"""Predict with trained vitmha checkpoints, or a pretrained timm classifier as it is, on image files.

    vitmha predict --checkpoint run/checkpoints/last.ckpt --input photos/ more/*.jpg --output preds/
    vitmha predict --checkpoint a.ckpt b.ckpt c.ckpt --input photos/ --output preds/      # an ensemble
    vitmha predict --backbone vit_tiny_patch16_224.augreg_in21k_ft_in1k --pretrained true \\
        --input data/samples/ --output preds/

Classifiers write ``preds/predictions.csv``: one row per image with its top-k labels and probabilities.
Multi-label classifiers write ``preds/predictions.csv`` with ``path,labels,probs,prob_<class>...``: the labels
above their thresholds joined by ``;`` (most probable first; empty when none), their probabilities in the
same order, then every class's probability.
Segmenters write ``preds/<stem>_mask.png`` (one channel, pixel = class index, at the image's original size)
and ``preds/<stem>_overlay.png`` (class colours over the image). Images are preprocessed as each run's
validation data (resize to the training size, the run's mean/std); a segmentation image larger than the
training size is predicted with sliding windows at its own resolution instead (``--mode``).
Several checkpoints of the same task and classes are an ensemble: their probabilities are averaged (per
pixel for segmenters). The same predictions come from Python: ``vitmha.load(checkpoint).predict(images)``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from vitmha.inference import (ToolError, batched, collect_inputs, load, load_backbone, parse_backbone_kwargs,
                              resolve_device, run_tool)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitmha predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", help="vitmha task checkpoint(s); several = an ensemble")
    src.add_argument("--backbone", help="timm ViT name (with its tag) whose pretrained classifier to run instead")
    p.add_argument("--pretrained", default=None,
                   help="with --backbone: 'true' (timm's pretrained weights, the default) or a weights file")
    p.add_argument("--backbone-kwargs", default=None,
                   help='with --backbone: YAML/JSON overrides of create_backbone, e.g. \'{img_size: 384}\'')
    p.add_argument("--input", required=True, nargs="+", help="image files, folders (searched recursively) or globs")
    p.add_argument("--output", required=True, help="output folder (created)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="fp32 (default); bf16 weights (fast on CPUs with AMX/AVX512-BF16 and on GPUs); int8: "
                        "dynamically quantised linear layers (torchao); see vitmha.precision")
    p.add_argument("--topk", type=int, default=5, help="classes per image in predictions.csv (default 5)")
    p.add_argument("--mode", choices=("auto", "resize", "slide"), default="auto",
                   help="segmentation: 'resize' every image to the training size, 'slide' windows of the training "
                        "size over the full image, 'auto' slides only over images larger than the training size")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the segmentation overlay colours")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    return build_parser().parse_args(None if argv is None else [str(a) for a in argv])


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> str:
    """Run ``vitmha predict``; returns the folder written."""
    args = parse_args(argv)
    if args.topk < 1:
        raise ToolError(f"--topk must be >= 1, got {args.topk}")
    if args.backbone is None and (args.pretrained is not None or args.backbone_kwargs is not None):
        raise ToolError("--pretrained and --backbone-kwargs go with --backbone (a checkpoint holds its own weights)")
    device = resolve_device(args.device)
    if args.backbone:
        predictor = load_backbone(args.backbone, "true" if args.pretrained is None else args.pretrained,
                                  parse_backbone_kwargs(args.backbone_kwargs), device)
    else:
        predictor = load(args.checkpoint, device)
    from vitmha.precision import prepare_inference

    predictor.tasks = [prepare_inference(t, args.precision, device) for t in predictor.tasks]
    files = collect_inputs(args.input)
    batched(files, args.batch_size)  # a bad --batch-size fails before anything is written
    args.output = os.path.normpath(args.output)  # 'preds/' and 'preds' name the same folder in what is printed
    os.makedirs(args.output, exist_ok=True)
    sink = predictor.task.prediction_sink(args.output, predictor.classes, args.topk, alpha=args.alpha)
    from tqdm import tqdm

    options = {"mode": args.mode} if predictor.kind == "segmentation" else {}
    with tqdm(total=len(files), desc="predict", unit="img", disable=args.no_progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for chunk in batched(files, args.batch_size):
            images = [predictor._read(f, predictor.preprocess[0]) for f in chunk]
            probs = predictor.probs(images if len(predictor.tasks) == 1 else chunk, **options)
            sink.write(chunk, [predictor.describe(p) for p in probs], images)
            bar.update(len(chunk))
    out = sink.close()
    what = f"an ensemble of {len(predictor.tasks)}: {', '.join(predictor.sources)}" if len(predictor.tasks) > 1 else ""
    if predictor.kind == "segmentation":
        print(f"wrote {len(files)} masks and overlays to {args.output}" + (f" ({what})" if what else ""))
    else:
        print(f"wrote {out} ({len(files)} images{'; ' + what if what else ''})")
    return args.output
