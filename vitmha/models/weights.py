"""Reading ViT weights safely and fitting them to a vitmha model.

Files: `.safetensors` (preferred), `.pth/.pt/.bin/.ckpt` (torch.load with weights_only=True: a pickle that
would build arbitrary objects is refused, nothing in it runs), and big_vision/timm JAX `.npz`.
Layouts converted: timm's own (DeiT's distilled archs included), Lightning checkpoints of vitmha tasks (their EMA
weights when trained with EMA; LoRA / DoRA factors merged into the base weights with the task's saved ``peft``
spec), DINOv2's original, OpenAI / Open CLIP visual towers, DeiT-3 / BEiT `gamma_1/gamma_2`. Then the position
embedding is resampled to the model's grid and the patch kernel adapted to its input channels (as timm does:
summed for one channel, repeated and rescaled for others) and resampled to its patch size, both with timm's own
functions (``timm.layers.resample_abs_pos_embed`` / ``resample_patch_embed``); a classifier head of another
size is re-initialised with a warning, and any other missing, unexpected or mis-shaped key is an error that
lists the keys.
"""
from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Union

import numpy as np
import torch
from torch import nn


StateDict = Dict[str, torch.Tensor]


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file and keys."""


# ---------------------------------------------------------------------------------------------- reading
def read_weights(path: Union[str, os.PathLike]) -> StateDict:
    """Tensors of a weights file, never running code from it. Raises WeightsError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if suffix == ".npz":
        try:
            with np.load(str(path), allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise WeightsError(f"{path}: not a readable .npz file: {e}") from None
    if suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        return unwrap_state_dict(load_torch_file(path), source=str(path))
    raise WeightsError(f"{path}: unknown weights format {suffix!r}; expected .safetensors, .pth, .pt, .bin or .npz")


def load_torch_file(path: Union[str, os.PathLike], what: str = "weights file") -> object:
    """``torch.load(path, weights_only=True)``, memory-mapped when the file is a zip archive (cheap for big
    checkpoints). The one place vitmha unpickles a file: tensors and plain containers only, so nothing in
    the file ever runs, and every failure is one WeightsError line naming the file and the reason
    (``what`` names the kind of file in the messages).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: {what} not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (KeyError, OSError, ...) for a bad file
        reason = _load_failure(e)
    global_name = re.search(r"GLOBAL ([\w.]+)", reason)
    if global_name:
        raise WeightsError(
            f"{path}: refused to unpickle: it would import {global_name.group(1)}, and a pickle that holds more "
            "than tensors and plain containers can run code; nothing in it was run (convert it to .safetensors "
            "from a trusted source)") from None
    raise WeightsError(f"{path}: not a readable {what}: truncated, corrupt or not a PyTorch file "
                       f"({reason[:200]})") from None


def _load_failure(e: Exception) -> str:
    """torch.load's reason on one line, without the paragraphs its weights_only errors wrap it in."""
    text = str(e).split("Check the documentation of torch.load")[0]
    text = re.split(r"from a trusted source\.|WeightsUnpickler error:", text)[-1]
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def unwrap_state_dict(obj, source: str = "weights") -> StateDict:
    """Take the tensors out of `{'state_dict': …}`, `{'model': …}`, `{'module': …}` containers."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "module", "model_state", "params"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state dict, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{source}: holds no tensors")
    return sd


# ---------------------------------------------------------------------------------------------- layouts
_TASK_PREFIXES = ("model.", "backbone.", "module.", "encoder.", "_orig_mod.")


def _strip_prefixes(sd: StateDict) -> StateDict:
    """Strip wrapper prefixes ('module.', a vitmha task's 'model.' / 'backbone.', ...) shared by all keys."""
    changed = True
    while changed:
        changed = False
        for p in _TASK_PREFIXES:
            body = [k for k in sd if k.startswith(p)]
            if body and len(body) >= 0.5 * len(sd) and any(k.startswith(p + "blocks.") for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
                changed = True
    return sd


def _take_ema(sd: StateDict, source: str) -> StateDict:
    """A vitmha task checkpoint trained with ``ema_decay`` holds the trained weights (``model.*``) and their EMA
    (``ema.module.*``); the task evaluates with the EMA copy, so that is the one loaded."""
    ema = {k[len("ema.module."):]: v for k, v in sd.items() if k.startswith("ema.module.")}
    if not any(".blocks." in k or k.startswith("blocks.") for k in ema):
        return sd
    warnings.warn(f"{source}: a task checkpoint with weight EMA: loading the EMA weights (ema.module.*), the ones "
                  "its validation and test used", stacklevel=4)
    return ema


def _convert_openai_clip(sd: StateDict, prefix: str) -> StateDict:
    """OpenAI / Open CLIP visual tower (`visual.transformer.resblocks.N...`) -> timm names."""
    out: StateDict = {}
    rename = {
        "conv1.weight": "patch_embed.proj.weight", "class_embedding": "cls_token",
        "positional_embedding": "pos_embed", "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
        "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias",
    }
    block_rename = {
        "ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias":
        "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        "ls_1": "ls1", "ls_2": "ls2",
    }
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k == "proj":
            out["head.weight"] = v.T.contiguous()       # the image projection becomes a zero-bias head
            out["head.bias"] = torch.zeros(v.shape[1], dtype=v.dtype)
            continue
        if k in rename:
            k = rename[k]
            if k == "cls_token":
                v = v.reshape(1, 1, -1)
            elif k == "pos_embed":
                v = v.unsqueeze(0)
        elif k.startswith("transformer.resblocks."):
            k = "blocks." + k[len("transformer.resblocks."):]
            for a, b in block_rename.items():
                k = k.replace(f".{a}", f".{b}")
        out[k] = v
    return out


def _convert_dinov2(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        if k == "register_tokens":
            k = "reg_token"
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    return out


def _convert_gamma(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        k = k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[k] = v
    return out


def _convert_npz(sd: StateDict, model: nn.Module) -> StateDict:
    """big_vision / AugReg JAX layout (`Transformer/encoderblock_N/...`) -> timm names."""
    p = ""
    if "opt/target/embedding/kernel" in sd:
        p = "opt/target/"
    if p + "embedding/kernel" not in sd:
        raise WeightsError("npz: not a big_vision/AugReg ViT checkpoint (no 'embedding/kernel')")

    def t(k):
        return sd[p + k].float()

    def conv(w):  # HWIO -> OIHW
        return w.permute(3, 2, 0, 1) if w.ndim == 4 else w

    heads = model.num_heads if hasattr(model, "num_heads") else None
    out: StateDict = {"patch_embed.proj.weight": conv(t("embedding/kernel")),
                      "patch_embed.proj.bias": t("embedding/bias")}
    if p + "cls" in sd:
        out["cls_token"] = t("cls")
    if p + "reg" in sd:
        out["reg_token"] = t("reg")
    pe_key = next((k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding") if p + k in sd), None)
    if pe_key:
        out["pos_embed"] = t(pe_key)
    enc = "Transformer/encoder_norm" if p + "Transformer/encoder_norm/scale" in sd else None
    if enc:
        out["norm.weight"], out["norm.bias"] = t(enc + "/scale"), t(enc + "/bias")
    if p + "head/kernel" in sd:
        out["head.weight"], out["head.bias"] = t("head/kernel").T, t("head/bias")
    i = 0
    while p + f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in sd:
        b = f"Transformer/encoderblock_{i}/"
        mha = b + "MultiHeadDotProductAttention_1/"
        o = f"blocks.{i}."
        out[o + "norm1.weight"], out[o + "norm1.bias"] = t(b + "LayerNorm_0/scale"), t(b + "LayerNorm_0/bias")
        out[o + "norm2.weight"], out[o + "norm2.bias"] = t(b + "LayerNorm_2/scale"), t(b + "LayerNorm_2/bias")
        q, k, v = (t(mha + f"{n}/kernel") for n in ("query", "key", "value"))          # (D, h, d)
        out[o + "attn.qkv.weight"] = torch.cat([w.flatten(1).T for w in (q, k, v)])
        out[o + "attn.qkv.bias"] = torch.cat([t(mha + f"{n}/bias").flatten() for n in ("query", "key", "value")])
        out[o + "attn.proj.weight"] = t(mha + "out/kernel").flatten(0, 1).T
        out[o + "attn.proj.bias"] = t(mha + "out/bias")
        mlp = b + "MlpBlock_3/" if p + b + "MlpBlock_3/Dense_0/kernel" in sd else b + "MlpBlock_0/"
        out[o + "mlp.fc1.weight"], out[o + "mlp.fc1.bias"] = t(mlp + "Dense_0/kernel").T, t(mlp + "Dense_0/bias")
        out[o + "mlp.fc2.weight"], out[o + "mlp.fc2.bias"] = t(mlp + "Dense_1/kernel").T, t(mlp + "Dense_1/bias")
        i += 1
    del heads
    return out


def convert_layout(sd: StateDict, model: nn.Module, source: str = "weights") -> StateDict:
    """Bring a state dict of any supported layout to timm's (= vitmha's) key names."""
    if any("/" in k for k in sd):
        return _convert_npz(sd, model)
    sd = _strip_prefixes(_take_ema(sd, source))
    for prefix in ("visual.", ""):
        if f"{prefix}transformer.resblocks.0.ln_1.weight" in sd:
            return _convert_openai_clip(sd, prefix)
    if "mask_token" in sd or any(".mlp.w12." in k for k in sd) or "register_tokens" in sd:
        sd = _convert_dinov2(sd)
    if any(".gamma_1" in k for k in sd):
        sd = _convert_gamma(sd)
    return sd


# ---------------------------------------------------------------------------------------------- fitting
def _fit_shapes(sd: StateDict, model: nn.Module, source: str) -> StateDict:
    """The position embedding resampled to the model's grid and the patch kernel adapted to its input channels
    and resampled to its patch size, with timm's functions (those timm's own loader uses)."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    own = model.state_dict()
    sd = dict(sd)
    if "pos_embed" in sd and getattr(model, "pos_embed", None) is not None:
        pe, target = sd["pos_embed"], own["pos_embed"]
        if pe.ndim == 2:
            pe = pe.unsqueeze(0)
        if pe.shape != target.shape:
            prefix_model = 0 if model.no_embed_class else model.num_prefix_tokens
            n_grid = pe.shape[1] - prefix_model
            if math.isqrt(n_grid) ** 2 != n_grid and prefix_model == 0:
                # a checkpoint with class-token entries loaded into a no_embed_class model: drop them
                for p in range(1, 1 + model.num_prefix_tokens + 1):
                    if math.isqrt(pe.shape[1] - p) ** 2 == pe.shape[1] - p:
                        pe = pe[:, p:]
                        break
            n_grid = pe.shape[1] - prefix_model
            side = math.isqrt(max(n_grid, 0))
            if n_grid <= 0 or side * side != n_grid:
                raise WeightsError(f"{source}: pos_embed {tuple(sd['pos_embed'].shape)} cannot be fitted to the "
                                   f"model's {tuple(target.shape)}: {n_grid} patch entries after {prefix_model} "
                                   "prefix ones are not a square grid")
            pe = resample_abs_pos_embed(pe, list(model.patch_embed.grid_size), old_size=[side, side],
                                        num_prefix_tokens=prefix_model)
        sd["pos_embed"] = pe
    k = "patch_embed.proj.weight"
    if k in sd and k in own and sd[k].ndim == 4 and sd[k].shape[0] == own[k].shape[0] \
            and sd[k].shape[1] != own[k].shape[1]:
        sd[k] = adapt_input_channels(sd[k], own[k].shape[1])
    if k in sd and k in own and sd[k].shape[-2:] != own[k].shape[-2:] and sd[k].shape[:2] == own[k].shape[:2]:
        sd[k] = resample_patch_embed(sd[k], list(own[k].shape[-2:]))
    return sd


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch kernel (D, C, kh, kw) for images of ``in_chans`` channels, as timm adapts pretrained weights.

    One channel: the kernels summed over C (a grey image g = R = G = B gives the RGB model's embedding).
    Otherwise the C kernels repeated cyclically (channel i takes kernel i mod C), cut to ``in_chans`` and
    scaled by C / in_chans, which keeps the embedding's scale for inputs whose channels look alike.
    Linear in the kernel, so it commutes with the patch-size resampling (timm's ``resample_patch_embed``).
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    c = weight.shape[1]
    if in_chans == c:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans] * (c / in_chans)
    return w.to(weight.dtype)


def _block_index(key: str) -> int:
    """i for a ``blocks.i.*`` key, -1 for any other."""
    m = re.match(r"blocks\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


def _keep_first_blocks(sd: StateDict, depth: int, source: str) -> StateDict:
    """Drop the checkpoint's blocks from index ``depth`` on (a model built shallower on purpose), warning once."""
    last = max(map(_block_index, sd), default=-1)
    if last < depth:
        return sd
    warnings.warn(f"{source}: keeping the first {depth} of the checkpoint's {last + 1} blocks "
                  f"(keep_blocks={depth}); blocks {depth}-{last} are not loaded", stacklevel=4)
    return {k: v for k, v in sd.items() if _block_index(k) < depth}


#: the classifier heads' keys (DeiT's distilled models have a second one on the distillation token)
HEAD_PREFIXES = ("head.", "head_dist.")


def read_checkpoint(path: Union[str, os.PathLike]) -> tuple[StateDict, Dict]:
    """(tensors, hyper-parameters) of a weights file; the hyper-parameters of a Lightning checkpoint
    (``hyper_parameters``), {} for any other file."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        obj = load_torch_file(path)
        hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
        return unwrap_state_dict(obj, source=str(path)), dict(hp) if isinstance(hp, Mapping) else {}
    return read_weights(path), {}


def load_into(model: nn.Module, weights, source: str = "weights", truncate_depth: bool = False) -> None:
    """Load a file path or a state dict into a vitmha VisionTransformer, converting and checking as described.

    A task checkpoint trained with LoRA / DoRA loads merged (the factors folded into the base weights with its
    saved ``peft`` spec: a plain model); one trained with VPT prompts or adapters is an error (a plain ViT has
    no place for them). ``truncate_depth``: the model was built with fewer blocks than the checkpoint on
    purpose (``keep_blocks`` given); the checkpoint's first ``len(model.blocks)`` blocks are loaded and the
    deeper ones dropped. Without it, extra blocks are an error like any other unexpected key."""
    hparams: Dict = {}
    if isinstance(weights, (str, os.PathLike)):
        source = str(weights)
        sd, hparams = read_checkpoint(weights)
    elif isinstance(weights, Mapping):
        hp = weights.get("hyper_parameters")
        hparams = dict(hp) if isinstance(hp, Mapping) else {}
        sd = unwrap_state_dict(weights, source)
    else:
        raise WeightsError(f"pretrained must be False, True, a path or a state dict; got {type(weights).__name__}")
    sd = convert_layout(sd, model, source)
    spec = _peft_to_merge(sd, hparams, source)
    if spec is None:
        _load_checked(model, sd, source, truncate_depth)
        return
    from vitmha.peft import apply_peft, merge_peft

    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_peft(model, spec)                 # the checkpoint's LoRA layers, to load its factors into
    _load_checked(model, sd, source, truncate_depth)
    merge_peft(model)                       # W + s B A (DoRA: its magnitude): a plain model again
    for n, p in model.named_parameters():
        p.requires_grad_(trainable[n])


def _peft_to_merge(sd: StateDict, hparams: Mapping, source: str):
    """The LoRA / DoRA spec whose factors ``sd`` holds (from the task's saved ``peft``), None when it holds
    none; WeightsError for prompts or adapters, or for factors without a spec to merge them with."""
    from vitmha.peft import PeftError, parse_peft

    try:
        spec = parse_peft(hparams.get("peft"))
    except PeftError as e:
        raise WeightsError(f"{source}: its saved peft spec is not readable: {e}") from None
    unmergeable = next((k for k in sd if ".attn.prompt." in k or ".mlp.adapter." in k), None)
    if unmergeable or (spec is not None and spec.method in ("vpt", "adapter")):
        what = spec.method if spec is not None else unmergeable
        raise WeightsError(f"{source}: a task trained with peft {what}: VPT prompts and adapters have no place in "
                           "plain ViT weights, so it cannot be a backbone's pretrained weights; load the task "
                           "itself (vitmha.load, or its class's load_from_checkpoint) or resume it with --ckpt_path")
    lora = next((k for k in sd if ".lora_A." in k or ".lora_B." in k or ".lora_magnitude." in k), None)
    if lora is None:
        return None
    if spec is None or spec.method not in ("lora", "dora"):
        raise WeightsError(f"{source}: holds LoRA factors ({lora}) but no lora/dora peft spec to merge them with "
                           "(a Lightning checkpoint's hyper_parameters.peft); give the task's checkpoint file, or "
                           "merge them first: vitmha export --checkpoint C --format safetensors")
    return spec


def _load_checked(model: nn.Module, sd: StateDict, source: str, truncate_depth: bool) -> None:
    """Fit ``sd`` (timm's layout) to ``model`` and load it strictly, or raise WeightsError listing the keys."""
    sd = _fit_shapes(sd, model, source)
    if truncate_depth:
        sd = _keep_first_blocks(sd, len(model.blocks), source)
    own = model.state_dict()

    head_keys = [k for k in own if k.startswith(HEAD_PREFIXES)]
    head_mismatch = bool(head_keys) and (any(k in sd and sd[k].shape != own[k].shape for k in head_keys)
                                         or not any(k in sd for k in head_keys))
    found_head = tuple(sd["head.weight"].shape) if "head.weight" in sd else "none"
    if head_mismatch or not head_keys:      # a head of another size is replaced; a headless model drops it
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
        sd.update({k: own[k] for k in head_keys})

    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mis = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or mis:
        def fmt(title, keys):
            if not keys:
                return ""
            more = f" … and {len(keys) - 12} more" if len(keys) > 12 else ""
            return f"; {title} ({len(keys)}): " + ", ".join(keys[:12]) + more
        raise WeightsError(
            f"{source}: weights do not fit this model (another architecture or size?)"
            + fmt("missing", missing) + fmt("unexpected", unexpected) + fmt("shape mismatch", mis))
    if head_mismatch:
        warnings.warn(f"{source}: classifier head re-initialised for {model.num_classes} classes "
                      f"(checkpoint head: {found_head})", stacklevel=4)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def save_timm_safetensors(model: nn.Module, path: Union[str, os.PathLike], include_head: bool = True) -> Path:
    """Write the encoder's weights with timm's key names, atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if include_head or not k.startswith(HEAD_PREFIXES)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(sd, str(tmp), metadata={"format": "pt", "producer": "vitmha"})
    os.replace(tmp, path)
    return path
