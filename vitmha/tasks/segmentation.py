"""Semantic segmentation with a vitmha backbone and a decoder head."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from vitmha.heads.segmentation import HEADS, build_head, run_head
from vitmha.tasks.base import SupervisedTask, TaskConfigError, build_backbone
from vitmha.tasks.losses import LOSSES, focal_loss


def segmentation_scores(confusion: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Scores from a (K, K) confusion matrix (rows = target, columns = prediction; ignored pixels not
    counted): ``iou`` and ``dice`` per class (NaN for a class absent from both target and prediction),
    ``miou`` and ``dice_mean`` = NaN-means over the classes present (as mmseg), ``pixel_acc``."""
    conf = confusion.double()
    tp = conf.diag()
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    union = tp + fp + fn
    nan = torch.tensor(float("nan"), dtype=conf.dtype, device=conf.device)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), nan)
    return {"iou": iou, "miou": iou.nanmean(), "dice": dice, "dice_mean": dice.nanmean(),
            "pixel_acc": tp.sum() / conf.sum().clamp_min(1)}


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) (B,K,H,W) against ``target`` (B,H,W),
    pixels equal to ``ignore_index`` left out."""
    K = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # (B,1,H,W)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, K - 1) * valid.squeeze(1), K).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def _windows(size: int, window: int, stride: int) -> List[int]:
    """Window starts covering [0, size): every ``stride``, the last one flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride)) + [size - window]
    return sorted(set(starts))


def sliding_window_inference(fn: Any, images: torch.Tensor, window: Union[int, Tuple[int, int]],
                             stride: Union[int, Tuple[int, int]], num_classes: int) -> torch.Tensor:
    """Logits (B, K, H, W) of ``fn`` (images (B,3,h,w) -> logits (B,K,h,w)) averaged over overlapping
    ``window``-sized crops taken every ``stride`` pixels. An image smaller than the window is zero-padded
    (zero = the normalised mean) on the bottom/right and the padding cropped off."""
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(wh, ww, sh, sw) < 1:
        raise ValueError(f"window {window} and stride {stride} must be positive")
    B, _, H, W = images.shape
    pad_h, pad_w = max(wh - H, 0), max(ww - W, 0)
    x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    Hp, Wp = x.shape[-2:]
    out = x.new_zeros(B, num_classes, Hp, Wp, dtype=torch.float32)
    count = x.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)
    for y0 in _windows(Hp, wh, sh):
        for x0 in _windows(Wp, ww, sw):
            out[..., y0:y0 + wh, x0:x0 + ww] += fn(x[..., y0:y0 + wh, x0:x0 + ww]).float()
            count[..., y0:y0 + wh, x0:x0 + ww] += 1
    return (out / count)[..., :H, :W]


class SegmentationModel(nn.Module):
    """Backbone + decoder head: (B,3,H,W) -> logits (B,K,H,W). Inputs whose sides are not multiples
    of the patch size are zero-padded for the backbone and the logits cropped back."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        ph, pw = self.backbone.patch_embed.patch_size
        pad_h, pad_w = -H % ph, -W % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return run_head(self.backbone, self.head, x)[..., :H, :W]


def _metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name.strip()) or "class"


class SemanticSegmenter(SupervisedTask):
    """Semantic segmentation: ``forward(x)`` (B,C,H,W) -> logits (B, num_classes, H, W).

    Logs ``train/loss``, ``val/loss``, ``val/miou``, ``val/pixel_acc``, ``val/dice`` (macro Dice = F1 over
    classes), ``val/iou_<class name or index>`` and the same under ``test/``. Metrics come from a confusion
    matrix accumulated over the epoch without ``ignore_index`` pixels. mIoU and Dice average over the
    classes present in the target or the prediction (a class whose union is empty is NaN and left out of
    the mean, as in mmseg). With ``ema_decay`` set, evaluation uses the EMA weights. Every option of
    :class:`~vitmha.tasks.base.SupervisedTask` and :class:`~vitmha.tasks.base.BackboneTask` applies too;
    ``backbone_kwargs.dynamic_img_size`` defaults to True here so that any image size works, and the head
    always trains at the full learning rate.

    Args:
        head: decoder: ``linear``, ``mask_transformer`` (Segmenter), ``uper`` (UPerNet on a simple
            feature pyramid) or ``setr_pup``.
        head_kwargs: extra arguments of the head (e.g. ``channels`` for uper/setr_pup, ``num_layers``).
        class_names: names for the per-class IoU metrics; default the class indices.
        ignore_index: target value that is left out of the loss and the metrics.
        dice_weight: weight of a soft Dice loss added to the cross-entropy; 0 = off.
        slide_window: evaluate/predict with sliding windows of this size (e.g. the training crop size)
            instead of one forward pass over the whole image.
        slide_stride: stride of the sliding windows; default 2/3 of the window.
        loss: ``ce`` (cross-entropy) or ``focal`` (focal loss, Lin et al. 2017; gamma 0 = cross-entropy);
            the Dice term (``dice_weight``) is added to either, unweighted. With ``class_weights`` the loss is
            the weighted mean over pixels.
        focal_gamma: focusing parameter of the focal loss.
        warmup_epochs: linear warmup in epochs (may be fractional); 1 here.
        scheduler: ``poly`` (power 0.9) here, or ``cosine`` or ``constant``.
    """

    task = "segmentation"
    monitor = "val/miou"

    def __init__(self, *, head: str = "linear", head_kwargs: Optional[Dict[str, Any]] = None,
                 class_names: Optional[List[str]] = None, ignore_index: int = 255, dice_weight: float = 0.0,
                 slide_window: Optional[int] = None, slide_stride: Optional[int] = None, loss: str = "ce",
                 focal_gamma: float = 2.0, num_classes: int = 2, warmup_epochs: float = 1.0,
                 scheduler: str = "poly", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, warmup_epochs=warmup_epochs, scheduler=scheduler, **kwargs)
        if num_classes < 2:
            raise TaskConfigError(f"num_classes: must be >= 2 (background counts as a class), got {num_classes}")
        if head not in HEADS:
            raise TaskConfigError(f"head: expected one of {', '.join(HEADS)}, got {head!r}")
        if loss not in LOSSES:
            raise TaskConfigError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise TaskConfigError(f"class_names: {len(class_names)} names for num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise TaskConfigError(f"ignore_index: {ignore_index} is a class index (num_classes={num_classes})")
        kwargs_bb = {"dynamic_img_size": True, **(self.hparams.backbone_kwargs or {})}
        hp = self.hparams
        bb = build_backbone(hp.backbone, hp.pretrained, kwargs_bb, hp.drop_path_rate, num_classes=0)
        if hp.grad_checkpointing:
            bb.set_grad_checkpointing(True)
        bb = self.finish_backbone(bb)
        self.model = SegmentationModel(bb, build_head(head, bb, num_classes, **(head_kwargs or {})))
        self.finish_init()
        self.class_keys = [_metric_key(n) for n in class_names] if class_names else [str(i) for i in range(num_classes)]
        self.val_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.test_confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.test_confusion: Optional[torch.Tensor] = None  # (K, K), rows = target, after a test epoch

    # the backbone gets layer decay and freezing; the head is always trained at the full lr
    def backbone_module(self) -> nn.Module:
        return self.model.backbone

    def head_modules(self) -> List[nn.Module]:
        return [self.model.head]

    def frozen_parameters(self) -> List[nn.Parameter]:
        return list(self.backbone_module().parameters())

    def loss(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy (or focal loss) averaged over non-ignored pixels, weighted by ``weight`` (C,) when
        given (0 when no pixel counts) + ``dice_weight`` * Dice."""
        hp = self.hparams
        logits = logits.float()
        if hp.loss == "focal" or weight is not None:
            gamma = float(hp.focal_gamma) if hp.loss == "focal" else 0.0
            loss = focal_loss(logits, target, gamma=gamma, weight=weight, ignore_index=hp.ignore_index)
        else:
            valid = (target != hp.ignore_index).sum()
            loss = F.cross_entropy(logits, target, ignore_index=hp.ignore_index, reduction="sum") / valid.clamp_min(1)
        if hp.dice_weight > 0:
            loss = loss + hp.dice_weight * dice_loss(logits, target, hp.ignore_index)
        return loss

    def sliding_window_inference(self, images: torch.Tensor, window: Optional[int] = None,
                                 stride: Optional[int] = None) -> torch.Tensor:
        """Logits (B,K,H,W) averaged over overlapping windows (default ``slide_window``/``slide_stride``)."""
        window = window or self.hparams.slide_window
        if window is None:
            raise ValueError("sliding_window_inference needs a window (or slide_window set on the model)")
        stride = stride or self.hparams.slide_stride or max(1, (2 * window) // 3)
        return sliding_window_inference(self.inference_model, images, window, stride, self.hparams.num_classes)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits: sliding windows when ``slide_window`` is set, else one forward pass."""
        if self.hparams.slide_window:
            return self.sliding_window_inference(images)
        return self.inference_model(images)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        loss = self.check_loss(self.loss(self.model(x), y, self.train_loss_weight()))
        if loss is None:
            return None
        self.log_train(loss, x.shape[0])
        return loss

    def _eval_step(self, batch: Any, confusion: MulticlassConfusionMatrix, stage: str) -> Dict[str, torch.Tensor]:
        """``{"loss", "logits"}``: the (B, K, H, W) logits the metrics were computed from, for callbacks."""
        x, y = batch
        logits = self.predict_logits(x)
        loss = self.loss(logits, y, self.loss_weight())
        confusion.update(logits.argmax(1), y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        return {"loss": loss, "logits": logits.detach()}

    def _log_scores(self, confusion: MulticlassConfusionMatrix, stage: str) -> None:
        scores = segmentation_scores(confusion.compute())  # compute() syncs the matrix across devices
        confusion.reset()
        self.log(f"{stage}/miou", scores["miou"].float(), prog_bar=(stage == "val"))
        self.log(f"{stage}/pixel_acc", scores["pixel_acc"].float())
        self.log(f"{stage}/dice", scores["dice_mean"].float())
        for key, v in zip(self.class_keys, scores["iou"].float()):
            self.log(f"{stage}/iou_{key}", v)

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._eval_step(batch, self.val_confmat, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_confmat, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._eval_step(batch, self.test_confmat, "test")

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.test_confmat.compute().cpu()
        self._log_scores(self.test_confmat, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """``{"path": list[str] | None, "mask": list of (H_i, W_i) int64 class maps, "outputs"}``, each at the
        image's ``orig_size`` when the batch gives one (logits resized bilinearly, then argmax)."""
        if isinstance(batch, dict):
            x, paths, sizes = batch["image"], batch.get("path"), batch.get("orig_size")
        else:
            x, paths, sizes = (batch[0] if isinstance(batch, (tuple, list)) else batch), None, None
        logits = self.predict_logits(x).float()
        masks = []
        for i in range(x.shape[0]):
            li = logits[i:i + 1]
            if sizes is not None:
                li = F.interpolate(li, size=tuple(int(s) for s in sizes[i]), mode="bilinear", align_corners=False)
            masks.append(li.argmax(1)[0])
        return {"path": paths, "mask": masks, "outputs": [{"mask": m.cpu().numpy()} for m in masks]}

    # ----------------------------------------------------------------- what the commands ask a task
    eval_outputs = predict_logits  # what evaluation scores (the robustness sweep too)

    def attack_loss(self, x: torch.Tensor, y: torch.Tensor):
        """(summed per-pixel cross-entropy of the evaluation logits over non-ignored pixels, None)."""
        ignore = int(self.hparams.ignore_index)
        return F.cross_entropy(self.predict_logits(x).float(), y, ignore_index=ignore, reduction="sum"), None

    def predict_probs(self, images: Sequence[Any], pre: Any, mode: str = "auto") -> List[torch.Tensor]:
        """Per image its (K, H, W) class probabilities at the image's own size: ``resize`` to the training size
        and back, ``slide`` windows of the training (or ``slide_window``) size over the full image, or
        ``auto``: slide only over images larger than the window."""
        from vitmha.inference import eval_transform, normalize_only

        if mode not in ("auto", "resize", "slide"):
            raise TaskConfigError(f"mode: expected auto, resize or slide, got {mode!r}")
        window = int(self.hparams.slide_window or pre.image_size)
        out: List[Optional[torch.Tensor]] = [None] * len(images)
        resize = []
        with torch.no_grad():
            for i, img in enumerate(images):
                h, w = img.shape[:2]
                if mode == "slide" or (mode == "auto" and (h > window or w > window)):
                    x = normalize_only(img, pre)[None].to(self.device)
                    out[i] = self.sliding_window_inference(x, window=window)[0].float().softmax(0).cpu()
                else:
                    resize.append(i)
            if resize:
                transform = eval_transform(pre, "segmentation")
                x = torch.stack([transform(image=images[i])["image"] for i in resize]).to(self.device)
                logits = self.inference_model(x).float()
                for j, i in enumerate(resize):
                    h, w = images[i].shape[:2]
                    li = F.interpolate(logits[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
                    out[i] = li[0].softmax(0).cpu()
        return out  # type: ignore[return-value]

    def describe(self, probs: torch.Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """``{"mask": (H, W) int64 class indices, "classes": {name: pixels} of the classes present}``."""
        mask = torch.as_tensor(probs).argmax(0).numpy().astype("int64")
        names = list(names) if names else [str(i) for i in range(int(self.hparams.num_classes))]
        ids, counts = torch.unique(torch.from_numpy(mask), return_counts=True)
        return {"mask": mask, "classes": {str(names[int(i)]) if int(i) < len(names) else str(int(i)): int(c)
                                          for i, c in zip(ids, counts)}}

    def prediction_sink(self, output_dir: str, names: Optional[Sequence[str]] = None, top_k: int = 5,
                        suffix: str = "", alpha: float = 0.5) -> Any:
        from vitmha.predictions import MaskFiles

        return MaskFiles(output_dir, alpha)

    def evaluation_report(self, class_names: Optional[Sequence[str]], prefix: str, trainer: Any = None,
                          **options: Any) -> Any:
        from vitmha.reports import SegmentationReport, report_mean_std, train_counts

        k = int(self.hparams.num_classes)
        mean, std = report_mean_std(trainer, self)
        return SegmentationReport(k, class_names, self.class_keys, int(self.hparams.ignore_index), prefix,
                                  int(options.get("num_samples", 6)), mean, std, train_counts(trainer, self, k))
