"""Shared pieces of the data modules: datasets over files, collate functions and loader construction."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitmha.data.io import read_mask, read_rgb
from vitmha.data.sampling import EpochSeededSampler, Key, resolve_seed, seed_pipeline, split_key, worker_init


def collate_pairs(batch: Sequence[Tuple[torch.Tensor, Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[(image, target), ...] -> (images (B,3,H,W), targets (B,) or (B,H,W) int64)."""
    images = torch.stack([b[0] for b in batch])
    first = batch[0][1]
    if isinstance(first, torch.Tensor):
        targets = torch.stack([b[1] for b in batch]).long()
    else:
        targets = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    return images, targets


def collate_predict(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """[{image, path, orig_size}, ...] -> {"image": (B,3,H,W), "path": [str], "orig_size": (B,2) long (H, W)}."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "path": [b["path"] for b in batch],
        "orig_size": torch.tensor([b["orig_size"] for b in batch], dtype=torch.long),
    }


def _check_size(t: torch.Tensor, size: Optional[int], what: str, path: str) -> None:
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        raise ValueError(
            f"{path}: {what} produced an image of {t.shape[-1]}×{t.shape[-2]} (W×H), expected {size}×{size}; "
            f"end the pipeline with a Resize/RandomCrop to image_size"
        )


class ImageLabelDataset(Dataset):
    """(path, label) items read from disk; keys ``(index, epoch)`` seed the augmentation."""

    def __init__(self, items: List[Tuple[str, int]], transform, image_size: Optional[int], seed: int = 0,
                 what: str = "transforms"):
        self.items, self.transform, self.image_size, self.seed, self.what = items, transform, image_size, seed, what

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        path, label = self.items[index]
        seed_pipeline(self.transform, self.seed, key)
        image = self.transform(image=read_rgb(path))["image"]
        _check_size(image, self.image_size, self.what, path)
        return image, label


class ImageMaskDataset(Dataset):
    """(image path, mask path) pairs; the mask goes through the same geometric transforms."""

    def __init__(self, items: List[Tuple[str, str]], transform, image_size: Optional[int], seed: int = 0,
                 ignore_index: int = 255, reduce_zero_label: bool = False, what: str = "transforms"):
        self.items, self.transform, self.image_size, self.seed = items, transform, image_size, seed
        self.ignore_index, self.reduce_zero_label, self.what = ignore_index, reduce_zero_label, what

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        ipath, mpath = self.items[index]
        mask = remap_mask(read_mask(mpath), self.ignore_index, self.reduce_zero_label)
        seed_pipeline(self.transform, self.seed, key)
        out = self.transform(image=read_rgb(ipath), mask=mask)
        _check_size(out["image"], self.image_size, self.what, ipath)
        return out["image"], torch.as_tensor(np.asarray(out["mask"])).long()


def remap_mask(mask: np.ndarray, ignore_index: int = 255, reduce_zero_label: bool = False) -> np.ndarray:
    """Label mask as int32 (as uint8 when it fits); with reduce_zero_label 0 -> ignore, v -> v-1 (mmseg)."""
    m = mask.astype(np.int32)
    if reduce_zero_label:
        ign = m == ignore_index
        m = m - 1
        m[(m == -1) | ign] = ignore_index
    if m.size and m.min() >= 0 and m.max() <= 255:
        return m.astype(np.uint8)
    return m


class PredictDataset(Dataset):
    """Image files for prediction: {"image", "path", "orig_size": (H, W)}."""

    def __init__(self, paths: List[str], transform, image_size: Optional[int], what: str = "val_transforms"):
        self.paths, self.transform, self.image_size, self.what = paths, transform, image_size, what

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Key):
        index, _ = split_key(key)
        path = self.paths[index]
        img = read_rgb(path)
        image = self.transform(image=img)["image"]
        _check_size(image, self.image_size, self.what, path)
        return {"image": image, "path": path, "orig_size": (int(img.shape[0]), int(img.shape[1]))}


class LoaderMixin:
    """Builds the dataloaders the same way for every data module (needs batch_size, num_workers, ... on self)."""

    batch_size: int
    num_workers: int
    pin_memory: Optional[bool]
    persistent_workers: bool
    seed: Optional[int]

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


def abspath(path: str, base: Optional[str] = None) -> str:
    path = os.path.expanduser(str(path))
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    return os.path.normpath(path)


class BaseDataModule(LoaderMixin, pl.LightningDataModule):
    """LightningDataModule with the shared loader settings.

    The data modules call ``save_hyperparameters(logger=False)``: ``hparams`` are kept (and saved in
    checkpoints) but not sent to the loggers, because Lightning refuses to log when the model and the data
    module share a key with different values (``num_classes=None`` here vs 10 there, ``backbone`` in plain
    Python use); LightningCLI already saves the full config next to the logs.

    Subclasses fill ``self.datasets`` (split -> Dataset) in ``setup`` (and ``_setup_predict`` if predict
    data is built separately); the four loaders come from here. ``split_collate`` maps a split to its
    collate function (default: pairs, and ``collate_predict`` for predict).
    """

    split_collate: Dict[str, Callable] = {}

    def _dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            if split == "predict" and hasattr(self, "_setup_predict"):
                self._setup_predict()
            else:
                self.setup("test" if split == "test" else "fit")
        return self.datasets[split]

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
