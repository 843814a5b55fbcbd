"""Run a trained vitmha checkpoint, or a pretrained timm classifier as it is, on image files.

    vitmha predict --checkpoint run/checkpoints/last.ckpt --input photos/ more/*.jpg --output preds/
    vitmha predict --backbone vit_tiny_patch16_224.augreg_in21k_ft_in1k --pretrained true \\
        --input data/samples/ --output preds/

Classifiers write ``preds/predictions.csv``: one row per image with its top-k labels and probabilities.
Multi-label classifiers write ``preds/predictions.csv`` with ``path,labels,probs,prob_<class>...``: the labels
above their thresholds joined by ``;`` (most probable first; empty when none), their probabilities in the
same order, then every class's probability.
Segmenters write ``preds/<stem>_mask.png`` (one channel, pixel = class index, at the image's original size)
and ``preds/<stem>_overlay.png`` (class colours over the image). Images are preprocessed as the run's
validation data (resize to the training size, the run's mean/std); a segmentation image larger than the
training size is predicted with sliding windows at its own resolution instead (``--mode``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence


import numpy as np
import torch
import torch.nn.functional as F

from vitmha.inference import (Preprocess, ToolError, batched, collect_inputs, display_rgb,
                              eval_transform, load_task, normalize_only, parse_backbone_kwargs, preprocess_config,
                              pretrained_backbone, read_checkpoint, read_image, resolve_device, run_tool, task_kind)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    argv = None if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="vitmha predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint of an ImageClassifier or SemanticSegmenter")
    src.add_argument("--backbone", help="timm ViT name (with its tag) whose pretrained classifier to run instead")
    p.add_argument("--pretrained", default=None,
                   help="with --backbone: 'true' (timm's pretrained weights, the default) or a weights file")
    p.add_argument("--backbone-kwargs", default=None,
                   help='with --backbone: YAML/JSON overrides of create_backbone, e.g. \'{img_size: 384}\'')
    p.add_argument("--input", required=True, nargs="+", help="image files, folders (searched recursively) or globs")
    p.add_argument("--output", required=True, help="output folder (created)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--topk", type=int, default=5, help="classes per image in predictions.csv (default 5)")
    p.add_argument("--mode", choices=("auto", "resize", "slide"), default="auto",
                   help="segmentation: 'resize' every image to the training size, 'slide' windows of the training "
                        "size over the full image, 'auto' slides only over images larger than the training size")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the segmentation overlay colours")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _progress(total: int, disable: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=disable, file=sys.stderr, dynamic_ncols=True)


def predict_classification(probs_fn, num_classes: int, pre: Preprocess, files: List[str], args,
                           device: torch.device) -> Path:
    """Write ``predictions.csv`` (path, label1, prob1, ..., labelK, probK) from ``probs_fn(x)`` (B, C)
    probabilities, with the CLI's writer; returns its path."""
    from vitmha.callbacks import PredictionsCsv

    transform = eval_transform(pre, "classification")
    out = PredictionsCsv(str(Path(args.output) / "predictions.csv"), args.topk, pre.classes)
    with _progress(len(files), args.no_progress, "predict") as bar:
        for chunk in batched(files, args.batch_size):
            x = torch.stack([transform(image=read_image(p, pre))["image"] for p in chunk]).to(device)
            with torch.no_grad():
                out.write(chunk, probs_fn(x))
            bar.update(len(chunk))
    return Path(out.close())


def predict_multilabel(task, pre: Preprocess, files: List[str], args, device: torch.device) -> Path:
    """Write ``predictions.csv`` (path, labels, probs, prob_<class>...) of a MultiLabelClassifier with the CLI's
    writer: every label above the checkpoint's threshold for it; returns its path."""
    from vitmha.tasks.multilabel import MultiLabelPredictionsCsv

    transform = eval_transform(pre, "classification")
    out = MultiLabelPredictionsCsv(str(Path(args.output) / "predictions.csv"), pre.classes or task.class_names,
                                   task.thresholds)
    with _progress(len(files), args.no_progress, "predict") as bar:
        for chunk in batched(files, args.batch_size):
            x = torch.stack([transform(image=read_image(p, pre))["image"] for p in chunk]).to(device)
            with torch.no_grad():
                out.write(chunk, task.eval_probs(x))
            bar.update(len(chunk))
    return Path(out.close())


def segment_logits(task, pre: Preprocess, images: List[np.ndarray], mode: str, device: torch.device,
                   transform=None) -> List[torch.Tensor]:
    """Per image, logits (K, H, W) at the image's own size: resized to the training size and back, or slid."""
    size = pre.image_size
    window = int(task.hparams.get("slide_window") or size)
    out: List[Optional[torch.Tensor]] = [None] * len(images)
    resize_idx = []
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if mode == "slide" or (mode == "auto" and (h > window or w > window)):
            x = normalize_only(img, pre)[None].to(device)
            with torch.no_grad():
                out[i] = task.sliding_window_inference(x, window=window)[0].float().cpu()
        else:
            resize_idx.append(i)
    if resize_idx:
        transform = transform or eval_transform(pre, "segmentation")
        x = torch.stack([transform(image=images[i])["image"] for i in resize_idx]).to(device)
        with torch.no_grad():
            logits = task(x).float()
        for j, i in enumerate(resize_idx):
            h, w = images[i].shape[:2]
            out[i] = F.interpolate(logits[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)[0].cpu()
    return out  # type: ignore[return-value]


def predict_segmentation(task, pre: Preprocess, files: List[str], args, device: torch.device) -> List[Path]:
    """Write ``<stem>_mask.png`` and ``<stem>_overlay.png`` per image with the CLI's writer (a stem two
    inputs share gets the parent folder's name); returns the mask paths."""
    from vitmha.callbacks import StemNamer, save_mask_and_overlay

    transform = eval_transform(pre, "segmentation")
    names = StemNamer()
    written = []
    with _progress(len(files), args.no_progress, "segment") as bar:
        for chunk in batched(files, args.batch_size):
            images = [read_image(f, pre) for f in chunk]  # the model's channels: RGB, grey or bands
            for f, img, logits in zip(chunk, images, segment_logits(task, pre, images, args.mode, device, transform)):
                written.append(save_mask_and_overlay(args.output, names(f), logits.argmax(0).numpy(), display_rgb(img),
                                                     args.alpha))
            bar.update(len(chunk))
    return written


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.topk < 1:
        raise ToolError(f"--topk must be >= 1, got {args.topk}")
    if args.backbone is None and (args.pretrained is not None or args.backbone_kwargs is not None):
        raise ToolError("--pretrained and --backbone-kwargs go with --backbone (a checkpoint holds its own weights)")
    ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else None
    files = collect_inputs(args.input)
    device = resolve_device(args.device)
    if args.backbone:
        kwargs = parse_backbone_kwargs(args.backbone_kwargs)
        bb, pre = pretrained_backbone(args.backbone, "true" if args.pretrained is None else args.pretrained, kwargs)
        if not getattr(bb, "num_classes", 0):
            raise ToolError(f"{args.backbone}: this backbone has no classifier head (num_classes=0) to predict with")
        os.makedirs(args.output, exist_ok=True)
        bb = bb.to(device)
        out = predict_classification(lambda x: bb(x).softmax(-1), bb.num_classes, pre, files, args, device)
        print(f"wrote {out} ({len(files)} images)")
        return
    task = load_task(args.checkpoint, ckpt=ckpt).to(device)
    pre = preprocess_config(task, ckpt)
    os.makedirs(args.output, exist_ok=True)
    if task_kind(task) == "segmentation":
        masks = predict_segmentation(task, pre, files, args, device)
        print(f"wrote {len(masks)} masks and overlays to {args.output}")
    elif task_kind(task) == "multilabel":
        out = predict_multilabel(task, pre, files, args, device)
        print(f"wrote {out} ({len(files)} images)")
    else:
        # the task's own evaluation (EMA weights, mirror-image TTA): the probabilities `vitmha predict` writes
        out = predict_classification(lambda x: task.eval_log_probs(x).exp(), int(task.hparams.num_classes), pre,
                                     files, args, device)
        print(f"wrote {out} ({len(files)} images)")


if __name__ == "__main__":
    main()
