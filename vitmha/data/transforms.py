"""albumentations pipelines: defaults for classification and segmentation, and specs from YAML.

Every pipeline ends with ``Normalize(mean, std)`` and ``ToTensorV2`` (appended to a user spec that lacks
them), so datasets always return float32 CHW tensors.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import albumentations as A
import cv2
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: a pipeline from YAML: a list of albumentations transforms (class_path/init_args), albumentations' own
#: serialised dict, or None for the data module's default
TransformSpec = Optional[Union[List[Any], Dict[str, Any]]]
# cv2's INTER_NEAREST samples at floor(x * scale), half a pixel off the centre-aligned INTER_LINEAR used for
# images, so masks drift against their images when rescaled; INTER_NEAREST_EXACT is centre-aligned.
MASK_INTERP = cv2.INTER_NEAREST_EXACT


def resolve_mean_std(
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    backbone: Optional[str] = None,
) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Explicit mean/std > the backbone's pretrained data config > ImageNet."""
    cfg_mean, cfg_std = IMAGENET_MEAN, IMAGENET_STD
    if backbone and (mean is None or std is None):
        try:
            from vitmha.models.config import pretrained_data_config
        except ImportError:  # models package not importable yet: ImageNet statistics
            pretrained_data_config = None
        if pretrained_data_config is not None:
            cfg = pretrained_data_config(backbone)
            cfg_mean, cfg_std = tuple(cfg.get("mean", cfg_mean)), tuple(cfg.get("std", cfg_std))
    mean = tuple(float(m) for m in (mean if mean is not None else cfg_mean))
    std = tuple(float(s) for s in (std if std is not None else cfg_std))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
    return mean, std


def _finish(ops: List[Any], mean, std) -> List[Any]:
    return ops + [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def classification_train(
    image_size: int, mean, std, hflip: float = 0.0, scale: Tuple[float, float] = (0.8, 1.0)
) -> A.Compose:
    """RandomResizedCrop, optional flip, a few light colour/RandAugment-style ops at low probability."""
    s = int(image_size)
    ops = [
        A.RandomResizedCrop(size=(s, s), scale=tuple(scale), ratio=(3 / 4, 4 / 3)),
        A.HorizontalFlip(p=hflip),
        A.OneOf(
            [
                A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=1.0),
                A.RandomGamma(gamma_limit=(80, 120), p=1.0),
                A.ToGray(p=1.0),
            ],
            p=0.3,
        ),
        A.OneOf(
            [
                A.Affine(rotate=(-15, 15), shear=(-8, 8), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
                A.Posterize(num_bits=(4, 6), p=1.0),
                A.Equalize(p=1.0),
                A.Sharpen(p=1.0),
            ],
            p=0.2,
        ),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.GaussNoise(std_range=(0.02, 0.06), p=1.0)], p=0.1),
    ]
    return A.Compose(_finish(ops, mean, std), mask_interpolation=MASK_INTERP)


def classification_eval(image_size: int, mean, std, crop_pct: Optional[float] = None) -> A.Compose:
    """Plain resize to image_size×image_size, or (with crop_pct, as timm) shorter side to size/crop_pct + centre crop."""
    s = int(image_size)
    if crop_pct:
        ops = [A.SmallestMaxSize(max_size=int(round(s / crop_pct)), interpolation=cv2.INTER_CUBIC), A.CenterCrop(s, s)]
    else:
        ops = [A.Resize(s, s, interpolation=cv2.INTER_CUBIC)]
    return A.Compose(_finish(ops, mean, std), mask_interpolation=MASK_INTERP)


def segmentation_train(
    image_size: int,
    mean,
    std,
    hflip: float = 0.5,
    ignore_index: int = 255,
    scale: Tuple[float, float] = (1.0, 1.0),
) -> A.Compose:
    """mmseg-style: shorter side to image_size × U(scale), pad (mask with ignore_index), random crop, flip, colour."""
    s = int(image_size)
    lo, hi = scale
    ops = [
        A.SmallestMaxSize(max_size=s, interpolation=cv2.INTER_LINEAR, mask_interpolation=MASK_INTERP),
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=MASK_INTERP, p=1.0),
        A.PadIfNeeded(min_height=s, min_width=s, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(s, s),
        A.HorizontalFlip(p=hflip),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02, p=0.5),
    ]
    return A.Compose(_finish(ops, mean, std), mask_interpolation=MASK_INTERP)


def segmentation_eval(image_size: int, mean, std) -> A.Compose:
    """Resize image (bilinear) and mask (nearest) to image_size×image_size, normalize."""
    s = int(image_size)
    ops = [A.Resize(s, s, interpolation=cv2.INTER_LINEAR, mask_interpolation=MASK_INTERP)]
    return A.Compose(_finish(ops, mean, std), mask_interpolation=MASK_INTERP)


# --- specs from YAML ---------------------------------------------------------------------------------


def _resolve_class(class_path: str, where: str):
    if "." not in class_path:
        cls = getattr(A, class_path, None)
        if cls is None and class_path == "ToTensorV2":
            cls = ToTensorV2
        if cls is None:
            raise ValueError(f"{where}: albumentations has no transform '{class_path}'")
    else:
        module_name, _, name = class_path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"{where}: cannot import module '{module_name}' for '{class_path}' ({e})") from None
        cls = getattr(module, name, None)
        if cls is None:
            raise ValueError(f"{where}: {module_name} has no transform '{name}'")
    if not (isinstance(cls, type) and issubclass(cls, (BasicTransform, BaseCompose))):
        raise ValueError(f"{where}: '{class_path}' is not an albumentations transform")
    return cls


def _build_entry(entry: Any, where: str):
    if isinstance(entry, (BasicTransform, BaseCompose)):
        return entry
    if isinstance(entry, str):
        cls, args = _resolve_class(entry, where), {}
    elif isinstance(entry, dict):
        if "class_path" not in entry:
            raise ValueError(f"{where}: expected {{class_path: ..., init_args: {{...}}}} or a name, got keys {sorted(entry)}")
        cls = _resolve_class(str(entry["class_path"]), where)
        unknown = set(entry) - {"class_path", "init_args", "transforms"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: class_path, init_args, transforms)")
        args = dict(entry.get("init_args") or {})
        if "transforms" in entry:
            args["transforms"] = entry["transforms"]
    else:
        raise ValueError(f"{where}: expected a transform name or a {{class_path, init_args}} dict, got {entry!r}")
    if "transforms" in args:
        if not issubclass(cls, BaseCompose):
            raise ValueError(f"{where}: '{cls.__name__}' takes no nested transforms")
        children = args["transforms"]
        if not isinstance(children, (list, tuple)):
            raise ValueError(f"{where}.transforms: expected a list, got {type(children).__name__}")
        args["transforms"] = [_build_entry(c, f"{where}.transforms[{j}]") for j, c in enumerate(children)]
    for k, v in list(args.items()):  # YAML has lists where albumentations documents tuples
        if isinstance(v, list) and k != "transforms":
            args[k] = tuple(v)
    try:
        return cls(**args)
    except Exception as e:
        e = e.__cause__ if hasattr(e.__cause__, "errors") else e
        if hasattr(e, "errors") and callable(e.errors):  # pydantic: one short clause per field
            msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        else:
            msg = " ".join(str(e).split())
        raise ValueError(f"{where} ({cls.__name__}): {msg}") from None


def _contains(t, cls) -> bool:
    if isinstance(t, cls):
        return True
    return isinstance(t, BaseCompose) and any(_contains(c, cls) for c in t.transforms)


def build_transforms(
    spec: TransformSpec,
    default: Optional[A.Compose] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    name: str = "train_transforms",
) -> A.Compose:
    """The pipeline for ``spec``, or ``default`` when spec is None.

    ``spec`` is either a list whose entries are transform names (``"HorizontalFlip"``), dicts
    ``{class_path: "albumentations.HorizontalFlip", init_args: {p: 0.5}}`` (``transforms: [...]`` nests
    inside OneOf/Compose), or albumentations' own serialised dict (``A.to_dict``). Normalize(mean, std)
    and ToTensorV2 are appended unless the spec has them; masks are resampled with INTER_NEAREST_EXACT
    (centre-aligned like the image's interpolation). Raises ValueError naming the bad entry.
    """
    if spec is None:
        return default
    if isinstance(spec, dict) and ("transform" in spec or "__class_fullname__" in spec):
        try:
            loaded = A.from_dict(spec if "transform" in spec else {"transform": spec})
        except Exception as e:
            raise ValueError(f"{name}: not a valid albumentations serialised pipeline ({e})") from None
        ops = [loaded]
    elif isinstance(spec, (list, tuple)):
        ops, errors = [], []
        for i, entry in enumerate(spec):
            try:
                ops.append(_build_entry(entry, f"{name}[{i}]"))
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("\n".join(errors))
    else:
        raise ValueError(
            f"{name}: expected a list of transforms or an albumentations serialised dict, got {type(spec).__name__}"
        )
    if not any(_contains(t, A.Normalize) for t in ops):
        ops.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    if not any(_contains(t, ToTensorV2) for t in ops):
        ops.append(ToTensorV2())
    return A.Compose(ops, mask_interpolation=MASK_INTERP)
