"""Token Merging (ToMe; Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"), written from the paper.

In every block, between the attention and the MLP, ``r`` patch tokens are merged into others, so the MLP and
every later block see ``r`` fewer tokens. Which tokens merge is decided by *bipartite soft matching* on the
block's attention keys (mean over heads): the patch tokens are split alternately into sets A and B, each A
token finds its most similar B token (cosine similarity), and the ``r`` most similar of those pairs merge.
A merged token is the size-weighted mean of its members, its size the number of patches it stands for, and
later attention is *proportional*: log(size) is added to every attention logit of that key, so a token of
size s weighs as s copies of itself. Class and register (prefix) tokens never merge. A block merges at most
half its patch tokens (``r`` is capped at n // 2 of the n patch tokens it gets), so at least one remains.

Outputs keep the patch grid: ``forward_features``, ``forward_intermediates`` (and so segmentation heads and
``features_only``) *unmerge*, giving every input patch position the token it was merged into. Average
pooling over that grid is the size-weighted average of the merged tokens, and ``map`` pooling attends to a
token of size s as to s copies of it (the same proportional attention). ``forward_attention`` refuses (maps
over merged tokens do not cover the patch grid); so does an ``attn_mask``.

``vitmha.create_backbone(name, tome_r=8)`` (a task's ``backbone_kwargs: {tome_r: 8}``) builds a model with it;
:func:`apply_tome` turns it on, changes ``r`` or (``r=0``) turns it off on an existing VisionTransformer,
weights and state-dict keys untouched. The merge is differentiable (gradients flow through the weighted
means; the matching itself is a discrete choice), so it trains as well as it infers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitmha.models.vit import Block, ResPostBlock, VisionTransformer


class ToMeError(ValueError):
    """A setting or a call that token merging cannot serve (printed as one line by vitmha's commands)."""


@dataclass
class Merge:
    """One block's merge plan over its T = prefix + n tokens: prefix tokens stay, patch tokens at even
    offsets form A, at odd offsets B; A's ``merged`` go into B's ``dst``, A's ``kept`` stay.

    The merged sequence is [prefix, kept A tokens (in order), B tokens (in order)].
    """

    num_prefix: int
    num_tokens: int          # T before the merge
    kept: torch.Tensor       # (B, nA - r) ascending indices into A
    merged: torch.Tensor     # (B, r) indices into A
    dst: torch.Tensor        # (B, r) index into B of each merged A token

    def apply(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, D) and sizes (B, T, 1) (None = all 1) -> (B, T - r, D) and (B, T - r, 1)."""
        p = self.num_prefix
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        rows = torch.arange(x.shape[0], device=x.device)[:, None]     # batch index: x[rows, idx] gathers tokens
        xa, xb = x[:, p::2], x[:, p + 1::2]
        sa, sb = size[:, p::2], size[:, p + 1::2]
        sa_m = sa[rows, self.merged]                                    # (B, r, 1)
        dst = self.dst[..., None]
        # B token = (its size-weighted features + those merged into it) / (its size + theirs)
        sb_new = sb.scatter_add(1, dst, sa_m)                           # (B, nB, 1)
        xb_new = (xb * sb).scatter_add_(1, dst.expand(-1, -1, x.shape[-1]), xa[rows, self.merged] * sa_m) / sb_new
        x = torch.cat([x[:, :p], xa[rows, self.kept], xb_new.to(x.dtype)], dim=1)
        size = torch.cat([size[:, :p], sa[rows, self.kept], sb_new], dim=1)
        return x, size

    def destination(self) -> torch.Tensor:
        """(B, T) int64: the index in the merged sequence that each token before the merge went to."""
        p, kept, merged = self.num_prefix, self.kept, self.merged
        B, n_kept = kept.shape
        n = self.num_tokens - p
        n_a, n_b = (n + 1) // 2, n // 2
        ar = torch.arange(max(n_kept, n_b, p), device=kept.device)
        dest_a = torch.empty(B, n_a, dtype=torch.long, device=kept.device)
        dest_a.scatter_(1, kept, (p + ar[:n_kept]).expand(B, -1))
        dest_a.scatter_(1, merged, p + n_kept + self.dst)
        dest = torch.empty(B, self.num_tokens, dtype=torch.long, device=kept.device)
        dest[:, :p] = ar[:p]
        dest[:, p::2] = dest_a
        dest[:, p + 1::2] = p + n_kept + ar[:n_b]
        return dest


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Optional[Merge]:
    """The merge plan of ``r`` tokens from their keys ``metric`` (B, T, d), prefix tokens excluded; None when
    nothing merges. ``r`` is capped at half the patch tokens (n // 2)."""
    T = metric.shape[1]
    r = min(r, (T - num_prefix) // 2)
    if r <= 0:
        return None
    k = F.normalize(metric[:, num_prefix:], dim=-1)
    scores = k[:, ::2] @ k[:, 1::2].transpose(1, 2)                    # (B, nA, nB) cosine similarity
    best, dst = scores.max(dim=-1)                                      # each A token's closest B token
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    return Merge(num_prefix, T, kept=order[:, r:].sort(dim=-1).values, merged=merged, dst=dst.gather(1, merged))


def _attention_half(blk: Block, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The block's residual attention step (as its ``forward``), with ``bias`` added to the logits."""
    if type(blk) is ResPostBlock:
        return x + blk.drop_path1(blk.norm1(blk.attn(x, attn_mask=bias)))
    return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), attn_mask=bias)))


def _mlp_half(blk: Block, x: torch.Tensor) -> torch.Tensor:
    if type(blk) is ResPostBlock:
        return x + blk.drop_path2(blk.norm2(blk.mlp(x)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def proportional_bias(size: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Sizes (B, T, 1) -> the attention-logit bias log(size) as a float mask (B, 1, 1, T); None for all-1."""
    return None if size is None else size.log().to(dtype).transpose(1, 2)[:, None]


def tome_block(blk: Block, x: torch.Tensor, size: Optional[torch.Tensor], r: int, num_prefix: int
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Merge]]:
    """One block with token merging: attention (proportional to ``size``), merge ``r`` tokens, MLP.

    (B, T, D), sizes (B, T, 1) or None (all 1) -> (B, T - r', D), sizes, and the merge plan (None when no
    token merged). The keys are read from the output of the attention's ``k_norm`` (an identity without
    qk-norm), so the attention runs its own code.
    """
    keys: List[torch.Tensor] = []
    handle = blk.attn.k_norm.register_forward_hook(lambda m, args, out: keys.append(out))
    try:
        x = _attention_half(blk, x, proportional_bias(size, x.dtype))
    finally:
        handle.remove()
    if not keys:
        raise RuntimeError("token merging reads the keys from attn.k_norm's output, but attn.k_norm did not run")
    merge = bipartite_soft_matching(keys[-1].mean(dim=1), r, num_prefix)   # keys (B, h, T, d) -> (B, T, d)
    if merge is not None:
        x, size = merge.apply(x, size)
    return _mlp_half(blk, x), size, merge


class MergeTrace:
    """Where every token that entered the blocks is now; composes the merges' destination maps on demand."""

    def __init__(self) -> None:
        self.source: Optional[torch.Tensor] = None     # (B, T0) current index of each input token; None = identity
        self.pending: List[Merge] = []

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Merged tokens (B, T, D) -> (B, T0, D): each input position gets the token it was merged into."""
        for m in self.pending:
            dest = m.destination()
            self.source = dest if self.source is None else dest.gather(1, self.source)
        self.pending.clear()
        if self.source is None:
            return x
        return x[torch.arange(x.shape[0], device=x.device)[:, None], self.source]


class ToMeVisionTransformer(VisionTransformer):
    """A :class:`VisionTransformer` that merges ``tome_r`` tokens in every block (module docstring).

    Made by :func:`apply_tome` from a built model (same parameters and keys); ``tome_r = 0`` runs the plain
    block loop. Outputs keep the patch grid (unmerged), so heads and pooling work unchanged.
    """

    tome_r: int = 0

    def _run_blocks(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, take: Sequence[int] = (),
                    last: Optional[int] = None, attention: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        r = self.tome_r
        if r <= 0:
            return super()._run_blocks(x, attn_mask, take, last, attention)
        if attention:
            raise ToMeError(f"tome_r={r}: attention maps over merged tokens do not cover the patch grid; "
                            "apply_tome(model, 0) turns merging off on the same model for forward_attention")
        if attn_mask is not None:
            raise ToMeError(f"tome_r={r}: token merging changes the tokens in every block, so it cannot take "
                            "an attn_mask")
        if any(hasattr(blk.attn, "prompt") for blk in self.blocks):
            raise ToMeError(f"tome_r={r}: token merging cannot be combined with VPT prompt tokens")
        p = self.num_prefix_tokens
        trace, size, out = MergeTrace(), None, []
        run = self.blocks[:len(self.blocks) if last is None else last + 1]
        for i, blk in enumerate(run):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, size, merge = checkpoint(tome_block, blk, x, size, r, p, use_reentrant=False)
            else:
                x, size, merge = tome_block(blk, x, size, r, p)
            if merge is not None:
                trace.pending.append(merge)
            if i in take:
                out.append(trace.unmerge(x))
        return trace.unmerge(x), out


def apply_tome(model: VisionTransformer, r: int) -> VisionTransformer:
    """Merge ``r`` tokens per block in ``model`` from now on (in place; returns it). ``r=0`` on a plain
    VisionTransformer leaves it as it is; on a merging one it turns merging off. Raises ToMeError (a
    ValueError) for an ``r`` that is not a whole number >= 0, TypeError for a model it cannot change."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ToMeError(f"tome_r={r!r}: expected a whole number of tokens to merge per block, >= 0")
    if type(model) not in (VisionTransformer, ToMeVisionTransformer):
        raise TypeError(f"token merging applies to a vitmha VisionTransformer, not {type(model).__name__}")
    if type(model) is VisionTransformer:
        if r == 0:
            return model
        odd = sorted({type(b).__name__ for b in model.blocks if type(b) not in (Block, ResPostBlock)})
        if odd:
            raise TypeError(f"token merging knows Block and ResPostBlock, not {', '.join(odd)}")
        # the same object with the merging block loop: parameters, hooks, PEFT layers and keys stay as they are
        model.__class__ = ToMeVisionTransformer
    model.tome_r = r
    return model
