"""The callbacks and plugins :class:`vitmha.Trainer` installs by default (each usable on its own with a plain
``L.Trainer`` too). Only Lightning's public hooks and attributes are used.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to its target, fsyncs it
  and renames it into place, so ``last.ckpt`` is always a complete file even if the process is killed
  mid-save; a write that fails (a full disk) stops the run with :class:`CheckpointWriteError`.
- :class:`BestCheckpoint` keeps the best checkpoint by the task's own validation metric (``task.monitor``);
  :class:`LastCheckpoint` rewrites ``last.ckpt`` at every training-epoch end.
- :class:`FiniteWeights` refuses to write a checkpoint whose weights contain NaN/Inf, so a diverged run never
  replaces the last good checkpoint.
- :func:`run_loggers` gives the CSV and TensorBoard loggers of a run one ``version_N`` folder, claimed
  atomically, so runs started together under the same root never share one.
- :class:`RunSummary` prints one short summary after fit/validate/test (metric, time, files, next command).
- :class:`CpuThreads` picks torch's intra-op threads from the CPUs this process may use, the ones other
  processes keep busy and the loader workers, so a neighbour or the workers do not oversubscribe the CPU.
- :class:`LogInterval` logs the training loss at least once per epoch when epochs are short.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "NonFiniteWeightsError",
    "FiniteWeights",
    "BestCheckpoint",
    "LastCheckpoint",
    "RunVersion",
    "run_loggers",
    "RunSummary",
    "CpuThreads",
    "LogInterval",
    "task_monitor",
]


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(dirpath: str) -> None:
    # the rename is only durable once the directory entry is on disk (POSIX; a no-op elsewhere)
    with suppress(OSError):
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left on device); the previous file is intact. Defined
    here so that the CLI reports it as one ``error:`` line naming the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp-<pid>`` in the target's directory, fsync, then ``os.replace``.

    A reader therefore sees either the previous complete checkpoint or the new complete one, never a
    partial file, even after SIGKILL or power loss. Temporary files left behind by a killed process are
    removed on the next successful save of the same path. Remote (``scheme://``) paths fall back to
    Lightning's own writer.
    """

    TMP_SUFFIX = ".tmp-"

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        dirpath = os.path.dirname(os.path.abspath(path))
        os.makedirs(dirpath, exist_ok=True)
        tmp = f"{path}{self.TMP_SUFFIX}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                self._write(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            with suppress(OSError):
                os.remove(tmp)
            if isinstance(e, OSError):  # a full disk, a quota, a read-only folder: the user's to fix
                raise CheckpointWriteError(f"{path}: checkpoint not written ({e.strerror or e}); the checkpoints "
                                           "already on disk are kept") from e
            raise
        _fsync_dir(dirpath)
        self._remove_stale_tmp(path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        """Read ``path`` with ``weights_only=True`` (nothing in the file runs) through
        :func:`vitmha.checkpoints.read_checkpoint`, so the file the CLI already checked is not read twice;
        remote paths go to Lightning's reader."""
        path = os.fspath(path)
        if "://" in path:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        from vitmha.checkpoints import read_checkpoint

        return read_checkpoint(path)

    def _write(self, f: io.BufferedWriter, data: memoryview) -> None:
        """Write the serialised checkpoint; a hook tests override to stop half-way."""
        f.write(data)

    def _remove_stale_tmp(self, path: str) -> None:
        for tmp in glob.glob(glob.escape(path) + self.TMP_SUFFIX + "*"):
            pid = tmp.rsplit(self.TMP_SUFFIX, 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with suppress(OSError):
                    os.remove(tmp)


class NonFiniteWeightsError(FloatingPointError):
    """Raised instead of writing a checkpoint whose weights contain NaN or Inf."""


class FiniteWeights(Callback):
    """Stops the run with :class:`NonFiniteWeightsError` instead of writing a checkpoint whose weights contain
    NaN/Inf: every checkpoint already on disk (``last.ckpt`` included) is left as it was. The check runs in
    ``on_save_checkpoint``, before anything is written, and is agreed across ranks."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters() if p.numel())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteWeightsError(
                f"model weights contain NaN/Inf at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                "no checkpoint written, the checkpoints already saved are kept "
                "(lower the learning rate, enable gradient clipping, or use a more stable precision)")


def task_monitor(model: Any) -> tuple[str, str]:
    """The validation metric (and its mode) that picks a task's best checkpoint: the model's ``monitor``
    (and ``monitor_mode``; default "min" for a loss, else "max"), or ``val/loss`` minimised for a
    LightningModule that declares none."""
    monitor = getattr(model, "monitor", None) or "val/loss"
    mode = getattr(model, "monitor_mode", None) or ("min" if "loss" in monitor else "max")
    return monitor, mode


def _checkpoint_filename(monitor: str) -> str:
    # metric names hold "/", which would make sub-folders: keep "/" out of the literal text
    return "epoch{epoch:03d}-" + monitor.replace("/", "_") + "{" + monitor + ":.4f}"


class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint by the task's validation metric: ``monitor`` and ``mode`` come from the task
    (``task.monitor``, ``task.monitor_mode``) when the run is set up, unless given here. File names are flat:
    ``epoch003-val_acc0.9876.ckpt``."""

    def __init__(self, monitor: Optional[str] = None, mode: Optional[str] = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_top_k", 1)
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(monitor=monitor, mode=mode or "min", **kwargs)
        self._fixed_mode = mode
        if monitor is not None and "filename" not in kwargs:
            self.filename = _checkpoint_filename(monitor)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.monitor is None:
            monitor, mode = task_monitor(pl_module)
            mode = self._fixed_mode or mode
            self.monitor, self.mode = monitor, mode
            self.kth_value = torch.tensor(float("inf") if mode == "min" else float("-inf"))
            self.filename = self.filename or _checkpoint_filename(monitor)
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # without validation batches (a run that trains on all its data) there is no metric to rank by:
        # last.ckpt is the checkpoint, instead of a warning that the monitored key is missing
        if sum(trainer.num_val_batches or [0]) == 0 and self.monitor not in trainer.callback_metrics:
            return
        super().on_train_epoch_end(trainer, pl_module)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``, rewritten at the end of every training epoch (also when the monitored metric did not
    improve), so a stopped run resumes from its latest epoch with ``--ckpt_path last``."""

    def __init__(self, dirpath: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_on_train_epoch_end=True, enable_version_counter=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# run folders


class RunVersion:
    """The ``version_N`` of one run under ``versions_root``, picked once and shared by the run's loggers.

    Loggers on their own each pick ``max(existing) + 1`` when first asked and create the folder later, so two
    runs started together under the same root can pick the same N and write into one folder. Here global
    rank 0 claims the folder with ``os.mkdir``, which exactly one process can do, and takes the next number
    when another run got there first. Other ranks only guess: the trainer broadcasts rank 0's folder wherever
    one is used (log_dir, checkpoints), and only rank 0 writes logs.
    """

    def __init__(self, versions_root: str) -> None:
        self.versions_root = versions_root
        self.version: Optional[int] = None

    def next_free(self) -> int:
        """One more than the highest ``version_N`` under the root (0 when there is none)."""
        found = glob.glob(os.path.join(glob.escape(self.versions_root), "version_*"))
        numbers = [int(n) for n in (os.path.basename(f)[len("version_"):] for f in found) if n.isdigit()]
        return max(numbers) + 1 if numbers else 0

    def __call__(self, guess: Optional[Callable[[], int]] = None) -> int:
        if self.version is None:
            guess = guess or self.next_free
            claim = getattr(rank_zero_only, "rank", 0) == 0 and "://" not in self.versions_root
            self.version = self._claim(guess()) if claim else guess()
        return self.version

    def _claim(self, n: int) -> int:
        os.makedirs(self.versions_root, exist_ok=True)
        while True:
            try:
                os.mkdir(os.path.join(self.versions_root, f"version_{n}"))
                return n
            except FileExistsError:
                n += 1


class _SharedVersion:
    """Logger mixin: the (public) ``version`` is the run's :class:`RunVersion`, claimed when first asked."""

    def __init__(self, *args: Any, run_version: RunVersion, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_version = run_version

    @property
    def version(self) -> int:
        return self.run_version()


class RunCSVLogger(_SharedVersion, CSVLogger):
    """Lightning's CSVLogger in the run's claimed ``version_N``."""


class RunTensorBoardLogger(_SharedVersion, TensorBoardLogger):
    """Lightning's TensorBoardLogger in the run's claimed ``version_N`` (events under ``tb/``)."""


def run_loggers(save_dir: str, name: str = "lightning_logs") -> list:
    """A CSV logger (first, so ``trainer.log_dir`` and the checkpoints are ``version_N`` itself) and a
    TensorBoard logger (events in ``version_N/tb``), sharing one atomically claimed ``version_N``."""
    version = RunVersion(os.path.join(save_dir, name))
    return [RunCSVLogger(save_dir=save_dir, name=name, run_version=version),
            RunTensorBoardLogger(save_dir=save_dir, name=name, sub_dir="tb", run_version=version)]


# ----------------------------------------------------------------------------------------------------------
# what a run prints


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def _metric_history(log_dir: Optional[str], name: str) -> list:
    """[(epoch, value)] of ``name`` from the run's metrics.csv (empty when there is none)."""
    path = os.path.join(log_dir, "metrics.csv") if log_dir else ""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r[name])) for r in csv.DictReader(f) if r.get(name)]


def has_test_split(datamodule: Any) -> bool:
    """Whether ``datamodule`` has test data: its ``has_test_split`` when it says, else whether it defines
    ``test_dataloader`` (and, for a folder module, whether its root has a ``test/`` folder)."""
    says = getattr(datamodule, "has_test_split", None)
    if isinstance(says, bool):
        return says
    if datamodule is None or "test_dataloader" not in {n for c in type(datamodule).__mro__[:-1]
                                                        for n in vars(c) if c.__module__.split(".")[0] != "lightning"}:
        return False
    root = getattr(datamodule, "root", None)
    return not isinstance(root, str) or os.path.isdir(os.path.join(os.path.expanduser(root), "test"))


class RunSummary(Callback):
    """One short summary instead of Lightning's last line: after ``fit`` the monitored metric (best and
    last), the time, the checkpoints and files, and the command to evaluate the result; after ``validate``
    and ``test`` their metrics and the report folder. Printed by global rank 0."""

    def __init__(self) -> None:
        self._t0 = time.time()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._t0 = time.time()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        monitor, mode = task_monitor(pl_module)
        lines = [f"fit done in {_duration(time.time() - self._t0)}, {trainer.current_epoch} epoch(s)"]
        history = _metric_history(log_dir, monitor)
        if history:
            best = (max if mode == "max" else min)(history, key=lambda h: h[1])
            lines.append(f"  {monitor}: best {best[1]:.4f} (epoch {best[0]}), last {history[-1][1]:.4f} "
                         f"(epoch {history[-1][0]})")
        best_ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)), None)
        if best_ckpt is not None and best_ckpt.best_model_path:
            lines.append(f"  best checkpoint: {best_ckpt.best_model_path}")
        last = next((c.best_model_path for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)
                     and c.best_model_path and os.path.isfile(c.best_model_path)), None)
        if last:
            lines.append(f"  last checkpoint: {last}")
        for name in ("metrics.csv", "config.yaml"):
            if log_dir and os.path.isfile(os.path.join(log_dir, name)):
                lines.append(f"  {name}: {os.path.join(log_dir, name)}")
        config = os.path.join(log_dir, "config.yaml") if log_dir else None
        if last and config and os.path.isfile(config):
            if has_test_split(getattr(trainer, "datamodule", None)):
                lines.append(f"  next: vitmha test --config {config} --ckpt_path {last}")
            else:
                lines.append(f"  next: vitmha validate --config {config} --ckpt_path {last} "
                             "(the data has no test split)")
        elif last:
            lines.append(f"  next: vitmha.load({last!r}).predict([...]) or trainer.test(..., ckpt_path={last!r})")
        print("\n".join(lines), flush=True)

    def _after_eval(self, trainer: Any, stage: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        prefix = "test/" if stage == "test" else "val/"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}
        lines = [f"{stage} done in {_duration(time.time() - self._t0)}"]
        lines += [f"  {k}: {v:.4f}" for k, v in sorted(metrics.items())]
        report = next((c for c in trainer.callbacks if type(c).__name__ == "EvaluationReport"), None)
        if report is not None and getattr(report, "files", None):
            folder = os.path.dirname(str(next(iter(report.files.values()))))
            lines.append(f"  report: {folder}")
        print("\n".join(lines), flush=True)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._after_eval(trainer, "test")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "validate":
            self._after_eval(trainer, "validate")


# ----------------------------------------------------------------------------------------------------------
# the CPU


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            text = open(path).read().split()
        except OSError:
            continue
        if path.endswith("cpu.max") and text and text[0] != "max":
            n = min(n, max(1, int(float(text[0]) / float(text[1]) + 0.5)))
        elif path.endswith("quota_us") and text and int(text[0]) > 0:
            period = float(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().split()[0])
            n = min(n, max(1, int(int(text[0]) / period + 0.5)))
        break
    return max(1, n)


def _cpu_times(cpus: set) -> Optional[tuple[float, float]]:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat (None where there is no /proc/stat)."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        total += sum(values)
        busy += sum(values) - idle
    return (busy, total) if total else None


def busy_cpus(window: float = 0.15) -> float:
    """How many of this process's CPUs other processes kept busy over ``window`` seconds (0 when unknown)."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return 0.0
    start, own0, t0 = _cpu_times(cpus), os.times(), time.monotonic()
    if start is None:
        return 0.0
    time.sleep(window)
    end, own1, elapsed = _cpu_times(cpus), os.times(), time.monotonic() - t0
    if end is None or end[1] <= start[1]:
        return 0.0
    share = (end[0] - start[0]) / (end[1] - start[1])            # busy fraction of those CPUs
    own = (own1.user - own0.user + own1.system - own0.system) / max(elapsed, 1e-6)
    return max(0.0, share * len(cpus) - own)


class CpuThreads(Callback):
    """Sets torch's intra-op threads for a run on the CPU, once, before it starts, and says so in one line:
    the usable CPUs (affinity, cgroup quota) per process of the run, less the CPUs other processes keep busy
    (measured over 0.15 s) and one per data-loader worker, at least 1. A neighbour that holds a core makes
    every intra-op parallel region wait for the thread it has descheduled, which is how a 1-minute run
    becomes a 10-minute one; fewer threads avoid that.

    Args:
        threads: a fixed number instead; ``VITMHA_NUM_THREADS`` (or ``OMP_NUM_THREADS``) in the environment
            also fixes it. The previous setting is restored when the run ends.
    """

    def __init__(self, threads: Optional[int] = None) -> None:
        if threads is not None and int(threads) < 1:
            raise ValueError(f"cpu_threads: expected a number >= 1, got {threads}")
        self.threads = threads
        self.chosen: Optional[int] = None
        self._previous: Optional[int] = None

    def choose(self, trainer: Any) -> tuple[int, str]:
        """(threads, the reason in words)."""
        for source in ("VITMHA_NUM_THREADS", "OMP_NUM_THREADS"):
            value = os.environ.get(source, "")
            if self.threads is None and value.strip().isdigit() and int(value) > 0:
                return int(value), f"{source}={value}"
        if self.threads is not None:
            return int(self.threads), "cpu_threads"
        cpus = usable_cpus()
        per_process = max(1, cpus // max(1, int(getattr(trainer, "num_devices", 1) or 1)))
        workers = int(getattr(getattr(trainer, "datamodule", None), "num_workers", 0) or 0)
        busy = int(busy_cpus() + 0.5) if per_process > 1 else 0
        n = max(1, per_process - busy - workers)
        return n, (f"{cpus} CPU(s) usable, {busy} busy with other processes, {workers} loader worker(s); "
                   "set VITMHA_NUM_THREADS or trainer.cpu_threads to choose")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu" or self.chosen is not None:
            return
        self.chosen, why = self.choose(trainer)
        self._previous = torch.get_num_threads()
        if self.chosen != self._previous:
            torch.set_num_threads(self.chosen)
        if trainer.is_global_zero:
            print(f"vitmha: {self.chosen} intra-op CPU thread(s) ({why})", flush=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._previous is not None:
            torch.set_num_threads(self._previous)
        self.chosen = self._previous = None


class LogInterval(Callback):
    """Logs training metrics at least once per epoch: when an epoch has fewer batches than the interval,
    ``trainer.log_every_n_steps`` becomes the number of batches (Lightning would log nothing and warn).

    Args:
        every_n_steps: the interval otherwise (Lightning's default 50).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        batches = trainer.num_training_batches
        n = self.every_n_steps
        if isinstance(batches, (int, float)) and batches != float("inf") and 0 < batches < n:
            n = int(batches)
        trainer.log_every_n_steps = max(1, n)
