"""Exact resume: every random draw of a training step is a function of (seed, epoch, batch, rank) only.

vitmha's data modules key their augmentation by (index, epoch) themselves; this callback covers the rest
(dropout, drop-path, mixup, a plain ``DataLoader(shuffle=True)`` and its worker seeds): torch's, Python's and
NumPy's global generators are reseeded before each training epoch's loader is iterated and before every
training batch. So a run resumed from a checkpoint written at an epoch's end or in its middle draws the same
numbers as a run that never stopped. Every vitmha task installs it (``configure_callbacks``); the seed is
``seed_everything``'s (``PL_GLOBAL_SEED``), and nothing is reseeded without one.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

EPOCH_START = 2**32 - 1  # the "batch index" of the seed drawn at an epoch's start


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 63-bit seed that is a function of (global seed, epoch, batch index in the epoch, rank) only."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), epoch, batch, rank, 0x57E9]).generate_state(2, np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) % (2**63 - 1)


def reseed(epoch: int, batch: int = EPOCH_START, rank: int = 0) -> None:
    """Seed torch (every device), ``random`` and NumPy from (PL_GLOBAL_SEED, epoch, batch, rank)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        s = step_seed(int(seed), epoch, batch, rank)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)


class ExactResume(Callback):
    """Reseeds from (seed, epoch, batch, rank) before each training epoch and batch (see the module doc).

    Lightning makes a fit's first train iterator early, when ``configure_optimizers`` asks for the number
    of steps, so that epoch is seeded when the run is set up (and again, for the epoch a checkpoint resumes
    at, when it is loaded); later epochs at their start."""

    def __init__(self) -> None:
        self._seeded_epoch: Optional[int] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._seed_epoch(trainer, 0)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":
            self._seed_epoch(trainer, resumed_epoch(checkpoint))

    def _seed_epoch(self, trainer: Any, epoch: int) -> None:
        reseed(epoch, rank=trainer.global_rank)
        self._seeded_epoch = epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch != self._seeded_epoch:
            reseed(trainer.current_epoch, rank=trainer.global_rank)
        self._seeded_epoch = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        reseed(trainer.current_epoch, batch_idx, trainer.global_rank)


def resumed_epoch(checkpoint: dict) -> int:
    """The epoch a fit resumed from ``checkpoint`` starts at: the epochs whose training part ran."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))
