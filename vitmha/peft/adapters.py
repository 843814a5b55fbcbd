"""Parallel bottleneck adapters (AdaptFormer, Chen et al., 2022; He et al., 2022's "parallel adapter").

Each block's MLP gets a small MLP beside it, on the same input: mlp(h) + scale · up(relu(down(h))), h the
block's norm2 output. ``up`` starts at zero, so a fresh adapter leaves the model unchanged. It is attached
with a forward hook on ``mlp``, so the block's code and the base weights' keys stay as they are; its
weights are ``blocks.N.mlp.adapter.{down,up}.{weight,bias}``. In blocks with LayerScale the sum is scaled by
``ls2`` like the MLP's output.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import torch
from torch import nn


class ParallelAdapter(nn.Module):
    """(..., D) -> (..., D): scale · up(dropout(relu(down(x)))), with a ``hidden``-wide bottleneck."""

    def __init__(self, dim: int, hidden: int, scale: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # AdaptFormer's init: down random, up zero
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

    def add_to_output(self, mlp: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        """Forward hook on the MLP: its output plus this adapter's output on the same input."""
        return out + self(args[0])


def add_adapters(model: nn.Module, *, hidden: int, scale: float, dropout: float) -> None:
    """Put a ParallelAdapter beside the MLP of every block of ``model`` (a VisionTransformer)."""
    ref = model.patch_embed.proj.weight
    for block in model.blocks:
        adapter = ParallelAdapter(model.embed_dim, hidden, scale, dropout).to(ref.device, ref.dtype)
        block.mlp.adapter = adapter
        block.mlp.register_forward_hook(adapter.add_to_output)
