"""Multi-label image classification with a vitmha backbone: any number of labels per image.

One sigmoid per class, trained with binary cross-entropy or the asymmetric loss (ASL, Ridnik et al., *Asymmetric
Loss For Multi-Label Classification*, ICCV 2021). A label is predicted when its probability is above its class's
threshold (0.5, or tuned on the validation set to maximise each class's F1 and kept in the checkpoint).
Also here: the scores (:func:`multilabel_scores`) and the evaluation report ``vitmha test`` and ``vitmha evaluate``
write.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import (multilabel_average_precision, multilabel_f1_score,
                                                    multilabel_precision, multilabel_recall)
from torchmetrics.utilities import dim_zero_cat

from vitmha.tasks.base import SupervisedTask, TaskConfigError, batch_images
from vitmha.tasks.segmentation import _metric_key

LOSSES = ("bce", "asl")


class ClassMismatchError(ValueError):
    """The class names of a checkpoint or of the task disagree with the data's."""


# ----------------------------------------------------------------------------------------------- losses
def asymmetric_loss(logits: torch.Tensor, target: torch.Tensor, gamma_pos: float = 0.0, gamma_neg: float = 4.0,
                    clip: float = 0.05, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ASL (Ridnik et al., 2021) with timm's ``AsymmetricLossMultiLabel``, averaged over all (B, C) elements like
    ``F.binary_cross_entropy_with_logits`` (the paper sums; the mean keeps the scale of BCE); ``weight`` (C,)
    scales each class's terms. Gammas 0 and clip 0 give BCE. ``target`` may be soft (label smoothing)."""
    from timm.loss import AsymmetricLossMultiLabel

    fn = AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="mean",
                                  weight=None if weight is None else weight.float().view(1, -1))
    return fn.to(logits.device)(logits, target)


# ----------------------------------------------------------------------------------------------- scores
def multilabel_scores(probs: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Scores of (N, C) probabilities against (N, C) 0/1 targets, a label predicted where probs > thresholds (C,):
    ``map`` (macro average precision, threshold-free; classes without a positive are left out of the mean),
    ``map_micro``, ``f1``/``precision``/``recall`` (macro) and ``f1_micro`` at the thresholds, ``ap`` (C,)
    per class (NaN for a class without a positive), all with torchmetrics."""
    probs, target = probs.float(), target.long()
    c = probs.shape[1]
    pred = (probs > thresholds.to(probs)).long()
    with_pos = target.sum(0) > 0
    ap = probs.new_full((c,), float("nan"))
    if bool(with_pos.any()):  # AP is undefined without a positive: those classes are not scored at all
        ap[with_pos] = multilabel_average_precision(probs[:, with_pos], target[:, with_pos], int(with_pos.sum()),
                                                    average=None, thresholds=None).float()
    return {
        "map": ap[with_pos].mean() if bool(with_pos.any()) else ap.new_tensor(float("nan")),
        "map_micro": multilabel_average_precision(probs, target, c, average="micro", thresholds=None),
        "f1": multilabel_f1_score(pred, target, c, average="macro"),
        "f1_micro": multilabel_f1_score(pred, target, c, average="micro"),
        "precision": multilabel_precision(pred, target, c, average="macro"),
        "recall": multilabel_recall(pred, target, c, average="macro"),
        "ap": ap,
    }


def tune_thresholds(probs: torch.Tensor, target: torch.Tensor,
                    default: Union[float, torch.Tensor] = 0.5) -> torch.Tensor:
    """Per-class thresholds (C,) that maximise each class's F1 on (N, C) probabilities and 0/1 targets: the
    midpoint between the last score kept positive and the next lower one (the highest such cut among ties
    of F1). A class without a positive keeps ``default``."""
    probs, target = probs.double().cpu(), target.bool().cpu()
    n, c = probs.shape
    out = torch.as_tensor(default, dtype=torch.double).expand(c).clone()
    for k in range(c):
        positives = int(target[:, k].sum())
        if positives == 0 or n == 0:
            continue
        order = probs[:, k].argsort(descending=True)
        p, t = probs[order, k], target[order, k]
        f1 = 2 * t.cumsum(0).double() / (torch.arange(1, n + 1, dtype=torch.double) + positives)
        f1[torch.cat([p[:-1] <= p[1:], torch.tensor([False])])] = -1.0  # only cut between distinct scores
        best = int(f1.argmax())
        lower = float(p[best + 1]) if best + 1 < n else 0.0
        out[k] = (float(p[best]) + lower) / 2
    return out.float()


class _ProbsAndTargets(Metric):
    """Keeps every (probs, target) row of an epoch (gathered across processes under DDP)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.target.append(target.detach().long())

    def compute(self):
        return dim_zero_cat(self.probs), dim_zero_cat(self.target)


def _names(names: Optional[Sequence[str]], k: int) -> List[str]:
    return [str(n) for n in names] if names and len(names) == k else [str(i) for i in range(k)]


# ----------------------------------------------------------------------------------------------- task
class MultiLabelClassifier(SupervisedTask):
    """A vision transformer that predicts any number of labels per image: ``forward(x)`` (B,C,H,W) -> logits
    (B, num_classes), one sigmoid per class. Targets are (B, C) 0/1.

    Logs ``train/loss``, ``val/loss``, ``val/map`` (macro average precision, the checkpoint monitor),
    ``val/map_micro``, ``val/f1`` (macro), ``val/f1_micro``, ``val/precision``, ``val/recall`` (macro, at the
    thresholds) and the same under ``test/``, plus ``test/ap_<class>`` per class. A label is predicted when its
    probability is above its threshold. With ``tune_thresholds`` each validation during ``fit`` picks every
    class's threshold to maximise its F1 on the validation set; ``val/f1`` is then measured at thresholds tuned
    on the same images (optimistic), ``test/f1`` on held-out ones. The thresholds are a buffer of the task,
    saved in its checkpoints. ``class_weights`` scale each class's loss terms (``auto``: inverse frequency of
    the positives). Every option of :class:`~vitmha.tasks.base.SupervisedTask` and
    :class:`~vitmha.tasks.base.BackboneTask` applies too.

    Args:
        class_names: label names, for ``test/ap_<name>``, reports and predictions; default the data module's
            ``classes`` (filled in at setup and saved in the checkpoint).
        loss: ``bce`` (binary cross-entropy with logits) or ``asl`` (asymmetric loss, timm's).
        asl_gamma_pos: ASL focusing parameter of positives (the paper's gamma+ = 0).
        asl_gamma_neg: ASL focusing parameter of negatives (the paper's gamma- = 4).
        asl_clip: ASL probability margin m of negatives (the paper's 0.05).
        label_smoothing: targets become y (1 - eps) + eps / 2 in training; 0 = off.
        threshold: the initial decision threshold, one for all classes or a list with one per class.
        tune_thresholds: after each validation in ``fit``, set each class's threshold to maximise its F1 on
            the validation set (a class without a positive there keeps its threshold).
        tta_hflip: validate, test and predict on each image and its mirror image, averaging the probabilities.
        distill: knowledge distillation from a multi-label teacher: ``{teacher: CKPT or timm name, kind: soft|hard,
            alpha: 0.5, tau: 1.0, ...}``; the loss becomes (1 - alpha) * this loss + alpha * the distillation loss
            (soft: per-class Bernoulli KL * tau², hard: BCE to the teacher's labels); see :mod:`vitmha.tasks.distill`.
    """

    task = "multilabel"
    monitor = "val/map"

    def __init__(self, *, class_names: Optional[List[str]] = None, loss: str = "bce", asl_gamma_pos: float = 0.0,
                 asl_gamma_neg: float = 4.0, asl_clip: float = 0.05, label_smoothing: float = 0.0,
                 threshold: Union[float, List[float]] = 0.5, tune_thresholds: bool = False, tta_hflip: bool = False,
                 distill: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        num_classes = int(self.hparams.num_classes)
        if loss not in LOSSES:
            raise TaskConfigError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        if min(asl_gamma_pos, asl_gamma_neg) < 0 or not 0 <= asl_clip < 1:
            raise TaskConfigError(f"asl: needs gammas >= 0 and 0 <= clip < 1, got gamma_pos={asl_gamma_pos}, "
                                  f"gamma_neg={asl_gamma_neg}, clip={asl_clip}")
        if not 0 <= label_smoothing < 1:
            raise TaskConfigError(f"label_smoothing: must be in [0, 1), got {label_smoothing}")
        if class_names is not None and len(class_names) != num_classes:
            raise TaskConfigError(f"class_names: {len(class_names)} names for num_classes={num_classes}")
        thr = torch.as_tensor(threshold, dtype=torch.float32).flatten()
        if thr.numel() == 1:
            thr = thr.expand(num_classes).clone()
        if thr.numel() != num_classes or not bool(((thr >= 0) & (thr <= 1)).all()):
            raise TaskConfigError(f"threshold: expected one value or {num_classes} values in [0, 1], got {threshold}")
        self.register_buffer("thresholds", thr)  # (C,): in the state dict, so in every checkpoint
        self.model = self.finish_backbone(self.build_backbone(num_classes=num_classes))
        self.finish_init()
        from vitmha.tasks.distill import Distiller

        self.distiller = Distiller.create(self, distill)  # None without ``distill``
        self.val_scores = _ProbsAndTargets()
        self.test_scores = _ProbsAndTargets()

    @property
    def class_names(self) -> List[str]:
        """The label names (``class_names``, else "0", "1", ...)."""
        return _names(self.hparams.get("class_names"), int(self.hparams.num_classes))

    # ------------------------------------------------------------------------------ class names
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.distiller is not None:
            self.distiller.prepare(self)  # loads the teacher
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "classes", None)
        if not names:
            return
        names = [str(n) for n in names]
        if self.hparams.get("class_names") is None:
            if len(names) == int(self.hparams.num_classes):
                self.hparams["class_names"] = names  # saved with the hyper-parameters in every checkpoint
        elif list(self.hparams.class_names) != names:
            raise ClassMismatchError(f"the task's class_names {list(self.hparams.class_names)} differ from the "
                                     f"data's classes {names}")

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        mine = self.hparams.get("class_names")
        if saved and mine and list(saved) != list(mine):
            raise ClassMismatchError(f"the checkpoint's classes {list(saved)} differ from the data's {list(mine)}: "
                                     "its outputs would be read as the wrong labels")

    # ------------------------------------------------------------------------------ loss and steps
    def loss(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of (B, C) logits against (B, C) 0/1 targets (``loss``, label smoothing applied), each class's
        terms scaled by ``weight`` (C,) when given."""
        hp = self.hparams
        y = target.float()
        if hp.label_smoothing > 0:
            y = y * (1 - hp.label_smoothing) + hp.label_smoothing / 2
        if hp.loss == "asl":
            return asymmetric_loss(logits, y, hp.asl_gamma_pos, hp.asl_gamma_neg, hp.asl_clip, weight)
        w = None if weight is None else weight.to(logits.device).float().view(1, -1)
        return F.binary_cross_entropy_with_logits(logits.float(), y, weight=w)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        out, weight = self.model(x), self.train_loss_weight()
        if self.distiller is not None:
            loss = self.check_loss(self.distiller.loss(self, x, out, y, lambda o, t: self.loss(o, t, weight)))
        else:
            loss = self.check_loss(self.loss(out, y, weight))
        if loss is None:
            return None
        self.log_train(loss, x.shape[0])
        return loss

    def eval_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities of the inference model; with ``tta_hflip`` the mean over the image and its mirror."""
        probs = self.inference_model(x).float().sigmoid()
        if self.hparams.tta_hflip:
            probs = (probs + self.inference_model(x.flip(-1)).float().sigmoid()) / 2
        return probs

    def _eval_step(self, batch: Any, stage: str) -> Dict[str, torch.Tensor]:
        """``{"loss", "logits"}``: the (B, C) logits of the probabilities the scores use, for the evaluation
        report to read rather than recompute."""
        x, y = batch
        if self.hparams.tta_hflip:
            probs = self.eval_probs(x)
            logits = torch.logit(probs, eps=1e-7)
        else:
            logits = self.inference_model(x).float()
            probs = logits.sigmoid()
        loss = self.loss(logits, y)
        (self.val_scores if stage == "val" else self.test_scores).update(probs, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=x.shape[0])
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def _log_scores(self, store: _ProbsAndTargets, stage: str) -> None:
        if store.update_count == 0:  # nothing evaluated (e.g. limit_val_batches=0)
            return
        probs, target = store.compute()
        store.reset()
        trainer = self._trainer
        if (stage == "val" and self.hparams.tune_thresholds and trainer is not None and not trainer.sanity_checking
                and trainer.state.fn == "fit"):
            self.thresholds.copy_(tune_thresholds(probs, target, self.thresholds.cpu()).to(self.thresholds))
        scores = multilabel_scores(probs, target, self.thresholds)
        for name in ("map", "map_micro", "f1", "f1_micro", "precision", "recall"):
            self.log(f"{stage}/{name}", scores[name].float(), prog_bar=(stage == "val" and name == "map"))
        if stage == "test":
            for name, v in zip(self.class_names, scores["ap"].float()):
                self.log(f"test/ap_{_metric_key(name)}", v)

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_scores, "val")

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_scores, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """``{"path": list[str] | None, "probs": (B, C), "pred": (B, C) bool (probs > thresholds), "outputs"}``;
        accepts a predict dict with an ``image`` key, an ``(image, target)`` tuple, or a bare image tensor."""
        probs = self.eval_probs(batch_images(batch))
        paths = batch.get("path") if isinstance(batch, dict) else None
        return {"path": paths, "probs": probs, "pred": probs > self.thresholds.to(probs),
                "outputs": [{"probs": p} for p in probs.cpu()]}

    # ----------------------------------------------------------------- what the commands ask a task
    def predict_probs(self, images: Sequence[Any], pre: Any) -> List[torch.Tensor]:
        """(C,) label probabilities per image, preprocessed as the run's validation data."""
        from vitmha.inference import eval_transform

        transform = eval_transform(pre, "classification")
        x = torch.stack([transform(image=im)["image"] for im in images]).to(self.device)
        with torch.no_grad():
            return list(self.eval_probs(x).cpu())

    def describe(self, probs: torch.Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{"labels": the names above their thresholds (most probable first), "indices", "probs" (C,)}``."""
        p = torch.as_tensor(probs).float()
        names = list(names) if names else self.class_names
        above = [int(i) for i in torch.argsort(p, descending=True) if p[i] > self.thresholds[i].cpu()]
        return {"labels": [str(names[i]) for i in above], "indices": above, "probs": p.numpy()}

    def prediction_sink(self, output_dir: str, names: Optional[Sequence[str]] = None, top_k: int = 5,
                        suffix: str = "", alpha: float = 0.5) -> Any:
        from vitmha.predictions import MultiLabelPredictionsCsv

        return MultiLabelPredictionsCsv(f"{output_dir}/predictions{suffix}.csv", list(names or self.class_names),
                                        self.thresholds)

    def evaluation_report(self, class_names: Optional[Sequence[str]], prefix: str, trainer: Any = None,
                          **options: Any) -> "MultiLabelReport":
        """The report :class:`vitmha.reports.EvaluationReport` fills from this task's eval steps."""
        return MultiLabelReport(int(self.hparams.num_classes), class_names or self.class_names,
                                self.thresholds.detach().cpu(), prefix)


# ----------------------------------------------------------------------------------------------- report
class MultiLabelReport:
    """Accumulates an epoch's logits and targets; ``compute`` gives the task's logged scores and per-class
    numbers, ``write`` ``per_class.csv`` (AP, threshold, precision, recall, F1, support, predicted) and
    ``summary.json``.

    Args:
        num_classes: number of labels.
        class_names: names by class index (default "0", "1", ...).
        thresholds: (C,) decision thresholds, the task's.
        prefix: ``"val/"`` or ``"test/"``, as the task logs.
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]], thresholds: torch.Tensor,
                 prefix: str = "test/") -> None:
        self.num_classes = int(num_classes)
        self.class_names = _names(class_names, self.num_classes)
        self.thresholds = thresholds.float()
        self.prefix = prefix
        self.store = _ProbsAndTargets()

    def to(self, device: Any) -> "MultiLabelReport":
        self.store.to(device)
        return self

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` (B, C) as the task's eval step returns them, ``target`` (B, C) 0/1."""
        self.store.update(logits.detach().float().sigmoid(), target)

    def compute(self) -> Dict[str, Any]:
        """``{"metrics": {logged name: value}, "ap", "precision", "recall", "f1": (C,), "support",
        "predicted": (C,), "thresholds": (C,), "num_samples": int}``."""
        probs, target = self.store.compute()
        probs, target = probs.cpu(), target.cpu()
        s = multilabel_scores(probs, target, self.thresholds)
        p = self.prefix
        metrics = {f"{p}{k}": float(s[k]) for k in ("map", "map_micro", "f1", "f1_micro", "precision", "recall")}
        if p == "test/":
            metrics.update({f"{p}ap_{_metric_key(n)}": float(v) for n, v in zip(self.class_names, s["ap"])})
        pred = (probs > self.thresholds).long()
        c = self.num_classes
        per = {k: fn(pred, target, c, average=None).float() for k, fn in
               (("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score))}
        return {"metrics": metrics, "ap": s["ap"], **per, "support": target.sum(0), "predicted": pred.sum(0),
                "thresholds": self.thresholds, "num_samples": int(target.shape[0])}

    def write(self, output_dir: str, result: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
        """Write the report files into ``output_dir``; returns {name: path}."""
        import json

        r = self.compute() if result is None else result
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "per_class.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "index", "ap", "threshold", "precision", "recall", "f1", "support", "predicted"])
            for i, name in enumerate(self.class_names):
                scores = (f"{float(r[k][i]):.6f}" for k in ("ap", "thresholds", "precision", "recall", "f1"))
                w.writerow([name, i, *scores, int(r["support"][i]), int(r["predicted"][i])])

        def finite(v: float) -> Optional[float]:
            return v if math.isfinite(v) else None  # JSON has no NaN

        summary = out / "summary.json"
        summary.write_text(json.dumps({
            "stage": self.prefix.rstrip("/"), "task": "multilabel", "num_samples": r["num_samples"],
            "metrics": {k: finite(v) for k, v in r["metrics"].items()}, "classes": self.class_names,
            "thresholds": [float(t) for t in r["thresholds"]]}, indent=2) + "\n")
        return {"per_class": path, "summary": summary}
