"""Combining trained models: probability ensembles, model soups and WiSE-FT.

- :class:`EnsembleTask`: several trained tasks of one kind evaluated as one LightningModule. It averages the
  members' probabilities (softmax for a classifier, per-class sigmoids for a multi-label classifier, per-pixel
  softmax for a segmenter), each member computing them its own way (EMA weights, mirror TTA, sliding windows),
  and scores the mean with the first member's metrics and report (``vitmha evaluate --checkpoint a b c``).
- Soups (Wortsman et al. 2022, *Model soups*): :func:`average_state_dicts` (the uniform soup) and
  :func:`greedy_soup` (ingredients tried in order of their validation score, each kept only when the soup's
  validation score rises: the paper's Recipe 1).
- WiSE-FT (Wortsman et al. 2022, *Robust fine-tuning of zero-shot models*): :func:`wise_ft`, θ = (1 − α)·θ₀ + α·θ₁
  between the pretrained backbone θ₀ (built from the run's own ``pretrained`` weights, as the run started) and
  the fine-tuned θ₁; the classifier head is interpolated only where the pretrained weights had one of the same
  shape (a zero-shot head), else the fine-tuned head is kept (there is no pretrained one to interpolate to).

Weight averaging needs no re-calibration for vitmha's ViTs: they have no BatchNorm, so no running statistics
go stale (:func:`batchnorm_layers` finds any a task does have). A soup is written as an ordinary task
checkpoint (:func:`fused_checkpoint`): ``vitmha test``, ``predict``, ``export`` and ``vitmha.load`` take it.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusionError", "EnsembleTask", "average_state_dicts", "greedy_soup", "GreedySoup", "wise_ft",
           "check_soup", "pretrained_task", "wise_keys", "fused_checkpoint", "save_checkpoint", "batchnorm_layers",
           "parse_alphas", "member_stats", "load_ensemble"]

StateDict = Dict[str, torch.Tensor]
#: backbone options that change training only, not the weights' meaning: members may differ in them
TRAINING_ONLY = ("drop_path_rate", "drop_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate",
                 "patch_drop_rate", "weight_init", "tome_r")
#: checkpoint entries of a training run's state, left out of a fused checkpoint (it starts no training)
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


class FusionError(ValueError):
    """Models that cannot be combined, or a bad soup/ensemble setting (one ``error:`` line on the CLI)."""


# ------------------------------------------------------------------------------------------------ state dicts
def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                        weights: Optional[Sequence[float]] = None) -> StateDict:
    """The (weighted) mean of state dicts with the same keys and shapes: floating tensors averaged (accumulated
    in float64, returned in their own dtype), other tensors (integer counters, boolean masks) the first's."""
    if not state_dicts:
        raise FusionError("no state dicts to average")
    w = [1.0] * len(state_dicts) if weights is None else [float(v) for v in weights]
    if len(w) != len(state_dicts) or sum(w) <= 0 or min(w) < 0:
        raise FusionError(f"weights {w}: expected one non-negative weight per model, summing to more than 0")
    total = sum(w)
    out: StateDict = {}
    for key, first in state_dicts[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for sd, wi in zip(state_dicts, w):
            acc += sd[key].detach().to("cpu", torch.float64) * (wi / total)
        out[key] = acc.to(first.dtype)
    return out


@dataclass
class GreedySoup:
    """What :func:`greedy_soup` did: ``order`` (indices, best first), ``alone`` (each model's own score),
    ``trials`` ((index, score of the soup with it, kept)), ``ingredients`` (kept indices), ``score`` (the soup's)
    and ``state_dict`` (the soup)."""

    order: List[int]
    alone: List[float]
    trials: List[Tuple[int, float, bool]] = field(default_factory=list)
    ingredients: List[int] = field(default_factory=list)
    score: float = float("nan")
    state_dict: StateDict = field(default_factory=dict)


def greedy_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]], score: Callable[[Mapping[str, torch.Tensor]], float],
                mode: str = "max", alone: Optional[Sequence[float]] = None) -> GreedySoup:
    """Greedy soup (Wortsman et al. 2022, Recipe 1): sort the models by their validation ``score``, start the
    soup with the best, then try each next one: keep it only when the uniform average with it scores better
    than the soup without it (a tie adds nothing and is left out). ``score(state_dict)`` must evaluate on
    held-out validation data, never on the test set; ``mode`` ``max`` (accuracy) or ``min`` (a loss); ``alone``: the models' scores if known."""
    if mode not in ("max", "min"):
        raise FusionError(f"mode: expected max or min, got {mode!r}")
    own = [float(s) for s in alone] if alone is not None else [float(score(sd)) for sd in state_dicts]
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(len(state_dicts)), key=lambda i: (-sign * own[i], i))
    result = GreedySoup(order=order, alone=own, ingredients=[order[0]], score=own[order[0]])
    for i in order[1:]:
        trial = average_state_dicts([state_dicts[j] for j in result.ingredients + [i]])
        s = float(score(trial))
        keep = sign * s > sign * result.score
        result.trials.append((i, s, keep))
        if keep:
            result.ingredients.append(i)
            result.score = s
    result.state_dict = average_state_dicts([state_dicts[j] for j in result.ingredients])
    return result


def wise_ft(finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], alpha: float,
            keys: Sequence[str]) -> StateDict:
    """WiSE-FT: ``(1 - alpha) * pretrained + alpha * finetuned`` for ``keys`` (``torch.lerp``: exact at 0 and 1),
    every other entry the fine-tuned one. alpha 0 = the pretrained weights, 1 = the fine-tuned ones."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise FusionError(f"alpha {alpha}: expected a value in [0, 1] (0 = pretrained, 1 = fine-tuned)")
    out = {k: v.detach().clone() for k, v in finetuned.items()}
    for k in keys:
        a, b = pretrained[k], finetuned[k]
        if a.is_floating_point():
            out[k] = torch.lerp(a.detach().to(b.dtype), b.detach(), float(alpha))
    return out


def parse_alphas(text: str) -> List[float]:
    """``0.5``, ``0.2,0.5,0.8`` or a sweep ``start:stop:step`` (``0:1:0.1``: 0, 0.1, ..., 1, stop included)."""
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step))
            values = [round(start + i * step, 10) for i in range(n + 1)]
            if values[-1] < stop - 1e-9:
                values.append(stop)
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise FusionError(f"--alpha {text}: expected a number, a list (0.2,0.5) or a sweep start:stop:step "
                          "(0:1:0.1)") from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if not values or bad:
        raise FusionError(f"--alpha {text}: every α must be in [0, 1] (0 = pretrained, 1 = fine-tuned)")
    return values


# ------------------------------------------------------------------------------------------------ members
def _architecture(hp: Mapping[str, Any]) -> Dict[str, Any]:
    """The hyper-parameters that define a task's weights: arch (without its pretrained tag), architecture
    overrides, classes, segmentation head; not the training options."""
    from vitmha.models.config import split_name

    kwargs = {k: v for k, v in dict(hp.get("backbone_kwargs") or {}).items() if k not in TRAINING_ONLY}
    return {"backbone": split_name(str(hp.get("backbone")))[0], "backbone_kwargs": kwargs,
            "num_classes": hp.get("num_classes"), "head": hp.get("head"), "head_kwargs": hp.get("head_kwargs")}


def check_soup(ckpts: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """FusionError naming two checkpoints whose weights cannot be averaged: another task class, architecture,
    number of classes or class names, another state-dict key or shape, or a PEFT run (averaging LoRA factors is
    not averaging the weight updates they make)."""
    from vitmha.inference import task_class_path

    def describe(ckpt: Mapping[str, Any], name: str) -> Dict[str, Any]:
        hp = ckpt.get("hyper_parameters") or {}
        dm = ckpt.get("datamodule_hyper_parameters") or {}
        if hp.get("peft") and str((hp.get("peft") or {}).get("method", "full")) != "full":
            raise FusionError(f"{name}: a peft run ({hp['peft'].get('method')}): soups and WiSE-FT average full "
                              "weights, and averaging adapter factors is not averaging the updates they make")
        return {"task": task_class_path(dict(ckpt), name).rsplit(".", 1)[-1], **_architecture(hp),
                "classes": hp.get("class_names") or dm.get("classes")}

    first = describe(ckpts[0], names[0])
    sd0 = ckpts[0]["state_dict"]
    for ckpt, name in zip(ckpts[1:], names[1:]):
        other = describe(ckpt, name)
        for key, a in first.items():
            b = other[key]
            if a != b and not (key == "classes" and (a is None or b is None)):
                raise FusionError(f"{names[0]} and {name} cannot be souped: their {key} differ ({a} vs {b})")
        sd = ckpt["state_dict"]
        for k, t in sd0.items():
            if k not in sd:
                raise FusionError(f"{names[0]} and {name} cannot be souped: {k} is missing from {name}")
            if tuple(sd[k].shape) != tuple(t.shape):
                raise FusionError(f"{names[0]} and {name} cannot be souped: {k} is {tuple(t.shape)} in one and "
                                  f"{tuple(sd[k].shape)} in the other")
        extra = sorted(set(sd) - set(sd0))
        if extra:
            raise FusionError(f"{names[0]} and {name} cannot be souped: {extra[0]} is only in {name}")


def batchnorm_layers(module: nn.Module) -> List[str]:
    """Names of the BatchNorm layers of ``module`` (their running statistics would need re-estimating after
    weight averaging; vitmha's ViTs have none)."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def pretrained_task(ckpt: Mapping[str, Any], name: str, pretrained: Any = None) -> Tuple[nn.Module, bool]:
    """The run's task as it was before training (θ₀): built from the checkpoint's hyper-parameters with its
    ``pretrained`` weights read (or ``pretrained`` instead), in eval mode; and whether the classifier head came
    from those weights (a zero-shot head of the same shape) rather than being initialised anew."""
    from vitmha.inference import _task_class, task_class_path
    from vitmha.models.weights import WeightsError
    from vitmha.tasks.base import from_scratch

    cls = _task_class(task_class_path(dict(ckpt), name))
    hp = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    if pretrained is not None:
        hp["pretrained"] = pretrained
    if from_scratch(hp.get("pretrained")):
        raise FusionError(f"{name}: the run trained from scratch (pretrained: {hp.get('pretrained')}), so there are "
                          "no pretrained weights to interpolate with; pass --pretrained WEIGHTS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            task = cls(**hp)
        except (WeightsError, FileNotFoundError, OSError) as e:
            raise FusionError(f"{name}: cannot read its pretrained weights {hp['pretrained']!r} ({e}); pass "
                              "--pretrained WEIGHTS") from None
    fresh_head = any("classifier head re-initialised" in str(w.message) for w in caught)
    for w in caught:
        if "classifier head re-initialised" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return task.eval(), not fresh_head


def wise_keys(task: nn.Module, zero_shot_head: bool) -> List[str]:
    """The state-dict keys WiSE-FT interpolates: the backbone's (and its EMA copy's), the classifier head's
    only with a zero-shot head; decoders and other new modules keep their fine-tuned weights."""
    backbone = task.backbone_module()
    model = task.model
    inner = next(n for n, m in model.named_modules() if m is backbone)
    prefixes = ["model." + (f"{inner}." if inner else "")]
    if getattr(task, "ema", None) is not None:
        prefixes.append("ema.module." + (f"{inner}." if inner else ""))
    keys = []
    for k in task.state_dict():
        for p in prefixes:
            if k.startswith(p) and (zero_shot_head or not k[len(p):].startswith("head.")):
                keys.append(k)
    return keys


def fused_checkpoint(template: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                     info: Mapping[str, Any]) -> Dict[str, Any]:
    """An ordinary task checkpoint holding ``state_dict``: the template's hyper-parameters, data module and
    version entries, without its training state (optimizer, schedules, loops), and ``vitmha_fusion``: ``info``
    (method, members, α, scores) for whoever reads it later."""
    ckpt = {k: v for k, v in template.items() if k not in TRAINING_STATE and k != "state_dict"}
    ckpt["state_dict"] = {k: v.contiguous() for k, v in state_dict.items()}
    ckpt["vitmha_fusion"] = json.loads(json.dumps(dict(info), default=str))  # plain data: weights_only loads it
    return ckpt


def save_checkpoint(ckpt: Mapping[str, Any], path: str) -> str:
    """Write ``ckpt`` atomically (a temporary file renamed into place: a failed write leaves what was there)."""
    from vitmha.callbacks import AtomicCheckpointIO

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(dict(ckpt), path)
    return path


# ------------------------------------------------------------------------------------------------ ensembles
def _renormalizer(src: Optional[Tuple[Sequence[float], Sequence[float]]],
                  dst: Optional[Tuple[Sequence[float], Sequence[float]]]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) that turn images normalised with ``src`` (mean, std) into images normalised with
    ``dst``: ``x * scale + shift``; None when they are the same (or either is unknown)."""
    if src is None or dst is None:
        return None
    m0, s0, m1, s1 = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (*src, *dst))
    if m0.shape == m1.shape and torch.allclose(m0, m1) and torch.allclose(s0, s1):
        return None
    scale, shift = s0 / s1, (m0 - m1) / s1
    return scale.float().view(1, -1, 1, 1), shift.float().view(1, -1, 1, 1)


class EnsembleTask(L.LightningModule):
    """Trained tasks of one kind as one model for ``trainer.validate``/``test``, the evaluation report and the
    robustness sweep: the mean of the members' probabilities, scored with the first member's metrics and report.

    Args:
        members: the tasks (``vitmha.inference.load_task``); same kind, classes and number of classes
            (``vitmha.inference.check_ensemble``).
        names: what to call them in the report (their checkpoint paths).
        input_stats: (mean, std) the evaluated images are normalised with (the data module's).
        member_stats: per member the (mean, std) its run normalised with; a member whose differ gets its images
            re-normalised.
    """

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str],
                 input_stats: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 member_stats: Optional[Sequence[Optional[Tuple[Sequence[float], Sequence[float]]]]] = None) -> None:
        super().__init__()
        from vitmha.inference import task_kind

        if len(members) < 1:
            raise FusionError("an ensemble needs at least one member")
        if len(names) != len(members):
            raise FusionError(f"{len(names)} names for {len(members)} members")
        kinds = {task_kind(m) for m in members}
        if len(kinds) > 1 or kinds.pop() not in ("classification", "multilabel", "segmentation"):
            raise FusionError(f"an ensemble averages classifiers, multi-label classifiers or segmenters of one kind; "
                              f"got {', '.join(sorted({task_kind(m) for m in members}))}")
        self.members = nn.ModuleList(members)
        self.names = [str(n) for n in names]
        first = members[0]
        self.task = task_kind(first)
        self.monitor = getattr(first, "monitor", "val/loss")
        self.monitor_mode = getattr(first, "monitor_mode", None)
        self.save_hyperparameters({k: v for k, v in dict(first.hparams).items() if not k.startswith("_")},
                                  logger=False)
        stats = list(member_stats) if member_stats is not None else [None] * len(members)
        self._renorm = [_renormalizer(input_stats, s) for s in stats]
        self._scores: Any = None

    @property
    def first(self) -> nn.Module:
        return self.members[0]

    @property
    def class_names(self) -> Optional[List[str]]:
        names = getattr(self.first, "class_names", None)
        return list(names) if names else None

    def describe_members(self) -> Dict[str, Any]:
        """What ``summary.json`` says about the ensemble."""
        return {"members": self.names, "combine": "mean of the members' probabilities" +
                (" per pixel" if self.task == "segmentation" else ""), "metrics_and_report_of": self.names[0]}

    # ----------------------------------------------------------------- outputs
    def _member_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        r = self._renorm[i]
        return x if r is None else x * r[0].to(x) + r[1].to(x)

    def member_probs(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One member's probabilities, computed as its own evaluation computes them: (B, C) or (B, K, H, W)."""
        if self.task == "classification":
            return member.eval_log_probs(x).exp()
        if self.task == "multilabel":
            return member.eval_probs(x)
        return member.predict_logits(x).float().softmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the members' probabilities."""
        total = None
        for i, m in enumerate(self.members):
            p = self.member_probs(m, self._member_input(i, x)).float()
            total = p if total is None else total + p
        return total / len(self.members)

    def eval_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities (classifiers: what the metrics score, as the tasks' own)."""
        return self(x).clamp_min(torch.finfo(torch.float32).tiny).log()

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel log mean probabilities (segmenters): their argmax is the ensemble's mask."""
        return self.eval_log_probs(x)

    def eval_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the first member's eval step would score: log-probabilities (classifier, segmenter) or the
        logits of the mean probabilities (multi-label)."""
        if self.task == "multilabel":
            return torch.logit(self(x), eps=1e-7)
        return self.eval_log_probs(x)

    def attack_loss(self, x: torch.Tensor, y: torch.Tensor):
        """The loss an attack maximises (see ``BackboneTask.attack_loss``), of the ensemble's output."""
        out = self.eval_log_probs(x)
        if self.task == "segmentation":
            return F.nll_loss(out, y, ignore_index=int(self.hparams.ignore_index), reduction="sum"), None
        return F.nll_loss(out, y, reduction="sum"), out.argmax(-1) != y

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.nll_loss(out, y)
        if self.task == "multilabel":
            return self.first.loss(out, y)
        return self.first.loss(out, y, self.first.loss_weight())

    # ----------------------------------------------------------------- evaluation loops
    def evaluation_report(self, class_names: Optional[Sequence[str]], prefix: str, trainer: Any = None,
                          **options: Any) -> Any:
        """The first member's report; its ``summary.json`` also says that it is an ensemble, and of what."""
        report = self.first.evaluation_report(class_names, prefix, trainer, **options)
        if report is None:
            return None
        inner = report.write
        about = self.describe_members()

        def write(output_dir: str, result: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
            files = inner(output_dir, result)
            path = files.get("summary")
            if path is not None:
                summary = json.loads(open(path).read())
                summary["ensemble"] = about
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(json.dumps(summary, indent=2) + "\n")
                os.replace(tmp, path)
            return files

        report.write = write
        return report

    def _start(self, prefix: str) -> None:
        names = self.class_names or self.hparams.get("class_names")
        self._scores = self.first.evaluation_report(names, prefix, self._trainer)
        self._scores.to(self.device)

    def _step(self, batch: Any, stage: str) -> Dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]
        out = self.eval_outputs(x)
        loss = self._loss(out, y)
        self._scores.update(out, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        return {"loss": loss, "logits": out.detach()}

    def _finish(self) -> None:
        metrics = self._scores.compute()["metrics"]
        self._scores = None
        self.log_dict({k: float(v) for k, v in metrics.items()})

    def on_validation_epoch_start(self) -> None:
        self._start("val/")

    def on_test_epoch_start(self) -> None:
        self._start("test/")

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        return self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish()

    def on_test_epoch_end(self) -> None:
        self._finish()


def member_stats(pres: Sequence[Any], names: Sequence[str], image_size: Optional[int] = None) -> List[Tuple]:
    """Per member the (mean, std) of its run; FusionError when members (or the data, ``image_size``) take
    another image size or number of channels (one data pipeline cannot feed them all)."""
    size = int(image_size or pres[0].image_size)
    for p, n in zip(pres, names):
        if int(p.image_size) != size:
            raise FusionError(f"{n} was trained on {p.image_size}-pixel images, the data gives {size}: an "
                              "ensemble's members must take one image size")
        if int(p.in_chans) != int(pres[0].in_chans):
            raise FusionError(f"{names[0]} and {n} take {pres[0].in_chans} and {p.in_chans} channels: an "
                              "ensemble's members must take one input")
    return [(tuple(p.mean), tuple(p.std)) for p in pres]


def load_ensemble(paths: Sequence[str], datamodule: Any = None,
                  first: Optional[Tuple[nn.Module, Mapping[str, Any]]] = None) -> EnsembleTask:
    """The checkpoints at ``paths`` as an :class:`EnsembleTask` fed by ``datamodule`` (its mean/std and image
    size; default the first member's): ToolError/FusionError naming them when they disagree in kind of task,
    classes, image size or channels. ``first``: the first member's (task, checkpoint dict), already loaded."""
    from vitmha.inference import check_ensemble, load_task, preprocess_config, read_checkpoint

    tasks, pres = [], []
    for i, path in enumerate(paths):
        if i == 0 and first is not None:
            task, ckpt = first
        else:
            ckpt = read_checkpoint(path)
            task = load_task(path, ckpt=ckpt)
        tasks.append(task)
        pres.append(preprocess_config(task, ckpt))
    names = [os.fspath(p) for p in paths]
    check_ensemble(tasks, pres, names)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    stats = member_stats(pres, names, getattr(datamodule, "image_size", None))
    source = (tuple(mean), tuple(std)) if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) \
        else stats[0]
    return EnsembleTask(tasks, names, source, stats)
