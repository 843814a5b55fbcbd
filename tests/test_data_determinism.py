"""Augmentation is a function of (seed, epoch, index): same batches whatever num_workers, new ones each epoch."""
import os

import numpy as np
import torch
from PIL import Image

from vitmha.data import EpochSeededSampler, ImageFolderDataModule, SyntheticShapesDataModule


def _epoch(dm, epoch, num_workers):
    dm.num_workers = num_workers
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    return [b for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


def test_folder_batches_identical_for_0_and_2_workers_and_differ_between_epochs(tmp_path):
    g = np.random.default_rng(0)
    for c in ("a", "b"):
        for split in ("train", "val"):
            os.makedirs(tmp_path / split / c)
            for i in range(6):
                Image.fromarray(g.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4, seed=7, persistent_workers=False)
    dm.setup("fit")
    e3_w0, e3_w2 = _epoch(dm, 3, 0), _epoch(dm, 3, 2)
    assert _same(e3_w0, e3_w2)
    assert not _same(e3_w0, _epoch(dm, 4, 0))


def test_segmentation_batches_identical_for_0_and_2_workers():
    dm = SyntheticShapesDataModule(n_train=12, n_val=4, n_test=4, batch_size=4, seed=1, persistent_workers=False)
    dm.setup()
    assert _same(_epoch(dm, 3, 0), _epoch(dm, 3, 2))


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSeededSampler(10, seed=3), EpochSeededSampler(10, seed=3)
    a.set_epoch(5)
    list(b)  # history does not matter
    b.set_epoch(5)
    assert list(a) == list(b) and all(k[1] == 5 for k in a)
    b.set_epoch(6)
    assert [k[0] for k in a] != [k[0] for k in b]


def test_sampler_shards_like_distributed_sampler_over_its_keys():
    from torch.utils.data import DistributedSampler

    full = EpochSeededSampler(10, seed=3)
    full.set_epoch(2)
    keys = list(full)
    for rank in range(3):  # 10 keys on 3 ranks: 4 each, the first 2 keys repeated to pad
        mine = EpochSeededSampler(10, seed=3, num_replicas=3, rank=rank)
        mine.set_epoch(2)
        reference = DistributedSampler(keys, num_replicas=3, rank=rank, shuffle=False)
        assert list(mine) == [keys[i] for i in reference] and len(mine) == 4


def test_sampler_resumes_part_way_through_an_epoch_and_only_that_epoch():
    a = EpochSeededSampler(10, seed=3, num_replicas=2, rank=1)
    a.set_epoch(4)
    whole = list(a)
    b = EpochSeededSampler(10, seed=3, num_replicas=2, rank=1)
    b.resume_at(4, 3)
    assert list(b) == whole[3:]
    assert len(b) == len(whole) == 5  # Lightning stops the epoch at the full length, counting trained batches
    b.set_epoch(4)  # Lightning sets the restored epoch after making the first iterator: no change
    assert list(b) == whole[3:]
    b.set_epoch(5)
    a.set_epoch(5)
    assert list(b) == list(a)


def test_seed_defaults_to_pl_global_seed(monkeypatch):
    from vitmha.data.sampling import resolve_seed

    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    assert resolve_seed(None) == 42 and resolve_seed(3) == 3
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert resolve_seed(None) == 0


def test_lightning_sets_the_epoch_of_our_sampler(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from vitmha.data import DigitsDataModule

    seen = []

    class Probe(pl.LightningModule):
        def __init__(self, backbone: str = "vit_tiny_patch16_224", image_size: int = 224):
            super().__init__()
            self.save_hyperparameters()  # keys shared with the data module must not clash when logged
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            x, y = batch
            seen.append((self.current_epoch, self.trainer.train_dataloader.sampler.epoch))
            return (self.w * x.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0, logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe(), datamodule=DigitsDataModule(batch_size=8))
    assert seen == [(0, 0), (1, 1), (2, 2)]


def test_keyed_uniforms_depend_only_on_seed_epoch_and_index():
    from vitmha.data.sampling import keyed_uniforms

    idx = np.array([5, 9, 2, 700000])
    batch = keyed_uniforms(3, np.array([1, 1, 1, 1]), idx, 5)
    alone = np.concatenate([keyed_uniforms(3, np.array([1]), idx[i:i + 1], 5) for i in range(4)])
    assert np.array_equal(batch, alone) and batch.shape == (4, 5)
    assert not np.array_equal(batch, keyed_uniforms(3, np.array([2, 2, 2, 2]), idx, 5))  # new epoch
    assert not np.array_equal(batch, keyed_uniforms(4, np.array([1, 1, 1, 1]), idx, 5))  # new seed
    many = keyed_uniforms(0, np.zeros(20000, np.int64), np.arange(20000), 2)
    assert many.min() >= 0 and many.max() < 1
    # uniform enough for augmentation: moments of U(0, 1) and no correlation between the columns
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.003
    assert abs(np.corrcoef(many.T)[0, 1]) < 0.03


def test_in_memory_train_batches_do_not_depend_on_batch_composition():
    from vitmha.data.datasets import _TensorClassification

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    keys = [(i, 4) for i in range(12)]
    ds = _TensorClassification(images, np.arange(12) % 3, [0.5] * 3, [0.5] * 3, augment=True, max_shift=0.1,
                               hflip=0.5)
    whole, _ = ds.__getitems__(keys)
    parts = torch.cat([ds.__getitems__(keys[:5])[0], ds.__getitems__(keys[5:])[0]])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, ds.__getitems__([(i, 5) for i in range(12)])[0])
