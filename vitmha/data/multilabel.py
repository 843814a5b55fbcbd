"""Multi-label data: several labels per image, from CSV lists or from built-in synthetic shape scenes.

``MultiLabelCSVDataModule`` reads ``train.csv``/``val.csv`` [/``test.csv``] in one of two formats:

- label names: ``path,label1;label2`` (an empty label list is allowed: ``path,``); a header ``path,labels``
  is optional, and columns after the second are then ignored (so tools/predict.py's ``predictions.csv``
  reads back as a names csv);
- one-hot: a header ``path,classA,classB,...`` and rows of 0/1 (``img.png,1,0,1``).

Targets are multi-hot ``(num_classes,)`` int64 vectors, batched to ``(B, C)``. Image reading, checking and
the albumentations pipelines are those of the ImageFolder module (``vitmha.data.io``, ``.transforms``).

``SyntheticShapesMultiLabelDataModule`` is a built-in task, "which shapes are in the scene": 1-3 objects
of six kinds (circle, rectangle, triangle, cross, ring, star) with random colours, sizes, positions and
rotations on textured backgrounds, possibly overlapping (every object keeps most of its area visible).
Circles, rectangles and triangles are drawn by the segmentation quickstart's code (``vitmha.data.sources``).
The test split is generated from its own seed (``test_seed``), apart from train/val.
"""
from __future__ import annotations

import csv as csvlib
import math
import os
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from vitmha.data.base import BaseDataModule, abspath
from vitmha.data.channels import ChannelOptions, check_model_channels
from vitmha.data.datasets import ImageLabelDataset, PredictDataset, _ArrayPredict, _FastShapes, _passthrough
from vitmha.data.errors import DataValidationError, Problem
from vitmha.data.io import NOT_AN_IMAGE, expand_paths, is_image_file, parallel_map, raise_or_skip
from vitmha.data.sampling import Key, split_key
from vitmha.data.sources import _shape_mask, _texture
from vitmha.data.transforms import TransformSpec, build_transforms, classification_eval, classification_train

SPLITS = ("train", "val", "test")
MULTILABEL_SHAPES = ["circle", "rectangle", "triangle", "cross", "ring", "star"]
_ONE = ("1", "1.0", "true")
_ZERO = ("0", "0.0", "false", "")


# --- CSV lists -----------------------------------------------------------------------------------------


def read_multilabel_csv(path: str, sep: str = ";") -> Tuple[List[Tuple[str, List[str], int]], Optional[List[str]],
                                                            List[Problem]]:
    """Parse one multi-label csv: ``(rows, onehot_classes, problems)``.

    ``rows`` are ``(image path as written, label names, line number)``; ``onehot_classes`` the class columns of
    a one-hot header (None for the names format); ``problems`` ``("file:line", what is wrong)`` for bad rows.
    """
    rows: List[Tuple[str, List[str], int]] = []
    problems: List[Problem] = []
    header: Optional[List[str]] = None
    onehot: Optional[List[str]] = None
    with open(path, newline="") as f:
        for lineno, row in enumerate(csvlib.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not cells or all(not c for c in cells):
                continue
            where = f"{path}:{lineno}"
            if header is None and not rows and cells[0].lower() == "path":
                header = cells
                if len(cells) >= 2 and cells[1].lower() not in ("label", "labels"):
                    onehot = cells[1:]
                    seen = set()
                    for name in onehot:
                        if not name or name in seen:
                            problems.append((where, f"one-hot header: {'empty' if not name else 'repeated'} "
                                             f"class name {name!r}"))
                        seen.add(name)
                continue
            if not cells[0]:
                problems.append((where, "empty path"))
                continue
            if onehot is not None:
                if len(cells) != len(onehot) + 1:
                    problems.append((where, f"{len(cells)} columns, the header has {len(onehot) + 1} "
                                     f"(path,{','.join(onehot)})"))
                    continue
                bad = [f"{name}={v!r}" for name, v in zip(onehot, cells[1:]) if v.lower() not in _ONE + _ZERO]
                if bad:
                    problems.append((where, f"one-hot values must be 0 or 1, got {', '.join(bad)}"))
                    continue
                rows.append((cells[0], [n for n, v in zip(onehot, cells[1:]) if v.lower() in _ONE], lineno))
                continue
            if header is None and len(cells) > 2 and any(cells[2:]):
                problems.append((where, f"{len(cells)} columns; expected path,label1{sep}label2 (labels separated "
                                 f"by '{sep}'), or a one-hot csv with a header path,classA,classB,..."))
                continue
            labels = [lab.strip() for lab in (cells[1] if len(cells) > 1 else "").split(sep)]
            rows.append((cells[0], list(dict.fromkeys(lab for lab in labels if lab)), lineno))
    return rows, onehot, problems


def _csv_files(csv: Union[str, Dict[str, str], None], root: str) -> Dict[str, str]:
    """{split: path}: a folder (relative to root; default root) with train/val[/test].csv, or an explicit dict."""
    if isinstance(csv, dict):
        unknown = set(csv) - set(SPLITS)
        if unknown:
            raise ValueError(f"csv: unknown split(s) {sorted(unknown)}; expected keys {list(SPLITS)}")
        return {k: abspath(v, root) for k, v in csv.items()}
    folder = abspath(csv or ".", root)
    files = {s: os.path.join(folder, f"{s}.csv") for s in SPLITS}
    return {s: p for s, p in files.items() if s != "test" or os.path.isfile(p)}


class MultiLabelCSVDataModule(ChannelOptions, BaseDataModule):
    """Multi-label image classification from CSV lists, with albumentations augmentation.

    ``root`` holds ``train.csv``, ``val.csv`` and optionally ``test.csv`` (or ``csv`` names them); image paths
    in a csv are relative to its folder. Rows are ``path,label1;label2`` (label names; an empty list is
    allowed) or, under a header ``path,classA,classB,...``, one-hot 0/1 columns. ``classes`` are the sorted
    label names of train.csv (the header order for a one-hot train.csv) unless given. Every row and file is
    checked in ``setup``; all problems (unknown labels, bad rows, missing or unreadable images) are raised at
    once, each naming ``file:line``. Images are read as ImageFolderDataModule reads them (8-bit RGB, or with
    another ``in_chans`` each file's own channels as float in [0, 1]). Batches are ``(image (B,C,H,W) float32,
    target (B,num_classes) int64 0/1)``; predict batches ``{"image", "path", "orig_size"}``.
    ``train_class_counts()`` gives the positives per class (what ``class_weights: auto`` weighs by).
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
        classes: Optional[List[str]] = None,
        label_sep: str = ";",
        skip_bad_files: bool = False,
        check_files: bool = True,
        num_classes: Optional[int] = None,
        predict_paths: Optional[List[str]] = None,
        in_chans: int = 3,
        max_pixel_value: Optional[float] = None,
        sampler: str = "random",
    ):
        """
        Args:
            root: folder holding train.csv, val.csv [, test.csv] (and ``predict/``), unless ``csv`` says otherwise.
            image_size: side of the square images fed to the model.
            batch_size: images per batch.
            num_workers: dataloader worker processes (0 loads in the main process).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            train_transforms: albumentations spec replacing the default train pipeline (see ImageFolderDataModule).
            val_transforms: the same for val/test/predict (default: resize to image_size).
            mean: normalisation mean, one value per channel (0..1) or one for all; default from ``backbone``'s
                pretrained config (RGB values fitted to ``in_chans``), else ImageNet; ``auto``: computed from
                the training images in ``setup`` (logged, and kept in the checkpoint).
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            hflip: probability of a horizontal flip in the default train pipeline (off: a mirror image can
                change a label such as "left"/"right"; 0.5 for photographs).
            scale: area range of the default RandomResizedCrop (a crop can cut a labelled object out: keep it mild).
            crop_pct: eval resize as timm (shorter side to image_size/crop_pct, centre crop); None = plain resize.
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            csv: a folder (relative to root) with train.csv, val.csv [, test.csv], or ``{train: f, val: f, test: f}``.
            classes: the class names in order; labels outside them are errors. Default: found from train.csv.
            label_sep: separator of the label names in the names format.
            skip_bad_files: skip missing/unreadable images with one warning instead of failing (bad rows and
                unknown labels always fail).
            check_files: check every image in ``setup`` (turn off only for huge, known-good datasets).
            num_classes: expected number of classes; an error if the data disagrees (default: found).
            predict_paths: files, folders or globs to predict on (default: ``root/predict``).
            in_chans: image channels, the model's ``backbone_kwargs.in_chans`` (the vitmha CLI passes it on).
                3: 8-bit RGB. Others: each file's own channels, float in [0, 1]; colour transforms that need RGB
                are left out of the default pipelines and refused in ``train_transforms``.
            max_pixel_value: divide pixels by this instead of their type's range (255 for 8 bit, 65535 for
                16 bit); reads float channels even for 3.
            sampler: ``random`` (shuffle every epoch) or ``balanced``: class-aware sampling with replacement (a
                class picked uniformly, images without labels counting as one more, then one of its images), so
                rare labels are seen about as often as common ones; labels that co-occur with rare ones are
                drawn more often too. Deterministic per seed and epoch, resumable.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.root = abspath(root)
        self.image_size = int(image_size)
        mean, std = self._init_channels(in_chans, max_pixel_value, mean, std)
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          in_chans=in_chans, sampler=sampler)
        if not label_sep or label_sep == ",":
            raise ValueError(f"label_sep must be a non-empty separator other than ',', got {label_sep!r}")
        self.label_sep = label_sep
        self.skip_bad_files, self.check_files, self.predict_paths = skip_bad_files, check_files, predict_paths
        self.csv_files = _csv_files(csv, self.root)
        self.train_spec, self.val_spec = train_transforms, val_transforms
        self.hflip, self.scale, self.crop_pct = hflip, tuple(scale), crop_pct
        self._build_transforms()
        self._parsed: Dict[str, Tuple[List[Tuple[str, List[str], int]], Optional[List[str]], List[Problem]]] = {}
        self._items: Optional[Dict[str, List[Tuple[str, torch.Tensor]]]] = None
        self.classes: List[str] = self._find_classes(classes)
        self.num_classes: int = len(self.classes)
        if num_classes is not None and num_classes != self.num_classes:
            raise DataValidationError([(self.csv_files.get("train", self.root), f"num_classes={num_classes} was "
                                        f"given but the data has {self.num_classes} classes: {self.classes}")])

    def _build_transforms(self) -> None:
        """The train and eval pipelines for the current mean/std, fitted to the images read."""
        self.train_transform = self._fit(build_transforms(
            self.train_spec, classification_train(self.image_size, self.mean, self.std, self.hflip, self.scale),
            self.mean, self.std, "train_transforms"), self.train_spec, "train_transforms")
        self.val_transform = self._fit(build_transforms(
            self.val_spec, classification_eval(self.image_size, self.mean, self.std, self.crop_pct),
            self.mean, self.std, "val_transforms"), self.val_spec, "val_transforms")

    def _train_paths(self) -> List[str]:
        return [p for p, _ in self.validate_files()["train"]]

    def _parse(self, split: str):
        if split not in self._parsed:
            self._parsed[split] = read_multilabel_csv(self.csv_files[split], self.label_sep)
        return self._parsed[split]

    def _find_classes(self, classes: Optional[List[str]]) -> List[str]:
        path = self.csv_files.get("train")
        if not path or not os.path.isfile(path):
            where = path or self.root
            raise DataValidationError([(where, "missing train csv (rows: path,label1;label2, or a one-hot csv "
                                        "with a header path,classA,classB,...)")])
        if classes is not None:
            names = [str(c) for c in classes]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"classes must be distinct names, got {names}")
            return names
        rows, onehot, problems = self._parse("train")
        if problems:
            raise DataValidationError(problems, header=f"{len(problems)} bad row(s) in {path}:")
        found = onehot if onehot is not None else sorted({lab for _, labels, _ in rows for lab in labels})
        if not found:
            raise DataValidationError([(path, "no labels found: every row has an empty label list (give classes)")])
        return list(found)

    # --- listing and validation ---------------------------------------------------------------------

    def _list_split(self, split: str, problems: List[Problem], bad: List[Problem]) -> List[Tuple[str, torch.Tensor]]:
        path = self.csv_files[split]
        base = os.path.dirname(path)
        rows, onehot, row_problems = self._parse(split)
        problems += row_problems
        index = {c: i for i, c in enumerate(self.classes)}
        if onehot is not None:
            unknown = [c for c in onehot if c not in index]
            if unknown:
                problems.append((f"{path}:1", f"column(s) {', '.join(unknown)} are not classes of the train csv "
                                 f"({', '.join(self.classes[:20])})"))
                return []
        items = []
        for p, labels, lineno in rows:
            where = f"{path}:{lineno}"
            unknown = [lab for lab in labels if lab not in index]
            if unknown:
                problems.append((where, f"label(s) {', '.join(repr(u) for u in unknown)} not in the classes "
                                 f"({', '.join(self.classes[:20])}{' ...' if len(self.classes) > 20 else ''})"))
                continue
            target = torch.zeros(self.num_classes, dtype=torch.long)
            target[[index[lab] for lab in labels]] = 1
            full = abspath(p, base)
            if not os.path.isfile(full):
                bad.append((full, f"file listed in {where} does not exist"))
            elif not is_image_file(full):
                bad.append((full, f"{where}: {NOT_AN_IMAGE}"))
            else:
                items.append((full, target))
        return items

    def validate_files(self) -> Dict[str, List[Tuple[str, torch.Tensor]]]:
        """List and check every split; raise one DataValidationError listing every problem.

        Returns {split: [(path, multi-hot target)]}. With ``skip_bad_files`` missing/unreadable images are
        dropped with a warning; bad rows and unknown labels still raise.
        """
        if self._items is not None:
            return self._items
        problems: List[Problem] = []
        bad: List[Problem] = []
        items: Dict[str, List[Tuple[str, torch.Tensor]]] = {}
        for split in SPLITS:
            if split not in self.csv_files:
                continue
            if not os.path.isfile(self.csv_files[split]):
                problems.append((self.csv_files[split], "missing csv file (rows: path,label1;label2)"))
                continue
            items[split] = self._list_split(split, problems, bad)
        if self.check_files:
            for split, lst in items.items():
                errs = parallel_map(self.check_image, [p for p, _ in lst])
                bad += [(p, e) for (p, _), e in zip(lst, errs) if e]
                items[split] = [it for it, e in zip(lst, errs) if not e]
        raise_or_skip(problems, bad, self.skip_bad_files, self.root)
        self._items = items
        return items

    # --- Lightning hooks ------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        check_model_channels(self)
        if stage == "predict":
            self._setup_predict()
            return
        items = self.validate_files()
        self._auto_stats()
        for split in items:
            what = "train_transforms" if split == "train" else "val_transforms"
            transform = self.train_transform if split == "train" else self.val_transform
            self.datasets[split] = ImageLabelDataset(items[split], transform, self.image_size, what=what,
                                                     read=self.read)
        if stage == "test" and "test" not in items:
            raise DataValidationError([(os.path.join(os.path.dirname(self.csv_files["train"]), "test.csv"),
                                        "missing test split (needed for `test`)")])

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


# --- built-in synthetic scenes ---------------------------------------------------------------------------


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, t: float) -> Tuple[np.ndarray, np.ndarray]:
    u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
    v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
    return u, v


def _extra_shape_mask(name: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                      gen: np.random.Generator) -> np.ndarray:
    """Masks of the shapes the segmentation scenes lack: a plus-shaped cross, a ring and a five-pointed star."""
    if name == "cross":
        u, v = _rotated(yy, xx, cy, cx, gen.uniform(0, math.pi / 2))
        w = r * gen.uniform(0.25, 0.38)
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if name == "ring":
        d = np.hypot(xx - cx, yy - cy)
        return (d <= r) & (d >= r * gen.uniform(0.45, 0.6))
    # star: the polygon of 5 outer tips and 5 inner corners, inside = left of every edge of one of its 5 kites
    t0 = gen.uniform(0, 2 * math.pi)
    inner = r * gen.uniform(0.4, 0.5)
    angles = t0 + np.arange(10) * math.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r * 1.1, inner)
    px, py = cx + rad * np.cos(angles), cy + rad * np.sin(angles)
    inside = np.zeros_like(xx, dtype=bool)
    for k in range(0, 10, 2):  # kite k: centre, inner corner k-1, tip k, inner corner k+1
        poly = [(cx, cy), (px[k - 1], py[k - 1]), (px[k], py[k]), (px[(k + 1) % 10], py[(k + 1) % 10])]
        kite = np.ones_like(xx, dtype=bool)
        for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
            kite &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
        inside |= kite
    return inside


def _object_mask(name: str, yy, xx, cy, cx, r, gen) -> np.ndarray:
    seg_kind = {"circle": 1, "rectangle": 2, "triangle": 3}.get(name)
    if seg_kind is not None:
        return _shape_mask(seg_kind, yy, xx, cy, cx, r, gen)
    return _extra_shape_mask(name, yy, xx, cy, cx, r, gen)


def generate_multilabel_shapes(n: int, image_size: int = 64, seed: int = 0, stream: int = 0,
                               shapes: Sequence[str] = MULTILABEL_SHAPES, min_objects: int = 1,
                               max_objects: int = 3, object_size: Tuple[float, float] = (0.12, 0.25),
                               min_visible: float = 0.6) -> Tuple[np.ndarray, np.ndarray]:
    """Synthetic scenes of ``min_objects``..``max_objects`` objects, each of a random kind from ``shapes``
    (repeats allowed), with a random colour, size (``object_size``: its "radius" as a fraction of the side),
    position and rotation, on a textured background of another colour, with pixel noise. Objects may overlap,
    but each keeps at least ``min_visible`` of its area in view (an object that cannot be placed so after 20
    tries is left out; the first one always fits). Scene i depends only on (seed, stream, i).

    Returns images (n,S,S,3) uint8 and labels (n,K) int64: 1 where a kind is in the scene.
    """
    unknown = [s for s in shapes if s not in MULTILABEL_SHAPES]
    if unknown or not shapes:
        raise ValueError(f"shapes {unknown or list(shapes)}: expected a non-empty subset of {MULTILABEL_SHAPES}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    s = int(image_size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    images = np.empty((n, s, s, 3), np.uint8)
    labels = np.zeros((n, len(shapes)), np.int64)
    for i in range(n):
        gen = np.random.default_rng([seed, stream, i, 0x3A17])
        bg = gen.uniform(0, 255, 3).astype(np.float32)
        texture = gen.uniform(15, 50) * _texture(gen, yy, xx, s)  # (draw order matters: scene i is fixed by its seed)
        img = bg + texture[..., None] * gen.choice([-1, 1], 3).astype(np.float32)
        owner = np.full((s, s), -1, np.int16)  # which object each pixel shows
        areas: List[int] = []
        for _ in range(int(gen.integers(min_objects, max_objects + 1))):
            kind = int(gen.integers(len(shapes)))
            for _try in range(20):
                r = gen.uniform(*object_size) * s
                cy, cx = gen.uniform(r * 0.7, s - r * 0.7, 2)
                m = _object_mask(shapes[kind], yy, xx, cy, cx, r, gen)
                hidden = np.bincount(owner[m][owner[m] >= 0], minlength=len(areas))
                visible = [np.count_nonzero(owner == j) - hidden[j] for j in range(len(areas))]
                if np.count_nonzero(m) >= 12 and all(v >= min_visible * a for v, a in zip(visible, areas)):
                    break
            else:
                continue
            while True:  # visible against the background
                col = gen.uniform(0, 255, 3)
                if np.abs(col - bg).sum() > 120:
                    break
            img[m] = col.astype(np.float32)[None] + (gen.uniform(0, 30) * _texture(gen, yy, xx, s)[m])[:, None]
            owner[m] = len(areas)
            areas.append(int(np.count_nonzero(m)))
            labels[i, kind] = 1
        img += gen.standard_normal(img.shape, dtype=np.float32) * np.float32(gen.uniform(2, 12))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels


def export_multilabel_shapes(root: str, n_train: int = 320, n_val: int = 80, n_test: int = 80,
                             image_size: int = 64, seed: int = 0, test_seed: int = 1, one_hot: bool = False,
                             shapes: Sequence[str] = MULTILABEL_SHAPES) -> str:
    """Write synthetic multi-label scenes as a MultiLabelCSVDataModule folder: ``root/images/<split>_<i>.png``
    and ``root/{train,val,test}.csv`` (``path,label1;label2``, or one-hot columns with ``one_hot``). Returns root."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    from PIL import Image

    for split, n, sd, stream in (("train", n_train, seed, 0), ("val", n_val, seed, 1), ("test", n_test, test_seed, 2)):
        images, labels = generate_multilabel_shapes(n, image_size, sd, stream, shapes)
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            w = csvlib.writer(f)
            if one_hot:
                w.writerow(["path", *shapes])
            for i in range(n):
                rel = f"images/{split}_{i:04d}.png"
                Image.fromarray(images[i]).save(os.path.join(root, rel))
                if one_hot:
                    w.writerow([rel, *map(int, labels[i])])
                else:
                    w.writerow([rel, ";".join(shapes[k] for k in np.flatnonzero(labels[i]))])
    return root


class _ShapeLabels(_FastShapes):
    """In-memory multi-label scenes; train batches get the segmentation quickstart's fast augmentation (flips,
    90° rotations, brightness/contrast: every shape label survives them), eval batches are only normalised.
    Batches ``(images (B,3,S,S) float32, targets (B,K) int64)`` are collated here (``__getitems__``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, augment: bool, hflip: float = 0.5,
                 seed: int = 0):
        # _FastShapes transforms a mask along with each image; a 1×1 placeholder mask stands in for it
        super().__init__(images, np.zeros((len(images), 1, 1), np.uint8), mean, std, hflip, seed)
        self.labels, self.augment = labels, augment

    def __getitems__(self, keys: Sequence[Key]) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = [split_key(k)[0] for k in keys]
        imgs = [self._one(k)[0] if self.augment else self.images[i].astype(np.float32) for k, i in zip(keys, idx)]
        x = np.stack(imgs) * self.scale - self.shift  # (B,H,W,3)
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)),
                torch.from_numpy(self.labels[idx]))


class SyntheticShapesMultiLabelDataModule(BaseDataModule):
    """Built-in multi-label task, "which shapes are in the scene" (synthetic, generated in memory).

    Each scene holds 1-3 objects of the kinds in ``shapes`` (default circle, rectangle, triangle, cross, ring,
    star; repeats allowed, so 1-3 labels) with random colours, sizes, positions and rotations, possibly
    overlapping, on a textured background. Train and val come from ``data_seed`` (disjoint streams); the test
    split is generated from ``test_seed``, so it stays the same held-out set whatever ``data_seed`` is.
    """

    split_collate = {"train": _passthrough, "val": _passthrough, "test": _passthrough}

    def __init__(
        self,
        image_size: int = 64,
        n_train: int = 4000,
        n_val: int = 500,
        n_test: int = 1000,
        shapes: Optional[List[str]] = None,
        min_objects: int = 1,
        max_objects: int = 3,
        object_size: Tuple[float, float] = (0.12, 0.25),
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        seed: Optional[int] = None,
        data_seed: int = 0,
        test_seed: int = 1,
        augment: bool = True,
        hflip: float = 0.5,
        mean: Optional[List[float]] = None,
        std: Optional[List[float]] = None,
        backbone: Optional[str] = None,
        sampler: str = "random",
    ):
        """
        Args:
            image_size: side of the generated square scenes.
            n_train: number of train scenes.
            n_val: number of val scenes.
            n_test: number of test scenes (from ``test_seed``).
            shapes: the object kinds, which are also the classes, in order; default all six.
            min_objects: fewest objects per scene.
            max_objects: most objects per scene.
            object_size: range of an object's "radius" as a fraction of the image side.
            batch_size: images per batch.
            num_workers: dataloader workers (0: data is in memory).
            pin_memory: pin host memory; None = when CUDA is available.
            persistent_workers: keep workers alive between epochs (only when num_workers > 0).
            seed: augmentation/shuffle seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``) or 0.
            data_seed: seed of the train and val scenes.
            test_seed: seed of the test scenes.
            augment: flips, 90° rotations and brightness/contrast jitter on train scenes.
            hflip: probability of a horizontal flip when augmenting.
            mean: normalisation mean (RGB, 0..1); default from ``backbone``'s pretrained config, else ImageNet.
            std: normalisation std, resolved like ``mean``.
            backbone: timm/vitmha arch name whose pretrained mean/std to use.
            sampler: ``random`` (shuffle every epoch) or ``balanced`` (class-aware sampling, as
                MultiLabelCSVDataModule's).
        """
        super().__init__()
        self.save_hyperparameters(logger=False)  # see BaseDataModule
        self.image_size, self.n_train, self.n_val, self.n_test = int(image_size), n_train, n_val, n_test
        self.classes: List[str] = list(shapes) if shapes is not None else list(MULTILABEL_SHAPES)
        unknown = [s for s in self.classes if s not in MULTILABEL_SHAPES]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"shapes {self.classes}: expected distinct names from {MULTILABEL_SHAPES}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        self.num_classes = len(self.classes)
        self.min_objects, self.max_objects = min_objects, max_objects
        self.object_size = (float(object_size[0]), float(object_size[1]))
        self.data_seed, self.test_seed, self.augment, self.hflip = data_seed, test_seed, augment, hflip
        self._init_loader(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                          persistent_workers=persistent_workers, seed=seed, mean=mean, std=std, backbone=backbone,
                          sampler=sampler)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        for split, n, sd, stream in (("train", self.n_train, self.data_seed, 0), ("val", self.n_val, self.data_seed, 1),
                                     ("test", self.n_test, self.test_seed, 2)):
            images, labels = generate_multilabel_shapes(n, self.image_size, sd, stream, self.classes, self.min_objects,
                                                        self.max_objects, self.object_size)
            train = split == "train"
            self.datasets[split] = _ShapeLabels(images, labels, self.mean, self.std, augment=train and self.augment,
                                                hflip=self.hflip)
            if split == "test":
                tf = classification_eval(self.image_size, self.mean, self.std)
                self.datasets["predict"] = _ArrayPredict(images, tf, "synthetic_shapes_multilabel/test")

    def _setup_predict(self) -> None:
        self.setup("fit")  # setup builds every split, predict included
