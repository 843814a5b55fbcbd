"""Resampling the position embedding to another token grid while the encoder runs (``dynamic_img_size``).

The encoder's own code (the design keeps timm's layers out of the forward pass); the result equals
``timm.layers.resample_abs_pos_embed`` (tests/test_models.py). Weights resampled when they are *loaded* (another
image or patch size) go through timm's functions instead: vitmha.models.weights.
"""
from __future__ import annotations

from typing import List

import torch
import torch.fx
import torch.nn.functional as F


@torch.fx.wrap  # a leaf under torch.fx: the grid sizes are values only when the model runs
def resample_pos_embed(pos_embed: torch.Tensor, new_size: List[int], old_size: List[int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + h*w, D) laid out on the ``old_size`` grid (h, w) -> (1, prefix + H*W, D) on ``new_size``
    (H, W): the grid part resized bicubic with antialias (in float32), prefix entries kept as they are."""
    if new_size[0] == old_size[0] and new_size[1] == old_size[1]:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)      # (1, D, h, w)
    grid = F.interpolate(grid, size=[new_size[0], new_size[1]], mode="bicubic", antialias=True,
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)                 # (1, H*W, D)
    return torch.cat([prefix, grid], dim=1)
