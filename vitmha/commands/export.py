"""Export a trained vitmha checkpoint for deployment.

    vitmha export --checkpoint last.ckpt --format onnx --output model.onnx
    vitmha export --checkpoint last.ckpt --format onnx --int8 --output model.int8.onnx
    vitmha export --checkpoint last.ckpt --format torchscript --output model.pt
    vitmha export --checkpoint last.ckpt --format safetensors --output backbone.safetensors
    vitmha export --checkpoint last.ckpt --format peft --output lora.safetensors

``onnx`` and ``torchscript`` hold the whole task model: input the normalised image batch (B, C, S, S) that
the LightningModule's ``forward`` takes (C = the model's input channels: 3, or its ``in_chans``; S = the
training image size, B free), output its logits
((B, classes), or (B, classes, S, S) per-pixel logits for a segmenter). The export is checked against
PyTorch on a batch of 3 random inputs and the largest difference printed. ``safetensors`` holds the ViT
backbone in timm's key layout, loadable by ``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=...))``; the exact command is printed.

Every export but ``peft`` gets ``<output stem>.preprocess.json`` beside it (for ONNX also in the model's
metadata, key ``vitmha.preprocess``): the resize, crop, interpolation, channel order, value range, mean/std
and how to read the output, taken from the run's own evaluation pipeline; it is printed too. ONNX needs
``pip install 'vitmha[export]'`` (onnx, onnxruntime, onnxscript).

A model fine-tuned with ``peft`` is exported merged: LoRA / DoRA folded into the base weights (the same
logits), so the ONNX, TorchScript and timm files are plain ViTs (``--no-merge`` keeps the LoRA layers apart
in ONNX / TorchScript). VPT prompts and adapters cannot be merged: ONNX and TorchScript hold them as they
are, and a timm ``safetensors`` file is refused. ``peft`` writes only the trained parameters (LoRA factors,
head, ...: a few hundred KB for ViT-Ti) with the run's hyper-parameters; ``vitmha.peft.task_from_trainable``
rebuilds the task from them on the base weights.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence


import torch
from torch import nn

from vitmha.inference import (ToolError, backbone_of, input_channels, load_task, preprocess_config,
                              preprocess_record, read_checkpoint, run_tool)
from vitmha.peft import merge_peft, parameter_counts, save_trainable, trainable_state_dict

OPSET = 17
TOLERANCE = 1e-4


class Logits(nn.Module):
    """The task's evaluation forward: normalised images (B, C, H, W) -> logits, as ``task(x)`` in eval mode."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.model = task.inference_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Every attention of ``model`` on the explicit softmax path (same numbers as the fused one)."""
    from vitmha.models.attention import Attention, AttentionPool

    mods = [m for m in model.modules() if isinstance(m, (Attention, AttentionPool))]
    before = [m.fused for m in mods]
    for m in mods:
        m.fused = False
    try:
        yield
    finally:
        for m, f in zip(mods, before):
            m.fused = f


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def export_onnx(task: nn.Module, path: Path, size: int, opset: int = OPSET) -> Dict[str, Any]:
    """ONNX with a dynamic batch axis (legacy TorchScript-based exporter); checked with onnxruntime.

    Exports the fused attention path; if that fails, the explicit path. Returns {"max_abs_diff", "attention"};
    raises ToolError (and leaves ``path`` alone) when onnxruntime differs from PyTorch by more than 1e-4.
    """
    model = Logits(task).eval()
    example = torch.randn(2, input_channels(task), size, size)
    dyn_out = {0: "batch"}
    tmp = _atomic_target(path)
    attention = "fused"
    errors = []
    for attention in ("fused", "explicit"):
        ctx = contextlib.nullcontext() if attention == "fused" else explicit_attention(model)
        try:
            with ctx, warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": dyn_out}, opset_version=opset,
                                  do_constant_folding=True, dynamo=False)
            break
        except Exception as e:  # noqa: BLE001 - any exporter failure: try the explicit path
            errors.append(f"{attention}: {' '.join(str(e).split())[:300]}")
            tmp.unlink(missing_ok=True)
    else:
        raise ToolError("ONNX export failed:\n" + "\n".join(errors))
    diff = check_onnx(model, tmp, size)
    if not diff <= TOLERANCE:  # keep whatever the user had at `path`
        tmp.unlink(missing_ok=True)
        raise ToolError(f"{path}: onnxruntime differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); not written")
    os.replace(tmp, path)
    return {"max_abs_diff": diff, "attention": attention}


def check_onnx(model: nn.Module, path: Path, size: int, batch: int = 3) -> float:
    """Largest |onnxruntime - PyTorch| over a random batch of ``batch`` images."""
    import onnxruntime as ort

    x = torch.randn(batch, input_channels(model), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    if got.shape != ref.shape:
        raise ToolError(f"{path}: onnxruntime output has shape {got.shape}, PyTorch {ref.shape}")
    return float(abs(got - ref).max())


def export_torchscript(task: nn.Module, path: Path, size: int) -> Dict[str, Any]:
    """``torch.jit.trace`` of the task's eval forward, checked on a batch of 3 (a different batch size)."""
    model = Logits(task).eval()
    example = torch.randn(2, input_channels(task), size, size)
    tmp = _atomic_target(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        traced.save(str(tmp))
        loaded = torch.jit.load(str(tmp))
    x = torch.randn(3, input_channels(task), size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((loaded(x) - model(x)).abs().max())
    os.replace(tmp, path)
    return {"max_abs_diff": diff}


def timm_overrides(task: nn.Module) -> Dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that build the task's backbone architecture."""
    bb = backbone_of(task)
    kwargs = dict(task.hparams.get("backbone_kwargs") or {})
    for key in ("fused_attn", "tome_r"):  # vitmha-only switches
        kwargs.pop(key, None)
    if "keep_blocks" in kwargs:  # the file holds that many blocks: timm builds them as depth
        kwargs["depth"] = kwargs.pop("keep_blocks")
    if getattr(bb, "dynamic_img_size", False):
        kwargs.setdefault("dynamic_img_size", True)
    kwargs["num_classes"] = int(getattr(bb, "num_classes", 0) or 0)
    return kwargs


def timm_command(arch: str, path: Path, overrides: Dict[str, Any]) -> str:
    """Python that loads ``path`` into timm (num_classes in the overlay keeps timm from dropping the head)."""
    args = "".join(f", {k}={v!r}" for k, v in overrides.items())
    overlay = f"dict(file={str(path)!r}, num_classes={overrides.get('num_classes', 0)!r})"
    return f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay={overlay}{args})"


def export_trainable(task: nn.Module, path: Path, hparams: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters the run trained (with the values the task evaluates with) and the run's ``hparams`` (the
    checkpoint's, which name the base weights: ``task`` was loaded without them), as .safetensors. Returns
    {"tensors", "params", "bytes", "backbone_params"} (the last: the plain backbone's parameter count)."""
    if task.peft_spec is None:
        raise ToolError(f"{path}: the checkpoint was trained without peft (every weight was trained); export it "
                        "with --format safetensors")
    tensors = trainable_state_dict(task.model, values=task.inference_model)
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    class_path = f"{type(task).__module__}.{type(task).__name__}"
    save_trainable(tensors, path, {"task": class_path, "peft": task.peft_spec.to_dict(), "hyper_parameters": hparams})
    return {"tensors": len(tensors), "params": sum(t.numel() for t in tensors.values()),
            "bytes": path.stat().st_size, "backbone_params": parameter_counts(task.backbone_module())["base"]}


def export_safetensors(task: nn.Module, path: Path) -> Dict[str, Any]:
    """The backbone (with its head for a classifier) in timm's key layout; returns the timm command."""
    from vitmha.models import save_timm_safetensors

    save_timm_safetensors(backbone_of(task), path)
    return {"timm": timm_command(str(task.hparams.backbone), path, timm_overrides(task))}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (``argv`` entries may be paths; default ``sys.argv[1:]``)."""
    argv = None if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="vitmha export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True,
                   help="Lightning checkpoint of a vitmha task (a MaskedAutoencoder's exports its encoder)")
    p.add_argument("--format", required=True, choices=("onnx", "safetensors", "torchscript", "peft"),
                   help="peft: only the parameters a peft run trained, with its hyper-parameters")
    p.add_argument("--output", required=True, help="file to write (its folder is created)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side of the exported graph (default: the training image size)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET}, at least 17)")
    p.add_argument("--int8", action="store_true",
                   help="onnx: quantise the linear layers' weights to int8 (ONNX Runtime's dynamic quantisation)")
    p.add_argument("--no-merge", action="store_true",
                   help="onnx / torchscript: keep LoRA / DoRA layers apart instead of merged into the weights")
    return p.parse_args(argv)


EXPORT_PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript")}


def require_packages(fmt: str) -> None:
    """ToolError naming the install command when a format needs packages that are not installed."""
    import importlib.util

    missing = [m for m in EXPORT_PACKAGES.get(fmt, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ToolError(f"--format {fmt} needs {', '.join(missing)}, which are not installed: "
                        "pip install 'vitmha[export]'")


def write_preprocess(out: Path, record: Dict[str, Any]) -> Path:
    """``<output stem>.preprocess.json`` beside the export (written atomically); returns its path."""
    import json

    path = out.with_name(out.stem + ".preprocess.json")
    tmp = _atomic_target(path)
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def add_onnx_metadata(path: Path, record: Dict[str, Any]) -> None:
    """The preprocessing record as ONNX metadata (``metadata_props``: key ``vitmha.preprocess``, JSON)."""
    import json

    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"vitmha.preprocess": json.dumps(record)})
    tmp = _atomic_target(path)
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def describe_preprocess(record: Dict[str, Any]) -> str:
    """The record in a few lines for the console."""
    steps = ", ".join(f"{k} {v}" for k, v in record.items() if k in ("resize", "resize_shorter_side", "center_crop",
                                                                    "interpolation", "custom"))
    return (f"preprocessing: {record['pixels']}; {steps}; mean {record['mean']}, std {record['std']}; "
            f"output: {record['output']}")


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.opset < 17:
        raise ToolError(f"--opset must be >= 17, got {args.opset}")
    if args.no_merge and args.format in ("safetensors", "peft"):
        what = "plain timm weights (merged)" if args.format == "safetensors" else "the unmerged parameters"
        raise ToolError(f"--no-merge applies to onnx and torchscript; --format {args.format} writes {what}")
    if args.int8 and args.format != "onnx":
        raise ToolError("--int8 applies to --format onnx (for PyTorch: vitmha predict|evaluate --precision int8)")
    require_packages(args.format)
    ckpt = read_checkpoint(args.checkpoint)
    task = load_task(args.checkpoint, ckpt=ckpt)
    out = Path(args.output)
    if args.format == "peft":
        info = export_trainable(task, out, ckpt.get("hyper_parameters") or {})
        share = 100 * info["params"] / info["backbone_params"]
        print(f"wrote {out}: the {info['tensors']} tensors the run trained, {info['params']:,} parameters "
              f"({share:.2f} % of the backbone's), {info['bytes'] / 1024:.0f} KB. Rebuild the task on its base "
              f"weights:\n\n    from vitmha.peft import task_from_trainable\n"
              f"    task = task_from_trainable({str(out)!r})\n")
        return info
    if not args.no_merge:  # what is exported is what the task evaluates with: its EMA copy when it keeps one
        # a timm file cannot hold prompts or adapters: refused (PeftError) rather than written without them
        merge_peft(task.inference_model, strict=args.format == "safetensors")
    pre = preprocess_config(task, ckpt)
    size = args.image_size or pre.image_size
    c = input_channels(task)
    record = preprocess_record(pre, task, size)
    if args.format == "onnx":
        info = export_onnx(task, out, size, args.opset)
        if args.int8:
            from vitmha.precision import quantize_onnx_int8

            info["int8_max_abs_diff"] = quantize_onnx_int8(str(out))
            print(f"quantised {out} to int8 weights: max abs logit diff vs fp32 {info['int8_max_abs_diff']:.2e} "
                  "(batch of 3)")
        add_onnx_metadata(out, record)
        print(f"wrote {out}: input 'input' (batch, {c}, {size}, {size}), output 'logits'; {info['attention']} "
              f"attention; onnxruntime vs PyTorch max abs diff {info['max_abs_diff']:.2e} (batch of 3)")
    elif args.format == "torchscript":
        info = export_torchscript(task, out, size)
        print(f"wrote {out}: torch.jit.load it; input (batch, {c}, {size}, {size}); "
              f"max abs diff vs PyTorch {info['max_abs_diff']:.2e} (batch of 3)")
    else:
        info = export_safetensors(task, out)
        print(f"wrote {out} (timm key layout). Load it with timm:\n\n    import timm\n    model = {info['timm']}\n")
    info["preprocess"] = str(write_preprocess(out, record))
    print(f"{describe_preprocess(record)}\nwrote {info['preprocess']} (also in the ONNX metadata)" if args.format == "onnx"
          else f"{describe_preprocess(record)}\nwrote {info['preprocess']}")
    return info


if __name__ == "__main__":
    main()
