"""SegmentationFolderDataModule: joint augmentation, mask semantics, validation before training."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitmha.data import DataValidationError, SegmentationFolderDataModule
from vitmha.data.datasets import remap_mask

# colour of each class: the image is its mask painted, so alignment can be checked after augmentation
PALETTE = np.array([[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250]], np.uint8)


def write_pair(root, split, stem, mask, ext="png", mode="L"):
    os.makedirs(root / split / "images", exist_ok=True)
    os.makedirs(root / split / "masks", exist_ok=True)
    img = PALETTE[np.clip(mask, 0, 3)]
    Image.fromarray(img).save(root / split / "images" / f"{stem}.{ext}")
    m = Image.fromarray(mask.astype(np.uint8), "L")
    if mode == "P":
        m = m.convert("P")
        m.putpalette(PALETTE.flatten().tolist())
    m.save(root / split / "masks" / f"{stem}.png")


def blocks(h=40, w=48, seed=0):
    """A mask of 8×8 blocks of random classes 0..3."""
    g = np.random.default_rng(seed)
    return np.kron(g.integers(0, 4, (h // 8, w // 8)), np.ones((8, 8), int)).astype(np.uint8)


def make_tree(root, n=2):
    for split in ("train", "val"):
        for i in range(n):
            write_pair(root, split, f"s{i:04d}", blocks(seed=i))
    return root


def dm_for(root, **kw):
    kw.setdefault("num_classes", 4)
    kw.setdefault("image_size", 32)
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 0)
    return SegmentationFolderDataModule(str(root), **kw)


def test_batches_are_float_images_and_int64_masks(tmp_path):
    dm = dm_for(make_tree(tmp_path))
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (2, 32, 32) and y.dtype == torch.int64


def _interior(y):
    """Pixels whose 3×3 neighbourhood has one label (bilinear image resampling blends across edges)."""
    p = torch.nn.functional.pad(y[None, None].float(), (1, 1, 1, 1), mode="replicate")
    win = torch.nn.functional.unfold(p, 3)[0].view(9, *y.shape)
    return (win == win[4]).all(0) & (y != 255)


def _class_from_colour(x):
    c = x.argmax(0) + 1
    c[x.max(0).values < 0.3] = 0  # black background
    return c


def test_joint_augmentation_keeps_image_and_mask_aligned(tmp_path):
    dm = dm_for(make_tree(tmp_path), mean=[0, 0, 0], std=[1, 1, 1], scale=(0.5, 2.0))
    dm.setup("fit")
    for split in ("train", "val"):
        ds = dm.datasets[split]
        for epoch in range(10):
            x, y = ds[(epoch % 2, epoch)]
            inside = _interior(y)
            assert inside.sum() > 50
            agree = (_class_from_colour(x)[inside] == y[inside]).float().mean().item()
            assert agree > 0.99, (split, epoch, agree)


def test_palette_masks_are_read_as_indices(tmp_path):
    write_pair(tmp_path, "train", "p", blocks(), mode="P")
    write_pair(tmp_path, "val", "p", blocks())
    dm = dm_for(tmp_path)
    dm.setup("fit")
    _, y = dm.datasets["val"][0]
    assert set(torch.unique(y).tolist()) <= {0, 1, 2, 3}


def test_reduce_zero_label_maps_zero_to_ignore_and_shifts():
    m = np.array([[0, 1, 2, 255]], np.uint8)
    assert remap_mask(m, 255, True).tolist() == [[255, 0, 1, 255]]
    assert remap_mask(m, 255, False).tolist() == m.tolist()


def test_validation_names_every_bad_file(tmp_path):
    make_tree(tmp_path, n=1)
    write_pair(tmp_path, "train", "s0005", blocks())
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(tmp_path / "train" / "masks" / "s0005.png")  # 50×60
    write_pair(tmp_path, "train", "lonely", blocks())
    os.remove(tmp_path / "train" / "masks" / "lonely.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "train" / "masks" / "orphan.png")
    write_pair(tmp_path, "val", "rgbmask", blocks())
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "val" / "masks" / "rgbmask.png")
    bad = blocks()
    bad[0, :3] = [7, 9, 255]
    write_pair(tmp_path, "val", "labels", bad)
    with pytest.raises(DataValidationError) as e:
        dm_for(tmp_path).setup("fit")
    p = dict(e.value.problems)
    assert p["train/masks/s0005.png"] == "50×60, image is 48×40 (W×H)"
    assert "image without mask" in p["train/images/lonely.png"]
    assert "mask without image" in p["train/masks/orphan.png"]
    assert "3 channels" in p["val/masks/rgbmask.png"]
    assert "labels {7, 9} outside 0..3" in p["val/masks/labels.png"]


def test_skip_bad_files_drops_bad_pairs(tmp_path):
    make_tree(tmp_path, n=2)
    (tmp_path / "train" / "images" / "s0001.png").write_bytes(b"junk")
    dm = dm_for(tmp_path, skip_bad_files=True)
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) under .*: "
                                         r"1 × unreadable image \(e.g. train/images/s0001.png\)"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 1


def test_predict_keeps_original_size(tmp_path):
    make_tree(tmp_path)
    dm = dm_for(tmp_path, predict_paths=["val/images"])
    b = next(iter(dm.predict_dataloader()))
    assert b["image"].shape == (2, 3, 32, 32) and b["orig_size"].tolist() == [[40, 48], [40, 48]]
