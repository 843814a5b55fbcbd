"""Callbacks and plugins the vitmha CLI installs by default.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to its target, fsyncs it
  and renames it into place, so ``last.ckpt`` is always a complete file even if the process is killed
  mid-save; a write that fails (a full disk) stops the run with :class:`CheckpointWriteError`.
- :class:`VitmhaModelCheckpoint` refuses to write weights that contain NaN/Inf, so a diverged run never
  replaces the last good checkpoint.
- :class:`ClassificationPredictionWriter` and :class:`SegmentationPredictionWriter` write what
  ``vitmha predict`` produces: ``predictions.csv``, index-mask PNGs and colour overlays.
- :func:`run_loggers` gives the CSV and TensorBoard loggers of a run one ``version_N`` folder, claimed
  atomically, so runs started together under the same root never share one.
"""
from __future__ import annotations

import csv
import glob
import io
import os
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vitmha.visualize import segmentation_palette

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "RunVersion",
    "run_loggers",
    "NonFiniteWeightsError",
    "VitmhaModelCheckpoint",
    "ClassificationPredictionWriter",
    "SegmentationPredictionWriter",
    "PredictionsCsv",
    "StemNamer",
    "save_mask_and_overlay",
    "segmentation_palette",
]


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(dirpath: str) -> None:
    # the rename is only durable once the directory entry is on disk (POSIX; a no-op elsewhere)
    with suppress(OSError):
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left on device); the previous file is intact. Defined
    here so that the CLI reports it as one ``error:`` line naming the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp-<pid>`` in the target's directory, fsync, then ``os.replace``.

    A reader therefore sees either the previous complete checkpoint or the new complete one, never a
    partial file, even after SIGKILL or power loss. Temporary files left behind by a killed process are
    removed on the next successful save of the same path. Remote (``scheme://``) paths fall back to
    Lightning's own writer.
    """

    TMP_SUFFIX = ".tmp-"

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        dirpath = os.path.dirname(os.path.abspath(path))
        os.makedirs(dirpath, exist_ok=True)
        tmp = f"{path}{self.TMP_SUFFIX}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                self._write(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with suppress(OSError):
                os.remove(tmp)
            if isinstance(e, OSError):  # a full disk, a quota, a read-only folder: the user's to fix
                raise CheckpointWriteError(f"{path}: checkpoint not written ({e.strerror or e}); the checkpoints "
                                           "already on disk are kept") from e
            raise
        _fsync_dir(dirpath)
        self._remove_stale_tmp(path)

    def _write(self, f: io.BufferedWriter, data: memoryview) -> None:
        """Write the serialised checkpoint; a hook tests override to stop half-way."""
        f.write(data)

    def _remove_stale_tmp(self, path: str) -> None:
        for tmp in glob.glob(glob.escape(path) + self.TMP_SUFFIX + "*"):
            pid = tmp.rsplit(self.TMP_SUFFIX, 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with suppress(OSError):
                    os.remove(tmp)


class NonFiniteWeightsError(FloatingPointError):
    """Raised instead of writing a checkpoint whose weights contain NaN or Inf."""


class VitmhaModelCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` that never writes non-finite weights.

    If any parameter is NaN/Inf when a checkpoint is due, the run stops with
    :class:`NonFiniteWeightsError` and every checkpoint already on disk (``last.ckpt`` included) is left
    as it was. The check is agreed across ranks, so sharded strategies stop together.

    With ``save_last=True`` it writes ``last.ckpt`` at every checkpointing point, also when the monitored
    metric did not improve (Lightning 2.6 only refreshes ``last.ckpt`` together with a top-k save, which
    would leave a resumable run at its best epoch instead of its latest).
    """

    _last_step_of_last: Optional[int] = None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._ensure_last(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer, at_train_epoch_end=False)

    def _ensure_last(self, trainer: Any, at_train_epoch_end: bool) -> None:
        if (
            self.save_last is not True
            or self._should_skip_saving_checkpoint(trainer)  # also: something was saved at this step already
            or self._should_save_on_train_epoch_end(trainer) != at_train_epoch_end
            or self._every_n_epochs < 1
            or (trainer.current_epoch + 1) % self._every_n_epochs
            or self._last_step_of_last == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step_of_last = trainer.global_step

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        module = trainer.lightning_module
        finite = all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.numel())
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise NonFiniteWeightsError(
                f"model weights contain NaN/Inf at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                f"not writing {filepath}, the checkpoints already saved are kept "
                "(lower the learning rate, enable gradient clipping, or use a more stable precision)"
            )
        super()._save_checkpoint(trainer, filepath)


# ----------------------------------------------------------------------------------------------------------
# run folders


class RunVersion:
    """The ``version_N`` of one run under ``versions_root``, picked once and shared by the run's loggers.

    Lightning's loggers each pick ``max(existing) + 1`` when first asked and create the folder later, so two
    runs started together under the same root can pick the same N and write into one folder. Here global
    rank 0 claims the folder with ``os.mkdir``, which exactly one process can do, and takes the next number
    when another run got there first. Other ranks keep Lightning's guess: the trainer broadcasts rank 0's
    folder wherever one is used (log_dir, checkpoints), and only rank 0 writes logs.
    """

    def __init__(self, versions_root: str) -> None:
        self.versions_root = versions_root
        self.version: Optional[int] = None

    def __call__(self, guess: Callable[[], int]) -> int:
        if self.version is None:
            claim = getattr(rank_zero_only, "rank", 0) == 0 and "://" not in self.versions_root
            self.version = self._claim(guess()) if claim else guess()
        return self.version

    def _claim(self, n: int) -> int:
        os.makedirs(self.versions_root, exist_ok=True)
        while True:
            try:
                os.mkdir(os.path.join(self.versions_root, f"version_{n}"))
                return n
            except FileExistsError:
                n += 1


class _SharedVersion:
    """Logger mixin: the version is the run's :class:`RunVersion`, not the logger's own guess."""

    def __init__(self, *args: Any, run_version: RunVersion, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._run_version = run_version

    def _get_next_version(self) -> int:  # what Lightning's CSV and TensorBoard loggers call, once, for a version
        return self._run_version(super()._get_next_version)


class _CSVLogger(_SharedVersion, CSVLogger):
    pass


class _TensorBoardLogger(_SharedVersion, TensorBoardLogger):
    pass


def run_loggers(save_dir: str, name: str = "lightning_logs") -> list:
    """A CSV logger (first, so ``trainer.log_dir`` and the checkpoints are ``version_N`` itself) and a
    TensorBoard logger (events in ``version_N/tb``), sharing one atomically claimed ``version_N``."""
    version = RunVersion(os.path.join(save_dir, name))
    return [_CSVLogger(save_dir=save_dir, name=name, run_version=version),
            _TensorBoardLogger(save_dir=save_dir, name=name, sub_dir="tb", run_version=version)]


# ----------------------------------------------------------------------------------------------------------
# prediction writers


def _as_tensor(prediction: Any, keys: Sequence[str]) -> tuple[str, torch.Tensor]:
    """Pick the first of ``keys`` from a dict prediction (or take a bare tensor as ``keys[0]``)."""
    if isinstance(prediction, torch.Tensor):
        return keys[0], prediction
    if isinstance(prediction, dict):
        for key in keys:
            if key in prediction:
                return key, prediction[key]
    if isinstance(prediction, (tuple, list)) and prediction and isinstance(prediction[0], torch.Tensor):
        return keys[0], prediction[0]
    raise TypeError(f"predict_step returned {type(prediction).__name__}; expected a tensor or a dict with {keys}")


def _per_item(prediction: Any, keys: Sequence[str]) -> list[torch.Tensor]:
    """Per-image tensors from a (B, ...) tensor, a list of tensors, or a dict holding either under ``keys``."""
    if isinstance(prediction, dict):
        found = next((prediction[k] for k in keys if prediction.get(k) is not None), None)
        if found is None:
            raise TypeError(f"predict_step returned a dict with keys {sorted(prediction)}; expected one of {keys}")
        prediction = found
    if isinstance(prediction, torch.Tensor):
        return list(prediction.unbind(0))
    if isinstance(prediction, (list, tuple)) and all(isinstance(p, torch.Tensor) for p in prediction):
        return list(prediction)
    raise TypeError(f"predict_step returned {type(prediction).__name__}; expected tensors or a dict with {keys}")


def _batch_paths(batch: Any, batch_idx: int, n: int) -> list[str]:
    paths = batch.get("path") if isinstance(batch, dict) else None
    if paths is None:
        return [f"batch{batch_idx:05d}_{i:03d}" for i in range(n)]
    return [str(p) for p in paths]


def _batch_sizes(batch: Any, n: int) -> list[Optional[tuple[int, int]]]:
    """``orig_size`` as a list of (H, W): a (B, 2) tensor, default_collate's ``[H(B,), W(B,)]``, or B pairs."""
    sizes = batch.get("orig_size") if isinstance(batch, dict) else None
    if sizes is None:
        return [None] * n
    if isinstance(sizes, torch.Tensor):
        return [(int(h), int(w)) for h, w in sizes.reshape(n, 2).tolist()]
    if len(sizes) == 2 and all(isinstance(s, torch.Tensor) and s.ndim == 1 and s.numel() == n for s in sizes):
        return [(int(h), int(w)) for h, w in zip(sizes[0].tolist(), sizes[1].tolist())]
    return [(int(s[0]), int(s[1])) for s in sizes]


def _class_names(trainer: Any, pl_module: Any, explicit: Optional[Sequence[str]]) -> Optional[list[str]]:
    if explicit:
        return list(explicit)
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        for attr in ("classes", "class_names"):
            names = getattr(owner, attr, None)
            if names:
                return [str(n) for n in names]
    hparams = getattr(pl_module, "hparams", {}) or {}
    names = hparams.get("class_names") or hparams.get("classes")
    return [str(n) for n in names] if names else None


def _rank_suffix(trainer: Any) -> str:
    return f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""


class PredictionsCsv:
    """``predictions.csv``: one row per image, ``path, label1, prob1, ..., labelK, probK``; written to a
    temporary file and renamed into place by ``close``. The one writer behind ``vitmha predict`` and
    tools/predict.py."""

    def __init__(self, path: str, top_k: int, names: Optional[Sequence[str]] = None) -> None:
        self.path, self.top_k, self.names = path, top_k, list(names) if names else None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
        self._file = open(self._tmp, "w", newline="")
        self._writer = csv.writer(self._file)
        self._header = False

    def write(self, paths: Sequence[str], probs: torch.Tensor) -> None:
        """Rows for ``paths`` from their (B, C) probabilities."""
        probs = probs.detach().float().cpu()
        k = min(self.top_k, probs.shape[-1])
        if not self._header:
            self._writer.writerow(["path"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("label", "prob")])
            self._header = True
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist()):
            row: list[Any] = [path]
            for p, i in zip(ps, idx):
                row += [self.names[i] if self.names and i < len(self.names) else str(i), f"{p:.6f}"]
            self._writer.writerow(row)
        self._file.flush()

    def close(self) -> str:
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        return self.path


class StemNamer:
    """Output names for input images: the file's stem, or ``<parent folder>_<stem>`` (then a counter) when
    an earlier image took it, so two inputs never write the same file."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, path: str) -> str:
        p = Path(path)
        candidates = [p.stem, f"{p.parent.name}_{p.stem}"]
        n = 1
        while all(c in self.used for c in candidates):
            candidates.append(f"{p.parent.name}_{p.stem}_{n}")
            n += 1
        stem = next(c for c in candidates if c not in self.used)
        self.used.add(stem)
        return stem


def save_mask_and_overlay(output_dir: str, stem: str, mask: np.ndarray, image: Optional[np.ndarray],
                          alpha: float = 0.5) -> Path:
    """Write ``<stem>_mask.png`` (one channel, pixel = class index; 16-bit past 255 classes) and
    ``<stem>_overlay.png`` (class colours over ``image``, resized to the mask, or the colours alone);
    returns the mask's path. The one mask/overlay writer of ``vitmha predict`` and tools/predict.py."""
    from PIL import Image

    from vitmha.visualize import colorize_mask, overlay_mask

    mask = np.asarray(mask).astype(np.int64)
    mpath = Path(output_dir) / f"{stem}_mask.png"
    Image.fromarray(mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)).save(mpath)
    if image is None:
        overlay = colorize_mask(mask, None).astype(np.uint8)
    else:
        if image.shape[:2] != mask.shape:
            image = np.asarray(Image.fromarray(image).resize((mask.shape[1], mask.shape[0]), Image.BILINEAR))
        overlay = overlay_mask(image, mask, alpha, ignore_index=None)
    Image.fromarray(overlay).save(Path(output_dir) / f"{stem}_overlay.png")
    return mpath


class ClassificationPredictionWriter(BasePredictionWriter):
    """Writes ``<output_dir>/predictions.csv``: one row per image with its top-k labels and probabilities.

    Args:
        output_dir: folder for ``predictions.csv`` (``predictions_rank<r>.csv`` per rank under DDP).
        top_k: how many classes per image.
        class_names: label names by class index; by default taken from the data module's ``classes``.
    """

    def __init__(self, output_dir: str, top_k: int = 5, class_names: Optional[list[str]] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.top_k = top_k
        self.class_names = class_names
        self._csv: Optional[PredictionsCsv] = None

    @property
    def csv_path(self) -> str:
        return os.path.join(self.output_dir, "predictions.csv")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        path = os.path.join(self.output_dir, f"predictions{_rank_suffix(trainer)}.csv")
        self._csv = PredictionsCsv(path, self.top_k, _class_names(trainer, pl_module, self.class_names))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        key, out = _as_tensor(prediction, ("logits", "probs"))
        out = out.detach().float().cpu()
        probs = out if key == "probs" else out.softmax(dim=-1)
        self._csv.write(_batch_paths(batch, batch_idx, len(probs)), probs)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None


class SegmentationPredictionWriter(BasePredictionWriter):
    """Writes ``<stem>_mask.png`` (one channel, pixel = class index) and ``<stem>_overlay.png`` per image.

    Masks are resized back to the image's ``orig_size`` (logits bilinearly before the argmax). The overlay
    blends the palette colour of each class over the original image (read from its ``path``).

    Args:
        output_dir: folder for the PNGs.
        alpha: opacity of the colour overlay.
    """

    def __init__(self, output_dir: str, alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.alpha = alpha
        self._names = StemNamer()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self._names = StemNamer()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        from PIL import Image

        items = _per_item(prediction, ("mask", "masks", "logits", "probs"))
        n = len(items)
        for i, (path, size) in enumerate(zip(_batch_paths(batch, batch_idx, n), _batch_sizes(batch, n))):
            item = items[i].detach().cpu()
            if item.ndim == 3:  # (C, h, w) scores
                if size is not None and tuple(item.shape[-2:]) != size:
                    item = F.interpolate(item[None].float(), size=size, mode="bilinear", align_corners=False)[0]
                mask = item.argmax(dim=0)
            else:  # (h, w) class indices
                mask = item
                if size is not None and tuple(mask.shape) != size:
                    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
            image = None
            read = getattr(getattr(trainer, "datamodule", None), "read", None)  # a file data module's: RGB, grey, bands
            if os.path.isfile(path) and read is not None:
                from vitmha.inference import display_rgb

                image = display_rgb(read(path))
            elif os.path.isfile(path):
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            save_mask_and_overlay(self.output_dir, self._names(path), mask.to(torch.int64).numpy(), image, self.alpha)
