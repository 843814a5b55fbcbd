"""What the explanations read from inside the model: forward hooks on named modules, for forwards of the model
itself. ``patch_embed.proj`` gives the patch grid of the actual input, ``blocks.N.attn.attn_drop`` the
attention probabilities (the blocks take their explicit attention path, same numbers, only while the hooks
are on) and ``blocks.N.norm1`` the tokens for Grad-CAM."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from vitmha.explain.target import Target, patch_cells

__all__ = ["Recording", "record"]


class Recording:
    """What the hooks saw in one forward: ``grid`` (gh, gw), ``attn`` [(B, heads, N, N) per block that ran,
    in order], ``block_tokens`` {block index: its ``norm1`` output (B, N, D)}."""

    def __init__(self) -> None:
        self.grid: Optional[Tuple[int, int]] = None
        self.attn: List[torch.Tensor] = []
        self.block_tokens: Dict[int, torch.Tensor] = {}


@contextmanager
def record(backbone: nn.Module, attention: bool = False, block_tokens: bool = False) -> Iterator[Recording]:
    """Forward hooks on ``backbone`` for the forwards run inside the ``with``; removed afterwards, and the
    blocks' fused-attention flags restored."""
    rec = Recording()
    handles = [backbone.patch_embed.proj.register_forward_hook(
        lambda m, i, o: setattr(rec, "grid", (int(o.shape[-2]), int(o.shape[-1]))))]
    fused = []
    try:
        for i, blk in enumerate(backbone.blocks):
            if attention:
                fused.append((blk.attn, blk.attn.fused))
                blk.attn.fused = False  # the explicit path runs attn_drop on the probabilities
                handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: rec.attn.append(o)))
            if block_tokens:
                # the block's first norm1 call (VPT prompts go through the same norm after it)
                handles.append(blk.norm1.register_forward_hook(
                    lambda m, args, out, i=i: rec.block_tokens.setdefault(i, out)))
        yield rec
    finally:
        for h in handles:
            h.remove()
        for attn, flag in fused:
            attn.fused = flag


def tokens(backbone: nn.Module, rec: Recording) -> Tuple[int, int]:
    """(prefix tokens, prefix + patches) of the recorded forward."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    if rec.grid is None:
        raise ValueError("the model never ran its backbone's patch embedding")
    return prefix, prefix + rec.grid[0] * rec.grid[1]


def query(backbone: nn.Module, target: Target, rec: Recording, n: int) -> torch.Tensor:
    """(N,) weights over the tokens: the query whose relevance row is read. The class token for class-token
    pooling, the mean over the patch tokens for average pooling (and for attention pooling, approximated so),
    and the region's patches (weighted by their share of the region) for a segmentation target."""
    prefix, _ = tokens(backbone, rec)
    q = torch.zeros(n)
    if target.region is not None:
        q[prefix:] = patch_cells(target.region, rec.grid, backbone.patch_embed.patch_size).flatten()
    elif getattr(backbone, "cls_token", None) is not None and getattr(backbone, "global_pool", "token") == "token":
        q[0] = 1.0
    elif getattr(backbone, "pool_include_prefix", False):
        q[:] = 1.0
    else:
        q[prefix:] = 1.0
    if q.sum() <= 0:
        raise ValueError("the target region covers no patch")
    return q / q.sum()


def attentions(backbone: nn.Module, rec: Recording) -> List[torch.Tensor]:
    """The recorded (B, heads, N, N) maps cut to the image tokens (VPT prompt tokens, last, dropped)."""
    if not rec.attn:
        raise ValueError("no attention probabilities were recorded (did the model run its blocks?)")
    _, n = tokens(backbone, rec)
    if rec.attn[0].shape[-1] < n:
        raise ValueError(f"attention has {rec.attn[0].shape[-1]} tokens, expected at least {n}")
    return [a[..., :n, :n] for a in rec.attn]


def on_grid(row: torch.Tensor, backbone: nn.Module, rec: Recording) -> torch.Tensor:
    """(N,) values over the tokens -> (gh, gw) over the patches (prefix tokens dropped)."""
    prefix, _ = tokens(backbone, rec)
    return row[prefix:].reshape(rec.grid).detach().float().cpu()


def grid_of(model: nn.Module, backbone: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """The patch grid (gh, gw) of ``x`` (1, C, H, W) as the model cuts it (padded inputs included)."""
    with torch.no_grad(), record(backbone) as rec:
        model(x)
    tokens(backbone, rec)
    return rec.grid
