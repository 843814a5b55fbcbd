"""Reading images and masks from disk, and checking them cheaply before training."""
from __future__ import annotations

import functools
import glob
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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
    """Hidden and system entries, never data: dotfiles (.DS_Store, macOS's ._name copies), Thumbs.db,
    desktop.ini, __MACOSX."""
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


HIDDEN_FILE = "hidden or system file"
HIDDEN_FOLDER = "hidden or system folder, not read"


def _hidden_entry(path: str) -> Problem:
    return (path + "/", HIDDEN_FOLDER) if os.path.isdir(path) else (path, HIDDEN_FILE)


def list_dir(path: str, junk: Optional[List[Problem]] = None) -> List[str]:
    """Sorted visible entries of a folder; hidden/system ones (``is_hidden``) are left out and, with ``junk``,
    appended to it as ``(path, reason)``."""
    names = sorted(os.listdir(path))
    if junk is not None:
        junk.extend(_hidden_entry(os.path.join(path, n)) for n in names if is_hidden(n))
    return [n for n in names if not is_hidden(n)]


def walk_files(folder: str, junk: Optional[List[Problem]] = None) -> Iterator[str]:
    """Every visible file under ``folder``, recursively, in sorted order; hidden files and folders are not
    entered and, with ``junk``, appended to it."""
    for dirpath, dirnames, names in os.walk(folder):
        if junk is not None:
            junk.extend((os.path.join(dirpath, d) + "/", HIDDEN_FOLDER) for d in sorted(dirnames) if is_hidden(d))
            junk.extend((os.path.join(dirpath, n), HIDDEN_FILE) for n in sorted(names) if is_hidden(n))
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for n in sorted(names):
            if not is_hidden(n):
                yield os.path.join(dirpath, n)


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


# --- EXIF orientation -----------------------------------------------------------------------------------
# Cameras and phones store the sensor's pixel grid and an Orientation tag (EXIF 0x0112, the same tag number in
# TIFF) that says how to turn it for display; torchvision's and timm's loaders ignore the tag, so phone photos
# reach the model sideways. vitmha reads every image upright: the tag is applied to JPEG, PNG, WebP and TIFF
# images alike, for training, evaluation and prediction (every reader below). Masks are read as stored
# (``read_mask``, as mmcv/mmseg read label maps "unchanged"): annotation tools draw on the upright image and
# write label PNGs without the tag; a mask that follows the stored pixel grid instead is reported by the
# segmentation module's size check.
ORIENTATION_TAG = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


def pil_orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1-8) of a PIL image just opened (before decoding); 1 (as stored) when absent or
    invalid. A PNG's comes from an eXIf chunk before the pixel data, where the PNG specification puts it."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PIL would decode the whole image looking for an eXIf chunk after the pixels
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return 1
    return value if 1 <= value <= 8 else 1


def _tiff_orientation(page: Any) -> int:
    tag = page.tags.get(ORIENTATION_TAG)
    try:
        value = int(tag.value) if tag is not None else 1
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """``a`` (H, W[, C]) as displayed under EXIF ``orientation``: what PIL's ``ImageOps.exif_transpose`` does
    to the image (2 mirror, 3 rotate 180°, 4 flip, 5 transpose, 6 rotate 90° clockwise, 7 transverse, 8 rotate
    90° counter-clockwise). Contiguous; ``a`` itself for 1."""
    if orientation in (2, 3):
        a = a[:, ::-1]
    if orientation in (3, 4):
        a = a[::-1]
    if orientation in (5, 6, 7, 8):
        a = np.swapaxes(a, 0, 1)  # transpose, then flip for the rotations and the transverse
        if orientation in (6, 7):
            a = a[:, ::-1]
        if orientation in (7, 8):
            a = a[::-1]
    return np.ascontiguousarray(a) if orientation != 1 else a


def upright_size(size: Tuple[int, int], orientation: int) -> Tuple[int, int]:
    """(W, H) of an image of stored ``size`` (W, H) once turned upright."""
    return (size[1], size[0]) if orientation in _TRANSPOSED else (size[0], size[1])


def _pil_rgb(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)  # decodes; no conversion copy
    if im.mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im)
        if im.mode.startswith("I;16"):
            a = a.astype(np.uint16)
        return _to_rgb(a)
    # P, PA, LA, RGBA, CMYK, YCbCr, 1, ...: PIL knows how to get RGB
    return np.asarray(im.convert("RGB"))


def read_rgb(path: str) -> np.ndarray:
    """Read any supported image as an (H, W, 3) uint8 RGB array, upright (its EXIF orientation applied).

    Grayscale is replicated, palette images are expanded, alpha is dropped (as torchvision's loader
    does), and 16-bit images are scaled to 8 bits by /257 rather than clipped.
    """
    if path.lower().endswith(_TIFF):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                return upright(_to_rgb(page.asarray()), _tiff_orientation(page))
        except Exception:
            pass  # fall back to PIL (tifffile may lack a codec PIL has)
    with Image.open(path) as im:
        orientation = pil_orientation(im)
        return upright(_pil_rgb(im), orientation)


#: JPEG reduction factors libjpeg decodes at directly (DCT scaling), largest first
JPEG_SCALES = (8, 4, 2)


def read_rgb_reduced(path: str, reduction: Callable[[int, int], int]) -> Tuple[np.ndarray, int]:
    """``read_rgb``, but a JPEG is decoded straight at 1/k of its size, k = ``reduction(W, H)`` of the upright
    image (1, 2, 4 or 8; libjpeg's DCT scaling: an area-like average, no full-size decode). Other formats
    are read whole (k = 1). Returns (the upright array, k): pixel (x, y) of the full-size image is at
    (x / k, y / k)."""
    if not path.lower().endswith(_JPEG):
        a = read_rgb(path)
        reduction(a.shape[1], a.shape[0])  # the caller's draws happen for every file alike
        return a, 1
    with Image.open(path) as im:
        orientation = pil_orientation(im)
        w, h = upright_size(im.size, orientation)
        k = int(reduction(w, h))
        if k > 1:
            sw, sh = im.size
            drafted = im.draft("RGB", (sw // k, sh // k))  # (mode, (0, 0, W / scale, H / scale)) or None
            k = int(round(sw / drafted[1][2])) if drafted else 1
        return upright(_pil_rgb(im), orientation), k


# --- any number of channels (in_chans != 3) ------------------------------------------------------------
_DTYPE_MAX = {("u", 1): 255.0, ("u", 2): 65535.0, ("i", 2): 32767.0, ("u", 4): 4294967295.0,  # (kind, bytes)
              ("i", 4): 2147483647.0, ("b", 1): 1.0}
_PIL_NATIVE = {"L": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "I": 1, "F": 1, "LA": 2, "RGB": 3,
               "RGBA": 4, "CMYK": 4}


def _channels_last(a: np.ndarray, axes: str = "", in_chans: Optional[int] = None) -> np.ndarray:
    """(H, W) / (H, W, C) / (C, H, W) -> (H, W, C). The channel axis is TIFF's sample axis ``S`` when the file
    says so; else the end that equals ``in_chans`` (when only one does), else the smaller end."""
    if a.ndim > 3:  # drop length-1 axes (a view, no copy)
        axes = "".join(x for x, n in zip(axes, a.shape) if n != 1) if len(axes) == a.ndim else ""
        a = a[tuple(0 if n == 1 else slice(None) for n in a.shape)]
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected one 2-D image with channels, found an array of shape {a.shape}"
                         + (f" (axes {axes})" if axes else ""))
    if len(axes) == 3 and "S" in axes:
        first = axes.index("S") == 0
    elif in_chans is not None and (a.shape[0] == in_chans) != (a.shape[-1] == in_chans):
        first = a.shape[0] == in_chans
    else:
        first = a.shape[0] < a.shape[-1]
    return np.moveaxis(a, 0, -1) if first else a


def _read_tiff(path: str, in_chans: Optional[int] = None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        return upright(_channels_last(series.asarray(), series.axes, in_chans), _tiff_orientation(tf.pages[0]))


def read_native(path: str, in_chans: Optional[int] = None) -> np.ndarray:
    """An image as stored, upright (EXIF orientation applied), (H, W, C) in its own dtype: grey gives 1
    channel, grey + alpha 2, RGB 3, RGBA and CMYK 4, multi-band TIFF (H, W, C) or planar (C, H, W) C; palette
    images are expanded to RGB.
    ``in_chans`` only decides which end of a TIFF's (n, h, m) array holds the channels when the file does not
    say (a band stack written page by page)."""
    if path.lower().endswith(_TIFF):
        try:
            return _read_tiff(path, in_chans)
        except ValueError:
            raise
        except Exception:
            pass  # fall back to PIL (tifffile may lack a codec PIL has)
    with Image.open(path) as im:
        mode, orientation = im.mode, pil_orientation(im)
        if mode not in _PIL_NATIVE:
            im = im.convert({"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA"}.get(mode, "RGB"))
        a = np.asarray(im)
    if mode.startswith("I;16") or (mode == "I" and path.lower().endswith(".png")):
        a = a.astype(np.uint16)  # PNG holds at most 16 bits; Pillow may hand them over as int32
    return upright(_channels_last(a), orientation)


def _describe(c: int) -> str:
    return {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA, CMYK or 4 bands"}.get(c, "bands")


def read_channels(path: str, in_chans: int, max_pixel_value: Optional[float] = None) -> np.ndarray:
    """An image as (H, W, in_chans) float32, not converted to RGB: scaled to [0, 1] by ``max_pixel_value``,
    else by its dtype's range (8 bit /255, 16 bit /65535, float taken as it is).

    Raises ValueError naming the file when it has another number of channels.
    """
    a = read_native(path, in_chans)
    c = a.shape[-1]
    if c != in_chans:
        raise ValueError(f"{path}: {c} channel(s) ({_describe(c)}, shape {a.shape[0]}×{a.shape[1]}×{c}), "
                         f"expected in_chans={in_chans}")
    return scale_to_unit(a, max_pixel_value)


def scale_to_unit(a: np.ndarray, max_pixel_value: Optional[float] = None) -> np.ndarray:
    """float32 ``a / max_pixel_value``, or ``a / (its dtype's largest value)``; float arrays are kept as they are."""
    if max_pixel_value is not None:
        return np.ascontiguousarray(a, dtype=np.float32) / np.float32(max_pixel_value)
    if a.dtype.kind == "f":
        return np.ascontiguousarray(a, dtype=np.float32)
    top = _DTYPE_MAX.get((a.dtype.kind, a.dtype.itemsize))  # either byte order
    if top is None:
        raise ValueError(f"images of dtype {a.dtype} need an explicit max_pixel_value")
    return np.ascontiguousarray(a, dtype=np.float32) / np.float32(top)


def image_reader(in_chans: int = 3, max_pixel_value: Optional[float] = None) -> Callable[[str], np.ndarray]:
    """The reader of the data modules: ``read_rgb`` (uint8 RGB) for 3 channels, else ``read_channels``
    (float32 in [0, 1], the file's own channels). A ``max_pixel_value`` selects the float reader for 3 too."""
    if int(in_chans) == 3 and max_pixel_value is None:
        return read_rgb
    return functools.partial(read_channels, in_chans=int(in_chans), max_pixel_value=max_pixel_value)


def read_mask(path: str) -> np.ndarray:
    """Read a one-channel label mask as an (H, W) integer array (palette PNGs give their indices)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):
            raise ValueError(f"mask has mode {im.mode} ({len(im.getbands())} channels); expected one channel (L or P)")
        a = np.asarray(im)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


def check_image(path: str, in_chans: Optional[int] = None) -> Optional[str]:
    """Return None if ``path`` is a readable, complete image, else what is wrong with it.

    Cheap: PNG chunk CRCs via ``verify()``; JPEG decoded at 1/8 scale (still reads every byte);
    other formats decoded fully unless huge. With ``in_chans`` the image is decoded as the data modules
    read it for that many channels, and another channel count is a problem.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        if in_chans is not None:
            image_reader(in_chans, 1.0)(path)
            return None
        if path.lower().endswith(_TIFF):
            try:
                import tifffile

                with tifffile.TiffFile(path) as tf:
                    a = tf.pages[0].asarray()
                    series = tf.series[0]
                    shape, axes = tuple(series.shape), series.axes
                _to_rgb(a)
            except Exception:
                pass  # let PIL have a go; its error is reported if it also fails
            else:
                try:
                    bands = _channels_last(np.broadcast_to(np.uint8(0), shape), axes).shape[-1]
                except ValueError:
                    bands = 0  # a stack of images rather than one multi-band image: page 0 is read
                if bands > 4:
                    return (f"{bands} channels (bands, shape {shape}); read as RGB (in_chans=3) it would lose all "
                            f"but 3: set in_chans: {bands} (the vitmha CLI: model.init_args.backbone_kwargs)")
                return None
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
        if in_chans is not None and msg.startswith(f"{path}: "):
            return msg[len(path) + 2:]  # the channel count (the caller names the file)
        return f"unreadable image ({msg})"


def stored_and_upright_size(path: str,
                            in_chans: Optional[int] = None) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
    """((W, H) as stored, (W, H) upright, EXIF orientation) from the header, without decoding (a TIFF's channel
    axis found as ``read_native`` finds it)."""
    if path.lower().endswith(_TIFF):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                shape, axes = tuple(series.shape), series.axes
                orientation = _tiff_orientation(tf.pages[0])
            h, w, _ = _channels_last(np.broadcast_to(np.uint8(0), shape), axes, in_chans).shape
            return (w, h), upright_size((w, h), orientation), orientation
        except Exception:
            pass
    with Image.open(path) as im:
        orientation = pil_orientation(im)
        return im.size, upright_size(im.size, orientation), orientation


def image_size_of(path: str, in_chans: Optional[int] = None) -> Tuple[int, int]:
    """(W, H) of the image as the readers give it (upright), from the header, without decoding."""
    return stored_and_upright_size(path, in_chans)[1]


def parallel_map(fn: Callable, items: Sequence, threads: Optional[int] = None) -> list:
    """``list(map(fn, items))`` on a small thread pool (PIL and zlib release the GIL while decoding)."""
    if len(items) < 64:
        return [fn(x) for x in items]
    threads = threads or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(fn, items, chunksize=32))


def expand_paths(specs: Iterable[str], base: Optional[str] = None,
                 junk: Optional[List[Problem]] = None) -> Tuple[List[str], List[Problem]]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image files.

    Returns (files, problems), problems naming specs that matched nothing. Files a folder holds besides its
    images (hidden/system files, other types) are left out and, with ``junk``, appended to it.
    """
    files: List[str] = []
    problems: List[Problem] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if base and not os.path.isabs(spec):
            spec = os.path.join(base, spec)
        if os.path.isdir(spec):
            found = []
            for p in walk_files(spec, junk):
                if is_image_file(p):
                    found.append(p)
                elif junk is not None:
                    junk.append((p, NOT_AN_IMAGE))
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


NOT_AN_IMAGE = f"unsupported file type (images: {', '.join(IMAGE_EXTENSIONS)})"


def skip_reason(message: str) -> str:
    """The kind of problem a per-file message names, for grouping: its text before any bracketed detail, with
    file names and line numbers left out ("unreadable image (cannot identify...)" -> "unreadable image")."""
    reason = message.split(" (", 1)[0]
    reason = re.sub(r"^file listed in \S+ does not exist$", "file listed in a csv does not exist", reason)
    reason = re.sub(r"^\S+:\d+: ", "", reason)  # "val.csv:3: unsupported file type" -> "unsupported file type"
    return reason


def skipped_summary(skipped: Sequence[Problem], root: str) -> str:
    """One line: how many entries under ``root`` were skipped, grouped by reason (largest group first), each
    with an example path relative to ``root``."""
    groups: Dict[str, List[str]] = {}
    for path, message in skipped:
        groups.setdefault(skip_reason(message), []).append(path)

    def rel(p: str) -> str:
        try:
            r = os.path.relpath(p, root)
        except ValueError:
            return p
        return p if r.startswith("..") else r + ("/" if p.endswith("/") else "")

    parts = [f"{len(paths)} × {reason} (e.g. {rel(paths[0])})"
             for reason, paths in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return f"skipped {len(skipped)} file(s) under {root}: " + "; ".join(parts)


def raise_or_skip(problems: List[Problem], skippable: List[Problem], skip_bad_files: bool, root: str,
                  junk: Sequence[Problem] = ()) -> None:
    """Raise one DataValidationError for all problems (and the skippable ones unless ``skip_bad_files``);
    otherwise say in one line what was skipped and why: a warning when bad files were skipped
    (``skip_bad_files``), an info line when only ``junk`` (hidden/system files, entries the module does not
    read) was."""
    if skip_bad_files and skippable:
        allp = problems
    else:
        allp = problems + skippable
        skippable = []
    if allp:
        hint = " (set skip_bad_files=True to skip unreadable/unsupported files)" if allp != problems else ""
        raise DataValidationError(allp, header=f"{len(allp)} problem(s) with the data under {root}{hint}:")
    skipped = list(junk) + list(skippable)
    if not skipped:
        return
    line = skipped_summary(skipped, root)
    if skippable:
        warnings.warn(f"skip_bad_files=True: {line}", UserWarning, stacklevel=3)
    else:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(line)
