"""Make `pretrained: true` work offline with a weights file you already have.

    vitmha seed-cache --name vit_tiny_patch16_224.augreg_in21k_ft_in1k \
        --weights /path/to/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors [--cache-dir D] [--copy]

Lays the file out in the Hugging Face hub cache exactly where timm's pretrained config makes
`pretrained=True` look (``models--timm--<name>/snapshots/<rev>/model.safetensors``). Then run with
``HF_HUB_OFFLINE=1`` (and ``HF_HUB_CACHE=D`` if you gave ``--cache-dir``): nothing is downloaded and the
weights load through the same code a user with internet runs. With internet you do not need this tool.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


from vitmha.errors import exit_on_user_error as run_tool


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="vitmha seed-cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--name", required=True, help="timm name with its tag, e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    p.add_argument("--weights", required=True, help="the weights file (.safetensors, timm's key layout)")
    p.add_argument("--cache-dir", default=None, help="hub cache folder (default: the one in force, HF_HUB_CACHE)")
    p.add_argument("--copy", action="store_true", help="copy the file instead of linking to it")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])

    from vitmha.models.hub import seed_hf_cache

    path = seed_hf_cache(args.name, args.weights, cache_dir=args.cache_dir, link=not args.copy)
    print(f"cached {args.weights} as {path}")
    env = "HF_HUB_OFFLINE=1" + (f" HF_HUB_CACHE={os.path.abspath(args.cache_dir)}" if args.cache_dir else "")
    print(f"now: {env} vitmha fit ... --model.init_args.backbone {args.name} "
          "--model.init_args.pretrained true")


if __name__ == "__main__":
    main()
