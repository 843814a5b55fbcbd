"""Batch-wise mixup and cutmix with soft targets (Zhang et al. 2018, Yun et al. 2019).

Randomness comes from torch's global RNG only, so it follows ``torch.manual_seed`` (the tasks reseed
it every epoch for exact resume)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) int64 class ids -> (B, num_classes) float one-hot."""
    return F.one_hot(target, num_classes).float()


def cutmix_box(h: int, w: int, lam: float) -> Tuple[int, int, int, int]:
    """A random box ``(y0, y1, x0, x1)`` covering about ``1 - lam`` of an ``h x w`` image, clipped at
    the borders (so the covered area can be smaller; :class:`Mixup` corrects lambda for it)."""
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, ()).item())
    cx = int(torch.randint(0, w, ()).item())
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class Mixup:
    """Mixes a batch with its reverse (``x.flip(0)``) and returns soft targets.

    Args:
        num_classes: number of classes of the one-hot targets.
        mixup_alpha: Beta(alpha, alpha) for mixup; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) for cutmix; 0 disables cutmix.
        prob: probability that a batch is mixed at all.
        switch_prob: probability of cutmix instead of mixup when both are enabled.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5) -> None:
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def sample(self, h: int, w: int) -> Tuple[float, Optional[Tuple[int, int, int, int]]]:
        """Draws ``(lam, box)``: lam = 1 leaves the batch as it is; box is None for mixup."""
        if not self.enabled or torch.rand(()).item() >= self.prob:
            return 1.0, None
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand(()).item() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample().item())
        return lam, (cutmix_box(h, w, lam) if use_cutmix else None)

    def mix(self, x: torch.Tensor, target: torch.Tensor, lam: float,
            box: Optional[Tuple[int, int, int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mixes ``x`` (B,C,H,W) and ``target`` (B,) with the reversed batch: blended with weight ``lam``,
        or, given a cutmix ``box`` (y0, y1, x0, x1), pasted into it with lam = 1 - box area / image area.
        Returns (mixed images, (B, num_classes) soft targets)."""
        y = one_hot(target, self.num_classes)
        if lam >= 1.0 and box is None:
            return x, y
        x_flip = x.flip(0)
        if box is not None:
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = box
            x = x.clone()
            x[..., y0:y1, x0:x1] = x_flip[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
        else:
            x = x * lam + x_flip * (1.0 - lam)
        return x, y * lam + y.flip(0) * (1.0 - lam)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Randomly mixed ``(images, soft targets)``; soft targets are one-hot when the batch is not mixed."""
        lam, box = self.sample(*x.shape[-2:])
        return self.mix(x, target, lam, box)
