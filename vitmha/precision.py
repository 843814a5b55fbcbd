"""Inference precision: fp32, bf16 weights, or int8 linear layers, and whether this CPU has bf16 at all.

    from vitmha.precision import prepare_inference
    model = prepare_inference(model, "bf16")   # model.to(torch.bfloat16); float inputs are cast on the way in
    model = prepare_inference(model, "int8")   # torchao: int8 weights, dynamically quantised int8 activations

bf16 pays on CPUs with bf16 matrix units (Intel AMX, AVX512-BF16; Arm's BF16 extension); elsewhere PyTorch
emulates it and it is slower than fp32, so asking for it there warns once (:func:`warn_if_emulated`).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["PRECISIONS", "PrecisionError", "cpu_bf16_support", "warn_if_emulated", "prepare_inference",
           "quantize_int8"]

PRECISIONS = ("fp32", "bf16", "int8")
EMULATED_MESSAGE = "bf16 on this CPU is emulated and slower than fp32; use fp32"
CPUINFO = "/proc/cpuinfo"
_NATIVE_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX / AVX512-BF16; aarch64's "bf16" feature
_warned = False


class PrecisionError(ValueError):
    """An unknown precision, or int8 without torchao installed."""


def _cpu_flags(path: str) -> Optional[set]:
    """The CPU feature flags of the first processor listed in ``path``, or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def cpu_bf16_support() -> str:
    """``"native"`` when the CPU computes bf16 in hardware (AMX-BF16, AVX512-BF16, Arm BF16), else ``"emulated"``.
    Reads /proc/cpuinfo; elsewhere (macOS, Windows) asks PyTorch's CPU capability."""
    flags = _cpu_flags(CPUINFO)
    if flags is not None:
        return "native" if flags & set(_NATIVE_FLAGS) else "emulated"
    return "native" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "emulated"


def warn_if_emulated(device: object = "cpu") -> bool:
    """Warn once per process that bf16 is emulated when ``device`` is a CPU without native bf16; True if so."""
    global _warned
    if torch.device(device).type != "cpu" or cpu_bf16_support() == "native":
        return False
    if not _warned:
        _warned = True
        warnings.warn(EMULATED_MESSAGE, RuntimeWarning, stacklevel=3)
    return True


def _cast_inputs(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        cast = (lambda a: a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a)
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


def _entry_modules(model: nn.Module) -> Iterable[nn.Module]:
    """The model and every patch embedding in it: where images enter, whichever method a task calls."""
    from vitmha.models.layers import PatchEmbed

    yield model
    yield from (m for m in model.modules() if isinstance(m, PatchEmbed))


def to_bf16(model: nn.Module) -> nn.Module:
    """``model.to(torch.bfloat16)`` with its float inputs cast to bf16 where images enter (the model's forward
    and every patch embedding), so fp32 batches can be fed as they are."""
    model = model.to(torch.bfloat16)
    for m in _entry_modules(model):
        m.register_forward_pre_hook(_cast_inputs(torch.bfloat16), with_kwargs=True)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Post-training dynamic int8 quantisation of every ``nn.Linear`` (torchao's
    ``Int8DynamicActivationInt8WeightConfig``: int8 weights per channel, activations per token at run time),
    in place; returns the model. PrecisionError when torchao is not installed."""
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)  # torchao registers an Enum constant that this torch version calls deprecated
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise PrecisionError("int8 needs torchao: pip install 'vitmha[export]'") from None
    finally:
        pytree.setLevel(level)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def prepare_inference(model: nn.Module, precision: str = "fp32", device: object = None) -> nn.Module:
    """``model`` in eval mode at ``precision``: ``fp32`` as it is, ``bf16`` (:func:`to_bf16`; warns once on a CPU
    without native bf16), ``int8`` (:func:`quantize_int8`). ``device`` defaults to the model's own.
    PrecisionError on another precision."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    model = model.eval()
    if precision == "bf16":
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        warn_if_emulated(device)
        return to_bf16(model)
    if precision == "int8":
        return quantize_int8(model)
    return model


def quantize_onnx_int8(path: str) -> float:
    """Replace the ONNX model at ``path`` by ONNX Runtime's dynamic int8 quantisation of its MatMul/Gemm weights
    (``onnxruntime.quantization.quantize_dynamic``, signed int8 weights per channel), written atomically;
    returns the largest |int8 - fp32| logit over a random batch of 3, both run by onnxruntime."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = f"{path}.int8.tmp"
    try:
        logging.disable(logging.WARNING)  # its advice to run onnxruntime's pre-processing, on the root logger
        try:
            quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            logging.disable(logging.NOTSET)
        runs = []
        for model in (path, tmp):
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            shape = [3 if not isinstance(d, int) else d for d in inp.shape]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            runs.append(sess.run(None, {inp.name: x})[0])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return float(np.abs(runs[1] - runs[0]).max())
