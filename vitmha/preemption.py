"""Stop on SIGTERM / SIGUSR1 with a resumable checkpoint: what shared clusters need.

Schedulers stop jobs with a signal and kill them a little later (SLURM: SIGTERM, then SIGKILL after
``KillWait``, 30 s by default; ``#SBATCH --signal=USR1@180`` sends SIGUSR1 three minutes before the time
limit). Lightning on its own flags SIGTERM and exits without a checkpoint, and its SLURM auto-requeue saves
one from inside the signal handler, wherever the training step happens to be.

:class:`Preemption` replaces both handlers for the duration of a fit. A signal only sets a flag; at the
end of the training batch that is running (under DDP: the first batch end at which any rank has seen it),
every rank agrees, ``last.ckpt`` is written atomically in the checkpoint folder, one line says where,
and the process exits with :data:`PREEMPTED_EXIT_CODE`. The checkpoint holds the position in the epoch
(the data module's ``train_position``), so ``--ckpt_path`` on it continues the run bitwise.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job stopped by SIGTERM
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(SystemExit):
    """Raised at a batch end after the resumable checkpoint is written; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message


class Preemption(Callback):
    """Checkpoint and stop at the next training-batch end after SIGTERM or SIGUSR1 (see the module doc)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._trainer: Any = None

    # ----------------------------------------------------------------- signal handling
    def _handler(self, signum: int, _frame: Any) -> None:
        self.received = signum
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        kill = getattr(launcher, "kill", None)
        if callable(kill) and self._trainer.is_global_zero:
            kill(signum)  # ranks this process started itself get the signal too (Lightning does the same)

    def install(self, trainer: Any) -> None:
        """Handle SIGTERM and SIGUSR1 from now until the run ends (the previous handlers are restored then)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in SIGNALS:
            if signal.getsignal(signum) != self._handler:
                self._previous.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, self._handler)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # installed as the run is set up (a signal during setup is caught too; Lightning then leaves SIGUSR1
    # alone), and again once training starts, since Lightning adds its own SIGTERM handler right before
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.install(trainer)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self.install(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.install(trainer)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.install(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.restore()

    # ----------------------------------------------------------------- stopping
    def _agreed(self, trainer: Any) -> Optional[int]:
        """The signal number if any rank received one (all ranks get the same answer), else None."""
        mine = int(self.received or 0)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([mine], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            mine = int(flag.item())
        return mine or None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        signum = self._agreed(trainer)
        if signum is None:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part (sharded strategies); rank 0 writes
        name = signal.Signals(signum).name
        message = (f"{name} received: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                   f"resumable checkpoint: {path} (continue with --ckpt_path {path}, or --ckpt_path last)")
        if trainer.is_global_zero:
            print(f"vitmha: {message}", file=sys.stderr, flush=True)
        self.restore()
        raise Preempted(message)


def last_checkpoint_path(trainer: Any) -> str:
    """``last.ckpt`` in the folder of the run's ModelCheckpoint (else ``<log_dir>/checkpoints``)."""
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    base = trainer.log_dir or trainer.default_root_dir
    return os.path.join(base, "checkpoints", "last.ckpt")
