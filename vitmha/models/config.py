"""Read a timm ViT architecture's configuration, so vitmha can build the same network itself.

timm keeps each arch's settings inside its registry function. Rather than copying those tables,
`arch_config` asks timm to build the arch (with the user's overrides) on the `meta` device — no memory,
no weights — and reads the structure back: widths, depth, heads, which optional parts exist, norm and
activation types. Anything vitmha cannot reproduce is reported by name instead of being approximated.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class UnsupportedArchError(ValueError):
    """The timm arch uses a part vitmha's encoder does not implement."""


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """'vit_base_patch16_224.augreg_in21k' -> ('vit_base_patch16_224', 'augreg_in21k')."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _timm_model_on_meta(name: str, overrides: Dict[str, Any]) -> nn.Module:
    """timm's model ``name`` ('arch' or 'arch.tag') with ``overrides``, built on the meta device. With a tag,
    timm takes its defaults from the tag's pretrained config (num_classes, input size, ...), as it does for
    ``timm.create_model``."""
    import timm

    arch, tag = split_name(name)
    if not timm.is_model(arch):
        close = [n for n in timm.list_models(f"*{arch.split('_')[0]}*")][:8]
        raise ValueError(f"unknown timm architecture {arch!r}" + (f"; similar: {close}" if close else ""))
    if tag is not None and f"{arch}.{tag}" not in timm.list_models(arch, include_tags=True):
        tags = [n.split(".", 1)[1] for n in timm.list_models(arch, include_tags=True) if "." in n]
        raise ValueError(f"{name}: timm has no tag {tag!r} for {arch}" + (f"; its tags: {tags}" if tags else ""))
    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, **overrides)
        except TypeError as e:
            raise ValueError(f"{arch}: bad override ({e})") from None


def _act_name(m: nn.Module, where: str) -> str:
    cls = type(m).__name__
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    table = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu",
             "Swish": "silu", "ReLU": "relu"}
    if cls in table:
        return table[cls]
    raise UnsupportedArchError(f"{where}: activation {cls} is not supported")


def _norm_spec(m: nn.Module, where: str) -> Tuple[str, float, bool]:
    """(kind, eps, bias) of a norm module."""
    cls = type(m).__name__
    if isinstance(m, nn.LayerNorm):
        return "layernorm", float(m.eps), m.bias is not None
    if cls in ("RmsNorm", "RMSNorm"):
        eps = m.eps if m.eps is not None else torch.finfo(torch.float32).eps
        return "rmsnorm", float(eps), False
    raise UnsupportedArchError(f"{where}: norm layer {cls} is not supported")


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def config_from_timm_model(m: nn.Module, arch: str = "model") -> Dict[str, Any]:
    """vitmha.VisionTransformer keyword arguments that rebuild the timm ViT `m` (any device, meta included)."""
    cls = type(m).__name__
    if cls not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise UnsupportedArchError(f"{arch}: timm builds a {cls}; vitmha reproduces timm's VisionTransformer "
                                   "(and DeiT's VisionTransformerDistilled)")
    pe = m.patch_embed
    if type(pe).__name__ != "PatchEmbed":
        raise UnsupportedArchError(f"{arch}: patch embedding {type(pe).__name__} is not supported")
    blk = m.blocks[0]
    block_cls = type(blk).__name__
    if block_cls not in ("Block", "ResPostBlock"):
        raise UnsupportedArchError(f"{arch}: block type {type(blk).__name__} is not supported")
    attn, mlp = blk.attn, blk.mlp
    if type(attn).__name__ != "Attention" or getattr(attn, "gate", None) is not None:
        raise UnsupportedArchError(f"{arch}: attention type {type(attn).__name__} (gated or other) is not supported")
    if attn.attn_dim != attn.qkv.in_features:
        raise UnsupportedArchError(f"{arch}: attention width differs from the embedding width")
    norm_kind, norm_eps, norm_bias = _norm_spec(blk.norm1, f"{arch} blocks.0.norm1")
    dim = m.embed_dim

    mlp_cls = type(mlp).__name__
    if mlp_cls == "Mlp":
        mlp_layer, hidden = "mlp", mlp.fc1.out_features
    elif mlp_cls == "SwiGLU":
        mlp_layer, hidden = "swiglu", mlp.fc1_g.out_features
    elif mlp_cls == "GluMlp":
        mlp_layer, hidden = ("glu_gate_last" if mlp.gate_last else "glu"), mlp.fc1.out_features
        if getattr(mlp, "chunk_dim", -1) != -1:
            raise UnsupportedArchError(f"{arch}: GluMlp chunked along dim {mlp.chunk_dim}")
    else:
        raise UnsupportedArchError(f"{arch}: MLP type {mlp_cls} is not supported")
    if getattr(mlp, "fc2").out_features != dim:
        raise UnsupportedArchError(f"{arch}: MLP output width differs from the embedding width")

    dprs = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    global_pool = m.global_pool
    cfg: Dict[str, Any] = dict(
        img_size=tuple(pe.img_size) if pe.img_size is not None else 224,
        patch_size=tuple(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=m.num_classes,
        global_pool=global_pool,
        embed_dim=dim,
        depth=len(m.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=hidden / dim,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not _is_identity(attn.q_norm),
        scale_attn_norm=not _is_identity(attn.norm),
        scale_mlp_norm=not _is_identity(getattr(mlp, "norm", None)),
        proj_bias=attn.proj.bias is not None,
        init_values=(getattr(blk, "init_values", None) if block_cls == "ResPostBlock" else
                     float(blk.ls1.init_values) if not _is_identity(blk.ls1) else None),
        res_post_norm=block_cls == "ResPostBlock",
        distilled=cls == "VisionTransformerDistilled",
        class_token=m.cls_token is not None,
        reg_tokens=int(m.num_reg_tokens),
        no_embed_class=bool(m.no_embed_class),
        pos_embed="learn" if m.pos_embed is not None else "none",
        pre_norm=not _is_identity(m.norm_pre),
        final_norm=not (_is_identity(m.norm) and _is_identity(m.fc_norm)),
        fc_norm=not _is_identity(m.fc_norm),
        pool_include_prefix=bool(getattr(m, "pool_include_prefix", False)),
        dynamic_img_size=bool(m.dynamic_img_size),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        drop_rate=float(m.head_drop.p),
        pos_drop_rate=float(m.pos_drop.p),
        patch_drop_rate=float(getattr(m.patch_drop, "prob", 0.0)),
        proj_drop_rate=float(attn.proj_drop.p),
        attn_drop_rate=float(attn.attn_drop.p),
        drop_path_rate=float(max(dprs)) if dprs else 0.0,
        patch_bias=pe.proj.bias is not None,
        patch_norm=not _is_identity(pe.norm),
        norm_layer=norm_kind,
        norm_eps=norm_eps,
        norm_bias=norm_bias,
        act_layer=_act_name(mlp.act, f"{arch} blocks.0.mlp.act"),
        mlp_layer=mlp_layer,
    )
    if global_pool == "map":
        ap = m.attn_pool
        if type(ap).__name__ != "AttentionPoolLatent" or ap.pos_embed is not None or ap.mlp is None \
                or _is_identity(ap.q) or ap.latent.shape[-1] != dim:
            raise UnsupportedArchError(f"{arch}: attention pooling {type(ap).__name__} variant is not supported")
        cfg.update(attn_pool_heads=ap.num_heads, attn_pool_mlp_ratio=ap.mlp.fc1.out_features / dim,
                   attn_pool_latent_len=ap.latent_len, attn_pool_act=_act_name(ap.mlp.act, f"{arch} attn_pool"))
        if not _is_identity(ap.q_norm) or ap.pool not in ("token", "avg"):
            raise UnsupportedArchError(f"{arch}: attention pooling with qk-norm or pool={ap.pool!r}")
    elif global_pool not in ("", "token", "avg", "max", "avgmax"):
        raise UnsupportedArchError(f"{arch}: global_pool={global_pool!r} is not supported")
    # every block must look like the first one
    for i, b in enumerate(m.blocks):
        if type(b).__name__ != block_cls or type(b.mlp).__name__ != mlp_cls:
            raise UnsupportedArchError(f"{arch}: blocks.{i} differs from blocks.0")
    if not _is_identity(m.norm_pre):
        _norm_spec(m.norm_pre, f"{arch} norm_pre")
    return cfg


def arch_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """VisionTransformer kwargs for timm's `name` ('arch' or 'arch.tag': the tag's defaults, as timm's) with
    timm.create_model's `overrides`."""
    return config_from_timm_model(_timm_model_on_meta(name, overrides), split_name(name)[0])


def pretrained_cfg(name: str) -> Dict[str, Any]:
    """timm's pretrained config (a plain dict) for 'arch' or 'arch.tag'; {} when timm has none."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        arch, tag = split_name(name)
        try:
            cfg = timm.models.get_pretrained_cfg(arch)
        except Exception:
            cfg = None
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def pretrained_data_config(name: Optional[str]) -> Dict[str, Any]:
    """mean, std, input_size, crop_pct and interpolation a backbone's pretrained weights expect.

    Offline; ImageNet defaults (timm.data's IMAGENET_DEFAULT_MEAN / _STD) when unknown.
    """
    cfg = pretrained_cfg(name) if name else {}
    return dict(
        mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
