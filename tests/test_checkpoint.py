"""Checkpoints are written atomically and a failed run never replaces the last good one."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers import classifier_args, run_dirs
from vitmha.callbacks import AtomicCheckpointIO
from vitmha.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_are_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ unit


class FailHalfway(AtomicCheckpointIO):
    def _write(self, f, data):
        f.write(data[: len(data) // 2])
        raise OSError("disk full")


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, path)
    with pytest.raises(OSError, match="disk full"):
        FailHalfway().save_checkpoint({"w": torch.zeros(1000)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(1000))
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_temporaries_of_dead_processes_are_removed_on_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"last.ckpt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.ckpt")
    assert not stale.exists()


# ------------------------------------------------------------------------------------------- SIGKILL


class HangOnSecondLastSave(AtomicCheckpointIO):
    """Writes half of the second ``last.ckpt``, tells the test (``$HANG_SIGNAL``), then waits to be killed."""

    def __init__(self) -> None:
        super().__init__()
        self.last_saves = 0
        self.path = ""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.path = os.fspath(path)
        self.last_saves += self.path.endswith("last.ckpt")
        super().save_checkpoint(checkpoint, path, storage_options)

    def _write(self, f, data):
        if not (self.path.endswith("last.ckpt") and self.last_saves == 2):
            return f.write(data)
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(os.environ["HANG_SIGNAL"]).write_text(self.path)
        time.sleep(600)


def test_sigkill_during_a_save_leaves_the_previous_complete_last_ckpt(tmp_path):
    signal_file = tmp_path / "writing"
    cmd = [sys.executable, "-m", "vitmha.cli", "fit",
           *classifier_args(tmp_path / "runs", "--trainer.max_epochs", "5", "--trainer.enable_progress_bar", "false"),
           "--trainer.plugins", "tests.test_checkpoint.HangOnSecondLastSave"]
    env = {**os.environ, "HANG_SIGNAL": str(signal_file), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not signal_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the second last.ckpt save never started"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    last = Path(signal_file.read_text())
    half_written = last.parent / f"last.ckpt.tmp-{proc.pid}"
    assert half_written.is_file()  # killed mid-write ...
    ckpt = torch.load(last, weights_only=True, map_location="cpu")  # ... yet last.ckpt is whole
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3  # the first epoch's, complete


# ---------------------------------------------------------------------------------- non-finite runs

SNAPSHOTS: dict[str, str] = {}


class PoisonWeights(Callback):
    """At the start of epoch ``epoch``, remember last.ckpt's hash, then set one weight to NaN."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            from vitmha.callbacks import LastCheckpoint

            last = next(c for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint)).best_model_path
            SNAPSHOTS[last] = sha256(last)
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize(
    "policy, message",
    [("error", "non-finite loss"), ("skip", "model weights contain NaN/Inf")],
    ids=["task-raises-on-nan-loss", "task-skips-nan-loss-checkpoint-refuses"],
)
def test_a_diverged_run_stops_cleanly_and_keeps_the_last_good_checkpoint(policy, message, tmp_path, capsys):
    SNAPSHOTS.clear()
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *classifier_args(tmp_path, "--trainer.max_epochs", "3"),
                  "--model.init_args.nonfinite", policy, "--trainer.callbacks", "tests.test_checkpoint.PoisonWeights"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    ((last, before),) = SNAPSHOTS.items()
    assert sha256(last) == before  # not rewritten
    assert weights_are_finite(Path(last))
    (run,) = run_dirs(tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert len(list((run / "checkpoints").iterdir())) == 2  # best + last, nothing half-written
