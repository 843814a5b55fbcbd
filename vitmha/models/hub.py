"""Where `pretrained=True` finds timm's weights (the Hugging Face hub cache), and putting a weights file you
already have there, so that the online code path (timm's pretrained config -> hub cache) runs offline.

With internet, `create_backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True)` downloads
`model.safetensors` from the hub repo named in timm's pretrained config into the Hugging Face cache
(:func:`resolve_pretrained_file`). Without it, `seed_hf_cache` lays the same file out in that cache
(`models--<org>--<repo>/refs/main` and `snapshots/<revision>/model.safetensors`), and `pretrained=True` with
`HF_HUB_OFFLINE=1` reads it from there. A file that is neither cached nor reachable fails at once, saying so.
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


#: seconds to wait for the hub to answer the one request that tells whether it can be reached
PROBE_TIMEOUT = 5.0


def resolve_pretrained_file(name: str) -> str:
    """Local path of timm's pretrained weights for 'arch[.tag]', from the Hugging Face (or torch) hub cache,
    downloading them when they are not cached and the hub answers.

    The cache is read first without any network access. When the file is not cached and ``HF_HUB_OFFLINE``
    is set, or one request (no retries, ``PROBE_TIMEOUT`` seconds) finds the hub unreachable, this fails at
    once with one WeightsError line naming the weights and the offline recipe.
    """
    cfg = pretrained_cfg(name)
    if not cfg:
        raise WeightsError(f"{name}: timm has no pretrained weights for this name")
    full = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("architecture") and cfg.get("tag") else name
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        return _from_hf_hub(full, hub_id, cfg.get("hf_hub_filename"))
    for key in ("file", "url"):
        loc = cfg.get(key)
        if loc:
            import torch

            cached = Path(loc) if key == "file" else Path(torch.hub.get_dir()) / "checkpoints" / Path(loc).name
            if cached.is_file():
                return str(cached)
    raise WeightsError(f"{full}: pretrained weights are not cached locally and vitmha does not download them "
                       "from outside the Hugging Face hub; pass pretrained='path/to/weights'")


def _from_hf_hub(full: str, hub_id: str, filename: Optional[str]) -> str:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, rev = hub_id.partition("@")
    filenames = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for fn in filenames:                     # the cache first: no network, no retries
        try:
            return hf_hub_download(repo, fn, revision=rev or None, local_files_only=True)
        except LocalEntryNotFoundError:
            pass
    recipe = (f"offline: `vitmha seed-cache --name {full} --weights FILE` and then HF_HUB_OFFLINE=1, or give "
              "the file itself: pretrained: path/to/weights.safetensors")
    where = f"not in the local Hugging Face cache ({hf_cache_dir()})"
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(f"{full}: timm's pretrained weights (hub repo {repo}) are not available here: {where} "
                           f"and HF_HUB_OFFLINE is set; {recipe}")
    for fn in filenames:
        try:                                 # one request, no retries: is the hub there, and has it the file?
            get_hf_file_metadata(hf_hub_url(repo, fn, revision=rev or None), timeout=PROBE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - refused, DNS, timeout, proxy, HTTP error: all mean "not reachable"
            if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
                continue                     # the hub answered: no such file in the repo
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise WeightsError(f"{full}: timm's pretrained weights (hub repo {repo}) are not available here: "
                               f"{where} and the hub ({constants.ENDPOINT}) cannot be reached ({reason}); "
                               f"{recipe}") from None
        return hf_hub_download(repo, fn, revision=rev or None)
    raise WeightsError(f"{full}: hub repo {repo} has none of {', '.join(filenames)}; pass "
                       "pretrained='path/to/weights'")
