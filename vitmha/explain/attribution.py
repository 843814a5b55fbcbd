"""Attributions of the input through Captum (``captum.attr``), brought onto the patch grid; each
``fn(model, backbone, x, target, ...) -> (gh, gw)``. Hidden patches show the same baseline in every method:
the image's per-channel mean colour (:func:`vitmha.explain.target.baseline_image`), the deletion curve's fill.

- ``ig``: ``IntegratedGradients`` (Sundararajan, Taly & Yan, 2017) of the target score (the class logit) along
  the straight path from the baseline to the input, midpoint rule (``riemann_middle``) with 32 points, summed
  over the channels and pixels of each patch. The patch sums add up to score(x) - score(baseline)
  (completeness), so a patch's value estimates what replacing it with the baseline costs.
- ``occlusion``: ``Occlusion``: the drop in the target probability when a patch-sized square (stride one
  patch) shows the baseline; with ``window`` > 1 each patch gets the mean drop of the squares covering it.
- ``lime``: ``Lime`` (Ribeiro, Singh & Guestrin, 2016) with one feature per patch: ``samples`` random subsets
  of the patches shown (each patch kept with probability ½, the rest showing the baseline), the target
  probability of each, weighted by Captum's default similarity (an exponential kernel, width 1, on the cosine
  distance to the image) and fitted by ridge regression (α = 1, the surrogate of the ``lime`` package); the
  map is each patch's coefficient. (Captum's default surrogate, Lasso with α = 0.01, left 12 of the 196
  patches of chelsea.jpg non-zero at 500 samples with the real ViT-Ti, the rest tied at zero: no ranking.)
- ``kernelshap``: ``KernelShap`` (Lundberg & Lee, 2017) with the same features and baseline: Shapley values
  of the patches for the target probability, estimated from ``samples`` coalitions drawn by the Shapley
  kernel; they add up to prob(x) - prob(baseline).

LIME and KernelSHAP draw their samples from torch's generators seeded with ``seed`` inside a fork of the
random state (the caller's state is left as it was), so a map is reproducible. The model runs on batches of
``batch_size`` perturbed images.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitmha.explain.hooks import grid_of, record
from vitmha.explain.target import Target, baseline_image

__all__ = ["ig_map", "occlusion_map", "lime_map", "kernelshap_map", "DEFAULT_SAMPLES", "patch_mask"]

#: samples LIME and KernelSHAP draw by default (each one forward of the model): about 2.5 per patch of a
#: 14 × 14 grid; raise it for finer grids or steadier maps
DEFAULT_SAMPLES = 500


def _patch(backbone: nn.Module) -> Tuple[int, int]:
    ph, pw = backbone.patch_embed.patch_size
    return int(ph), int(pw)


def patch_mask(grid: Tuple[int, int], patch: Tuple[int, int], size: Tuple[int, int],
               device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(1, 1, H, W) feature ids for Captum: patch (i, j) of the (gh, gw) grid is feature ``i * gw + j``
    (the last row and column cut to the image where the model pads it to whole patches)."""
    (gh, gw), (ph, pw), (H, W) = grid, patch, size
    ids = torch.arange(gh * gw, device=device).view(gh, gw)
    return ids.repeat_interleave(ph, 0).repeat_interleave(pw, 1)[:H, :W][None, None]


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Captum's samplers draw from torch's global generators: seed them, and restore them afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def ig_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target, steps: int = 32,
           baseline: str = "mean", batch_size: int = 16) -> torch.Tensor:
    """Integrated gradients (Captum) from ``baseline`` (see :func:`baseline_image`: 'mean', 'blur' or 'zero')
    to ``x``, midpoint rule with ``steps`` points, summed over channels and over the pixels of each patch:
    (gh, gw). The map sums to score(x) - score(baseline) up to the quadrature error."""
    from captum.attr import IntegratedGradients

    if steps < 2:
        raise ValueError(f"steps must be >= 2 (Captum's midpoint rule), got {steps}")
    ph, pw = _patch(backbone)
    x = x.detach()
    x0 = baseline_image(x, baseline, (ph, pw)).detach()
    ig = IntegratedGradients(lambda t: target.score(model(t)))
    with torch.enable_grad(), record(backbone) as rec:
        attribution = ig.attribute(x, baselines=x0, n_steps=steps, method="riemann_middle",
                                   internal_batch_size=batch_size)
    if rec.grid is None:
        raise ValueError("the model never ran its backbone's patch embedding")
    (gh, gw), (H, W) = rec.grid, x.shape[-2:]
    a = F.pad(attribution[0].double().sum(0), (0, gw * pw - W, 0, gh * ph - H))    # (gh*ph, gw*pw)
    return a.view(gh, ph, gw, pw).sum((1, 3)).float().cpu()


def occlusion_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target,
                  window: int = 1, batch_size: int = 32) -> torch.Tensor:
    """Occlusion (Captum): the drop in the target probability when a ``window``×``window``-patch square (stride
    one patch) shows the image's per-channel mean; each patch gets the mean drop of the squares covering it:
    (gh, gw)."""
    from captum.attr import Occlusion

    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    gh, gw = grid_of(model, backbone, x)
    ph, pw = _patch(backbone)
    C, H, W = x.shape[1:]
    # the squares tile whole patches; where the model pads the image, the padding is cut off again before the
    # model sees it, so the model pads as it always does
    xp = F.pad(x.detach(), (0, gw * pw - W, 0, gh * ph - H))
    fill = x.detach().mean((-2, -1), keepdim=True).expand_as(xp).contiguous()
    occlusion = Occlusion(lambda t: target.prob(model(t[..., :H, :W])))
    with torch.no_grad():
        attribution = occlusion.attribute(xp, sliding_window_shapes=(C, min(window, gh) * ph, min(window, gw) * pw),
                                          strides=(C, ph, pw), baselines=fill, perturbations_per_eval=batch_size)
    return attribution[0, 0, ::ph, ::pw].float().cpu()  # every pixel of a patch lies in the same squares


def _surrogate_inputs(model: nn.Module, backbone: nn.Module, x: torch.Tensor,
                      samples: int) -> Tuple[Tuple[int, int], torch.Tensor, torch.Tensor]:
    """(patch grid, feature mask (1, 1, H, W), mean-colour baseline) for LIME and KernelSHAP."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    grid = grid_of(model, backbone, x)
    mask = patch_mask(grid, _patch(backbone), tuple(x.shape[-2:]), x.device)
    return grid, mask, baseline_image(x.detach(), "mean", _patch(backbone))


def lime_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target,
             samples: int = DEFAULT_SAMPLES, seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """LIME (Captum's ``Lime``, one feature per patch, hidden patches showing the image's mean colour, ridge
    surrogate with α = 1) of the target probability from ``samples`` draws seeded with ``seed``: (gh, gw)."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    grid, mask, x0 = _surrogate_inputs(model, backbone, x, samples)
    lime = Lime(lambda t: target.prob(model(t)), interpretable_model=SkLearnRidge(alpha=1.0))
    with torch.no_grad(), _seeded(seed, x.device):
        coef = lime.attribute(x.detach(), baselines=x0, feature_mask=mask, n_samples=samples,
                              perturbations_per_eval=batch_size, return_input_shape=False)
    return coef.reshape(grid).float().cpu()


def kernelshap_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target,
                   samples: int = DEFAULT_SAMPLES, seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """KernelSHAP (Captum's ``KernelShap``, one feature per patch, hidden patches showing the image's mean
    colour) of the target probability from ``samples`` coalitions seeded with ``seed``: (gh, gw), summing to
    prob(x) - prob(baseline)."""
    from captum.attr import KernelShap

    grid, mask, x0 = _surrogate_inputs(model, backbone, x, samples)
    if grid[0] * grid[1] < 2:
        raise ValueError("kernelshap needs at least 2 patches; the input is a single patch")
    shap = KernelShap(lambda t: target.prob(model(t)))
    with torch.no_grad(), _seeded(seed, x.device):
        values = shap.attribute(x.detach(), baselines=x0, feature_mask=mask, n_samples=samples,
                                perturbations_per_eval=batch_size, return_input_shape=False)
    return values.reshape(grid).float().cpu()
