"""Built-in data modules that need no download: scikit-learn's real 8×8 digits, and synthetic shape scenes.

Digits (real, 1,797 images) skip albumentations: images live in memory as float arrays, each is warped
with one cv2.warpAffine and whole batches are normalised in numpy (``__getitems__``); this is 14-18× faster
than the same augmentation as an albumentations Compose per 32-px image and leaves the CPU to the model
(figures and reasons: ``vitmha.data.datasets._TensorClassification``).
Synthetic shapes (procedurally generated, call them synthetic wherever reported) use the same kind of numpy
fast path for their default augmentation, and albumentations when a ``train_transforms`` spec is given.
The data themselves come from ``vitmha.data.sources``, the datasets from ``vitmha.data.datasets``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from vitmha.data.base import BaseDataModule
from vitmha.data.channels import check_model_channels, grey_channels
from vitmha.data.datasets import (_ArrayPredict, _ArraySegmentation, _FastShapes, _passthrough, _TensorClassification,
                                  _TensorPredict)
from vitmha.data.sources import DIGIT_CLASSES, SHAPE_CLASSES, generate_shapes, load_digits_split
from vitmha.data.transforms import TransformSpec, build_transforms, segmentation_eval


class InMemoryClassificationModule(BaseDataModule):
    """Loaders over in-memory splits kept in ``self.datasets`` (train/val/test/predict), batches already
    collated by the datasets. ``setup`` builds every split at once, predict included.

    ``_init_augment`` and ``_make`` are the shared body of the grey-image modules built from arrays
    (Fashion-MNIST, MNIST-5k).
    """

    split_collate = {"train": _passthrough, "val": _passthrough, "test": _passthrough}

    def _setup_predict(self) -> None:
        self.setup("fit")

    def val_dataloader(self):
        """The validation loader, or an empty list (Lightning then skips validation) when the module holds
        no validation split (``FashionMNISTDataModule(val_size=0)``)."""
        self._dataset("train")
        if "val" not in self.datasets:
            return []
        return super().val_dataloader()

    def _init_augment(self, *, augment: bool, hflip: float, max_rotate: float, max_shift: float,
                      scale: Tuple[float, float]) -> None:
        """Store the train augmentation settings (random affine and horizontal flip)."""
        self.scale = (float(scale[0]), float(scale[1]))
        self.augment, self.hflip, self.max_rotate, self.max_shift = augment, hflip, max_rotate, max_shift

    def _make(self, splits: Dict[str, Tuple[np.ndarray, np.ndarray]], name: str) -> None:
        for split, (x, y) in splits.items():
            train = split == "train"
            self.datasets[split] = _TensorClassification(
                x, y, self.mean, self.std, augment=train and self.augment, max_rotate=self.max_rotate,
                max_shift=self.max_shift, scale=self.scale, image_size=self.image_size, hflip=self.hflip)
        tx = splits["test"][0]
        if "val" not in splits:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"{type(self).__name__}: no validation split, all {len(splits['train'][1])} training "
                           "images train (validation is skipped; `vitmha test` scores the test split)")
        self.datasets["predict"] = _TensorPredict(self.datasets["test"], [f"{name}/test/{i:05d}" for i in range(len(tx))],
                                                  tuple(tx.shape[1:]))


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
        in_chans: int = 3,
        sampler: str = "random",
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
            in_chans: 3 (the grey digit replicated, for RGB models) or 1 (the grey digit itself, for a model
                with ``backbone_kwargs.in_chans: 1``; the vitmha CLI passes that on).
            sampler: ``random`` (shuffle every epoch) or ``balanced`` (each epoch draws as many images with
                replacement, every class equally likely; deterministic per seed and epoch, resumable).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.image_size = int(image_size)
        self.split_seed, self.val_fraction = split_seed, val_fraction
        self.augment, self.max_rotate, self.max_shift, self.scale = augment, max_rotate, max_shift, tuple(scale)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=grey_channels(in_chans), sampler=sampler)
        self.num_classes = 10
        self.classes = list(DIGIT_CLASSES)

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if self.datasets:
            return
        x, y, tr, va = load_digits_split(self.image_size, self.val_fraction, self.split_seed)
        x, y = x[:, 0].numpy(), y.numpy()
        self.datasets["train"] = _TensorClassification(
            x[tr], y[tr], self.mean, self.std, self.augment, self.max_rotate, self.max_shift, self.scale)
        self.datasets["val"] = _TensorClassification(x[va], y[va], self.mean, self.std)
        self.datasets["test"] = self.datasets["val"]
        self.datasets["predict"] = _TensorPredict(self.datasets["val"], [f"digits/val/{i:04d}" for i in va], (8, 8))


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

    split_collate = {"train": _passthrough}  # _FastShapes collates whole batches itself

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
        self.max_objects = max_objects
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.data_seed = data_seed
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone)
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

    def _setup_predict(self) -> None:
        self.setup("fit")  # setup builds every split, predict included
