"""Evaluation reports: the numbers behind a task's logged metrics, per class, as CSV/JSON and pictures.

- classification: ``confusion_matrix.png``/``.csv``, ``per_class.csv`` (precision, recall, F1, support,
  AUROC, rank by F1, training count, rare flag), ``roc_curves.png`` (one-vs-rest), ``auroc.json`` and
  ``summary.json``;
- segmentation: ``per_class_iou.csv`` (IoU, Dice, precision, recall, pixels, rank by IoU, training pixels,
  rare flag), ``confusion_matrix.csv``/``.png``, ``samples.png`` (image | truth | prediction) and
  ``summary.json``.

Rare classes hide in macro averages, so every report puts the worst classes first where people look:
``summary.json`` has ``worst_classes`` (sorted by F1 or IoU, worst first, rare classes flagged) and
``rare_classes``, and the callback prints the worst few when it writes the report. A class is *rare* when
its share of the training data (counts from the task's class weights or the data module, else the
evaluated support) is below ``rare_fraction`` (0.5) of an even share.

The metrics are computed with the same torchmetrics classes and settings the tasks log with
(:func:`vitmha.tasks.classification.classification_metrics`; the segmenter's confusion matrix and
:func:`vitmha.tasks.segmentation.segmentation_scores`), so ``summary.json`` holds exactly the logged
``val/...``/``test/...`` values. :class:`EvaluationReport` is a Lightning callback that writes a report at
the end of ``trainer.test`` (or validate).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import (MulticlassAUROC, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall, MulticlassROC)

from vitmha.visualize import (denormalize, label_names, save_confusion_matrix, save_roc_curves,
                              save_segmentation_samples)

__all__ = ["ClassificationReport", "SegmentationReport", "EvaluationReport"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
        return _jsonable(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    return v


def _write_json(path: Path, data: Dict[str, Any]) -> Path:
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def rare_flags(counts: Optional[Sequence[int]], rare_fraction: float = 0.5) -> List[bool]:
    """Per class: its share of ``counts`` is below ``rare_fraction`` of an even share (1 / classes)."""
    if counts is None:
        return []
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return [bool(total > 0 and v / total < rare_fraction / len(c)) for v in c]


def worst_first(names: Sequence[str], score: Sequence[float], extra: Dict[str, Sequence[Any]],
                rare: Sequence[bool], key: str, limit: int = 10) -> List[Dict[str, Any]]:
    """The ``limit`` classes with the lowest ``score`` (NaN last), as dicts with ``extra`` columns and ``rare``."""
    order = sorted(range(len(names)), key=lambda i: (math.isnan(float(score[i])), float(score[i]), i))
    rows = []
    for i in order[:limit]:
        row = {"class": names[i], "index": i, key: float(score[i])}
        row.update({k: v[i] for k, v in extra.items()})
        row["rare"] = bool(rare[i]) if rare else False
        rows.append(row)
    return rows


def _ranks(score: Sequence[float]) -> List[int]:
    """1 = the worst (lowest) score; NaN scores rank last."""
    order = sorted(range(len(score)), key=lambda i: (math.isnan(float(score[i])), float(score[i]), i))
    ranks = [0] * len(score)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
    return ranks


def _worst_line(rows: List[Dict[str, Any]], key: str, count: str, n: int = 3) -> str:
    parts = [f"{r['class']} ({key} {r[key]:.3f}, {count} {r[count]}{', rare' if r['rare'] else ''})"
             for r in rows[:n]]
    return ", ".join(parts)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([f"{x:.6f}" if isinstance(x, float) else x for x in r])
    return path


class ClassificationReport:
    """Accumulates logits and targets over an epoch; ``compute`` gives the task's metrics plus per-class ones.

    Args:
        num_classes: number of classes.
        class_names: names by class index (default "0", "1", ...).
        prefix: metric name prefix, ``"val/"`` or ``"test/"``, as the task logs them.
        train_counts: training images per class, when known (rare classes are judged by them).
        rare_fraction: a class is rare below this fraction of an even share.
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, prefix: str = "test/",
                 train_counts: Optional[Sequence[int]] = None, rare_fraction: float = 0.5) -> None:
        from vitmha.tasks.classification import classification_metrics

        self.num_classes = int(num_classes)
        self.class_names = label_names(class_names, self.num_classes)
        self.prefix = prefix
        self.train_counts = [int(c) for c in train_counts] if train_counts is not None else None
        self.rare_fraction = rare_fraction
        self.metrics = classification_metrics(self.num_classes, prefix)  # what the task logs, same settings
        k = self.num_classes
        self.per_class = torch.nn.ModuleDict({
            "precision": MulticlassPrecision(k, average=None), "recall": MulticlassRecall(k, average=None),
            "f1": MulticlassF1Score(k, average=None)})
        self.confusion = MulticlassConfusionMatrix(k)
        self.roc = MulticlassROC(k)  # exact curves: keeps every score
        self.auroc = MulticlassAUROC(k, average=None)

    def to(self, device: Any) -> "ClassificationReport":
        for m in (self.metrics, self.per_class, self.confusion, self.roc, self.auroc):
            m.to(device)
        return self

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` (B, C) logits or log-probabilities as the task's eval step returns them, ``target`` (B,)."""
        logits = logits.detach().float()
        target = target.detach().long()
        self.metrics.update(logits, target)
        for m in self.per_class.values():
            m.update(logits, target)
        self.confusion.update(logits, target)
        probs = logits.softmax(-1)
        self.roc.update(probs, target)
        self.auroc.update(probs, target)

    def compute(self) -> Dict[str, Any]:
        """``{"metrics": {logged name: value}, "per_class": {name: (C,) tensor}, "confusion": (C, C),
        "roc": [(fpr, tpr)] per class, "auroc": (C,), "auroc_macro": float}``."""
        metrics = {k: float(v) for k, v in self.metrics.compute().items()}
        per_class = {k: m.compute().float().cpu() for k, m in self.per_class.items()}
        confusion = self.confusion.compute().cpu()
        fpr, tpr, _ = self.roc.compute()
        auroc = self.auroc.compute().float().cpu()
        curves = [(f.cpu().numpy(), t.cpu().numpy()) for f, t in zip(fpr, tpr)]
        support = confusion.sum(1)
        present = support > 0
        macro = float(auroc[present].mean()) if bool(present.any()) else float("nan")
        return {"metrics": metrics, "per_class": per_class, "support": support, "confusion": confusion,
                "roc": curves, "auroc": auroc, "auroc_macro": macro}

    def write(self, output_dir: str, result: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
        """Write the report files into ``output_dir``; returns {name: path}."""
        r = self.compute() if result is None else result
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = self.class_names
        stage = self.prefix.rstrip("/")
        f1 = [float(v) for v in r["per_class"]["f1"]]
        support = [int(v) for v in r["support"]]
        rare = rare_flags(self.train_counts if self.train_counts is not None else support, self.rare_fraction)
        ranks = _ranks(f1)
        train = self.train_counts if self.train_counts is not None else [""] * len(names)
        rows = [[name, i, float(r["per_class"]["precision"][i]), float(r["per_class"]["recall"][i]),
                 f1[i], support[i], float(r["auroc"][i]), ranks[i], train[i], "yes" if rare[i] else "no"]
                for i, name in enumerate(names)]
        extra = {"recall": [float(v) for v in r["per_class"]["recall"]],
                 "precision": [float(v) for v in r["per_class"]["precision"]], "support": support}
        if self.train_counts is not None:
            extra["train_count"] = self.train_counts
        self.worst = worst_first(names, f1, extra, rare, "f1")
        files = {
            "per_class": _write_csv(out / "per_class.csv",
                                    ["class", "index", "precision", "recall", "f1", "support", "auroc",
                                     "rank_by_f1", "train_count", "rare"], rows),
            "confusion_csv": _write_csv(out / "confusion_matrix.csv", ["true \\ predicted"] + names,
                                        [[n] + [int(v) for v in row] for n, row in zip(names, r["confusion"].tolist())]),
            "confusion_png": Path(save_confusion_matrix(r["confusion"].numpy(), names, out / "confusion_matrix.png",
                                                        title=f"{stage} confusion matrix")),
            "roc_png": Path(save_roc_curves(r["roc"], r["auroc"].tolist(), names, out / "roc_curves.png",
                                            title=f"{stage} one-vs-rest ROC")),
            "auroc": _write_json(out / "auroc.json", {"per_class": dict(zip(names, r["auroc"].tolist())),
                                                      "macro": r["auroc_macro"]}),
        }
        files["summary"] = _write_json(out / "summary.json", {
            "stage": stage, "task": "classification", "num_samples": int(r["support"].sum()),
            "metrics": r["metrics"], "auroc_macro": r["auroc_macro"], "classes": names,
            "worst_classes": self.worst, "rare_classes": [n for n, f in zip(names, rare) if f],
            "rare_by": "train counts" if self.train_counts is not None else "evaluated support"})
        return files

    def worst_line(self) -> str:
        """The worst classes of the last ``write``, one line for the console."""
        rows = getattr(self, "worst", [])
        return f"worst classes by F1: {_worst_line(rows, 'f1', 'support')}" if rows else ""


class SegmentationReport:
    """Accumulates a confusion matrix (``ignore_index`` pixels left out) and a few sample images.

    Args:
        num_classes: number of classes.
        class_names: names by class index; ``class_keys`` the names used in the logged ``iou_<key>`` metrics.
        ignore_index: target value that is not scored.
        prefix: ``"val/"`` or ``"test/"``.
        num_samples: images kept for ``samples.png``.
        mean, std: the normalisation to undo when drawing the samples.
        train_counts: training pixels per class, when known (rare classes are judged by them).
        rare_fraction: a class is rare below this fraction of an even share.
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None,
                 class_keys: Optional[Sequence[str]] = None, ignore_index: int = 255, prefix: str = "test/",
                 num_samples: int = 6, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), train_counts: Optional[Sequence[int]] = None,
                 rare_fraction: float = 0.5) -> None:
        self.train_counts = [int(c) for c in train_counts] if train_counts is not None else None
        self.rare_fraction = rare_fraction
        self.num_classes = int(num_classes)
        self.class_names = label_names(class_names, self.num_classes)
        self.class_keys = list(class_keys) if class_keys else [str(i) for i in range(self.num_classes)]
        self.ignore_index = ignore_index
        self.prefix = prefix
        self.num_samples = num_samples
        self.mean, self.std = tuple(mean), tuple(std)
        self.confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=ignore_index)
        self.samples: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def to(self, device: Any) -> "SegmentationReport":
        self.confusion.to(device)
        return self

    def update(self, logits: torch.Tensor, target: torch.Tensor, images: Optional[torch.Tensor] = None) -> None:
        """``logits`` (B, K, H, W), ``target`` (B, H, W); ``images`` (B, 3, H, W) normalised, for the samples."""
        pred = logits.detach().argmax(1)
        self.confusion.update(pred, target.detach().long())
        if images is not None:
            for i in range(min(len(images), self.num_samples - len(self.samples))):
                self.samples.append((denormalize(images[i], self.mean, self.std),
                                     target[i].detach().cpu().numpy().astype(np.int64),
                                     pred[i].cpu().numpy().astype(np.int64)))

    def compute(self) -> Dict[str, Any]:
        """``{"metrics": {logged name: value}, "scores": segmentation_scores(...), "confusion": (K, K)}``."""
        from vitmha.tasks.segmentation import segmentation_scores

        confusion = self.confusion.compute().cpu()
        s = segmentation_scores(confusion)
        p = self.prefix
        metrics = {f"{p}miou": float(s["miou"]), f"{p}pixel_acc": float(s["pixel_acc"]), f"{p}dice": float(s["dice_mean"])}
        metrics.update({f"{p}iou_{k}": float(v) for k, v in zip(self.class_keys, s["iou"].float())})
        return {"metrics": metrics, "scores": s, "confusion": confusion}

    def write(self, output_dir: str, result: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
        """Write the report files into ``output_dir``; returns {name: path}."""
        r = self.compute() if result is None else result
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        conf = r["confusion"].double()
        tp = conf.diag()
        truth, predicted = conf.sum(1), conf.sum(0)
        nan = float("nan")
        iou = [float(v) for v in r["scores"]["iou"]]
        pixels = [int(v) for v in truth]
        rare = rare_flags(self.train_counts if self.train_counts is not None else pixels, self.rare_fraction)
        ranks = _ranks(iou)
        train = self.train_counts if self.train_counts is not None else [""] * len(self.class_names)
        rows = []
        for i, name in enumerate(self.class_names):
            rows.append([name, i, iou[i], float(r["scores"]["dice"][i]),
                         float(tp[i] / predicted[i]) if predicted[i] > 0 else nan,
                         float(tp[i] / truth[i]) if truth[i] > 0 else nan, pixels[i], int(predicted[i]),
                         ranks[i], train[i], "yes" if rare[i] else "no"])
        extra: Dict[str, Sequence[Any]] = {"dice": [float(v) for v in r["scores"]["dice"]], "pixels": pixels}
        if self.train_counts is not None:
            extra["train_pixels"] = self.train_counts
        self.worst = worst_first(self.class_names, iou, extra, rare, "iou")
        stage = self.prefix.rstrip("/")
        files = {
            "per_class": _write_csv(out / "per_class_iou.csv", [
                "class", "index", "iou", "dice", "precision", "recall", "pixels", "predicted_pixels", "rank_by_iou",
                "train_pixels", "rare"], rows),
            "confusion_csv": _write_csv(out / "confusion_matrix.csv", ["true \\ predicted"] + self.class_names,
                                        [[n] + [int(v) for v in row]
                                         for n, row in zip(self.class_names, r["confusion"].tolist())]),
            "confusion_png": Path(save_confusion_matrix(r["confusion"].numpy(), self.class_names,
                                                        out / "confusion_matrix.png", title=f"{stage} pixel confusion")),
        }
        if self.samples:
            files["samples"] = Path(save_segmentation_samples(self.samples, out / "samples.png", self.ignore_index,
                                                              self.class_names))
        files["summary"] = _write_json(out / "summary.json", {
            "stage": stage, "task": "segmentation", "pixels": int(conf.sum()), "metrics": r["metrics"],
            "classes": self.class_names, "worst_classes": self.worst,
            "rare_classes": [n for n, f in zip(self.class_names, rare) if f],
            "rare_by": "train counts" if self.train_counts is not None else "evaluated pixels"})
        return files

    def worst_line(self) -> str:
        """The worst classes of the last ``write``, one line for the console."""
        rows = getattr(self, "worst", [])
        return f"worst classes by IoU: {_worst_line(rows, 'iou', 'pixels')}" if rows else ""


# ------------------------------------------------------------------------------------------------ callback
def train_counts(trainer: Any, pl_module: Any, k: int) -> Optional[List[int]]:
    """Training counts per class, when cheap to know: the task's (saved with ``class_weights: auto``), the
    data module's once computed, or, for classification, the data module's label list; else None."""
    counts = getattr(pl_module, "class_counts", None)
    if isinstance(counts, torch.Tensor) and counts.numel() == k and bool((counts >= 0).all()):
        return [int(c) for c in counts.tolist()]
    dm = getattr(trainer, "datamodule", None)
    cached = getattr(dm, "_train_counts", None)
    if cached is None and pl_module.task == "classification" and callable(getattr(dm, "train_class_counts", None)):
        try:
            cached = dm.train_class_counts()
        except Exception:  # noqa: BLE001 - a report without training counts judges rarity by the support
            cached = None
    return [int(c) for c in cached] if cached is not None and len(cached) == k else None


def report_mean_std(trainer: Any, pl_module: Any) -> Tuple[Sequence[float], Sequence[float]]:
    """The mean/std the evaluated images were normalised with: the data module's, else the backbone's."""
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and getattr(dm, "mean", None) is not None and getattr(dm, "std", None) is not None:
        return dm.mean, dm.std
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    model = getattr(pl_module, "inference_model", pl_module)
    cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", {}) or {}
    return cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)


def _batch_xy(batch: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if isinstance(batch, dict):
        return batch.get("image"), batch.get("target", batch.get("mask", batch.get("label")))
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    return None, None


class EvaluationReport(Callback):
    """Writes the evaluation report of :mod:`vitmha.reports` at the end of a test (or validation) epoch.

    The logits are the ones the task's ``test_step``/``validation_step`` returned (the task's own evaluation,
    TTA and sliding windows included; never recomputed), so the report's numbers are the logged ones. Add it to a Trainer, or to the CLI:
    ``trainer: {callbacks: [{class_path: vitmha.reports.EvaluationReport}]}``.

    Args:
        output_dir: folder for the files; default ``<trainer.log_dir>/report_<stage>``. With more than one
            stage, each stage gets a sub-folder of ``output_dir``.
        stages: which loops to report on: ``"test"`` and/or ``"validate"``. Validation during ``fit`` is
            reported too when ``"validate"`` is given (the sanity check never).
        num_samples: segmentation images drawn in ``samples.png``.
        class_names: names by class index; default the data module's ``classes`` or the task's ``class_names``.
    """

    def __init__(self, output_dir: Optional[str] = None, stages: Sequence[str] = ("test",), num_samples: int = 6,
                 class_names: Optional[List[str]] = None) -> None:
        super().__init__()
        stages = [stages] if isinstance(stages, str) else list(stages)
        bad = [s for s in stages if s not in ("test", "validate")]
        if bad:
            raise ValueError(f"stages {bad}: expected 'test' and/or 'validate'")
        self.output_dir = output_dir
        self.stages = stages
        self.num_samples = num_samples
        self.class_names = class_names
        self.report: Any = None
        self.files: Dict[str, Path] = {}
        self.result: Optional[Dict[str, Any]] = None

    # ---------------------------------------------------------------- setup per epoch
    def _names(self, trainer: Any, pl_module: Any) -> Optional[List[str]]:
        if self.class_names:
            return list(self.class_names)
        for owner in (getattr(trainer, "datamodule", None), pl_module):
            for attr in ("classes", "class_names"):
                names = getattr(owner, attr, None)
                if names:
                    return [str(n) for n in names]
        names = pl_module.hparams.get("class_names") if hasattr(pl_module, "hparams") else None
        return [str(n) for n in names] if names else None

    def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.report = None
        if stage not in self.stages or trainer.sanity_checking:
            return
        prefix = "test/" if stage == "test" else "val/"
        make = getattr(pl_module, "evaluation_report", None)  # the task says what its report is
        self.report = make(self._names(trainer, pl_module), prefix, trainer, num_samples=self.num_samples) \
            if callable(make) else None
        if self.report is not None:
            self.report.to(pl_module.device)

    # ---------------------------------------------------------------- per batch
    def _batch(self, outputs: Any, batch: Any) -> None:
        """Update the report with the logits the task's eval step returned (``{"loss", "logits"}``)."""
        if self.report is None:
            return
        x, y = _batch_xy(batch)
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if y is None or logits is None:
            raise ValueError("EvaluationReport needs eval steps that return {'loss', 'logits'} and batches with "
                             "targets, as vitmha's tasks and data modules give")
        if isinstance(self.report, SegmentationReport):
            self.report.update(logits, y, x)
        else:
            self.report.update(logits, y)

    # ---------------------------------------------------------------- finish
    def _directory(self, trainer: Any, stage: str) -> str:
        if self.output_dir:
            return self.output_dir if len(self.stages) == 1 else os.path.join(self.output_dir, stage)
        base = trainer.log_dir or trainer.default_root_dir
        return os.path.join(base, f"report_{stage}")

    def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.report is None:
            return
        self.result = self.report.compute()  # every rank: the metrics sync across processes
        directory = self._directory(trainer, stage)  # every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            self.files = self.report.write(directory, self.result)
            line = self.report.worst_line() if hasattr(self.report, "worst_line") else ""
            if line:
                print(f"{stage}: {line}", flush=True)
        self.report = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._batch(outputs, batch)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._batch(outputs, batch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer, pl_module, "test")

