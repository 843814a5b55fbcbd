"""UnlabeledFolderDataModule: a folder of images without classes, for self-supervised pre-training (MAE).

Every other image data module feeds a pre-training task as well: their batches are ``(images, targets)``
pairs (segmentation: ``(images, masks)``) and a pre-training task reads ``batch[0]``, ignoring the labels.
"""
from __future__ import annotations

import os
from typing import List, Literal, Optional, Tuple, Union

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from vitmha.data.base import BaseDataModule, abspath
from vitmha.data.channels import ChannelOptions, check_model_channels
from vitmha.data.datasets import ImageDataset, PredictDataset, collate_images, collate_predict
from vitmha.data.errors import DataValidationError, Problem
from vitmha.data.io import NOT_AN_IMAGE, expand_paths, is_image_file, parallel_map, raise_or_skip, walk_files
from vitmha.data.transforms import TransformSpec, build_transforms, classification_eval, mae_train


class UnlabeledFolderDataModule(ChannelOptions, BaseDataModule):
    """Images without labels: every image file under ``root``, at any depth, for pre-training.

    Files are found recursively in sorted order (png, jpg, jpeg, bmp, webp, tif, tiff, any case) and read as
    the other folder modules read them: upright (EXIF orientation applied), 8-bit RGB with ``in_chans: 3``,
    each file's own channels as float in [0, 1] otherwise (grey, 16-bit, multi-band TIFF; ``max_pixel_value``).
    Hidden and system files (.DS_Store, Thumbs.db, ...) are skipped and counted in one line; other files and
    unreadable images are problems, all reported at once (or skipped with ``skip_bad_files``, in one warning).

    Validation is off by default: pre-training usually trains on every image (MAE's recipe has no
    validation set), and the fit then logs the training loss only. For a validation loss give ``val_root``,
    a second folder read the same way, or ``val_split``, a share of ``root``'s images held out (the same
    images for the same ``split_seed``, whatever the order the files were written in). When ``root`` holds
    ``train/`` and ``val/`` (an ImageFolder tree) and neither is set, both are read as training images and a
    warning says how to keep ``val/`` out (``root: .../train``, ``val_root: .../val``).

    The default training augmentation is MAE's (RandomResizedCrop of ``scale`` 0.2-1, bicubic, horizontal flip
    with ``hflip``, no colour jitter); validation images are resized (or, with ``crop_pct``, resized and centre
    cropped as timm does). Augmentation is keyed per (seed, epoch, index), as in the other modules: batches do
    not depend on ``num_workers``, and a run resumed in the middle of an epoch continues bit for bit.

    Batches are image tensors ``(B, C, S, S)`` float32, no labels; predict batches are dicts ``{"image",
    "path", "orig_size" (B, 2) (H, W)}`` over ``predict_paths`` (default: ``root``).
    """

    split_collate = {"train": collate_images, "val": collate_images, "predict": collate_predict}

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        val_root: Optional[str] = None,
        val_split: float = 0.0,
        split_seed: int = 0,
        train_transforms: TransformSpec = None,
        val_transforms: TransformSpec = None,
        mean: Optional[Union[List[float], Literal["auto"]]] = None,
        std: Optional[Union[List[float], Literal["auto"]]] = None,
        backbone: Optional[str] = None,
        hflip: float = 0.5,
        scale: Tuple[float, float] = (0.2, 1.0),
        crop_pct: Optional[float] = None,
        seed: Optional[int] = None,
        skip_bad_files: bool = False,
        check_files: bool = True,
        predict_paths: Optional[List[str]] = None,
        in_chans: int = 3,
        max_pixel_value: Optional[float] = None,
    ):
        """
        Args:
            root: folder of training images, searched recursively.
            image_size: side of the square images fed to the model.
            batch_size: images per batch.
            num_workers: dataloader worker processes (0 loads in the main process).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            val_root: folder of validation images (searched recursively); None = none, or ``val_split``.
            val_split: share of ``root``'s images held out for validation, in [0, 1); 0 = no validation.
            split_seed: seed of the ``val_split`` hold-out.
            train_transforms: albumentations spec replacing the default train pipeline (a list of names or
                ``{class_path, init_args}`` dicts, or an ``A.to_dict`` dict); Normalize+ToTensorV2 are appended.
            val_transforms: the same for val and predict (default: resize to image_size).
            mean: normalisation mean, one value per channel (0..1) or one for all; default from ``backbone``'s
                pretrained config (RGB values fitted to ``in_chans``), else ImageNet; ``auto``: computed from
                the training images in ``setup`` (logged, and kept in the checkpoint).
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            hflip: probability of a horizontal flip in the default train pipeline (MAE: 0.5).
            scale: area range of the default RandomResizedCrop (MAE: 0.2-1).
            crop_pct: eval resize as timm (shorter side to image_size/crop_pct, centre crop); None = plain resize.
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            skip_bad_files: skip unreadable/unsupported files with one warning instead of failing.
            check_files: check every image in ``setup`` (turn off only for huge, known-good folders).
            predict_paths: files, folders or globs to predict on (default: ``root``).
            in_chans: image channels, the model's ``backbone_kwargs.in_chans`` (the vitmha CLI passes it on).
                3: 8-bit RGB. Others: each file's own channels, float in [0, 1].
            max_pixel_value: divide pixels by this instead of their type's range (255 for 8 bit, 65535 for
                16 bit); reads float channels even for 3.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.root = abspath(root)
        self.val_root = abspath(val_root) if val_root is not None else None
        if not 0 <= float(val_split) < 1:
            raise DataValidationError([("val_split", f"expected a share in [0, 1), got {val_split}")])
        if val_split and val_root is not None:
            raise DataValidationError([("val_split", "give either val_root (a folder) or val_split (a share of "
                                        f"root), not both (val_root={val_root}, val_split={val_split})")])
        self.val_split, self.split_seed = float(val_split), int(split_seed)
        self.image_size = int(image_size)
        mean, std = self._init_channels(in_chans, max_pixel_value, mean, std)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=in_chans)
        self.train_spec, self.val_spec = train_transforms, val_transforms
        self.hflip, self.scale, self.crop_pct = float(hflip), (float(scale[0]), float(scale[1])), crop_pct
        self.skip_bad_files, self.check_files, self.predict_paths = skip_bad_files, check_files, predict_paths
        self._paths: Optional[dict] = None
        self._build_transforms()
        for folder, what in ((self.root, "data root"), (self.val_root, "val_root")):
            if folder is not None and not os.path.isdir(folder):
                raise DataValidationError([(folder, f"{what} does not exist (a folder of images)")])

    def _build_transforms(self) -> None:
        """The train and eval pipelines for the current mean/std, fitted to the images read."""
        self.train_transform = self._fit(build_transforms(
            self.train_spec, mae_train(self.image_size, self.mean, self.std, self.hflip, self.scale),
            self.mean, self.std, "train_transforms"), self.train_spec, "train_transforms")
        self.val_transform = self._fit(build_transforms(
            self.val_spec, classification_eval(self.image_size, self.mean, self.std, self.crop_pct),
            self.mean, self.std, "val_transforms"), self.val_spec, "val_transforms")

    def _train_paths(self) -> List[str]:
        return self.validate_files()["train"]

    # --- listing and validation ---------------------------------------------------------------------

    def _list(self, folder: str, bad: List[Problem], junk: List[Problem]) -> List[str]:
        paths = []
        for p in walk_files(folder, junk):
            if is_image_file(p):
                paths.append(p)
            else:
                bad.append((p, NOT_AN_IMAGE))
        return paths

    def _warn_imagefolder_tree(self) -> None:
        subdirs = {d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d))}
        if self.val_root is None and not self.val_split and "train" in subdirs and subdirs & {"val", "test"}:
            held = sorted(subdirs & {"val", "test"})
            rank_zero_warn(f"{self.root} holds train/ and {'/, '.join(held)}/: all of them are read as training "
                           f"images; to keep {held[0]}/ out give root: {os.path.join(self.root, 'train')} and "
                           f"val_root: {os.path.join(self.root, held[0])}")

    def validate_files(self) -> dict:
        """List and check the images; raise one DataValidationError listing every problem. Returns
        ``{"train": [paths], "val": [paths]}`` (val empty without validation); computed once."""
        if self._paths is not None:
            return self._paths
        bad: List[Problem] = []
        junk: List[Problem] = []
        self._warn_imagefolder_tree()
        train = self._list(self.root, bad, junk)
        val = self._list(self.val_root, bad, junk) if self.val_root is not None else []
        if self.check_files:
            for paths in (train, val):
                errs = parallel_map(self.check_image, paths)
                bad += [(p, e) for p, e in zip(paths, errs) if e]
                paths[:] = [p for p, e in zip(paths, errs) if not e]
        problems: List[Problem] = []
        for folder, paths in ((self.root, train), (self.val_root, val)):
            if folder is not None and not paths:
                problems.append((folder, "no readable images (png, jpg, jpeg, bmp, webp, tif, tiff) at any depth"))
        raise_or_skip(problems, bad, self.skip_bad_files, self.root, junk)
        if self.val_split:
            n_val = int(round(len(train) * self.val_split))
            if not 0 < n_val < len(train):
                raise DataValidationError([("val_split", f"{self.val_split} of {len(train)} images leaves "
                                            f"{n_val} for validation and {len(train) - n_val} for training")])
            held = set(np.random.default_rng(self.split_seed).permutation(len(train))[:n_val].tolist())
            val = [p for i, p in enumerate(train) if i in held]
            train = [p for i, p in enumerate(train) if i not in held]
        self._paths = {"train": train, "val": val}
        return self._paths

    # --- Lightning hooks ------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if stage == "predict":
            self._setup_predict()
            return
        if stage == "test":
            raise DataValidationError([(self.root, "UnlabeledFolderDataModule has no test split: pre-training data "
                                        "has no labels to test against (validate with val_root or val_split)")])
        paths = self.validate_files()
        if stage == "validate" and not paths["val"]:
            raise DataValidationError([(self.root, "no validation images: give val_root (a folder) or val_split "
                                        "(a share of root)")])
        self._auto_stats()
        self.datasets["train"] = ImageDataset(paths["train"], self.train_transform, self.image_size,
                                              what="train_transforms", read=self.read)
        if paths["val"]:
            self.datasets["val"] = ImageDataset(paths["val"], self.val_transform, self.image_size,
                                                what="val_transforms", read=self.read)

    def val_dataloader(self):
        """The validation loader, or an empty list (Lightning then skips validation) without validation images."""
        if "val" not in self.datasets and "train" not in self.datasets:
            self.setup("fit")
        if "val" not in self.datasets:
            return []
        return super().val_dataloader()

    def _setup_predict(self) -> None:
        specs = self.predict_paths or [self.root]
        junk: List[Problem] = []
        files, problems = expand_paths(specs, base=self.root, junk=junk)
        if problems or not files:
            raise DataValidationError(problems or [(str(specs), "no images to predict on")])
        bad = [(p, e) for p, e in zip(files, parallel_map(self.check_image, files)) if e] if self.check_files else []
        raise_or_skip([], bad, self.skip_bad_files, self.root, junk)
        badset = {p for p, _ in bad}
        self.datasets["predict"] = PredictDataset([f for f in files if f not in badset], self.val_transform,
                                                  self.image_size, read=self.read)
