"""Knowledge distillation from a teacher (DeiT, Touvron et al. 2021): the ``distill`` option of the classifiers.

The training loss becomes ``(1 - alpha) * task_loss + alpha * distill_loss``: the task's own loss on the labels
(class weights, label smoothing, focal loss and mixup's soft targets included) and, on the same batch,

- ``soft``: ``KL(softmax(t / tau) || softmax(s / tau)) * tau**2`` averaged over the batch (Hinton et al.;
  timm's ``LogitDistillationTask``); for a multi-label task the per-class Bernoulli KL, averaged like BCE;
- ``hard``: the cross-entropy to the teacher's argmax (DeiT's hard distillation); multi-label: the BCE to the
  teacher's labels (its probabilities above its thresholds).

The teacher is a vitmha task checkpoint (its own evaluation: EMA weights, mirror TTA) or a timm name with
``teacher_pretrained`` weights. It runs in eval mode under ``torch.no_grad`` on the student's (augmented, mixed)
batch, re-normalised to its own mean/std and resized to its image size when they differ; being deterministic,
a resumed run stays bitwise equal to one that never stopped. It is loaded when ``fit`` starts and kept out of
the task's modules, so it is never trained, never saved in the student's checkpoints (only its path or name,
in the hyper-parameters), and a student checkpoint loads without it. ``token: true`` trains a distilled
architecture (``deit_*_distilled_patch16_224``: ``dist_token``, ``head_dist``): the class head learns the labels,
the distillation head the teacher, and inference averages the two heads (timm's ``TokenDistillationTask``).

Why not timm's tasks themselves: they own the student and compute the label loss with a criterion of their
own; here the label loss is the vitmha task's, so only the distillation term is computed here (tested equal
to timm's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitmha.tasks.base import TaskConfigError

KINDS = ("soft", "hard")
KEYS = ("teacher", "teacher_pretrained", "teacher_kwargs", "kind", "alpha", "tau", "token")


# ------------------------------------------------------------------------------------------------ losses
def soft_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``KL(softmax(teacher / tau) || softmax(student / tau)) * tau**2``, summed over classes, averaged over
    the batch: (B, C) logits (or log-probabilities) of each."""
    s = F.log_softmax(student.float() / tau, dim=-1)
    t = F.log_softmax(teacher.float() / tau, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * (tau * tau)


def hard_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the (B, C) student logits to the teacher's argmax."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=-1))


def soft_binary_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Multi-label: the KL between the teacher's and the student's Bernoulli per class (probabilities
    ``sigmoid(logit / tau)``), averaged over the (B, C) elements like BCE, times ``tau**2``."""
    s, t = student.float() / tau, teacher.float() / tau
    pt = t.sigmoid()
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * (tau * tau)


def hard_binary_distillation_loss(student: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
    """Multi-label: BCE of the (B, C) student logits to the teacher's 0/1 labels."""
    return F.binary_cross_entropy_with_logits(student.float(), teacher_labels.float())


# ------------------------------------------------------------------------------------------------ the option
@dataclass(frozen=True)
class DistillSpec:
    """A checked ``distill`` option (see the module doc)."""

    teacher: str
    teacher_pretrained: Union[bool, str] = True
    teacher_kwargs: Optional[Dict[str, Any]] = None
    kind: str = "soft"
    alpha: float = 0.5
    tau: float = 1.0
    token: bool = False


def parse_distill(value: Optional[Mapping[str, Any]]) -> Optional[DistillSpec]:
    """The ``distill`` option as a :class:`DistillSpec` (None when not set); TaskConfigError naming the key."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TaskConfigError(f"distill: expected a mapping such as {{teacher: teacher.ckpt, kind: soft}}, got {value!r}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise TaskConfigError(f"distill.{unknown[0]}: unknown key; expected any of {', '.join(KEYS)}")
    teacher = value.get("teacher")
    if not isinstance(teacher, (str, os.PathLike)) or not str(teacher).strip():
        raise TaskConfigError("distill.teacher: expected a vitmha checkpoint path or a timm model name")
    kind = str(value.get("kind", "soft"))
    if kind not in KINDS:
        raise TaskConfigError(f"distill.kind: expected soft or hard, got {kind!r}")
    try:
        alpha, tau = float(value.get("alpha", 0.5)), float(value.get("tau", 1.0))
    except (TypeError, ValueError):
        raise TaskConfigError(f"distill.alpha/tau: expected numbers, got {value.get('alpha')!r}, "
                              f"{value.get('tau')!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise TaskConfigError(f"distill.alpha: the weight of the distillation loss must be in [0, 1], got {alpha}")
    if not tau > 0:
        raise TaskConfigError(f"distill.tau: the temperature must be > 0, got {tau}")
    kwargs = value.get("teacher_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TaskConfigError(f"distill.teacher_kwargs: expected a mapping of create_backbone overrides, got {kwargs!r}")
    token = value.get("token", False)
    if not isinstance(token, bool):
        raise TaskConfigError(f"distill.token: expected true or false, got {token!r}")
    pretrained = value.get("teacher_pretrained", True)
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TaskConfigError(f"distill.teacher_pretrained: expected true, false or a weights file, got {pretrained!r}")
    return DistillSpec(str(teacher), pretrained if isinstance(pretrained, bool) else os.fspath(pretrained),
                       dict(kwargs) if kwargs else None, kind, alpha, tau, token)


def _looks_like_file(name: str) -> bool:
    return os.path.isfile(os.path.expanduser(name)) or name.endswith((".ckpt", ".pt", ".pth")) or os.sep in name


# ------------------------------------------------------------------------------------------------ the teacher
class Teacher:
    """A frozen teacher: ``module`` (eval mode, no gradients), how to get its logits, and the inputs it takes.

    Args:
        module: the teacher network (a vitmha task or a bare backbone).
        logits: ``logits(module, x)`` -> (B, C) logits (or log-probabilities) of normalised images.
        mean, std: the normalisation its run used.
        image_size: the side it was trained at (None: any).
        num_classes: its outputs.
        classes: its class names, when known.
        thresholds: (C,) label thresholds of a multi-label teacher.
    """

    def __init__(self, module: nn.Module, logits: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 mean: Tuple[float, ...], std: Tuple[float, ...], image_size: Optional[int], num_classes: int,
                 classes: Optional[list] = None, thresholds: Optional[torch.Tensor] = None) -> None:
        self.module = module.eval().requires_grad_(False)
        self._logits = logits
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.image_size = image_size
        self.num_classes = int(num_classes)
        self.classes = classes
        self.thresholds = thresholds

    def inputs(self, x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
        """The student's batch ``x`` (normalised with ``mean``/``std``) as the teacher takes it: re-normalised
        to the teacher's statistics, grey replicated for an RGB teacher, resized (bicubic) to its image size."""
        from vitmha.robustness import to_model, to_pixels

        same_stats = len(mean) == len(self.mean) and all(
            abs(float(a) - b) < 1e-7 for a, b in zip((*mean, *std), (*self.mean, *self.std)))
        size = self.image_size
        resize = size is not None and tuple(x.shape[-2:]) != (size, size)
        grey = x.shape[1] == 1 and len(self.mean) == 3
        if same_stats and not resize and not grey:
            return x
        p = to_pixels(x.float(), mean, std)
        if grey:
            p = p.expand(-1, 3, -1, -1)
        if resize:
            p = F.interpolate(p, size=(size, size), mode="bicubic", align_corners=False)
        return to_model(p, self.mean, self.std)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
        first = next(self.module.parameters(), None)
        if first is not None and first.device != x.device:
            self.module.to(x.device)
        self.module.eval()
        return self._logits(self.module, self.inputs(x, mean, std)).float()


def load_teacher(spec: DistillSpec, kind: str) -> Teacher:
    """The teacher ``spec`` names, for a student task of ``kind``; TaskConfigError naming it when it cannot be
    read or is another kind of model."""
    from vitmha.inference import ToolError

    name = spec.teacher
    try:
        if _looks_like_file(name):
            return _checkpoint_teacher(os.path.expanduser(name), kind)
        return _timm_teacher(spec, kind)
    except TaskConfigError:
        raise
    except (ToolError, OSError, ValueError, RuntimeError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise TaskConfigError(f"distill.teacher: {name}: {msg[:400]}") from None


def _checkpoint_teacher(path: str, kind: str) -> Teacher:
    from vitmha.inference import load_task, preprocess_config, read_checkpoint, task_kind

    if not os.path.isfile(path):
        raise TaskConfigError(f"distill.teacher: {path}: no such file")
    ckpt = read_checkpoint(path)
    task = load_task(path, ckpt=ckpt)
    if task_kind(task) != kind:
        raise TaskConfigError(f"distill.teacher: {path} is a {task_kind(task)} task; the student is a {kind} task")
    pre = preprocess_config(task, ckpt)
    if kind == "multilabel":
        def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return torch.logit(m.eval_probs(x), eps=1e-7)
    else:
        def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m.eval_log_probs(x)  # its own evaluation (EMA, TTA); log-probabilities are logits up to a shift
    thresholds = getattr(task, "thresholds", None)
    return Teacher(task, logits, pre.mean, pre.std, pre.image_size, int(task.hparams.num_classes), pre.classes,
                   thresholds.detach().clone() if isinstance(thresholds, torch.Tensor) else None)


def _timm_teacher(spec: DistillSpec, kind: str) -> Teacher:
    from vitmha.inference import pretrained_backbone

    bb, pre = pretrained_backbone(spec.teacher, spec.teacher_pretrained, spec.teacher_kwargs)
    return Teacher(bb, lambda m, x: m(x), pre.mean, pre.std, pre.image_size, int(getattr(bb, "num_classes", 0) or 0),
                   pre.classes, None)


# ------------------------------------------------------------------------------------------------ the distiller
class Distiller:
    """What a task with ``distill`` holds: the spec, and once ``fit`` starts, the teacher. A plain object, not a
    module: the teacher is never a submodule of the task (not saved, not trained, not moved by Lightning).

    Args:
        spec: the checked option.
        kind: the student's kind of task (``classification`` or ``multilabel``).
        num_classes: the student's classes.
    """

    def __init__(self, spec: DistillSpec, kind: str, num_classes: int) -> None:
        self.spec, self.kind, self.num_classes = spec, kind, int(num_classes)
        self.teacher: Optional[Teacher] = None
        self.mean: Tuple[float, ...] = ()
        self.std: Tuple[float, ...] = ()

    @classmethod
    def create(cls, task: nn.Module, value: Optional[Mapping[str, Any]]) -> Optional["Distiller"]:
        """The distiller of ``task``'s ``distill`` option (None when not set); with ``token`` the task's model is
        put in distilled training (two outputs in training mode)."""
        spec = parse_distill(value)
        if spec is None:
            return None
        if spec.token:
            model = task.backbone_module()
            if getattr(model, "head_dist", None) is None or not hasattr(model, "set_distilled_training"):
                raise TaskConfigError(f"distill.token: {task.hparams.backbone} has no distillation token; use a "
                                      "distilled architecture (deit_tiny_distilled_patch16_224, ...)")
            model.set_distilled_training(True)
        return cls(spec, task.task, int(task.hparams.num_classes))

    def prepare(self, task: Any) -> None:
        """Load the teacher (once) and note the student's normalisation (its data module's, else its backbone's);
        TaskConfigError when the teacher's classes differ from the student's."""
        from vitmha.reports import report_mean_std

        if self.teacher is None:
            self.teacher = load_teacher(self.spec, self.kind)
        t = self.teacher
        if t.num_classes != self.num_classes:
            raise TaskConfigError(f"distill.teacher: {self.spec.teacher} has {t.num_classes} outputs, the student "
                                  f"{self.num_classes} classes")
        trainer = getattr(task, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        names = getattr(dm, "classes", None)
        if names and t.classes and [str(n) for n in names] != [str(n) for n in t.classes]:
            raise TaskConfigError(f"distill.teacher: {self.spec.teacher} was trained on the classes {list(t.classes)}, "
                                  f"the data has {list(names)}: its outputs would be read as the wrong labels")
        mean, std = report_mean_std(trainer, task)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's (B, C) logits for the student's batch ``x``."""
        if self.teacher is None:
            raise TaskConfigError("distill: the teacher is loaded when fit starts (task.setup('fit')); no teacher yet")
        return self.teacher(x, self.mean, self.std)

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The distillation term of (B, C) student and teacher logits."""
        spec = self.spec
        if self.kind == "multilabel":
            if spec.kind == "soft":
                return soft_binary_distillation_loss(student, teacher, spec.tau)
            thr = self.teacher.thresholds if self.teacher is not None and self.teacher.thresholds is not None else 0.5
            labels = teacher.sigmoid() > (thr.to(teacher) if isinstance(thr, torch.Tensor) else thr)
            return hard_binary_distillation_loss(student, labels)
        if spec.kind == "soft":
            return soft_distillation_loss(student, teacher, spec.tau)
        return hard_distillation_loss(student, teacher)

    def loss(self, task: Any, x: torch.Tensor, outputs: Any, target: torch.Tensor,
             task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``(1 - alpha) * task_loss(outputs, target) + alpha * distill``; ``outputs`` are the student's logits,
        or ``(class logits, distillation-token logits)`` with ``token``. Logs both terms."""
        if isinstance(outputs, (tuple, list)):
            main, dist = outputs
        else:
            if self.spec.token:
                raise TaskConfigError("distill.token: the model returned one output in training; it needs "
                                      "set_distilled_training(True)")
            main = dist = outputs
        a = self.spec.alpha
        label_term = task_loss(main, target)
        distill_term = self.distill_loss(dist, self.teacher_logits(x))
        trainer = getattr(task, "_trainer", None)
        if trainer is not None and trainer.training:  # inside the fit loop (not a step called by hand)
            n = x.shape[0]
            task.log("train/loss_task", label_term.detach(), on_step=True, on_epoch=False, batch_size=n)
            task.log("train/loss_distill", distill_term.detach(), on_step=True, on_epoch=False, batch_size=n)
        return (1.0 - a) * label_term + a * distill_term
