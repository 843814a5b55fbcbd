"""Losses for rare classes: class weights from training counts, and the focal loss (Lin et al., 2017).

Both follow ``F.cross_entropy``'s conventions, so that ``focal_loss`` with ``gamma=0`` *is* the
cross-entropy, weights, label smoothing and soft targets included:

- hard targets: sample i counts ``(1 - eps) * w[y_i] * l_i(y_i) + eps / C * sum_c w[c] * l_i(c)`` and the
  mean divides by ``sum_i w[y_i]`` over the non-ignored samples (a weighted mean);
- soft targets (mixup/cutmix) ``q``: sample i counts ``sum_c w[c] * q'_ic * l_i(c)`` with
  ``q' = (1 - eps) q + eps / C``, and the mean divides by the number of samples;

where ``l_i(c) = -(1 - p_ic) ** gamma * log p_ic``. Focal modulation is applied to every class term, the
smoothed ones too, so label smoothing spreads the (down-weighted) loss as it does for the cross-entropy.
Unlike ``F.cross_entropy`` a batch without any non-ignored target gives 0, not NaN.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

#: ``class_weights`` computed from the training split: inverse frequency, or Cui et al.'s effective number
AUTO_WEIGHTS = ("auto", "effective")
LOSSES = ("ce", "focal")


def class_weights_from_counts(counts: Union[Sequence[int], np.ndarray, torch.Tensor], method: str = "auto",
                              beta: float = 0.999) -> torch.Tensor:
    """(C,) float32 loss weights from per-class training counts, averaging 1 over the classes that occur.

    ``auto``: inverse frequency, ``w_c ∝ 1 / n_c``. ``effective``: the inverse "effective number of samples"
    of Cui et al. (2019), ``w_c ∝ (1 - beta) / (1 - beta ** n_c)``, which weighs rare classes up less.
    A class with no training example gets weight 0 (it is never a target). Raises ValueError when no
    class occurs or ``method`` is unknown.
    """
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if n.ndim != 1 or bool((n < 0).any()):
        raise ValueError(f"class counts must be a 1-D list of counts >= 0, got {n.tolist()}")
    present = n > 0
    if not bool(present.any()):
        raise ValueError("class counts are all zero: the training split has no labelled example")
    if method == "auto":
        w = torch.where(present, 1.0 / n.clamp_min(1), torch.zeros_like(n))
    elif method == "effective":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        w = torch.where(present, (1.0 - beta) / (1.0 - beta ** n), torch.zeros_like(n))
    else:
        raise ValueError(f"class weight method must be one of {AUTO_WEIGHTS}, got {method!r}")
    return (w * int(present.sum()) / w.sum()).float()


def _per_class(weight: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``weight`` (C,) shaped to broadcast against (N, C, ...) ``like``; ones when None."""
    if weight is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return weight.to(like).view(1, -1, *([1] * (like.ndim - 2)))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
               ignore_index: int = -100) -> torch.Tensor:
    """Mean focal loss of ``logits`` (N, C) or (N, C, H, W) against class indices (N,) / (N, H, W) or
    class probabilities shaped like ``logits``; ``gamma=0`` equals ``F.cross_entropy`` with the same
    ``weight`` (C,), ``label_smoothing`` and ``ignore_index`` (see the module docstring)."""
    if gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {gamma}")
    logp = logits.float().log_softmax(1)
    terms = -logp if gamma == 0 else -((1.0 - logp.exp()).clamp_min(0) ** gamma) * logp  # l(c), (N, C, ...)
    w = _per_class(weight, terms)
    C = logits.shape[1]
    eps = float(label_smoothing)
    if target.is_floating_point():  # soft targets: every position counts once
        q = target.float() * (1.0 - eps) + eps / C if eps else target.float()
        return (w * q * terms).sum(1).mean()
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    picked = terms.gather(1, t.unsqueeze(1)).squeeze(1)  # l(y), (N, ...)
    wy = weight.to(terms)[t] if weight is not None else torch.ones_like(picked)
    per = (1.0 - eps) * wy * picked
    if eps:
        per = per + eps / C * (w * terms).sum(1)
    per = torch.where(valid, per, torch.zeros_like(per))
    denom = torch.where(valid, wy, torch.zeros_like(wy)).sum()
    return per.sum() / denom.clamp_min(torch.finfo(per.dtype).tiny)
