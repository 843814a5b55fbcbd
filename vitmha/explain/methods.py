"""Relevance maps on the patch grid: which patches a ViT's decision rests on.

Eight methods, each ``fn(model, backbone, x, target) -> (gh, gw)`` for one normalised image ``x`` (1, C, H, W):
``attention``, ``rollout``, ``chefer`` and ``gradcam`` read the model's blocks
(:mod:`vitmha.explain.attention`); ``ig``, ``occlusion``, ``lime`` and ``kernelshap`` are Captum's
attributions of the input, per patch (:mod:`vitmha.explain.attribution`).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import nn

from vitmha.explain.attention import attention_map, chefer_map, gradcam_map, rollout_map
from vitmha.explain.attribution import DEFAULT_SAMPLES, ig_map, kernelshap_map, lime_map, occlusion_map
from vitmha.explain.target import Target

__all__ = ["METHODS", "SAMPLED", "explain"]

METHODS: Dict[str, Callable[..., torch.Tensor]] = {
    "attention": attention_map, "rollout": rollout_map, "chefer": chefer_map, "gradcam": gradcam_map,
    "ig": ig_map, "occlusion": occlusion_map, "lime": lime_map, "kernelshap": kernelshap_map,
}
#: the methods that draw random samples (``samples`` forwards each, seeded)
SAMPLED = ("lime", "kernelshap")


def explain(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target,
            methods: Sequence[str] = tuple(METHODS), samples: int = DEFAULT_SAMPLES,
            seed: int = 0) -> Dict[str, torch.Tensor]:
    """{method: (gh, gw) relevance} for one image ``x`` (1, C, H, W); ``model`` (in eval mode) gives the
    logits, ``backbone`` is the ViT inside it; ``samples`` and ``seed`` go to LIME and KernelSHAP. Raises
    ValueError for an unknown method."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(x.shape)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected one of {', '.join(METHODS)}")
    sampling = {"samples": samples, "seed": seed}
    return {m: METHODS[m](model, backbone, x, target, **(sampling if m in SAMPLED else {})) for m in methods}
