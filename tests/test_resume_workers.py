"""Exact resume as users run it: ``python tools/train.py`` in a subprocess, images read from disk by 2
worker processes, augmentation, drop-path and mixup on; the run is killed (SIGKILL) in the middle of its
3rd epoch, after the checkpoint of its 2nd, or stopped by SIGTERM / SIGUSR1, and resumed with
``--ckpt_path``. The weights at the end of every epoch after the resume equal those of an uninterrupted
run bit for bit (sha256 of the state dict), for classification and segmentation, from an end-of-epoch
checkpoint and from mid-epoch ones (``every_n_train_steps``, and the one a stopped run writes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_SEG_VIT, make_folder, run_dirs

EPOCHS = 4  # 12 training images in batches of 4: 3 batches an epoch, 12 steps
BACKBONE = '{"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}'


def data_args(kind: str, root: Path) -> list[str]:
    if kind == "classification":
        data = make_folder(root / "colours")
        return ["--model", "vitmha.tasks.ImageClassifier",
                "--model.init_args.backbone_kwargs", BACKBONE,
                "--model.init_args.mixup_alpha", "0.2",
                "--data", "vitmha.data.ImageFolderDataModule",
                "--data.init_args.root", str(data), "--data.init_args.hflip", "0.5"]
    if kind == "mae":  # unlabelled images: the class folders are only nesting here
        data = make_folder(root / "colours")
        return ["--model", "vitmha.tasks.MaskedAutoencoder",
                "--model.init_args.backbone_kwargs", BACKBONE,
                "--model.init_args.lr", "0.001",
                "--data", "vitmha.data.UnlabeledFolderDataModule",
                "--data.init_args.root", str(data / "train"), "--data.init_args.val_root", str(data / "val")]
    from vitmha.data import export_shapes_folder

    data = export_shapes_folder(str(root / "shapes"), n_train=12, n_val=4, image_size=24)
    return ["--model", "vitmha.tasks.SemanticSegmenter",
            "--model.init_args.backbone_kwargs", TINY_SEG_VIT,
            "--data", "vitmha.data.SegmentationFolderDataModule",
            "--data.init_args.root", str(data), "--data.init_args.num_classes", "4",
            "--data.init_args.scale", "[0.5, 1.0]"]


def train(root: Path, data: list[str], digests: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python tools/train.py`` as a user types it, plus a callback that records the weights per epoch."""
    args = ["--seed_everything", "0", *data,
            "--model.init_args.drop_path_rate", "0.2",
            "--model.init_args.warmup_epochs", "1",
            "--data.init_args.image_size", "16",
            "--data.init_args.batch_size", "4",
            "--data.init_args.num_workers", "2",
            "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", str(EPOCHS),
            "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.callbacks+=tests.helpers.WeightDigests", f"--trainer.callbacks.path={digests}",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def read_digests(path: Path) -> dict[int, tuple[int, str]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return {int(e): (int(s), d) for e, s, d in rows}


def position(ckpt: Path) -> tuple[int, int, dict]:
    c = torch.load(ckpt, weights_only=True, map_location="cpu")
    states = [v for k, v in c.items() if isinstance(v, dict) and "train_position" in v]
    return c["epoch"], c["global_step"], states[0]["train_position"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Per task: its data arguments and the per-epoch weight digests of an uninterrupted run."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            base = tmp_path_factory.mktemp(kind)
            data = data_args(kind, base)
            done = train(base / "straight", data, base / "straight.txt")
            assert done.returncode == 0, done.stderr[-3000:]
            digests = read_digests(base / "straight.txt")
            assert sorted(digests) == list(range(EPOCHS)) and digests[EPOCHS - 1][0] == 3 * EPOCHS
            cache[kind] = data, digests
        return cache[kind]

    return get


def assert_continues_bitwise(straight_digests, resumed: Path, first_epoch: int) -> None:
    got = read_digests(resumed)
    assert sorted(got) == list(range(first_epoch, EPOCHS))
    for epoch, value in got.items():
        assert value == straight_digests[epoch], f"epoch {epoch}: weights differ from the uninterrupted run"


@pytest.mark.parametrize("kind", ["classification", "segmentation", "mae"])
def test_sigkill_mid_epoch_3_then_resume_from_the_epoch_2_checkpoint_is_bitwise(kind, straight, tmp_path):
    data, reference = straight(kind)
    killed = train(tmp_path, data, tmp_path / "killed.txt", "--trainer.callbacks+=tests.helpers.KillAt",
                   "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    assert position(last)[:2] == (1, 6)  # the end of the 2nd epoch; the 3rd was 2 batches in when killed
    resumed = train(tmp_path, data, tmp_path / "resumed.txt", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_continues_bitwise(reference, tmp_path / "resumed.txt", first_epoch=2)


@pytest.mark.parametrize("kind", ["classification", "segmentation", "mae"])
def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_is_bitwise(kind, straight, tmp_path):
    data, reference = straight(kind)
    steps = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true"]
    # KillAt comes first among the callbacks: the checkpoint of the batch it kills in is never written
    killed = train(tmp_path, data, tmp_path / "killed.txt", "--trainer.callbacks+=tests.helpers.KillAt",
                   "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1", *steps)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    epoch, step, pos = position(last)
    assert (epoch, step) == (2, 7) and pos["epoch"] == 2 and pos["batches"] == 1  # 1 batch into the 3rd epoch
    resumed = train(tmp_path, data, tmp_path / "resumed.txt", "--ckpt_path", str(last), *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_continues_bitwise(reference, tmp_path / "resumed.txt", first_epoch=2)


@pytest.mark.parametrize("kind,signal,batch", [("classification", "SIGTERM", 1), ("segmentation", "SIGUSR1", 2)])
def test_a_preempted_run_checkpoints_exits_143_and_continues_bitwise(kind, signal, batch, straight, tmp_path):
    """Stopped in the middle of the 3rd epoch, and at its last batch (which Lightning, restarting, counts
    as a finished epoch: the next one must start from its beginning)."""
    data, reference = straight(kind)
    stopped = train(tmp_path, data, tmp_path / "stopped.txt", "--trainer.callbacks+=tests.helpers.SignalAt",
                    "--trainer.callbacks.epoch=2", f"--trainer.callbacks.batch={batch}",
                    f"--trainer.callbacks.signal={signal}")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    step = 6 + batch + 1
    notes = [line for line in stopped.stderr.splitlines() if line.startswith("vitmha: ")]
    assert notes == [f"vitmha: {signal} received: stopped at epoch 2, step {step}; resumable checkpoint: {last} "
                     f"(continue with --ckpt_path {last}, or --ckpt_path last)"]
    assert "Traceback" not in stopped.stderr
    assert not list(last.parent.glob("*.tmp-*"))  # written atomically
    epoch, saved_step, pos = position(last)
    assert (epoch, saved_step) == (2, step)
    assert (pos["epoch"], pos["batches"]) == ((2, batch + 1) if batch < 2 else (3, 0))
    resumed = train(tmp_path, data, tmp_path / "resumed.txt", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_continues_bitwise(reference, tmp_path / "resumed.txt", first_epoch=2 if batch < 2 else 3)
