"""The encoder as a feature extractor for other libraries (timm's ``features_only``).

``create_backbone(name, features_only=True, out_indices=...)`` wraps a VisionTransformer in a
:class:`FeatureBackbone`: (B, C, H, W) -> a list of NCHW maps (B, D, H/p, W/p), one per chosen block, and a
``feature_info`` that says their channels, strides and module names exactly as timm's own
``timm.create_model(name, features_only=True, out_indices=...)`` does. Blocks after the last chosen one,
the final norm and the head are dropped, as timm drops them, so the state dict keys are timm's too.

``pyramid=True`` adds ViTDet's simple feature pyramid on the last chosen map (strides p/4, p/2, p, 2p), and
:class:`FPNBackbone` puts torchvision's FPN on either, with the ``out_channels`` torchvision's detectors ask.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitmha.models.compat import DefaultCfgAlias
from vitmha.models.vit import VisionTransformer

#: create_backbone's keyword arguments that belong to the feature wrapper (they need features_only=True)
FEATURE_KWARGS = ("out_indices", "pyramid", "pyramid_channels", "feature_cls")
#: timm's default out_indices for ViTs: an int n takes the last n blocks
DEFAULT_OUT_INDICES = 3

OutIndices = Union[int, Sequence[int]]


class FeatureInfo:
    """Channels, stride ('reduction') and producing module of every feature a model can give, and which of
    them it gives (``out_indices``); the accessors answer for those, as timm's ``FeatureInfo`` does."""

    def __init__(self, info: List[Dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [{**d, "index": d.get("index", i)} for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Union[int, Sequence[int], None] = None):
        """``key`` of each output (idx None), of feature ``idx`` (an int), or of the features in ``idx``."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Union[int, Sequence[int], None] = None):
        """The info dicts (only ``keys`` when given) of each output, or of feature(s) ``idx``."""
        def pick(i: int) -> Dict[str, Any]:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}
        if isinstance(idx, int):
            return pick(idx)
        return [pick(i) for i in (self.out_indices if idx is None else idx)]

    def channels(self, idx: Union[int, Sequence[int], None] = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Union[int, Sequence[int], None] = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Union[int, Sequence[int], None] = None):
        return self.get("module", idx)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.info[i]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return (f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()}, "
                f"reduction={self.reduction()})")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) maps, at every position (ViTDet's norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022, sec. 3) from one stride-p map.

    (B, D, h, w) -> four (B, out_channels, ·, ·) maps at strides p/4, p/2, p, 2p: two stride-2 deconvs, one
    deconv, identity, 2x2 max-pool; then a 1x1 and a 3x3 conv, each LayerNorm-ed, per level.
    """

    scales = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, embed_dim: int, out_channels: int = 256) -> None:
        super().__init__()
        d = embed_dim
        if d % 4:
            raise ValueError(f"pyramid: embed_dim {d} must be divisible by 4 (the x4 level has embed_dim / 4 "
                             "channels before its projection)")
        self.resample = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2)),
            nn.ConvTranspose2d(d, d // 2, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),        # ceil: an odd grid keeps its last row and column
        ])
        self.out = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for c in (d // 4, d // 2, d, d)])
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [out(resample(x)) for resample, out in zip(self.resample, self.out)]


def _stride(patch: int, scale: float) -> Union[int, float]:
    s = patch / scale
    return int(s) if s == int(s) else s


class FeatureBackbone(DefaultCfgAlias, nn.Module):
    """A VisionTransformer as a feature extractor, as timm's ``features_only=True``.

    (B, C, H, W) -> list of (B, D, H/p, W/p) maps, the outputs of blocks ``out_indices`` (not final-normed,
    prefix tokens dropped); with ``pyramid``, ViTDet's four maps at strides p/4, p/2, p, 2p made from the
    last of them. Any input size works when the model was built with ``dynamic_img_size=True``.

    Args:
        model: the encoder; blocks after the last one used, its final norm, pooling and head are removed.
        out_indices: an int n takes the last n blocks; a sequence takes those blocks (negative counts from
            the end); None takes every block. Raises ValueError for an index outside the model's depth.
        pyramid: add the simple feature pyramid on the last chosen map.
        pyramid_channels: channels of every pyramid level.
        feature_cls: timm's choice of feature wrapper; 'getter' (the one timm uses for ViTs, through
            ``forward_intermediates``) is what this class is, None means the same.
    """

    def __init__(self, model: VisionTransformer, out_indices: Optional[OutIndices] = DEFAULT_OUT_INDICES,
                 pyramid: bool = False, pyramid_channels: int = 256, feature_cls: Optional[str] = None) -> None:
        super().__init__()
        if feature_cls not in (None, "getter"):
            raise ValueError(f"feature_cls={feature_cls!r}: vitmha's features_only is timm's 'getter' wrapper "
                             "(forward_intermediates); give 'getter' or leave it out")
        depth = len(model.blocks)
        if out_indices is not None and not isinstance(out_indices, int) and len(out_indices) == 0:
            raise ValueError("out_indices is empty: give block indices such as (3, 7, 11), or an int n for the "
                             "last n blocks")
        try:
            take = model._resolve_indices(out_indices)
        except ValueError:
            raise ValueError(f"out_indices={out_indices!r} is out of range for a model of depth {depth}: block "
                             f"indices run 0..{depth - 1} or -{depth}..-1, an int n takes the last n blocks "
                             f"(1 <= n <= {depth})") from None
        self.out_indices = take
        # as timm's feature wrapper: nothing after the last block used is kept (blocks, norm, pooling, head)
        model.prune_intermediate_layers(take, prune_norm=True, prune_head=True)
        self.model = model
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}))

        patch = max(model.patch_embed.patch_size)
        if pyramid:
            self.pyramid = SimplePyramid(model.embed_dim, pyramid_channels)
            self._take = take[-1:]
            info = [dict(module=f"pyramid.out.{i}", num_chs=pyramid_channels, reduction=_stride(patch, s))
                    for i, s in enumerate(SimplePyramid.scales)]
            self.feature_info = FeatureInfo(info, range(len(info)))
        else:
            self.pyramid = None
            self._take = take
            info = [dict(module=f"blocks.{i}", num_chs=model.embed_dim, reduction=patch) for i in range(depth)]
            self.feature_info = FeatureInfo(info, take)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = self.model.forward_intermediates(x, indices=self._take, intermediates_only=True)
        return maps if self.pyramid is None else self.pyramid(maps[-1])


class FPNBackbone(nn.Module):
    """A torchvision detection backbone: a FeatureBackbone's maps through torchvision's FeaturePyramidNetwork.

    (B, C, H, W) -> OrderedDict {'0': ..., 'k-1': ..., 'pool': ...} of (B, out_channels, ·, ·) maps, with the
    ``out_channels`` attribute FasterRCNN / MaskRCNN / RetinaNet read. torchvision's transform resizes and
    pads every batch to its own size, so the encoder must be built with ``dynamic_img_size=True``.
    """

    def __init__(self, features: FeatureBackbone, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        if not features.model.dynamic_img_size:
            raise ValueError("FPNBackbone: build the backbone with dynamic_img_size=True (torchvision's detection "
                             "transform resizes and pads each batch to its own size)")
        self.body = features
        self.fpn = FeaturePyramidNetwork(features.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> List[str]:
        """Names of the maps before the extra 'pool' level (for MultiScaleRoIAlign)."""
        return [str(i) for i in range(len(self.body.feature_info.out_indices))]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict(zip(self.featmap_names, self.body(x))))
