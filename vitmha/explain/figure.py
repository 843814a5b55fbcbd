"""The tool's picture: the image, then one relevance overlay per method, side by side."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from vitmha.visualize import PathLike, _pyplot, _save


def _cells(m: torch.Tensor, size) -> np.ndarray:
    """(gh, gw) relevance -> (H, W) in [0, 1], its positive part over its maximum, one flat cell per patch."""
    m = m.detach().float().cpu().clamp_min(0)
    m = m / m.max().clamp_min(1e-12)
    return F.interpolate(m[None, None], size=size, mode="nearest")[0, 0].numpy()


def save_explanation_figure(image: np.ndarray, maps: Mapping[str, torch.Tensor], path: PathLike, title: str = "",
                            notes: Optional[Dict[str, str]] = None, cmap: str = "inferno") -> str:
    """One PNG row: ``image`` (H, W, 3) uint8 | each map (gh, gw) over it, one flat cell per patch, its
    positive part scaled to [0, 1]; ``notes`` adds a line under a method's name (e.g. its deletion AUC)."""
    plt = _pyplot()
    H, W = image.shape[:2]
    panels = [("image", None)] + list(maps.items())
    aspect = W / H
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * aspect * len(panels) + 0.2, 2.7 + (0.3 if title else 0)),
                             squeeze=False)
    for ax, (name, m) in zip(axes[0], panels):
        ax.imshow(image)
        if m is not None:
            ax.imshow(_cells(m, (H, W)), cmap=cmap, alpha=0.6, vmin=0, vmax=1)
        note = (notes or {}).get(name)
        ax.set_title(f"{name}\n{note}" if note else name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if title else 1))
    return _save(fig, path)
