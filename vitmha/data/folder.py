"""ImageFolderDataModule: classification data from ``root/{train,val,test}/<class>/*`` or from CSV lists."""
from __future__ import annotations

import csv as csvlib
import os
from typing import Dict, List, Literal, Optional, Tuple, Union

from vitmha.data.base import BaseDataModule, abspath
from vitmha.data.channels import ChannelOptions, check_model_channels
from vitmha.data.datasets import ImageLabelDataset, PredictDataset
from vitmha.data.errors import DataValidationError, Problem
from vitmha.data.io import (NOT_AN_IMAGE, expand_paths, is_image_file, list_dir, parallel_map, raise_or_skip,
                            walk_files)
from vitmha.data.transforms import TransformSpec, build_transforms, classification_eval, classification_train_recipe

SPLITS = ("train", "val", "test")


def _rel(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


class ImageFolderDataModule(ChannelOptions, BaseDataModule):
    """Image classification from class folders (or CSV lists), with albumentations augmentation.

    Layout: ``root/train/<class>/*``, ``root/val/<class>/*``, optional ``root/test/<class>/*`` and
    ``root/predict/*``; classes are the sorted folder names under ``train``. Images may be png, jpg,
    jpeg, bmp, webp, tif or tiff (any case), grey, 16-bit, palette or RGBA, and are read upright (their EXIF
    orientation applied, so phone photos are not sideways); with ``in_chans: 3`` all become 8-bit RGB. Any
    other ``in_chans`` reads each file's own channels as float in [0, 1] (grey PNG/JPEG: 1,
    16-bit scaled by 65535 or ``max_pixel_value``, multi-band TIFF: its bands), and a file with another
    number of channels is a problem. Every file is checked in ``setup`` and all problems are reported at
    once (DataValidationError); hidden and system files (.DS_Store, Thumbs.db, ...) are skipped and counted
    in one line. Train/val/test batches are ``(image (B,C,H,W) float32, label (B,) int64)``;
    predict batches are dicts ``{"image", "path", "orig_size" (B,2) (H,W)}``.

    Augmentation is deterministic: sample i of epoch e is augmented from (seed, e, i) only, whatever
    the number of workers, so a resumed run sees the batches it would have seen. A train pipeline that starts
    with RandomResizedCrop (the default) draws its crop before decoding, and a JPEG whose crop is at least
    2, 4 or 8 times image_size is decoded at that reduced scale (``vitmha.data.datasets.CropFirst``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        train_transforms: TransformSpec = None,
        val_transforms: TransformSpec = None,
        mean: Optional[Union[List[float], Literal["auto"]]] = None,
        std: Optional[Union[List[float], Literal["auto"]]] = None,
        backbone: Optional[str] = None,
        hflip: float = 0.0,
        scale: Tuple[float, float] = (0.8, 1.0),
        crop_pct: Optional[float] = None,
        seed: Optional[int] = None,
        csv: Optional[Union[str, Dict[str, str]]] = None,
        skip_bad_files: bool = False,
        check_files: bool = True,
        num_classes: Optional[int] = None,
        predict_paths: Optional[List[str]] = None,
        in_chans: int = 3,
        max_pixel_value: Optional[float] = None,
        sampler: str = "random",
        auto_augment: Optional[str] = None,
        reprob: float = 0.0,
        remode: str = "pixel",
        recount: int = 1,
    ):
        """
        Args:
            root: dataset folder holding ``train/``, ``val/`` (and optionally ``test/``, ``predict/``).
            image_size: side of the square images fed to the model.
            batch_size: images per batch.
            num_workers: dataloader worker processes (0 loads in the main process).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            train_transforms: albumentations spec replacing the default train pipeline: a list of names or
                ``{class_path, init_args}`` dicts, or an ``A.to_dict`` dict; Normalize+ToTensorV2 are appended.
            val_transforms: the same for val/test/predict (default: resize to image_size).
            mean: normalisation mean, one value per channel (0..1) or one for all; default from ``backbone``'s
                pretrained config (RGB values fitted to ``in_chans``: their mean for one channel), else
                ImageNet; ``auto``: computed from the training images in ``setup`` (logged, and saved in the
                checkpoint's datamodule hyper-parameters for predict and export).
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            hflip: probability of a horizontal flip in the default train pipeline. Off by default because a
                mirror image changes the label of digits, text, signs and left/right anatomy; set 0.5 for
                natural photographs (configs/finetune_gpu.yaml does).
            scale: area range of the default RandomResizedCrop; the mild default keeps the object whole on
                small images, (0.08, 1.0) is timm's ImageNet setting.
            crop_pct: eval resize as timm (shorter side to image_size/crop_pct, centre crop); None = plain resize.
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            csv: list mode instead of class folders: a folder (relative to root) holding ``train.csv``,
                ``val.csv`` [, ``test.csv``], or a dict ``{train: file, val: file, test: file}``; rows are
                ``path,label`` (paths relative to the csv's folder, label a class name or an int).
            skip_bad_files: skip unreadable/unsupported files with one warning instead of failing.
            check_files: check every image in ``setup`` (turn off only for huge, known-good datasets).
            num_classes: expected number of classes; an error if the data disagrees (default: found).
            predict_paths: files, folders or globs to predict on (default: ``root/predict``).
            in_chans: image channels, the model's ``backbone_kwargs.in_chans`` (the vitmha CLI passes it on).
                3: 8-bit RGB as above. Others: each file's own channels, float in [0, 1]; colour transforms
                that need RGB are left out of the default pipelines and refused in ``train_transforms``.
            max_pixel_value: divide pixels by this instead of their type's range (255 for 8 bit, 65535 for
                16 bit), e.g. 4095 for 12-bit data in 16-bit files; reads float channels even for 3.
            sampler: ``random`` (shuffle every epoch) or ``balanced`` (each epoch draws as many images with
                replacement, every class equally likely; deterministic per seed and epoch, resumable).
            auto_augment: augmentation policy of the default train pipeline: timm's RandAugment string, e.g.
                ``rand-m9-mstd0.5-inc1`` (DeiT), or ``trivial`` (TrivialAugmentWide); it then replaces the
                default's light colour/geometry ops. None = off.
            reprob: random erasing probability (timm's ``reprob``; DeiT 0.25), after Normalize; 0 = off.
            remode: random erasing fill: ``pixel`` (per-pixel normal noise), ``rand`` or ``const``.
            recount: largest number of erased boxes per image.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.root = abspath(root)
        self.image_size = int(image_size)
        mean, std = self._init_channels(in_chans, max_pixel_value, mean, std)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=in_chans, sampler=sampler)
        self.auto_augment, self.reprob, self.remode, self.recount = auto_augment, reprob, remode, recount
        self.train_spec, self.val_spec = train_transforms, val_transforms
        self.hflip, self.scale, self.crop_pct = hflip, tuple(scale), crop_pct
        self.skip_bad_files, self.check_files = skip_bad_files, check_files
        self.predict_paths = predict_paths
        self.csv_files = self._csv_files(csv)
        self._items: Optional[Dict[str, List[Tuple[str, int]]]] = None
        # transforms are built now so that a bad spec fails at instantiation, with the config at hand
        self._build_transforms()

        self.classes: List[str] = self._find_classes(num_classes)
        self.num_classes: int = len(self.classes)
        if num_classes is not None and num_classes != self.num_classes:
            raise DataValidationError(
                [(self._train_location(), f"num_classes={num_classes} was given but the data has "
                  f"{self.num_classes} classes: {self.classes}")])

    def _build_transforms(self) -> None:
        """The train and eval pipelines for the current mean/std, fitted to the images read."""
        self.train_transform = self._fit(build_transforms(
            self.train_spec, classification_train_recipe(self.image_size, self.mean, self.std, self.hflip, self.scale,
                                                         self.auto_augment, self.reprob, self.remode, self.recount),
            self.mean, self.std, "train_transforms"), self.train_spec, "train_transforms")
        self.val_transform = self._fit(build_transforms(
            self.val_spec, classification_eval(self.image_size, self.mean, self.std, self.crop_pct),
            self.mean, self.std, "val_transforms"), self.val_spec, "val_transforms")

    def _train_paths(self) -> List[str]:
        return [p for p, _ in self.validate_files()["train"]]

    # --- discovery (cheap, in __init__) -------------------------------------------------------------

    def _csv_files(self, csv) -> Optional[Dict[str, str]]:
        if csv is None:
            return None
        if isinstance(csv, dict):
            unknown = set(csv) - set(SPLITS)
            if unknown:
                raise ValueError(f"csv: unknown split(s) {sorted(unknown)}; expected keys {list(SPLITS)}")
            return {k: abspath(v, self.root) for k, v in csv.items()}
        folder = abspath(csv, self.root)
        files = {s: os.path.join(folder, f"{s}.csv") for s in SPLITS}
        return {s: p for s, p in files.items() if s != "test" or os.path.isfile(p)}

    def _train_location(self) -> str:
        return self.csv_files["train"] if self.csv_files else os.path.join(self.root, "train")

    def _find_classes(self, num_classes: Optional[int]) -> List[str]:
        if self.csv_files:
            path = self.csv_files.get("train")
            if not path or not os.path.isfile(path):
                raise DataValidationError([(path or self.root, "missing train csv (rows: path,label)")])
            labels = [lab for _, lab, _ in self._read_csv(path)]
            if labels and all(_is_int(lab) for lab in labels):
                n = num_classes if num_classes is not None else max(int(lab) for lab in labels) + 1
                return [str(i) for i in range(n)]
            return sorted(set(labels))
        train = os.path.join(self.root, "train")
        if not os.path.isdir(train):
            problems = [(train, "missing split folder (expected train/<class>/<image>)")]
            if not os.path.isdir(self.root):
                problems = [(self.root, "data root does not exist")]
            raise DataValidationError(problems, header=f"cannot find the classes of {self.root}:")
        classes = [d for d in list_dir(train) if os.path.isdir(os.path.join(train, d))]
        if not classes:
            raise DataValidationError([(train, "no class folders (expected train/<class>/<image>)")])
        return classes

    @staticmethod
    def _read_csv(path: str) -> List[Tuple[str, str, int]]:
        """Rows (path, label, line number); a header row ``path,label`` is skipped."""
        rows = []
        with open(path, newline="") as f:
            for lineno, row in enumerate(csvlib.reader(f), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                    continue
                if len(row) < 2:
                    rows.append((row[0].strip(), "", lineno))
                else:
                    rows.append((row[0].strip(), row[1].strip(), lineno))
        return rows

    # --- listing and validation ---------------------------------------------------------------------

    def _list_split_folders(self, split: str, problems: List[Problem], bad: List[Problem],
                            junk: List[Problem]) -> List[Tuple[str, int]]:
        folder = os.path.join(self.root, split)
        index = {c: i for i, c in enumerate(self.classes)}
        items = []
        for name in list_dir(folder, junk):
            cdir = os.path.join(folder, name)
            if not os.path.isdir(cdir):
                bad.append((_rel(cdir, self.root), f"file outside a class folder (expected {split}/<class>/<image>)"))
                continue
            if name not in index:
                problems.append((_rel(cdir, self.root), f"class folder '{name}' is not in train/ (train classes: "
                                 f"{', '.join(self.classes[:20])}{' ...' if len(self.classes) > 20 else ''})"))
                continue
            found = 0
            for p in walk_files(cdir, junk):
                if is_image_file(p):
                    items.append((p, index[name]))
                    found += 1
                else:
                    bad.append((_rel(p, self.root), NOT_AN_IMAGE))
            if found == 0:
                problems.append((_rel(cdir, self.root), "empty class folder (no images)"))
        return items

    def _list_split_csv(self, split: str, problems: List[Problem], bad: List[Problem]) -> List[Tuple[str, int]]:
        path = self.csv_files[split]
        base = os.path.dirname(path)
        index = {c: i for i, c in enumerate(self.classes)}
        items = []
        for p, label, lineno in self._read_csv(path):
            where = f"{_rel(path, self.root)}:{lineno}"
            if label in index:
                target = index[label]
            elif _is_int(label):
                target = int(label)
                if not 0 <= target < self.num_classes:
                    problems.append((where, f"label {label} outside 0..{self.num_classes - 1}"))
                    continue
            else:
                problems.append((where, f"label '{label}' is not a class of the train csv "
                                 f"({', '.join(self.classes[:20])})"))
                continue
            full = abspath(p, base)
            if not os.path.isfile(full):
                bad.append((_rel(full, self.root), f"file listed in {where} does not exist"))
            elif not is_image_file(full):
                bad.append((_rel(full, self.root), NOT_AN_IMAGE))
            else:
                items.append((full, target))
        return items

    def validate_files(self) -> Dict[str, List[Tuple[str, int]]]:
        """List and check every split; raise one DataValidationError listing every problem.

        With ``skip_bad_files`` unreadable/unsupported files are dropped with one warning; structural
        problems (missing split, empty class, unknown class) still raise. Hidden and system files
        (.DS_Store, Thumbs.db, ...) are never read; one line says how many files were skipped, and why.
        Returns {split: [(path, label)]}.
        """
        if self._items is not None:
            return self._items
        problems: List[Problem] = []  # structural: never skipped
        bad: List[Problem] = []  # per file: skippable
        junk: List[Problem] = []  # hidden/system entries: skipped, reported
        items: Dict[str, List[Tuple[str, int]]] = {}
        for split in SPLITS:
            if self.csv_files is not None:
                if split not in self.csv_files:
                    continue
                if not os.path.isfile(self.csv_files[split]):
                    problems.append((self.csv_files[split], "missing csv file (rows: path,label)"))
                    continue
                items[split] = self._list_split_csv(split, problems, bad)
            else:
                folder = os.path.join(self.root, split)
                if not os.path.isdir(folder):
                    if split != "test":
                        problems.append((_rel(folder, self.root) + "/",
                                         f"missing split folder (expected {split}/<class>/<image>)"))
                    continue
                items[split] = self._list_split_folders(split, problems, bad, junk)
        if self.check_files:
            for split, lst in items.items():
                errs = parallel_map(self.check_image, [p for p, _ in lst])
                bad_paths = set()
                for (p, _), err in zip(lst, errs):
                    if err:
                        bad.append((_rel(p, self.root), err))
                        bad_paths.add(p)
                if bad_paths:
                    items[split] = [it for it in lst if it[0] not in bad_paths]
                    if self.csv_files is None:
                        self._recheck_empty(split, lst, items[split], problems)
        raise_or_skip(problems, bad, self.skip_bad_files, self.root, junk)
        self._items = items
        return items

    def _recheck_empty(self, split, before, after, problems) -> None:
        had = {lab for _, lab in before}
        has = {lab for _, lab in after}
        for lab in sorted(had - has):
            if self.skip_bad_files:
                problems.append((f"{split}/{self.classes[lab]}", "class folder has no readable image"))

    # --- Lightning hooks ------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if stage == "predict":
            self._setup_predict()
            return
        items = self.validate_files()
        self._auto_stats()
        self.datasets["train"] = ImageLabelDataset(items["train"], self.train_transform, self.image_size,
                                                   what="train_transforms", read=self.read)
        self.datasets["val"] = ImageLabelDataset(items["val"], self.val_transform, self.image_size,
                                                 what="val_transforms", read=self.read)
        if "test" in items:
            self.datasets["test"] = ImageLabelDataset(items["test"], self.val_transform, self.image_size,
                                                      what="val_transforms", read=self.read)
        if stage == "test" and "test" not in items:
            where = self.csv_files["test"] if self.csv_files else os.path.join(self.root, "test")
            raise DataValidationError([(where, "missing test split (needed for `test`)")])

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


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except (TypeError, ValueError):
        return False
