"""How faithful is a relevance map? Deletion and insertion curves (Petsiuk et al., 2018, RISE) and the share
of relevance that falls on the object.

Patches are ranked by relevance (most relevant first). *Deletion* replaces them, a few per step, with a
baseline image and tracks the target probability: a faithful map makes it fall fast (low area under the
curve). *Insertion* starts from a blurred image (:func:`vitmha.robustness.gaussian_blur`, the robustness
sweep's blur) and puts the original patches back in the same order: a faithful map makes it rise fast (high
area). The x-axis is the fraction of patches changed, so both areas are in [0, 1].
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from vitmha.explain.target import Target, baseline_image, patch_cells

__all__ = ["perturbation_curve", "deletion_curve", "insertion_curve", "auc", "relevance_share", "area_share"]


def perturbation_curve(model: nn.Module, x: torch.Tensor, target: Target, relevance: torch.Tensor,
                       patch: Tuple[int, int], mode: str = "deletion", baseline: Optional[str] = None,
                       steps: int = 50, batch_size: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """(fractions, probabilities), ``steps`` + 1 points: the target probability as the patches are deleted
    (``mode='deletion'``, default baseline ``mean``) or inserted into the baseline (``'insertion'``, default
    ``blur``), most relevant first. ``relevance`` (gh, gw) is on the patch grid of ``x`` (1, C, H, W); ties keep
    raster order."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode {mode!r}: expected 'deletion' or 'insertion'")
    baseline = baseline or ("mean" if mode == "deletion" else "blur")
    gh, gw = relevance.shape
    ph, pw = patch
    H, W = x.shape[-2:]
    if (-(-H // ph), -(-W // pw)) != (gh, gw):
        raise ValueError(f"relevance is {gh}×{gw} patches; the image is {H}×{W} px with {ph}×{pw}-px patches")
    n = gh * gw
    order = torch.argsort(relevance.flatten().float(), descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    rank_px = rank.view(gh, gw).repeat_interleave(ph, 0).repeat_interleave(pw, 1)[:H, :W].to(x.device)
    counts = np.unique(np.round(np.linspace(0, n, min(steps, n) + 1)).astype(int))
    base = baseline_image(x, baseline, patch)
    start, end = (x, base) if mode == "deletion" else (base, x)
    probs = []
    with torch.no_grad():
        for s in range(0, len(counts), batch_size):
            k = torch.as_tensor(counts[s:s + batch_size], device=x.device).view(-1, 1, 1, 1)
            changed = rank_px[None, None] < k                           # (b, 1, H, W)
            probs.append(target.prob(model(torch.where(changed, end, start))).float().cpu())
    return counts / n, torch.cat(probs).numpy()


def deletion_curve(model, x, target, relevance, patch, **kw) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`perturbation_curve` with ``mode='deletion'``."""
    return perturbation_curve(model, x, target, relevance, patch, mode="deletion", **kw)


def insertion_curve(model, x, target, relevance, patch, **kw) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`perturbation_curve` with ``mode='insertion'``."""
    return perturbation_curve(model, x, target, relevance, patch, mode="insertion", **kw)


def auc(fractions: np.ndarray, probs: np.ndarray) -> float:
    """Area under a curve over [0, 1] by the trapezoid rule."""
    f, p = np.asarray(fractions, np.float64), np.asarray(probs, np.float64)
    return float(np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2))


def relevance_share(relevance: torch.Tensor, mask: torch.Tensor, patch: Optional[Tuple[int, int]] = None) -> float:
    """Share of the positive relevance (gh, gw) that falls inside ``mask`` (H, W, weights in [0, 1]): each patch
    counts with the share of it inside the mask (see :func:`patch_cells` for ``patch``)."""
    r = relevance.detach().double().clamp_min(0)
    if r.sum() <= 0:
        return float("nan")
    cells = patch_cells(mask, tuple(r.shape), patch).double()
    return float((r * cells).sum() / r.sum())


def area_share(mask: torch.Tensor, grid: Tuple[int, int], patch: Optional[Tuple[int, int]] = None) -> float:
    """The share a uniform map would put inside ``mask`` (chance for :func:`relevance_share`)."""
    return float(patch_cells(mask, grid, patch).double().mean())
