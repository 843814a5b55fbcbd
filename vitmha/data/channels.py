"""Images of any number of channels in the file data modules (``in_chans``).

Three channels are read as before: 8-bit RGB (grey replicated, alpha dropped). Any other count (or a
``max_pixel_value``) selects the *raw* reader (``vitmha.data.io.read_channels``): the file's own channels as
float32 in [0, 1] — grey PNG/JPEG one channel, 16-bit PNG/TIFF scaled by 65535 (or ``max_pixel_value``),
multi-band TIFF (H, W, C) or planar (C, H, W) C channels. This module fits the albumentations pipelines to
such images, computes ``mean: auto`` / ``std: auto`` from the training images, and checks that the data's
channel count is the model's.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import albumentations as A
import numpy as np

from vitmha.data.errors import DataValidationError
from vitmha.data.io import parallel_map
from vitmha.data.transforms import MASK_INTERP

AUTO = "auto"
_NOT_AUGMENTATION = ("Normalize", "ToTensorV2")


def is_raw(in_chans: int, max_pixel_value: Optional[float]) -> bool:
    """True when images are read as float32 in [0, 1] with their own channels (not as 8-bit RGB)."""
    return int(in_chans) != 3 or max_pixel_value is not None


def check_in_chans(in_chans: int, max_pixel_value: Optional[float]) -> None:
    """ValueError naming the argument when ``in_chans`` or ``max_pixel_value`` is not positive."""
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if max_pixel_value is not None and not float(max_pixel_value) > 0:
        raise ValueError(f"max_pixel_value must be > 0, got {max_pixel_value}")


def split_auto(value: Any, name: str) -> Tuple[Optional[Sequence[float]], bool]:
    """(explicit values or None, whether ``value`` is ``"auto"``); ValueError for any other string."""
    if isinstance(value, str):
        if value.strip().lower() != AUTO:
            raise ValueError(f"{name}: expected a list of numbers or 'auto', got {value!r}")
        return None, True
    return value, False


# ------------------------------------------------------------------------------------------- pipelines
Leaf = Dict[str, Any]  # one transform of an A.to_dict tree


def _map_tree(d: Leaf, fn: Callable[[Leaf], Optional[Leaf]]) -> Optional[Leaf]:
    """The transform tree ``d`` with each leaf replaced by ``fn(leaf)``; a leaf mapped to None is dropped,
    and so is a composition left empty."""
    if "transforms" not in d:
        return fn(d)
    kids = [k for k in (_map_tree(c, fn) for c in d["transforms"]) if k is not None]
    return {**d, "transforms": kids} if kids else None


def _from_dict(d: Dict[str, Any]):
    """The transform (tree) of an ``A.to_dict`` entry. ``mask_interpolation`` is left out: albumentations'
    argument check refuses cv2.INTER_NEAREST_EXACT, which the enclosing Compose sets on every transform."""
    d = _map_tree(d, lambda leaf: {k: v for k, v in leaf.items() if k != "mask_interpolation"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return A.from_dict({"transform": d})


def _fails(leaf: Dict[str, Any], image: np.ndarray) -> Optional[str]:
    """What the transform raises on ``image`` (applied for sure), or None."""
    try:
        t = _from_dict({**leaf, "p": 1.0})
        mask = np.zeros(image.shape[:2], np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            A.Compose([t])(image=image, mask=mask)
    except Exception as e:  # noqa: BLE001 - any failure of the transform on this input
        return " ".join(str(e).split()) or type(e).__name__
    return None


def fit_pipeline(pipeline: A.Compose, in_chans: int, raw: bool, image_size: int, name: str,
                 user: bool) -> A.Compose:
    """``pipeline`` for the images the data module reads.

    8-bit RGB (``raw`` False): unchanged. Raw float32 images in [0, 1]: ``Normalize`` with the default
    ``max_pixel_value`` 255 divides by 1 instead (the reader has scaled the pixels), and a transform that
    works on 8-bit RGB but fails on ``in_chans`` float channels (ColorJitter, ToGray, HueSaturationValue,
    RGBShift, CLAHE, RandAugment, ...) is dropped from a default pipeline (with a warning that names it), or
    refused in the user's (``user``): ValueError naming ``name`` and the transform. Each transform is tried
    once, on a random image, when the module is built.
    """
    if not raw:
        return pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = A.to_dict(pipeline)["transform"]
    side = int(image_size) + 8
    probe = np.random.default_rng(0).random((side, side, int(in_chans)), dtype=np.float32)
    rgb = (probe[:, :, :1].repeat(3, axis=2) * 255).astype(np.uint8)
    bad = []

    def fit(leaf: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        cls = leaf["__class_fullname__"].rsplit(".", 1)[-1]
        if cls == "Normalize":
            if float(leaf.get("max_pixel_value") or 255.0) == 255.0:
                return {**leaf, "max_pixel_value": 1.0}
            return leaf
        if cls in _NOT_AUGMENTATION:
            return leaf
        err = _fails(leaf, probe)
        if err is not None and _fails(leaf, rgb) is None:
            bad.append(f"{cls} ({err})")
            return None
        return leaf

    fitted = _map_tree(tree, fit)
    if bad and user:
        raise ValueError(f"{name}: {', '.join(bad)}: these transforms need 3-channel (RGB) images; with "
                         f"in_chans={in_chans} the images have {in_chans} float channel(s) in [0, 1] "
                         "(drop them, or use geometric and intensity transforms)")
    if bad:
        warnings.warn(f"{name}: in_chans={in_chans}: left out of the default pipeline, they need 3-channel (RGB) "
                      f"images: {', '.join(b.split(' (')[0] for b in bad)}", UserWarning, stacklevel=3)
    top = _from_dict(fitted)
    return A.Compose(list(top.transforms), mask_interpolation=MASK_INTERP)


# ------------------------------------------------------------------------------------------ statistics
def channel_mean_std(paths: Sequence[str], read: Callable[[str], np.ndarray],
                     max_images: int = 1000) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """Per-channel mean and std of the pixels of ``paths`` as ``read`` gives them (uint8 / 255, float as is),
    over at most ``max_images`` evenly spaced images; returns (mean, std, images used)."""
    if not paths:
        raise ValueError("no images to compute mean/std from")
    idx = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), int(max_images))).round().astype(int))
    picked = [paths[i] for i in idx]

    def moments(path: str) -> np.ndarray:
        a = read(path)
        unit = 1 / 255.0 if a.dtype == np.uint8 else 1.0
        a = a.reshape(-1, a.shape[-1] if a.ndim == 3 else 1).astype(np.float64) * unit
        return np.stack([a.sum(0), (a * a).sum(0), np.full(a.shape[1], a.shape[0], np.float64)])

    total = sum(parallel_map(moments, picked))
    mean = total[0] / total[2]
    std = np.sqrt(np.maximum(total[1] / total[2] - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel: no scaling rather than a division by zero
    return tuple(float(m) for m in mean), tuple(float(s) for s in std), len(picked)


def grey_channels(in_chans: int) -> int:
    """``in_chans`` of a grey dataset: 1 (as it is) or 3 (replicated); ValueError for others."""
    if int(in_chans) not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (grey replicated to RGB) for this grey dataset, "
                         f"got {in_chans}")
    return int(in_chans)


# ------------------------------------------------------------------------------------------ the model
def model_in_chans(model: Any) -> Optional[int]:
    """Input channels of the first ViT patch embedding in ``model`` (None when it has none)."""
    if model is None or not hasattr(model, "modules"):
        return None
    for m in model.modules():
        proj = getattr(getattr(m, "patch_embed", None), "proj", None)
        if proj is not None and hasattr(proj, "in_channels"):
            return int(proj.in_channels)
    return None


def check_model_channels(datamodule: Any) -> None:
    """DataValidationError when the data module's ``in_chans`` is not what the attached model's patch
    embedding takes (nothing to check without a trainer or a ViT)."""
    trainer = getattr(datamodule, "trainer", None)
    model = getattr(trainer, "lightning_module", None) if trainer is not None else None
    want = model_in_chans(model)
    have = int(getattr(datamodule, "in_chans", 3))
    if want is not None and want != have:
        raise DataValidationError([("in_chans", f"the data module reads images with {have} channel(s), but the "
                                    f"model's patch embedding takes {want}: give the model "
                                    f"backbone_kwargs.in_chans: {have} (the vitmha CLI passes it on to the data "
                                    f"module), or the data module in_chans: {want}")])


# ------------------------------------------------------------------------------------------ the mixin
class ChannelOptions:
    """``in_chans``, ``max_pixel_value`` and ``mean/std: auto`` for a file data module (mixed in before
    BaseDataModule). The subclass calls ``_init_channels`` before ``_init_loader``, builds its pipelines in
    ``_build_transforms`` (through ``_fit``), calls ``_auto_stats`` in ``setup`` before building datasets,
    and lists its training images in ``_train_paths``.

    Statistics computed for ``auto`` replace ``auto`` in the module's hyper-parameters and are kept in its
    checkpoint state, so ``load_from_checkpoint``, ``vitmha predict --ckpt_path`` and the tools normalise
    with the same numbers.
    """

    in_chans: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    datasets: Dict[str, Any]
    train_transform: Any
    val_transform: Any

    def _init_channels(self, in_chans: int, max_pixel_value: Optional[float], mean: Any,
                       std: Any) -> Tuple[Optional[Sequence[float]], Optional[Sequence[float]]]:
        """Check and store the options; returns the explicit mean/std (None for defaults and ``auto``)."""
        import functools

        from vitmha.data.io import check_image, image_reader

        check_in_chans(in_chans, max_pixel_value)
        mean, self._mean_auto = split_auto(mean, "mean")
        std, self._std_auto = split_auto(std, "std")
        self.max_pixel_value = None if max_pixel_value is None else float(max_pixel_value)
        self.raw = is_raw(in_chans, max_pixel_value)
        self.read = image_reader(in_chans, self.max_pixel_value)
        self.check_image = functools.partial(check_image, in_chans=int(in_chans)) if self.raw else check_image
        self._stats_done = not (self._mean_auto or self._std_auto)
        return mean, std

    def _build_transforms(self) -> None:
        raise NotImplementedError

    def _train_paths(self) -> List[str]:
        raise NotImplementedError

    def _fit(self, pipeline: A.Compose, spec: Any, name: str) -> A.Compose:
        """``pipeline`` fitted to the images read (``fit_pipeline``); a user ``spec`` is checked strictly."""
        try:
            return fit_pipeline(pipeline, self.in_chans, self.raw, self.image_size, name, user=spec is not None)
        except (TypeError, NotImplementedError, KeyError) as e:  # a transform albumentations cannot serialise
            raise ValueError(f"{name}: cannot adapt this pipeline to in_chans={self.in_chans} float images "
                             f"({e}); give it as a list of transforms") from None

    def _auto_stats(self) -> None:
        """Compute ``auto`` mean/std from the training images, once."""
        if self._stats_done:
            return
        from lightning.pytorch.utilities import rank_zero_info

        paths = self._train_paths()
        mean, std, n = channel_mean_std(paths, self.read)
        mean = mean if self._mean_auto else self.mean
        std = std if self._std_auto else self.std
        rank_zero_info(f"mean/std auto: from {n} of {len(paths)} training images ({self.in_chans} channel(s)): "
                       f"mean={[round(m, 4) for m in mean]} std={[round(s, 4) for s in std]}")
        self._apply_stats(mean, std)

    def _apply_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std: {len(self.mean)}/{len(self.std)} values for in_chans={self.in_chans}")
        for key, auto, value in (("mean", self._mean_auto, self.mean), ("std", self._std_auto, self.std)):
            if auto:
                self.hparams[key] = list(value)  # what the checkpoint's datamodule hyper-parameters hold
        self._build_transforms()
        for split, ds in self.datasets.items():
            if hasattr(ds, "transform"):
                ds.transform = self.train_transform if split == "train" else self.val_transform
        self._stats_done = True

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        if (self._mean_auto or self._std_auto) and self._stats_done:
            state["normalization"] = {"mean": list(self.mean), "std": list(self.std)}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        norm = state_dict.get("normalization")
        if norm and (self._mean_auto or self._std_auto):
            self._apply_stats(norm["mean"], norm["std"])

    def predict_dataloader(self):
        self._auto_stats()  # unless a checkpoint's state brought them
        return super().predict_dataloader()  # type: ignore[misc]
