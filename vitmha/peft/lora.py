"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) on a ViT's linear layers, with q, k and v apart.

timm's (and vitmha's) attention computes q, k and v with one fused ``qkv`` Linear whose output rows are
[q | k | v]. :class:`LoRALinear` keeps that layer whole: it *is* the ``nn.Linear`` (same ``weight`` and
``bias`` parameters, so the state-dict keys stay ``blocks.N.attn.qkv.weight``) and adds, for each targeted
row block, its own low-rank factors ``lora_A.<target>`` (r, in) and ``lora_B.<target>`` (rows, r). Rows that
no target covers get exactly nothing added, so LoRA on q and v leaves k untouched.

    y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ              LoRA, s = alpha / r (rsLoRA: alpha / sqrt r)
    y = g ⊙ (x Wᵀ + s · drop(x) Aᵀ Bᵀ) + b       DoRA, g = m / ‖W + s B A‖ per output row

A starts random (Kaiming-uniform) and B at zero, so a fresh LoRA layer equals the base layer. DoRA's magnitude
m starts as the row norms of W (g = 1); the norm is detached from the graph, as the DoRA paper recommends (the
gradient it drops is small and keeping it would hold a weight-sized tensor per layer for backward).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitmha.peft.spec import PeftError

Slices = Dict[str, Tuple[int, int]]


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (the base, frozen by the caller) plus trained low-rank updates of chosen output rows.

    Args:
        base: the layer to adapt; its weight and bias parameters are taken over, not copied.
        slices: target name -> (first row, end row) of the output it adapts, e.g. {"q": (0, 192)}.
        r: rank of each update.
        scaling: the factor s on B A.
        dropout: dropout on the input of the low-rank branch.
        dora: learn a per-row magnitude as well (DoRA).
    """

    def __init__(self, base: nn.Linear, slices: Slices, *, r: int, scaling: float, dropout: float = 0.0,
                 dora: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight exists already
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.slices = dict(slices)
        self.r, self.scaling = r, scaling
        w = base.weight
        like = dict(dtype=w.dtype, device=w.device)
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(r, self.in_features, **like)) for n in slices})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(b - a, r, **like))
                                        for n, (a, b) in slices.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as the LoRA reference code
        self.lora_magnitude: Optional[nn.ParameterDict] = None
        if dora:
            with torch.no_grad():
                self.lora_magnitude = nn.ParameterDict({n: nn.Parameter(w[a:b].norm(dim=1))
                                                        for n, (a, b) in slices.items()})
        self.lora_dropout = nn.Dropout(dropout)

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A (R, in), B (out, R)) with R = r x targets: B holds each target's B in its rows and its own
        columns and zeros elsewhere, so B A is the whole update of the weight (zero on untargeted rows)."""
        A = torch.cat(list(self.lora_A.values()))
        B = A.new_zeros(self.out_features, A.shape[0])
        for i, (name, (a, b)) in enumerate(self.slices.items()):
            B[a:b, i * self.r:(i + 1) * self.r] = self.lora_B[name]
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """s · B A: (out, in)."""
        A, B = self.factors()
        return self.scaling * (B @ A)

    def dora_scale(self) -> torch.Tensor:
        """g (out,): m / ‖W + s B A‖ on the targeted rows, 1 on the others."""
        with torch.no_grad():  # the norm is a constant for backward (see the module docstring)
            norm = (self.weight + self.delta_weight()).norm(dim=1)
        g = torch.ones_like(norm)
        for name, (a, b) in self.slices.items():
            g[a:b] = self.lora_magnitude[name] / norm[a:b]
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        delta = F.linear(F.linear(self.lora_dropout(x), A), B) * self.scaling    # (..., out), rank R in between
        if self.lora_magnitude is None:
            return F.linear(x, self.weight, self.bias) + delta
        y = self.dora_scale() * (F.linear(x, self.weight) + delta)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer (without dropout): W + s B A, times g for DoRA; the
        bias parameter is shared."""
        w = self.weight + self.delta_weight()
        if self.lora_magnitude is not None:
            w = self.dora_scale()[:, None] * w
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        kind = "dora" if self.lora_magnitude is not None else "lora"
        return (f"{super().extra_repr()}, {kind} r={self.r} scaling={self.scaling:g} on "
                + ", ".join(f"{n}[{a}:{b}]" for n, (a, b) in self.slices.items()))


#: the layer of a block that each target adapts
TARGET_LAYERS = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1",
                 "fc2": "mlp.fc2"}


def _target_slices(block: nn.Module, targets, where: str) -> Dict[str, Slices]:
    """Layer path in ``block`` -> the output rows each target adapts (q, k, v: a third of qkv's rows each)."""
    out: Dict[str, Slices] = {}
    for t in targets:
        path = TARGET_LAYERS[t]
        try:
            layer = block.get_submodule(path)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise PeftError(f"peft.targets: {t} needs a Linear at {where}.{path}; this model's block has "
                            f"{type(layer).__name__ if layer is not None else 'none'} there")
        if path == "attn.qkv":
            dim, i = layer.out_features // 3, "qkv".index(t)
            out.setdefault(path, {})[t] = (i * dim, (i + 1) * dim)
        else:
            out[path] = {t: (0, layer.out_features)}
    return out


def add_lora(model: nn.Module, *, targets, r: int, scaling: float, dropout: float, dora: bool) -> None:
    """Replace the targeted Linear layers of every block of ``model`` (a VisionTransformer) by LoRALinear.
    Raises PeftError naming the target when a block has no such layer (e.g. fc1 in a SwiGLU MLP)."""
    for i, block in enumerate(model.blocks):
        for path, slices in _target_slices(block, targets, f"blocks.{i}").items():
            parent, name = path.rsplit(".", 1)
            layer = LoRALinear(block.get_submodule(path), slices, r=r, scaling=scaling, dropout=dropout, dora=dora)
            setattr(block.get_submodule(parent), name, layer)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear of ``model`` into a plain nn.Linear, in place; returns how many were merged."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.merged())
    return len(layers)
