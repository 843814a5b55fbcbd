"""What a candidate architecture costs before it trains: parameters and FLOPs by formula, CPU latency by
measurement, and the structural checks (heads divide the width, patches tile the image).

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``'s convention, 2 per multiply-add of the
matrix products and convolutions (the patch embedding, qkv, ``QKᵀ`` and ``AV``, the output projection,
the MLP, the head), per image of one forward pass; norms, softmax and activations are not counted.
The formula is checked against FlopCounterMode in tests/test_search.py.
"""
from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Any, Dict, Optional, Tuple

from vitmha.search.space import SearchError, get_key

__all__ = ["backbone_of", "arch_of", "check_arch", "count_params", "count_flops", "measure_latency"]

# backbone_kwargs that map one to one onto the resolved architecture (the fast path of arch_of)
_PLAIN = ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "in_chans", "qkv_bias", "class_token",
          "reg_tokens")


def _pair(x: Any) -> Tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def backbone_of(config: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(timm arch name, create_backbone overrides) of a training config's ``model:``; num_classes from the
    model or the data module when either states it, else 0 (no head counted). Raises SearchError for a model
    without ``backbone``."""
    init = get_key(config, "model.init_args", {}) or {}
    name = init.get("backbone")
    if not name:
        raise SearchError("model.init_args.backbone: the model has no ViT backbone to count or search over")
    kwargs = dict(init.get("backbone_kwargs") or {})
    num_classes = init.get("num_classes") or get_key(config, "data.init_args.num_classes", None)
    # the CLI links num_classes from the data module when it builds it; unstated here, the head is left out
    kwargs.setdefault("num_classes", int(num_classes or 0))
    kwargs.pop("weight_init", None)  # init scheme, not architecture (and create_backbone consumes it)
    return str(name), kwargs


@lru_cache(maxsize=256)
def _arch_cached(name: str, items: Tuple[Tuple[str, Any], ...]) -> Dict[str, Any]:
    from vitmha.models.config import arch_config

    return arch_config(name, **dict(items))


def arch_of(name: str, kwargs: Dict[str, Any], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The resolved VisionTransformer arguments of arch ``name`` with ``kwargs``. With ``base`` (an already
    resolved arch) the plain knobs are laid over it in Python instead of asking timm again; raises
    SearchError with timm's reason when the architecture does not build."""
    if base is not None and set(kwargs) <= set(_PLAIN) | {"img_size", "patch_size"}:
        cfg = {**base, **{k: v for k, v in kwargs.items() if k in _PLAIN}}
        for k in ("img_size", "patch_size"):
            if k in kwargs:
                cfg[k] = _pair(kwargs[k])
        return cfg
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    try:
        return dict(_arch_cached(name, items))
    except Exception as e:  # noqa: BLE001 - timm asserts, raises TypeError or ValueError for a bad override
        reason = str(e) or type(e).__name__
        raise SearchError(f"{name} with {kwargs} does not build: {reason}") from None


def check_arch(cfg: Dict[str, Any]) -> Optional[str]:
    """Why this architecture cannot train, or None: widths, heads, depth and patch tiling."""
    dim, heads = int(cfg["embed_dim"]), int(cfg["num_heads"])
    if heads < 1 or dim % heads:
        return f"num_heads {heads} does not divide embed_dim {dim}"
    if int(cfg["depth"]) < 1:
        return f"depth {cfg['depth']} < 1"
    if float(cfg["mlp_ratio"]) <= 0:
        return f"mlp_ratio {cfg['mlp_ratio']} <= 0"
    img, patch = _pair(cfg["img_size"]), _pair(cfg["patch_size"])
    if not cfg.get("dynamic_img_pad") and (img[0] % patch[0] or img[1] % patch[1]):
        return f"patch_size {patch[0]} does not tile img_size {img[0]}"
    return None


def _supported(cfg: Dict[str, Any]) -> None:
    odd = {k: cfg.get(k) for k in ("mlp_layer", "global_pool", "qk_norm", "scale_attn_norm", "scale_mlp_norm")
           if cfg.get(k) not in ("mlp", "token", "avg", "", False, None)}
    if odd:
        raise SearchError(f"params/gflops: the formula covers plain ViT blocks; this arch has {odd}")


def _tokens(cfg: Dict[str, Any]) -> Tuple[int, int]:
    img, patch = _pair(cfg["img_size"]), _pair(cfg["patch_size"])
    patches = math.ceil(img[0] / patch[0]) * math.ceil(img[1] / patch[1])
    prefix = int(bool(cfg.get("class_token", True))) + int(cfg.get("reg_tokens") or 0)
    return patches, prefix


def count_params(cfg: Dict[str, Any]) -> int:
    """Parameters of the VisionTransformer that ``cfg`` (from :func:`arch_of`) builds."""
    _supported(cfg)
    d, depth = int(cfg["embed_dim"]), int(cfg["depth"])
    hidden = int(d * float(cfg["mlp_ratio"]))
    patch = _pair(cfg["patch_size"])
    patches, prefix = _tokens(cfg)
    norm = d * (1 if cfg.get("norm_layer") == "rmsnorm" or not cfg.get("norm_bias", True) else 2)
    bias = lambda on, n: n if on else 0  # noqa: E731
    n = int(cfg["in_chans"]) * patch[0] * patch[1] * d + bias(cfg.get("patch_bias", True), d)
    n += norm if cfg.get("patch_norm") else 0
    n += prefix * d
    if cfg.get("pos_embed", "learn") == "learn":
        n += (patches + (0 if cfg.get("no_embed_class") else prefix)) * d
    n += norm if cfg.get("pre_norm") else 0
    block = 2 * norm                                                   # norm1, norm2
    block += 3 * d * d + bias(cfg.get("qkv_bias", True), 3 * d)       # qkv
    block += d * d + bias(cfg.get("proj_bias", True), d)               # proj
    block += d * hidden + hidden + hidden * d + d                      # fc1, fc2
    block += 2 * d if cfg.get("init_values") and not cfg.get("res_post_norm") else 0  # layer scales
    n += depth * block
    n += norm if cfg.get("final_norm", True) else 0
    classes = int(cfg.get("num_classes") or 0)
    n += d * classes + classes
    return n


def count_flops(cfg: Dict[str, Any]) -> int:
    """FLOPs of one image's forward pass (2 per multiply-add, as FlopCounterMode counts them)."""
    _supported(cfg)
    d, depth = int(cfg["embed_dim"]), int(cfg["depth"])
    hidden = int(d * float(cfg["mlp_ratio"]))
    patch = _pair(cfg["patch_size"])
    patches, prefix = _tokens(cfg)
    t = patches + prefix
    flops = 2 * patches * d * int(cfg["in_chans"]) * patch[0] * patch[1]   # patch embedding (a strided conv)
    per_block = 2 * t * d * 3 * d          # qkv
    per_block += 2 * 2 * t * t * d         # Q Kᵀ and A V over all heads
    per_block += 2 * t * d * d             # output projection
    per_block += 2 * 2 * t * d * hidden    # fc1 and fc2
    flops += depth * per_block
    flops += 2 * d * int(cfg.get("num_classes") or 0)
    return flops


def measure_latency(name: str, kwargs: Dict[str, Any], repeats: int = 20) -> float:
    """Median CPU milliseconds of one forward pass on one image, random weights, eval mode, no grad."""
    import torch

    from vitmha.models import create_backbone

    model = create_backbone(name, pretrained=False, **kwargs).eval()
    img = _pair(model.patch_embed.img_size)
    x = torch.randn(1, int(kwargs.get("in_chans", 3)), *img)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model(x)
            if i >= 3:  # the first calls allocate
                times.append(time.perf_counter() - t0)
    times.sort()
    return 1000.0 * times[len(times) // 2]
