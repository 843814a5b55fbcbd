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
    "display_rgb", "input_channels",
]

CLASSIFIER = "vitmha.tasks.ImageClassifier"
SEGMENTER = "vitmha.tasks.SemanticSegmenter"
_TASK_PATHS = {CLASSIFIER: ("vitmha.tasks", "ImageClassifier"), SEGMENTER: ("vitmha.tasks", "SemanticSegmenter")}
_ALIASES = {"vitmha.tasks.classification.ImageClassifier": CLASSIFIER,
            "vitmha.tasks.segmentation.SemanticSegmenter": SEGMENTER}
MULTILABEL = "vitmha.tasks.MultiLabelClassifier"
_TASK_PATHS[MULTILABEL] = ("vitmha.tasks", "MultiLabelClassifier")
_ALIASES["vitmha.tasks.multilabel.MultiLabelClassifier"] = MULTILABEL

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
            raise ToolError(f"{path}: the checkpoint is of {cp}; the tools handle {', '.join(_TASK_PATHS)}")
        return cp
    if "backbone" not in hp or "num_classes" not in hp:
        raise ToolError(f"{path}: the checkpoint has no task hyper-parameters (backbone, num_classes); was it "
                        "saved from a vitmha.tasks module with save_hyperparameters()?")
    if "tune_thresholds" in hp:  # only the multi-label task has it
        return MULTILABEL
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
    """``"segmentation"``, ``"multilabel"`` or ``"classification"``."""
    if getattr(task, "task", None) == "multilabel":
        return "multilabel"
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
    pretrained config. ``in_chans`` is the model's input channels: 3 reads 8-bit RGB; any other count (or a
    ``max_pixel_value``) reads each file's own channels as float in [0, 1] (``raw``), as the data modules do.
    """

    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: Optional[float] = None
    val_transforms: Any = None
    classes: Optional[List[str]] = None
    ignore_index: int = 255
    source: str = "backbone"
    datamodule: Dict[str, Any] = field(default_factory=dict)
    in_chans: int = 3
    max_pixel_value: Optional[float] = None

    @property
    def raw(self) -> bool:
        """True when images are read as float channels in [0, 1] rather than 8-bit RGB."""
        return self.in_chans != 3 or self.max_pixel_value is not None


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
    if not names and cp.endswith("FashionMNISTDataModule"):
        from vitmha.data.sources import FASHION_CLASSES

        names = list(FASHION_CLASSES)
    if not names and dm.get("root") and not dm.get("csv"):  # ImageFolder: the sorted class folders under train/
        train = os.path.join(os.path.expanduser(str(dm["root"])), "train")
        if os.path.isdir(train):
            names = sorted(d for d in os.listdir(train) if not d.startswith(".") and os.path.isdir(os.path.join(train, d)))
    if names and len(names) == k:
        return [str(n) for n in names]
    return None


def input_channels(model: nn.Module) -> int:
    """Input channels of the ViT in ``model`` (its patch embedding's)."""
    from vitmha.data.channels import model_in_chans

    c = model_in_chans(model)
    return 3 if c is None else c


def _saved_normalization(ckpt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The mean/std a data module computed for ``auto`` and kept in its checkpoint state, if any."""
    for value in ckpt.values():
        if isinstance(value, dict) and isinstance(value.get("normalization"), dict):
            return value["normalization"]
    return None


def preprocess_config(task: nn.Module, ckpt: Dict[str, Any]) -> Preprocess:
    """The eval preprocessing of the run: image size and mean/std from the data module's saved
    hyper-parameters (resolved the way the data modules resolve them, for the model's input channels),
    else from the backbone. Raises ToolError when the run's ``auto`` statistics are not in the checkpoint."""
    from vitmha.data.transforms import resolve_mean_std

    bb = backbone_of(task)
    c = input_channels(bb)
    dm = dict(ckpt.get("datamodule_hyper_parameters") or {})
    k = int(task.hparams.num_classes)
    size = dm.get("image_size") or _backbone_image_size(bb)
    if dm:
        mean, std = dm.get("mean"), dm.get("std")
        if isinstance(mean, str) or isinstance(std, str):  # 'auto': the values the run computed
            saved = _saved_normalization(ckpt) or {}
            mean, std = (saved.get(key) if isinstance(v, str) else v for key, v in (("mean", mean), ("std", std)))
            if mean is None or std is None:
                raise ToolError("the run normalised with mean/std 'auto', but this checkpoint holds no computed "
                                "values (was it written before training started?); pass them to the data module")
        try:
            mean, std = resolve_mean_std(mean, std, dm.get("backbone"), c)
        except ValueError as e:
            raise ToolError(f"the checkpoint's data module: {e}") from None
        source = "datamodule"
    else:
        mean, std = _backbone_mean_std(bb, c)
        source = "backbone"
    return Preprocess(image_size=int(size), mean=mean, std=std, crop_pct=dm.get("crop_pct"),
                      val_transforms=dm.get("val_transforms"), classes=_class_names(task, dm, k),
                      ignore_index=int(task.hparams.get("ignore_index", dm.get("ignore_index", 255))),
                      source=source, datamodule=dm, in_chans=c, max_pixel_value=dm.get("max_pixel_value"))


def _backbone_mean_std(bb: nn.Module, in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The backbone's pretrained mean/std (ImageNet's when it has none), fitted to ``in_chans`` channels as
    the data modules fit them."""
    from vitmha.data.transforms import IMAGENET_MEAN, IMAGENET_STD, rgb_stats_for_channels

    cfg = getattr(bb, "pretrained_cfg", {}) or {}
    return (rgb_stats_for_channels(cfg.get("mean") or IMAGENET_MEAN, in_chans),
            rgb_stats_for_channels(cfg.get("std") or IMAGENET_STD, in_chans))


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
    c = input_channels(bb)
    mean, std = _backbone_mean_std(bb, c)
    return bb, Preprocess(image_size=_backbone_image_size(bb), mean=mean, std=std, crop_pct=cfg.get("crop_pct"),
                          classes=classes, source="backbone", in_chans=c)


def eval_transform(pre: Preprocess, kind: str):
    """The albumentations eval pipeline of the data modules: an image as ``read_image`` gives it ((H, W, 3)
    uint8, or (H, W, C) float in [0, 1]) -> normalised (C, S, S) tensor."""
    from vitmha.data.channels import fit_pipeline
    from vitmha.data.transforms import build_transforms, classification_eval, segmentation_eval

    if kind == "segmentation":
        default = segmentation_eval(pre.image_size, pre.mean, pre.std)
    else:
        default = classification_eval(pre.image_size, pre.mean, pre.std, pre.crop_pct)
    pipeline = build_transforms(pre.val_transforms, default, pre.mean, pre.std, "val_transforms")
    return fit_pipeline(pipeline, pre.in_chans, pre.raw, pre.image_size, "val_transforms",
                        user=pre.val_transforms is not None)


def normalize_only(image: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(H, W, C) image (uint8, or float in [0, 1]) -> (C, H, W) float32 normalised with the run's mean/std,
    size unchanged."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    x = (x[:, :, None] if x.ndim == 2 else x).permute(2, 0, 1).float()
    if image.dtype == np.uint8:
        x = x.div_(255.0)
    c = x.shape[0]
    return (x - torch.tensor(pre.mean).view(c, 1, 1)) / torch.tensor(pre.std).view(c, 1, 1)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """An image as ``read_image`` gives it, as (H, W, 3) uint8 RGB for overlays and figures: grey (and
    grey + alpha) replicated, the first three channels of 3 or more, float in [0, 1] times 255."""
    a = np.asarray(image)
    a = a[:, :, None] if a.ndim == 2 else a
    a = np.repeat(a[:, :, :1], 3, axis=2) if a.shape[2] < 3 else a[:, :, :3]
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


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


def read_image(path: str, pre: Optional[Preprocess] = None) -> np.ndarray:
    """The image as the run's data module read it: (H, W, 3) uint8 RGB (grey replicated, alpha dropped, 16-bit
    scaled), or with ``pre.raw`` (H, W, pre.in_chans) float in [0, 1]; ToolError naming the file, also when it
    has another number of channels."""
    from vitmha.data.io import image_reader

    read = image_reader(pre.in_chans, pre.max_pixel_value) if pre is not None else image_reader()
    try:
        return read(path)
    except FileNotFoundError:
        raise ToolError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        msg = " ".join(str(e).split()) or type(e).__name__
        if msg.startswith(f"{path}: "):  # the reader named the file: another channel count
            raise ToolError(msg) from None
        raise ToolError(f"{path}: unreadable image ({msg})") from None


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
