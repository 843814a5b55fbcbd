"""VPT-deep (Jia et al., 2022): learned prompt tokens in every block.

VPT-deep puts P fresh learned tokens into every block's input and drops what the block made of them. Inside a
block only attention mixes tokens (norms and the MLP act on each token alone), so the class and patch tokens
meet the prompts only as extra keys and values of the attention, and that is how they are added here: a
pre-hook on each block's ``attn`` appends the block's prompts, put through the block's ``norm1`` as any input
token is, to the attention's input; a hook after it drops the prompt rows of the output (and the prompt rows
and columns of the attention probabilities when those are returned, whose rows then sum to less than 1).
So ``forward_features``, ``forward_intermediates`` and the heads see the usual token grid, the MLP does no
work on prompts, and the base weights keep their keys; the prompts are ``blocks.N.attn.prompt.tokens``.
The prompts go after the other tokens, not right after the class token as in the paper: attention has no
notion of order, so the outputs are the same.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Set, Tuple

import torch
from torch import nn

from vitmha.peft.spec import PeftError


class BlockPrompts(nn.Module):
    """The P prompt tokens (P, D) of one block, and the hooks that put them into its attention.

    Args:
        num_tokens: P.
        dim: token width D.
        norm: the norm the block applies before attention (not registered here: it is the block's).
        bound: the prompts start uniform in [-bound, bound].
        dropout: dropout on the prompts, before the norm.
    """

    def __init__(self, num_tokens: int, dim: int, norm: nn.Module, bound: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.__dict__["norm"] = norm  # a plain attribute: no second state-dict entry for the block's norm1

    def no_weight_decay(self) -> Set[str]:
        """Prompts are tokens: no weight decay, as for the class token and the position embedding."""
        return {"tokens"}

    def insert(self, attn: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        """Forward pre-hook: (B, N, D) attention input -> (B, N + P, D)."""
        if kwargs.get("attn_mask") is not None or (len(args) > 1 and args[1] is not None):
            raise PeftError("peft.method vpt: an attn_mask cannot be combined with prompt tokens")
        x = args[0]
        p = self.norm(self.dropout(self.tokens)).to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x, p], dim=1), *args[1:]), kwargs

    def remove(self, attn: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any):
        """Forward hook: drop the prompt rows of the output (B, N + P, D) -> (B, N, D), and of the attention
        probabilities (B, h, N + P, N + P) -> (B, h, N, N) when they are returned."""
        n = args[0].shape[1] - self.tokens.shape[0]
        if isinstance(out, tuple):
            y, probs = out
            return y[:, :n], probs[..., :n, :n]
        return out[:, :n]


def add_prompts(model: nn.Module, *, num_tokens: int, dropout: float) -> None:
    """Give every block of ``model`` (a VisionTransformer) ``num_tokens`` prompts, initialised as VPT does
    (uniform, bound sqrt(6 / (C·p·p + D)), Xavier's for the patch projection)."""
    from vitmha.models.vit import ResPostBlock

    pe = model.patch_embed
    bound = math.sqrt(6.0 / (pe.proj.in_channels * math.prod(pe.patch_size) + model.embed_dim))
    ref = pe.proj.weight
    for block in model.blocks:
        # the norm the attention's input went through (res-post-norm blocks norm the output instead)
        norm = nn.Identity() if isinstance(block, ResPostBlock) else block.norm1
        prompt = BlockPrompts(num_tokens, model.embed_dim, norm, bound, dropout).to(ref.device, ref.dtype)
        block.attn.prompt = prompt
        block.attn.register_forward_pre_hook(prompt.insert, with_kwargs=True)
        block.attn.register_forward_hook(prompt.remove, with_kwargs=True)
