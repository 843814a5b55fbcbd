"""What the user tools (predict, export, attention maps, evaluate) share: loading a trained task from its
Lightning checkpoint, finding the preprocessing its run used, collecting and reading input images, and
turning user-facing errors into one clean message.

Lightning checkpoints are pickles. They are read with ``weights_only=True`` (tensors and plain Python
containers only, nothing executed; :func:`vitmha.checkpoints.read_checkpoint`, shared with the CLI), and
are meant to be the user's own files, written by ``vitmha fit`` or ``trainer.save_checkpoint``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from torch import nn

from vitmha.checkpoints import read_checkpoint  # noqa: F401 - the tools' checkpoint reader
from vitmha.errors import exit_on_user_error

__all__ = [
    "ToolError", "Preprocess", "read_checkpoint", "task_class_path", "load_task", "task_kind", "backbone_of",
    "preprocess_config", "eval_transform", "normalize_only", "collect_inputs", "read_image", "batched",
    "resolve_device", "run_tool", "pretrained_backbone", "parse_pretrained", "parse_backbone_kwargs",
]

CLASSIFIER = "vitmha.tasks.ImageClassifier"
SEGMENTER = "vitmha.tasks.SemanticSegmenter"
_TASK_PATHS = {CLASSIFIER: ("vitmha.tasks", "ImageClassifier"), SEGMENTER: ("vitmha.tasks", "SemanticSegmenter")}
_ALIASES = {"vitmha.tasks.classification.ImageClassifier": CLASSIFIER,
            "vitmha.tasks.segmentation.SemanticSegmenter": SEGMENTER}

T = TypeVar("T")


class ToolError(Exception):
    """A user-facing error of a tool: printed as ``error: <message>`` with exit code 2, no traceback."""


# --------------------------------------------------------------------------------------------- checkpoints
def task_class_path(ckpt: Dict[str, Any], path: str = "checkpoint") -> str:
    """``vitmha.tasks.ImageClassifier`` or ``vitmha.tasks.SemanticSegmenter`` for a checkpoint dict.

    Uses the class path LightningCLI stores in the hyper-parameters, else the task's hyper-parameter names
    (only the segmenter has ``head``).
    """
    hp = ckpt.get("hyper_parameters") or {}
    cp = hp.get("_class_path")
    if isinstance(cp, str):
        cp = _ALIASES.get(cp, cp)
        if cp not in _TASK_PATHS:
            raise ToolError(f"{path}: the checkpoint is of {cp}; the tools handle {CLASSIFIER} and {SEGMENTER}")
        return cp
    if "backbone" not in hp or "num_classes" not in hp:
        raise ToolError(f"{path}: the checkpoint has no task hyper-parameters (backbone, num_classes); was it "
                        "saved from a vitmha.tasks module with save_hyperparameters()?")
    return SEGMENTER if "head" in hp else CLASSIFIER


def load_task(checkpoint: str, map_location: Any = "cpu", ckpt: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The ImageClassifier or SemanticSegmenter saved in ``checkpoint``, in eval mode.

    Loaded with Lightning's ``load_from_checkpoint(weights_only=True)``; ``pretrained`` is turned off
    (the checkpoint holds every weight, so no pretrained file is needed). Raises CheckpointError (an
    unreadable file) or ToolError (another kind of task) naming the file.
    """
    import importlib

    ckpt = read_checkpoint(checkpoint) if ckpt is None else ckpt
    module, name = _TASK_PATHS[task_class_path(ckpt, checkpoint)]
    cls = getattr(importlib.import_module(module), name)
    try:
        task = cls.load_from_checkpoint(checkpoint, map_location=map_location, weights_only=True, pretrained=False)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ToolError(f"{checkpoint}: cannot load it as {name} ({msg[:500]})") from None
    return task.eval()


def task_kind(task: nn.Module) -> str:
    """``"segmentation"`` or ``"classification"``."""
    return "segmentation" if getattr(task, "task", None) == "segmentation" else "classification"


def backbone_of(task: nn.Module) -> nn.Module:
    """The ViT encoder the task evaluates with (its EMA copy when the task keeps one)."""
    model = getattr(task, "inference_model", None)
    model = getattr(task, "model", task) if model is None else model
    bb = getattr(model, "backbone", model)
    if not hasattr(bb, "forward_attention"):
        raise ToolError(f"cannot find the ViT backbone of {type(task).__name__}")
    return bb


# --------------------------------------------------------------------------------------------- preprocessing
@dataclass
class Preprocess:
    """How a run fed images to its model at evaluation time.

    ``source`` says where mean/std came from: the run's data module hyper-parameters or the backbone's
    pretrained config.
    """

    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    crop_pct: Optional[float] = None
    val_transforms: Any = None
    classes: Optional[List[str]] = None
    ignore_index: int = 255
    source: str = "backbone"
    datamodule: Dict[str, Any] = field(default_factory=dict)


def _backbone_image_size(bb: nn.Module) -> int:
    size = getattr(bb.patch_embed, "img_size", None)
    if size is None:
        gh, gw = bb.patch_embed.grid_size
        ph, _ = bb.patch_embed.patch_size
        size = (gh * ph, gw * ph)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _class_names(task: nn.Module, dm: Dict[str, Any], k: int) -> Optional[List[str]]:
    names = dm.get("classes") or task.hparams.get("class_names")
    cp = str(dm.get("_class_path", ""))
    if not names and cp.endswith("DigitsDataModule"):
        names = [str(i) for i in range(10)]
    if not names and cp.endswith("SyntheticShapesDataModule"):
        from vitmha.data.sources import SHAPE_CLASSES

        names = list(SHAPE_CLASSES)
    if not names and dm.get("root") and not dm.get("csv"):  # ImageFolder: the sorted class folders under train/
        train = os.path.join(os.path.expanduser(str(dm["root"])), "train")
        if os.path.isdir(train):
            names = sorted(d for d in os.listdir(train) if not d.startswith(".") and os.path.isdir(os.path.join(train, d)))
    if names and len(names) == k:
        return [str(n) for n in names]
    return None


def preprocess_config(task: nn.Module, ckpt: Dict[str, Any]) -> Preprocess:
    """The eval preprocessing of the run: image size and mean/std from the data module's saved
    hyper-parameters (resolved the way the data modules resolve them), else from the backbone."""
    from vitmha.data.transforms import resolve_mean_std

    bb = backbone_of(task)
    dm = dict(ckpt.get("datamodule_hyper_parameters") or {})
    k = int(task.hparams.num_classes)
    size = dm.get("image_size") or _backbone_image_size(bb)
    if dm:
        mean, std = resolve_mean_std(dm.get("mean"), dm.get("std"), dm.get("backbone"))
        source = "datamodule"
    else:
        cfg = getattr(bb, "pretrained_cfg", {}) or {}
        mean, std = resolve_mean_std(cfg.get("mean"), cfg.get("std"), None)
        source = "backbone"
    return Preprocess(image_size=int(size), mean=mean, std=std, crop_pct=dm.get("crop_pct"),
                      val_transforms=dm.get("val_transforms"), classes=_class_names(task, dm, k),
                      ignore_index=int(task.hparams.get("ignore_index", dm.get("ignore_index", 255))),
                      source=source, datamodule=dm)


def parse_pretrained(value: Any) -> Any:
    """A tool's ``--pretrained`` value: ``true``/``timm`` -> True (timm's pretrained config and the hub
    cache), ``false``/None -> False, anything else a weights file that must exist (ToolError otherwise)."""
    if value is None or value is False or str(value).lower() in ("false", "none", "0", ""):
        return False
    if value is True or str(value).lower() in ("true", "timm", "1"):
        return True
    if not os.path.isfile(os.path.expanduser(str(value))):
        raise ToolError(f"{value}: weights file not found (or pass --pretrained true for timm's pretrained weights)")
    return os.path.expanduser(str(value))


def parse_backbone_kwargs(text: Optional[str]) -> Dict[str, Any]:
    """A tool's ``--backbone-kwargs`` (a YAML or JSON mapping) as a dict; ToolError when it is not one."""
    if not text:
        return {}
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ToolError(f"--backbone-kwargs: not valid YAML/JSON ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        raise ToolError(f"--backbone-kwargs: expected a mapping such as '{{img_size: 384}}', got {text!r}")
    return value


def imagenet_class_names(cfg: Dict[str, Any], num_classes: int) -> Optional[List[str]]:
    """Human-readable class names (``tabby, tabby cat``) for a backbone whose pretrained config is an
    ImageNet classifier with ``num_classes`` outputs (timm's ``ImageNetInfo``), else None."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return None
    subset = infer_imagenet_subset(cfg) if cfg else None
    if not subset:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    return [str(d) for d in info.label_descriptions(as_dict=False)]


def pretrained_backbone(name: str, pretrained: Any = True,
                        backbone_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Preprocess]:
    """A timm-named backbone with its pretrained weights and head, in eval mode, and the preprocessing of its
    pretrained config: timm's eval transform (shorter side to size / crop_pct, centre crop, bicubic) with the
    config's mean/std, and ImageNet class names when the head is an ImageNet classifier."""
    from vitmha.models import create_backbone
    from vitmha.models.config import pretrained_cfg

    bb = create_backbone(name, pretrained=parse_pretrained(pretrained), **(backbone_kwargs or {})).eval()
    cfg = bb.pretrained_cfg  # the subset vitmha keeps: mean, std, crop_pct, input size, ...
    classes = imagenet_class_names(pretrained_cfg(name), int(getattr(bb, "num_classes", 0) or 0))
    return bb, Preprocess(image_size=_backbone_image_size(bb), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                          crop_pct=cfg.get("crop_pct"), classes=classes, source="backbone")


def eval_transform(pre: Preprocess, kind: str):
    """The albumentations eval pipeline of the data modules: (H, W, 3) uint8 -> normalised (3, S, S) tensor."""
    from vitmha.data.transforms import build_transforms, classification_eval, segmentation_eval

    if kind == "segmentation":
        default = segmentation_eval(pre.image_size, pre.mean, pre.std)
    else:
        default = classification_eval(pre.image_size, pre.mean, pre.std, pre.crop_pct)
    return build_transforms(pre.val_transforms, default, pre.mean, pre.std, "val_transforms")


def normalize_only(image: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised with the run's mean/std, size unchanged."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)


# --------------------------------------------------------------------------------------------- inputs
def collect_inputs(specs: Sequence[str]) -> List[str]:
    """Image files from files, folders (recursive) and glob patterns (png, jpg, jpeg, bmp, webp, tif, tiff).

    Raises ToolError naming every spec that matched nothing or is not an image.
    """
    from vitmha.data.io import expand_paths

    files, problems = expand_paths(specs)
    if problems:
        raise ToolError("\n".join(f"{p}: {m}" for p, m in problems))
    if not files:
        raise ToolError(f"no images found in {', '.join(map(str, specs))}")
    return files


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB (grey replicated, alpha dropped, 16-bit scaled); ToolError naming the file."""
    from vitmha.data.io import read_rgb

    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise ToolError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise ToolError(f"{path}: unreadable image ({' '.join(str(e).split()) or type(e).__name__})") from None


def batched(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``n`` elements."""
    if n < 1:
        raise ToolError(f"--batch-size must be >= 1, got {n}")
    for i in range(0, len(items), n):
        yield items[i:i + n]


def resolve_device(name: Optional[str]) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``); None = cuda when available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ToolError(f"--device {name}: expected cpu or cuda") from None


run_tool = exit_on_user_error  # the tools' entry points: user errors print one line and exit 2
