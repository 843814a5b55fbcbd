"""Parameter-efficient fine-tuning (PEFT) of a vitmha ViT: train a few parameters, keep one frozen backbone.

    spec = parse_peft({"method": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]})
    apply_peft(vit, spec)          # freezes the backbone but its head, adds LoRA to q and v of every block
    merge_peft(vit)                # folds LoRA / DoRA into the weights: a plain ViT that timm can load
    save_trainable(vit, "lora.safetensors", metadata)   # only what was trained: a few hundred KB for ViT-Ti
    load_trainable(vit, "lora.safetensors")              # onto the same base weights with the same spec

Methods (``method:``): ``lora`` and ``dora`` (targets q, k, v, proj, fc1, fc2: vitmha.peft.lora), ``bitfit``
(biases), ``vpt`` (VPT-deep prompts: vitmha.peft.prompts), ``adapter`` (AdaptFormer: vitmha.peft.adapters),
and the two ends ``linear_probe`` (head only) and ``full``. The tasks take the spec as their ``peft`` option.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from vitmha.peft.adapters import ParallelAdapter, add_adapters
from vitmha.peft.bitfit import train_biases
from vitmha.peft.lora import LoRALinear, add_lora, merge_lora
from vitmha.peft.prompts import BlockPrompts, add_prompts
from vitmha.peft.spec import METHODS, TARGETS, PeftError, PeftSpec, parse_peft

__all__ = [
    "METHODS", "TARGETS", "PeftError", "PeftSpec", "LoRALinear", "BlockPrompts", "ParallelAdapter",
    "parse_peft", "apply_peft", "merge_peft", "trainable_state_dict", "save_trainable", "read_trainable",
    "load_trainable", "task_from_trainable", "parameter_counts",
]

#: the modules that PEFT adds and that a plain ViT has no place for
UNMERGEABLE = (BlockPrompts, ParallelAdapter)


def apply_peft(model: nn.Module, spec: Union[PeftSpec, Mapping[str, Any], None]) -> nn.Module:
    """Set ``model`` (a VisionTransformer) up for ``spec``, in place, and return it: every parameter frozen
    except the method's own (added, or the biases for bitfit), the classifier ``head`` and, with
    ``norms: true``, the norm layers. ``full`` (or None) changes nothing; ``linear_probe`` leaves only the head
    trainable. Raises PeftError for a bad spec or a model that already has PEFT layers."""
    spec = parse_peft(spec)
    if spec is None:
        return model
    if any(isinstance(m, (LoRALinear, *UNMERGEABLE)) for m in model.modules()):
        raise PeftError("peft: the model has PEFT layers already")
    model.requires_grad_(False)
    if spec.method in ("lora", "dora"):
        add_lora(model, targets=spec.targets, r=spec.r, scaling=spec.scaling, dropout=spec.dropout,
                 dora=spec.method == "dora")
    elif spec.method == "bitfit":
        train_biases(model)
    elif spec.method == "vpt":
        add_prompts(model, num_tokens=spec.tokens, dropout=spec.dropout)
    elif spec.method == "adapter":
        add_adapters(model, hidden=spec.hidden, scale=spec.scale, dropout=spec.dropout)
    head = getattr(model, "head", None)
    if head is not None:
        head.requires_grad_(True)
    if spec.norms:
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.requires_grad_(True)
    return model


def merge_peft(model: nn.Module, strict: bool = True) -> nn.Module:
    """Fold every LoRA / DoRA layer of ``model`` into a plain ``nn.Linear`` (W + s B A; DoRA's magnitude
    applied), in place, and return it: the same outputs, timm's keys and layout. VPT prompts and adapters have
    no place in a plain ViT: with ``strict`` they raise PeftError (nothing is changed), otherwise they stay."""
    rest = [n for n, m in model.named_modules() if isinstance(m, UNMERGEABLE)]
    if strict and rest:
        raise PeftError(f"{rest[0]}: VPT prompts and adapters cannot be merged into plain ViT weights (timm has "
                        "no place for them); export ONNX or TorchScript, or save the trained parameters alone")
    merge_lora(model)
    return model


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    """{"trainable": parameters that require grad, "added": parameters PEFT added (LoRA factors, DoRA
    magnitudes, prompts, adapters), "base": the others, i.e. the plain model's} of ``model``."""
    added = set()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            added |= {id(p) for n, p in m.named_parameters() if n.startswith("lora_")}
        elif isinstance(m, UNMERGEABLE):
            added |= {id(p) for p in m.parameters()}
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "added": sum(p.numel() for p in params if id(p) in added),
            "base": sum(p.numel() for p in params if id(p) not in added)}


def trainable_state_dict(model: nn.Module, values: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The parameters of ``model`` that require grad, by name, detached and on the CPU; their values are taken
    from ``values`` (a module with the same names, e.g. its EMA copy) when given."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    source = dict((values or model).named_parameters())
    return {n: source[n].detach().cpu().contiguous() for n in names}


def save_trainable(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                   metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``tensors`` (see trainable_state_dict) as .safetensors, atomically; each ``metadata`` value is
    stored as JSON (e.g. ``{"peft": spec.to_dict(), "backbone": name}``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "producer": "vitmha"}
    meta.update({k: json.dumps(v, default=str) for k, v in (metadata or {}).items()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_trainable(path: Union[str, os.PathLike]) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, metadata) of a file written by save_trainable; metadata values decoded from JSON."""
    from safetensors import safe_open

    from vitmha.models.weights import read_weights

    tensors = read_weights(path)  # WeightsError naming the file when it is missing or unreadable
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return tensors, meta


def load_trainable(model: nn.Module, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Copy the parameters saved by save_trainable into ``model`` (built with the same spec, holding the base
    weights) and return the file's metadata. Raises PeftError naming the keys that ``model`` lacks or whose
    shapes differ (e.g. another rank or targets)."""
    tensors, meta = read_trainable(path)
    own = model.state_dict()
    missing = sorted(k for k in tensors if k not in own)
    if missing:
        raise PeftError(f"{path}: {len(missing)} saved parameter(s) are not in the model (another peft spec?): "
                        + ", ".join(missing[:8]) + (" …" if len(missing) > 8 else ""))
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in tensors.items()
           if v.shape != own[k].shape]
    if bad:
        raise PeftError(f"{path}: shapes differ (another peft spec?): " + "; ".join(bad[:4]))
    model.load_state_dict(tensors, strict=False)
    return meta


def task_from_trainable(path: Union[str, os.PathLike], **overrides: Any) -> nn.Module:
    """The task whose trained parameters ``path`` holds (``tools/export.py --format peft``), in eval mode:
    built from the hyper-parameters saved with them, so on the base weights it was trained from (its
    ``pretrained``; override with e.g. ``pretrained="base.safetensors"``), then the parameters loaded.
    Raises PeftError when the file has no task metadata (use load_trainable on a model you build)."""
    _, meta = read_trainable(path)
    class_path, hparams = meta.get("task"), meta.get("hyper_parameters")
    if not isinstance(class_path, str) or not isinstance(hparams, dict):
        raise PeftError(f"{path}: holds no task metadata; build the model and call load_trainable(model, path)")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    from vitmha.tasks.base import task_arguments

    accepted = set(task_arguments(cls))
    task = cls(**{k: v for k, v in {**hparams, **overrides}.items() if k in accepted})
    load_trainable(task.model, path)
    return task.eval()
