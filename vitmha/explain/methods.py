"""Relevance maps on the patch grid: which patches a ViT's decision rests on.

Six methods, each ``fn(model, backbone, x, target) -> (gh, gw)`` for one normalised image ``x`` (1, C, H, W):

- ``attention``: the last block's attention (heads averaged) from the query to each patch.
- ``rollout``: attention rollout over the blocks (Abnar & Zuidema, 2020; ``vitmha.visualize.attention_rollout``).
- ``chefer``: gradient-weighted attention, the "generic attention explainability" rule of Chefer, Gur & Wolf
  (ICCV 2021, *Generic Attention-model Explainability*, eqs. 5-6): R = I, then per block
  R += mean_h((∂s/∂A ⊙ A)⁺) · R; not the LRP version of their CVPR 2021 paper.
- ``gradcam``: Grad-CAM (Selvaraju et al., 2017) on the tokens of the last block that ran, taken after its
  ``norm1`` (the layer pytorch-grad-cam's ViT recipe uses: the last block's output patch tokens do not reach a
  class-token head): the prefix (class/register) tokens dropped, the rest laid out on the patch grid of the
  actual input, channel weights = the gradient averaged over the patches, map = ReLU(Σ_c w_c t_c).
- ``ig``: integrated gradients (Sundararajan, Taly & Yan, 2017) of the target score along the straight path from
  a baseline image to the input (midpoint rule, 32 points), summed over the channels and pixels of each patch;
  the baseline is the image's per-channel mean colour, the image occlusion and the deletion curve fill with.
  The patch sums add up to score(x) - score(baseline) (completeness), so a patch's value estimates what
  replacing it with the baseline costs.
- ``occlusion``: model-agnostic; the drop in the target probability when a patch-sized square is filled with
  the image's mean colour.

The "query" of the attention methods is what the model's output reads: the class token for class-token
pooling, the mean over the patch tokens for average pooling (and for attention pooling, approximated so), and
the region's patches (weighted by their share of the region) for a segmentation target.

Everything is read from outside the model by forward hooks on named modules, for one forward of the model
itself: ``patch_embed.proj`` (the patch grid of the actual input), ``blocks.N.attn.attn_drop`` (the attention
probabilities; the blocks take their explicit attention path, same numbers, only while the hooks are on) and
``blocks.N.norm1`` (the tokens for Grad-CAM).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitmha.visualize import attention_rollout

__all__ = ["METHODS", "Target", "explain", "attention_map", "rollout_map", "chefer_map", "gradcam_map",
           "ig_map", "occlusion_map", "record", "patch_cells"]


# ----------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """What is explained: class ``class_index`` of a classifier's logits (B, K), or, with ``region`` (H, W)
    weights in [0, 1] over the output pixels, that class over the region of a segmenter's logits (B, K, H, W).

    ``score`` (B,) is what gradients are taken of: the class logit, or the class's logits summed over the
    region. ``prob`` (B,) is what occlusion and the deletion/insertion curves track: the class probability
    (softmax; sigmoid with ``multilabel``), or its mean over the region.
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


# ----------------------------------------------------------------------------------------------- hooks
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


def _tokens(backbone: nn.Module, rec: Recording) -> Tuple[int, int]:
    """(prefix tokens, prefix + patches) of the recorded forward."""
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    if rec.grid is None:
        raise ValueError("the model never ran its backbone's patch embedding")
    return prefix, prefix + rec.grid[0] * rec.grid[1]


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


def _query(backbone: nn.Module, target: Target, rec: Recording, n: int) -> torch.Tensor:
    """(N,) weights over the tokens: the query whose relevance row is read."""
    prefix, _ = _tokens(backbone, rec)
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


def _attentions(backbone: nn.Module, rec: Recording) -> List[torch.Tensor]:
    """The recorded (B, heads, N, N) maps cut to the image tokens (VPT prompt tokens, last, dropped)."""
    if not rec.attn:
        raise ValueError("no attention probabilities were recorded (did the model run its blocks?)")
    _, n = _tokens(backbone, rec)
    if rec.attn[0].shape[-1] < n:
        raise ValueError(f"attention has {rec.attn[0].shape[-1]} tokens, expected at least {n}")
    return [a[..., :n, :n] for a in rec.attn]


def _on_grid(row: torch.Tensor, backbone: nn.Module, rec: Recording) -> torch.Tensor:
    prefix, _ = _tokens(backbone, rec)
    return row[prefix:].reshape(rec.grid).detach().float().cpu()


def _with_grad(x: torch.Tensor) -> torch.Tensor:
    # gradients reach every hooked tensor even when the model's parameters are frozen
    return x.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------- methods
def attention_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The last block's attention probabilities, heads averaged, from the query to each patch: (gh, gw)."""
    with torch.no_grad(), record(backbone, attention=True) as rec:
        model(x)
    a = _attentions(backbone, rec)[-1][0].float().mean(0)            # (N, N)
    return _on_grid(_query(backbone, target, rec, a.shape[-1]).to(a) @ a, backbone, rec)


def rollout_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Attention rollout through every block that ran, read from the query: (gh, gw)."""
    with torch.no_grad(), record(backbone, attention=True) as rec:
        model(x)
    r = attention_rollout(_attentions(backbone, rec))[0]              # (N, N)
    return _on_grid(_query(backbone, target, rec, r.shape[-1]).to(r) @ r, backbone, rec)


def chefer_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Chefer et al.'s generic rule: R = I; per block R += mean_h((∂s/∂A ⊙ A)⁺) R; read from the query."""
    with torch.enable_grad(), record(backbone, attention=True) as rec:
        score = target.score(model(_with_grad(x))).sum()
        maps = _attentions(backbone, rec)
        grads = torch.autograd.grad(score, rec.attn)
    n = maps[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64)
    for a, g in zip(maps, grads):
        cam = (g[..., :n, :n] * a)[0].clamp_min(0).mean(0).double().cpu()  # (N, N)
        r = r + cam @ r
    return _on_grid(_query(backbone, target, rec, n).double() @ r, backbone, rec)


def gradcam_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Grad-CAM on the patch tokens of the last block that ran (its ``norm1`` output):
    ReLU(Σ_c mean_patches(∂s/∂t_c) t_c) on the patch grid."""
    with torch.enable_grad(), record(backbone, block_tokens=True) as rec:
        score = target.score(model(_with_grad(x))).sum()
        if not rec.block_tokens:
            raise ValueError("the model ran none of its backbone's blocks")
        tokens = rec.block_tokens[max(rec.block_tokens)]             # (1, N, D)
        grad, = torch.autograd.grad(score, tokens)
    prefix, n = _tokens(backbone, rec)
    if tokens.shape[1] != n:
        raise ValueError(f"the last block has {tokens.shape[1]} tokens, expected {prefix} prefix + "
                         f"{rec.grid[0]}×{rec.grid[1]} patches")
    t, g = tokens[0, prefix:].detach().double(), grad[0, prefix:].double()   # (gh*gw, D)
    cam = (t * g.mean(0)).sum(-1).clamp_min(0)
    return cam.reshape(rec.grid).float().cpu()


def ig_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target, steps: int = 32,
           baseline: str = "mean", batch_size: int = 16) -> torch.Tensor:
    """Integrated gradients from ``baseline`` ('mean': the image's per-channel mean colour; 'blur': its Gaussian
    blur, σ = half a patch; 'zero': zeros in the model's input space) to ``x``, midpoint rule with ``steps``
    points, summed over channels and over the pixels of each patch: (gh, gw). The map sums to
    score(x) - score(baseline) up to the quadrature error."""
    from vitmha.explain.faithfulness import baseline_image

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ph, pw = backbone.patch_embed.patch_size
    x0 = torch.zeros_like(x) if baseline == "zero" else baseline_image(x, baseline, (ph, pw))
    x, x0 = x.detach(), x0.detach()
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    total = torch.zeros_like(x, dtype=torch.float64)
    with torch.enable_grad(), record(backbone) as rec:
        for s in range(0, steps, batch_size):
            a = alphas[s:s + batch_size].to(x).view(-1, 1, 1, 1)
            xs = (x0 + a * (x - x0)).requires_grad_(True)
            grad, = torch.autograd.grad(target.score(model(xs)).sum(), xs)
            total += grad.double().sum(0, keepdim=True)
    attribution = ((x - x0).double() * total / steps)[0].sum(0)      # (H, W)
    return (patch_cells(attribution, rec.grid, (ph, pw)) * (ph * pw)).float().cpu()


def occlusion_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target,
                  window: int = 1, batch_size: int = 32) -> torch.Tensor:
    """Drop in the target probability when a ``window``×``window``-patch square (stride one patch) is filled
    with the image's per-channel mean; each patch gets the mean drop of the squares covering it: (gh, gw)."""
    with torch.no_grad(), record(backbone) as rec:
        p0 = target.prob(model(x)).float().cpu()
    gh, gw = rec.grid
    ph, pw = backbone.patch_embed.patch_size
    H, W = x.shape[-2:]
    fill = x.mean((-2, -1), keepdim=True)                             # (1, C, 1, 1)
    spots = [(i, j) for i in range(max(gh - window + 1, 1)) for j in range(max(gw - window + 1, 1))]
    drops = []
    with torch.no_grad():
        for s in range(0, len(spots), batch_size):
            chunk = spots[s:s + batch_size]
            xs = x.repeat(len(chunk), 1, 1, 1)
            for b, (i, j) in enumerate(chunk):
                xs[b, :, i * ph:min((i + window) * ph, H), j * pw:min((j + window) * pw, W)] = fill[0]
            drops.append(p0 - target.prob(model(xs)).float().cpu())
    drop = torch.cat(drops)
    total, count = torch.zeros(gh, gw), torch.zeros(gh, gw)
    for d, (i, j) in zip(drop, spots):
        total[i:i + window, j:j + window] += d
        count[i:i + window, j:j + window] += 1
    return total / count.clamp_min(1)


METHODS: Dict[str, Callable[..., torch.Tensor]] = {
    "attention": attention_map, "rollout": rollout_map, "chefer": chefer_map, "gradcam": gradcam_map,
    "ig": ig_map, "occlusion": occlusion_map,
}


def explain(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target,
            methods: Sequence[str] = tuple(METHODS)) -> Dict[str, torch.Tensor]:
    """{method: (gh, gw) relevance} for one image ``x`` (1, C, H, W); ``model`` (in eval mode) gives the
    logits, ``backbone`` is the ViT inside it. Raises ValueError for an unknown method."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(x.shape)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected one of {', '.join(METHODS)}")
    return {m: METHODS[m](model, backbone, x, target) for m in methods}
