"""vitmha: vision transformers with from-scratch multi-head attention that load timm weights."""
import importlib

from vitmha.models import VisionTransformer, create_backbone

__version__ = "0.1.0"
__all__ = ["VisionTransformer", "create_backbone", "__version__"]

_LAZY = ("tasks", "data", "heads", "models", "peft", "inference", "visualize", "reports", "callbacks", "cli")


def __getattr__(name: str):
    # `import vitmha` stays light (no Lightning, albumentations); vitmha.tasks etc. import on first use
    if name in _LAZY:
        return importlib.import_module(f"vitmha.{name}")
    raise AttributeError(f"module 'vitmha' has no attribute {name!r}")
