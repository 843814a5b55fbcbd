"""Exact resume: 2 epochs, then resume from last.ckpt to 4, gives the weights of a straight 4-epoch run.

Holds because the data module augments sample i of epoch e from (seed, e, i) and shuffles from
(seed, e), and the task reseeds torch/numpy/random from (seed, epoch, batch) before every batch (dropout,
drop-path, mixup); the optimizer, LR scheduler and loop counters come back from the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers import classifier_args, run_dirs
from vitmha.cli import cli_main


def train(root: Path, max_epochs: int, *extra: str) -> Path:
    """``tools/train.py`` (= ``vitmha fit``) on tiny digits with dropout-like noise and augmentation on."""
    cli_main(["fit", *classifier_args(
        root,
        "--trainer.max_epochs", str(max_epochs),
        "--trainer.limit_train_batches", "4",
        "--trainer.deterministic", "true",
        "--model.init_args.drop_path_rate", "0.2",
        "--model.init_args.warmup_epochs", "1",
        "--data.init_args.augment", "true",
        *extra,
    )])
    return run_dirs(root)[-1] / "checkpoints" / "last.ckpt"


def max_abs_diff(a: Path, b: Path) -> float:
    sa = torch.load(a, weights_only=True, map_location="cpu")["state_dict"]
    sb = torch.load(b, weights_only=True, map_location="cpu")["state_dict"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


def epochs_and_steps(path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    return ckpt["epoch"], ckpt["global_step"]


def test_resuming_a_2_epoch_run_to_4_epochs_equals_a_straight_4_epoch_run(tmp_path):
    # a constant schedule after warmup: the lr of the first 2 epochs must not depend on max_epochs
    constant = ("--model.init_args.scheduler", "constant")
    first = train(tmp_path / "a", 2, *constant)
    resumed = train(tmp_path / "a", 4, *constant, "--ckpt_path", str(first))
    straight = train(tmp_path / "b", 4, *constant)
    assert epochs_and_steps(first) == (1, 8)
    assert epochs_and_steps(resumed) == epochs_and_steps(straight) == (3, 16)
    assert max_abs_diff(first, straight) > 0  # the comparison can tell runs apart
    assert max_abs_diff(resumed, straight) == 0.0


class StopAfterEpoch(Callback):
    """Ends fit after epoch ``epoch`` as an interrupted job would (the checkpoint of that epoch is written)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_an_interrupted_cosine_run_resumes_to_the_same_weights(tmp_path):
    interrupted = train(tmp_path / "a", 4, "--trainer.callbacks", "tests.test_resume.StopAfterEpoch")
    assert epochs_and_steps(interrupted) == (1, 8)
    resumed = train(tmp_path / "a", 4, "--ckpt_path", str(interrupted))
    straight = train(tmp_path / "b", 4)
    assert max_abs_diff(resumed, straight) == 0.0
