#!/usr/bin/env python
"""Where does the real ImageNet ViT-Ti look? Share of its class-token attention (per layer, mean over heads)
and of the attention rollout that falls on the cat of data/samples/chelsea.jpg, against the cat's share of
the image (chance).

    python benchmarks/attention_share.py [--weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors]

Two inputs: the photo itself (resized whole to 224 px, as tools/attention.py shows it), where the cat covers
most of the image, and the same cat pasted at half size onto a plain grey canvas, where it covers ~14 %.
The cat's outline is drawn by hand in data/samples/chelsea_cat_outline.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

SAMPLES = ROOT / "data" / "samples"
NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def cat_scenes(canvas: int = 224):
    """[(title, RGB uint8 image, cat mask as float in [0, 1] at the image's size)] for the photo and the
    cat on grey."""
    outline = json.loads((SAMPLES / "chelsea_cat_outline.json").read_text())
    photo = Image.open(SAMPLES / outline["image"]).convert("RGB")
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in outline["polygon"]], fill=255)
    w, h = canvas // 2, round(canvas / 2 * photo.size[1] / photo.size[0])
    grey = Image.new("RGB", (canvas, canvas), (128, 128, 128))
    grey_mask = Image.new("L", (canvas, canvas), 0)
    at = ((canvas - w) // 2, (canvas - h) // 2)
    grey.paste(photo.resize((w, h), Image.BICUBIC), at, mask.resize((w, h)))
    grey_mask.paste(mask.resize((w, h)), at)
    return [("chelsea.jpg", np.asarray(photo), np.asarray(mask) / 255.0),
            ("cat on grey", np.asarray(grey), np.asarray(grey_mask) / 255.0)]


def attention_shares(backbone, pre, image: np.ndarray, mask: np.ndarray):
    """(area share, [CLS-attention share per layer], [rollout share per layer], the last layer's CLS-attention
    share on the four corner patches) of ``mask`` for ``image``."""
    from vitmha.inference import eval_transform
    from vitmha.visualize import attention_rollout

    x = eval_transform(pre, "classification")(image=image)["image"][None]
    gh, gw = backbone.patch_embed.grid_size
    cells = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((gw, gh), Image.BOX)) / 255.0
    p = backbone.num_prefix_tokens
    with torch.no_grad():
        attns = backbone.forward_attention(x, indices=list(range(len(backbone.blocks))))

    def share(weights: torch.Tensor) -> float:
        w = weights.double().reshape(gh, gw).numpy()
        return float((w * cells).sum() / w.sum())

    cls = [share(a[0, :, 0, p:].mean(0)) for a in attns]
    roll = [share(attention_rollout(attns[:i + 1])[0, 0, p:]) for i in range(len(attns))]
    last = attns[-1][0, :, 0, p:].mean(0).reshape(gh, gw).double()
    corners = float((last[0, 0] + last[0, -1] + last[-1, 0] + last[-1, -1]) / last.sum())
    return float(cells.mean()), cls, roll, corners


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / f"{NAME}.safetensors"))
    args = ap.parse_args(argv)
    from vitmha.inference import pretrained_backbone

    bb, pre = pretrained_backbone(NAME, args.weights)
    pre.crop_pct = None  # the whole image, as tools/attention.py shows it
    for title, image, mask in cat_scenes():
        area, cls, roll, corners = attention_shares(bb, pre, image, mask)
        print(f"\n{title}: the cat covers {area:.2f} of the image (chance); the last layer's CLS attention "
              f"puts {corners:.2f} on the four corner patches")
        print("| layer | CLS attention on the cat | rollout on the cat |")
        print("|---|---|---|")
        for i, (c, r) in enumerate(zip(cls, roll)):
            print(f"| {i} | {c:.2f} ({c / area:.1f}×) | {r:.2f} ({r / area:.1f}×) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
