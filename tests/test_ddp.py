"""DDP over gloo on CPU: 2 processes train, and the val/acc they log equals a 1-process validate."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.helpers import classifier_args, run_dirs
from vitmha.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_row_with(path: Path, key: str) -> dict:
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get(key)][-1]


def tiny_args(root: Path, *extra: str) -> list[str]:
    # the whole val split (360 digits, even, so DistributedSampler pads nothing)
    args = classifier_args(root, "--trainer.enable_progress_bar", "false", *extra)
    i = args.index("--trainer.limit_val_batches")
    return args[:i] + args[i + 2:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_fit_logs_the_val_acc_a_single_process_validate_reproduces(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitmha.cli", "fit",
           *tiny_args(tmp_path / "ddp", "--trainer.max_epochs", "2", "--trainer.strategy", "ddp",
                      "--trainer.devices", "2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = run_dirs(tmp_path / "ddp")
    logged = last_row_with(run / "metrics.csv", "val/acc")
    assert logged["epoch"] == "1"

    cli_main(["validate", *tiny_args(tmp_path / "single"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    (single,) = run_dirs(tmp_path / "single")
    again = last_row_with(single / "metrics.csv", "val/acc")
    assert float(again["val/acc"]) == float(logged["val/acc"])
    assert abs(float(again["val/loss"]) - float(logged["val/loss"])) < 1e-5
