"""Reading images and masks from disk, and checking them cheaply before training."""
from __future__ import annotations

import glob
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from vitmha.data.errors import DataValidationError, Problem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MASK_EXTENSIONS = (".png",)
_TIFF = (".tif", ".tiff")
_JPEG = (".jpg", ".jpeg")
_FULL_LOAD_MAX_PIXELS = 4096 * 4096  # above this only the header/structure is checked (and JPEG at 1/8 scale)


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def list_dir(path: str) -> List[str]:
    """Sorted visible entries of a folder (hidden files such as .DS_Store are ignored)."""
    return sorted(n for n in os.listdir(path) if not is_hidden(n))


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale an integer or float array to uint8 by its dtype's range (16-bit → /257), never by clipping."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.size and a.min() >= 0 and a.max() <= 65535):
        if a.dtype != np.uint16 and a.size and a.max() <= 255:
            return a.astype(np.uint8)  # 8-bit values stored in a wider type (PIL mode "I" from a 8-bit file)
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if a.dtype.kind == "f":
        lo, hi = (0.0, 1.0) if a.size == 0 or (a.min() >= 0 and a.max() <= 1) else (float(a.min()), float(a.max()))
        return np.round((a.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255).clip(0, 255).astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())  # other integer ranges: stretch
    return np.round((a.astype(np.float64) - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)


def _to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C,H,W) TIFF
    if a.ndim != 3:
        raise ValueError(f"expected a 2-D image, found an array of shape {a.shape}")
    c = a.shape[-1]
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    elif c == 2:  # grey + alpha: drop alpha
        a = np.repeat(a[:, :, :1], 3, axis=-1)
    elif c >= 4:  # drop alpha (and extra channels), like torchvision's / timm's loaders
        a = a[:, :, :3]
    return np.ascontiguousarray(to_uint8(a))


def read_rgb(path: str) -> np.ndarray:
    """Read any supported image as an (H, W, 3) uint8 RGB array.

    Grayscale is replicated, palette images are expanded, alpha is dropped (as torchvision's loader
    does), and 16-bit images are scaled to 8 bits by /257 rather than clipped.
    """
    if path.lower().endswith(_TIFF):
        try:
            import tifffile

            return _to_rgb(tifffile.imread(path, key=0))
        except Exception:
            pass  # fall back to PIL (tifffile may lack a codec PIL has)
    with Image.open(path) as im:
        if im.mode in ("RGB",):
            return np.asarray(im.convert("RGB"))
        if im.mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            a = np.asarray(im)
            if im.mode.startswith("I;16"):
                a = a.astype(np.uint16)
            return _to_rgb(a)
        # P, PA, LA, RGBA, CMYK, YCbCr, 1, ...: PIL knows how to get RGB
        return np.asarray(im.convert("RGB"))


def read_mask(path: str) -> np.ndarray:
    """Read a one-channel label mask as an (H, W) integer array (palette PNGs give their indices)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(f"mask has mode {im.mode} ({len(im.getbands())} channels); expected one channel (L or P)")
        a = np.asarray(im)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


def check_image(path: str) -> Optional[str]:
    """Return None if ``path`` is a readable, complete image, else what is wrong with it.

    Cheap: PNG chunk CRCs via ``verify()``; JPEG decoded at 1/8 scale (still reads every byte);
    other formats decoded fully unless huge.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        if path.lower().endswith(_TIFF):
            try:
                import tifffile

                with tifffile.TiffFile(path) as tf:
                    a = tf.pages[0].asarray()
                _to_rgb(a)
                return None
            except Exception:
                pass  # let PIL have a go; its error is reported if it also fails
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            w, h = im.size
            if w == 0 or h == 0:
                return f"image has size {w}×{h}"
            if path.lower().endswith(_JPEG):
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
            elif w * h <= _FULL_LOAD_MAX_PIXELS:
                im.load()
        return None
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError)
        msg = str(e) or type(e).__name__
        return f"unreadable image ({msg})"


def image_size_of(path: str) -> Tuple[int, int]:
    """(W, H) from the header, without decoding."""
    if path.lower().endswith(_TIFF):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shape = tf.pages[0].shape
            if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
                return shape[2], shape[1]
            return shape[1], shape[0]
        except Exception:
            pass
    with Image.open(path) as im:
        return im.size


def parallel_map(fn: Callable, items: Sequence, threads: Optional[int] = None) -> list:
    """``list(map(fn, items))`` on a small thread pool (PIL and zlib release the GIL while decoding)."""
    if len(items) < 64:
        return [fn(x) for x in items]
    threads = threads or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(fn, items, chunksize=32))


def expand_paths(specs: Iterable[str], base: Optional[str] = None) -> Tuple[List[str], List[Problem]]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image files.

    Returns (files, problems), problems naming specs that matched nothing.
    """
    files: List[str] = []
    problems: List[Problem] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if base and not os.path.isabs(spec):
            spec = os.path.join(base, spec)
        if os.path.isdir(spec):
            found = []
            for dirpath, dirnames, names in os.walk(spec):
                dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
                found += [os.path.join(dirpath, n) for n in sorted(names) if not is_hidden(n) and is_image_file(n)]
            if not found:
                problems.append((spec, "folder holds no images"))
            files += found
        elif os.path.isfile(spec):
            if is_image_file(spec):
                files.append(spec)
            else:
                problems.append((spec, f"not a supported image (extensions: {', '.join(IMAGE_EXTENSIONS)})"))
        else:
            matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and is_image_file(p))
            if not matched:
                problems.append((spec, "no such file, folder or matching image"))
            files += matched
    seen = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    return unique, problems


def raise_or_skip(problems: List[Problem], skippable: List[Problem], skip_bad_files: bool, root: str) -> None:
    """Raise one DataValidationError for all problems; with ``skip_bad_files`` only warn about skippable ones."""
    if skip_bad_files and skippable:
        warnings.warn(
            f"skip_bad_files=True: skipping {len(skippable)} bad file(s) under {root}, "
            f"e.g. {skippable[0][0]}: {skippable[0][1]}",
            stacklevel=3,
        )
        skippable = []
    allp = problems + skippable
    if allp:
        hint = " (set skip_bad_files=True to skip unreadable/unsupported files)" if skippable and not skip_bad_files else ""
        raise DataValidationError(allp, header=f"{len(allp)} problem(s) with the data under {root}{hint}:")
