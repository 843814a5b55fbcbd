"""SegmentationFolderDataModule: ``root/{train,val,test}/images/<stem>.png|jpg`` + ``masks/<stem>.png``."""
from __future__ import annotations

import os
from typing import Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from PIL import Image

from vitmha.data.base import BaseDataModule, abspath
from vitmha.data.channels import ChannelOptions, check_model_channels
from vitmha.data.datasets import ImageMaskDataset, PredictDataset
from vitmha.data.errors import DataValidationError, Problem
from vitmha.data.io import (check_image, expand_paths, list_dir, parallel_map, raise_or_skip, read_mask,
                            stored_and_upright_size)
from vitmha.data.transforms import TransformSpec, build_transforms, segmentation_eval, segmentation_train

SPLITS = ("train", "val", "test")
SEG_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def check_pair(image: str, mask: str, num_classes: int, ignore_index: int, reduce_zero_label: bool,
               root: str, in_chans: Optional[int] = None) -> List[Problem]:
    """Problems with one image/mask pair: unreadable files, size mismatch, >1 channel, labels out of range;
    with ``in_chans`` (float images of their own channels) also another channel count."""
    rel_i, rel_m = os.path.relpath(image, root), os.path.relpath(mask, root)
    problems = []
    err = check_image(image, in_chans)
    if err:
        problems.append((rel_i, err))
    try:
        with Image.open(mask) as im:
            mode, msize = im.mode, im.size
        m = read_mask(mask)
    except ValueError as e:  # more than one channel
        return problems + [(rel_m, str(e))]
    except Exception as e:
        return problems + [(rel_m, f"unreadable mask ({e or type(e).__name__})")]
    if not err:
        stored, isize, orientation = stored_and_upright_size(image, in_chans)
        if isize != msize:
            why = ""
            if orientation != 1 and stored == msize:
                why = (f": the mask follows the image's stored pixels, but the image is read upright (EXIF "
                       f"orientation {orientation}); write the mask for the upright image, or drop the image's "
                       f"orientation tag")
            problems.append((rel_m, f"{msize[0]}×{msize[1]}, image is {isize[0]}×{isize[1]} (W×H){why}"))
    values = np.unique(m)
    lo, hi = (1, num_classes) if reduce_zero_label else (0, num_classes - 1)
    allowed_extra = {ignore_index} | ({0} if reduce_zero_label else set())
    out = [int(v) for v in values if not (lo <= v <= hi or int(v) in allowed_extra)]
    if out:
        shown = ", ".join(str(v) for v in out[:10]) + (" ..." if len(out) > 10 else "")
        rz = " with reduce_zero_label (0 = ignore)" if reduce_zero_label else ""
        problems.append((rel_m, f"labels {{{shown}}} outside {lo}..{hi} and ignore_index {ignore_index} "
                                f"(num_classes={num_classes}{rz}, mask mode {mode})"))
    return problems


class SegmentationFolderDataModule(ChannelOptions, BaseDataModule):
    """Semantic segmentation from ``root/{train,val,test}/images`` and ``.../masks`` (same stems).

    Images are png, jpg or tif(f): 8-bit RGB with ``in_chans: 3``; with any other ``in_chans`` each file's own
    channels as float in [0, 1] (grey: 1, multi-band TIFF (H, W, C) or planar (C, H, W): C; 16-bit scaled by
    65535 or ``max_pixel_value``), upright (EXIF orientation applied). Masks are one-channel PNGs (palette PNGs
    give their indices) whose pixels are class indices, with ``ignore_index`` for unlabelled pixels, read as
    stored (no orientation tag applied: label maps are drawn on the upright image; one that follows a photo's
    stored pixel grid is reported). Every pair is checked in ``setup``
    (missing partner, size mismatch, extra or missing channels, labels out of range) and all problems are
    reported at once. Batches are ``(image (B,C,H,W) float32, mask (B,H,W) int64)``; predict batches are dicts
    ``{"image", "path", "orig_size" (B,2) (H,W)}`` with images resized to image_size.
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        classes: Optional[List[str]] = None,
        image_size: int = 512,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        train_transforms: TransformSpec = None,
        val_transforms: TransformSpec = None,
        mean: Optional[Union[List[float], Literal["auto"]]] = None,
        std: Optional[Union[List[float], Literal["auto"]]] = None,
        backbone: Optional[str] = None,
        hflip: float = 0.5,
        scale: Tuple[float, float] = (1.0, 1.0),
        seed: Optional[int] = None,
        skip_bad_files: bool = False,
        check_files: bool = True,
        predict_paths: Optional[List[str]] = None,
        in_chans: int = 3,
        max_pixel_value: Optional[float] = None,
    ):
        """
        Args:
            root: dataset folder holding ``train/``, ``val/`` (and optionally ``test/``, ``predict/``).
            num_classes: number of classes (label values 0..num_classes-1; background counts if labelled).
            classes: class names, num_classes of them (default "0", "1", ...).
            image_size: side of the square crops fed to the model.
            batch_size: images per batch.
            num_workers: dataloader worker processes (0 loads in the main process).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            ignore_index: mask value that is not scored (also used to pad crops).
            reduce_zero_label: mmseg's option for datasets whose 0 means "unlabelled" (ADE20K):
                0 -> ignore_index, every other value v -> v-1.
            train_transforms: albumentations spec replacing the default joint train pipeline (list of names or
                ``{class_path, init_args}`` dicts, or an ``A.to_dict`` dict); Normalize+ToTensorV2 are appended.
            val_transforms: the same for val/test/predict (default: resize to image_size, mask nearest).
            mean: normalisation mean, one value per channel (0..1) or one for all; default from ``backbone``'s
                pretrained config (RGB values fitted to ``in_chans``: their mean for one channel, RGB channel
                i mod 3 for more), else ImageNet; ``auto``: computed from the training images in ``setup``
                (logged, and saved in the checkpoint's datamodule hyper-parameters for predict and export).
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            hflip: probability of a horizontal flip in the default train pipeline.
            scale: range of the random rescale (relative to shorter side = image_size) before the crop. Off
                by default (1, 1): on the small built-in scenes even +-10 % slowed learning threefold;
                (0.5, 2.0) is mmseg's setting for ADE20K/Cityscapes (configs/segmenter_ade20k_gpu.yaml).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            skip_bad_files: skip bad pairs with one warning instead of failing.
            check_files: check every pair in ``setup`` (turn off only for huge, known-good datasets).
            predict_paths: files, folders or globs to predict on (default: ``root/predict``).
            in_chans: image channels, the model's ``backbone_kwargs.in_chans`` (the vitmha CLI passes it on).
                3: 8-bit RGB. Others: each file's own channels, float in [0, 1]; colour transforms that need RGB
                are left out of the default pipelines and refused in ``train_transforms``.
            max_pixel_value: divide pixels by this instead of their type's range (255 for 8 bit, 65535 for
                16 bit), e.g. 10000 for Sentinel-2 reflectances; reads float channels even for 3.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.root = abspath(root)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"classes has {len(classes)} names but num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self.classes: List[str] = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        self.image_size = int(image_size)
        self.ignore_index, self.reduce_zero_label = int(ignore_index), reduce_zero_label
        mean, std = self._init_channels(in_chans, max_pixel_value, mean, std)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=in_chans)
        self.skip_bad_files, self.check_files = skip_bad_files, check_files
        self.predict_paths = predict_paths
        self.train_spec, self.val_spec, self.hflip, self.scale = train_transforms, val_transforms, hflip, tuple(scale)
        self._build_transforms()
        self._items: Optional[Dict[str, List[Tuple[str, str]]]] = None

    def _build_transforms(self) -> None:
        """The train and eval pipelines for the current mean/std, fitted to the images read."""
        self.train_transform = self._fit(build_transforms(
            self.train_spec,
            segmentation_train(self.image_size, self.mean, self.std, self.hflip, self.ignore_index, self.scale),
            self.mean, self.std, "train_transforms"), self.train_spec, "train_transforms")
        self.val_transform = self._fit(build_transforms(
            self.val_spec, segmentation_eval(self.image_size, self.mean, self.std),
            self.mean, self.std, "val_transforms"), self.val_spec, "val_transforms")

    def _train_paths(self) -> List[str]:
        return [image for image, _ in self.validate_files()["train"]]

    def _list_split(self, split: str, problems: List[Problem], bad: List[Problem],
                    junk: List[Problem]) -> List[Tuple[str, str]]:
        folder = os.path.join(self.root, split)
        idir, mdir = os.path.join(folder, "images"), os.path.join(folder, "masks")
        for d in (idir, mdir):
            if not os.path.isdir(d):
                problems.append((os.path.relpath(d, self.root) + "/", "missing folder"))
        if not (os.path.isdir(idir) and os.path.isdir(mdir)):
            return []
        images: Dict[str, str] = {}
        for n in list_dir(idir, junk):
            p = os.path.join(idir, n)
            stem, ext = os.path.splitext(n)
            if os.path.isdir(p):
                continue
            if ext.lower() not in SEG_IMAGE_EXTENSIONS:
                bad.append((os.path.relpath(p, self.root), f"unsupported image type (expected "
                            f"{', '.join(SEG_IMAGE_EXTENSIONS)})"))
            elif stem in images:
                bad.append((os.path.relpath(p, self.root), f"two images with stem '{stem}' "
                            f"({os.path.basename(images[stem])} and {n})"))
            else:
                images[stem] = p
        masks: Dict[str, str] = {}
        for n in list_dir(mdir, junk):
            p = os.path.join(mdir, n)
            stem, ext = os.path.splitext(n)
            if os.path.isdir(p):
                continue
            if ext.lower() != ".png":
                bad.append((os.path.relpath(p, self.root), "unsupported mask type (masks must be .png)"))
            else:
                masks[stem] = p
        for stem in sorted(set(images) - set(masks)):
            bad.append((os.path.relpath(images[stem], self.root), f"image without mask (expected {split}/masks/{stem}.png)"))
        for stem in sorted(set(masks) - set(images)):
            bad.append((os.path.relpath(masks[stem], self.root), f"mask without image (expected {split}/images/{stem}.png|jpg)"))
        pairs = [(images[s], masks[s]) for s in sorted(set(images) & set(masks))]
        if not pairs:
            problems.append((os.path.relpath(folder, self.root) + "/", "no image/mask pairs"))
        return pairs

    def validate_files(self) -> Dict[str, List[Tuple[str, str]]]:
        """List and check every split; raise one DataValidationError listing every problem.

        Returns {split: [(image path, mask path)]}; with ``skip_bad_files`` bad pairs are dropped with a warning.
        """
        if self._items is not None:
            return self._items
        problems: List[Problem] = []
        bad: List[Problem] = []
        junk: List[Problem] = []  # hidden/system files: skipped, reported in one line
        items: Dict[str, List[Tuple[str, str]]] = {}
        if not os.path.isdir(self.root):
            raise DataValidationError([(self.root, "data root does not exist")])
        for split in SPLITS:
            if not os.path.isdir(os.path.join(self.root, split)):
                if split != "test":
                    problems.append((split + "/", f"missing split folder (expected {split}/images and {split}/masks)"))
                continue
            items[split] = self._list_split(split, problems, bad, junk)
        if self.check_files:
            for split, lst in items.items():
                chans = self.in_chans if self.raw else None
                results = parallel_map(lambda pair: check_pair(pair[0], pair[1], self.num_classes, self.ignore_index,
                                                               self.reduce_zero_label, self.root, chans), lst)
                keep = []
                for pair, errs in zip(lst, results):
                    bad.extend(errs)
                    if not errs:
                        keep.append(pair)
                items[split] = keep
        raise_or_skip(problems, bad, self.skip_bad_files, self.root, junk)
        for split in ("train", "val"):
            if not items.get(split):
                raise DataValidationError([(split + "/", "no usable image/mask pairs left")])
        self._items = items
        return items

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if stage == "predict":
            self._setup_predict()
            return
        items = self.validate_files()
        self._auto_stats()
        kw = dict(ignore_index=self.ignore_index, reduce_zero_label=self.reduce_zero_label, read=self.read)
        self.datasets["train"] = ImageMaskDataset(items["train"], self.train_transform, self.image_size,
                                                  what="train_transforms", **kw)
        for split in ("val", "test"):
            if split in items:
                self.datasets[split] = ImageMaskDataset(items[split], self.val_transform, self.image_size,
                                                        what="val_transforms", **kw)
        if stage == "test" and "test" not in items:
            raise DataValidationError([("test/", "missing test split (needed for `test`)")])

    def _setup_predict(self) -> None:
        specs = self.predict_paths or [os.path.join(self.root, "predict")]
        junk: List[Problem] = []
        files, problems = expand_paths(specs, base=self.root, junk=junk)
        if problems or not files:
            raise DataValidationError(problems or [(str(specs), "no images to predict on")])
        bad = [(p, e) for p, e in zip(files, parallel_map(self.check_image, files)) if e] if self.check_files else []
        raise_or_skip([], bad, self.skip_bad_files, self.root, junk)
        badset = {p for p, _ in bad}
        self.datasets["predict"] = PredictDataset([f for f in files if f not in badset], self.val_transform,
                                                  self.image_size, read=self.read)
