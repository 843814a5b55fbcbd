"""The encoder: from-scratch ViT layers, timm-config reading and weight loading."""
from vitmha.models.attention import Attention, AttentionPool, attention_probs, explicit_attention
from vitmha.models.compat import TimmModelAPI
from vitmha.models.config import UnsupportedArchError, arch_config, pretrained_data_config
from vitmha.models.factory import create_backbone
from vitmha.models.features import FeatureBackbone, FeatureInfo, FPNBackbone, SimplePyramid
from vitmha.models.resample import resample_pos_embed
from vitmha.models.tome import ToMeError, apply_tome
from vitmha.models.vit import Block, VisionTransformer
from vitmha.models.weights import WeightsError, load_into, read_weights, save_timm_safetensors

__all__ = [
    "Attention", "AttentionPool", "Block", "UnsupportedArchError", "VisionTransformer", "WeightsError",
    "arch_config", "attention_probs", "create_backbone", "explicit_attention", "load_into", "pretrained_data_config",
    "read_weights", "resample_pos_embed", "save_timm_safetensors",
    "FeatureBackbone", "FeatureInfo", "FPNBackbone", "SimplePyramid", "TimmModelAPI", "ToMeError", "apply_tome",
]
