"""Optimiser machinery shared by the tasks: parameter groups with layer-wise lr decay and no weight decay
on norms/biases/tokens, the optimisers (AdamW, SGD, LAMB) and a per-step warmup + cosine/poly schedule.

Weight decay is decided from each parameter's original name and shape. Wrappers rename parameters (FSDP's
``_fsdp_wrapped_module.``, activation checkpointing's ``_checkpoint_wrapped_module.``, ``torch.compile``'s
``_orig_mod.``): the names are cleaned of those. FSDP also reshapes them: with ``use_orig_params=True``
(Lightning's default) each parameter becomes a 1-D view of its shard, so ``ndim`` says nothing; pass the
shapes recorded before wrapping (:func:`param_shapes`; the tasks record them in ``setup``). With
``use_orig_params=False`` a whole wrapped block is one flat parameter, which no per-parameter rule can
split: :func:`param_groups` refuses it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

SCHEDULERS = ("cosine", "poly", "constant")
OPTIMIZERS = ("adamw", "sgd", "lamb")
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` without the parts FSDP, activation checkpointing and ``torch.compile`` insert."""
    for part in WRAPPER_PREFIXES:
        name = name.replace(part, "")
    return name


def _is_flat_param(name: str, param: torch.Tensor) -> bool:
    return bool(getattr(param, "_is_flat_param", False)) or name.endswith("_flat_param")


def _skip_weight_decay(name: str, ndim: int, no_decay_names: Iterable[str]) -> bool:
    # 1-D params are norm scales/shifts and biases; tokens and position embeddings are named by the modules.
    return ndim <= 1 or name.endswith(".bias") or name in no_decay_names


def _no_weight_decay_names(module: nn.Module) -> set:
    """Cleaned parameter names (relative to ``module``) that ``module`` or any of its submodules lists in
    its ``no_weight_decay()`` (the ViT its tokens, PEFT's prompts their tokens, Segmenter's decoder its
    class embeddings)."""
    names = set()
    for prefix, m in module.named_modules():
        if hasattr(m, "no_weight_decay"):
            names |= {clean_name(f"{prefix}.{n}" if prefix else n) for n in m.no_weight_decay()}
    return names


def _named(backbone: nn.Module, extra_modules: Sequence[nn.Module]) -> List[Tuple[str, str, int, nn.Parameter]]:
    """(group name as param_groups reports it, name relative to its module, module index (-1 = backbone),
    param) for every parameter once, names cleaned of wrapper prefixes."""
    out, seen = [], set()
    for i, module in [(-1, backbone)] + list(enumerate(extra_modules)):
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            rel = clean_name(name)
            out.append((rel if i < 0 else f"extra{i}.{rel}", rel, i, p))
    return out


def param_shapes(backbone: nn.Module, extra_modules: Sequence[nn.Module] = ()) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` under the names :func:`param_groups` uses, to record before a wrapper (FSDP)
    reshapes the parameters."""
    return {key: tuple(p.shape) for key, _, _, p in _named(backbone, extra_modules)}


def param_groups(
    backbone: nn.Module,
    extra_modules: Sequence[nn.Module] = (),
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    trainable_only: bool = False,
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> List[Dict[str, Any]]:
    """Optimiser parameter groups for a backbone plus head/decoder modules.

    Backbone params get ``lr * layer_decay ** (num_layer_ids - 1 - backbone.param_layer_id(name))``;
    ``extra_modules`` (heads, decoders) get scale 1.0. Params that are 1-D, named ``*.bias`` or listed by
    ``no_weight_decay()`` of any module (the backbone, a decoder, or a submodule of either) get weight
    decay 0. Each group carries ``lr_scale`` and a ``name`` such as ``"layer_3_decay"``. Frozen params are
    included so that unfreezing later needs no new optimizer, unless ``trainable_only`` (PEFT: what is
    frozen stays frozen, and no weight decay or lr scale is ever attached to it). ``shapes`` (from
    :func:`param_shapes` before wrapping) gives the original shapes; names are cleaned of wrapper prefixes.
    Raises ValueError for FSDP flat parameters (``use_orig_params=False``).
    """
    named = _named(backbone, extra_modules)
    flat = [key for key, _, _, p in named if _is_flat_param(key, p)]
    if flat:
        raise ValueError(
            f"cannot decide weight decay per parameter: {flat[0]} is an FSDP flat parameter (a whole wrapped "
            "module in one 1-D tensor, norms and matrices together); set use_orig_params: true in the FSDP "
            "strategy (trainer.strategy.init_args, Lightning's default)")
    no_decay = [_no_weight_decay_names(backbone)] + [_no_weight_decay_names(m) for m in extra_modules]
    use_layers = layer_decay != 1.0
    if use_layers and not (hasattr(backbone, "param_layer_id") and hasattr(backbone, "num_layer_ids")):
        raise TypeError(f"layer_decay={layer_decay} needs a backbone with param_layer_id()/num_layer_ids, "
                        f"got {type(backbone).__name__}")
    num_layers = backbone.num_layer_ids if use_layers else 1

    groups: Dict[Tuple[str, str], Dict[str, Any]] = {}

    def add(key_layer: str, scale: float, name: str, p: torch.Tensor, no_decay: bool) -> None:
        kind = "no_decay" if no_decay else "decay"
        key = (key_layer, kind)
        if key not in groups:
            groups[key] = {"name": f"{key_layer}_{kind}", "params": [], "param_names": [],
                           "lr_scale": scale, "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)

    for key, rel, i, p in named:
        if trainable_only and not p.requires_grad:
            continue
        ndim = len(shapes[key]) if shapes is not None and key in shapes else p.ndim
        skip = _skip_weight_decay(rel, ndim, no_decay[i + 1])
        if i < 0:
            layer_id = backbone.param_layer_id(rel) if use_layers else 0
            add(f"layer_{layer_id}", layer_decay ** (num_layers - 1 - layer_id), key, p, skip)
        else:
            add("head", 1.0, key, p, skip)
    return list(groups.values())


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    scheduler: str = "cosine",
    min_lr_ratio: float = 0.0,
    poly_power: float = 0.9,
) -> float:
    """Multiplier on the base lr at optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` steps, then cosine or poly decay to ``min_lr_ratio`` at ``total_steps``."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = (1.0 - progress) ** poly_power
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def steps_per_epoch(trainer: Any) -> Optional[float]:
    """Optimizer steps in one epoch of ``trainer``'s train loader, or None when it is unknown (iterable)."""
    n = trainer.num_training_batches
    if n is None or math.isinf(n):
        return None
    return math.ceil(n / trainer.accumulate_grad_batches)


def make_optimizer(name: str, groups: List[Dict[str, Any]], *, lr: float, momentum: float = 0.9,
                   nesterov: bool = False, betas: Tuple[float, float] = (0.9, 0.999),
                   fused: bool = True) -> torch.optim.Optimizer:
    """The optimiser ``name`` (``adamw``, ``sgd`` or ``lamb``) over ``groups``, whose ``lr`` and
    ``weight_decay`` entries it keeps. AdamW decays decoupled from the gradient; LAMB is timm's (Adam's update
    plus ``weight_decay * w``, scaled per tensor by the trust ratio in the groups with weight decay; no clipping
    of its own: the tasks clip the global norm); SGD adds ``weight_decay * w`` to the gradient (L2), with
    ``momentum`` and optionally Nesterov momentum. ``fused=False`` keeps AdamW off its fused CPU kernel (mixed
    precision: Lightning's AMP plugins cannot clip the gradients of an optimizer that unscales them itself).
    Raises ValueError for an unknown name or Nesterov without momentum."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw":
        # on the CPU torch's default is a Python loop over the tensors; its fused kernel does the same update
        # ~3x faster (benchmarks/optimizer.py: 5.1 vs 16.2 ms a step for a ViT-Ti). Plain CPU parameters
        # only: GPUs keep torch's default, FSDP's flat parameters the loop.
        fused = fused and all(type(p) is nn.Parameter and p.device.type == "cpu"
                              for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True if fused else None)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=tuple(betas), max_grad_norm=None)
    if nesterov and momentum <= 0:
        raise ValueError(f"nesterov needs momentum > 0, got momentum={momentum}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def build_optimizer(
    module: Any,
    groups: List[Dict[str, Any]],
    *,
    lr: float,
    scheduler: str,
    warmup_epochs: float,
    warmup_steps: Optional[int],
    min_lr: float,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Tuple[float, float] = (0.9, 0.999),
) -> Dict[str, Any]:
    """The optimiser (:func:`make_optimizer`) over ``groups`` and a LambdaLR stepped every optimizer step,
    in the dict form that ``LightningModule.configure_optimizers`` returns. Total steps come from
    ``module.trainer.estimated_stepping_batches``; ``warmup_steps`` overrides ``warmup_epochs``. Under a mixed
    precision (``trainer.precision`` ``*-mixed``) AdamW is not fused."""
    trainer = module.trainer
    mixed = str(getattr(trainer, "precision", "")).endswith("-mixed")
    opt = make_optimizer(optimizer, groups, lr=lr, momentum=momentum, nesterov=nesterov, betas=betas,
                         fused=not mixed)
    total = int(trainer.estimated_stepping_batches)
    if warmup_steps is None:
        per_epoch = steps_per_epoch(trainer)
        if per_epoch is None and warmup_epochs > 0:
            raise ValueError("warmup_epochs needs a sized train dataloader; set warmup_steps instead")
        warmup_steps = int(round(warmup_epochs * (per_epoch or 0)))
    # never warm up for the whole run: at least the last half decays
    warmup = min(int(warmup_steps), max(0, total // 2))
    ratio = min_lr / lr if lr > 0 else 0.0

    def fn(step: int) -> float:
        return lr_factor(step, total_steps=total, warmup_steps=warmup, scheduler=scheduler, min_lr_ratio=ratio)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
