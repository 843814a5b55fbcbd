"""What the classification and segmentation tasks share: building the backbone, optimiser and
schedule, linear probing / late unfreezing, parameter-efficient fine-tuning (``peft``), weight EMA,
per-step reseeding for exact resume, the non-finite loss policy, and the loss options for rare classes
(``class_weights``, ``loss: ce | focal``). Subclasses define ``__init__`` (their typed signature is the CLI),
set ``self.model`` (everything that is trained; the EMA follows it) and ``self.ema`` and implement the steps."""
from __future__ import annotations

import os
import random
import warnings
from typing import Any, Dict, List, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vitmha.models.layers import PatchDropout
from vitmha.peft import PeftError, PeftSpec, parse_peft
from vitmha.tasks.ema import ModelEma
from vitmha.tasks.losses import AUTO_WEIGHTS, LOSSES, class_weights_from_counts
from vitmha.tasks.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, param_groups, param_shapes

NONFINITE_POLICIES = ("error", "skip")


class TaskConfigError(ValueError):
    """A task option that cannot work (printed by the CLI as one ``error:`` line naming the option)."""


def from_scratch(pretrained: Union[bool, str, None]) -> bool:
    """True when no weights are loaded (``pretrained`` False or None)."""
    return pretrained is False or pretrained is None


def build_backbone(name: str, pretrained: Union[bool, str], backbone_kwargs: Optional[Dict[str, Any]],
                   drop_path_rate: Optional[float], **overrides: Any) -> nn.Module:
    """``vitmha.create_backbone(name, pretrained, **backbone_kwargs, **overrides)``; ``drop_path_rate``
    is passed only when set, so the architecture's default stays otherwise. From scratch, ``weight_init``
    defaults to ``jax`` (big_vision's: lecun-normal patch embedding, zero classifier head), which trains
    small ViTs from scratch faster than timm's truncated-normal default (``weight_init: ''`` selects timm's)."""
    from vitmha.models import create_backbone  # the models package imports nothing from tasks

    kwargs = dict(backbone_kwargs or {})
    kwargs.update(overrides)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if from_scratch(pretrained):
        kwargs.setdefault("weight_init", "jax")
    return create_backbone(name, pretrained=pretrained, **kwargs)


def default_lr(pretrained: Union[bool, str], freeze_backbone: bool) -> float:
    """1e-4 when fine-tuning pretrained weights end to end, 1e-3 from scratch or when the backbone's weights
    are frozen (``freeze_backbone``: a linear probe, or PEFT, which trains few, freshly added parameters) (with
    the default gradient clipping at norm 1.0 and big_vision's init; without them 1e-3 made a small ViT
    trained from scratch collapse to chance)."""
    return 1e-4 if (not from_scratch(pretrained) and not freeze_backbone) else 1e-3


PATCH_DROP_SCHEDULES = ("constant", "linear")
EPOCH_START = 2**32 - 1  # the "batch index" of the seed drawn at an epoch's start


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 63-bit seed that is a function of (global seed, epoch, batch index in the epoch, rank) only."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), epoch, batch, rank, 0x57E9]).generate_state(2, np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) % (2**63 - 1)


class BackboneTask(L.LightningModule):
    """Base class; expects hparams ``lr, weight_decay, layer_decay, warmup_epochs, warmup_steps, min_lr,
    scheduler, freeze_backbone, freeze_blocks, unfreeze_at_epoch, ema_decay, nonfinite, pretrained`` and
    optionally ``peft``, ``optimizer``, ``momentum``, ``nesterov``, ``class_weights``, ``loss``, ``focal_gamma``."""

    model: nn.Module
    ema: Optional[ModelEma]
    #: what the task predicts ("classification" or "segmentation"); the CLI, tools and reports read it
    task: str = ""
    #: the validation metric that picks the best checkpoint (maximised)
    monitor: str = "val/loss"

    def _check_common_args(self) -> None:
        hp = self.hparams
        if hp.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {hp.scheduler!r}")
        if hp.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {hp.nonfinite!r}")
        #: the checked ``peft`` spec; None for plain fine-tuning (``peft`` None or ``{method: full}``)
        self.peft_spec: Optional[PeftSpec] = parse_peft(hp.get("peft"))
        if self.uses_peft:
            for key, on in (("freeze_backbone", hp.freeze_backbone), ("freeze_blocks", hp.get("freeze_blocks")),
                            ("unfreeze_at_epoch", hp.unfreeze_at_epoch is not None)):
                if on:
                    raise PeftError(f"peft.method {self.peft_spec.method} freezes the backbone itself; "
                                    f"{key} does not apply (use peft {{method: linear_probe}} or full fine-tuning)")
        if hp.unfreeze_at_epoch is not None and not self.freezes_backbone:
            raise ValueError("unfreeze_at_epoch needs freeze_backbone=True")
        if int(hp.get("freeze_blocks") or 0) < 0:
            raise ValueError(f"freeze_blocks must be >= 0, got {hp.freeze_blocks}")
        if not 0.0 < hp.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {hp.layer_decay}")
        if hp.get("optimizer", "adamw") not in OPTIMIZERS:
            raise TaskConfigError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {hp.optimizer!r}")
        if hp.get("nesterov") and not hp.get("momentum"):
            raise TaskConfigError(f"nesterov: needs momentum > 0, got momentum={hp.momentum}")
        losses = getattr(self, "losses", LOSSES)  # a task may declare its own (the multi-label task: bce, asl)
        if hp.get("loss", "ce") not in losses:
            raise TaskConfigError(f"loss: expected one of {', '.join(losses)}, got {hp.loss!r}")
        if float(hp.get("focal_gamma", 0.0)) < 0:
            raise TaskConfigError(f"focal_gamma: must be >= 0, got {hp.focal_gamma}")
        self.skipped_batches = 0
        self._backbone_frozen = False

    # ----------------------------------------------------------------- rare classes
    def _init_class_weights(self, num_classes: int) -> None:
        """Check ``class_weights`` and register the ``class_weight`` buffer (C,) it fills: the given list, or
        NaN until ``setup("fit")`` computes ``auto``/``effective`` weights from the training counts (kept in
        the state dict, so test and predict need no data). No buffer without class weights, so checkpoints
        of runs without them keep their keys."""
        cw = self.hparams.get("class_weights")
        if cw is None:
            return
        if isinstance(cw, str):
            if cw not in AUTO_WEIGHTS:
                raise TaskConfigError(f"class_weights: expected null, {' or '.join(AUTO_WEIGHTS)}, or a list of "
                                      f"{num_classes} weights; got {cw!r}")
            weight = torch.full((num_classes,), float("nan"))
            self.register_buffer("class_counts", torch.full((num_classes,), -1, dtype=torch.long))
        else:
            try:
                weight = torch.tensor([float(w) for w in cw], dtype=torch.float32)
            except (TypeError, ValueError):
                raise TaskConfigError(f"class_weights: expected a list of {num_classes} numbers, got {cw!r}") from None
            if weight.numel() != num_classes or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()) \
                    or not bool((weight > 0).any()):
                raise TaskConfigError(f"class_weights: expected {num_classes} finite weights >= 0 (num_classes="
                                      f"{num_classes}), not all 0; got {list(cw)}")
        self.register_buffer("class_weight", weight)

    def loss_weight(self) -> Optional[torch.Tensor]:
        """The per-class loss weights (C,), or None (no ``class_weights``, or ``auto`` not computed yet)."""
        w = getattr(self, "class_weight", None)
        return w if w is not None and bool(torch.isfinite(w).all()) else None

    def _train_loss_weight(self) -> Optional[torch.Tensor]:
        w = self.loss_weight()
        if w is None and self.hparams.get("class_weights") is not None:
            raise TaskConfigError(f"class_weights: {self.hparams.class_weights!r} weights were never computed "
                                  "(they are computed in setup('fit') from the data module)")
        return w

    def setup(self, stage: str) -> None:
        # before a strategy wraps the model (FSDP reshapes parameters): the original shapes decide weight decay
        if getattr(self, "_param_shapes", None) is None:
            self._param_shapes = param_shapes(self.backbone_module(), self.head_modules())
        if stage == "fit" and isinstance(self.hparams.get("class_weights"), str):
            self._compute_class_weights()

    def _compute_class_weights(self) -> None:
        """Fill ``class_weight`` from the data module's ``train_class_counts()``; log the table."""
        method, k = self.hparams.class_weights, int(self.hparams.num_classes)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        counter = getattr(dm, "train_class_counts", None)
        if counter is None:
            raise TaskConfigError(
                f"class_weights: {method!r} needs the training class counts from the data module, but "
                f"{type(dm).__name__ if dm is not None else 'no data module'} has no train_class_counts() "
                "(vitmha's data modules have it); give the weights as a list [w0, w1, ...] instead")
        counts = np.asarray(counter(), dtype=np.int64)
        if counts.shape != (k,):
            raise TaskConfigError(f"class_weights: the data module counted {counts.shape[0]} classes, the model "
                                  f"has num_classes={k}")
        weight = class_weights_from_counts(counts, method)
        self.class_weight.copy_(weight)
        self.class_counts.copy_(torch.from_numpy(counts))
        names = getattr(dm, "classes", None) or [str(i) for i in range(k)]
        kind = "inverse frequency" if method == "auto" else "effective number, beta 0.999"
        what = "pixels" if self.task == "segmentation" else "images"
        table = ", ".join(f"{n}: {w:.3g} ({c})" for n, w, c in zip(names, weight.tolist(), counts.tolist()))
        rank_zero_info(f"class_weights {method} ({kind}, mean 1 over the classes present), "
                       f"class: weight (train {what}): {table}")
        for logger in self.loggers:
            logger.log_hyperparams({"class_weights_used": {str(n): round(float(w), 6) for n, w in zip(names, weight)},
                                    "train_class_counts": {str(n): int(c) for n, c in zip(names, counts)}})

    @property
    def freezes_backbone(self) -> bool:
        """A linear probe: ``freeze_backbone``, or ``peft: {method: linear_probe}``, which means the same."""
        spec = getattr(self, "peft_spec", None)
        return bool(self.hparams.freeze_backbone) or (spec is not None and spec.method == "linear_probe")

    @property
    def uses_peft(self) -> bool:
        """A PEFT method (lora, dora, bitfit, vpt, adapter): what trains was fixed when the task was built."""
        spec = getattr(self, "peft_spec", None)
        return spec is not None and spec.method != "linear_probe"

    # ----------------------------------------------------------------- subclass hooks
    def backbone_module(self) -> nn.Module:
        """The ViT (its params get layer-wise lr decay and are the ones ``freeze_backbone`` freezes)."""
        return self.model

    def head_modules(self) -> List[nn.Module]:
        """Trained modules outside the backbone (decoders); lr scale 1.0."""
        return []

    def frozen_parameters(self) -> List[nn.Parameter]:
        """Parameters frozen by ``freeze_backbone``."""
        return list(self.backbone_module().parameters())

    def leading_parameters(self, n: int) -> List[nn.Parameter]:
        """The patch embedding, prefix tokens, position embedding and the first ``n`` blocks of the backbone
        (what ``freeze_blocks`` freezes). Raises ValueError when the backbone has fewer than ``n`` blocks."""
        bb = self.backbone_module()
        depth = len(bb.blocks)
        if n > depth:
            raise ValueError(f"freeze_blocks={n}, but the backbone has {depth} blocks")
        prefixes = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.") + tuple(
            f"blocks.{i}." for i in range(n))
        return [p for name, p in bb.named_parameters() if name.startswith(prefixes)]

    def frozen_modules(self) -> List[nn.Module]:
        """Modules kept in eval mode while frozen (no dropout/drop-path)."""
        return [self.backbone_module()]

    # ----------------------------------------------------------------- optimisation
    @property
    def learning_rate(self) -> float:
        hp = self.hparams
        return hp.lr if hp.lr is not None else default_lr(hp.pretrained, self.freezes_backbone or self.uses_peft)

    def configure_optimizers(self) -> Dict[str, Any]:
        hp = self.hparams
        lr = self.learning_rate
        # build_optimizer reads trainer.estimated_stepping_batches, which makes the first train iterator
        self._preseeded_epoch = getattr(self, "_start_epoch", 0)
        self._reseed(self._preseeded_epoch)
        groups = param_groups(self.backbone_module(), self.head_modules(), lr=lr, weight_decay=hp.weight_decay,
                              layer_decay=hp.layer_decay, trainable_only=self.uses_peft,
                              shapes=getattr(self, "_param_shapes", None))
        return build_optimizer(self, groups, lr=lr, scheduler=hp.scheduler, warmup_epochs=hp.warmup_epochs,
                               warmup_steps=hp.warmup_steps, min_lr=hp.min_lr,
                               optimizer=hp.get("optimizer", "adamw"), momentum=float(hp.get("momentum", 0.9)),
                               nesterov=bool(hp.get("nesterov", False)))

    def current_peak_lr(self) -> float:
        """The largest lr over the param groups now (the head's, under layer decay)."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return max((g["lr"] for g in optimizers[0].param_groups), default=0.0) if optimizers else 0.0

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        # the Trainer's gradient_clip_val wins; otherwise the task's grad_clip_norm (global L2 norm)
        if gradient_clip_val is None and self.hparams.get("grad_clip_norm"):
            gradient_clip_val, gradient_clip_algorithm = self.hparams.grad_clip_norm, "norm"
        if not gradient_clip_val:
            return
        root = self._trainer.strategy.model if self._trainer is not None else None
        if gradient_clip_algorithm in (None, "norm") and type(root).__name__ == "FullyShardedDataParallel":
            # Lightning refuses norm clipping under FSDP: clip_grad_norm_ over the local shards would be
            # wrong. The root FSDP module computes the norm over all shards.
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    # ----------------------------------------------------------------- freezing
    def _apply_freeze(self) -> None:
        if self.uses_peft:  # apply_peft set requires_grad when the task was built; it stays so
            return
        hp = self.hparams
        frozen = self.freezes_backbone and (hp.unfreeze_at_epoch is None
                                            or self.current_epoch < hp.unfreeze_at_epoch)
        for p in self.frozen_parameters():
            p.requires_grad_(not frozen)
        n = int(hp.get("freeze_blocks") or 0)
        if n and not frozen:  # no gradient flows below block n: those blocks cost a forward pass only
            for p in self.leading_parameters(n):
                p.requires_grad_(False)
        self._backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> "BackboneTask":
        super().train(mode)
        if mode and getattr(self, "_backbone_frozen", False):
            for m in self.frozen_modules():
                m.eval()
            for m in self.head_modules():
                m.train()
        return self

    # ----------------------------------------------------------------- epoch hooks
    def on_fit_start(self) -> None:
        self._apply_freeze()

    def _reseed(self, epoch: int, batch: int = EPOCH_START) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            s = step_seed(int(seed), epoch, batch, self.global_rank)
            torch.manual_seed(s)  # also seeds every CUDA device
            random.seed(s)
            np.random.seed(s % 2**32)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # the epoch a resumed fit starts at: epochs whose training part ran (end-of-epoch checkpoints)
        try:
            self._start_epoch = int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
        except (KeyError, TypeError):
            self._start_epoch = int(checkpoint.get("epoch", 0))

    def on_train_epoch_start(self) -> None:
        # Exact resume, 1: the RNG is reseeded from (PL_GLOBAL_SEED, epoch, rank) right before the train
        # loader is iterated, so a plain DataLoader(shuffle=True) and its worker seeds are a function of
        # (seed, epoch) too (vitmha's data modules do not need it: their keys carry the epoch). Lightning
        # iterates the loader after this hook, except in a fit's first epoch, whose iterator is made when
        # configure_optimizers asks for the number of steps; that epoch is seeded there.
        if self.current_epoch != getattr(self, "_preseeded_epoch", None):
            self._reseed(self.current_epoch)
        self._preseeded_epoch = None
        self._apply_freeze()
        self.skipped_batches = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Exact resume, 2: reseeded again before every training batch from (seed, epoch, batch index, rank),
        # so dropout, drop-path and mixup draw the same numbers whether the run started here or resumed
        # from a checkpoint written at an epoch's end or in its middle.
        self._reseed(self.current_epoch, batch_idx)
        self._schedule_patch_drop()

    # ----------------------------------------------------------------- patch dropout schedule
    def _check_patch_drop_schedule(self) -> None:
        schedule = self.hparams.get("patch_drop_schedule", "constant")
        if schedule not in PATCH_DROP_SCHEDULES:
            raise TaskConfigError(f"patch_drop_schedule: expected one of {', '.join(PATCH_DROP_SCHEDULES)}, "
                                  f"got {schedule!r}")
        drop = getattr(self.backbone_module(), "patch_drop", None)
        if schedule != "constant" and not isinstance(drop, PatchDropout):
            raise TaskConfigError(f"patch_drop_schedule: {schedule} needs patch dropout in the backbone "
                                  "(backbone_kwargs: {patch_drop_rate: 0.25}, say)")
        #: the rate the backbone was built with; the schedule starts there
        self._patch_drop_start = drop.prob if isinstance(drop, PatchDropout) else 0.0

    def _schedule_patch_drop(self) -> None:
        """``linear``: the backbone's patch-dropout rate at this optimizer step, from the built rate to 0 at the
        last step (a function of the global step only, so a resumed run continues the same schedule)."""
        if self.hparams.get("patch_drop_schedule", "constant") != "linear":
            return
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.backbone_module().patch_drop.prob = self._patch_drop_start * max(0.0, 1.0 - self.global_step / total)

    def on_train_epoch_end(self) -> None:
        if self.hparams.nonfinite == "skip":
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=False, on_epoch=True,
                     reduce_fx="sum", sync_dist=True)
            if self.skipped_batches:
                warnings.warn(f"epoch {self.current_epoch}: skipped {self.skipped_batches} batch(es) with a "
                              "non-finite loss", RuntimeWarning, stacklevel=1)

    # ----------------------------------------------------------------- non-finite loss
    def check_loss(self, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """``loss`` if finite; otherwise raises (``nonfinite="error"``) or returns None (``"skip"``)."""
        if bool(torch.isfinite(loss).all()):
            return loss
        value = loss.detach().float().cpu().item()
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        if self.hparams.nonfinite == "error":
            raise FloatingPointError(
                f"non-finite loss ({value}) at {where}; lower the lr, use bf16 instead of fp16, enable gradient "
                "clipping, or set nonfinite='skip' to skip such batches")
        self.skipped_batches += 1
        return None

    # ----------------------------------------------------------------- inference model
    @property
    def inference_model(self) -> nn.Module:
        """The EMA weights when ``ema_decay`` is set, else the trained weights."""
        return self.ema.module if self.ema is not None else self.model
