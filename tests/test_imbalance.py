"""Rare classes: class weights from training counts, the focal loss, the class-balanced sampler and reports
that put the worst classes first."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitmha.data import ImageFolderDataModule, SegmentationFolderDataModule, SyntheticShapesDataModule
from vitmha.data.errors import DataValidationError
from vitmha.data.sampling import BalancedEpochSampler, EpochSeededSampler
from vitmha.tasks import ImageClassifier, SemanticSegmenter
from vitmha.tasks.base import TaskConfigError
from vitmha.tasks.losses import class_weights_from_counts, focal_loss

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
COUNTS = {"a": 8, "b": 2, "c": 4}  # train images per class of the folder below


def imbalanced_folder(root: Path) -> Path:
    """root/{train,val,test}/{a,b,c}: 8/2/4 train images, 2 per class in val and test, tinted by class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c, (name, n) in enumerate(COUNTS.items()):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                img = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
                img[..., c] += 150
                Image.fromarray(img).save(d / f"{name}{i}.png")
    return root


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


# ----------------------------------------------------------------- weights from counts
def test_auto_weights_are_sklearns_balanced_weights_scaled_to_mean_one():
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.array([50, 5, 20, 125])
    y = np.repeat(np.arange(4), counts)
    reference = compute_class_weight("balanced", classes=np.arange(4), y=y)
    w = class_weights_from_counts(counts, "auto")
    torch.testing.assert_close(w, torch.tensor(reference / reference.mean(), dtype=torch.float32))
    assert w.mean().item() == pytest.approx(1.0)


def test_effective_number_weights_and_absent_classes():
    w = class_weights_from_counts([100, 10, 0], "effective")
    e = [(1 - 0.999) / (1 - 0.999 ** n) for n in (100, 10)]
    assert w[2].item() == 0.0  # never a target
    assert w[:2].tolist() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)], rel=1e-6)
    assert w[1] / w[0] < 10  # milder than inverse frequency


# ----------------------------------------------------------------- focal loss
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_with_gamma_zero_is_cross_entropy(weighted, smoothing):
    """The documented interplay: label smoothing mixes every class term, and the weighted mean divides by the
    targets' weights, exactly as F.cross_entropy does."""
    torch.manual_seed(0)
    logits, target = torch.randn(12, 5) * 3, torch.randint(0, 5, (12,))
    weight = torch.tensor([0.2, 1.0, 3.0, 0.5, 1.3]) if weighted else None
    got = focal_loss(logits, target, gamma=0.0, weight=weight, label_smoothing=smoothing)
    torch.testing.assert_close(got, F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_focal_loss_with_gamma_zero_is_cross_entropy_on_soft_targets(smoothing):
    """Mixup's soft targets: the loss per sample is sum_c w_c q_c (-log p_c), averaged over samples."""
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    soft = torch.softmax(torch.randn(6, 4), -1)
    weight = torch.tensor([2.0, 0.5, 1.0, 0.5])
    torch.testing.assert_close(focal_loss(logits, soft, gamma=0.0, weight=weight, label_smoothing=smoothing),
                               F.cross_entropy(logits, soft, weight=weight, label_smoothing=smoothing))


def test_focal_loss_with_gamma_zero_is_cross_entropy_per_pixel_with_ignore_index():
    torch.manual_seed(2)
    logits, target = torch.randn(2, 3, 5, 6), torch.randint(0, 3, (2, 5, 6))
    target[0, :2] = 255
    weight = torch.tensor([0.3, 2.0, 0.7])
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0, weight=weight, ignore_index=255),
                               F.cross_entropy(logits, target, weight=weight, ignore_index=255))


def test_focal_loss_matches_lin_et_al_by_hand():
    """FL = -alpha_y (1 - p_y)^gamma log p_y, mean weighted by alpha_y; computed sample by sample."""
    torch.manual_seed(3)
    logits, target = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    alpha = torch.tensor([0.25, 1.0, 2.0], dtype=torch.float64)
    num = den = 0.0
    for i in range(7):
        p = torch.softmax(logits[i], 0)[target[i]].item()
        a = alpha[target[i]].item()
        num += -a * (1 - p) ** 2 * np.log(p)
        den += a
    assert focal_loss(logits, target, gamma=2.0, weight=alpha).item() == pytest.approx(num / den, rel=1e-6)
    easy = torch.tensor([[8.0, 0.0, 0.0]])
    assert focal_loss(easy, torch.tensor([0]), gamma=2.0) < 1e-3 * F.cross_entropy(easy, torch.tensor([0]))


# ----------------------------------------------------------------- tasks
def test_auto_class_weights_come_from_the_data_module_and_travel_in_the_checkpoint(tmp_path, capsys):
    dm = ImageFolderDataModule(str(imbalanced_folder(tmp_path / "data")), image_size=16, batch_size=4,
                               num_workers=0)
    assert dm.train_class_counts().tolist() == list(COUNTS.values())
    task = ImageClassifier(num_classes=3, backbone_kwargs=TINY, class_weights="auto", warmup_epochs=0)
    assert torch.isnan(task.class_weight).all()  # nothing computed before fit
    trainer = _trainer(max_epochs=1)
    trainer.fit(task, datamodule=dm)
    expected = class_weights_from_counts(list(COUNTS.values()))
    torch.testing.assert_close(task.class_weight, expected)
    assert task.class_counts.tolist() == list(COUNTS.values())
    ckpt = tmp_path / "w.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = ImageClassifier.load_from_checkpoint(ckpt, weights_only=False)
    torch.testing.assert_close(loaded.class_weight, expected)  # test/predict need no data for them

    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 1])
    torch.testing.assert_close(loaded.train_loss(logits, y),
                               F.cross_entropy(logits, y, weight=expected, label_smoothing=0.1))


def test_built_in_data_modules_count_from_their_label_arrays():
    from sklearn.datasets import load_digits

    from vitmha.data import DigitsDataModule
    from vitmha.data.sources import load_digits_split

    _, _, train_idx, _ = load_digits_split(8, 0.2, 0)
    expected = np.bincount(load_digits().target[train_idx], minlength=10)
    assert DigitsDataModule(image_size=8).train_class_counts().tolist() == expected.tolist()


def test_focal_loss_and_mixup_soft_targets_train_together(tmp_path):
    dm = ImageFolderDataModule(str(imbalanced_folder(tmp_path / "data")), image_size=16, batch_size=4,
                               num_workers=0)
    task = ImageClassifier(num_classes=3, backbone_kwargs=TINY, class_weights=[1.0, 4.0, 2.0], loss="focal",
                           focal_gamma=0.0, mixup_alpha=0.4, warmup_epochs=0)
    soft = torch.softmax(torch.randn(4, 3), -1)
    logits = torch.randn(4, 3)
    torch.testing.assert_close(task.train_loss(logits, soft), F.cross_entropy(
        logits, soft, weight=torch.tensor([1.0, 4.0, 2.0]), label_smoothing=0.1))
    _trainer(max_steps=2).fit(task, datamodule=dm)


def test_auto_class_weights_without_counts_and_bad_settings_are_clear_errors():
    from torch.utils.data import DataLoader, TensorDataset

    task = ImageClassifier(num_classes=3, backbone_kwargs=TINY, class_weights="auto", warmup_epochs=0)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])), batch_size=2)
    with pytest.raises(TaskConfigError, match="class_weights: 'auto' needs the training class counts"):
        _trainer(max_steps=1).fit(task, loader)
    with pytest.raises(TaskConfigError, match="class_weights: expected 3 finite weights"):
        ImageClassifier(num_classes=3, backbone_kwargs=TINY, class_weights=[1.0, 2.0])
    with pytest.raises(TaskConfigError, match="class_weights: expected null, auto or effective"):
        SemanticSegmenter(num_classes=3, backbone_kwargs=TINY, class_weights="balanced")
    with pytest.raises(TaskConfigError, match="loss: expected one of ce, focal"):
        ImageClassifier(num_classes=3, backbone_kwargs=TINY, loss="bce")


def test_segmentation_counts_leave_ignore_pixels_out_and_weight_the_pixel_loss(tmp_path):
    from vitmha.data import export_shapes_folder

    root = Path(export_shapes_folder(str(tmp_path / "shapes"), n_train=6, n_val=2, image_size=24))
    dm = SegmentationFolderDataModule(str(root), num_classes=4, image_size=24, batch_size=2, num_workers=0)
    masks = [np.asarray(Image.open(p)) for p in sorted((root / "train" / "masks").glob("*.png"))]
    assert any((m == 255).any() for m in masks)
    expected = sum(np.bincount(m[m != 255].ravel(), minlength=4) for m in masks)
    assert dm.train_class_counts().tolist() == expected.tolist()

    shapes = SyntheticShapesDataModule(n_train=4, n_val=2, n_test=2, image_size=16, batch_size=2)
    shapes.setup()
    direct = np.bincount(shapes.datasets["train"].masks.ravel(), minlength=4)
    assert shapes.train_class_counts().tolist() == direct.tolist()

    seg = SemanticSegmenter(num_classes=4, backbone_kwargs=TINY, class_weights="auto", warmup_epochs=0)
    _trainer(max_steps=1, limit_val_batches=1).fit(seg, datamodule=dm)
    weight = class_weights_from_counts(expected)
    torch.testing.assert_close(seg.class_weight, weight)
    logits, target = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    target[1, 0] = 255
    torch.testing.assert_close(seg.loss(logits, target, seg.loss_weight()),
                               F.cross_entropy(logits, target, weight=weight, ignore_index=255))


# ----------------------------------------------------------------- balanced sampler
LABELS = np.array([0] * 40 + [1] * 4 + [2] * 8)


def test_balanced_sampler_draws_every_class_equally_often():
    s = BalancedEpochSampler(np.repeat(LABELS, 50), seed=0)  # 2,600 draws per epoch
    s.set_epoch(3)
    drawn = np.repeat(LABELS, 50)[[i for i, _ in s]]
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(share - 1 / 3).max() < 0.03  # 3 binomial standard deviations ~ 0.028
    assert len(s) == len(LABELS) * 50


def test_balanced_sampler_is_a_function_of_seed_and_epoch_and_repeats_get_their_own_keys():
    a, b = BalancedEpochSampler(LABELS, seed=5), BalancedEpochSampler(LABELS, seed=5)
    list(b)
    b.set_epoch(2)
    b.set_epoch(7)  # history does not matter
    a.set_epoch(7)
    assert list(a) == list(b)
    keys = list(a)
    assert len(set(keys)) == len(keys)  # a repeated index has another augmentation stream
    assert {e % (1 << 32) for _, e in keys} == {7}
    b.set_epoch(8)
    assert [i for i, _ in b] != [i for i, _ in a]
    assert list(BalancedEpochSampler(LABELS, seed=6)) != list(BalancedEpochSampler(LABELS, seed=5))


def test_balanced_sampler_shards_and_resumes_like_the_epoch_seeded_sampler():
    from torch.utils.data import DistributedSampler

    full = BalancedEpochSampler(LABELS, seed=1)
    full.set_epoch(4)
    keys = list(full)
    for rank in range(3):
        mine = BalancedEpochSampler(LABELS, seed=1, num_replicas=3, rank=rank)
        mine.set_epoch(4)
        ref = DistributedSampler(keys, num_replicas=3, rank=rank, shuffle=False)
        assert list(mine) == [keys[i] for i in ref]
        resumed = BalancedEpochSampler(LABELS, seed=1, num_replicas=3, rank=rank)
        resumed.resume_at(4, 5)
        assert list(resumed) == list(mine)[5:] and len(resumed) == len(mine)
    assert isinstance(full, EpochSeededSampler)


def test_folder_data_module_balanced_batches_resume_mid_epoch_and_ignore_workers(tmp_path):
    dm = ImageFolderDataModule(str(imbalanced_folder(tmp_path / "data")), image_size=16, batch_size=4,
                               num_workers=0, sampler="balanced", seed=3, persistent_workers=False)
    dm.setup("fit")

    def epoch(workers: int, resume=None):
        dm.num_workers = workers
        dm._resume_position = resume
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, BalancedEpochSampler)
        if resume is None:
            loader.sampler.set_epoch(2)
        return [b for b in loader]

    whole = epoch(0)
    again = epoch(2)
    assert all(torch.equal(x, y) for bx, by in zip(whole, again) for x, y in zip(bx, by))
    tail = epoch(0, {"epoch": 2, "batches": 2, "batch_size": 4, "world_size": 1})
    assert len(tail) == len(whole) - 2
    assert all(torch.equal(x, y) for bx, by in zip(whole[2:], tail) for x, y in zip(bx, by))
    with pytest.raises(DataValidationError, match="sampler: expected one of random, balanced"):
        ImageFolderDataModule(str(tmp_path / "data"), sampler="weighted")


def test_logged_macro_f1_is_right_when_the_first_batch_is_all_correct():
    """torchmetrics' compute groups used to merge top-5 accuracy with F1/precision/recall when their states
    agreed after a perfect first batch; then F1 counted top-5 hits. Reference: sklearn on all the batches."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    from vitmha.tasks.classification import classification_metrics

    torch.manual_seed(0)
    y = [torch.arange(10).repeat(3), torch.randint(0, 10, (200,))]
    logits = [F.one_hot(y[0], 10).float() * 5, torch.randn(200, 10)]
    metrics = classification_metrics(10, "val/")
    for lg, t in zip(logits, y):
        metrics.update(lg, t)
    got = {k: float(v) for k, v in metrics.compute().items()}
    truth, pred = torch.cat(y).numpy(), torch.cat(logits).argmax(1).numpy()
    assert got["val/f1"] == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-6)
    assert got["val/precision"] == pytest.approx(precision_score(truth, pred, average="macro"), abs=1e-6)
    assert got["val/recall"] == pytest.approx(recall_score(truth, pred, average="macro"), abs=1e-6)


# ----------------------------------------------------------------- reports
def test_report_puts_the_worst_classes_first_and_flags_rare_ones(tmp_path):
    from vitmha.reports import ClassificationReport

    report = ClassificationReport(3, ["a", "b", "c"], "test/", train_counts=[80, 5, 40])
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    pred = torch.tensor([0, 0, 0, 0, 2, 1, 1, 0])  # F1: b 0, c 0.5, a 0.75
    report.update(F.one_hot(pred, 3).float() * 5, target)
    report.write(str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["class"] for r in summary["worst_classes"]] == ["b", "c", "a"]
    assert summary["rare_classes"] == ["b"] and summary["worst_classes"][0]["rare"]
    assert summary["worst_classes"][0]["train_count"] == 5
    with open(tmp_path / "per_class.csv", newline="") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert (rows["b"]["rank_by_f1"], rows["b"]["rare"], rows["a"]["rare"]) == ("1", "yes", "no")
    assert "b (f1 0.000, support 2, rare)" in report.worst_line()
