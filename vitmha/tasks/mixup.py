"""Batch-wise mixup and cutmix with soft targets (Zhang et al. 2018, Yun et al. 2019): timm's ``Mixup``."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


class Mixup:
    """timm's Mixup/CutMix in batch mode: the batch is mixed with its reverse (``x.flip(0)``), one lambda per
    batch, cutmix's lambda corrected for the box clipped at the borders. Targets come back as (B, C) soft
    targets without label smoothing (the tasks' losses smooth them). The draws come from NumPy's global
    generator, which :class:`~vitmha.tasks.reseed.ExactResume` reseeds every batch, so resumed runs draw the
    same. timm needs an even batch: the last image of an odd batch is left unmixed.

    Args:
        num_classes: number of classes of the one-hot targets.
        mixup_alpha: Beta(alpha, alpha) for mixup; 0 disables mixup.
        cutmix_alpha: Beta(alpha, alpha) for cutmix; 0 disables cutmix.
        prob: probability that a batch is mixed at all.
        switch_prob: probability of cutmix instead of mixup when both are enabled.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5) -> None:
        from timm.data import Mixup as TimmMixup

        self.num_classes = num_classes
        self.enabled = prob > 0 and (mixup_alpha > 0 or cutmix_alpha > 0)
        self.timm = TimmMixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                              switch_prob=switch_prob, mode="batch", label_smoothing=0.0,
                              num_classes=num_classes) if self.enabled else None

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, (B, num_classes) soft targets); one-hot targets when mixing is off."""
        if self.timm is None or len(x) < 2:
            return x, F.one_hot(target, self.num_classes).float()
        if len(x) % 2:
            mixed, soft = self.timm(x[:-1].clone(), target[:-1])
            last = F.one_hot(target[-1:], self.num_classes).to(soft)
            return torch.cat([mixed, x[-1:]]), torch.cat([soft, last])
        return self.timm(x.clone(), target)
