"""What an explanation explains (:class:`Target`), the image that hidden patches show (:func:`baseline_image`),
and (H, W) masks cut into patch cells (:func:`patch_cells`): the pieces every method and every faithfulness
curve share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vitmha.robustness import gaussian_blur

__all__ = ["Target", "baseline_image", "patch_cells"]


@dataclass
class Target:
    """What is explained: class ``class_index`` of a classifier's logits (B, K), or, with ``region`` (H, W)
    weights in [0, 1] over the output pixels, that class over the region of a segmenter's logits (B, K, H, W).

    ``score`` (B,) is what gradients are taken of: the class logit, or the class's logits summed over the
    region. ``prob`` (B,) is what the perturbation methods and the deletion/insertion curves track: the class
    probability (softmax; sigmoid with ``multilabel``), or its mean over the region.
    """

    class_index: int
    region: Optional[torch.Tensor] = None
    multilabel: bool = False

    def _check(self, out: torch.Tensor) -> None:
        k = out.shape[1]
        if not 0 <= self.class_index < k:
            raise ValueError(f"class {self.class_index} is out of range for a model with {k} classes")
        if self.region is None and out.ndim != 2:
            raise ValueError(f"a class target needs logits (B, K); the model gave {tuple(out.shape)} (a segmenter "
                             "needs a region)")
        if self.region is not None and (out.ndim != 4 or out.shape[-2:] != self.region.shape):
            raise ValueError(f"region is {tuple(self.region.shape)}; the model gave logits {tuple(out.shape)}")

    def score(self, out: torch.Tensor) -> torch.Tensor:
        self._check(out)
        if self.region is None:
            return out[:, self.class_index]
        return (out[:, self.class_index] * self.region.to(out)).sum((-2, -1))

    def prob(self, out: torch.Tensor) -> torch.Tensor:
        self._check(out)
        if self.region is None:
            if self.multilabel:
                return out.float()[:, self.class_index].sigmoid()
            return out.float().softmax(-1)[:, self.class_index]
        region = self.region.to(out.device, torch.float32)
        p = out.float().softmax(1)[:, self.class_index]
        return (p * region).sum((-2, -1)) / region.sum().clamp_min(1e-12)


def baseline_image(x: torch.Tensor, kind: str, patch: Tuple[int, int]) -> torch.Tensor:
    """The image that hidden patches show: ``mean`` (each image's per-channel mean colour; what occlusion,
    LIME, KernelSHAP and integrated gradients start from, and the deletion curve's default fill), ``blur``
    (Gaussian, σ = half a patch: the insertion curve's start) or ``zero`` (zeros in the model's input space)."""
    if kind == "mean":
        return x.mean((-2, -1), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        return gaussian_blur(x, max(patch) / 2)
    if kind == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"baseline {kind!r}: expected 'mean', 'blur' or 'zero'")


def patch_cells(mask: torch.Tensor, grid: Tuple[int, int], patch: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(H, W) weights -> (gh, gw): each patch cell's mean. With ``patch`` the cells are the model's patches
    (``mask`` padded with zeros to whole patches, as the model pads); without, the image is cut into the grid
    evenly (``mask`` drawn on the original image of a resized input)."""
    m = mask.detach().float()[None, None]
    if patch is None:
        return F.adaptive_avg_pool2d(m, grid)[0, 0]
    ph, pw = patch
    m = F.pad(m, (0, grid[1] * pw - m.shape[-1], 0, grid[0] * ph - m.shape[-2]))
    return F.avg_pool2d(m, (ph, pw))[0, 0]
