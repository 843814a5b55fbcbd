"""Relevance read from the model's own blocks (attention probabilities, tokens and their gradients) through the
hooks of :mod:`vitmha.explain.hooks`; each ``fn(model, backbone, x, target) -> (gh, gw)``.

- ``attention``: the last block's attention (heads averaged) from the query to each patch.
- ``rollout``: attention rollout over the blocks (Abnar & Zuidema, 2020; ``vitmha.visualize.attention_rollout``).
- ``chefer``: gradient-weighted attention, the "generic attention explainability" rule of Chefer, Gur & Wolf
  (ICCV 2021, *Generic Attention-model Explainability*, eqs. 5-6): R = I, then per block
  R += mean_h((∂s/∂A ⊙ A)⁺) · R; not the LRP version of their CVPR 2021 paper. No maintained library has it.
- ``gradcam``: Grad-CAM (Selvaraju et al., 2017) on the tokens of the last block that ran, taken after its
  ``norm1`` (the layer pytorch-grad-cam's ViT recipe uses: the last block's output patch tokens do not reach a
  class-token head): the prefix (class/register) tokens dropped, the rest laid out on the patch grid of the
  actual input, channel weights = the gradient averaged over the patches, map = ReLU(Σ_c w_c t_c).

Grad-CAM is vitmha's own code, not pytorch-grad-cam's ``GradCAM``: that library computes the same map (equal to
1e-7 of its maximum on the real ViT-Ti, checked with grad-cam 1.5.7) but returns it only min-max scaled and
resized to the input's pixels with OpenCV's bilinear interpolation, which blends neighbouring patches: the
per-patch values are lost and the patch order changes (Spearman 0.83-0.97 against the token-grid map on the
three sample photos, a different top ten on each), while the deletion/insertion curves rank patches. The
test suite pins both facts (the map against a hand-computed Grad-CAM, and the reordering of a bilinearly
upsampled one).

The "query" of the attention methods is what the model's output reads (:func:`vitmha.explain.hooks.query`).
"""
from __future__ import annotations

import torch
from torch import nn

from vitmha.explain.hooks import attentions, on_grid, query, record, tokens
from vitmha.explain.target import Target
from vitmha.visualize import attention_rollout

__all__ = ["attention_map", "rollout_map", "chefer_map", "gradcam_map"]


def _with_grad(x: torch.Tensor) -> torch.Tensor:
    # gradients reach every hooked tensor even when the model's parameters are frozen
    return x.detach().clone().requires_grad_(True)


def attention_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The last block's attention probabilities, heads averaged, from the query to each patch: (gh, gw)."""
    with torch.no_grad(), record(backbone, attention=True) as rec:
        model(x)
    a = attentions(backbone, rec)[-1][0].float().mean(0)             # (N, N)
    return on_grid(query(backbone, target, rec, a.shape[-1]).to(a) @ a, backbone, rec)


def rollout_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Attention rollout through every block that ran, read from the query: (gh, gw)."""
    with torch.no_grad(), record(backbone, attention=True) as rec:
        model(x)
    r = attention_rollout(attentions(backbone, rec))[0]               # (N, N)
    return on_grid(query(backbone, target, rec, r.shape[-1]).to(r) @ r, backbone, rec)


def chefer_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Chefer et al.'s generic rule: R = I; per block R += mean_h((∂s/∂A ⊙ A)⁺) R; read from the query."""
    with torch.enable_grad(), record(backbone, attention=True) as rec:
        score = target.score(model(_with_grad(x))).sum()
        maps = attentions(backbone, rec)
        grads = torch.autograd.grad(score, rec.attn)
    n = maps[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64)
    for a, g in zip(maps, grads):
        cam = (g[..., :n, :n] * a)[0].clamp_min(0).mean(0).double().cpu()  # (N, N)
        r = r + cam @ r
    return on_grid(query(backbone, target, rec, n).double() @ r, backbone, rec)


def gradcam_map(model: nn.Module, backbone: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Grad-CAM on the patch tokens of the last block that ran (its ``norm1`` output):
    ReLU(Σ_c mean_patches(∂s/∂t_c) t_c) on the patch grid."""
    with torch.enable_grad(), record(backbone, block_tokens=True) as rec:
        score = target.score(model(_with_grad(x))).sum()
        if not rec.block_tokens:
            raise ValueError("the model ran none of its backbone's blocks")
        toks = rec.block_tokens[max(rec.block_tokens)]               # (1, N, D)
        grad, = torch.autograd.grad(score, toks)
    prefix, n = tokens(backbone, rec)
    if toks.shape[1] != n:
        raise ValueError(f"the last block has {toks.shape[1]} tokens, expected {prefix} prefix + "
                         f"{rec.grid[0]}×{rec.grid[1]} patches")
    t, g = toks[0, prefix:].detach().double(), grad[0, prefix:].double()   # (gh*gw, D)
    cam = (t * g.mean(0)).sum(-1).clamp_min(0)
    return cam.reshape(rec.grid).float().cpu()
