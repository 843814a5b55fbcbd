"""UnlabeledFolderDataModule (pre-training data without classes), and every image data module as a source of
images for label-free pre-training."""
import os
import warnings
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from vitmha.data import (DataValidationError, DigitsDataModule, ImageFolderDataModule, MultiLabelCSVDataModule,
                         SegmentationFolderDataModule, SyntheticShapesDataModule,
                         SyntheticShapesMultiLabelDataModule, UnlabeledFolderDataModule, export_multilabel_shapes,
                         export_shapes_folder)
from vitmha.data.sampling import EpochSeededSampler

RNG = np.random.default_rng(0)


def _rgb(h=20, w=24):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def pool(root: Path, n: int = 10) -> Path:
    """``n`` photos at several depths and in several formats, plus the junk a copied folder carries."""
    for i in range(n):
        d = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "b/d/e")
        d.mkdir(parents=True, exist_ok=True)
        name = d / f"img{i}.{('png', 'jpg', 'JPEG')[i % 3]}"
        Image.fromarray(_rgb()).save(name)
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    return root


def dm_for(root, **kw):
    kw.setdefault("image_size", 16)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return UnlabeledFolderDataModule(str(root), **kw)


def _epoch(dm, epoch, workers):
    dm.num_workers = workers
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_every_image_at_any_depth_is_read_batches_are_image_tensors_and_junk_is_said_once(tmp_path, caplog):
    root = pool(tmp_path / "pool", n=10)
    dm = dm_for(root)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 10 and "val" not in dm.datasets
    rel = [os.path.relpath(p, root) for p in dm.datasets["train"].paths]  # sorted, folder by folder
    assert rel[:4] == ["a/img0.png", "a/img3.png", "a/img6.png", "a/img9.png"] and rel[-1] == "b/d/e/img8.JPEG"
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines == [f"skipped 2 file(s) under {root}: 2 × hidden or system file (e.g. a/.DS_Store)"]
    x = next(iter(dm.train_dataloader()))
    assert isinstance(x, torch.Tensor) and x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert dm.val_dataloader() == []  # no validation unless asked for


def test_the_default_augmentation_is_maes(tmp_path):
    """MAE (facebookresearch/mae main_pretrain.py): RandomResizedCrop(scale=(0.2, 1.0), interpolation=3, i.e.
    bicubic), RandomHorizontalFlip(), ToTensor, Normalize(ImageNet): no colour jitter."""
    dm = dm_for(pool(tmp_path / "pool"), image_size=32)
    ops = dm.train_transform.transforms
    assert [type(t).__name__ for t in ops] == ["RandomResizedCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]
    crop, flip, norm = ops[:3]
    assert crop.size == (32, 32) and crop.scale == (0.2, 1.0) and crop.interpolation == cv2.INTER_CUBIC
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3)) and flip.p == 0.5
    np.testing.assert_allclose(norm.mean, (0.485, 0.456, 0.406))
    np.testing.assert_allclose(norm.std, (0.229, 0.224, 0.225))
    # the crops it draws cover 0.2-1 of the area (a big square image: the 10 tries rarely run out)
    crop.set_random_seed(0)
    shares = []
    for _ in range(2000):
        x1, y1, x2, y2 = crop.get_params_dependent_on_data({"shape": (1000, 1000)}, {})["crop_coords"]
        shares.append((x2 - x1) * (y2 - y1) / 1e6)
    assert 0.199 < min(shares) and max(shares) <= 1.0 and 0.5 < np.mean(shares) < 0.65


def test_batches_do_not_depend_on_workers_change_each_epoch_and_resume_mid_epoch_bitwise(tmp_path):
    root = pool(tmp_path / "pool", n=12)
    dm = dm_for(root, seed=5, persistent_workers=False)
    dm.setup("fit")
    whole = _epoch(dm, 2, 0)
    assert len(whole) == 3 and all(torch.equal(a, b) for a, b in zip(whole, _epoch(dm, 2, 2)))
    assert not torch.equal(torch.cat(whole), torch.cat(_epoch(dm, 3, 0)))
    # what Lightning does on resume: the checkpoint's datamodule state, then a fresh train loader
    dm.load_state_dict({"train_position": {"epoch": 2, "batches": 1, "batch_size": 4, "world_size": 1}})
    dm.num_workers = 2
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededSampler)
    tail = list(loader)
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(whole[1:], tail))


def test_val_split_holds_out_a_fixed_share_and_val_root_reads_another_folder(tmp_path):
    root = pool(tmp_path / "pool", n=10)
    dm = dm_for(root, val_split=0.3, split_seed=1)
    dm.setup("fit")
    train, val = dm.datasets["train"].paths, dm.datasets["val"].paths
    assert len(train) == 7 and len(val) == 3 and not set(train) & set(val)
    again = dm_for(root, val_split=0.3, split_seed=1)
    again.setup("fit")
    assert again.datasets["val"].paths == val
    other = dm_for(root, val_split=0.3, split_seed=2)
    other.setup("fit")
    assert other.datasets["val"].paths != val
    x = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 16, 16)

    held = pool(tmp_path / "held", n=4)
    dm = dm_for(root, val_root=str(held))
    dm.setup("validate")
    assert len(dm.datasets["train"]) == 10 and len(dm.datasets["val"]) == 4
    with pytest.raises(DataValidationError, match="give either val_root .* or val_split"):
        dm_for(root, val_root=str(held), val_split=0.2)
    with pytest.raises(DataValidationError, match=r"val_split: expected a share in \[0, 1\)"):
        dm_for(root, val_split=1.0)
    with pytest.raises(DataValidationError, match="no validation images: give val_root"):
        dm_for(root).setup("validate")
    with pytest.raises(DataValidationError, match="has no test split"):
        dm_for(root).setup("test")


def test_an_imagefolder_tree_given_as_root_is_read_whole_with_a_warning_that_says_how_to_split(tmp_path):
    for split in ("train", "val"):
        pool(tmp_path / "tree" / split, n=3)
    dm = dm_for(tmp_path / "tree")
    with pytest.warns(UserWarning, match=r"holds train/ and val/: all of them are read as training images; "
                                         r"to keep val/ out give root: .*tree/train and val_root: .*tree/val"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm_for(tmp_path / "tree" / "train", val_root=str(tmp_path / "tree" / "val")).setup("fit")


def test_bad_files_are_reported_at_once_or_skipped_with_one_warning(tmp_path):
    root = pool(tmp_path / "pool", n=6)
    (root / "b" / "c" / "notes.txt").write_text("field notes")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataValidationError) as e:
        dm_for(root).setup("fit")
    problems = dict(e.value.problems)
    assert "unsupported file type" in problems[str(root / "b" / "c" / "notes.txt")]
    assert "unreadable image" in problems[str(root / "a" / "broken.png")]
    assert "set skip_bad_files=True" in str(e.value).splitlines()[0]
    dm = dm_for(root, skip_bad_files=True)
    with pytest.warns(UserWarning, match=r"skipped 4 file\(s\) under .*: 2 × hidden or system file .*"
                                         r"1 × unreadable image \(e.g. a/broken.png\); 1 × unsupported file type"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 6
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    with pytest.raises(DataValidationError, match="no readable images"):
        dm_for(empty).setup("fit")
    with pytest.raises(DataValidationError, match="data root does not exist"):
        dm_for(tmp_path / "nowhere")


def test_grey_16_bit_and_multiband_images_with_auto_statistics(tmp_path):
    root = tmp_path / "bands"
    root.mkdir()
    g = np.random.default_rng(1)
    stack = g.integers(0, 4096, (5, 20, 20, 4)).astype(np.uint16)  # 12-bit data in 16-bit TIFFs
    for i, a in enumerate(stack):
        tifffile.imwrite(root / f"t{i}.tif", a)
    dm = dm_for(root, in_chans=4, max_pixel_value=4095, mean="auto", std="auto")
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 4, 16, 16)
    pixels = stack.reshape(-1, 4) / 4095.0
    np.testing.assert_allclose(dm.mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(dm.std, pixels.std(0), rtol=1e-4)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        Image.fromarray((g.integers(0, 65536, (20, 20))).astype(np.uint16)).save(grey / f"g{i}.png")
    dm = dm_for(grey, in_chans=1, batch_size=3)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).shape == (3, 1, 16, 16)


def test_predict_batches_name_their_files(tmp_path):
    root = pool(tmp_path / "pool", n=3)
    dm = dm_for(root)
    dm.setup("predict")
    b = next(iter(dm.predict_dataloader()))
    assert b["image"].shape == (3, 3, 16, 16) and b["orig_size"].tolist() == [[20, 24]] * 3
    assert sorted(os.path.basename(p) for p in b["path"]) == ["img0.png", "img1.jpg", "img2.JPEG"]


class _MeanImage(L.LightningModule):
    """The smallest pre-training-like module: reads the images of a batch as a pre-training task does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.seen = []

    @staticmethod
    def images(batch):
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def training_step(self, batch, i):
        x = self.images(batch)
        self.seen.append(tuple(x.shape))
        return ((x.mean((0, 2, 3)) - self.w) ** 2).sum()

    def validation_step(self, batch, i):
        self.log("val/loss", ((self.images(batch).mean((0, 2, 3)) - self.w) ** 2).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, **kw):
    model = _MeanImage()
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, **kw).fit(model, datamodule=dm)
    return model


def test_lightning_fits_with_worker_processes_with_and_without_validation(tmp_path):
    root = pool(tmp_path / "pool", n=8)
    model = _fit(dm_for(root, num_workers=2, persistent_workers=False))
    assert model.seen == [(4, 3, 16, 16)] * 2
    model = _fit(dm_for(root, val_split=0.25, num_workers=2, persistent_workers=False))
    assert model.seen == [(4, 3, 16, 16), (2, 3, 16, 16)]


def test_every_image_data_module_feeds_label_free_pre_training(tmp_path):
    """A pre-training task reads batch[0]: (B, C, S, S) float32 images from every image data module."""
    from tests.helpers import make_folder

    csv_root = export_multilabel_shapes(str(tmp_path / "ml"), n_train=8, n_val=4, n_test=4, image_size=16)
    modules = [
        ImageFolderDataModule(str(make_folder(tmp_path / "clf")), image_size=16, batch_size=4, num_workers=0),
        SegmentationFolderDataModule(export_shapes_folder(str(tmp_path / "seg"), n_train=4, n_val=2, image_size=16),
                                     num_classes=4, image_size=16, batch_size=4, num_workers=0),
        MultiLabelCSVDataModule(csv_root, image_size=16, batch_size=4, num_workers=0),
        DigitsDataModule(image_size=16, batch_size=4),
        SyntheticShapesDataModule(image_size=16, n_train=8, n_val=4, n_test=4, batch_size=4),
        SyntheticShapesMultiLabelDataModule(image_size=16, n_train=8, n_val=4, n_test=4, batch_size=4),
        dm_for(pool(tmp_path / "pool", n=4)),
    ]
    for dm in modules:
        model = _fit(dm, limit_train_batches=1, limit_val_batches=1)
        assert model.seen == [(4, 3, 16, 16)], type(dm).__name__
