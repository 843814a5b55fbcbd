"""Pictures for the tools: colour palettes and mask overlays, attention maps and rollout, and the plots of
the evaluation reports. Plotting uses matplotlib's Agg backend (no display needed); every ``save_*``
function writes one PNG and returns its path.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------- colours
def segmentation_palette(num_classes: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (num_classes, 3) uint8, class 0 black, distinct colours after it."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        r = g = b = 0
        cid = c
        for shift in range(7, -1, -1):
            r |= ((cid >> 0) & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
        palette[c] = (r, g, b)
    return palette


def colorize_mask(mask: np.ndarray, ignore_index: Optional[int] = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 palette colours; ``ignore_index`` pixels white."""
    mask = np.asarray(mask).astype(np.int64)
    out = segmentation_palette()[mask % 256]
    if ignore_index is not None:
        out[mask == ignore_index] = 255
    return out


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
                 ignore_index: Optional[int] = 255) -> np.ndarray:
    """(H, W, 3) uint8 image with the palette colour of each class of ``mask`` (H, W) blended over it.

    Class 0 (background) and ``ignore_index`` pixels are left as they are.
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}×{mask.shape[0]}, image is {image.shape[1]}×{image.shape[0]} (W×H)")
    colour = colorize_mask(mask, ignore_index).astype(np.float32)
    base = image.astype(np.float32)
    keep = (mask == 0) | ((mask == ignore_index) if ignore_index is not None else False)
    out = np.where(keep[..., None], base, (1 - alpha) * base + alpha * colour)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) uint8 image."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: PathLike, dpi: int = 100) -> str:
    """``fig`` written to ``path`` (format from its extension) through a temporary file, then closed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=os.path.splitext(path)[1].lstrip(".").lower() or "png")
        os.replace(tmp, path)
    finally:
        _pyplot().close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ----------------------------------------------------------------------------------------------- attention
def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through the given layers, first to last.

    Each (B, heads, N, N) map is fused over heads (mean, or max/min), the identity is added for the
    residual connection and rows are renormalised; the layers are multiplied through:
    R = Â_L ... Â_2 Â_1. Returns (B, N, N): row i says how much each input token flows into output token i.
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one attention map")
    result = None
    for attn in attentions:
        a = attn.float()
        a = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[head_fusion]  # (B, N, N)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def query_index(backbone, grid: Tuple[int, int], patch: Optional[Tuple[int, int]] = None) -> int:
    """Token index whose attention is shown: the class token, or patch (row, col) of the grid.

    Models without a class token need a patch; the default is the centre patch.
    """
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    if patch is None and getattr(backbone, "cls_token", None) is not None:
        return 0
    gh, gw = grid
    i, j = patch if patch is not None else (gh // 2, gw // 2)
    if not (0 <= i < gh and 0 <= j < gw):
        raise ValueError(f"patch ({i}, {j}) is outside the {gh}×{gw} patch grid")
    return prefix + i * gw + j


def attention_maps(backbone, x: torch.Tensor, layer: int = -1, patch: Optional[Tuple[int, int]] = None
                   ) -> dict:
    """Per-head attention of the query token in block ``layer`` and the rollout over all blocks.

    ``x``: one normalised image (1, 3, H, W). Uses ``backbone.forward_attention`` on this very model.
    Returns ``{"heads": (heads, gh, gw), "rollout": (gh, gw), "grid": (gh, gw), "query": token index,
    "query_name": "CLS token" or "patch (i, j)", "layer": block index}`` with the prefix tokens
    (class/register) dropped from the maps.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, 3, H, W), got {tuple(x.shape)}")
    depth = len(backbone.blocks)
    layer_idx = layer + depth if layer < 0 else layer
    if not 0 <= layer_idx < depth:
        raise ValueError(f"layer {layer} is out of range for a model with {depth} blocks")
    ph, pw = backbone.patch_embed.patch_size
    grid = (-(-x.shape[-2] // ph), -(-x.shape[-1] // pw)) if getattr(backbone.patch_embed, "dynamic_pad", False) \
        else (x.shape[-2] // ph, x.shape[-1] // pw)
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    q = query_index(backbone, grid, patch)
    with torch.no_grad():
        attns = backbone.forward_attention(x, indices=list(range(depth)))  # each (1, heads, N, N)
    n = attns[0].shape[-1]
    if n != prefix + grid[0] * grid[1]:
        raise ValueError(f"attention has {n} tokens, expected {prefix} prefix + {grid[0]}×{grid[1]} patches")
    heads = attns[layer_idx][0, :, q, prefix:].reshape(-1, *grid)
    rollout = attention_rollout(attns)[0, q, prefix:].reshape(*grid)
    qpatch = None if q < prefix else ((q - prefix) // grid[1], (q - prefix) % grid[1])
    name = "CLS token" if qpatch is None else f"patch {qpatch}"
    return {"heads": heads.cpu(), "rollout": rollout.cpu(), "grid": grid, "query": q, "query_name": name,
            "query_patch": qpatch, "layer": layer_idx}


def _upsample(m: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    m = m.float()
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def save_attention_figure(image: np.ndarray, maps: dict, path: PathLike, title: str = "",
                          max_cols: int = 6, cmap: str = "inferno") -> str:
    """One PNG: original image | rollout overlay | one panel per head of the chosen layer."""
    plt = _pyplot()
    heads = maps["heads"]
    H, W = image.shape[:2]
    panels = [("image", None), ("rollout (all layers)", maps["rollout"])]
    who = maps.get("query_name", f"token {maps['query']}")
    panels += [(f"layer {maps['layer']} head {h}", heads[h]) for h in range(heads.shape[0])]
    cols = min(max_cols, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    qpatch = maps.get("query_patch")
    gh, gw = maps["grid"]
    for ax, (name, m) in zip(axes.flat, panels):
        ax.imshow(image)
        if m is not None:
            ax.imshow(_upsample(m, (H, W)), cmap=cmap, alpha=0.6, vmin=0, vmax=1)
        if qpatch is not None:  # outline the query patch
            from matplotlib.patches import Rectangle

            ph, pw = H / gh, W / gw
            ax.add_patch(Rectangle((qpatch[1] * pw - 0.5, qpatch[0] * ph - 0.5), pw, ph, fill=False,
                                   edgecolor="cyan", lw=1.2))
        ax.set_title(name, fontsize=8)
    fig.suptitle(f"{title}: attention of the {who}" if title else f"attention of the {who}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- reports
def save_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: PathLike,
                          normalize: bool = True, title: str = "confusion matrix") -> str:
    """Confusion matrix (rows = true class, columns = prediction) as a PNG, counts in the cells."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    size = min(2 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else "count")
    ticks = np.arange(k)
    labels = [str(c) for c in class_names]
    ax.set_xticks(ticks, labels, rotation=90 if k > 8 else 0, fontsize=7 if k > 20 else 9)
    ax.set_yticks(ticks, labels, fontsize=7 if k > 20 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    fig.tight_layout()
    return _save(fig, path)


def save_roc_curves(curves: Sequence[Tuple[np.ndarray, np.ndarray]], aurocs: Sequence[float],
                    class_names: Sequence[str], path: PathLike, title: str = "one-vs-rest ROC") -> str:
    """One-vs-rest ROC curves, one line per class labelled with its AUROC."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for c, ((fpr, tpr), auc, name) in enumerate(zip(curves, aurocs, class_names)):
        ax.plot(fpr, tpr, color=cmap(c % cmap.N), lw=1.2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7 if len(curves) > 10 else 8, loc="lower right", ncol=2 if len(curves) > 15 else 1)
    fig.tight_layout()
    return _save(fig, path)


def save_segmentation_samples(samples: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], path: PathLike,
                              ignore_index: Optional[int] = 255, class_names: Optional[Sequence[str]] = None) -> str:
    """A grid with one row per sample: image | truth overlay | prediction overlay."""
    plt = _pyplot()
    if not samples:
        raise ValueError("no samples to draw")
    rows = len(samples)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for r, (image, truth, pred) in enumerate(samples):
        for c, (name, panel) in enumerate((("image", image), ("truth", overlay_mask(image, truth, 0.6, ignore_index)),
                                           ("prediction", overlay_mask(image, pred, 0.6, ignore_index)))):
            ax = axes[r, c]
            ax.imshow(panel, interpolation="nearest")
            ax.axis("off")
            if r == 0:
                ax.set_title(name, fontsize=9)
    if class_names:
        pal = segmentation_palette(len(class_names)) / 255.0
        from matplotlib.patches import Patch

        handles = [Patch(color=pal[i], label=str(n)) for i, n in enumerate(class_names) if i > 0]
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if class_names else 0, 1, 1))
    return _save(fig, path)


def label_names(names: Optional[Sequence[str]], k: int) -> List[str]:
    """``names`` if it has ``k`` entries, else "0", "1", ..."""
    return [str(n) for n in names] if names and len(names) == k else [str(i) for i in range(k)]
