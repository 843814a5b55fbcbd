"""The balanced sampler on every classification data module (class-aware on multi-label data), multi-label
counts and channels, and Fashion-MNIST trained on the whole official train set (``val_size: 0``)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from vitmha.data import (DataValidationError, DigitsDataModule, FashionMNISTDataModule, MultiLabelCSVDataModule,
                         SyntheticShapesMultiLabelDataModule, export_multilabel_shapes)
from vitmha.data.sampling import BalancedEpochSampler, class_aware_probs

from tests.test_data_realdata import tiny_fashion

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)


def _epoch(dm, epoch, workers, resume=None):
    dm.num_workers = workers
    dm._resume_position = resume
    loader = dm.train_dataloader()
    if resume is None:
        loader.sampler.set_epoch(epoch)
    return loader, list(loader)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


# ----------------------------------------------------------------- class-aware probabilities
def test_class_aware_probabilities_by_hand_and_equal_to_balanced_on_one_hot_labels():
    # classes: a in rows 0,1,2; b in rows 2,3; c in row 4; row 5 has no label (its own group)
    targets = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    k = 4  # a, b, c and "no label"
    expected = np.array([1 / 3, 1 / 3, 1 / 3 + 1 / 2, 1 / 2, 1, 1]) / k
    np.testing.assert_allclose(class_aware_probs(targets), expected)
    assert class_aware_probs(targets).sum() == pytest.approx(1.0)
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    one_hot = np.eye(3, dtype=np.int64)[labels]
    np.testing.assert_allclose(class_aware_probs(one_hot), BalancedEpochSampler(labels).probs.numpy())
    np.testing.assert_allclose(BalancedEpochSampler(one_hot).probs.numpy(), BalancedEpochSampler(labels).probs.numpy())


def test_class_aware_sampling_draws_rare_labels_far_more_often():
    rng = np.random.default_rng(0)
    targets = np.zeros((600, 3), np.int64)
    targets[:500, 0] = 1
    targets[500:590, 1] = 1
    targets[590:, 2] = 1  # 10 images with the rare label
    targets[rng.choice(500, 50, replace=False), 1] = 1  # co-occurring a+b
    s = BalancedEpochSampler(np.tile(targets, (10, 1)), seed=0)
    drawn = np.tile(targets, (10, 1))[[i for i, _ in s]]
    share = drawn.mean(0)  # share of drawn images holding each label
    assert share[2] == pytest.approx(1 / 3, abs=0.03)  # picked as a class a third of the time
    assert targets.mean(0)[2] < 0.02


# ----------------------------------------------------------------- in-memory built-ins
def test_digits_balanced_batches_are_balanced_resume_mid_epoch_and_ignore_workers():
    dm = DigitsDataModule(image_size=8, batch_size=64, sampler="balanced", seed=2, persistent_workers=False)
    dm.setup("fit")
    loader, whole = _epoch(dm, 1, 0)
    assert isinstance(loader.sampler, BalancedEpochSampler)
    keys = loader.sampler.keys()
    labels = dm.datasets["train"].labels[[i for i, _ in keys]]
    share = np.bincount(labels, minlength=10) / len(labels)
    assert np.abs(share - 0.1).max() < 0.03
    assert _same(whole, _epoch(dm, 1, 2)[1])
    tail = _epoch(dm, 1, 0, {"epoch": 1, "batches": 3, "batch_size": 64, "world_size": 1})[1]
    assert _same(whole[3:], tail)
    assert not _same(whole, _epoch(dm, 2, 0)[1])


def test_fashion_mnist_takes_the_balanced_sampler(tmp_path):
    dm = FashionMNISTDataModule(root=str(tiny_fashion(tmp_path, n_train=40)), val_size=10, batch_size=8,
                                sampler="balanced")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedEpochSampler) and len(loader.sampler) == 30
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 28, 28)


# ----------------------------------------------------------------- multi-label
def _grey_multilabel(root: Path, in_chans: int) -> Path:
    g = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = {"train": ["a;b", "a", "", "b", "a;c", "a"], "val": ["a", "b;c"]}
    for split, labels in rows.items():
        lines = []
        for i, lab in enumerate(labels):
            name = f"img/{split}{i}.{'png' if in_chans == 1 else 'tif'}"
            if in_chans == 1:
                Image.fromarray(g.integers(0, 65536, (20, 20)).astype(np.uint16)).save(root / name)
            else:
                tifffile.imwrite(root / name, g.integers(0, 256, (20, 20, in_chans)).astype(np.uint8))
            lines.append(f"{name},{lab}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("in_chans", [1, 4])
def test_multilabel_csv_reads_the_images_own_channels(tmp_path, in_chans):
    dm = MultiLabelCSVDataModule(str(_grey_multilabel(tmp_path, in_chans)), image_size=16, batch_size=3,
                                 num_workers=2, persistent_workers=False, in_chans=in_chans, mean="auto", std="auto")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, in_chans, 16, 16) and y.shape == (3, 3) and len(dm.mean) == in_chans
    assert dm.train_class_counts().tolist() == [4, 2, 1]  # positives per class a, b, c
    with pytest.raises(DataValidationError, match=rf"train0.*{in_chans} channel\(s\).*expected in_chans=2"):
        MultiLabelCSVDataModule(str(tmp_path), image_size=16, num_workers=0, in_chans=2).setup("fit")


def test_multilabel_modules_count_positives_and_sample_class_aware(tmp_path):
    root = export_multilabel_shapes(str(tmp_path / "ml"), n_train=40, n_val=8, n_test=8, image_size=16)
    dm = MultiLabelCSVDataModule(root, image_size=16, batch_size=8, num_workers=0, sampler="balanced", seed=1)
    dm.setup("fit")
    targets = torch.stack([t for _, t in dm.datasets["train"].items]).numpy()
    assert dm.train_class_counts().tolist() == targets.sum(0).tolist()
    loader, whole = _epoch(dm, 0, 0)
    np.testing.assert_allclose(loader.sampler.probs.numpy(), class_aware_probs(targets))
    assert _same(whole, _epoch(dm, 0, 2)[1])

    shapes = SyntheticShapesMultiLabelDataModule(image_size=16, n_train=30, n_val=6, n_test=6, batch_size=6,
                                                 sampler="balanced")
    shapes.setup()
    assert shapes.train_class_counts().tolist() == shapes.datasets["train"].labels.sum(0).tolist()
    loader, batches = _epoch(shapes, 0, 0)
    assert isinstance(loader.sampler, BalancedEpochSampler) and batches[0][1].shape == (6, 6)


def test_multilabel_class_weights_auto_come_from_the_positives(tmp_path):
    from vitmha.tasks import MultiLabelClassifier
    from vitmha.tasks.losses import class_weights_from_counts

    dm = SyntheticShapesMultiLabelDataModule(image_size=16, n_train=16, n_val=4, n_test=4, batch_size=8)
    task = MultiLabelClassifier(num_classes=6, backbone_kwargs=TINY, class_weights="auto", warmup_epochs=0)
    L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(task, datamodule=dm)
    positives = dm.datasets["train"].labels.sum(0)
    assert task.class_counts.tolist() == positives.tolist()
    torch.testing.assert_close(task.class_weight, class_weights_from_counts(positives))


# ----------------------------------------------------------------- Fashion-MNIST, whole train set
def test_fashion_val_size_0_trains_on_every_training_image_without_validation(tmp_path, caplog):
    root = tiny_fashion(tmp_path, n_train=30, n_test=10)
    dm = FashionMNISTDataModule(root=str(root), val_size=0, batch_size=8)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 30 and "val" not in dm.datasets and len(dm.datasets["test"]) == 10
    assert any("no validation split, all 30 training images train" in r.getMessage() for r in caplog.records)
    assert dm.val_dataloader() == []
    with pytest.raises(DataValidationError, match="val_size: 0: there is no validation split"):
        FashionMNISTDataModule(root=str(root), val_size=0).setup("validate")
    with pytest.raises(DataValidationError, match="val_size: expected 0"):
        FashionMNISTDataModule(root=str(root), val_size=-1)


def test_vitmha_fit_then_test_with_val_size_0(tmp_path):
    """As a user runs it: `vitmha fit` on the whole train set (no validation), then `vitmha test` on last.ckpt."""
    from vitmha.cli import VitmhaCLI

    (tmp_path / "data").mkdir()
    root = tiny_fashion(tmp_path / "data", n_train=30, n_test=10)
    common = ["--model", "vitmha.tasks.ImageClassifier", "--model.init_args.backbone_kwargs",
              json.dumps(dict(TINY, img_size=28, patch_size=7)), "--model.init_args.warmup_epochs", "0",
              "--data", "vitmha.data.FashionMNISTDataModule", "--data.init_args.root", str(root),
              "--data.init_args.val_size", "0", "--data.init_args.batch_size", "16",
              "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
    VitmhaCLI(args=["fit", *common, "--trainer.max_epochs", "2"])
    last = sorted((tmp_path / "runs").rglob("last.ckpt"))
    assert len(last) == 1
    ckpt = torch.load(last[0], map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4  # 2 epochs of 30 images in batches of 16
    VitmhaCLI(args=["test", *common, "--ckpt_path", str(last[0])])
    metrics = sorted((tmp_path / "runs").rglob("metrics.csv"))
    assert any("test/acc" in m.read_text() for m in metrics)
