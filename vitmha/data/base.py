"""BaseDataModule: the shared loader and normalisation settings of every data module, and its four loaders."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vitmha.data.datasets import collate_pairs, collate_predict
from vitmha.data.sampling import EpochSeededSampler, resolve_seed, worker_init
from vitmha.data.transforms import resolve_mean_std


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
                     std: Optional[List[float]], backbone: Optional[str]) -> None:
        """Store the loader settings, resolve mean/std (explicit > ``backbone``'s > ImageNet), no datasets yet."""
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers, self.seed = pin_memory, persistent_workers, seed
        self.mean, self.std = resolve_mean_std(mean, std, backbone)
        self.datasets = {}

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
            sampler = EpochSeededSampler(len(dataset), seed=seed, shuffle=True)
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
