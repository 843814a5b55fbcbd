"""Draw where a vision transformer looks: per-head attention of one layer and attention rollout.

    vitmha attention --checkpoint last.ckpt --input cat.jpg --output cat_attention.png [--layer -1]
    vitmha attention --backbone vit_small_patch16_224 --pretrained weights.safetensors \\
        --input cat.jpg --output cat_attention.png

Writes one PNG grid: the image as the model saw it | attention rollout over all layers (Abnar & Zuidema,
2020: heads averaged, identity added, rows renormalised, multiplied through the layers) | one panel per
head of ``--layer``, each showing how the query token attends to the patches. The query is the class
token, or ``--patch I J`` (row, column in the patch grid; the default for models without a class token is
the centre patch). The maps come from ``backbone.forward_attention`` on the trained model itself.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence, Tuple


import numpy as np
import torch

from vitmha.inference import (Preprocess, ToolError, backbone_of, display_rgb, eval_transform,
                              load_task, parse_backbone_kwargs, preprocess_config, pretrained_backbone, read_checkpoint,
                              read_image, resolve_device, run_tool, task_kind)
from vitmha.visualize import attention_maps, denormalize, save_attention_figure

DISPLAY_MIN = 224  # small inputs are upscaled for display so the panels stay readable


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    argv = None if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="vitmha attention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint of an ImageClassifier or SemanticSegmenter")
    src.add_argument("--backbone", help="timm ViT arch name, used with --pretrained instead of a checkpoint")
    p.add_argument("--pretrained", default=None,
                   help="with --backbone: a weights file (.safetensors/.pth/.npz), or 'true' for timm's pretrained "
                        "weights (Hugging Face cache)")
    p.add_argument("--backbone-kwargs", default=None,
                   help='with --backbone: YAML/JSON overrides, e.g. \'{img_size: 384}\'')
    p.add_argument("--input", required=True, help="one image file")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--layer", type=int, default=-1, help="block whose heads are drawn (negative counts from the end)")
    p.add_argument("--patch", type=int, nargs=2, metavar=("I", "J"), default=None,
                   help="query patch (row, column) instead of the class token")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p.parse_args(argv)


def _from_backbone(args) -> Tuple[torch.nn.Module, Preprocess]:
    # the pretrained config's mean/std and size; the whole image resized, not centre-cropped, so that every
    # part of it is in the maps
    bb, pre = pretrained_backbone(args.backbone, args.pretrained or False, parse_backbone_kwargs(args.backbone_kwargs))
    pre.crop_pct = None
    return bb, pre


def _shown(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """A normalised (C, H, W) image of any channel count back in [0, 1], as (H, W, 3) uint8 to draw: grey
    replicated, the first three bands of a multi-band image."""
    c = x.shape[0]
    img = x.detach().float().cpu() * torch.tensor(pre.std).view(c, 1, 1) + torch.tensor(pre.mean).view(c, 1, 1)
    return display_rgb(img.clamp(0, 1).permute(1, 2, 0).numpy())


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.pretrained and not args.backbone:
        raise ToolError("--pretrained goes with --backbone (a checkpoint holds its own weights)")
    if not os.path.isfile(args.input):
        raise ToolError(f"{args.input}: no such image file")
    device = resolve_device(args.device)
    if args.checkpoint:
        ckpt = read_checkpoint(args.checkpoint)
        task = load_task(args.checkpoint, ckpt=ckpt)
        pre = preprocess_config(task, ckpt)
        bb = backbone_of(task)
        kind = task_kind(task)
        title = f"{os.path.basename(args.input)} | {task.hparams.backbone}"
    else:
        bb, pre = _from_backbone(args)
        kind = "classification"
        title = f"{os.path.basename(args.input)} | {args.backbone}"
    bb = bb.to(device)
    x = eval_transform(pre, kind)(image=read_image(args.input, pre))["image"][None].to(device)
    try:
        maps = attention_maps(bb, x, layer=args.layer, patch=tuple(args.patch) if args.patch else None)
    except ValueError as e:
        raise ToolError(str(e)) from None
    shown = denormalize(x[0], pre.mean, pre.std) if x.shape[1] == 3 else _shown(x[0], pre)
    if max(shown.shape[:2]) < DISPLAY_MIN:
        from PIL import Image

        scale = DISPLAY_MIN / max(shown.shape[:2])
        h, w = round(shown.shape[0] * scale), round(shown.shape[1] * scale)
        shown = np.asarray(Image.fromarray(shown).resize((w, h), Image.BICUBIC))
    path = save_attention_figure(shown, maps, args.output, title=title)
    print(f"wrote {path}: {maps['query_name']}, layer {maps['layer']} ({maps['heads'].shape[0]} heads), "
          f"rollout over {len(bb.blocks)} layers, {maps['grid'][0]}×{maps['grid'][1]} patches")
    return maps


if __name__ == "__main__":
    main()
