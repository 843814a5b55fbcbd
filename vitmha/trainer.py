"""``vitmha.Trainer``: a Lightning ``Trainer`` with vitmha's run defaults, the same in a script as in the CLI."""
from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar

from vitmha.callbacks import (AtomicCheckpointIO, BestCheckpoint, CpuThreads, FiniteWeights, LastCheckpoint,
                              LogInterval, RunSummary, run_loggers)
from vitmha.preemption import Preemption

__all__ = ["Trainer", "LOG_NAME", "default_callbacks"]

LOG_NAME = "lightning_logs"


def _progress_bar() -> ProgressBar:
    if sys.stdout.isatty():
        try:
            from lightning.pytorch.callbacks import RichProgressBar

            return RichProgressBar()
        except (ImportError, ModuleNotFoundError):
            pass
    return TQDMProgressBar()


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def default_callbacks(given: List[Callback], *, checkpointing: bool = True, progress_bar: bool = True,
                      cpu_threads: Optional[int] = None, log_every_n_steps: Optional[int] = None) -> List[Callback]:
    """``given`` plus every vitmha default callback of a type not among them: the best and the last
    checkpoint, the NaN/Inf guard on checkpoints, preemption handling, the evaluation report (after
    ``test``), the run summary, the CPU thread choice, the per-epoch log interval and a progress bar."""
    from vitmha.reports import EvaluationReport

    out = list(given)

    def have(kind: type) -> bool:
        return any(isinstance(c, kind) for c in out)

    if checkpointing and not have(ModelCheckpoint):
        out += [BestCheckpoint(), LastCheckpoint()]
    defaults = [(FiniteWeights, FiniteWeights), (Preemption, Preemption), (EvaluationReport, EvaluationReport),
                (RunSummary, RunSummary), (CpuThreads, lambda: CpuThreads(cpu_threads))]
    if log_every_n_steps is None:
        defaults.append((LogInterval, LogInterval))
    for kind, make in defaults:
        if not have(kind):
            out.append(make())
    if progress_bar and not have(ProgressBar):
        out.append(_progress_bar())
    return out


class Trainer(L.Trainer):
    """A Lightning ``Trainer`` with what ``vitmha fit|validate|test`` give every run, overridable piece by
    piece; every ``lightning.Trainer`` argument works as usual.

    - ``logger`` (unless given or False): CSV and TensorBoard loggers in one atomically claimed
      ``<default_root_dir>/lightning_logs/version_N/`` (metrics.csv, TensorBoard events under ``tb/``);
    - checkpoints in ``version_N/checkpoints/``: the best by the task's validation metric and ``last.ckpt``
      after every epoch, written atomically (:class:`~vitmha.callbacks.AtomicCheckpointIO`), never with
      NaN/Inf weights (unless a ``ModelCheckpoint`` is given, or ``enable_checkpointing=False``);
    - SIGTERM/SIGUSR1 during ``fit``: a resumable ``last.ckpt`` at the next batch end, then exit code 143
      (:class:`~vitmha.preemption.Preemption`);
    - after ``test``, the evaluation report in ``version_N/report_test/`` (:class:`~vitmha.reports.EvaluationReport`);
    - one summary line block after fit/validate/test; a rich progress bar on a terminal, a plain one otherwise;
    - on the CPU, intra-op threads chosen so that other processes and loader workers do not oversubscribe it;
    - training metrics logged at least once per epoch unless ``log_every_n_steps`` is given.

    A callback of the same type in ``callbacks`` replaces the default one; a ``CheckpointIO`` in
    ``plugins`` replaces the atomic writer.

    Args:
        cpu_threads: intra-op CPU threads; None chooses them per run (``VITMHA_NUM_THREADS`` also sets them).
        *args, **kwargs: ``lightning.Trainer``'s.
    """

    def __init__(self, *args: Any, cpu_threads: Optional[int] = None, **kwargs: Any) -> None:
        root = kwargs.get("default_root_dir") or os.getcwd()
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = run_loggers(root, LOG_NAME)
        kwargs["callbacks"] = default_callbacks(
            _as_list(kwargs.get("callbacks")), checkpointing=kwargs.get("enable_checkpointing") is not False,
            progress_bar=kwargs.get("enable_progress_bar") is not False, cpu_threads=cpu_threads,
            log_every_n_steps=kwargs.get("log_every_n_steps"))
        if kwargs.get("log_every_n_steps") is None:
            kwargs["log_every_n_steps"] = 1  # LogInterval sets the real interval once the epoch length is known
        plugins = _as_list(kwargs.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        super().__init__(*args, **kwargs)
        if str(self.precision).startswith("bf16") and self.strategy.root_device.type == "cpu":
            from vitmha.precision import warn_if_emulated

            warn_if_emulated("cpu")  # Lightning would silently run the emulated, slower bf16

    def fit(self, *args: Any, **kwargs: Any) -> None:
        """``lightning.Trainer.fit``; preemption signals are caught from the start, the data module's setup too."""
        stoppers = [c for c in self.callbacks if isinstance(c, Preemption)]
        for callback in stoppers:
            callback.install(self)
        try:
            return super().fit(*args, **kwargs)
        finally:
            for callback in stoppers:
                callback.restore()
