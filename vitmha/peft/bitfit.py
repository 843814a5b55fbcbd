"""BitFit (Ben Zaken et al., 2022): fine-tune the bias terms only.

Every bias of the backbone is trained (the attention and MLP projections, the patch embedding, the norms'
shifts), nothing is added, and the result is a plain set of timm weights: nothing to merge.
"""
from __future__ import annotations

from torch import nn


def train_biases(model: nn.Module) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` named ``*.bias``."""
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
