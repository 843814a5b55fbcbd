"""Weight EMA of a task: timm's ``ModelEmaV3`` (kept as the task's ``ema`` submodule, so it is saved in
checkpoints as ``ema.module.*`` and moves between devices with the task)."""
from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn


class ModelEma(ModelEmaV3):
    """An EMA copy of ``model`` updated after every optimizer step: timm's ModelEmaV3 with its warmup
    (the decay grows as ``1 - (1 + step) ** (-2/3)`` up to ``decay``, so early updates are not dominated by
    the random initialisation). The copy never requires grad and is only run in eval mode.

    Args:
        model: the model to follow.
        decay: the decay once warmed up, e.g. 0.999 (short runs) to 0.9999 (long runs).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        super().__init__(model, decay=decay, use_warmup=True)
        self.module.requires_grad_(False)
