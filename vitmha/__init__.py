"""vitmha: vision transformers with from-scratch multi-head attention that load timm weights.

``import vitmha`` stays light (no Lightning, no albumentations): the subpackages (``vitmha.tasks``,
``vitmha.data``, ``vitmha.explain``, ...), ``vitmha.Trainer`` and ``vitmha.load`` import on first use.
"""
import importlib

from vitmha.models import VisionTransformer, create_backbone

__version__ = "0.2.0"
__all__ = ["VisionTransformer", "create_backbone", "Trainer", "load", "__version__"]

_SUBPACKAGES = ("tasks", "data", "heads", "models", "peft", "explain", "search", "robustness", "inference",
                "predictions", "visualize", "reports", "callbacks", "checkpoints", "commands", "cli", "trainer",
                "preemption", "errors")
_NAMES = {"Trainer": ("vitmha.trainer", "Trainer"), "load": ("vitmha.inference", "load")}


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"vitmha.{name}")
    if name in _NAMES:
        module, attr = _NAMES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vitmha' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBPACKAGES) + list(_NAMES))
