"""BaseDataModule: the shared loader and normalisation settings of every data module, and its four loaders."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from vitmha.data.datasets import collate_pairs, collate_predict, remap_mask
from vitmha.data.errors import DataValidationError
from vitmha.data.io import read_mask
from vitmha.data.sampling import BalancedEpochSampler, EpochSeededSampler, resolve_seed, worker_init
from vitmha.data.transforms import resolve_mean_std


#: ``sampler`` values of the classification data modules: shuffle each epoch, or draw class-balanced
SAMPLERS = ("random", "balanced")


def dataset_labels(dataset: Dataset) -> Optional[np.ndarray]:
    """The class index of every sample of a classification dataset (an in-memory ``labels`` array or the
    ``(path, label)`` items of a folder), or None for other datasets."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and np.ndim(labels) == 1:
        return np.asarray(labels, dtype=np.int64)
    items = getattr(dataset, "items", None)
    if items and isinstance(items[0][1], (int, np.integer)):
        return np.fromiter((lab for _, lab in items), dtype=np.int64, count=len(items))
    return None


def dataset_targets(dataset: Dataset) -> Optional[np.ndarray]:
    """(N, C) 0/1 targets of a multi-label dataset (an in-memory (N, C) ``labels`` array or the ``(path,
    multi-hot tensor)`` items of a csv), or None for other datasets."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and np.ndim(labels) == 2:
        return (np.asarray(labels) > 0).astype(np.int64)
    items = getattr(dataset, "items", None)
    if items and isinstance(items[0][1], torch.Tensor) and items[0][1].ndim == 1:
        return torch.stack([t for _, t in items]).gt(0).long().numpy()
    return None


def _pixel_counts(masks: Any, num_classes: int, ignore_index: Optional[int]) -> np.ndarray:
    counts = np.zeros(num_classes, dtype=np.int64)
    for m in masks:
        v = np.asarray(m).ravel().astype(np.int64)
        v = v[(v >= 0) & (v != (-1 if ignore_index is None else ignore_index))]
        if v.size and v.max() >= num_classes:
            raise ValueError(f"mask value {int(v.max())} outside 0..{num_classes - 1}")
        counts += np.bincount(v, minlength=num_classes)
    return counts


def dataset_class_counts(dataset: Dataset, num_classes: int, ignore_index: Optional[int] = None) -> np.ndarray:
    """(num_classes,) int64: samples per class of a classification dataset, positives per class of a
    multi-label one, or pixels per class of a segmentation dataset (in-memory masks, a mask region, or mask
    files read once; ``ignore_index`` left out). Raises DataValidationError for a dataset it cannot count or
    labels outside the classes."""
    what = type(dataset).__name__
    labels = dataset_labels(dataset)
    try:
        targets = dataset_targets(dataset)
        if targets is not None:
            if targets.shape[1] != num_classes:
                raise ValueError(f"{targets.shape[1]} label columns for {num_classes} classes")
            return targets.sum(0).astype(np.int64)
        if labels is not None:
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"label {int(labels.max())} outside 0..{num_classes - 1}")
            return np.bincount(labels, minlength=num_classes).astype(np.int64)
        if getattr(dataset, "masks", None) is not None:  # in-memory (N, H, W)
            return _pixel_counts(dataset.masks, num_classes, ignore_index)
        if getattr(dataset, "mask", None) is not None:  # one region that random crops are cut from
            return _pixel_counts([dataset.mask], num_classes, ignore_index)
        items = getattr(dataset, "items", None)
        if items and isinstance(items[0][1], str):  # (image path, mask path) pairs
            ign = getattr(dataset, "ignore_index", ignore_index)
            rz = bool(getattr(dataset, "reduce_zero_label", False))
            return _pixel_counts((remap_mask(read_mask(m), ign, rz) for _, m in items), num_classes, ign)
    except ValueError as e:
        raise DataValidationError([(f"train split ({what})", f"cannot count classes: {e}")]) from None
    raise DataValidationError([(f"train split ({what})", "cannot count its classes: not a labelled "
                                "classification or segmentation dataset")])


def abspath(path: str, base: Optional[str] = None) -> str:
    path = os.path.expanduser(str(path))
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    return os.path.normpath(path)


class BaseDataModule(pl.LightningDataModule):
    """LightningDataModule with the shared loader settings.

    The data modules call ``save_hyperparameters(logger=False)``: ``hparams`` are kept (and saved in
    checkpoints) but not sent to the loggers, because Lightning refuses to log when the model and the data
    module share a key with different values (``num_classes=None`` here vs 10 there, ``backbone`` in plain
    Python use); LightningCLI already saves the full config next to the logs.

    Subclasses store the shared arguments with ``_init_loader`` in ``__init__``, fill ``self.datasets``
    (split -> Dataset) in ``setup`` and override ``_setup_predict`` to fill ``self.datasets["predict"]``;
    the four loaders come from here. ``split_collate`` maps a split to its collate function (default:
    pairs, and ``collate_predict`` for predict).
    """

    split_collate: Dict[str, Callable] = {}

    batch_size: int
    num_workers: int
    pin_memory: Optional[bool]
    persistent_workers: bool
    seed: Optional[int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    datasets: Dict[str, Dataset]

    def _init_loader(self, *, batch_size: int, num_workers: int, pin_memory: Optional[bool],
                     persistent_workers: bool, seed: Optional[int], mean: Optional[List[float]],
                     std: Optional[List[float]], backbone: Optional[str], in_chans: int = 3,
                     sampler: str = "random") -> None:
        """Store the loader settings, resolve mean/std (explicit > ``backbone``'s > ImageNet) for ``in_chans``
        channels, no datasets yet. ``sampler``: ``random`` (shuffle) or ``balanced`` (class-balanced draws
        with replacement; class-aware on multi-label data: see ``BalancedEpochSampler``)."""
        if sampler not in SAMPLERS:
            raise DataValidationError([("sampler", f"expected one of {', '.join(SAMPLERS)}, got {sampler!r}")])
        self.train_sampler = sampler
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.seed = pin_memory, persistent_workers, seed
        self.in_chans = int(in_chans)
        self.mean, self.std = resolve_mean_std(mean, std, backbone, self.in_chans)
        self.datasets = {}

    def train_class_counts(self) -> np.ndarray:
        """(num_classes,) int64 counts of the train split: images per class (from the label list), positives
        per class for multi-label data, or pixels per class for segmentation (masks read once, ``ignore_index``
        left out). Computed once; sets up the train split if needed. What ``class_weights: auto`` of the tasks
        is computed from."""
        if getattr(self, "_train_counts", None) is None:
            self._train_counts = dataset_class_counts(self._dataset("train"), int(self.num_classes),
                                                      getattr(self, "ignore_index", None))
        return self._train_counts.copy()

    def _setup_predict(self) -> None:
        """Fill ``self.datasets["predict"]``; called by ``predict_dataloader`` when it is missing."""
        raise NotImplementedError(f"{type(self).__name__} has no predict data: it does not override _setup_predict")

    def _dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            if split == "predict":
                self._setup_predict()
            else:
                self.setup("test" if split == "test" else "fit")
        return self.datasets[split]

    def _loader(self, dataset: Dataset, train: bool, collate_fn: Callable = collate_pairs) -> DataLoader:
        workers = int(self.num_workers)
        pin = torch.cuda.is_available() if self.pin_memory is None else bool(self.pin_memory)
        sampler = None
        if train:
            # resolved now, not in __init__: seed_everything may run after the module is built
            seed = resolve_seed(self.seed)
            if hasattr(dataset, "seed"):
                dataset.seed = seed
            if getattr(self, "train_sampler", "random") == "balanced":
                labels = dataset_labels(dataset)
                labels = dataset_targets(dataset) if labels is None else labels
                if labels is None:
                    raise DataValidationError([("sampler", f"balanced sampling needs class labels; the train "
                                                f"split ({type(dataset).__name__}) has none")])
                sampler = BalancedEpochSampler(labels, seed=seed)
            else:
                sampler = EpochSeededSampler(len(dataset), seed=seed, shuffle=True)
            self._start_sampler(sampler)
        return DataLoader(
            dataset,
            batch_size=int(self.batch_size),
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin,
            drop_last=False,
            collate_fn=collate_fn,
            persistent_workers=bool(self.persistent_workers) and workers > 0,
            worker_init_fn=worker_init if workers > 0 else None,
        )

    # ----------------------------------------------------------------- exact resume
    def state_dict(self) -> Dict[str, Any]:
        """Where training stands, saved in every checkpoint Lightning writes during fit: the epoch the train
        loader is in and how many of its batches were trained (0 once the epoch's training part is done,
        with the next epoch). Read from the fit loop's progress counters, the same ones Lightning restores."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        loop = trainer.fit_loop
        epochs, batches = loop.epoch_progress.current, loop.epoch_loop.batch_progress
        if epochs.processed < epochs.started and not batches.is_last_batch:
            # inside an epoch: resume after its last trained batch
            epoch, done = epochs.processed, batches.current.processed
        else:
            # the epoch's training part is over (Lightning also counts a checkpoint written after the last
            # batch, before the epoch end, as a finished epoch when it restarts): the next one from its start
            epoch, done = epochs.processed + int(epochs.processed < epochs.started), 0
        return {"train_position": {"epoch": int(epoch), "batches": int(done), "batch_size": int(self.batch_size),
                                   "world_size": int(trainer.world_size)}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Keep the saved position for the train loader of the fit that resumes from this checkpoint."""
        self._resume_position = state_dict.get("train_position")

    def _start_sampler(self, sampler: EpochSeededSampler) -> None:
        """Start a resumed fit's sampler where the checkpoint left off. Needed because Lightning makes (and
        worker processes prefetch) the first train iterator before it calls ``set_epoch``."""
        pos = getattr(self, "_resume_position", None)
        self._resume_position = None  # once: a reloaded train loader starts at its epoch's beginning
        if not pos:
            return
        start = int(pos["batches"]) * int(pos["batch_size"])
        world = self.trainer.world_size if self.trainer is not None else 1
        if start and (int(pos["batch_size"]) != int(self.batch_size) or int(pos["world_size"]) != world):
            warnings.warn(
                f"resuming in the middle of epoch {pos['epoch']} with batch_size {self.batch_size} on {world} "
                f"device(s), but the checkpoint was written with batch_size {pos['batch_size']} on "
                f"{pos['world_size']}: the rest of this epoch starts after the same number of samples, so the "
                "run is not an exact continuation", UserWarning, stacklevel=2)
        sampler.resume_at(int(pos["epoch"]), start)

    def _split_loader(self, split: str) -> DataLoader:
        collate = self.split_collate.get(split, collate_predict if split == "predict" else collate_pairs)
        return self._loader(self._dataset(split), train=split == "train", collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._split_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._split_loader("predict")
