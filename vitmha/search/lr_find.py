"""A learning-rate range test (Smith, 2017) through the task's own optimiser.

Lightning's ``Tuner.lr_find`` sets one lr on every parameter group, which flattens vitmha's layer-wise lr
decay, and it does not work with CLI-configured optimisers (Lightning #16787). Here the task builds its
optimiser as in training (AdamW groups, weight decay rules, ``layer_decay`` scales); before each optimiser
step the sweep sets every group to ``lr * lr_scale``, with ``lr`` rising exponentially from ``min_lr`` to
``max_lr``, so the schedule and its warmup are off and the groups keep their ratios. The weights the sweep
trains are thrown away.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import lightning as L
import numpy as np

from vitmha.search.space import SearchError

__all__ = ["LrSweep", "LrFindResult", "suggest_lr", "lr_find"]


class LrSweep(L.Callback):
    """Sets the lr of every group to ``lr(step) * group["lr_scale"]`` before each optimiser step and records
    the training loss; stops after ``num_steps`` steps or once the smoothed loss passes ``diverge`` times its
    minimum."""

    def __init__(self, min_lr: float, max_lr: float, num_steps: int, diverge: float = 4.0, beta: float = 0.9) -> None:
        self.min_lr, self.max_lr, self.num_steps, self.diverge, self.beta = min_lr, max_lr, num_steps, diverge, beta
        self.lrs: List[float] = []
        self.losses: List[float] = []
        self.smoothed: List[float] = []
        self._lr: Optional[float] = None

    def lr_at(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / max(1, self.num_steps - 1))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._lr = self.lr_at(trainer.global_step)
        for group in optimizer.param_groups:
            group["lr"] = self._lr * group.get("lr_scale", 1.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or self._lr is None:
            return
        value = float(loss.detach())
        self.lrs.append(self._lr)
        self.losses.append(value)
        prev = self.smoothed[-1] * (1 - self.beta ** (len(self.smoothed))) if self.smoothed else 0.0
        avg = self.beta * prev + (1 - self.beta) * value
        self.smoothed.append(avg / (1 - self.beta ** len(self.losses)))  # bias-corrected running mean
        if not math.isfinite(value) or self.smoothed[-1] > self.diverge * min(self.smoothed):
            trainer.should_stop = True


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], skip: float = 0.1) -> float:
    """The lr where the smoothed loss falls fastest (steepest slope against log lr) before its minimum,
    ignoring the first ``skip`` fraction of the sweep. Raises SearchError with fewer than 5 finite points."""
    lrs, loss = np.asarray(lrs, float), np.asarray(smoothed, float)
    keep = np.isfinite(loss)
    lrs, loss = lrs[keep], loss[keep]
    if len(lrs) < 5:
        raise SearchError(f"lr finder: only {len(lrs)} finite loss values; lower --lr_min or raise --lr_steps")
    end = int(np.argmin(loss)) + 1
    start = min(int(len(lrs) * skip), max(0, end - 3))
    if end - start < 3:
        return float(lrs[max(0, end - 2)])  # the minimum comes too early for a slope: just before it
    slope = np.gradient(loss[start:end], np.log10(lrs[start:end]))
    return float(lrs[start + int(np.argmin(slope))])


@dataclass
class LrFindResult:
    """The sweep: lrs, raw and smoothed losses, the suggested lr, and the files written."""

    lrs: List[float]
    losses: List[float]
    smoothed: List[float]
    suggestion: float
    png: str
    csv: str


def lr_find(config_args: Sequence[str], output: str, min_lr: float = 1e-6, max_lr: float = 1.0,
            num_steps: int = 100, print_fn: Callable[[str], None] = print) -> LrFindResult:
    """Sweep the lr of the task in the config (``vitmha fit``'s arguments) over ``num_steps`` training
    steps; write ``lr_find.png`` and ``lr_find.csv`` in ``output``; return the suggestion."""
    if not 0 < min_lr < max_lr or num_steps < 5:
        raise SearchError(f"lr finder: needs 0 < --lr_min < --lr_max and --lr_steps >= 5, "
                          f"got {min_lr:g}, {max_lr:g}, {num_steps}")
    from vitmha.search.study import load_config

    parser, config = load_config(config_args)
    init = parser.instantiate_classes(parser.parse_object(config))
    model, data = init.model, init.data
    if "warmup_steps" in getattr(model, "hparams", {}):
        model.hparams.warmup_steps = 0  # the sweep sets every step's lr itself: no warmup to count epochs for
    trainer_cfg = config.get("trainer") or {}
    L.seed_everything(int(config.get("seed_everything") or 0), verbose=False)
    sweep = LrSweep(min_lr, max_lr, num_steps)
    trainer = L.Trainer(accelerator=trainer_cfg.get("accelerator") or "auto", devices=1,
                        precision=trainer_cfg.get("precision") or "32-true", max_steps=num_steps, max_epochs=-1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[sweep],
                        default_root_dir=output)
    try:
        trainer.fit(model, datamodule=data)
    except FloatingPointError:
        pass  # a non-finite loss is where a sweep ends anyway
    suggestion = suggest_lr(sweep.lrs, sweep.smoothed)
    os.makedirs(output, exist_ok=True)
    csv_path = os.path.join(output, "lr_find.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed"])
        w.writerows(zip(sweep.lrs, sweep.losses, sweep.smoothed))
    png = _plot(sweep, suggestion, os.path.join(output, "lr_find.png"))
    print_fn(f"lr finder: {len(sweep.lrs)} steps from {sweep.lrs[0]:.3g} to {sweep.lrs[-1]:.3g}; "
             f"suggested lr {suggestion:.3g} (steepest descent of the smoothed loss)\n"
             f"  plot: {png}\n  loss: {csv_path}\n"
             f"  use: --model.init_args.lr {suggestion:.3g}")
    return LrFindResult(sweep.lrs, sweep.losses, sweep.smoothed, suggestion, png, csv_path)


def _plot(sweep: LrSweep, suggestion: float, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sweep.lrs, sweep.losses, color="lightgrey", label="loss")
    ax.plot(sweep.lrs, sweep.smoothed, color="C0", label="smoothed")
    ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested {suggestion:.2g}")
    ax.set_xscale("log")
    finite = [v for v in sweep.smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * finite[0]) * 1.05)
    ax.set(xlabel="peak lr (each group: lr x its layer-decay scale)", ylabel="training loss", title="lr finder")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
