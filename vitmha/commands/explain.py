"""Explain a vision transformer's decision: relevance maps of several methods side by side over the image.

    vitmha explain --checkpoint last.ckpt --input shirt.png --output shirt_explain.png [--class Shirt]
    vitmha explain --backbone vit_tiny_patch16_224.augreg_in21k_ft_in1k --pretrained weights.safetensors \\
        --input cat.jpg --output cat_explain.png --method chefer,gradcam --class "tabby cat"
    vitmha explain --checkpoint seg.ckpt --input scene.png --output scene_explain.png --class circle \\
        [--box X0 Y0 X1 Y1]

Methods (--method, comma-separated, or all): attention (the last block's attention from the class token,
heads averaged), rollout (attention rollout over all blocks), chefer (gradient-weighted attention, Chefer et
al.'s generic rule R += mean_h((∇A ⊙ A)⁺) R), gradcam (Grad-CAM on the last block's patch tokens), read from
the model's blocks through forward hooks; and through Captum: ig (integrated gradients from the image's mean
colour, summed per patch), occlusion (the drop in the class probability when a patch shows the mean colour),
lime (LIME with one feature per patch, hidden patches showing the mean colour, ridge surrogate) and
kernelshap (KernelSHAP, the same features: Shapley values that add up to the probability's change). lime and
kernelshap run the model on --samples perturbed images each (default 500, about 2.5 per patch of a 14 × 14
grid; more for finer grids or steadier maps), drawn with --seed (default 0), so a map is reproducible.

A classifier (multi-label too) is explained for --class (an index or a class name; default its top class;
a multi-label class's probability is its sigmoid). A segmenter is
explained for --class over a region: the class's summed logits over the pixels it is predicted at, or over
--box (pixels of the input image); the default class is the one predicted over the most pixels, background
(class 0) only when nothing else is predicted. --metrics adds each map's deletion and insertion AUC (the
class probability as the most relevant patches are filled with the mean colour / put back into a blurred
image; lower / higher is better) under its panel.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple


import numpy as np
import torch

from vitmha.explain import (DEFAULT_SAMPLES, METHODS, Target, auc, deletion_curve, explain, insertion_curve,
                            save_explanation_figure)
from vitmha.inference import (Preprocess, ToolError, backbone_of, display_rgb, eval_transform,
                              load_task, parse_backbone_kwargs, preprocess_config, pretrained_backbone,
                              read_checkpoint, read_image, resolve_device, run_tool, task_kind)

DISPLAY_MIN = 224  # small inputs are upscaled for display so the panels stay readable


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    argv = None if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="vitmha explain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint of an ImageClassifier or SemanticSegmenter")
    src.add_argument("--backbone", help="timm ViT arch name, used with --pretrained instead of a checkpoint")
    p.add_argument("--pretrained", default=None,
                   help="with --backbone: a weights file (.safetensors/.pth/.npz), or 'true' for timm's pretrained "
                        "weights (Hugging Face cache); default true")
    p.add_argument("--backbone-kwargs", default=None,
                   help='with --backbone: YAML/JSON overrides, e.g. \'{img_size: 384}\'')
    p.add_argument("--input", required=True, help="one image file")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--method", default="all", help=f"comma-separated, from {', '.join(METHODS)}; or all (default)")
    p.add_argument("--class", dest="cls", default=None, help="class index or name (default: the top class)")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="segmentation: explain the class over this box (input image pixels) instead of its mask")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"lime and kernelshap: perturbed images per map, one forward each (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="lime and kernelshap: seed of their samples (default 0)")
    p.add_argument("--metrics", action="store_true", help="deletion / insertion AUC of each map in the figure")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p.parse_args(argv)


def parse_methods(text: str) -> List[str]:
    """``--method`` as a list of method names; ToolError naming an unknown one."""
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise ToolError("--method: empty; expected a comma-separated list or all")
    if "all" in names:
        return list(METHODS)
    for m in names:
        if m not in METHODS:
            raise ToolError(f"--method {m}: unknown method; expected {', '.join(METHODS)} or all")
    return list(dict.fromkeys(names))


def resolve_class(value: str, classes: Optional[Sequence[str]], k: int) -> int:
    """``--class`` as an index in [0, k): an integer, or a class name (case-insensitive; for ImageNet's
    "tabby, tabby cat" style names any of the comma-separated names)."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        c = int(text)
        if not 0 <= c < k:
            raise ToolError(f"--class {c}: out of range; the model has {k} classes (0-{k - 1})")
        return c
    if not classes:
        raise ToolError(f"--class {text}: the model has no class names; give an index 0-{k - 1}")
    want = text.lower()
    for i, name in enumerate(classes):
        if want == name.lower() or want in (n.strip().lower() for n in name.split(",")):
            return i
    shown = ", ".join(list(classes)[:10]) + (", ..." if len(classes) > 10 else "")
    raise ToolError(f"--class {text}: no such class name; the classes are {shown}")


def _box_region(box: Sequence[float], image_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> torch.Tensor:
    """(H, W) 0/1 mask of ``box`` (x0, y0, x1, y1 in the input image's pixels) at the model input's size."""
    (ih, iw), (h, w) = image_hw, out_hw
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= iw and 0 <= y0 < y1 <= ih):
        raise ToolError(f"--box {x0:g} {y0:g} {x1:g} {y1:g}: expected 0 <= X0 < X1 <= {iw} and 0 <= Y0 < Y1 <= {ih} "
                        f"(the image is {iw}×{ih})")
    ys = (torch.arange(h) + 0.5) * ih / h
    xs = (torch.arange(w) + 0.5) * iw / w
    region = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not region.any():
        raise ToolError(f"--box {x0:g} {y0:g} {x1:g} {y1:g}: covers no pixel at the model's {w}×{h} input")
    return region.float()


def segmentation_target(logits: torch.Tensor, cls: Optional[str], classes, box, image_hw) -> Target:
    """The class (given or the most predicted) over its predicted pixels or ``box``."""
    k = logits.shape[1]
    pred = logits[0].argmax(0)
    if cls is None:
        counts = torch.bincount(pred.flatten(), minlength=k)
        c = int(counts[1:].argmax()) + 1 if counts[1:].sum() > 0 else 0
    else:
        c = resolve_class(cls, classes, k)
    if box is not None:
        return Target(c, _box_region(box, image_hw, tuple(pred.shape)))
    region = (pred == c).float()
    if region.sum() == 0:
        name = classes[c] if classes else str(c)
        raise ToolError(f"--class {cls}: {name} is predicted nowhere in the image; give a --box to explain it over")
    return Target(c, region)


def shown_image(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """The normalised (C, H, W) model input back as (H, W, 3) uint8 to draw on (grey replicated, the first
    three bands of a multi-band image), upscaled when small so that the panels stay readable."""
    c = x.shape[0]
    img = x.detach().float().cpu() * torch.tensor(pre.std).view(c, 1, 1) + torch.tensor(pre.mean).view(c, 1, 1)
    shown = display_rgb(img.clamp(0, 1).permute(1, 2, 0).numpy())
    if max(shown.shape[:2]) < DISPLAY_MIN:
        from PIL import Image

        scale = DISPLAY_MIN / max(shown.shape[:2])
        h, w = round(shown.shape[0] * scale), round(shown.shape[1] * scale)
        shown = np.asarray(Image.fromarray(shown).resize((w, h), Image.BICUBIC))
    return shown


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    methods = parse_methods(args.method)
    if args.samples < 1:
        raise ToolError(f"--samples {args.samples}: expected a positive number of samples")
    if args.pretrained and not args.backbone:
        raise ToolError("--pretrained goes with --backbone (a checkpoint holds its own weights)")
    if not os.path.isfile(args.input):
        raise ToolError(f"{args.input}: no such image file")
    if not args.output.lower().endswith(".png"):
        raise ToolError(f"{args.output}: the output is a PNG; give a path ending in .png")
    device = resolve_device(args.device)
    if args.checkpoint:
        ckpt = read_checkpoint(args.checkpoint)
        task = load_task(args.checkpoint, ckpt=ckpt)
        pre, bb, kind, model = preprocess_config(task, ckpt), backbone_of(task), task_kind(task), task
        name = task.hparams.backbone
    else:
        bb, pre = pretrained_backbone(args.backbone, "true" if args.pretrained is None else args.pretrained,
                                      parse_backbone_kwargs(args.backbone_kwargs))
        if not getattr(bb, "num_classes", 0):
            raise ToolError(f"{args.backbone}: this backbone has no classifier head (num_classes=0) to explain")
        pre.crop_pct = None  # the whole image resized, so that every part of it is in the maps
        kind, model, name = "classification", bb, args.backbone
    if args.box is not None and kind != "segmentation":
        raise ToolError("--box goes with a segmentation checkpoint (a classifier is explained over the whole image)")
    model = model.to(device).eval()
    image = read_image(args.input, pre)
    x = eval_transform(pre, kind)(image=image)["image"][None].to(device)
    with torch.no_grad():
        out = model(x).float()
    if kind == "segmentation":
        target = segmentation_target(out, args.cls, pre.classes, args.box, image.shape[:2])
        prob = float(target.prob(out))
        what = "box" if args.box is not None else "predicted mask"
    else:
        c = int(out[0].argmax()) if args.cls is None else resolve_class(args.cls, pre.classes, out.shape[1])
        target, what = Target(c, multilabel=kind == "multilabel"), None
        prob = float(target.prob(out))
    cname = pre.classes[target.class_index] if pre.classes else str(target.class_index)
    try:
        maps = explain(model, bb, x, target, methods, samples=args.samples, seed=args.seed)
    except ValueError as e:
        raise ToolError(str(e)) from None
    notes = {}
    if args.metrics:
        patch = tuple(bb.patch_embed.patch_size)
        for m, r in maps.items():
            d = auc(*deletion_curve(model, x, target, r, patch, steps=20))
            i = auc(*insertion_curve(model, x, target, r, patch, steps=20))
            notes[m] = f"del {d:.2f} / ins {i:.2f}"
    shown = shown_image(x[0], pre)
    region = f" over its {what}" if what else ""
    title = f"{os.path.basename(args.input)} | {name} | class {target.class_index} ({cname}){region}, p = {prob:.2f}"
    path = save_explanation_figure(shown, maps, args.output, title=title, notes=notes)
    grid = next(iter(maps.values())).shape
    print(f"wrote {path}: {', '.join(maps)} for class {target.class_index} ({cname}){region}, p = {prob:.2f}, "
          f"{grid[0]}×{grid[1]} patches" + ("".join(f"; {m} {n}" for m, n in notes.items())))
    return {"maps": maps, "target": target, "prob": prob, "class_name": cname, "notes": notes}


if __name__ == "__main__":
    main()
