"""Built-in data that needs no download: scikit-learn's real 8×8 digits, and synthetic shape scenes.

Digits (real, 1,797 images) skip albumentations: images live in memory as float arrays, each is warped
with one cv2.warpAffine and whole batches are normalised in numpy (``__getitems__``); this is ~10× faster
than an albumentations Compose per 32-px image and leaves the CPU to the model.
Synthetic shapes (procedurally generated, call them synthetic wherever reported) use the same kind of numpy
fast path for their default augmentation, and albumentations when a ``train_transforms`` spec is given.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from vitmha.data.base import BaseDataModule, collate_pairs
from vitmha.data.sampling import Key, keyed_uniforms, sample_generator, seed_pipeline, split_key
from vitmha.data.transforms import TransformSpec, build_transforms, resolve_mean_std, segmentation_eval

DIGIT_CLASSES = [str(i) for i in range(10)]
SHAPE_CLASSES = ["background", "circle", "rectangle", "triangle"]


# --- digits ------------------------------------------------------------------------------------------


def load_digits_split(image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0):
    """The digits upsampled to image_size (bicubic, values 0..1) and a stratified train/val split.

    Returns (images (N,1,S,S) float32, labels (N,) int64, train_idx, val_idx) with indices into load_digits.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8), 0..16 -> 0..1
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=d.target, random_state=split_seed)
    return x.contiguous(), y, np.sort(train_idx), np.sort(val_idx)


def _passthrough(batch):
    return batch if isinstance(batch, tuple) else collate_pairs(batch)


class _TensorClassification(Dataset):
    """In-memory grey images (N,h,w) (uint8, or float in 0..1) -> normalised (3,S,S) float32, optional affine.

    The resize/warp is one cv2.warpAffine per image and the rest numpy on whole batches (``__getitems__``):
    torch's intra-op threads cost more than they save on such small tensors when the model shares the cores.
    Also used by the real-data modules (Fashion-MNIST, MNIST-5k). Each image's draws are a function of (seed,
    epoch, index) only, taken for the whole batch at once from a keyed SplitMix64 hash (2.4x faster than a
    numpy generator per image: benchmarks/data_draws.py).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, augment: bool = False,
                 max_rotate: float = 10.0, max_shift: float = 0.1, scale: Tuple[float, float] = (0.9, 1.1),
                 seed: int = 0, image_size: Optional[int] = None, hflip: float = 0.0):
        self.images, self.labels = np.ascontiguousarray(images), np.asarray(labels, np.int64)
        self.unit = np.float32(1 / 255 if self.images.dtype == np.uint8 else 1.0)
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.augment, self.max_rotate, self.max_shift, self.scale = augment, max_rotate, max_shift, scale
        self.seed, self.hflip = seed, hflip
        self.size = int(image_size or self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def _params(self, idx: np.ndarray, epochs: List[Optional[int]]) -> np.ndarray:
        """(B, 5) affine draws in [-1, 1] (angle, zoom, x, y, flip): keyed by (seed, epoch, index), or unseeded
        for keys without an epoch."""
        if any(e is None for e in epochs):
            return np.random.default_rng().uniform(-1, 1, (len(idx), 5))
        return keyed_uniforms(self.seed, np.asarray(epochs), idx, 5) * 2 - 1

    def _warp(self, img: np.ndarray, draw: Optional[np.ndarray]) -> np.ndarray:
        import cv2

        h, w = img.shape
        size = self.size
        angle, zoom, tx, ty, flip = 0.0, 1.0, 0.0, 0.0, False
        if draw is not None:
            a, z, tx, ty, f = draw
            lo, hi = self.scale
            angle, zoom = a * self.max_rotate, lo + (z + 1) / 2 * (hi - lo)
            tx, ty, flip = tx * self.max_shift * size, ty * self.max_shift * size, (f + 1) / 2 < self.hflip
        elif (h, w) == (size, size):
            return img
        if flip:
            img = img[:, ::-1]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom * size / w)
        m[:, 2] += (size / 2 - w / 2 + tx, size / 2 - h / 2 + ty)
        return cv2.warpAffine(np.ascontiguousarray(img), m, (size, size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def _batch(self, keys: Sequence[Key]) -> Tuple[torch.Tensor, torch.Tensor]:
        split = [split_key(k) for k in keys]
        idx = np.array([i for i, _ in split], dtype=np.int64)
        draws = self._params(idx, [e for _, e in split]) if self.augment else [None] * len(idx)
        x = np.stack([self._warp(self.images[i], d) for i, d in zip(idx, draws)]).astype(np.float32) * self.unit
        x = (x[:, None] - self.mean) / self.std  # (B,1,S,S) -> (B,3,S,S)
        return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(self.labels[idx])

    def __getitems__(self, keys: Sequence[Key]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._batch(keys)

    def __getitem__(self, key: Key) -> Tuple[torch.Tensor, int]:
        x, y = self._batch([key])
        return x[0], int(y[0])


class _TensorPredict(Dataset):
    def __init__(self, base: _TensorClassification, names: List[str], orig_size: Tuple[int, int]):
        self.base, self.names, self.orig_size = base, names, orig_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        x, _ = self.base[split_key(key)[0]]
        return {"image": x, "path": self.names[split_key(key)[0]], "orig_size": self.orig_size}


class InMemoryClassificationModule(BaseDataModule):
    """Loaders over in-memory splits kept in ``self.datasets`` (train/val/test/predict), batches already
    collated by the datasets."""

    split_collate = {"train": _passthrough, "val": _passthrough, "test": _passthrough}


class DigitsDataModule(InMemoryClassificationModule):
    """scikit-learn's 1,797 real 8×8 handwritten digits, upsampled, as a 10-class image dataset.

    Stratified train/val split (val doubles as test) fixed by ``split_seed``; light random affine
    augmentation (no flips: digits are not symmetric), applied batch-wise in torch.
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        seed: Optional[int] = None,
        split_seed: int = 0,
        val_fraction: float = 0.2,
        augment: bool = True,
        max_rotate: float = 10.0,
        max_shift: float = 0.1,
        scale: Tuple[float, float] = (0.9, 1.1),
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        backbone: Optional[str] = None,
    ):
        """
        Args:
            image_size: side the 8×8 digits are upsampled to (bicubic).
            batch_size: images per batch.
            num_workers: dataloader workers; 0 is fastest here (data is in memory, augmentation is batched).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            split_seed: seed of the stratified train/val split (keep 0 to compare runs on the same val set).
            val_fraction: share of the 1,797 digits held out for val/test (stratified).
            augment: random affine on train images.
            max_rotate: largest rotation in degrees.
            max_shift: largest shift as a fraction of the image side.
            scale: zoom range.
            mean: normalisation mean (RGB, 0..1); default from ``backbone``'s pretrained config, else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.image_size, self.batch_size, self.num_workers = int(image_size), batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.seed = pin_memory, persistent_workers, seed
        self.split_seed, self.val_fraction = split_seed, val_fraction
        self.augment, self.max_rotate, self.max_shift, self.scale = augment, max_rotate, max_shift, tuple(scale)
        self.mean, self.std = resolve_mean_std(mean, std, backbone)
        self.num_classes = 10
        self.classes = list(DIGIT_CLASSES)
        self.datasets: Dict[str, Dataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        x, y, tr, va = load_digits_split(self.image_size, self.val_fraction, self.split_seed)
        x, y = x[:, 0].numpy(), y.numpy()
        self.datasets["train"] = _TensorClassification(
            x[tr], y[tr], self.mean, self.std, self.augment, self.max_rotate, self.max_shift, self.scale)
        self.datasets["val"] = _TensorClassification(x[va], y[va], self.mean, self.std)
        self.datasets["test"] = self.datasets["val"]
        self.datasets["predict"] = _TensorPredict(self.datasets["val"], [f"digits/val/{i:04d}" for i in va], (8, 8))



def export_digits_folder(root: str, image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0) -> str:
    """Write DigitsDataModule's split as an ImageFolder tree of grey PNGs: ``root/{train,val}/<digit>/<id>.png``.

    Returns root. 1,437 train + 360 val images with the defaults.
    """
    x, y, tr, va = load_digits_split(image_size, val_fraction, split_seed)
    arr = (x[:, 0].numpy() * 255 + 0.5).astype(np.uint8)
    for split, idx in (("train", tr), ("val", va)):
        for c in range(10):
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
        for i in idx:
            Image.fromarray(arr[i], mode="L").save(os.path.join(root, split, str(int(y[i])), f"{i:04d}.png"))
    return root


# --- synthetic shapes --------------------------------------------------------------------------------


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                gen: np.random.Generator) -> np.ndarray:
    if kind == 1:  # circle (slightly elliptic)
        e = gen.uniform(0.85, 1.0)
        t = gen.uniform(0, math.pi)
        u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
        v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        return (u / r) ** 2 + (v / (r * e)) ** 2 <= 1.0
    if kind == 2:  # rotated rectangle
        t = gen.uniform(0, math.pi / 2)
        a, b = r * gen.uniform(0.7, 0.95), r * gen.uniform(0.45, 0.95)
        u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
        v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    # triangle: three vertices roughly 120° apart
    t0 = gen.uniform(0, 2 * math.pi)
    angles = t0 + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + gen.uniform(-0.3, 0.3, 3)
    rad = r * gen.uniform(1.0, 1.25, 3)
    px, py = cx + rad * np.cos(angles), cy + rad * np.sin(angles)
    inside = np.ones_like(xx, dtype=bool)
    sign = np.sign((px[1] - px[0]) * (py[2] - py[0]) - (py[1] - py[0]) * (px[2] - px[0]))
    for k in range(3):
        x0, y0, x1, y1 = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
        inside &= sign * ((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)) >= 0
    return inside


def _texture(gen: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A random smooth field in -1..1: gradient, stripes or blobs (to be scaled and added to a colour)."""
    kind = gen.integers(3)
    if kind == 0:
        t = gen.uniform(0, 2 * math.pi)
        return (xx * (2 * math.cos(t) / size) + yy * (2 * math.sin(t) / size)) - 1
    if kind == 1:
        t, f = gen.uniform(0, math.pi), gen.uniform(2, 6)
        return np.sin((xx * math.cos(t) + yy * math.sin(t)) / size * f * 2 * math.pi)
    fx, fy, p = gen.uniform(1, 3, 2)[0], gen.uniform(1, 3), gen.uniform(0, 6.3)
    return np.sin(xx / size * fx * 2 * math.pi + p) * np.cos(yy / size * fy * 2 * math.pi)


def generate_shapes(n: int, image_size: int = 64, seed: int = 0, stream: int = 0,
                    max_objects: int = 3, object_size: Tuple[float, float] = (0.15, 0.3),
                    class_patterns: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Synthetic scenes: textured background with 1..max_objects circles/rectangles/triangles.

    Colours are drawn independently of the class; classes differ in shape and, with ``class_patterns``,
    in fill pattern (circles solid, rectangles diagonal stripes, triangles checks). Without it each object
    gets one of the three patterns at random, so only its outline tells its class. Image i depends only on
    (seed, stream, i). Returns images (n,S,S,3) uint8 and masks (n,S,S) uint8 with 0 = background,
    1 = circle, 2 = rectangle, 3 = triangle.
    """
    s = int(image_size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    images = np.empty((n, s, s, 3), np.uint8)
    masks = np.zeros((n, s, s), np.uint8)
    for i in range(n):
        gen = np.random.default_rng([seed, stream, i])
        bg = gen.uniform(0, 255, 3).astype(np.float32)
        img = bg + (gen.uniform(15, 50) * _texture(gen, yy, xx, s))[..., None] * gen.choice([-1, 1], 3).astype(np.float32)
        mask = np.zeros((s, s), np.uint8)
        for _ in range(gen.integers(1, max_objects + 1)):
            kind = int(gen.integers(1, 4))
            for _try in range(10):
                r = gen.uniform(*object_size) * s   # "radius" as a fraction of the image side
                cy, cx = gen.uniform(r * 0.6, s - r * 0.6, 2)
                m = _shape_mask(kind, yy, xx, cy, cx, r, gen)
                area = np.count_nonzero(m)
                if area >= 12 and np.count_nonzero(mask[m]) < 0.25 * area:
                    break
            while True:  # an honest task: the object must be visible against the background
                col = gen.uniform(0, 255, 3)
                if np.abs(col - bg).sum() > 120:
                    break
            # each class also has its own fill pattern (solid / stripes / checks, random colours), so a
            # class shows inside every patch of it, not only along its outline
            period = max(2.0, s / 16)
            look = kind if class_patterns else int(gen.integers(1, 4))
            if look == 2:
                pattern = np.sign(np.sin(math.pi * (yy + xx) / period))
            elif look == 3:
                pattern = np.sign(np.sin(math.pi * yy / period) * np.sin(math.pi * xx / period))
            else:
                pattern = np.zeros_like(yy)
            fill = col.astype(np.float32)[None] + (40.0 * pattern[m])[:, None]
            img[m] = fill + (gen.uniform(0, 30) * _texture(gen, yy, xx, s)[m])[:, None]
            mask[m] = kind
        img += gen.standard_normal(img.shape, dtype=np.float32) * np.float32(gen.uniform(2, 12))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        masks[i] = mask
    return images, masks


class _ArraySegmentation(Dataset):
    """In-memory uint8 images/masks through an albumentations joint pipeline, seeded by key."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform, seed: int = 0):
        self.images, self.masks, self.transform, self.seed = images, masks, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        seed_pipeline(self.transform, self.seed, key)
        out = self.transform(image=self.images[index], mask=self.masks[index])
        return out["image"], torch.as_tensor(np.asarray(out["mask"])).long()


class _FastShapes(Dataset):
    """The default shapes augmentation without albumentations: flips, 90° rotations and brightness/contrast
    jitter in numpy, normalisation on whole batches (``__getitems__``); ~5× the albumentations path."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, mean, std, hflip: float = 0.5, seed: int = 0):
        self.images, self.masks, self.hflip, self.seed = images, masks, hflip, seed
        self.scale = (1 / (255 * np.asarray(std, np.float32))).reshape(1, 1, 1, 3)
        self.shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 1, 1, 3)

    def __len__(self) -> int:
        return len(self.images)

    def _one(self, key: Key) -> Tuple[np.ndarray, np.ndarray]:
        index, epoch = split_key(key)
        gen = sample_generator(self.seed, epoch, index) if epoch is not None else np.random.default_rng()
        u = gen.random(6)
        img, m = self.images[index], self.masks[index]
        if u[0] < self.hflip:
            img, m = img[:, ::-1], m[:, ::-1]
        if u[1] < 0.5:
            img, m = img[::-1], m[::-1]
        k = int(u[2] * 4)
        img, m = np.rot90(img, k), np.rot90(m, k)
        img = img.astype(np.float32)
        if u[3] < 0.3:  # brightness/contrast jitter around the image mean
            c, b = 0.8 + 0.4 * u[4], (u[5] - 0.5) * 0.4 * 255
            img = np.clip((img - img.mean()) * c + img.mean() + b, 0, 255)
        return img, m

    def __getitems__(self, keys: Sequence[Key]) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._one(k) for k in keys]
        x = np.stack([p[0] for p in pairs]) * self.scale - self.shift  # (B,H,W,3)
        y = np.stack([p[1] for p in pairs]).astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)), torch.from_numpy(y)

    def __getitem__(self, key: Key) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([key])
        return x[0], y[0]


class _ArrayPredict(Dataset):
    def __init__(self, images: np.ndarray, transform, prefix: str):
        self.images, self.transform, self.prefix = images, transform, prefix

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        img = self.images[index]
        return {"image": self.transform(image=img)["image"], "path": f"{self.prefix}/{index:04d}",
                "orig_size": (int(img.shape[0]), int(img.shape[1]))}


def shapes_train_transforms(mean, std, hflip: float = 0.5):
    """Flips, 90° rotations and light colour jitter: cheap, and keep every shape whole."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    return A.Compose([
        A.HorizontalFlip(p=hflip),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.3),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
        ToTensorV2(),
    ])


class SyntheticShapesDataModule(BaseDataModule):
    """Synthetic segmentation scenes (circles, rectangles, triangles on textured backgrounds), in memory.

    4 classes including background; colours are random and independent of the class, so a model has to
    use shape. Generated deterministically from ``data_seed``; train, val and test are disjoint streams.
    """

    def __init__(
        self,
        image_size: int = 64,
        n_train: int = 2000,
        n_val: int = 200,
        n_test: int = 200,
        max_objects: int = 3,
        object_size: Tuple[float, float] = (0.15, 0.3),
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        seed: Optional[int] = None,
        data_seed: int = 0,
        hflip: float = 0.5,
        train_transforms: TransformSpec = None,
        val_transforms: TransformSpec = None,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        backbone: Optional[str] = None,
    ):
        """
        Args:
            image_size: side of the generated square scenes.
            n_train: number of train scenes.
            n_val: number of val scenes.
            n_test: number of test scenes.
            max_objects: most objects per scene (at least one).
            object_size: range of an object's half-size as a fraction of the image side.
            batch_size: images per batch.
            num_workers: dataloader workers (0: data is in memory).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            data_seed: seed of the generated scenes.
            hflip: probability of a horizontal flip in the default train pipeline.
            train_transforms: albumentations spec replacing the default (flips, rot90, brightness/contrast,
                done in numpy for speed when no spec is given).
            val_transforms: albumentations spec for val/test/predict (default: none besides normalisation).
            mean: normalisation mean (RGB, 0..1); default from ``backbone``'s pretrained config, else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.image_size, self.n_train, self.n_val, self.n_test = int(image_size), n_train, n_val, n_test
        self.max_objects, self.batch_size, self.num_workers = max_objects, batch_size, num_workers
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.pin_memory, self.persistent_workers, self.seed, self.data_seed = pin_memory, persistent_workers, seed, data_seed
        self.mean, self.std = resolve_mean_std(mean, std, backbone)
        self.num_classes = 4
        self.classes = list(SHAPE_CLASSES)
        self.ignore_index = 255
        self.hflip = hflip
        # None: the numpy fast path (same augmentations as shapes_train_transforms); a spec: albumentations
        self.train_transform = None if train_transforms is None else build_transforms(
            train_transforms, shapes_train_transforms(self.mean, self.std, hflip), self.mean, self.std,
            "train_transforms")
        self.val_transform = build_transforms(val_transforms, segmentation_eval(self.image_size, self.mean, self.std),
                                              self.mean, self.std, "val_transforms")
        self.datasets: Dict[str, Dataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        for stream, (split, n) in enumerate((("train", self.n_train), ("val", self.n_val), ("test", self.n_test))):
            images, masks = generate_shapes(n, self.image_size, self.data_seed, stream, self.max_objects,
                                            self.object_size)
            if split == "train" and self.train_transform is None:
                self.datasets[split] = _FastShapes(images, masks, self.mean, self.std, self.hflip)
            else:
                tf = self.train_transform if split == "train" else self.val_transform
                self.datasets[split] = _ArraySegmentation(images, masks, tf)
            if split == "test":
                self.datasets["predict"] = _ArrayPredict(images, self.val_transform, "synthetic_shapes/test")

    split_collate = {"train": _passthrough}  # _FastShapes collates whole batches itself


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels next to a label change (4-neighbourhood): a 2-px band across every boundary."""
    b = np.zeros(mask.shape, bool)
    dy = mask[1:, :] != mask[:-1, :]
    dx = mask[:, 1:] != mask[:, :-1]
    b[1:, :] |= dy
    b[:-1, :] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b


def export_shapes_folder(root: str, n_train: int = 320, n_val: int = 80, image_size: int = 64,
                         ignore_band: bool = True, seed: int = 0, class_patterns: bool = True) -> str:
    """Write synthetic shapes as a SegmentationFolder tree: ``root/{train,val}/{images,masks}``.

    Images alternate png/jpg; with ``ignore_band`` every other mask has 255 on a 2-px band along object
    boundaries. ``class_patterns=False`` makes outline-only scenes (see ``generate_shapes``). Returns root.
    """
    for stream, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        images, masks = generate_shapes(n, image_size, seed, stream, class_patterns=class_patterns)
        idir, mdir = os.path.join(root, split, "images"), os.path.join(root, split, "masks")
        os.makedirs(idir, exist_ok=True)
        os.makedirs(mdir, exist_ok=True)
        for i in range(n):
            stem = f"s{i:04d}"
            if i % 2:
                Image.fromarray(images[i]).save(os.path.join(idir, stem + ".jpg"), quality=95)
            else:
                Image.fromarray(images[i]).save(os.path.join(idir, stem + ".png"))
            m = masks[i].copy()
            if ignore_band and i % 2 == 0:
                m[boundary_band(m)] = 255
            Image.fromarray(m, mode="L").save(os.path.join(mdir, stem + ".png"))
    return root
