"""Resampling of position embeddings (new image size) and patch-embedding kernels (new patch size)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: Sequence[int],
    old_size: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """(1, prefix + h*w, D) -> (1, prefix + H*W, D): the grid part resized bicubic with antialias.

    Prefix (class/register) entries are kept as they are. The old grid is taken as square when not given.
    """
    new_size = (int(new_size[0]), int(new_size[1]))
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.isqrt(n_grid))
        if side * side != n_grid:
            raise ValueError(f"cannot infer the grid of a position embedding with {n_grid} patch entries; "
                             "pass old_size")
        old_size = (side, side)
    old_size = (int(old_size[0]), int(old_size[1]))
    if old_size == new_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)      # (1, D, h, w)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _resize_matrix(old: Tuple[int, int], new: Tuple[int, int]) -> torch.Tensor:
    """Matrix R (new_h*new_w, old_h*old_w) such that resize(x).flatten() == R @ x.flatten()."""
    n = old[0] * old[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, old[0], old[1]).float()
    out = F.interpolate(basis, size=new, mode="bicubic", antialias=True, align_corners=False)
    return out.reshape(n, -1).T.double()


def resample_patch_embed(weight: torch.Tensor, new_size: Sequence[int]) -> torch.Tensor:
    """(D, C, ph, pw) -> (D, C, PH, PW), so that a patch resized to the new size gives the same embedding.

    FlexiViT's pseudo-inverse resize: with x_new = R x_old, choose w_new = pinv(Rᵀ) w_old so that
    <x_new, w_new> = <x_old, w_old>.
    """
    old = (weight.shape[-2], weight.shape[-1])
    new = (int(new_size[0]), int(new_size[1]))
    if old == new:
        return weight
    R = _resize_matrix(old, new)                                        # (n_new, n_old)
    pinv = torch.linalg.pinv(R.T)                                       # (n_new, n_old)
    D, C = weight.shape[:2]
    w = weight.double().reshape(D * C, -1) @ pinv.T                     # (D*C, n_new)
    return w.reshape(D, C, *new).to(weight.dtype)
