"""Image classification with a vitmha backbone."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from vitmha.tasks.base import SupervisedTask, TaskConfigError, batch_images
from vitmha.tasks.losses import LOSSES, focal_loss
from vitmha.tasks.mixup import Mixup


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """``{prefix}acc``, ``acc_top5`` (num_classes >= 5), and macro ``f1``/``precision``/``recall``.

    Compute groups are off: torchmetrics merges metrics whose states are equal after the first update, and
    when the first batch is classified perfectly the top-5 counts equal the top-1 ones, so F1, precision
    and recall would go on counting top-5 hits (macro F1 0.99 at accuracy 0.73 was seen)."""
    metrics: Dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class ImageClassifier(SupervisedTask):
    """A vision transformer classifier: ``forward(x)`` (B,C,H,W) -> logits (B, num_classes).

    Logs ``train/loss``, ``train/lr``, ``val/loss``, ``val/acc``, ``val/acc_top5`` (>= 5 classes),
    ``val/f1``, ``val/precision``, ``val/recall`` (macro) and the same under ``test/``; after a test
    epoch ``self.test_confusion`` holds the (C, C) confusion matrix (rows = true class).
    With ``ema_decay`` set, validation, test, predict and ``forward`` in eval mode use the EMA weights.
    Every option of :class:`~vitmha.tasks.base.SupervisedTask` and :class:`~vitmha.tasks.base.BackboneTask`
    applies too.

    Args:
        label_smoothing: label smoothing of the training loss.
        mixup_alpha: mixup Beta parameter; 0 = off (0.8 is usual for ImageNet-scale training).
        cutmix_alpha: cutmix Beta parameter; 0 = off (1.0 is usual).
        mix_prob: probability that a batch is mixed when mixup or cutmix is on.
        tta_hflip: validate, test and predict on each image and its mirror image, averaging the two
            softmax outputs (for classes that a mirror image keeps, such as clothes or photographs).
        loss: ``ce`` (cross-entropy) or ``focal`` (focal loss, Lin et al. 2017: each class term scaled by
            ``(1 - p) ** focal_gamma``; with gamma 0 it is the cross-entropy). Both take the class weights,
            label smoothing and mixup's soft targets.
        focal_gamma: focusing parameter of the focal loss (2 in the paper).
        distill: knowledge distillation (DeiT): ``{teacher: CKPT or timm name, teacher_pretrained: true|PATH,
            kind: soft|hard, alpha: 0.5, tau: 1.0, token: false}``; the loss becomes (1 - alpha) * this loss +
            alpha * the distillation loss (soft: KL * tau², hard: cross-entropy to the teacher's argmax). The
            teacher runs frozen on each training batch and is not saved (see :mod:`vitmha.tasks.distill`).
    """

    task = "classification"
    monitor = "val/acc"

    def __init__(self, *, label_smoothing: float = 0.1, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, tta_hflip: bool = False, loss: str = "ce", focal_gamma: float = 2.0,
                 distill: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise TaskConfigError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        if focal_gamma < 0:
            raise TaskConfigError(f"focal_gamma: must be >= 0, got {focal_gamma}")
        num_classes = int(self.hparams.num_classes)
        self.model = self.finish_backbone(self.build_backbone(num_classes=num_classes))
        self.finish_init()
        from vitmha.tasks.distill import Distiller

        self.distiller = Distiller.create(self, distill)  # None without ``distill``
        self.mixup = Mixup(num_classes, mixup_alpha, cutmix_alpha, prob=mix_prob)
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion_metric = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: Optional[torch.Tensor] = None

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        if self.mixup.enabled:
            x, y = self.mixup(x, y)  # y: (B, C) soft targets
        out = self.model(x)
        if self.distiller is not None:
            loss = self.check_loss(self.distiller.loss(self, x, out, y, self.train_loss))
        else:
            loss = self.check_loss(self.train_loss(out, y))
        if loss is None:
            return None
        self.log_train(loss, x.shape[0])
        return loss

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.distiller is not None:
            self.distiller.prepare(self)  # loads the teacher

    def train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss of (B, C) logits against class indices (B,) or mixup's soft targets (B, C): the
        cross-entropy or focal loss, with ``class_weights`` and ``label_smoothing``. (``val/loss`` stays the
        plain negative log-likelihood, comparable between runs with other loss settings.)"""
        hp = self.hparams
        weight = self.train_loss_weight()
        if hp.loss == "focal":
            return focal_loss(logits, y, gamma=float(hp.focal_gamma), weight=weight,
                              label_smoothing=hp.label_smoothing)
        return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=hp.label_smoothing)

    def eval_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the inference model; with ``tta_hflip`` the log of the mean softmax over the image
        and its mirror image."""
        logp = self.inference_model(x).float().log_softmax(dim=-1)
        if self.hparams.tta_hflip:
            flipped = self.inference_model(x.flip(-1)).float().log_softmax(dim=-1)
            logp = torch.logaddexp(logp, flipped) - math.log(2.0)
        return logp

    eval_outputs = eval_log_probs  # what evaluation scores (the robustness sweep too)

    def attack_loss(self, x: torch.Tensor, y: torch.Tensor):
        """(summed cross-entropy of the evaluation log-probabilities, which samples are misclassified)."""
        logp = self.eval_log_probs(x)
        return F.nll_loss(logp, y, reduction="sum"), logp.argmax(-1) != y

    def _eval_step(self, batch: Any, stage: str) -> Dict[str, torch.Tensor]:
        """``{"loss", "logits"}``: the (B, C) log-probabilities the metrics were updated with, for callbacks
        (the evaluation report) to read rather than recompute."""
        x, y = batch
        logits = self.eval_log_probs(x)  # normalised logits: same argmax, top-k and softmax
        loss = F.nll_loss(logits, y)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=x.shape[0])
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=(stage == "val"))
        if stage == "test":
            self.test_confusion_metric.update(logits, y)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.test_confusion_metric.reset()

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.test_confusion_metric.compute().cpu()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """``{"path": list[str] | None, "probs": (B, C), "pred": (B,), "outputs": per-image dicts}``; accepts a
        predict dict with an ``image`` key, an ``(image, target)`` tuple, or a bare image tensor."""
        probs = self.eval_log_probs(batch_images(batch)).exp()
        paths = batch.get("path") if isinstance(batch, dict) else None
        return {"path": paths, "probs": probs, "pred": probs.argmax(dim=-1),
                "outputs": [{"probs": p} for p in probs.cpu()]}

    # ----------------------------------------------------------------- what the commands ask a task
    def predict_probs(self, images: Sequence[Any], pre: Any) -> List[torch.Tensor]:
        """(C,) probabilities per image (the task's own evaluation: EMA weights, mirror-image TTA), each image
        preprocessed as the run's validation data (``pre``: :class:`vitmha.inference.Preprocess`)."""
        from vitmha.inference import eval_transform

        transform = eval_transform(pre, "classification")
        x = torch.stack([transform(image=im)["image"] for im in images]).to(self.device)
        with torch.no_grad():
            return list(self.eval_log_probs(x).exp().cpu())

    def describe(self, probs: torch.Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{"label", "index", "probs", "top5": [(label, prob), ...]}`` of one image's (C,) probabilities."""
        return describe_probs(probs, names)

    def prediction_sink(self, output_dir: str, names: Optional[Sequence[str]] = None, top_k: int = 5,
                        suffix: str = "", alpha: float = 0.5) -> Any:
        from vitmha.predictions import PredictionsCsv

        return PredictionsCsv(f"{output_dir}/predictions{suffix}.csv", top_k, names)

    def evaluation_report(self, class_names: Optional[Sequence[str]], prefix: str, trainer: Any = None,
                          **options: Any) -> Any:
        from vitmha.reports import ClassificationReport, train_counts

        k = int(self.hparams.num_classes)
        return ClassificationReport(k, class_names, prefix, train_counts(trainer, self, k))


def describe_probs(probs: torch.Tensor, names: Optional[Sequence[str]] = None, k: int = 5) -> Dict[str, Any]:
    """One classified image: ``{"label", "index", "probs" (C,) numpy, "top5": [(label, prob), ...]}``."""
    p = torch.as_tensor(probs).float()
    name = (lambda i: str(names[i]) if names and i < len(names) else str(i))
    top_p, top_i = p.topk(min(k, p.numel()))
    return {"label": name(int(top_i[0])), "index": int(top_i[0]), "probs": p.numpy(),
            "top5": [(name(int(i)), float(v)) for v, i in zip(top_p, top_i)]}
