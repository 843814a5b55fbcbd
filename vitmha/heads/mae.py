"""The pieces of a masked autoencoder (MAE, He et al. 2022) around a vitmha encoder.

Patches as the loss sees them (:func:`patchify` / :func:`unpatchify`), per-image random masking from keyed
uniforms (:func:`mask_noise`, :func:`random_masking`), the encoder run on the visible tokens only
(:func:`encode_visible`: the encoder's own patch embedding, position embedding, blocks and final norm), the
light decoder (:class:`MaeDecoder`) and the loss on the masked patches (:func:`masked_loss`).

Pixels of a patch are laid out (ph, pw, C), as in MAE's reference code, so a (B, N, ph*pw*C) prediction
unpatchifies to the image.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from vitmha.models import Block, resample_pos_embed
from vitmha.models.layers import make_norm, trunc_normal_

Grid = Tuple[int, int]

#: the random streams of masking: training steps, validation batches, drawn figures
MASK_STREAMS = {"train": 0, "val": 1, "figure": 2}


# ------------------------------------------------------------------------------------------- patches
def patchify(images: torch.Tensor, patch_size: Grid) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph*pw*C), patches in row-major order, pixels (ph, pw, C) within a patch.
    Raises ValueError when H or W is not a multiple of the patch side."""
    B, C, H, W = images.shape
    ph, pw = patch_size
    if H % ph or W % pw:
        raise ValueError(f"image {H}x{W} is not a whole number of {ph}x{pw} patches")
    h, w = H // ph, W // pw
    x = images.reshape(B, C, h, ph, w, pw)
    x = x.permute(0, 2, 4, 3, 5, 1)                       # (B, h, w, ph, pw, C)
    return x.reshape(B, h * w, ph * pw * C)


def unpatchify(patches: torch.Tensor, patch_size: Grid, grid: Grid, channels: int) -> torch.Tensor:
    """(B, N, ph*pw*C) -> (B, C, h*ph, w*pw): the inverse of :func:`patchify`."""
    B = patches.shape[0]
    ph, pw = patch_size
    h, w = grid
    x = patches.reshape(B, h, w, ph, pw, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)                        # (B, C, h, ph, w, pw)
    return x.reshape(B, channels, h * ph, w * pw)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's ``norm_pix_loss`` target: each patch (B, N, P) minus its mean over its pixels, divided by
    sqrt(var + eps) (unbiased variance, as MAE). Returns (normalised, mean (B, N, 1), std (B, N, 1))."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std


# ------------------------------------------------------------------------------------------- masking
def mask_seed(seed: int, stream: str, epoch: int, batch: int, rank: int = 0) -> int:
    """A 64-bit seed that is a function of (seed, stream, epoch, batch index, rank) only."""
    entropy = [int(seed) & (2**64 - 1), MASK_STREAMS[stream], int(epoch), int(batch), int(rank), 0x3A5E]
    a, b = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(a) << 32) | int(b)


def mask_noise(seed: int, stream: str, epoch: int, batch: int, batch_size: int, num_patches: int,
               rank: int = 0) -> torch.Tensor:
    """(batch_size, num_patches) float64 uniforms: row i is a function of (seed, stream, epoch, batch, rank, i)
    alone (not of the batch size, the device or any generator's state), so masks repeat bit for bit when a
    run resumes, and do not change with the device."""
    from vitmha.data.sampling import keyed_uniforms

    s = mask_seed(seed, stream, epoch, batch, rank)
    u = keyed_uniforms(s, np.zeros(batch_size, dtype=np.int64), np.arange(batch_size), num_patches)
    return torch.from_numpy(u)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible: ``int(N * (1 - mask_ratio))`` (MAE's rounding)."""
    return int(num_patches * (1.0 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image random masking from ``noise`` (B, N): the patches with the smallest noise stay visible.

    Returns ``ids_keep`` (B, n_visible) (the visible patches, in order of their noise), ``mask`` (B, N)
    (1 = masked, 0 = visible, in patch order) and ``ids_restore`` (B, N) (puts the [visible, masked]
    sequence back in patch order)."""
    B, N = noise.shape
    keep = num_visible(N, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {N}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :keep] = 0
    return ids_keep, torch.gather(mask, 1, ids_restore), ids_restore


# ------------------------------------------------------------------------------------------- encoder
def final_norm(encoder: nn.Module) -> nn.Module:
    """The norm the encoder's tokens leave through: ``norm``, or ``fc_norm`` for encoders that norm after
    pooling (avg pooling) and so have no token norm (then every parameter trains, as DDP requires)."""
    return encoder.norm if not isinstance(encoder.norm, nn.Identity) else encoder.fc_norm


def token_grid(encoder: nn.Module, images: torch.Tensor) -> Grid:
    """The patch grid (h, w) of ``images`` (B, C, H, W) for ``encoder``'s patch embedding."""
    ph, pw = encoder.patch_embed.patch_size
    return images.shape[-2] // ph, images.shape[-1] // pw


def encode_visible(encoder: nn.Module, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, prefix + n_visible, D): only the visible patches (and the prefix tokens) through
    the encoder's own patch embedding, position embedding, blocks and final norm.

    With vitmha's patch embedding only the visible patches are projected, into their places of an otherwise
    zero token grid, which then takes the encoder's own position embedding (any prefix tokens, resampling,
    ``no_embed_class``); the masked places are dropped before the blocks, so their value does not matter."""
    embed = encoder.patch_embed
    if hasattr(embed, "forward_patches"):
        kept = embed.forward_patches(images, ids_keep)                     # (B, n_visible, D)
        B, _, D = kept.shape
        h, w = embed.dynamic_feat_size(tuple(images.shape[-2:]))
        tokens = kept.new_zeros(B, h * w, D).scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), kept)
        tokens = tokens.view(B, h, w, D) if getattr(embed, "dynamic", False) else tokens
    else:
        tokens = embed(images)
    x = encoder._pos_embed(tokens)                                          # (B, prefix + N, D)
    P = encoder.num_prefix_tokens
    prefix, patches = x[:, :P], x[:, P:]
    D = patches.shape[-1]
    visible = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, n_visible, D)
    x = encoder.norm_pre(torch.cat([prefix, visible], dim=1))
    x, _ = encoder._run_blocks(x)
    return final_norm(encoder)(x)


# ------------------------------------------------------------------------------------------- decoder
def sincos_pos_embed_2d(dim: int, grid: Grid) -> torch.Tensor:
    """(h*w, dim) fixed 2-D sine-cosine position embedding (MAE's decoder): the first half of the channels
    encodes the row, the second half the column, each as [sin, cos] of the position times frequencies
    1 / 10000 ** (k / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:                 # (n,) -> (n, dim / 2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # row of each patch, row-major
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    return torch.cat([embed(rows), embed(cols)], dim=1).float()


class MaeDecoder(nn.Module):
    """MAE's light decoder: encoded visible tokens plus a shared mask token for every masked patch -> the
    pixels of every patch.

    (B, prefix + n_visible, D) and ``ids_restore`` (B, N) -> (B, N, patch_dim). The encoder's tokens are
    projected to the decoder's width, the mask tokens appended and the sequence put back in patch order; a
    position embedding (fixed sin-cos or learned) is added to the patch tokens (prefix tokens get none), then
    pre-norm transformer blocks (vitmha's), a norm and a linear prediction of each patch's pixels.

    Args:
        encoder_dim: width D of the encoder's tokens.
        patch_dim: pixels per patch, ph * pw * C.
        grid: the patch grid (h, w) of the training images (a learned embedding is resampled for others).
        num_prefix_tokens: class and register tokens in front of the patch tokens.
        dim: decoder width.
        depth: decoder blocks.
        num_heads: attention heads per decoder block.
        pos_embed: ``sincos`` (fixed, MAE's) or ``learned``.
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(self, *, encoder_dim: int, patch_dim: int, grid: Grid, num_prefix_tokens: int, dim: int = 512,
                 depth: int = 8, num_heads: int = 16, pos_embed: str = "sincos", mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"decoder_pos_embed: expected 'sincos' or 'learned', got {pos_embed!r}")
        if dim % num_heads:
            raise ValueError(f"decoder_dim {dim} is not divisible by decoder_heads {num_heads}")
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.pos_embed_kind = pos_embed
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        n = self.grid[0] * self.grid[1]
        if pos_embed == "learned":
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        else:  # fixed: a buffer, not saved (it is a function of the grid)
            self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dim, self.grid)[None], persistent=False)
        norm = partial(make_norm, "layernorm", eps=1e-6, bias=True)
        self.decoder_blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_hidden_dim=int(dim * mlp_ratio), norm_layer=norm) for _ in range(depth)])
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's: xavier-uniform linears, zero biases, normal(0.02) mask token (and learned position embedding)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.pos_embed_kind == "learned":
            trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        return {"mask_token", "decoder_pos_embed"}

    def position_embedding(self, grid: Grid) -> torch.Tensor:
        """(1, h*w, dim) for the patch grid ``grid``."""
        pe = self.decoder_pos_embed
        if tuple(grid) == self.grid:
            return pe
        if self.pos_embed_kind == "sincos":
            return sincos_pos_embed_2d(pe.shape[-1], grid)[None].to(pe)
        return resample_pos_embed(pe, list(grid), list(self.grid), num_prefix_tokens=0)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, grid: Optional[Grid] = None) -> torch.Tensor:
        x = self.decoder_embed(tokens)                                   # (B, P + n_visible, dim)
        P = self.num_prefix_tokens
        prefix, visible = x[:, :P], x[:, P:]
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1)                   # (B, N, dim), [visible, masked]
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # patch order
        patches = patches + self.position_embedding(grid or self.grid)
        x = self.decoder_blocks(torch.cat([prefix, patches], dim=1))
        return self.decoder_pred(self.decoder_norm(x))[:, P:]           # (B, N, patch_dim)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch (B, N, P) -> (B, N), averaged over the masked patches only (``mask`` 1)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def default_decoder_heads(dim: int) -> int:
    """Heads of a decoder ``dim`` wide: about 32 channels a head, as MAE's (512 wide, 16 heads); the largest
    count up to ``dim // 32`` that divides ``dim``, at least one."""
    heads = max(1, dim // 32)
    while dim % heads:
        heads -= 1
    return heads
