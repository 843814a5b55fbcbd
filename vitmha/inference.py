"""Running trained models: ``vitmha.load`` (a checkpoint -> a :class:`Predictor` with its own preprocessing),
and what the commands (predict, export, attention maps, explain, evaluate) share: loading a trained task from
its Lightning checkpoint, finding the preprocessing its run used, collecting and reading input images, and
turning user-facing errors into one clean message.

Lightning checkpoints are pickles. They are read with ``weights_only=True`` (tensors and plain Python
containers only, nothing executed; :func:`vitmha.checkpoints.read_checkpoint`, shared with the CLI), and
are meant to be the user's own files, written by ``vitmha fit`` or ``trainer.save_checkpoint``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from torch import nn

from vitmha.checkpoints import read_checkpoint  # noqa: F401 - the tools' checkpoint reader
from vitmha.errors import exit_on_user_error

__all__ = [
    "load", "Predictor", "ToolError", "Preprocess", "read_checkpoint", "task_class_path", "load_task", "task_kind", "backbone_of",
    "preprocess_config", "eval_transform", "normalize_only", "collect_inputs", "read_image", "batched",
    "resolve_device", "run_tool", "pretrained_backbone", "parse_pretrained", "parse_backbone_kwargs",
    "display_rgb", "input_channels",
]

T = TypeVar("T")


class ToolError(Exception):
    """A user-facing error of a tool: printed as ``error: <message>`` with exit code 2, no traceback."""


# --------------------------------------------------------------------------------------------- checkpoints
def _task_class(path: str) -> Optional[type]:
    """The vitmha task class a class path names (``vitmha.tasks.ImageClassifier`` or its module's path), or None."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    from vitmha.tasks.base import BackboneTask

    return cls if isinstance(cls, type) and issubclass(cls, BackboneTask) else None


def task_class_path(ckpt: Dict[str, Any], path: str = "checkpoint") -> str:
    """The class path of the vitmha task a checkpoint dict holds: the one LightningCLI stores in the
    hyper-parameters, else told from the hyper-parameter names (only the segmenter has ``head``, only the
    multi-label task ``tune_thresholds``). Raises ToolError for a checkpoint of anything else."""
    hp = ckpt.get("hyper_parameters") or {}
    cp = hp.get("_class_path")
    if isinstance(cp, str):
        if _task_class(cp) is None:
            raise ToolError(f"{path}: the checkpoint is of {cp}, which is not a vitmha task (vitmha.tasks.*)")
        return cp
    if "backbone" not in hp:
        raise ToolError(f"{path}: the checkpoint has no task hyper-parameters (backbone, num_classes); was it "
                        "saved from a vitmha.tasks module with save_hyperparameters()?")
    if "mask_ratio" in hp:
        return "vitmha.tasks.MaskedAutoencoder"
    if "tune_thresholds" in hp:
        return "vitmha.tasks.MultiLabelClassifier"
    return "vitmha.tasks.SemanticSegmenter" if "head" in hp else "vitmha.tasks.ImageClassifier"


def load_task(checkpoint: str, map_location: Any = "cpu", ckpt: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The vitmha task saved in ``checkpoint``, in eval mode, built from the checkpoint alone (its
    ``pretrained`` weights are not read again). Raises CheckpointError (an unreadable file) or ToolError
    (not a vitmha task, or weights that do not fit) naming the file."""
    ckpt = read_checkpoint(checkpoint) if ckpt is None else ckpt
    cls = _task_class(task_class_path(ckpt, checkpoint))
    try:
        task = cls.load_from_checkpoint(checkpoint, map_location=map_location)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ToolError(f"{checkpoint}: cannot load it as {cls.__name__} ({msg[:500]})") from None
    return task.eval()


def task_kind(task: nn.Module) -> str:
    """What a task declares it is (``task.task``): "classification", "multilabel", "segmentation", ..."""
    return str(getattr(task, "task", "") or "classification")


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


def preprocess_record(pre: Preprocess, task: nn.Module, image_size: Optional[int] = None) -> Dict[str, Any]:
    """How to turn an image file into the exported model's input, and its output into labels, as plain data
    (written beside an export and into ONNX metadata): the steps of the run's evaluation pipeline."""
    kind = task_kind(task)
    size = int(image_size or pre.image_size)
    if pre.val_transforms is not None:
        resize = {"custom": "the run's val_transforms (see the checkpoint's datamodule_hyper_parameters)"}
    elif kind == "segmentation":
        resize = {"resize": [size, size], "interpolation": "bilinear"}
    elif pre.crop_pct:
        resize = {"resize_shorter_side": int(round(size / pre.crop_pct)), "center_crop": [size, size],
                  "interpolation": "bicubic", "crop_pct": pre.crop_pct}
    else:
        resize = {"resize": [size, size], "interpolation": "bicubic"}
    if pre.raw:
        pixels = (f"each file's own {pre.in_chans} channel(s), divided by "
                  f"{pre.max_pixel_value or 'the dtype maximum (255, 65535, ...)'} into [0, 1]")
    else:
        pixels = "RGB (grey replicated, alpha dropped), uint8 divided by 255 into [0, 1]"
    out = {"task": kind, "input": "float32 NCHW", "channels": pre.in_chans, "pixels": pixels,
           "exif_orientation": "applied (photos upright)", **resize, "mean": [float(m) for m in pre.mean],
           "std": [float(s) for s in pre.std], "normalize": "(x - mean) / std per channel",
           "output": {"classification": "logits (B, classes): softmax for probabilities",
                      "multilabel": "logits (B, classes): sigmoid per class, a label when above its threshold",
                      "segmentation": "logits (B, classes, H, W): argmax per pixel"}.get(kind, "model output"),
           "classes": pre.classes}
    thresholds = getattr(task, "thresholds", None)
    if kind == "multilabel" and isinstance(thresholds, torch.Tensor):
        out["thresholds"] = [round(float(t), 6) for t in thresholds]
    return out


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


# --------------------------------------------------------------------------------------------- vitmha.load
class Predictor:
    """A trained task (or several of the same kind: an ensemble) ready to predict, each with the preprocessing
    of its own run. ``predict`` takes image paths, PIL images or arrays and returns one dict per image:

    - classifier: ``{"label", "index", "probs" (C,), "top5": [(label, prob), ...]}``;
    - multi-label: ``{"labels", "indices", "probs" (C,)}`` (the labels above their thresholds);
    - segmenter: ``{"mask": (H, W) int64 at the image's own size, "classes": {name: pixels}}``.

    An ensemble averages the members' probabilities (per pixel for segmenters) before deciding.
    """

    def __init__(self, tasks: Sequence[nn.Module], preprocess: Sequence[Preprocess],
                 sources: Optional[Sequence[str]] = None) -> None:
        if not tasks:
            raise ToolError("no model to predict with")
        self.tasks = [t.eval() for t in tasks]
        self.preprocess = list(preprocess)
        self.sources = list(sources or [type(t).__name__ for t in tasks])
        kinds = {task_kind(t) for t in self.tasks}
        if len(kinds) > 1:
            raise ToolError(f"an ensemble needs one kind of task; got {', '.join(sorted(kinds))} "
                            f"({', '.join(self.sources)})")
        self.kind = kinds.pop()

    @property
    def task(self) -> nn.Module:
        """The (first) task."""
        return self.tasks[0]

    @property
    def classes(self) -> Optional[List[str]]:
        """Class names (of the first member)."""
        return self.preprocess[0].classes or getattr(self.task, "class_names", None)

    def to(self, device: Any) -> "Predictor":
        self.tasks = [t.to(device) for t in self.tasks]
        return self

    def eval(self) -> "Predictor":
        return self

    def _read(self, item: Any, pre: Preprocess) -> np.ndarray:
        if isinstance(item, (str, os.PathLike)):
            return read_image(os.fspath(item), pre)
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image: as the data modules read files
            return _pil_array(item, pre)
        a = np.asarray(item)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ToolError(f"an image array must be (H, W) or (H, W, C), got shape {a.shape}")
        if not pre.raw and a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        return a

    def probs(self, images: Sequence[Any], **options: Any) -> List[torch.Tensor]:
        """Per image the (averaged) probabilities: (C,) or (K, H, W)."""
        total: Optional[List[torch.Tensor]] = None
        for task, pre in zip(self.tasks, self.preprocess):
            arrays = [self._read(im, pre) for im in images]
            kwargs = options if task_kind(task) == "segmentation" else {}
            out = task.predict_probs(arrays, pre, **kwargs)
            total = out if total is None else [a + b for a, b in zip(total, out)]
        return [p / len(self.tasks) for p in total or []]

    def describe(self, probs: torch.Tensor) -> Dict[str, Any]:
        return self.task.describe(probs, self.classes)

    def predict(self, images: Union[Any, Sequence[Any]], batch_size: int = 16, **options: Any) -> List[Dict[str, Any]]:
        """Predictions for ``images`` (paths, PIL images or arrays; one or a list), ``batch_size`` at a time.
        Segmenters take ``mode="auto"|"resize"|"slide"`` (see ``SemanticSegmenter.predict_probs``)."""
        single = isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "convert")
        items = [images] if single else list(images)
        out: List[Dict[str, Any]] = []
        for chunk in batched(items, batch_size):
            out += [self.describe(p) for p in self.probs(chunk, **options)]
        return out[0] if single else out

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        return self.predict(images, **kwargs)


def _pil_array(im: Any, pre: Preprocess) -> np.ndarray:
    """A PIL image as ``read_image`` reads a file: (H, W, 3) uint8 RGB, or with ``pre.raw`` its own channels
    as float32 in [0, 1] (``max_pixel_value`` or the dtype's range)."""
    from PIL import ImageOps

    from vitmha.data.io import _to_rgb

    im = ImageOps.exif_transpose(im)
    if not pre.raw:
        if im.mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F", "RGB"):
            a = np.asarray(im)
            return _to_rgb(a.astype(np.uint16) if im.mode.startswith("I;16") else a)
        return np.asarray(im.convert("RGB"))
    a = np.asarray(im)
    a = a[:, :, None] if a.ndim == 2 else a
    if a.shape[2] != pre.in_chans:
        raise ToolError(f"a PIL image with {a.shape[2]} channel(s) (mode {im.mode}); the model takes {pre.in_chans}")
    top = pre.max_pixel_value or (float(np.iinfo(a.dtype).max) if a.dtype.kind in "ui" else 1.0)
    return np.clip(a.astype(np.float32) / float(top), 0.0, 1.0)


def load(checkpoint: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], device: Any = "cpu") -> Predictor:
    """``vitmha.load("last.ckpt")``: the vitmha task saved in a checkpoint, in eval mode, with the
    preprocessing of its own run, as a :class:`Predictor` (``.predict(images)``; ``.task`` is the
    LightningModule). A list of checkpoints of the same kind of task is an ensemble. Nothing but the
    checkpoint is read (not its pretrained weights). Raises CheckpointError or ToolError naming the file."""
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    tasks, pres = [], []
    for path in paths:
        path = os.fspath(path)
        ckpt = read_checkpoint(path)
        task = load_task(path, ckpt=ckpt)
        tasks.append(task)
        pres.append(preprocess_config(task, ckpt))
    check_ensemble(tasks, pres, [os.fspath(p) for p in paths])
    return Predictor(tasks, pres, [os.fspath(p) for p in paths]).to(device)


def check_ensemble(tasks: Sequence[nn.Module], pres: Sequence[Preprocess], names: Sequence[str]) -> None:
    """ToolError naming the checkpoints when the members of an ensemble disagree in kind of task, number of
    classes or class names."""
    if len(tasks) < 2:
        return
    first = (task_kind(tasks[0]), int(tasks[0].hparams.get("num_classes", 0)), pres[0].classes)
    for task, pre, name in zip(tasks[1:], pres[1:], names[1:]):
        other = (task_kind(task), int(task.hparams.get("num_classes", 0)), pre.classes)
        for what, a, b in zip(("task", "number of classes", "classes"), first, other):
            if a != b and not (what == "classes" and (a is None or b is None)):
                raise ToolError(f"{names[0]} and {name} cannot form an ensemble: their {what} differ ({a} vs {b})")


class PretrainedClassifier(nn.Module):
    """A bare backbone with its pretrained classifier head, as a task :class:`Predictor` can run (``vitmha
    predict --backbone NAME``): zero-shot with the pretrained classes."""

    task = "classification"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.model = backbone
        self.hparams = {"num_classes": int(getattr(backbone, "num_classes", 0) or 0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict_probs(self, images: Sequence[np.ndarray], pre: Preprocess) -> List[torch.Tensor]:
        transform = eval_transform(pre, "classification")
        x = torch.stack([transform(image=im)["image"] for im in images]).to(self.device)
        with torch.no_grad():
            return list(self.model(x).float().softmax(-1).cpu())

    def describe(self, probs: torch.Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        from vitmha.tasks.classification import describe_probs

        return describe_probs(probs, names)

    def prediction_sink(self, output_dir: str, names: Optional[Sequence[str]] = None, top_k: int = 5,
                        suffix: str = "", alpha: float = 0.5) -> Any:
        from vitmha.predictions import PredictionsCsv

        return PredictionsCsv(f"{output_dir}/predictions{suffix}.csv", top_k, names)


def load_backbone(name: str, pretrained: Any = True, backbone_kwargs: Optional[Dict[str, Any]] = None,
                  device: Any = "cpu") -> Predictor:
    """A :class:`Predictor` of a pretrained timm classifier as it is (its pretrained classes and preprocessing).
    ToolError when the backbone has no classifier head."""
    bb, pre = pretrained_backbone(name, pretrained, backbone_kwargs)
    if not getattr(bb, "num_classes", 0):
        raise ToolError(f"{name}: this backbone has no classifier head (num_classes=0) to predict with")
    return Predictor([PretrainedClassifier(bb)], [pre], [name]).to(device)
