"""Built-in data: sklearn digits (real) and synthetic shapes, plus their folder exports."""
import os

import numpy as np
import torch

from vitmha.data import (DigitsDataModule, ImageFolderDataModule, SegmentationFolderDataModule,
                         SyntheticShapesDataModule, export_digits_folder, export_shapes_folder)
from vitmha.data.sources import generate_shapes, load_digits_split


def test_digits_split_is_stratified_80_20_and_fixed():
    _, y, tr, va = load_digits_split(8)
    assert (len(tr), len(va)) == (1437, 360) and not set(tr) & set(va)
    counts = np.bincount(y[va].numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 10% ± rounding of each class
    assert np.array_equal(load_digits_split(8)[3], va)


def test_digits_batches_and_metadata():
    dm = DigitsDataModule(image_size=32, batch_size=16)
    assert dm.num_classes == 10 and dm.classes == [str(i) for i in range(10)]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xv, yv = next(iter(dm.val_dataloader()))
    xt, yt = next(iter(dm.test_dataloader()))
    assert torch.equal(xv, xt) and torch.equal(yv, yt)  # val doubles as test
    b = next(iter(dm.predict_dataloader()))
    assert b["image"].shape == (16, 3, 32, 32) and b["orig_size"][0].tolist() == [8, 8]


def test_digits_are_not_flipped_and_augmentation_is_small():
    dm = DigitsDataModule(image_size=32, mean=[0, 0, 0], std=[1, 1, 1])
    dm.setup()
    ds = dm.datasets["train"]
    plain = torch.from_numpy(ds.images[0])
    aug = ds[(0, 1)][0][0]
    flipped = plain.flip(-1)
    assert (aug - plain).abs().mean() < (aug - flipped).abs().mean()


def test_export_digits_folder_matches_the_module(tmp_path):
    export_digits_folder(str(tmp_path))
    n = {s: sum(len(os.listdir(tmp_path / s / c)) for c in os.listdir(tmp_path / s)) for s in ("train", "val")}
    assert n == {"train": 1437, "val": 360}
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, num_workers=0, check_files=False)
    assert dm.classes == [str(i) for i in range(10)]


def test_shapes_are_deterministic_and_use_all_classes():
    a, ma = generate_shapes(8, 64, seed=3)
    b, mb = generate_shapes(8, 64, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert set(np.unique(generate_shapes(40, 64)[1]).tolist()) == {0, 1, 2, 3}
    assert not np.array_equal(generate_shapes(2, 64, stream=1)[0], a[:2])  # splits are different streams


def test_shapes_colour_does_not_give_the_class_away():
    images, masks = generate_shapes(200, 64)
    mean_colour = {c: images[masks == c].reshape(-1, 3).mean(0) for c in (1, 2, 3)}
    spread = np.ptp(np.stack(list(mean_colour.values())), axis=0)
    assert spread.max() < 25  # per-class mean colours nearly equal (colours are drawn independently of class)


def test_shapes_module_batches():
    dm = SyntheticShapesDataModule(n_train=8, n_val=4, n_test=4, batch_size=4)
    assert dm.num_classes == 4 and dm.classes[0] == "background"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (4, 64, 64) and y.dtype == torch.int64
    assert len(dm.datasets["val"]) == 4 and len(dm.datasets["test"]) == 4


def test_export_shapes_folder_loads_as_a_segmentation_folder(tmp_path):
    export_shapes_folder(str(tmp_path), n_train=6, n_val=4)
    names = sorted(os.listdir(tmp_path / "train" / "images"))
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "jpg"}
    dm = SegmentationFolderDataModule(str(tmp_path), num_classes=4, image_size=64, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 4
    _, y = dm.datasets["val"][0]
    assert 255 in y.unique().tolist()  # boundary band on even images
