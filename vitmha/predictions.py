"""Prediction files, one writer per kind of output, shared by ``vitmha predict``, ``vitmha.load(...).predict``
and ``Trainer.predict`` (through :class:`PredictionWriter`).

- :class:`PredictionsCsv`: ``predictions.csv`` of a classifier, ``path, label1, prob1, ..., labelK, probK``;
- :class:`MultiLabelPredictionsCsv`: ``path, labels, probs, prob_<class>...`` (the labels above their thresholds);
- :class:`MaskFiles`: ``<stem>_mask.png`` (pixel = class index) and ``<stem>_overlay.png`` per image.

A task says which one it writes (``prediction_sink``); every sink takes ``write(paths, outputs, images)``
with the per-image outputs of the task's ``describe`` and is finished by ``close()``. CSV files are written
to a temporary file and renamed into place, so a stopped run never leaves half a file under the final name.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionsCsv", "MultiLabelPredictionsCsv", "MaskFiles", "StemNamer", "save_mask_and_overlay",
           "PredictionWriter"]


class PredictionsCsv:
    """``predictions.csv``: one row per image, ``path, label1, prob1, ..., labelK, probK`` (the top ``top_k``)."""

    def __init__(self, path: str, top_k: int, names: Optional[Sequence[str]] = None) -> None:
        self.path, self.top_k, self.names = path, top_k, list(names) if names else None
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self._tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
        self._file: Any = open(self._tmp, "w", newline="")
        self._writer = csv.writer(self._file)
        self._header = False

    def _name(self, i: int) -> str:
        return self.names[i] if self.names and i < len(self.names) else str(i)

    def write_probs(self, paths: Sequence[str], probs: torch.Tensor) -> None:
        """Rows for ``paths`` from their (B, C) probabilities."""
        probs = probs.detach().float().cpu()
        k = min(self.top_k, probs.shape[-1])
        if not self._header:
            self._writer.writerow(["path"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("label", "prob")])
            self._header = True
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idx in zip(paths, top_p.tolist(), top_i.tolist()):
            row: List[Any] = [path]
            for p, i in zip(ps, idx):
                row += [self._name(i), f"{p:.6f}"]
            self._writer.writerow(row)
        self._file.flush()

    def write(self, paths: Sequence[str], outputs: Sequence[Dict[str, Any]], images: Any = None) -> None:
        """Rows for ``paths`` from per-image outputs holding ``probs`` (C,)."""
        if len(paths):
            self.write_probs(paths, torch.stack([torch.as_tensor(o["probs"]) for o in outputs]))

    def close(self) -> str:
        """Finish the file (renamed into place); returns its path."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        return self.path


class MultiLabelPredictionsCsv(PredictionsCsv):
    """``predictions.csv`` of a multi-label model: ``path, labels, probs, prob_<class>...``; ``labels`` are the
    classes above their thresholds joined by ``;`` (most probable first, empty for none), ``probs`` their
    probabilities in the same order, then every class's probability."""

    def __init__(self, path: str, names: Sequence[str], thresholds: torch.Tensor) -> None:
        super().__init__(path, top_k=len(names), names=names)
        self.thresholds = thresholds.detach().float().cpu()
        self._writer.writerow(["path", "labels", "probs"] + [f"prob_{n}" for n in self.names])
        self._header = True

    def write_probs(self, paths: Sequence[str], probs: torch.Tensor) -> None:
        probs = probs.detach().float().cpu()
        for path, p in zip(paths, probs):
            above = [int(i) for i in torch.argsort(p, descending=True) if p[i] > self.thresholds[i]]
            self._writer.writerow([path, ";".join(self._name(i) for i in above),
                                   ";".join(f"{float(p[i]):.4f}" for i in above)] + [f"{float(v):.6f}" for v in p])
        self._file.flush()


class StemNamer:
    """Output names for input images: the file's stem, or ``<parent folder>_<stem>`` (then a counter) when
    an earlier image took it, so two inputs never write the same file."""

    def __init__(self) -> None:
        self.used: set = set()

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
    returns the mask's path."""
    from PIL import Image

    from vitmha.visualize import colorize_mask, overlay_mask

    mask = np.asarray(mask).astype(np.int64)
    os.makedirs(output_dir, exist_ok=True)
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


class MaskFiles:
    """``<stem>_mask.png`` and ``<stem>_overlay.png`` per image in ``output_dir`` (a stem two inputs share
    gets the parent folder's name)."""

    def __init__(self, output_dir: str, alpha: float = 0.5) -> None:
        self.output_dir, self.alpha = output_dir, alpha
        self.names = StemNamer()
        self.written: List[Path] = []
        os.makedirs(output_dir, exist_ok=True)

    def write(self, paths: Sequence[str], outputs: Sequence[Dict[str, Any]],
              images: Optional[Sequence[Optional[np.ndarray]]] = None) -> None:
        """Masks for ``paths`` from outputs holding ``mask`` (H, W); ``images`` (H, W, C) for the overlays."""
        from vitmha.inference import display_rgb

        images = images if images is not None else [None] * len(paths)
        for path, out, image in zip(paths, outputs, images):
            rgb = display_rgb(image) if image is not None else None
            self.written.append(save_mask_and_overlay(self.output_dir, self.names(path), np.asarray(out["mask"]),
                                                      rgb, self.alpha))

    def close(self) -> str:
        return self.output_dir


class PredictionWriter(BasePredictionWriter):
    """Writes what a vitmha task's ``predict_step`` returns (``{"path", "outputs"}``) with the task's own
    sink (``task.prediction_sink``): predictions.csv for classifiers, masks and overlays for segmenters.

    Args:
        output_dir: folder for the files (``predictions_rank<r>.csv`` per rank under DDP).
        top_k: classes per image in a classifier's predictions.csv.
    """

    def __init__(self, output_dir: str, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.top_k = output_dir, top_k
        self._sink: Any = None

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        names = getattr(getattr(trainer, "datamodule", None), "classes", None) or None
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self._sink = pl_module.prediction_sink(self.output_dir, names, self.top_k, suffix=suffix)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        outputs = prediction["outputs"]
        paths = prediction.get("path") or [f"batch{batch_idx:05d}_{i:03d}" for i in range(len(outputs))]
        read = getattr(getattr(trainer, "datamodule", None), "read", None)  # a file data module's reader
        images = [read(p) if read is not None and os.path.isfile(str(p)) else None for p in paths]
        self._sink.write([str(p) for p in paths], outputs, images)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
