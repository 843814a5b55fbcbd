"""Optimiser machinery shared by the tasks: AdamW parameter groups with layer-wise lr decay and
no weight decay on norms/biases/tokens, and a per-step warmup + cosine/poly schedule."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

SCHEDULERS = ("cosine", "poly", "constant")


def _skip_weight_decay(name: str, param: torch.Tensor, no_decay_names: Iterable[str]) -> bool:
    # 1-D params are norm scales/shifts and biases; tokens and position embeddings are named by the backbone.
    return param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names


def _no_weight_decay_names(module: nn.Module) -> set:
    """Parameter names (relative to ``module``) that ``module`` or any of its submodules lists in its
    ``no_weight_decay()`` (the ViT its tokens, PEFT's prompts their tokens)."""
    names = set()
    for prefix, m in module.named_modules():
        if hasattr(m, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in m.no_weight_decay()}
    return names


def param_groups(
    backbone: nn.Module,
    extra_modules: Sequence[nn.Module] = (),
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    trainable_only: bool = False,
) -> List[Dict[str, Any]]:
    """AdamW parameter groups for a backbone plus head/decoder modules.

    Backbone params get ``lr * layer_decay ** (num_layer_ids - 1 - backbone.param_layer_id(name))``;
    ``extra_modules`` (heads, decoders) get scale 1.0. Params that are 1-D, named ``*.bias`` or listed by
    ``no_weight_decay()`` of the backbone or one of its submodules get weight decay 0. Each group carries
    ``lr_scale`` and a ``name`` such as ``"layer_3_decay"``. Frozen params are included so that unfreezing
    later needs no new optimizer, unless ``trainable_only`` (PEFT: what is frozen stays frozen, and no
    weight decay or lr scale is ever attached to it).
    """
    no_decay_names = _no_weight_decay_names(backbone)
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

    for name, p in backbone.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        layer_id = backbone.param_layer_id(name) if use_layers else 0
        scale = layer_decay ** (num_layers - 1 - layer_id)
        add(f"layer_{layer_id}", scale, name, p, _skip_weight_decay(name, p, no_decay_names))

    seen = {id(p) for p in backbone.parameters()}
    for i, module in enumerate(extra_modules):
        for name, p in module.named_parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            add("head", 1.0, f"extra{i}.{name}", p, _skip_weight_decay(name, p, ()))
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


def build_optimizer(
    module: Any,
    groups: List[Dict[str, Any]],
    *,
    lr: float,
    scheduler: str,
    warmup_epochs: float,
    warmup_steps: Optional[int],
    min_lr: float,
) -> Dict[str, Any]:
    """AdamW over ``groups`` and a LambdaLR stepped every optimizer step, in the dict form that
    ``LightningModule.configure_optimizers`` returns. Total steps come from
    ``module.trainer.estimated_stepping_batches``; ``warmup_steps`` overrides ``warmup_epochs``."""
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    trainer = module.trainer
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

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
