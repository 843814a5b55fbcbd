"""Semantic-segmentation decoders on ViT block outputs.

Every head declares which blocks it reads (``indices``) and whether they pass through the backbone's
final norm (``norm``); the caller gets them with
``backbone.forward_intermediates(x, indices=head.indices, norm=head.norm, intermediates_only=True)``
and calls ``head(feats, size)``: a list of (B, D, h, w) maps -> logits (B, num_classes, *size).
:func:`build_head` makes a head for a backbone by name.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "mask_transformer", "uper", "setr_pup")


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` up to 32 leaving >= 2 channels a group (so a 1x1
    pooled map still normalises). GroupNorm,
    not BatchNorm, because segmentation fine-tuning often runs with a batch of 1-4 images per device."""
    return max(g for g in range(1, min(32, max(1, channels // 2)) + 1) if channels % g == 0)


def conv_norm_act(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True))


def spread_indices(depth: int, n: int) -> List[int]:
    """``n`` block indices spread evenly over ``depth`` blocks, ending at the last (12, 4 -> [2, 5, 8, 11]);
    repeats when depth < n."""
    return [max(0, round((i + 1) * depth / n) - 1) for i in range(n)]


class LinearHead(nn.Module):
    """Per-patch linear classifier on the final normed patch tokens, upsampled bilinearly (Segmenter's
    linear decoder).

    Args:
        embed_dim: token width D.
        num_classes: output channels.
        depth: backbone depth (the head reads its last block).
    """

    def __init__(self, embed_dim: int, num_classes: int, depth: int) -> None:
        super().__init__()
        self.indices = [depth - 1]
        self.norm = True
        self.proj = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: List[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        return _upsample(self.proj(feats[-1]), size)  # (B, K, h, w) -> (B, K, H, W)


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021): learnable class embeddings join the patch
    tokens in a few transformer blocks; masks are the cosine similarities of projected patch and class
    embeddings, normalised over classes with a LayerNorm.

    Args:
        embed_dim: token width D of the backbone.
        num_classes: number of class embeddings K.
        depth: backbone depth (the head reads its last block, normed).
        num_layers: decoder blocks.
        dim: decoder width; default = embed_dim.
        num_heads: decoder heads; default = dim // 64 (at least 1).
        drop_path: stochastic depth in the decoder blocks.
    """

    def __init__(self, embed_dim: int, num_classes: int, depth: int, num_layers: int = 2,
                 dim: int | None = None, num_heads: int | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        from vitmha.models.vit import Block  # the encoder's block, reused as the decoder layer

        dim = dim or embed_dim
        num_heads = num_heads or max(1, dim // 64)
        if dim % num_heads:
            raise ValueError(f"mask transformer dim {dim} is not divisible by num_heads {num_heads}")
        self.indices = [depth - 1]
        self.norm = True
        self.num_classes = num_classes
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_hidden_dim=4 * dim, norm_layer=norm_layer,
                                           drop_path=drop_path) for _ in range(num_layers)])
        self.decoder_norm = norm_layer(dim)
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim ** -0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim ** -0.5)
        self.mask_norm = nn.LayerNorm(num_classes)

    def no_weight_decay(self) -> set:
        return {"cls_emb"}

    def forward(self, feats: List[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = feats[-1]
        B, _, h, w = x.shape
        x = self.proj_in(x.flatten(2).transpose(1, 2))  # (B, h*w, dim)
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)  # (B, h*w + K, dim)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :-self.num_classes] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, -self.num_classes:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h*w, K)
        masks = masks.transpose(1, 2).reshape(B, self.num_classes, h, w)
        return _upsample(masks, size)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet-style pyramid (Li et al. 2022) from four stride-p maps: deconv x4, deconv x2, identity,
    max-pool x1/2, giving strides p/4, p/2, p, 2p."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        d = embed_dim
        self.up4 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, stride=2), nn.GroupNorm(_groups(d), d), nn.GELU(),
                                 nn.ConvTranspose2d(d, d, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(d, d, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        a, b, c, d = feats
        return [self.up4(a), self.up2(b), c, self.down2(d)]


class UperHead(nn.Module):
    """UPerNet (Xiao et al. 2018) on a simple feature pyramid of four evenly spaced blocks: a pyramid
    pooling module on the coarsest level, a top-down FPN, all levels fused at the finest.

    Args:
        embed_dim: token width D of the backbone.
        num_classes: output channels.
        depth: backbone depth (the head reads 4 evenly spaced blocks, un-normed).
        channels: decoder width.
        pool_scales: PPM output sizes.
        dropout: dropout before the classifier.
    """

    def __init__(self, embed_dim: int, num_classes: int, depth: int, channels: int = 256,
                 pool_scales: Tuple[int, ...] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.indices = spread_indices(depth, 4)
        self.norm = False
        self.level_norms = nn.ModuleList([nn.GroupNorm(_groups(embed_dim), embed_dim) for _ in range(4)])
        self.pyramid = SimpleFeaturePyramid(embed_dim)
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_norm_act(embed_dim, channels, 1))
                                  for s in pool_scales])
        self.ppm_bottleneck = conv_norm_act(embed_dim + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList([conv_norm_act(embed_dim, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([conv_norm_act(channels, channels) for _ in range(3)])
        self.fuse = conv_norm_act(4 * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        levels = self.pyramid([n(f) for n, f in zip(self.level_norms, feats)])  # strides p/4, p/2, p, 2p
        top = levels[3]
        top = self.ppm_bottleneck(torch.cat([top] + [_upsample(m(top), top.shape[-2:]) for m in self.ppm], 1))
        lat = [conv(f) for conv, f in zip(self.lateral, levels[:3])] + [top]
        for i in range(3, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _upsample(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(f) for conv, f in zip(self.fpn, lat[:3])] + [lat[3]]
        fine = outs[0].shape[-2:]
        x = self.fuse(torch.cat([outs[0]] + [_upsample(o, fine) for o in outs[1:]], 1))
        return _upsample(self.cls(self.dropout(x)), size)


class SetrPupHead(nn.Module):
    """SETR's progressive upsampling decoder (Zheng et al. 2021): conv-norm-relu and x2 upsampling,
    log2(patch size) times, on the final normed tokens.

    Args:
        embed_dim: token width D of the backbone.
        num_classes: output channels.
        depth: backbone depth (the head reads its last block, normed).
        patch_size: backbone patch size, sets the number of x2 stages.
        channels: decoder width.
    """

    def __init__(self, embed_dim: int, num_classes: int, depth: int, patch_size: int = 16,
                 channels: int = 256) -> None:
        super().__init__()
        self.indices = [depth - 1]
        self.norm = True
        stages = max(1, int(round(math.log2(max(2, patch_size)))))
        self.stages = nn.ModuleList([conv_norm_act(embed_dim if i == 0 else channels, channels)
                                     for i in range(stages)])
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = feats[-1]
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return _upsample(self.cls(x), size)


def build_head(name: str, backbone: nn.Module, num_classes: int, **kwargs: Any) -> nn.Module:
    """The head ``name`` (one of ``HEADS``) sized for ``backbone``; ``kwargs`` go to its constructor."""
    common = dict(embed_dim=backbone.embed_dim, num_classes=num_classes, depth=len(backbone.blocks))
    if name == "linear":
        return LinearHead(**common, **kwargs)
    if name == "mask_transformer":
        return MaskTransformerHead(**common, **kwargs)
    if name == "uper":
        return UperHead(**common, **kwargs)
    if name == "setr_pup":
        kwargs.setdefault("patch_size", max(backbone.patch_embed.patch_size))
        return SetrPupHead(**common, **kwargs)
    raise ValueError(f"unknown head {name!r}; expected one of {HEADS}")


def run_head(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, H, W) of ``head`` on ``backbone``'s blocks for images ``x`` (B, 3, H, W)."""
    wanted = sorted(set(head.indices))
    maps = backbone.forward_intermediates(x, indices=wanted, norm=head.norm, output_fmt="NCHW",
                                          intermediates_only=True)
    by_index = dict(zip(wanted, maps))
    return head([by_index[i] for i in head.indices], x.shape[-2:])
