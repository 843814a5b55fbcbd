"""Robustness of a trained task: its metric under image corruptions and adversarial attacks.

Everything happens in **pixel space**: a batch the data module normalised is taken back to pixels
(``x * std + mean``, the image after the eval resize, values in [0, 1]), corrupted or attacked there, clamped
to [0, 1] and normalised again for the model. The corruptions are written here with torch (the blur is
torchvision's, JPEG Pillow's encoder); the five severity levels of each are in :data:`CORRUPTIONS`, in [0, 1]
intensity units or pixels. The attacks, FGSM and PGD (L∞), take ε in [0, 1] pixel units (``8/255`` = eight
grey levels of an 8-bit image) and differentiate through the normalisation; classification attacks maximise
the cross-entropy of the task's evaluation output, segmentation attacks the per-pixel cross-entropy over the
pixels whose target is not ``ignore_index``.

The model output is the task's own evaluation function (``ImageClassifier.eval_log_probs``, with the EMA
weights and mirror TTA when the run uses them; ``SemanticSegmenter.predict_logits``, with sliding windows)
and the metric is the one it logs, with the same torchmetrics settings, so the clean row equals the logged
``val/acc`` / ``test/miou`` of the same images. Random draws (noise, PGD's start) are seeded per
(seed, perturbation, level or ε, batch): a sweep is deterministic, and a row does not depend on which
other rows run (the default and the full sweep agree on the rows they share). A sweep scores the whole
split unless ``RobustnessSpec(subset=N)`` cuts it to the first N samples; the result, its CSV, JSON and plot
title say which (:meth:`RobustnessResult.describe`).
"""
from __future__ import annotations

import csv
import io
import math
import os
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RobustnessError", "Corruption", "CORRUPTIONS", "ATTACKS", "PERTURBATIONS", "DEFAULT_LEVELS", "FULL_LEVELS",
    "DEFAULT_EPS", "FULL_EPS", "gaussian_noise", "gaussian_blur", "jpeg", "brightness", "contrast",
    "corrupt",
    "to_pixels", "to_model", "fgsm", "pgd", "attack_loss", "parse_perturbations", "parse_eps", "RobustnessSpec",
    "check_task", "robustness_sweep", "format_table", "write_csv", "write_json", "save_robustness_plot",
]


class RobustnessError(ValueError):
    """A bad robustness setting (unknown perturbation, ε outside [0, 1], ...): a user error."""


# ------------------------------------------------------------------------------------------ corruptions
def gaussian_noise(x: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixels (B,C,H,W) in [0, 1] plus N(0, sigma²) per pixel and channel, clamped to [0, 1]; sigma 0 = x.
    The noise is drawn on the CPU from ``generator``, so it is the same on every device."""
    if sigma == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred per channel by a Gaussian of standard deviation ``sigma`` pixels: torchvision's
    ``gaussian_blur`` with radius ceil(3 sigma) (at most the shorter side minus one) and mirrored edges
    (reflect-101: OpenCV's ``BORDER_REFLECT_101``, scipy's ``mode="mirror"``); sigma 0 = x. vitmha's one
    Gaussian blur: this corruption and the blurred baseline of vitmha.explain."""
    if sigma < 0:
        raise RobustnessError(f"Gaussian blur: sigma {sigma} is negative")
    r = min(math.ceil(3 * sigma), x.shape[-2] - 1, x.shape[-1] - 1)
    if sigma == 0 or r < 1:
        return x
    from torchvision.transforms.v2.functional import gaussian_blur as tv_gaussian_blur

    return tv_gaussian_blur(x, [2 * r + 1, 2 * r + 1], [float(sigma), float(sigma)])


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image saved as an 8-bit JPEG of ``quality`` (1-95, Pillow's encoder, its default 4:2:0 chroma
    subsampling) and decoded; quality None = x. (JPEG is lossy at every quality: there is no identity.)"""
    if quality is None:
        return x
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("RGB")))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255
    return y


def brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Pixels shifted by ``delta`` (in [0, 1] units, all channels) and clamped to [0, 1]; delta 0 = x."""
    if delta == 0:
        return x
    return (x + delta).clamp(0, 1)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Pixels pulled towards each image's mean grey level: ``(x - m) * factor + m``, clamped; factor 1 = x."""
    if factor == 1:
        return x
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * factor + m).clamp(0, 1)


@dataclass(frozen=True)
class Corruption:
    """A corruption and its five severity levels (the value of ``parameter`` at levels 1..5)."""

    name: str
    parameter: str
    unit: str
    levels: Tuple[float, ...]
    fn: Callable[..., torch.Tensor]
    random: bool = False

    def __call__(self, x: torch.Tensor, level: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if level == 0:
            return x
        value = self.levels[level - 1]
        return self.fn(x, value, generator) if self.random else self.fn(x, value)


#: name -> Corruption; levels in pixel space at the model's input resolution (after the eval resize)
CORRUPTIONS: Dict[str, Corruption] = {c.name: c for c in (
    Corruption("gaussian_noise", "sigma", "[0,1] intensity", (0.03, 0.06, 0.10, 0.15, 0.25), gaussian_noise, True),
    Corruption("gaussian_blur", "sigma", "pixels", (0.5, 0.75, 1.0, 1.5, 2.0), gaussian_blur),
    Corruption("jpeg", "quality", "JPEG quality", (75, 50, 30, 20, 10), jpeg),
    Corruption("brightness", "delta", "[0,1] intensity", (0.1, 0.2, 0.3, 0.4, 0.5), brightness),
    Corruption("contrast", "factor", "x contrast", (0.75, 0.5, 0.35, 0.2, 0.1), contrast),
)}
ATTACKS: Tuple[str, ...] = ("fgsm", "pgd")
PERTURBATIONS: Tuple[str, ...] = tuple(CORRUPTIONS) + ATTACKS
DEFAULT_LEVELS: Tuple[int, ...] = (1, 3, 5)
FULL_LEVELS: Tuple[int, ...] = (1, 2, 3, 4, 5)
FULL_EPS: Tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
DEFAULT_EPS: Tuple[float, ...] = (1 / 255, 4 / 255, 16 / 255)


def corrupt(x: torch.Tensor, name: str, level: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixels ``x`` (B,C,H,W) in [0, 1] under corruption ``name`` at severity ``level`` (0 = x, 1..5)."""
    if name not in CORRUPTIONS:
        raise RobustnessError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    if not 0 <= int(level) <= 5:
        raise RobustnessError(f"{name}: severity level {level} is not in 0..5")
    return CORRUPTIONS[name](x, int(level), generator)


# ------------------------------------------------------------------------------------------ attacks
def _stats(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return m, s


def to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised batch (B,3,H,W) back to pixels: ``x * std + mean``."""
    m, s = _stats(x, mean, std)
    return x * s + m


def to_model(p: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixels (B,3,H,W) normalised for the model: ``(p - mean) / std``."""
    m, s = _stats(p, mean, std)
    return (p - m) / s


#: ``loss_fn(x, y)`` of normalised images: the summed loss, or ``(loss, fooled)`` with ``fooled`` (B,) bool
#: saying which samples the model gets wrong at ``x`` (for PGD's early stop; None when not per sample)
LossFn = Callable[[torch.Tensor, torch.Tensor], Any]


def _input_grad(loss_fn: LossFn, p: torch.Tensor, y: torch.Tensor, mean,
                std) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(d loss / d pixels through the normalisation, which samples are fooled at ``p`` or None)."""
    p = p.detach().requires_grad_(True)
    with torch.enable_grad():
        out = loss_fn(to_model(p, mean, std), y)
        loss, fooled = out if isinstance(out, tuple) else (out, None)
        (grad,) = torch.autograd.grad(loss, p)
    return grad, (None if fooled is None else fooled.detach())


def _project(adv: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the ε-ball around ``p`` and the valid range [0, 1] (a clean pixel already outside [0, 1], e.g.
    after a bicubic resize, bounds the range on its side, so the ε-ball always holds)."""
    adv = torch.minimum(torch.maximum(adv, p - eps), p + eps)
    return torch.minimum(torch.maximum(adv, p.clamp(max=0)), p.clamp(min=1))


def fgsm(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, eps: float, mean: Sequence[float],
         std: Sequence[float]) -> torch.Tensor:
    """FGSM (Goodfellow et al., 2015) in pixel space: the normalised batch of ``clamp(p + eps *
    sign(d loss / d p), 0, 1)``, ``p`` = ``x``'s pixels, ``eps`` in [0, 1] pixel units; ``loss_fn(x, y)``
    takes normalised images."""
    p = to_pixels(x.detach(), mean, std)
    grad, _ = _input_grad(loss_fn, p, y, mean, std)
    return to_model(_project(p + eps * grad.sign(), p, eps), mean, std).detach()


def pgd(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, eps: float, mean: Sequence[float],
        std: Sequence[float], steps: int = 10, step_size: Optional[float] = None, random_start: bool = True,
        generator: Optional[torch.Generator] = None, early_stop: bool = False) -> torch.Tensor:
    """L∞ PGD (Madry et al., 2018) in pixel space: ``steps`` signed-gradient steps of ``step_size`` (default
    eps / 4) from a uniform random start in the ε-ball (drawn on the CPU from ``generator``), each projected
    onto the ε-ball around the clean pixels and onto [0, 1]; returns the last iterate, normalised.

    ``early_stop`` (with a ``loss_fn`` that reports ``fooled``): a sample stays at the first iterate that
    fools the model and takes no more steps, so a sample counts as broken when any iterate broke it (the
    worst case over iterates, as robust-accuracy benchmarks count it) and broken samples cost nothing."""
    step_size = eps / 4 if step_size is None else step_size
    p = to_pixels(x.detach(), mean, std)
    adv = p.clone()
    if random_start and eps > 0:
        u = torch.rand(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        adv = _project(p + (2 * u - 1) * eps, p, eps)
    active = torch.arange(len(p), device=p.device)
    for _ in range(int(steps)):
        grad, fooled = _input_grad(loss_fn, adv[active], y[active], mean, std)
        if early_stop and fooled is not None:
            active, grad = active[~fooled], grad[~fooled]
            if len(active) == 0:
                break
        adv[active] = _project(adv[active] + step_size * grad.sign(), p[active], eps)
    return to_model(adv, mean, std).detach()


def attack_loss(task: Any) -> LossFn:
    """The loss an attack on ``task`` maximises, summed over the batch: the cross-entropy of the task's
    evaluation log-probabilities, with the samples it misclassifies (classifier); or the per-pixel
    cross-entropy of its evaluation logits over the pixels whose target is not ``ignore_index`` (segmenter)."""
    if getattr(task, "task", None) == "segmentation":
        ignore = int(task.hparams.ignore_index)
        return lambda x, y: F.cross_entropy(task.predict_logits(x).float(), y, ignore_index=ignore, reduction="sum")

    def loss(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logp = task.eval_log_probs(x)
        return F.nll_loss(logp, y, reduction="sum"), logp.argmax(-1) != y

    return loss


# ------------------------------------------------------------------------------------------ settings
def parse_perturbations(names: Any) -> Tuple[str, ...]:
    """Perturbation names from a list or a comma-separated string (``all`` = every one), checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names or [])
    if "all" in names:
        return PERTURBATIONS
    bad = [n for n in names if n not in PERTURBATIONS]
    if bad:
        raise RobustnessError(f"unknown corruption {bad[0]!r}; expected any of {', '.join(PERTURBATIONS)} (or all)")
    if not names:
        raise RobustnessError("no corruption or attack named")
    return tuple(dict.fromkeys(names))


def parse_eps(values: Any) -> Tuple[float, ...]:
    """ε values in [0, 1] pixel units from a list or a comma-separated string; ``4/255`` is allowed."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    out = []
    for v in list(values or []):
        try:
            e = float(Fraction(v)) if isinstance(v, str) else float(v)
        except (ValueError, ZeroDivisionError):
            raise RobustnessError(f"ε {v!r} is not a number (in [0, 1] pixel units, e.g. 0.0157 or 4/255)") from None
        if not math.isfinite(e) or e < 0:
            raise RobustnessError(f"ε {v} is negative; ε is in [0, 1] pixel units (e.g. 4/255)")
        if e > 1:
            raise RobustnessError(f"ε {v} is above 1; ε is in [0, 1] pixel units (for 8 grey levels write 8/255)")
        out.append(e)
    if not out:
        raise RobustnessError("no ε given")
    return tuple(out)


@dataclass
class RobustnessSpec:
    """What a sweep runs. ``levels``: severity levels (1..5) of each corruption; ``eps``: attack strengths in
    [0, 1] pixel units; ``subset``: the first N samples of the split, the same for every row (None or 0: the
    whole split, the default)."""

    perturbations: Tuple[str, ...] = PERTURBATIONS
    levels: Tuple[int, ...] = DEFAULT_LEVELS
    eps: Tuple[float, ...] = DEFAULT_EPS
    pgd_steps: int = 10
    pgd_step_size: Optional[float] = None  # eps / 4
    pgd_random_start: bool = True
    pgd_early_stop: bool = True  # classifiers: a sample fooled by any iterate counts as fooled
    subset: Optional[int] = None
    seed: int = 0

    @classmethod
    def create(cls, full: bool = False, perturbations: Any = None, eps: Any = None, **kwargs: Any) -> "RobustnessSpec":
        """The default (3 levels, 3 ε) or ``full`` (5 and 5) sweep; raises RobustnessError on a bad value."""
        spec = cls(perturbations=parse_perturbations(perturbations) if perturbations is not None else PERTURBATIONS,
                   levels=FULL_LEVELS if full else DEFAULT_LEVELS,
                   eps=parse_eps(eps) if eps is not None else (FULL_EPS if full else DEFAULT_EPS), **kwargs)
        if spec.subset is not None and int(spec.subset) < 0:
            raise RobustnessError(f"subset {spec.subset} is negative (0 = the whole split)")
        if int(spec.pgd_steps) < 1:
            raise RobustnessError(f"pgd_steps {spec.pgd_steps}: expected at least 1")
        return spec


# ------------------------------------------------------------------------------------------ the sweep
def _generator(seed: int, name: str, level: int, batch: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) & (2**32 - 1), zlib.crc32(name.encode()), int(level), int(batch)])
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))


class _Scorer:
    """The metric the task logs, accumulated over batches: ``acc`` (classifier, the task's own
    torchmetrics collection) or ``miou`` (segmenter, from the confusion matrix, cast to float32 as logged)."""

    def __init__(self, task: Any, prefix: str, device: torch.device) -> None:
        self.segmentation = getattr(task, "task", None) == "segmentation"
        k = int(task.hparams.num_classes)
        if self.segmentation:
            from torchmetrics.classification import MulticlassConfusionMatrix

            self.metric = MulticlassConfusionMatrix(k, ignore_index=int(task.hparams.ignore_index)).to(device)
            self.name = f"{prefix}miou"
        else:
            from vitmha.tasks.classification import classification_metrics

            self.metric = classification_metrics(k, prefix).to(device)
            self.name = f"{prefix}acc"
        self.samples = 0

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        self.samples += int(y.shape[0])
        if self.segmentation:
            self.metric.update(out.argmax(1), y)
        else:
            self.metric.update(out, y)

    def compute(self) -> float:
        if self.segmentation:
            from vitmha.tasks.segmentation import segmentation_scores

            return float(segmentation_scores(self.metric.compute())["miou"].float())
        return float(self.metric.compute()[self.name])


@dataclass
class Row:
    """One line of the robustness table."""

    perturbation: str
    kind: str  # clean | corruption | attack
    level: int
    parameter: str
    value: float
    metric: str
    score: float
    samples: int

    def setting(self) -> str:
        if self.kind == "clean":
            return "-"
        if self.kind == "attack":
            return f"eps={self.value * 255:g}/255={self.value:.4f}"
        return f"{self.parameter}={self.value:g}"


@dataclass
class RobustnessResult:
    """The rows of a sweep, the metric's logged name, the samples per row, whether they are a ``subset`` (the
    first ``samples`` of a split that has more, ``split_samples`` when the loader knows its dataset's size)
    and the sweep's wall time."""

    rows: List[Row] = field(default_factory=list)
    metric: str = ""
    samples: int = 0
    seconds: float = 0.0
    spec: Optional[RobustnessSpec] = None
    subset: bool = False
    split_samples: Optional[int] = None

    def clean(self) -> float:
        return next(r.score for r in self.rows if r.kind == "clean")

    def describe(self) -> str:
        """Which samples the rows score, e.g. ``the whole split (360 samples)`` or ``a subset: the first 100
        of 360 samples``."""
        if not self.subset:
            return f"the whole split ({self.samples} samples)"
        of = f" of {self.split_samples}" if self.split_samples is not None else ""
        return f"a subset: the first {self.samples}{of} samples"


class _Take:
    """(x, y) of the first ``limit`` samples of ``batches`` (0 = all), the last batch cut short; ``cut`` says,
    once iterated, whether the batches held more samples than were taken."""

    def __init__(self, batches: Iterable[Any], limit: int) -> None:
        self.batches, self.limit, self.cut = batches, int(limit), False

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for batch in self.batches:
            x, y = batch[0], batch[1]
            if self.limit:
                if seen >= self.limit:
                    self.cut = True
                    return
                if seen + len(y) > self.limit:
                    x, y = x[:self.limit - seen], y[:self.limit - seen]
                    self.cut = True
            seen += len(y)
            yield x, y


def check_task(task: Any) -> str:
    """``"classification"`` or ``"segmentation"``; RobustnessError for another kind of task."""
    kind = getattr(task, "task", None)
    if kind not in ("classification", "segmentation"):
        raise RobustnessError(f"a {kind or type(task).__name__} task: the robustness sweep handles classifiers "
                              "(accuracy) and segmenters (mIoU)")
    return kind


def robustness_sweep(task: Any, batches: Iterable[Any], mean: Sequence[float], std: Sequence[float],
                     spec: Optional[RobustnessSpec] = None, prefix: str = "test/",
                     device: Optional[torch.device] = None) -> RobustnessResult:
    """The task's metric (``acc`` or ``miou``) on every sample of ``batches`` (an eval loader of normalised
    (x, y) batches made with ``mean``/``std``), or on the first ``spec.subset``: clean, under every corruption
    level and under FGSM and PGD at every ε. One pass over the data; the task is put in eval mode."""
    import time

    spec = spec or RobustnessSpec()
    device = torch.device(device) if device is not None else next(task.parameters()).device
    task = task.to(device).eval()
    segmentation = check_task(task) == "segmentation"
    evaluate = task.predict_logits if segmentation else task.eval_log_probs
    loss_fn = attack_loss(task)
    keys: List[Tuple[str, int, float]] = [("clean", 0, 0.0)]
    keys += [(n, lv, float(CORRUPTIONS[n].levels[lv - 1])) for n in spec.perturbations if n in CORRUPTIONS
             for lv in spec.levels]
    keys += [(n, i + 1, float(e)) for n in spec.perturbations if n in ATTACKS for i, e in enumerate(spec.eps)]
    scorers = {k: _Scorer(task, prefix, device) for k in keys}
    start = time.perf_counter()
    taken = _Take(batches, spec.subset or 0)
    for b, (x, y) in enumerate(taken):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            scorers[keys[0]].update(evaluate(x), y)
            p = to_pixels(x, mean, std)
        for key in keys[1:]:
            name, level, value = key
            if name in CORRUPTIONS:
                with torch.no_grad():
                    xc = to_model(corrupt(p, name, level, _generator(spec.seed, name, level, b)), mean, std)
            elif name == "fgsm":
                xc = fgsm(loss_fn, x, y, value, mean, std)
            else:
                xc = pgd(loss_fn, x, y, value, mean, std, steps=spec.pgd_steps, step_size=spec.pgd_step_size,
                         random_start=spec.pgd_random_start, generator=_generator(spec.seed, f"pgd {value!r}", 0, b),
                         early_stop=spec.pgd_early_stop)
            with torch.no_grad():
                scorers[key].update(evaluate(xc), y)
    seconds = time.perf_counter() - start
    clean = scorers[keys[0]]
    if clean.samples == 0:
        raise RobustnessError("the split has no samples")
    dataset = getattr(batches, "dataset", None)
    split = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    result = RobustnessResult(metric=clean.name, samples=clean.samples, seconds=seconds, spec=spec,
                              subset=taken.cut, split_samples=split if taken.cut else clean.samples)
    for key, scorer in scorers.items():
        name, level, value = key
        kind = "clean" if name == "clean" else ("attack" if name in ATTACKS else "corruption")
        parameter = "" if kind == "clean" else ("eps" if kind == "attack" else CORRUPTIONS[name].parameter)
        result.rows.append(Row(name, kind, level, parameter, value, scorer.name, scorer.compute(), scorer.samples))
    return result


# ------------------------------------------------------------------------------------------ output
def format_table(result: RobustnessResult) -> str:
    """The rows as an aligned text table with the drop from the clean score."""
    clean = result.clean()
    head = f"{'perturbation':<15} {'level':>5}  {'setting':<26} {result.metric:>10} {'change':>8}"
    lines = [head, "-" * len(head)]
    for r in result.rows:
        change = "" if r.kind == "clean" else f"{r.score - clean:+.4f}"
        lines.append(f"{r.perturbation:<15} {r.level:>5}  {r.setting():<26} {r.score:>10.4f} {change:>8}")
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> str:
    """``text`` to ``path`` through a temporary file in the same folder (a failed write leaves no half file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_csv(result: RobustnessResult, path: str) -> str:
    """``perturbation, kind, level, parameter, value, metric, score, change, samples, subset`` per row
    (``subset``: true when the samples are the first ``samples`` of a larger split)."""
    clean = result.clean()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["perturbation", "kind", "level", "parameter", "value", "metric", "score", "change", "samples",
                "subset"])
    for r in result.rows:
        w.writerow([r.perturbation, r.kind, r.level, r.parameter, f"{r.value:.6g}", r.metric, f"{r.score:.6f}",
                    f"{r.score - clean:.6f}", r.samples, str(result.subset).lower()])
    return _write_atomic(path, buf.getvalue())


def write_json(result: RobustnessResult, path: str) -> str:
    """The sweep as JSON: ``metric``, ``samples``, ``subset``, ``split_samples``, ``seconds``, the ``spec`` and
    the ``rows``."""
    import json
    from dataclasses import asdict

    doc = {"metric": result.metric, "samples": result.samples, "subset": result.subset,
           "split_samples": result.split_samples, "described": result.describe(), "seconds": result.seconds,
           "spec": asdict(result.spec) if result.spec is not None else None,
           "rows": [asdict(r) for r in result.rows]}
    return _write_atomic(path, json.dumps(doc, indent=2) + "\n")


def save_robustness_plot(result: RobustnessResult, path: str, title: str = "") -> str:
    """Metric against severity level per corruption (left) and against ε per attack (right); the clean
    score is level 0 / ε 0 of every line. The title ends with which samples were scored
    (:meth:`RobustnessResult.describe`)."""
    from vitmha.visualize import _pyplot, _save

    plt = _pyplot()
    clean = result.clean()
    corr = [n for n in dict.fromkeys(r.perturbation for r in result.rows if r.kind == "corruption")]
    att = [n for n in dict.fromkeys(r.perturbation for r in result.rows if r.kind == "attack")]
    panels = [p for p in (("corruption", corr), ("attack", att)) if p[1]]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (kind, names) in zip(axes[0], panels):
        for i, name in enumerate(names):
            rows = [r for r in result.rows if r.perturbation == name]
            if kind == "corruption":
                xs = [0] + [r.level for r in rows]
                label = f"{name} ({CORRUPTIONS[name].parameter} " + ", ".join(f"{r.value:g}" for r in rows) + ")"
            else:
                xs = [0.0] + [r.value * 255 for r in rows]
                label = name.upper()
            ax.plot(xs, [clean] + [r.score for r in rows], "-", marker="osD^v"[i % 5], color=cmap(i % 10), lw=1.5,
                    ms=4, alpha=0.85, label=label)
        if kind == "corruption":
            ax.set_xlabel("severity level (0 = clean)")
            ax.set_xticks(range(6))
            ax.set_title("corruptions (pixel space)")
        else:
            ax.set_xlabel("ε (×1/255 of the [0, 1] pixel range)")
            spec = result.spec or RobustnessSpec()
            step = "ε/4" if spec.pgd_step_size is None else f"{spec.pgd_step_size * 255:g}/255"
            ax.set_title(f"L∞ attacks (PGD: {spec.pgd_steps} steps of {step})" if "pgd" in names else "L∞ attacks")
        ax.set_ylabel(f"{result.metric} ({result.samples} samples{', a subset' if result.subset else ''})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{title}: {result.describe()}" if title else result.describe(), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
