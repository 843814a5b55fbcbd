"""vitmha: vision transformers with from-scratch multi-head attention that load timm weights."""
from vitmha.models import VisionTransformer, create_backbone

__version__ = "0.1.0"
__all__ = ["VisionTransformer", "create_backbone", "__version__"]
