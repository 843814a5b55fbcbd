"""Put a weights file you already have where timm's `pretrained=True` looks for it, so that the online code
path (timm's pretrained config -> Hugging Face hub cache) runs offline.

With internet, `create_backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True)` downloads
`model.safetensors` from the hub repo named in timm's pretrained config into the Hugging Face cache. Without
it, `seed_hf_cache` lays the same file out in that cache (`models--<org>--<repo>/refs/main` and
`snapshots/<revision>/model.safetensors`), and `pretrained=True` with `HF_HUB_OFFLINE=1` reads it from there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from vitmha.models.config import pretrained_cfg
from vitmha.models.weights import WeightsError, read_weights

PathLike = Union[str, os.PathLike]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache in force (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/...)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def seed_hf_cache(name: str, weights: PathLike, cache_dir: Optional[PathLike] = None, link: bool = True) -> Path:
    """Place ``weights`` in the hub cache as timm's pretrained weights for ``name`` ('arch.tag'); returns the
    cached file's path.

    The file is checked to be readable weights first; ``link`` makes a symlink instead of a copy (the
    source must then stay where it is). Raises WeightsError when timm has no hub weights for ``name`` or the
    file cannot be read.
    """
    weights = Path(weights).expanduser().resolve()
    read_weights(weights)  # a clear error now rather than a confusing one at load time
    cfg = pretrained_cfg(name)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise WeightsError(f"{name}: timm's pretrained config names no Hugging Face hub repo for it")
    repo, _, revision = hub_id.partition("@")
    filename = cfg.get("hf_hub_filename") or "model.safetensors"
    if weights.suffix != Path(filename).suffix:
        raise WeightsError(f"{weights}: timm loads {filename} for {name}; give a {Path(filename).suffix} file")
    root = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    # any 40-hex name works as the snapshot; derive it from the file so re-seeding is idempotent
    commit = hashlib.sha1(f"{weights}:{weights.stat().st_size}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    target = snapshot / filename
    if target.is_symlink() or target.exists():
        target.unlink()
    if link:
        target.symlink_to(weights)
    else:
        shutil.copyfile(weights, target)
    refs = repo_dir / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / (revision or "main")).write_text(commit)
    return target
