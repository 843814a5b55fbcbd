"""The speed benchmarks run end to end at tiny sizes (so they cannot rot): inference, train_step, mae, gpu --dry."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

CASES = {
    "inference": ["--quick", "--img-size", "32", "--rounds", "1", "--tome", "2"],
    "train_step": ["--quick", "--img-size", "32", "--batch", "2", "--rounds", "1"],
    "gpu": ["--dry"],
    "mae": ["--quick", "--batch", "2", "--rounds", "1"],
}
EXPECT = {
    "inference": ["timm fp32", "timm bf16 autocast", "vitmha bf16 weights", "vitmha int8", "vitmha ToMe r=2"],
    "train_step": ["timm fp32", "vitmha fp32", "timm bf16-mixed", "vitmha bf16-mixed"],
    "mae": ["| supervised | 2 |", "| MAE 75 % | 2 |"],
    "gpu": ["eager (SDPA default)", "SDPA math only", "torch.compile", "4. data loader", "5. fine-tune"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_prints_its_table(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *CASES[name]], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in EXPECT[name]:
        assert row in r.stdout, f"{row!r} missing from:\n{r.stdout}"
    assert "nan" not in r.stdout.lower()
