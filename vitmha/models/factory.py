"""`create_backbone`: a timm ViT arch name in, a vitmha encoder (optionally with weights) out."""
from __future__ import annotations

import os
from typing import Any, Mapping, Union

from vitmha.models.config import arch_config, pretrained_cfg, split_name
from vitmha.models.features import FEATURE_KWARGS, FeatureBackbone
from vitmha.models.tome import apply_tome
from vitmha.models.vit import VisionTransformer
from vitmha.models.hub import resolve_pretrained_file
from vitmha.models.weights import load_into

Pretrained = Union[bool, str, os.PathLike, Mapping]


def create_backbone(name: str, pretrained: Pretrained = False,
                    **overrides: Any) -> Union[VisionTransformer, FeatureBackbone]:
    """Build timm arch `name` ('arch' or 'arch.tag') as a vitmha VisionTransformer.

    `overrides` are timm.create_model's (img_size, num_classes, global_pool, depth, drop_path_rate,
    dynamic_img_size, ...). `pretrained`: False (random init), True (timm's pretrained weights from the local
    hub cache), a path (.safetensors, .pth/.pt/.bin, .npz) or a state dict. Raises WeightsError when weights
    cannot be read or do not fit, UnsupportedArchError for timm archs vitmha does not reproduce.
    `keep_blocks=N` builds the arch with only its first N blocks and loads the pretrained weights' first N
    (the deeper ones dropped with a warning): a cheaper model that keeps the lower layers' features; a plain
    `depth` below the checkpoint's stays an error. `features_only=True` (with `out_indices`, `pyramid`,
    `pyramid_channels`) returns a FeatureBackbone whose forward gives a list of NCHW maps, as timm's
    features_only. `tome_r=R` merges R tokens per block (Token Merging, vitmha.models.tome); 0 (the default)
    leaves the model as it is.
    """
    fused_attn = overrides.pop("fused_attn", True)
    tome_r = overrides.pop("tome_r", 0)
    features_only = overrides.pop("features_only", False)    # timm's: wrap as a FeatureBackbone (maps out)
    feature_kwargs = {k: overrides.pop(k) for k in FEATURE_KWARGS if k in overrides}
    if feature_kwargs and not features_only:
        raise ValueError(f"{', '.join(sorted(feature_kwargs))} need features_only=True")
    if features_only:
        overrides.setdefault("num_classes", 0)               # the head is dropped: no head-shape warning
    pdr = overrides.get("patch_drop_rate")
    if pdr is not None and not 0.0 <= float(pdr) < 1.0:
        raise ValueError(f"patch_drop_rate={pdr}: expected a value in [0, 1)")
    keep_blocks = overrides.pop("keep_blocks", None)   # the pretrained model's first N blocks, the rest dropped
    if keep_blocks is not None:
        if isinstance(keep_blocks, bool) or not isinstance(keep_blocks, int) or keep_blocks < 1:
            raise ValueError(f"keep_blocks={keep_blocks!r}: expected a whole number of blocks >= 1")
        if overrides.get("depth", keep_blocks) != keep_blocks:
            raise ValueError(f"keep_blocks={keep_blocks} and depth={overrides['depth']} disagree: give one")
        overrides["depth"] = keep_blocks
    weight_init = overrides.get("weight_init") or "timm"      # timm's modes: '', 'jax', 'jax_nlhb', 'moco'
    weight_init = "jax" if weight_init.startswith("jax") else "timm"
    cfg = arch_config(name, **overrides)
    model = VisionTransformer(**cfg, fused_attn=fused_attn, weight_init=weight_init)
    model.pretrained_cfg = model_pretrained_cfg(name, model)
    if pretrained:
        load_into(model, resolve_pretrained_file(name) if pretrained is True else pretrained,
                  truncate_depth=keep_blocks is not None)
    if tome_r:
        apply_tome(model, tome_r)
    if features_only:
        return FeatureBackbone(model, **feature_kwargs)
    return model


def model_pretrained_cfg(name: str, model: VisionTransformer) -> dict:
    """timm's whole pretrained config of ``name`` (its default tag when none is given), with what ``model``
    was built differently: ``input_size`` (channels and image size), ``fixed_input_size`` False for a
    ``dynamic_img_size`` model, ``architecture`` without the tag."""
    cfg = {**model.pretrained_cfg, **pretrained_cfg(name)}
    cfg.update(architecture=split_name(name)[0], input_size=(model.in_chans, *model.patch_embed.img_size),
               mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    if model.dynamic_img_size:
        cfg["fixed_input_size"] = False
    return cfg

