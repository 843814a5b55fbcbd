"""Draw what a masked autoencoder makes of an image: original | masked | reconstruction.

    vitmha reconstruct --checkpoint last.ckpt --image shirt.png [--output shirt_reconstruction.png]
    vitmha reconstruct --checkpoint last.ckpt --image a.png b.png --mask-ratio 0.5 --seed 3 --output ab.png

Works for any ``MaskedAutoencoder`` checkpoint, at any point of pre-training. Each image is read and resized
as the run's validation images were (its mean/std, channels and size), masked at random (``--mask-ratio``,
default the run's; ``--seed`` picks the mask, the same seed the same mask), and drawn in one row: the image,
the image with its masked patches blanked (grey), and the decoder's prediction in the masked places with the
visible patches as they are, with the loss on the masked patches. Grey images are shown grey, images of
more than three bands by their first three.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from vitmha.inference import (ToolError, eval_transform, load_task, preprocess_config, read_checkpoint, read_image,
                              resolve_device, run_tool)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    argv = None if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="vitmha reconstruct", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="Lightning checkpoint of a MaskedAutoencoder")
    p.add_argument("--image", required=True, nargs="+", help="image file(s), one row each")
    p.add_argument("--output", default=None,
                   help="PNG to write (default: <first image's stem>_reconstruction.png beside it)")
    p.add_argument("--mask-ratio", type=float, default=None, help="share of patches masked (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p.parse_args(argv)


def default_output(image: str) -> Path:
    path = Path(image)
    return path.with_name(f"{path.stem}_reconstruction.png")


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from vitmha.heads.mae import mask_noise, num_visible, token_grid
    from vitmha.tasks.mae import MaskedAutoencoder, save_reconstructions

    args = parse_args(argv)
    for image in args.image:
        if not os.path.isfile(image):
            raise ToolError(f"{image}: no such image file")
    ckpt = read_checkpoint(args.checkpoint)
    task = load_task(args.checkpoint, ckpt=ckpt)
    if not isinstance(task, MaskedAutoencoder):
        raise ToolError(f"{args.checkpoint}: a {type(task).__name__} checkpoint; reconstructions need a "
                        "MaskedAutoencoder's (its decoder)")
    device = resolve_device(args.device)
    task = task.to(device)
    pre = preprocess_config(task, ckpt)
    transform = eval_transform(pre, "classification")
    x = torch.stack([transform(image=read_image(p, pre))["image"] for p in args.image]).to(device)  # (B, C, S, S)
    h, w = token_grid(task.inference_model, x)
    ratio = float(task.hparams.mask_ratio if args.mask_ratio is None else args.mask_ratio)
    if not 0.0 <= ratio < 1.0 or num_visible(h * w, ratio) < 1:
        raise ToolError(f"--mask-ratio: expected a share in [0, 1) that leaves a patch of {h * w} visible, got {ratio}")
    task.hparams.mask_ratio = ratio
    noise = mask_noise(args.seed, "figure", 0, 0, x.shape[0], h * w).to(device)
    with torch.no_grad():
        panels = task.reconstruction_panels(x, noise)
    out = Path(args.output) if args.output else default_output(args.image[0])
    save_reconstructions(panels, pre.mean, pre.std, out, title=f"{Path(args.checkpoint).name} | mask {ratio:.0%}")
    losses = [float(v) for v in panels[3]]
    print(f"wrote {out}: {len(args.image)} image(s) at {x.shape[-1]} px, {h}x{w} patches, {ratio:.0%} masked "
          f"(seed {args.seed}); loss on the masked patches: {', '.join(f'{v:.4f}' for v in losses)}")
    return {"output": str(out), "loss": losses}


if __name__ == "__main__":
    main()
