"""Every torch Dataset of the data modules, and the collate functions that batch them.

Datasets take keys ``(index, epoch)`` from the train sampler (plain indices elsewhere) and seed their
augmentation from the key alone (see ``vitmha.data.sampling``). File datasets read from disk through
albumentations; the in-memory ones hold arrays, and the fastest of them collate whole batches themselves
(``__getitems__``), which ``_passthrough`` hands on unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from vitmha.data.io import JPEG_SCALES, read_mask, read_rgb, read_rgb_reduced
from vitmha.data.sampling import Key, keyed_uniforms, sample_generator, seed_pipeline, split_key


# --- collate functions ---------------------------------------------------------------------------------


def collate_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[(C,H,W), ...] -> (B,C,H,W). torch's ``default_collate`` stacks straight into shared memory in a loader
    worker, which saves the copy a plain ``torch.stack`` costs when the batch is sent to the main process."""
    return default_collate(list(images))


def collate_pairs(batch: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[(image, target), ...] -> (images (B,3,H,W), targets (B,) or (B,H,W) int64)."""
    images = collate_images([b[0] for b in batch])
    first = batch[0][1]
    if isinstance(first, torch.Tensor):
        targets = torch.stack([b[1] for b in batch]).long()
    else:
        targets = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    return images, targets


def collate_predict(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """[{image, path, orig_size}, ...] -> {"image": (B,3,H,W), "path": [str], "orig_size": (B,2) long (H, W)}."""
    return {
        "image": collate_images([b["image"] for b in batch]),
        "path": [b["path"] for b in batch],
        "orig_size": torch.tensor([b["orig_size"] for b in batch], dtype=torch.long),
    }


def _passthrough(batch):
    """A batch the dataset collated itself (a tuple from ``__getitems__``) as it is, else ``collate_pairs``."""
    return batch if isinstance(batch, tuple) else collate_pairs(batch)


# --- files on disk (ImageFolder, SegmentationFolder, predict) ------------------------------------------


def _check_size(t: torch.Tensor, size: Optional[int], what: str, path: str) -> None:
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        raise ValueError(
            f"{path}: {what} produced an image of {t.shape[-1]}×{t.shape[-2]} (W×H), expected {size}×{size}; "
            f"end the pipeline with a Resize/RandomCrop to image_size"
        )


class CropFirst:
    """Runs a pipeline that starts with ``RandomResizedCrop`` (always applied) on an 8-bit RGB image file with
    the crop drawn *before* decoding, so that a JPEG is decoded once, at the size the crop needs.

    The draws are the pipeline's own, in its own order (the Compose's, then the crop's from the upright image
    size, then the rest's), so an image that is decoded whole gives bitwise the pipeline's result. A JPEG
    whose crop is at least k = 2, 4 or 8 times the output size in both directions is decoded at 1/k by libjpeg
    (DCT scaling: an area-like average) and the crop, scaled by 1/k, is resized as the transform resizes it.
    That is the only difference: fewer pixels decoded and less aliasing than resizing from full size (at
    224 px, 500x375 photos are decoded whole, most 640x480 ones at 1/2, 2048x1536 ones at 1/4;
    benchmarks/data_loader.py). Own code because no loader library decodes at the crop's size (torchvision's
    and timm's decode every image whole); the draws and the resize are albumentations' own.
    """

    def __init__(self, pipeline: A.Compose):
        self.pipeline, self.crop = pipeline, pipeline.transforms[0]
        self.rest = A.Compose(list(pipeline.transforms[1:]), mask_interpolation=pipeline.mask_interpolation)

    @staticmethod
    def applies(pipeline: Any) -> bool:
        """Whether ``pipeline`` starts with a RandomResizedCrop that always applies (its own p and the Compose's)."""
        return (isinstance(pipeline, A.Compose) and pipeline.p >= 1 and bool(pipeline.transforms)
                and type(pipeline.transforms[0]) is A.RandomResizedCrop and pipeline.transforms[0].p >= 1)

    def __call__(self, path: str) -> Any:
        self.pipeline.py_random.random()  # the draw Compose.__call__ makes for its own p
        box: List[int] = []
        th, tw = self.crop.size

        def reduction(w: int, h: int) -> int:
            box[:] = self.crop.get_params_dependent_on_data({"shape": (h, w)}, {})["crop_coords"]
            cw, ch = box[2] - box[0], box[3] - box[1]
            return next((k for k in JPEG_SCALES if cw // k >= tw and ch // k >= th), 1)

        img, k = read_rgb_reduced(path, reduction)
        if k > 1:
            h, w = img.shape[:2]
            x1, y1, x2, y2 = (int(round(v / k)) for v in box)
            box = [min(x1, w - 1), min(y1, h - 1), min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)]
        out = self.crop.apply(img, crop_coords=tuple(box))
        return self.rest(image=out, force_apply=True)["image"]  # force_apply: no second Compose draw


class _FileImages(Dataset):
    """Images read from disk and augmented by ``transform``, seeded from the key ``(index, epoch)``."""

    transform: Any
    read: Callable[[str], np.ndarray]
    seed: int
    _crop_first: Optional[CropFirst] = None

    def _augment(self, path: str, key: Key) -> Any:
        crop_first = self.read is read_rgb and CropFirst.applies(self.transform)
        if crop_first and (self._crop_first is None or self._crop_first.pipeline is not self.transform):
            # built before seeding: a new Compose re-seeds the transforms it holds
            # (and again after ``mean/std: auto`` rebuilt the pipeline)
            self._crop_first = CropFirst(self.transform)
        seed_pipeline(self.transform, self.seed, key)
        if crop_first:
            return self._crop_first(path)
        return self.transform(image=self.read(path))["image"]


class ImageLabelDataset(_FileImages):
    """(path, label) items read from disk; keys ``(index, epoch)`` seed the augmentation."""

    def __init__(self, items: List[Tuple[str, Any]], transform, image_size: Optional[int], seed: int = 0,
                 what: str = "transforms", read: Callable[[str], np.ndarray] = read_rgb):
        self.items, self.transform, self.image_size, self.seed, self.what = items, transform, image_size, seed, what
        self.read = read  # path -> (H, W, C) image: 8-bit RGB, or the file's channels (vitmha.data.io.image_reader)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        path, label = self.items[index]
        image = self._augment(path, key)
        _check_size(image, self.image_size, self.what, path)
        return image, label


class ImageDataset(_FileImages):
    """Image files without labels (pre-training data): ``(C, S, S)`` tensors, augmentation seeded by key."""

    def __init__(self, paths: List[str], transform, image_size: Optional[int], seed: int = 0,
                 what: str = "transforms", read: Callable[[str], np.ndarray] = read_rgb):
        self.paths, self.transform, self.image_size, self.seed, self.what = paths, transform, image_size, seed, what
        self.read = read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Key) -> torch.Tensor:
        path = self.paths[split_key(key)[0]]
        image = self._augment(path, key)
        _check_size(image, self.image_size, self.what, path)
        return image


class ImageMaskDataset(Dataset):
    """(image path, mask path) pairs; the mask goes through the same geometric transforms."""

    def __init__(self, items: List[Tuple[str, str]], transform, image_size: Optional[int], seed: int = 0,
                 ignore_index: int = 255, reduce_zero_label: bool = False, what: str = "transforms",
                 read: Callable[[str], np.ndarray] = read_rgb):
        self.items, self.transform, self.image_size, self.seed = items, transform, image_size, seed
        self.ignore_index, self.reduce_zero_label, self.what = ignore_index, reduce_zero_label, what
        self.read = read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        ipath, mpath = self.items[index]
        mask = remap_mask(read_mask(mpath), self.ignore_index, self.reduce_zero_label)
        seed_pipeline(self.transform, self.seed, key)
        out = self.transform(image=self.read(ipath), mask=mask)
        _check_size(out["image"], self.image_size, self.what, ipath)
        return out["image"], torch.as_tensor(np.asarray(out["mask"])).long()


def remap_mask(mask: np.ndarray, ignore_index: int = 255, reduce_zero_label: bool = False) -> np.ndarray:
    """Label mask as int32 (as uint8 when it fits); with reduce_zero_label 0 -> ignore, v -> v-1 (mmseg)."""
    m = mask.astype(np.int32)
    if reduce_zero_label:
        ign = m == ignore_index
        m = m - 1
        m[(m == -1) | ign] = ignore_index
    if m.size and m.min() >= 0 and m.max() <= 255:
        return m.astype(np.uint8)
    return m


class PredictDataset(Dataset):
    """Image files for prediction: {"image", "path", "orig_size": (H, W)}."""

    def __init__(self, paths: List[str], transform, image_size: Optional[int], what: str = "val_transforms",
                 read: Callable[[str], np.ndarray] = read_rgb):
        self.paths, self.transform, self.image_size, self.what = paths, transform, image_size, what
        self.read = read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        path = self.paths[index]
        img = self.read(path)
        image = self.transform(image=img)["image"]
        _check_size(image, self.image_size, self.what, path)
        return {"image": image, "path": path, "orig_size": (int(img.shape[0]), int(img.shape[1]))}


# --- in-memory grey classification (digits, Fashion-MNIST, MNIST-5k) -----------------------------------


class _TensorClassification(Dataset):
    """In-memory grey images (N,h,w) (uint8, or float in 0..1) -> normalised (3,S,S) float32, optional affine.

    The resize/warp is one cv2.warpAffine per image and the rest numpy on whole batches (``__getitems__``):
    torch's intra-op threads cost more than they save on such small tensors when the model shares the cores.
    Also used by the real-data modules (Fashion-MNIST, MNIST-5k). Each image's draws are a function of (seed,
    epoch, index) only, taken for the whole batch at once from a keyed SplitMix64 hash.

    Why not albumentations, the engine of every other pipeline: speed. The same augmentation as an
    ``A.Compose`` (flip, Affine, Normalize, ToTensorV2) seeded per image from the same keys is 14-18x slower
    on these tiny images (benchmarks/data_draws.py, one process: Fashion-MNIST batch of 256 11.6 vs 161 ms,
    the quickstart's digits batch of 64 3.7 vs 66 ms), 21-37 % of a one-thread training step of those
    recipes instead of 1.4-4 %; the recipes load in the main process, so that time adds to every step. The
    hash is 1.6-2.3x faster than a numpy generator per image.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, augment: bool = False,
                 max_rotate: float = 10.0, max_shift: float = 0.1, scale: Tuple[float, float] = (0.9, 1.1),
                 seed: int = 0, image_size: Optional[int] = None, hflip: float = 0.0):
        self.images, self.labels = np.ascontiguousarray(images), np.asarray(labels, np.int64)
        self.unit = np.float32(1 / 255 if self.images.dtype == np.uint8 else 1.0)
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)  # 3 values: grey -> RGB; 1: one channel
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
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


# --- in-memory segmentation (synthetic shapes, nuclei) -------------------------------------------------


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
    jitter in numpy, normalisation on whole batches (``__getitems__``). Kept for speed: 1.3-2.8x faster than
    the albumentations pipeline of ``shapes_train_transforms`` (benchmarks/data_draws.py: 11.7 vs 32.4 ms a
    batch of 32, 3.4 % vs 8.9 % of a one-thread quickstart_seg step; the ratio varied 1.3-2.8x over runs)."""

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


class _RandomCrops(Dataset):
    """``length`` random crops of one image/mask region per epoch, each placed and augmented from its key."""

    def __init__(self, image: np.ndarray, mask: np.ndarray, crop: int, length: int, transform, seed: int = 0):
        self.image, self.mask, self.crop, self.length, self.transform = image, mask, crop, length, transform
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Key):
        index, epoch = split_key(key)
        gen = sample_generator(self.seed, epoch, index + (1 << 40)) if epoch is not None else np.random.default_rng()
        h, w = self.mask.shape
        y0, x0 = int(gen.integers(0, h - self.crop + 1)), int(gen.integers(0, w - self.crop + 1))
        img = self.image[y0:y0 + self.crop, x0:x0 + self.crop]
        m = self.mask[y0:y0 + self.crop, x0:x0 + self.crop]
        seed_pipeline(self.transform, self.seed, key)
        out = self.transform(image=img, mask=m)
        return out["image"], torch.as_tensor(np.asarray(out["mask"])).long()


class _Tiles(Dataset):
    """Non-overlapping tiles of an image/mask region (val/test)."""

    def __init__(self, image: np.ndarray, mask: np.ndarray, crop: int, transform):
        h, w = mask.shape
        self.boxes = [(y, x) for y in range(0, h - crop + 1, crop) for x in range(0, w - crop + 1, crop)]
        self.image, self.mask, self.crop, self.transform = image, mask, crop, transform

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, key: Key):
        y, x = self.boxes[split_key(key)[0]]
        c = self.crop
        out = self.transform(image=self.image[y:y + c, x:x + c], mask=self.mask[y:y + c, x:x + c])
        return out["image"], torch.as_tensor(np.asarray(out["mask"])).long()
