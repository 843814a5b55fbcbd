"""Readers for real datasets that install by package name; skipped with the install command unless
VITMHA_REQUIRE_DATA=1."""
import gzip
import struct

import numpy as np
import pytest
import torch

from vitmha.data import (DataValidationError, DatasetNotInstalledError, FashionMNISTDataModule, MNIST5kDataModule,
                         NucleiDataModule, read_idx)

from tests.conftest import require_dataset
from vitmha.data.sources import load_fashion_mnist


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_fashion(root, n_train=30, n_test=10):
    g = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return root


def test_idx_reader_reads_header_and_pixels(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", a, 2051)
    assert np.array_equal(read_idx(str(tmp_path / "x.gz")), a)


def test_idx_reader_names_a_truncated_file(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 3, 4)), 2051)
    data = gzip.open(tmp_path / "x.gz").read()
    (tmp_path / "y").write_bytes(data[:-5])
    with pytest.raises(DataValidationError, match="y: IDX size mismatch"):
        read_idx(str(tmp_path / "y"))


def test_fashion_module_on_tiny_idx_files(tmp_path):
    dm = FashionMNISTDataModule(root=str(tiny_fashion(tmp_path)), val_size=10, batch_size=8, image_size=32)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [20, 10, 10]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64


def test_fashion_subset_is_stratified_seeded_and_leaves_val_and_test_alone(tmp_path):
    root = str(tiny_fashion(tmp_path, n_train=200, n_test=10))
    full = FashionMNISTDataModule(root=root, val_size=40)
    full.setup()
    dm = FashionMNISTDataModule(root=root, val_size=40, subset_size=30)
    dm.setup()
    labels = dm.datasets["train"].labels
    assert len(labels) == 30 and np.bincount(labels).tolist() == [3] * 10
    # the subset is drawn from the train split only: validation and test are those of the full module
    for split in ("val", "test"):
        assert np.array_equal(dm.datasets[split].labels, full.datasets[split].labels)
    again = FashionMNISTDataModule(root=root, val_size=40, subset_size=30)
    again.setup()
    assert np.array_equal(again.datasets["train"].images, dm.datasets["train"].images)
    other = FashionMNISTDataModule(root=root, val_size=40, subset_size=30, split_seed=1)
    other.setup()
    assert not np.array_equal(other.datasets["train"].images, dm.datasets["train"].images)
    share = FashionMNISTDataModule(root=root, val_size=0, subset_fraction=0.1)
    share.setup()
    assert np.bincount(share.datasets["train"].labels).tolist() == [2] * 10


@pytest.mark.parametrize("kwargs, key", [({"subset_size": 5}, "subset_size"), ({"subset_size": 500}, "subset_size"),
                                         ({"subset_size": 20, "subset_fraction": 0.5}, "subset_size")])
def test_a_bad_subset_names_its_key(tmp_path, kwargs, key):
    dm = FashionMNISTDataModule(root=str(tiny_fashion(tmp_path, n_train=100)), val_size=20, **kwargs)
    with pytest.raises(DataValidationError, match=key):
        dm.setup()


def test_a_subset_fraction_outside_0_1_is_refused():
    with pytest.raises(DataValidationError, match="subset_fraction"):
        FashionMNISTDataModule(subset_fraction=1.5)


def test_missing_fashion_files_say_how_to_install(tmp_path):
    with pytest.raises(DatasetNotInstalledError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


def test_real_fashion_mnist():
    data = require_dataset(load_fashion_mnist)
    assert data["train"][0].shape == (60000, 28, 28) and data["test"][0].shape == (10000, 28, 28)
    assert np.bincount(data["test"][1]).tolist() == [1000] * 10
    dm = FashionMNISTDataModule(subset_size=600)  # 1 % of the labels, as docs/guides/pretraining.md
    dm.setup()
    assert np.bincount(dm.datasets["train"].labels).tolist() == [60] * 10 and len(dm.datasets["val"]) == 5000


def test_real_mnist5k():
    dm = MNIST5kDataModule(subset_fraction=0.5, batch_size=8)
    require_dataset(dm.setup)
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [1750, 500, 1000]
    assert np.bincount(dm.datasets["train"].labels).min() >= 170
    few = MNIST5kDataModule(subset_size=100, batch_size=8)
    few.setup()
    assert np.bincount(few.datasets["train"].labels).tolist() == [10] * 10


def test_real_nuclei_regions_do_not_overlap():
    dm = NucleiDataModule(crop_size=64, val_columns=128, batch_size=4)
    require_dataset(dm.setup)
    assert dm.datasets["train"].image.shape[:2] == (512, 384) and dm.datasets["val"].image.shape[:2] == (512, 128)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and set(y.unique().tolist()) <= {0, 1}
