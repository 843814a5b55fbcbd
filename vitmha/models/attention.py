"""Multi-head self-attention, written out: softmax(Q Kᵀ / sqrt(d_head)) V per head.

Two paths give the same numbers: the fused one (`F.scaled_dot_product_attention`, the default) and an
explicit one that materialises the attention probabilities and can return them (for visualisation).
The qkv projection is one fused Linear whose output is laid out [q | k | v] x heads x head_dim, as in timm.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from vitmha.models.layers import Mlp


@torch.fx.wrap  # a leaf under torch.fx: whether there is a mask, and its kind, are known only when it runs
def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d)): (B, h, Nq, d), (B, h, Nk, d) -> (B, h, Nq, Nk).

    `attn_mask` follows `F.scaled_dot_product_attention`: a bool mask is True where attention is allowed,
    a float mask is added to the scores.
    """
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1)                         # (B, h, Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.softmax(dim=-1)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    attn_mask: Optional[torch.Tensor] = None, dropout: Optional[nn.Module] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, h, Nq, d), (B, h, Nk, d), (B, h, Nk, d) -> output (B, h, Nq, d), probabilities (B, h, Nq, Nk)
    (before `dropout`); `attn_mask` as in :func:`attention_probs`."""
    probs = attention_probs(q, k, attn_mask)
    out = (dropout(probs) if dropout is not None else probs) @ v
    return out, probs


class Attention(nn.Module):
    """Multi-head self-attention over tokens: (B, N, D) -> (B, N, D)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm / scale_norm need a norm_layer")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                return_attn: bool = False) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with ``return_attn`` the tuple (output, probabilities (B, heads, N, N)).

        ``return_attn`` is for eager mode (hooks and visualisation); under TorchScript the output alone.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                          # each (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        attn: Optional[torch.Tensor] = None
        if self.fused and not return_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = attention_probs(q, k, attn_mask)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, C)                           # heads concatenated
        x = self.proj_drop(self.proj(self.norm(x)))
        if not torch.jit.is_scripting():   # TorchScript has one return type; the maps are an eager-mode extra
            if return_attn:
                return x, attn
        return x


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP, SigLIP): learned latent queries attend over all tokens.

    (B, N, D) -> (B, D) (`pool='token'`: the first latent; `'avg'`: the mean of the latents).
    Parameter names follow timm's `attn_pool.{latent, q, kv, proj, norm, mlp}`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        mlp_hidden: int,
        latent_len: int = 1,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_layer: Callable[[int], nn.Module],
        act: str = "gelu",
        pool: str = "token",
        fused: bool = True,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent_len = latent_len
        self.pool = pool
        self.fused = fused
        self.latent = nn.Parameter(torch.zeros(1, latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden, act=act)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1))
        q = q.reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)   # (B, h, L, d)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = attention_probs(q, k) @ v
        x = x.transpose(1, 2).reshape(B, self.latent_len, C)
        x = self.proj_drop(self.proj(x))
        x = x + self.mlp(self.norm(x))
        return x[:, 0] if self.pool == "token" else x.mean(1)
