"""albumentations pipelines: defaults for classification and segmentation, and specs from YAML.

Every pipeline ends with ``Normalize(mean, std)`` and ``ToTensorV2`` (appended to a user spec that lacks
them), so datasets always return float32 CHW tensors.
"""
from __future__ import annotations

import importlib
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BaseTransformInitSchema, BasicTransform, ImageOnlyTransform
from albumentations.pytorch import ToTensorV2
from pydantic import Field
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

#: the normalisation used when neither the user nor the backbone's pretrained config gives one: timm's constants
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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
    in_chans: int = 3,
) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Explicit mean/std > the backbone's pretrained data config > ImageNet, one value per channel.

    The RGB defaults are fitted to ``in_chans`` as the patch kernel is (``rgb_stats_for_channels``);
    explicit values need ``in_chans`` entries, or one that is repeated. Raises ValueError otherwise.
    """
    cfg_mean, cfg_std = IMAGENET_MEAN, IMAGENET_STD
    if backbone and (mean is None or std is None):
        try:
            from vitmha.models.config import pretrained_data_config
        except ImportError:  # models package not importable yet: ImageNet statistics
            pretrained_data_config = None
        if pretrained_data_config is not None:
            cfg = pretrained_data_config(backbone)
            cfg_mean, cfg_std = tuple(cfg.get("mean", cfg_mean)), tuple(cfg.get("std", cfg_std))
    in_chans = int(in_chans)
    mean = tuple(float(m) for m in mean) if mean is not None else rgb_stats_for_channels(cfg_mean, in_chans)
    std = tuple(float(s) for s in std) if std is not None else rgb_stats_for_channels(cfg_std, in_chans)
    mean, std = (v * in_chans if len(v) == 1 else v for v in (mean, std))
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean and std need {in_chans} values (one per channel, in_chans={in_chans}) or one for "
                         f"all, got mean={list(mean)}, std={list(std)}")
    return mean, std


def rgb_stats_for_channels(values: Sequence[float], in_chans: int) -> Tuple[float, ...]:
    """RGB mean or std for ``in_chans`` channels, matched to how pretrained RGB patch kernels are adapted
    (``vitmha.models.weights.adapt_input_channels``): one channel gets the mean of the three values; other
    counts channel i the value of RGB channel i mod 3."""
    values = tuple(float(v) for v in values)
    if in_chans == len(values):
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


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


def mae_train(image_size: int, mean, std, hflip: float = 0.5, scale: Tuple[float, float] = (0.2, 1.0)) -> A.Compose:
    """MAE's pre-training augmentation (He et al. 2022; facebookresearch/mae ``main_pretrain.py``):
    RandomResizedCrop (area ``scale``, ratio 3/4-4/3, bicubic), horizontal flip, no colour jitter."""
    s = int(image_size)
    ops = [A.RandomResizedCrop(size=(s, s), scale=tuple(scale), ratio=(3 / 4, 4 / 3), interpolation=cv2.INTER_CUBIC),
           A.HorizontalFlip(p=hflip)]
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


# --- RandAugment, TrivialAugment and random erasing (DeiT's fine-tuning recipe) --------------------------
# Own code on uint8 numpy images (cv2 for the warps and the 3x3 filter). The ops follow timm's
# RandAugment (timm.data.auto_augment), which is PIL-based: colour ops as PIL's ImageOps/ImageEnhance
# (grey = ITU-R 601-2 luma, blends truncated to uint8), geometric ops through pixel centres as PIL's
# affine transform, bilinear or bicubic at random, the border filled with the dataset mean.

class AugmentSpecError(ValueError):
    """A bad augmentation setting (printed by the CLI as one ``error:`` line naming the setting)."""


#: the ``auto_augment`` settings the classification data modules understand
AUTO_AUGMENT_HELP = ("timm's RandAugment string such as rand-m9-mstd0.5-inc1 (keys m, n, mstd, mmax, inc, p), "
                     "or trivial (TrivialAugmentWide)")
_INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def _luma(img: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grey of an RGB image as PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
    if img.shape[2] != 3:
        return img.mean(axis=2).round().astype(np.uint8)
    x = img.astype(np.uint32)
    return ((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def _blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    """PIL's Image.blend(degenerate, img, factor): degenerate + factor (img - degenerate), clipped, truncated."""
    out = degenerate.astype(np.float32) + np.float32(factor) * (img.astype(np.float32) - degenerate)
    return np.clip(out, 0, 255).astype(np.uint8)


def _lut(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut`` (256,) or (C, 256) applied per channel."""
    lut = np.clip(np.asarray(lut), 0, 255).astype(np.uint8)
    if lut.ndim == 1:
        return lut[img]
    return np.stack([lut[c][img[..., c]] for c in range(img.shape[2])], axis=2)


def aug_identity(img: np.ndarray, *_: Any) -> np.ndarray:
    return img


def aug_invert(img: np.ndarray, *_: Any) -> np.ndarray:
    return 255 - img


def aug_auto_contrast(img: np.ndarray, *_: Any) -> np.ndarray:
    """Each channel stretched from its min..max to 0..255 (PIL ImageOps.autocontrast, cutoff 0)."""
    luts = []
    for c in range(img.shape[2]):
        lo, hi = int(img[..., c].min()), int(img[..., c].max())
        if hi <= lo:
            luts.append(np.arange(256))
        else:
            scale = 255.0 / (hi - lo)
            luts.append(np.trunc(np.arange(256) * scale - lo * scale))
    return _lut(img, np.stack(luts))


def aug_equalize(img: np.ndarray, *_: Any) -> np.ndarray:
    """Histogram equalisation per channel, PIL's rule (ImageOps.equalize): lut[i] = (step // 2 + number of
    pixels below i) // step, step = (pixels - pixels of the highest level) // 255."""
    luts = []
    for c in range(img.shape[2]):
        h = np.bincount(img[..., c].ravel(), minlength=256)
        nonzero = h[h > 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255 if len(nonzero) > 1 else 0
        if step == 0:
            luts.append(np.arange(256))
        else:
            below = np.concatenate([[0], np.cumsum(h)[:-1]])
            luts.append((step // 2 + below) // step)
    return _lut(img, np.stack(luts))


def aug_posterize(img: np.ndarray, bits: int, *_: Any) -> np.ndarray:
    """Keep the ``bits`` most significant bits (8 or more: unchanged)."""
    bits = int(bits)
    if bits >= 8:
        return img
    return img & np.uint8((0xFF << (8 - max(bits, 0))) & 0xFF)


def aug_solarize(img: np.ndarray, threshold: int, *_: Any) -> np.ndarray:
    """Invert the pixels at or above ``threshold`` (256: unchanged)."""
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def aug_solarize_add(img: np.ndarray, add: int, *_: Any) -> np.ndarray:
    """Add ``add`` to the pixels below 128 (saturating)."""
    lut = np.arange(256)
    lut[:128] = np.minimum(255, lut[:128] + int(add))
    return _lut(img, lut)


def aug_color(img: np.ndarray, factor: float, *_: Any) -> np.ndarray:
    """Saturation: blend with the grey image (PIL ImageEnhance.Color); 0 = grey, 1 = unchanged."""
    if img.shape[2] != 3:
        return img
    return _blend(np.repeat(_luma(img)[..., None], 3, axis=2), img, factor)


def aug_contrast(img: np.ndarray, factor: float, *_: Any) -> np.ndarray:
    """Blend with the mean grey level (PIL ImageEnhance.Contrast); 0 = flat grey, 1 = unchanged."""
    mean = int(_luma(img).mean() + 0.5)
    return _blend(np.full_like(img, mean), img, factor)


def aug_brightness(img: np.ndarray, factor: float, *_: Any) -> np.ndarray:
    """Blend with black (PIL ImageEnhance.Brightness); 0 = black, 1 = unchanged."""
    return _blend(np.zeros_like(img), img, factor)


def aug_sharpness(img: np.ndarray, factor: float, *_: Any) -> np.ndarray:
    """Blend with PIL's SMOOTH-filtered image (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, border pixels kept):
    below 1 blurs, above 1 sharpens (PIL ImageEnhance.Sharpness)."""
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    smooth = cv2.filter2D(img.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REPLICATE)
    smooth = np.clip(np.floor(smooth + 0.5), 0, 255).astype(np.uint8).reshape(img.shape)
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return _blend(smooth, img, factor)


def _warp(img: np.ndarray, inverse: np.ndarray, fill: Sequence[float], interpolation: int) -> np.ndarray:
    """Output pixel centre (x + .5, y + .5) samples the input at ``inverse`` @ (x + .5, y + .5, 1) (PIL's
    affine convention), via cv2 whose pixel centres are at integers."""
    a, b, c, d, e, f = (float(v) for v in np.asarray(inverse, np.float64).ravel()[:6])
    m = np.array([[a, b, c + 0.5 * (a + b - 1)], [d, e, f + 0.5 * (d + e - 1)]], np.float64)
    h, w = img.shape[:2]
    border = tuple(float(v) for v in fill)[: img.shape[2]] or (0.0,)
    out = cv2.warpAffine(img, m, (w, h), flags=interpolation | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return out.reshape(img.shape)


def aug_rotate(img: np.ndarray, degrees: float, fill: Sequence[float] = (0, 0, 0),
               interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Rotate counter-clockwise by ``degrees`` about the image centre (PIL Image.rotate)."""
    h, w = img.shape[:2]
    t = math.radians(degrees)
    cx, cy = w / 2.0, h / 2.0
    cos, sin = math.cos(t), math.sin(t)
    # output -> input: rotate the offset from the centre by -degrees on screen (y points down)
    inverse = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    return _warp(img, inverse, fill, interpolation)


def aug_shear_x(img: np.ndarray, factor: float, fill: Sequence[float] = (0, 0, 0),
                interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Input x = x + factor * y (PIL affine (1, factor, 0, 0, 1, 0), about the top-left corner, as timm)."""
    return _warp(img, [1, factor, 0, 0, 1, 0], fill, interpolation)


def aug_shear_y(img: np.ndarray, factor: float, fill: Sequence[float] = (0, 0, 0),
                interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    return _warp(img, [1, 0, 0, factor, 1, 0], fill, interpolation)


def aug_translate_x(img: np.ndarray, fraction: float, fill: Sequence[float] = (0, 0, 0),
                    interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Content moves left by ``fraction`` of the width (input x = x + fraction * width, as timm)."""
    return _warp(img, [1, 0, fraction * img.shape[1], 0, 1, 0], fill, interpolation)


def aug_translate_y(img: np.ndarray, fraction: float, fill: Sequence[float] = (0, 0, 0),
                    interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    return _warp(img, [1, 0, 0, 0, 1, fraction * img.shape[0]], fill, interpolation)


#: name -> (function, needs fill/interpolation)
AUGMENT_OPS: Dict[str, Tuple[Any, bool]] = {
    "Identity": (aug_identity, False), "AutoContrast": (aug_auto_contrast, False),
    "Equalize": (aug_equalize, False), "Invert": (aug_invert, False), "Rotate": (aug_rotate, True),
    "Posterize": (aug_posterize, False), "Solarize": (aug_solarize, False), "SolarizeAdd": (aug_solarize_add, False),
    "Color": (aug_color, False), "Contrast": (aug_contrast, False), "Brightness": (aug_brightness, False),
    "Sharpness": (aug_sharpness, False), "ShearX": (aug_shear_x, True), "ShearY": (aug_shear_y, True),
    "TranslateXRel": (aug_translate_x, True), "TranslateYRel": (aug_translate_y, True),
}


def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def rand_augment_arg(op: str, magnitude: float, increasing: bool, rng: random.Random) -> Any:
    """timm's level-to-argument mapping of a RandAugment op at ``magnitude`` (0..10; 10 = the largest of
    timm's ranges: ±30°, shear ±0.3, translate ±45 %, enhance factor 1 ± 0.9 (increasing) or 0.1..1.9)."""
    level = magnitude / 10.0
    if op == "Rotate":
        return _signed(30.0 * level, rng)
    if op in ("ShearX", "ShearY"):
        return _signed(0.3 * level, rng)
    if op in ("TranslateXRel", "TranslateYRel"):
        return _signed(0.45 * level, rng)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return 1.0 + _signed(0.9 * level, rng) if increasing else 1.8 * level + 0.1
    if op == "Posterize":
        return 4 - int(level * 4) if increasing else int(level * 4)
    if op == "Solarize":
        t = min(256, int(level * 256))
        return 256 - t if increasing else t
    if op == "SolarizeAdd":
        return min(128, int(level * 110))
    return None


#: TrivialAugmentWide's ranges (Müller & Hutter 2021, torchvision): argument at the largest magnitude bin
_TRIVIAL_WIDE = {"Identity": None, "ShearX": 0.99, "ShearY": 0.99, "TranslateXRel": 32 / 224,
                 "TranslateYRel": 32 / 224, "Rotate": 135.0, "Brightness": 0.99, "Color": 0.99, "Contrast": 0.99,
                 "Sharpness": 0.99, "Posterize": None, "Solarize": None, "AutoContrast": None, "Equalize": None}
_TRIVIAL_BINS = 31


def trivial_augment_arg(op: str, level: int, rng: random.Random) -> Any:
    """TrivialAugmentWide's argument of ``op`` at magnitude bin ``level`` (0..30)."""
    frac = level / (_TRIVIAL_BINS - 1)
    if op == "Posterize":
        return 8 - int(round(level / ((_TRIVIAL_BINS - 1) / 6)))  # 8 bits down to 2
    if op == "Solarize":
        return int(255 * (1 - frac))  # threshold 255 down to 0
    top = _TRIVIAL_WIDE[op]
    if top is None:
        return None
    v = top * frac
    return 1.0 + _signed(v, rng) if op in ("Brightness", "Color", "Contrast", "Sharpness") else _signed(v, rng)


def _check_uint8(img: np.ndarray, name: str) -> None:
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"{name} works on (H, W, C) uint8 images before Normalize, got {img.dtype} {img.shape}")


def _run_ops(img: np.ndarray, ops: List[Tuple[str, Any, int]], fill: Sequence[float]) -> np.ndarray:
    for name, arg, interpolation in ops:
        fn, geometric = AUGMENT_OPS[name]
        img = fn(img, arg, fill, interpolation) if geometric else fn(img, arg)
    return np.ascontiguousarray(img)


class _AugmentBase(ImageOnlyTransform):
    def _interpolation(self) -> int:
        if self.interpolation == "random":  # timm: bilinear or bicubic, drawn per op
            return self.py_random.choice((cv2.INTER_LINEAR, cv2.INTER_CUBIC))
        return _INTERPOLATIONS[self.interpolation]

    def apply(self, img: np.ndarray, ops: Sequence[Tuple[str, Any, int]] = (), **params: Any) -> np.ndarray:
        _check_uint8(img, type(self).__name__)
        return _run_ops(img, list(ops), self.fill)


class RandAugment(_AugmentBase):
    """RandAugment (Cubuk et al. 2020) with timm's semantics: ``num_ops`` ops drawn uniformly with replacement
    from timm's 15 (``increasing``: the "inc1" set, whose every op gets stronger with the magnitude), each
    applied with probability ``op_prob``, at a magnitude drawn per op from N(``magnitude``,
    ``magnitude_std``) clipped to [0, ``magnitude_max``]. ``rand-m9-mstd0.5-inc1`` = magnitude 9, std 0.5,
    increasing, 2 ops, op_prob 0.5 (:func:`auto_augment_transform` parses such strings). On uint8 images.

    Args:
        num_ops: ops per image.
        magnitude: mean magnitude, 0..10 (timm's scale).
        magnitude_std: std of the per-op magnitude noise (0: fixed; inf: uniform in [0, magnitude]).
        magnitude_max: upper clip of the magnitude.
        increasing: timm's "inc1" op set (else the original, where posterize/solarize/enhance weaken with
            the magnitude).
        op_prob: probability that each drawn op is applied.
        fill: border fill of the geometric ops (pixel values; timm uses the dataset mean).
        interpolation: ``random`` (bilinear or bicubic per op, as timm), ``bilinear``, ``bicubic`` or ``nearest``.
        p: probability of the whole transform.
    """

    OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

    class InitSchema(BaseTransformInitSchema):
        num_ops: int = Field(ge=0)
        magnitude: float = Field(ge=0)
        magnitude_std: float = Field(ge=0)
        magnitude_max: float = Field(gt=0)
        increasing: bool
        op_prob: float = Field(ge=0, le=1)
        fill: Tuple[float, ...]
        interpolation: str

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 magnitude_max: float = 10.0, increasing: bool = True, op_prob: float = 0.5,
                 fill: Tuple[float, ...] = (128.0, 128.0, 128.0), interpolation: str = "random", p: float = 1.0):
        super().__init__(p=p)
        if interpolation != "random" and interpolation not in _INTERPOLATIONS:
            raise AugmentSpecError(f"interpolation must be random, {', '.join(_INTERPOLATIONS)}; got {interpolation!r}")
        self.num_ops, self.magnitude, self.magnitude_std = int(num_ops), float(magnitude), float(magnitude_std)
        self.magnitude_max, self.increasing, self.op_prob = float(magnitude_max), bool(increasing), float(op_prob)
        self.fill, self.interpolation = tuple(float(v) for v in fill), interpolation

    def get_params(self) -> Dict[str, Any]:
        rng, ops = self.py_random, []
        for _ in range(self.num_ops):
            name = rng.choice(self.OP_NAMES)
            if self.op_prob < 1.0 and rng.random() > self.op_prob:
                continue
            m = self.magnitude
            if math.isinf(self.magnitude_std):
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.gauss(m, self.magnitude_std)
            m = max(0.0, min(m, self.magnitude_max))
            ops.append((name, rand_augment_arg(name, m, self.increasing, rng), self._interpolation()))
        return {"ops": ops}

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("num_ops", "magnitude", "magnitude_std", "magnitude_max", "increasing", "op_prob", "fill",
                "interpolation")


class TrivialAugment(_AugmentBase):
    """TrivialAugmentWide (Müller & Hutter 2021): one op per image, uniformly from 14 (identity included), at a
    magnitude bin drawn uniformly from 31, with torchvision's wide ranges (shear 0.99, rotate 135°,
    enhance 1 ± 0.99, posterize 8..2 bits, solarize threshold 255..0; translate 32/224 of the side, i.e.
    torchvision's 32 px at 224 px). On uint8 images.

    Args:
        fill: border fill of the geometric ops (pixel values).
        interpolation: ``random``, ``bilinear``, ``bicubic`` or ``nearest``.
        p: probability of the whole transform.
    """

    class InitSchema(BaseTransformInitSchema):
        fill: Tuple[float, ...]
        interpolation: str

    def __init__(self, fill: Tuple[float, ...] = (128.0, 128.0, 128.0), interpolation: str = "random",
                 p: float = 1.0):
        super().__init__(p=p)
        if interpolation != "random" and interpolation not in _INTERPOLATIONS:
            raise AugmentSpecError(f"interpolation must be random, {', '.join(_INTERPOLATIONS)}; got {interpolation!r}")
        self.fill, self.interpolation = tuple(float(v) for v in fill), interpolation

    def get_params(self) -> Dict[str, Any]:
        rng = self.py_random
        name = rng.choice(tuple(_TRIVIAL_WIDE))
        level = rng.randrange(_TRIVIAL_BINS)
        return {"ops": [(name, trivial_augment_arg(name, level, rng), self._interpolation())]}

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("fill", "interpolation")


class RandomErasing(ImageOnlyTransform):
    """Random erasing (Zhong et al. 2020) with timm's semantics (``reprob``, ``remode``, ``recount``): with
    probability ``p``, up to ``count`` boxes, each of area U(``scale``) x image area / count and aspect ratio
    log-uniform in ``ratio`` (10 tries to fit), filled with noise. Put it after Normalize, as timm does: on
    float (normalised) images mode ``pixel`` fills N(0, 1) per pixel and channel, ``rand`` one N(0, 1) value
    per channel, ``const`` 0 (the mean). On uint8 images the noise is uniform in 0..255 (``const``: 0).

    Args:
        scale: range of the erased share of the image area.
        ratio: range of the box's aspect ratio (height / width), sampled log-uniformly.
        mode: ``pixel``, ``rand`` or ``const``.
        count: largest number of boxes (the number is drawn from 1..count).
        p: probability of erasing an image.
    """

    class InitSchema(BaseTransformInitSchema):
        scale: Tuple[float, float]
        ratio: Tuple[float, float]
        mode: str
        count: int = Field(ge=1)

    def __init__(self, scale: Tuple[float, float] = (0.02, 1 / 3), ratio: Tuple[float, float] = (0.3, 1 / 0.3),
                 mode: str = "pixel", count: int = 1, p: float = 0.25):
        super().__init__(p=p)
        if mode not in ("pixel", "rand", "const"):
            raise AugmentSpecError(f"remode: must be pixel, rand or const, got {mode!r}")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise AugmentSpecError(f"scale must be within (0, 1] and ratio positive, both (low, high); "
                                   f"got {scale}, {ratio}")
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.mode, self.count = mode, int(count)

    def get_params_dependent_on_data(self, params: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
        h, w = data["image"].shape[:2]
        rng = self.py_random
        boxes = []
        n = self.count if self.count == 1 else rng.randint(1, self.count)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(n):
            for _attempt in range(10):
                area = rng.uniform(*self.scale) * h * w / n
                aspect = math.exp(rng.uniform(*log_ratio))
                bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if bw < w and bh < h:
                    top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                    boxes.append((top, left, bh, bw))
                    break
        return {"boxes": boxes, "noise_seed": int(self.random_generator.integers(2**63))}

    def apply(self, img: np.ndarray, boxes: Sequence[Tuple[int, int, int, int]] = (), noise_seed: int = 0,
              **params: Any) -> np.ndarray:
        if not boxes:
            return img
        gen = np.random.default_rng(noise_seed)
        out = img.copy()
        channels = img.shape[2] if img.ndim == 3 else 1
        for top, left, bh, bw in boxes:
            shape = (bh, bw, channels) if self.mode == "pixel" else (1, 1, channels)
            if self.mode == "const":
                noise = np.zeros(shape, np.float32)
            elif img.dtype == np.uint8:
                noise = gen.integers(0, 256, shape)
            else:
                noise = gen.standard_normal(shape)
            region = out[top:top + bh, left:left + bw]
            region[...] = np.broadcast_to(noise, (bh, bw, channels)).reshape(region.shape).astype(img.dtype)
        return out

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("scale", "ratio", "mode", "count")


def auto_augment_transform(spec: Optional[str], fill: Sequence[float] = (128, 128, 128),
                           where: str = "auto_augment") -> Optional[ImageOnlyTransform]:
    """The transform for an ``auto_augment`` setting: timm's ``rand-m9-mstd0.5-inc1`` grammar (sections
    ``m`` magnitude, ``n`` ops, ``mstd`` magnitude std (> 100: uniform), ``mmax`` magnitude clip, ``inc``
    0/1, ``p`` op probability; timm's defaults m10 n2 mstd0 inc0 p0.5), ``trivial`` (TrivialAugmentWide),
    or None. Raises AugmentSpecError (a ValueError) naming ``where`` for anything else."""
    if spec is None or spec == "" or spec == "none":
        return None
    if spec in ("trivial", "trivialaugment", "ta_wide"):
        return TrivialAugment(fill=tuple(fill))
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise AugmentSpecError(f"{where}: unknown policy {spec!r}; expected {AUTO_AUGMENT_HELP}")
    kw: Dict[str, Any] = dict(num_ops=2, magnitude=10.0, magnitude_std=0.0, magnitude_max=10.0, increasing=False,
                              op_prob=0.5)
    keys = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing",
            "p": "op_prob"}
    for part in parts[1:]:
        key = part.rstrip("0123456789.")
        value = part[len(key):]
        if key not in keys or not value:
            raise AugmentSpecError(f"{where}: {spec!r}: unknown section {part!r} (sections: m9, n2, mstd0.5, mmax10, "
                                   "inc1, p0.5)")
        try:
            number = float(value)
        except ValueError:
            raise AugmentSpecError(f"{where}: {spec!r}: {part!r} is not a number") from None
        if key == "mstd" and number > 100:
            number = float("inf")
        kw[keys[key]] = bool(int(number)) if key == "inc" else (int(number) if key == "n" else number)
    return RandAugment(fill=tuple(fill), **kw)


def classification_train_recipe(image_size: int, mean, std, hflip: float = 0.0,
                                scale: Tuple[float, float] = (0.8, 1.0), auto_augment: Optional[str] = None,
                                reprob: float = 0.0, remode: str = "pixel", recount: int = 1) -> A.Compose:
    """The train pipeline of a classification data module: :func:`classification_train` when neither
    ``auto_augment`` nor ``reprob`` is set; otherwise timm's/DeiT's: RandomResizedCrop, flip, the
    ``auto_augment`` policy (its border fill the dataset mean), Normalize, RandomErasing(``reprob``)."""
    if not auto_augment and not reprob:
        return classification_train(image_size, mean, std, hflip, scale)
    s = int(image_size)
    fill = tuple(min(255.0, round(255 * m)) for m in mean)
    ops: List[Any] = [A.RandomResizedCrop(size=(s, s), scale=tuple(scale), ratio=(3 / 4, 4 / 3)),
                      A.HorizontalFlip(p=hflip)]
    policy = auto_augment_transform(auto_augment, fill)
    if policy is not None:
        ops.append(policy)
    ops.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    if reprob:
        ops.append(RandomErasing(p=float(reprob), mode=remode, count=recount))
    return A.Compose(ops + [ToTensorV2()], mask_interpolation=MASK_INTERP)
