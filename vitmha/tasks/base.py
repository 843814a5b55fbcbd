"""The options every vitmha task takes, declared once, and the pieces behind them.

:class:`BackboneTask` holds what any task on a vitmha backbone shares: the backbone (arch, pretrained weights,
overrides), the optimiser and its schedule, gradient clipping, the non-finite loss policy and weight EMA.
:class:`SupervisedTask` adds what the tasks with labels share: the number of classes, linear probing and
late unfreezing (:mod:`vitmha.tasks.freezing`), parameter-efficient fine-tuning (``peft``) and class weights.
A task's ``__init__`` takes its own options and passes the rest on (``**kwargs``), so the CLI and ``--help``
show every option of every task, documented here once. Exact resume is the
:class:`~vitmha.tasks.reseed.ExactResume` callback every task installs (``configure_callbacks``).

A task also declares what it is, for the commands and reports: ``task`` (its kind), ``monitor`` (the
validation metric of its best checkpoint) and the methods ``predict_probs``/``describe``/``prediction_sink``
(prediction), ``evaluation_report`` (the report after ``test``) and ``eval_outputs``/``attack_loss``
(robustness).
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from torch import nn

from vitmha.tasks.ema import ModelEma
from vitmha.tasks.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, param_groups, param_shapes

NONFINITE_POLICIES = ("error", "skip")
_WEIGHTS_FROM_CHECKPOINT = contextvars.ContextVar("vitmha_weights_from_checkpoint", default=False)


class TaskConfigError(ValueError):
    """A task option that cannot work (printed by the CLI as one ``error:`` line naming the option)."""


@contextlib.contextmanager
def weights_from_checkpoint(active: bool = True) -> Iterator[None]:
    """Within this context tasks build their backbones without reading ``pretrained`` weights: a checkpoint
    about to be loaded holds every weight. ``load_from_checkpoint``, ``vitmha.load`` and the CLI with
    ``--ckpt_path`` use it, so a trained checkpoint loads with nothing but itself. The hyper-parameters keep
    their values (``pretrained`` still decides the default learning rate)."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(bool(active) or _WEIGHTS_FROM_CHECKPOINT.get())
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def from_scratch(pretrained: Union[bool, str, None]) -> bool:
    """True when no weights are loaded (``pretrained`` False or None)."""
    return pretrained is False or pretrained is None


def build_backbone(name: str, pretrained: Union[bool, str], backbone_kwargs: Optional[Dict[str, Any]],
                   drop_path_rate: Optional[float], **overrides: Any) -> nn.Module:
    """``vitmha.create_backbone(name, pretrained, **backbone_kwargs, **overrides)``; ``drop_path_rate``
    is passed only when set, so the architecture's default stays otherwise. From scratch, ``weight_init``
    defaults to ``jax`` (big_vision's: lecun-normal patch embedding, zero classifier head), which trains
    small ViTs from scratch faster than timm's truncated-normal default (``weight_init: ''`` selects timm's).
    Inside :func:`weights_from_checkpoint` nothing is read."""
    from vitmha.models import create_backbone  # the models package imports nothing from tasks

    kwargs = dict(backbone_kwargs or {})
    kwargs.update(overrides)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if from_scratch(pretrained):
        kwargs.setdefault("weight_init", "jax")
    if _WEIGHTS_FROM_CHECKPOINT.get():
        pretrained = False
    return create_backbone(name, pretrained=pretrained, **kwargs)


def default_lr(pretrained: Union[bool, str], trains_few: bool) -> float:
    """1e-4 when fine-tuning pretrained weights end to end, 1e-3 from scratch or when only a few, fresh
    parameters train (a linear probe, PEFT) (with the default gradient clipping at norm 1.0 and big_vision's
    init; without them 1e-3 made a small ViT trained from scratch collapse to chance)."""
    return 1e-4 if (not from_scratch(pretrained) and not trains_few) else 1e-3


def task_arguments(cls: type) -> List[str]:
    """Every keyword argument a task class takes: its own ``__init__``'s and those it passes on to its bases."""
    import inspect

    names: List[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or not issubclass(klass, BackboneTask):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" and p.name not in names:
                names.append(p.name)
    return names


def batch_images(batch: Any) -> torch.Tensor:
    """The images of a batch: a tensor, the first item of an ``(images, targets)`` pair, or ``batch["image"]``."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


class BackboneTask(L.LightningModule):
    """Base of every vitmha task: a backbone, its optimiser and schedule, clipping, EMA.

    Args:
        backbone: timm ViT architecture name (optionally with its tag), e.g. ``vit_small_patch16_224``.
        pretrained: False, True (timm's pretrained config: the Hugging Face cache, offline with
            ``HF_HUB_OFFLINE=1``) or a weights file (.safetensors, .pth/.pt/.bin, timm/JAX .npz, or a vitmha
            task checkpoint).
        backbone_kwargs: overrides for ``vitmha.create_backbone`` (img_size, patch_size, in_chans, depth,
            keep_blocks, patch_drop_rate, tome_r, ...). From scratch ``weight_init`` defaults to ``jax``.
        drop_path_rate: stochastic depth rate; None keeps the architecture's default.
        grad_checkpointing: recompute block activations in backward to save memory.
        lr: peak learning rate; None = 1e-4 when fine-tuning pretrained weights end to end, else 1e-3.
        weight_decay: weight decay (not on norms, biases, tokens, position embeddings, nor on what any module
            lists in ``no_weight_decay()``; decided from the parameters' original names and shapes, also
            under FSDP).
        layer_decay: layer-wise lr decay; block i gets lr * layer_decay ** (depth - i). 1.0 = off;
            0.65-0.75 is usual for fine-tuning.
        warmup_epochs: linear warmup length in epochs (may be fractional).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs``.
        min_lr: lr at the end of the schedule.
        scheduler: ``cosine``, ``poly`` (power 0.9) or ``constant`` after warmup, stepped every step.
        optimizer: ``adamw``, ``sgd`` (with ``momentum``, optionally Nesterov; weight decay as L2 on the
            gradient) or ``lamb`` (timm's LAMB: layer-wise trust ratio, for large batches).
        betas: the moment decay rates of AdamW and LAMB.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        grad_clip_norm: clip the global gradient norm to this value unless the Trainer sets
            ``gradient_clip_val``; None = no clipping (default 1.0, as big_vision).
        nonfinite: on a NaN/inf training loss, ``error`` raises naming the epoch and step; ``skip``
            skips the batch and logs ``train/skipped_batches`` (single device only: under DDP the ranks
            would disagree).
        ema_decay: keep an EMA of the weights with this decay (e.g. 0.9998) and evaluate with it (timm's
            ModelEmaV3 with its warmup).
    """

    model: nn.Module
    ema: Optional[ModelEma]
    #: what the task is ("classification", "multilabel", "segmentation", "pretraining"); commands read it
    task: str = ""
    #: the validation metric that picks the best checkpoint
    monitor: str = "val/loss"
    #: "max" or "min"; None = "min" for a loss, else "max"
    monitor_mode: Optional[str] = None

    def __init__(
        self,
        *,
        backbone: str = "vit_tiny_patch16_224",
        pretrained: Union[bool, str] = False,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        drop_path_rate: Optional[float] = None,
        grad_checkpointing: bool = False,
        lr: Optional[float] = None,
        weight_decay: float = 0.05,
        layer_decay: float = 1.0,
        warmup_epochs: float = 5.0,
        warmup_steps: Optional[int] = None,
        min_lr: float = 1e-6,
        scheduler: str = "cosine",
        optimizer: str = "adamw",
        betas: Tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        nesterov: bool = False,
        grad_clip_norm: Optional[float] = 1.0,
        nonfinite: str = "error",
        ema_decay: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # every task's arguments: Lightning collects the subclasses' frames too
        if scheduler not in SCHEDULERS:
            raise TaskConfigError(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise TaskConfigError(f"nonfinite: expected one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}")
        if not 0.0 < layer_decay <= 1.0:
            raise TaskConfigError(f"layer_decay: must be in (0, 1], got {layer_decay}")
        if optimizer not in OPTIMIZERS:
            raise TaskConfigError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if nesterov and not momentum:
            raise TaskConfigError(f"nesterov: needs momentum > 0, got momentum={momentum}")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise TaskConfigError(f"betas: expected two values in [0, 1), got {list(betas)}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise TaskConfigError(f"ema_decay: must be in (0, 1), got {ema_decay}")
        self.ema = None
        self.skipped_batches = 0

    # ----------------------------------------------------------------- building
    def build_backbone(self, **overrides: Any) -> nn.Module:
        """The backbone the hyper-parameters describe (``overrides`` on top, e.g. ``num_classes``)."""
        hp = self.hparams
        bb = build_backbone(hp.backbone, hp.pretrained, hp.backbone_kwargs, hp.drop_path_rate, **overrides)
        if hp.grad_checkpointing:
            bb.set_grad_checkpointing(True)
        return bb

    def attach_ema(self) -> None:
        """Start the weight EMA of ``self.model`` when ``ema_decay`` is set (call once the model is built)."""
        if self.hparams.ema_decay is not None:
            self.ema = ModelEma(self.model, self.hparams.ema_decay)

    def backbone_module(self) -> nn.Module:
        """The ViT (its params get layer-wise lr decay)."""
        return self.model

    def head_modules(self) -> List[nn.Module]:
        """Trained modules outside the backbone (decoders); lr scale 1.0."""
        return []

    @property
    def inference_model(self) -> nn.Module:
        """The EMA weights when ``ema_decay`` is set, else the trained weights."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output; the EMA weights in eval mode when ``ema_decay`` is set."""
        return (self.model if self.training else self.inference_model)(x)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "BackboneTask":
        """Lightning's ``load_from_checkpoint``, with ``weights_only=True`` and without reading the
        ``pretrained`` weights again: the checkpoint holds every weight, so it loads with nothing but itself."""
        kwargs.setdefault("weights_only", True)
        with weights_from_checkpoint():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def configure_callbacks(self) -> List[L.Callback]:
        from vitmha.tasks.reseed import ExactResume

        return [ExactResume()]

    # ----------------------------------------------------------------- optimisation
    @property
    def trains_few_parameters(self) -> bool:
        """True when only a few, fresh parameters train (linear probe, PEFT): they get the larger default lr."""
        return False

    @property
    def fixed_trainable_set(self) -> bool:
        """True when what trains is fixed once the task is built (PEFT): the optimiser then holds only those
        parameters; otherwise it holds every parameter, frozen ones included, so unfreezing later works."""
        return False

    @property
    def learning_rate(self) -> float:
        hp = self.hparams
        return hp.lr if hp.lr is not None else default_lr(hp.pretrained, self.trains_few_parameters)

    def setup(self, stage: str) -> None:
        # before a strategy wraps the model (FSDP reshapes parameters): the original shapes decide weight decay
        if getattr(self, "_param_shapes", None) is None:
            self._param_shapes = param_shapes(self.backbone_module(), self.head_modules())

    def configure_optimizers(self) -> Dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.backbone_module(), self.head_modules(), lr=self.learning_rate,
                              weight_decay=hp.weight_decay, layer_decay=hp.layer_decay,
                              trainable_only=self.fixed_trainable_set, shapes=getattr(self, "_param_shapes", None))
        return build_optimizer(self, groups, lr=self.learning_rate, scheduler=hp.scheduler,
                               warmup_epochs=hp.warmup_epochs, warmup_steps=hp.warmup_steps, min_lr=hp.min_lr,
                               optimizer=hp.optimizer, momentum=float(hp.momentum), nesterov=bool(hp.nesterov),
                               betas=tuple(hp.betas))

    def current_peak_lr(self) -> float:
        """The largest lr over the param groups now (the head's, under layer decay)."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return max((g["lr"] for g in optimizers[0].param_groups), default=0.0) if optimizers else 0.0

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        # the Trainer's gradient_clip_val wins; otherwise the task's grad_clip_norm (global L2 norm)
        if gradient_clip_val is None and self.hparams.grad_clip_norm:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.grad_clip_norm, "norm"
        if not gradient_clip_val:
            return
        root = self.trainer.strategy.model if self._trainer is not None else None
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
            self.ema.update(self.model, step=self.global_step)

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

    def log_train(self, loss: torch.Tensor, batch_size: int) -> None:
        """``train/loss`` and ``train/lr`` of a training step."""
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.current_peak_lr(), on_step=True, on_epoch=False, batch_size=batch_size)

    def on_train_epoch_start(self) -> None:
        self.skipped_batches = 0

    def on_train_epoch_end(self) -> None:
        if self.hparams.nonfinite == "skip":
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=False, on_epoch=True,
                     reduce_fx="sum", sync_dist=True)
            if self.skipped_batches:
                warnings.warn(f"epoch {self.current_epoch}: skipped {self.skipped_batches} batch(es) with a "
                              "non-finite loss", RuntimeWarning, stacklevel=1)

    # ----------------------------------------------------------------- what the commands ask a task
    def predict_probs(self, images: Sequence[Any], pre: Any) -> List[torch.Tensor]:
        """Per image (as ``vitmha.inference.read_image`` gives it) the task's probabilities at the image's own
        resolution: (C,) for classifiers, (K, H, W) for segmenters. Tasks that predict implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not predict labels")

    def describe(self, probs: torch.Tensor, names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """One image's prediction in words and arrays from its ``predict_probs`` output."""
        raise NotImplementedError(f"{type(self).__name__} does not predict labels")

    def prediction_sink(self, output_dir: str, names: Optional[Sequence[str]] = None, top_k: int = 5,
                        suffix: str = "", alpha: float = 0.5) -> Any:
        """The writer of this task's prediction files (see :mod:`vitmha.predictions`)."""
        raise NotImplementedError(f"{type(self).__name__} does not predict labels")

    def evaluation_report(self, class_names: Optional[Sequence[str]], prefix: str, trainer: Any = None,
                          **options: Any) -> Any:
        """The report :class:`vitmha.reports.EvaluationReport` fills from this task's eval steps, or None."""
        return None


class SupervisedTask(BackboneTask):
    """Base of the tasks trained with labels: :class:`BackboneTask`'s options and these.

    Args:
        num_classes: number of classes (the CLI links it from the data module).
        freeze_backbone: train the head only (linear probe).
        freeze_blocks: keep the patch embedding, position embedding, prefix tokens and the first N blocks
            of the backbone frozen (no gradient is computed through them, so a step is cheaper); 0 = off.
        unfreeze_at_epoch: with ``freeze_backbone``, train everything from this epoch on. Under DDP the
            unfrozen parameters are not synchronised: use it on one device.
        peft: parameter-efficient fine-tuning, e.g. ``{method: lora, r: 8, alpha: 16, targets: [q, v]}``:
            methods ``lora``/``dora`` (keys r, alpha, targets of q k v proj fc1 fc2, dropout, rslora,
            norms), ``bitfit`` (norms), ``vpt`` (tokens, dropout, norms), ``adapter`` (hidden, scale,
            dropout, norms), ``linear_probe`` (= freeze_backbone) and ``full``; the backbone is frozen but
            the method's parameters and the head (and the norms with ``norms: true``); see vitmha.peft.
            None = full fine-tuning.
        class_weights: per-class weights of the training loss, for rare classes: None (all 1), ``auto``
            (inverse frequency of the train split's labels, pixels for a segmenter, positives for a
            multi-label task, scaled to average 1 over the classes present), ``effective`` (Cui et al.'s
            effective number of samples, beta 0.999: a milder up-weighting) or a list of ``num_classes``
            weights. ``auto``/``effective`` are computed once when fit starts, from the data module's
            ``train_class_counts()``, logged, and saved in the checkpoint.
    """

    def __init__(self, *, num_classes: int = 10, freeze_backbone: bool = False, freeze_blocks: int = 0,
                 unfreeze_at_epoch: Optional[int] = None, peft: Optional[Dict[str, Any]] = None,
                 class_weights: Optional[Union[str, List[float]]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from vitmha.peft import PeftError, parse_peft

        if num_classes < 1:
            raise TaskConfigError(f"num_classes: must be >= 1, got {num_classes}")
        #: the checked ``peft`` spec; None for plain fine-tuning (``peft`` None or ``{method: full}``)
        self.peft_spec = parse_peft(peft)
        if self.uses_peft:
            for key, on in (("freeze_backbone", freeze_backbone), ("freeze_blocks", freeze_blocks),
                            ("unfreeze_at_epoch", unfreeze_at_epoch is not None)):
                if on:
                    raise PeftError(f"peft.method {self.peft_spec.method} freezes the backbone itself; "
                                    f"{key} does not apply (use peft {{method: linear_probe}} or full fine-tuning)")
        if unfreeze_at_epoch is not None and not self.freezes_backbone:
            raise TaskConfigError("unfreeze_at_epoch: needs freeze_backbone=True")
        if int(freeze_blocks or 0) < 0:
            raise TaskConfigError(f"freeze_blocks: must be >= 0, got {freeze_blocks}")
        from vitmha.tasks.class_weights import init_class_weights

        init_class_weights(self, num_classes)

    def finish_backbone(self, bb: nn.Module) -> nn.Module:
        """``bb`` with the task's PEFT method applied."""
        from vitmha.peft import apply_peft

        return apply_peft(bb, self.peft_spec)

    def finish_init(self) -> None:
        """Call at the end of a subclass's ``__init__``, once ``self.model`` is built: checks ``freeze_blocks``
        against the depth, freezes what the options freeze (so the model summary counts it), starts the EMA."""
        from vitmha.tasks.freezing import apply_freeze, leading_parameters

        leading_parameters(self, int(self.hparams.freeze_blocks or 0))  # fails now when the backbone is shallower
        apply_freeze(self, epoch=0)
        self.attach_ema()

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

    @property
    def trains_few_parameters(self) -> bool:
        return self.freezes_backbone or self.uses_peft

    @property
    def fixed_trainable_set(self) -> bool:
        return self.uses_peft

    def frozen_parameters(self) -> List[nn.Parameter]:
        """Parameters frozen by ``freeze_backbone`` (the backbone's, its classifier head excepted)."""
        return [p for n, p in self.backbone_module().named_parameters() if not n.startswith("head.")]

    def frozen_modules(self) -> List[nn.Module]:
        """Modules kept in eval mode while frozen (no dropout/drop-path)."""
        return [self.backbone_module()]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            from vitmha.tasks.class_weights import compute_class_weights
            from vitmha.tasks.freezing import apply_freeze

            if isinstance(self.hparams.class_weights, str):
                compute_class_weights(self)
            apply_freeze(self, epoch=self.current_epoch)

    def on_train_epoch_start(self) -> None:
        from vitmha.tasks.freezing import apply_freeze

        super().on_train_epoch_start()
        apply_freeze(self, epoch=self.current_epoch)

    def train(self, mode: bool = True) -> "SupervisedTask":
        super().train(mode)
        if mode and getattr(self, "backbone_frozen", False):
            for m in self.frozen_modules():
                m.eval()
            for m in self.head_modules():
                m.train()
        return self

    def loss_weight(self) -> Optional[torch.Tensor]:
        """The per-class loss weights (C,), or None (no ``class_weights``, or ``auto`` not computed yet)."""
        w = getattr(self, "class_weight", None)
        return w if w is not None and bool(torch.isfinite(w).all()) else None

    def train_loss_weight(self) -> Optional[torch.Tensor]:
        """:meth:`loss_weight` for a training step: an error when ``auto`` weights were never computed."""
        w = self.loss_weight()
        if w is None and self.hparams.class_weights is not None:
            raise TaskConfigError(f"class_weights: {self.hparams.class_weights!r} weights were never computed "
                                  "(they are computed in setup('fit') from the data module)")
        return w
