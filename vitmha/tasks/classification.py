"""Image classification with a vitmha backbone."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from vitmha.peft import apply_peft
from vitmha.tasks.base import BackboneTask, build_backbone
from vitmha.tasks.ema import ModelEma
from vitmha.tasks.losses import focal_loss
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


class ImageClassifier(BackboneTask):
    """A vision transformer classifier: ``forward(x)`` (B,3,H,W) -> logits (B, num_classes).

    Logs ``train/loss``, ``train/lr``, ``val/loss``, ``val/acc``, ``val/acc_top5`` (>= 5 classes),
    ``val/f1``, ``val/precision``, ``val/recall`` (macro) and the same under ``test/``; after a test
    epoch ``self.test_confusion`` holds the (C, C) confusion matrix (rows = true class).
    With ``ema_decay`` set, validation, test, predict and ``forward`` in eval mode use the EMA weights.

    Args:
        backbone: timm ViT architecture name, e.g. ``vit_small_patch16_224``.
        num_classes: number of classes (the CLI links it from the data module).
        pretrained: False, True (timm's pretrained config, offline cache) or a weights file path.
        backbone_kwargs: overrides for ``vitmha.create_backbone`` (img_size, patch_size, depth, ...). From
            scratch ``weight_init`` defaults to ``jax`` (big_vision's init).
        lr: peak learning rate of the optimiser; None = 1e-4 when fine-tuning pretrained weights, else 1e-3.
        weight_decay: weight decay (not applied to norms, biases, tokens, position embeddings; decided from
            the parameters' original names and shapes, also under FSDP).
        layer_decay: layer-wise lr decay; block i gets lr * layer_decay ** (depth - i). 1.0 = off;
            0.65-0.75 is usual for fine-tuning.
        warmup_epochs: linear warmup length in epochs (may be fractional).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs``.
        min_lr: lr at the end of the schedule.
        scheduler: ``cosine``, ``poly`` (power 0.9) or ``constant`` after warmup, stepped every step.
        label_smoothing: label smoothing of the training cross-entropy.
        mixup_alpha: mixup Beta parameter; 0 = off (0.8 is usual for ImageNet-scale training).
        cutmix_alpha: cutmix Beta parameter; 0 = off (1.0 is usual).
        mix_prob: probability that a batch is mixed when mixup or cutmix is on.
        drop_path_rate: stochastic depth rate; None keeps the architecture's default.
        freeze_backbone: train the classifier head only (linear probe).
        freeze_blocks: keep the patch embedding, position embedding, prefix tokens and the first N blocks
            of the backbone frozen (no gradient is computed through them, so a step is cheaper); 0 = off.
        unfreeze_at_epoch: with ``freeze_backbone``, train everything from this epoch on. Under DDP the
            unfrozen parameters are not synchronised: use it on one device.
        ema_decay: keep an EMA of the weights with this decay (e.g. 0.9998) and evaluate with it.
        tta_hflip: validate, test and predict on each image and its mirror image, averaging the two
            softmax outputs (for classes that a mirror image keeps, such as clothes or photographs).
        grad_checkpointing: recompute block activations in backward to save memory.
        patch_drop_schedule: with ``backbone_kwargs: {patch_drop_rate: p}`` (PatchDropout), ``constant`` keeps
            dropping ``p`` of the patch tokens every step; ``linear`` lowers the rate from ``p`` at the first
            step to 0 at the last, so the last steps train on every token, as evaluation sees them.
        grad_clip_norm: clip the global gradient norm to this value unless the Trainer sets
            ``gradient_clip_val``; None = no clipping (default 1.0, as big_vision).
        nonfinite: on a NaN/inf training loss, ``error`` raises naming the epoch and step; ``skip``
            skips the batch and logs ``train/skipped_batches`` (single device only: under DDP the ranks
            would disagree).
        peft: parameter-efficient fine-tuning, e.g. ``{method: lora, r: 8, alpha: 16, targets: [q, v]}``:
            methods ``lora``/``dora`` (keys r, alpha, targets of q k v proj fc1 fc2, dropout, rslora,
            norms), ``bitfit`` (norms), ``vpt`` (tokens, dropout, norms), ``adapter`` (hidden, scale,
            dropout, norms), ``linear_probe`` (= freeze_backbone) and ``full``; the backbone is frozen but
            the method's parameters and the head (and the norms with ``norms: true``); see vitmha.peft.
            None = full fine-tuning.
        class_weights: per-class weights of the training loss, for rare classes: None (all 1), ``auto``
            (inverse frequency of the train split's labels, scaled to average 1 over the classes present),
            ``effective`` (Cui et al.'s effective number of samples, beta 0.999: a milder up-weighting) or a
            list of ``num_classes`` weights. ``auto``/``effective`` are computed once when fit starts, from
            the data module's ``train_class_counts()``, logged, and saved in the checkpoint.
        loss: ``ce`` (cross-entropy) or ``focal`` (focal loss, Lin et al. 2017: each class term scaled by
            ``(1 - p) ** focal_gamma``; with gamma 0 it is the cross-entropy). Both take the class weights,
            label smoothing and mixup's soft targets.
        focal_gamma: focusing parameter of the focal loss (2 in the paper).
        optimizer: ``adamw``, ``sgd`` (with ``momentum``, optionally Nesterov; weight decay as L2 on the
            gradient) or ``lamb`` (layer-wise trust ratio, for large batches).
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
    """

    task = "classification"
    monitor = "val/acc"

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        pretrained: Union[bool, str] = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        lr: Optional[float] = None,
        weight_decay: float = 0.05,
        layer_decay: float = 1.0,
        warmup_epochs: float = 5.0,
        warmup_steps: Optional[int] = None,
        min_lr: float = 1e-6,
        scheduler: str = "cosine",
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        drop_path_rate: Optional[float] = None,
        freeze_backbone: bool = False,
        freeze_blocks: int = 0,
        unfreeze_at_epoch: Optional[int] = None,
        ema_decay: Optional[float] = None,
        tta_hflip: bool = False,
        grad_checkpointing: bool = False,
        patch_drop_schedule: str = "constant",
        grad_clip_norm: Optional[float] = 1.0,
        nonfinite: str = "error",
        peft: Optional[Dict[str, Any]] = None,
        class_weights: Optional[Union[str, List[float]]] = None,
        loss: str = "ce",
        focal_gamma: float = 2.0,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        nesterov: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_common_args()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self._init_class_weights(num_classes)
        self.model = build_backbone(backbone, pretrained, backbone_kwargs, drop_path_rate, num_classes=num_classes)
        apply_peft(self.model, self.peft_spec)
        self.leading_parameters(freeze_blocks)  # fails now, not at fit time, when the backbone is shallower
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self._check_patch_drop_schedule()
        self.ema = ModelEma(self.model, ema_decay) if ema_decay is not None else None
        self.mixup = Mixup(num_classes, mixup_alpha, cutmix_alpha, prob=mix_prob)
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion_metric = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: Optional[torch.Tensor] = None

    def frozen_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if not n.startswith("head.")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> logits (B, num_classes); the EMA weights in eval mode when ``ema_decay`` is set."""
        return (self.model if self.training else self.inference_model)(x)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        if self.mixup.enabled:
            x, y = self.mixup(x, y)  # y: (B, C) soft targets
        logits = self.model(x)
        loss = self.check_loss(self.train_loss(logits, y))
        if loss is None:
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        self.log("train/lr", self.current_peak_lr(), on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss of (B, C) logits against class indices (B,) or mixup's soft targets (B, C): the
        cross-entropy or focal loss, with ``class_weights`` and ``label_smoothing``. (``val/loss`` stays the
        plain negative log-likelihood, comparable between runs with other loss settings.)"""
        hp = self.hparams
        weight = self._train_loss_weight()
        if hp.get("loss", "ce") == "focal":
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
        """``{"path": list[str] | None, "probs": (B, C), "pred": (B,)}``; accepts a predict dict with an
        ``image`` key, an ``(image, target)`` tuple, or a bare image tensor."""
        if isinstance(batch, dict):
            x, paths = batch["image"], batch.get("path")
        elif isinstance(batch, (tuple, list)):
            x, paths = batch[0], None
        else:
            x, paths = batch, None
        probs = self.eval_log_probs(x).exp()
        return {"path": paths, "probs": probs, "pred": probs.argmax(dim=-1)}
