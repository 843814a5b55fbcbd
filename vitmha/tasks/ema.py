"""Exponential moving average of a model's weights (Polyak averaging), kept as a submodule so it is
saved in checkpoints and moved between devices with the task."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """EMA copy of ``model``: ``ema = d * ema + (1 - d) * weights`` after each optimizer step, with
    ``d = min(decay, (1 + n) / (10 + n))`` at update ``n`` so that early updates are not dominated by the
    random initialisation. Buffers (e.g. BatchNorm statistics) are copied, not averaged.

    Args:
        model: the model to follow; deep-copied, and the copy never requires grad.
        decay: the decay once warmed up, e.g. 0.999 (short runs) to 0.9999 (long runs).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model)  # only ever run by the task in eval mode (val/test/predict)
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = float(self.num_updates.item())
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
