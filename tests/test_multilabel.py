"""Multi-label classification: scores against scikit-learn, the asymmetric loss, thresholds, CSV lists, the
built-in shape scenes, and fit -> test -> predict through the command line."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitmha
import torch.nn.functional as F
import yaml
from PIL import Image

from vitmha.data import DataValidationError, MultiLabelCSVDataModule, SyntheticShapesMultiLabelDataModule
from vitmha.data.multilabel import export_multilabel_shapes, generate_multilabel_shapes, read_multilabel_csv
from vitmha.tasks.multilabel import (MultiLabelClassifier, asymmetric_loss, multilabel_scores, tune_thresholds)

from tests.helpers import load_tool, run_dirs

TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}


def _random_case(n: int = 64, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, c, generator=g) < 0.35).long()
    target[0] = 1  # every class has a positive
    probs = (torch.rand(n, c, generator=g) * 0.6 + 0.4 * target).clamp(0, 1)  # informative, not separable
    thresholds = torch.rand(c, generator=g) * 0.6 + 0.2
    return probs, target, thresholds


# ------------------------------------------------------------------------------------------------ scores
def test_scores_equal_sklearn_and_torchmetrics():
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score
    from torchmetrics.classification import MultilabelAveragePrecision

    probs, target, thr = _random_case()
    s = multilabel_scores(probs, target, thr)
    y, p = target.numpy(), probs.double().numpy()
    pred = (probs > thr).long().numpy()
    assert float(s["map"]) == pytest.approx(average_precision_score(y, p, average="macro"), abs=1e-6)
    assert float(s["map_micro"]) == pytest.approx(average_precision_score(y, p, average="micro"), abs=1e-6)
    assert s["ap"].numpy() == pytest.approx(average_precision_score(y, p, average=None), abs=1e-6)
    assert float(s["f1"]) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-6)
    assert float(s["f1_micro"]) == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-6)
    assert float(s["precision"]) == pytest.approx(precision_score(y, pred, average="macro", zero_division=0), abs=1e-6)
    assert float(s["recall"]) == pytest.approx(recall_score(y, pred, average="macro", zero_division=0), abs=1e-6)
    tm = MultilabelAveragePrecision(num_labels=5, average="macro", thresholds=None)(probs, target)
    assert float(s["map"]) == pytest.approx(float(tm), abs=1e-6)


def test_a_class_without_positives_is_left_out_of_map():
    from sklearn.metrics import average_precision_score

    probs, target, thr = _random_case(seed=1)
    target[:, 2] = 0
    s = multilabel_scores(probs, target, thr)
    assert torch.isnan(s["ap"][2])
    keep = [0, 1, 3, 4]
    ref = average_precision_score(target[:, keep].numpy(), probs[:, keep].double().numpy(), average="macro")
    assert float(s["map"]) == pytest.approx(ref, abs=1e-6)


def test_tuned_thresholds_maximise_each_class_f1():
    from sklearn.metrics import f1_score

    # class 0: positives score 0.30-0.45, negatives below 0.3: at 0.5 nothing is predicted (F1 0)
    # class 1: well separated around 0.5 already; class 2: no positive, keeps the default
    probs = torch.tensor([[0.45, 0.9, 0.1], [0.40, 0.8, 0.2], [0.30, 0.2, 0.3], [0.25, 0.1, 0.4],
                          [0.10, 0.6, 0.1], [0.35, 0.3, 0.2]])
    target = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    default = torch.full((3,), 0.5)
    tuned = tune_thresholds(probs, target, default)
    f1 = lambda thr: f1_score(target.numpy(), (probs > thr).long().numpy(), average=None, zero_division=0)  # noqa: E731
    before, after = f1(default), f1(tuned)
    assert before[0] == 0.0 and after[0] == pytest.approx(6 / 7)  # 3 of 3 found, 1 false positive (0.35)
    assert after[1] == before[1] == 1.0
    assert float(tuned[2]) == 0.5
    # no threshold does better on any class (every cut between two scores tried)
    for k in range(2):
        for t in np.linspace(0, 1, 101):
            assert f1_score(target[:, k].numpy(), (probs[:, k] > t).long().numpy(), zero_division=0) <= after[k] + 1e-12


# ------------------------------------------------------------------------------------------------ losses
def test_asl_with_zero_gammas_and_clip_equals_bce():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 5, generator=g) * 4).requires_grad_(True)
    target = (torch.rand(8, 5, generator=g) < 0.4).float()
    asl = asymmetric_loss(logits, target, gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    (ga,) = torch.autograd.grad(asl, logits)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    (gb,) = torch.autograd.grad(bce, logits)
    assert asl.item() == pytest.approx(bce.item(), abs=1e-6)
    torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-6)


def test_asl_follows_the_paper():
    """Ridnik et al.'s AsymmetricLoss, written from the paper (sum over elements), divided by the element count."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(6, 4, generator=g) < 0.5).double()
    gp, gn, m = 1.0, 4.0, 0.05
    p = x.sigmoid()
    pm = (p - m).clamp(min=0)
    ref = -(y * (1 - p) ** gp * p.log() + (1 - y) * pm ** gn * (1 - pm).log()).sum() / x.numel()
    assert float(asymmetric_loss(x, y, gp, gn, m)) == pytest.approx(float(ref), rel=1e-5)


def test_bad_task_options_are_refused():
    with pytest.raises(ValueError, match="loss"):
        MultiLabelClassifier(num_classes=3, backbone_kwargs=TINY, loss="focal")
    with pytest.raises(ValueError, match="threshold"):
        MultiLabelClassifier(num_classes=3, backbone_kwargs=TINY, threshold=[0.5, 0.5])


# ------------------------------------------------------------------------------------------------ CSV lists
def _images(root: Path, names):
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "img" / n)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_names_csv_gives_sorted_classes_and_multi_hot_targets(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    _write(tmp_path / "train.csv", "path,labels\nimg/a.png,dog;cat\nimg/b.png,\nimg/c.png,bird\n")
    _write(tmp_path / "val.csv", "img/d.png,cat;bird;cat\n")  # no header; a repeated label counts once
    dm = MultiLabelCSVDataModule(root=str(tmp_path), image_size=8, batch_size=4, num_workers=0)
    assert dm.classes == ["bird", "cat", "dog"] and dm.num_classes == 3
    dm.setup("fit")
    items = dm.validate_files()
    assert [t.tolist() for _, t in items["train"]] == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert [t.tolist() for _, t in items["val"]] == [[1, 1, 0]]
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (1, 3, 8, 8) and targets.dtype == torch.long and targets.tolist() == [[1, 1, 0]]


def test_one_hot_csv_keeps_the_header_order_and_maps_val_columns_by_name(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    _write(tmp_path / "train.csv", "path,zebra,ant\nimg/a.png,1,1\nimg/b.png,0,0\n")
    _write(tmp_path / "val.csv", "path,ant,zebra\nimg/a.png,1,0\n")
    dm = MultiLabelCSVDataModule(root=str(tmp_path), image_size=8, num_workers=0)
    assert dm.classes == ["zebra", "ant"]
    items = dm.validate_files()
    assert [t.tolist() for _, t in items["train"]] == [[1, 1], [0, 0]]
    assert [t.tolist() for _, t in items["val"]] == [[0, 1]]


def test_csv_errors_name_file_and_line(tmp_path):
    _images(tmp_path, ["a.png"])
    _write(tmp_path / "train.csv", "img/a.png,cat\nimg/a.png,dog\n")
    val = _write(tmp_path / "val.csv", "img/a.png,cat\nimg/a.png,cow\nimg/a.png,cat,dog\nimg/missing.png,dog\n")
    dm = MultiLabelCSVDataModule(root=str(tmp_path), image_size=8, num_workers=0)
    with pytest.raises(DataValidationError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert f"{val}:2: label(s) 'cow' not in the classes (cat, dog)" in msg
    assert f"{val}:3: 3 columns; expected path,label1;label2" in msg
    assert f"file listed in {val}:4 does not exist" in msg


def test_one_hot_csv_errors_name_file_and_line(tmp_path):
    train = _write(tmp_path / "train.csv", "path,cat,dog\na.png,1,2\nb.png,1\n")
    with pytest.raises(DataValidationError) as e:
        MultiLabelCSVDataModule(root=str(tmp_path), num_workers=0)
    msg = str(e.value)
    assert f"{train}:2: one-hot values must be 0 or 1, got dog='2'" in msg
    assert f"{train}:3: 2 columns, the header has 3 (path,cat,dog)" in msg


def test_read_multilabel_csv_formats(tmp_path):
    rows, onehot, problems = read_multilabel_csv(str(_write(tmp_path / "x.csv", "a.png,x | y\nb.png\n\n")), sep="|")
    assert rows == [("a.png", ["x", "y"], 1), ("b.png", [], 2)] and onehot is None and not problems
    # tools/predict.py's predictions.csv reads back as a names csv (extra columns ignored)
    rows, onehot, problems = read_multilabel_csv(
        str(_write(tmp_path / "p.csv", "path,labels,probs,prob_x\nc.png,x,0.9000,0.900000\n")))
    assert rows == [("c.png", ["x"], 2)] and onehot is None and not problems


# ------------------------------------------------------------------------------------------------ built-in data
def test_builtin_scenes_have_one_to_three_labels_and_a_test_split_of_its_own_seed():
    a = SyntheticShapesMultiLabelDataModule(image_size=24, n_train=6, n_val=4, n_test=5, data_seed=0)
    b = SyntheticShapesMultiLabelDataModule(image_size=24, n_train=6, n_val=4, n_test=5, data_seed=3)
    a.setup("fit")
    b.setup("fit")
    xa, ya = a.datasets["test"].__getitems__(list(range(5)))
    xb, yb = b.datasets["test"].__getitems__(list(range(5)))
    torch.testing.assert_close(xa, xb)  # the held-out split does not move with data_seed
    assert not np.array_equal(a.datasets["train"].images, b.datasets["train"].images)
    train = a.datasets["train"].images
    test = a.datasets["test"].images
    assert not any(np.array_equal(t, s) for t in test for s in train)
    _, labels = generate_multilabel_shapes(200, 24, seed=0, stream=0)
    counts = labels.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and labels.shape == (200, 6)
    assert (labels.sum(0) > 20).all()  # every kind occurs
    assert ya.shape == (5, 6) and ya.dtype == torch.long and xa.shape == (5, 3, 24, 24)


# ------------------------------------------------------------------------------------------------ command line
def _tiny_config(tmp_path: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "default_root_dir": str(tmp_path / "runs"),
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1},
        "model": {"class_path": "vitmha.tasks.MultiLabelClassifier",
                  "init_args": {"backbone_kwargs": TINY, "warmup_epochs": 0, "lr": 0.003, "tune_thresholds": True,
                                "loss": "asl"}},
        "data": {"class_path": "vitmha.data.SyntheticShapesMultiLabelDataModule",
                 "init_args": {"image_size": 16, "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 16}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _logged(run: Path) -> dict:
    with open(run / "metrics.csv") as f:
        return {k: float(v) for r in csv.DictReader(f) for k, v in r.items() if v}


def test_fit_test_predict_through_train_py_with_the_builtin_scenes(tmp_path, capsys):
    from vitmha.cli import cli_main

    cfg = _tiny_config(tmp_path)
    load_tool("train").main(["--config", str(cfg)])
    (run,) = run_dirs(tmp_path / "runs")
    assert {"val/map", "val/map_micro", "val/f1", "val/f1_micro", "val/precision", "val/recall", "val/loss",
            "train/loss"} <= set(_logged(run))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any("val_map" in n for n in ckpts)  # the best by val/map
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["hyper_parameters"]["class_names"] == ["circle", "rectangle", "triangle", "cross", "ring", "star"]
    assert not torch.equal(saved["state_dict"]["thresholds"], torch.full((6,), 0.5))  # tuned on val, kept

    cli_main(["test", "--config", str(cfg), "--ckpt_path", str(last)])
    test_run = run_dirs(tmp_path / "runs")[-1]
    logged = _logged(test_run)
    assert {"test/map", "test/f1", "test/ap_circle", "test/ap_star"} <= set(logged)
    summary = json.loads((test_run / "report_test" / "summary.json").read_text())
    assert summary["task"] == "multilabel"
    for name in ("test/map", "test/map_micro", "test/f1", "test/precision", "test/recall", "test/ap_ring"):
        assert summary["metrics"][name] == pytest.approx(logged[name], abs=1e-6), name
    assert summary["thresholds"] == pytest.approx(saved["state_dict"]["thresholds"].tolist())
    per_class = list(csv.DictReader(open(test_run / "report_test" / "per_class.csv")))
    assert [r["class"] for r in per_class][:2] == ["circle", "rectangle"]

    # vitmha predict writes every label above its threshold; vitmha.load(...).predict gives the same
    folder = tmp_path / "scenes"
    export_multilabel_shapes(str(folder), n_train=2, n_val=2, n_test=3, image_size=16)
    load_tool("predict").main(["--checkpoint", str(last), "--input", str(folder / "images"), "--output",
                               str(tmp_path / "tool"), "--no-progress"])
    rows = list(csv.DictReader(open(tmp_path / "tool" / "predictions.csv")))
    assert len(rows) == 7 and list(rows[0])[:4] == ["path", "labels", "probs", "prob_circle"]
    thr = saved["state_dict"]["thresholds"]
    names = summary["classes"]
    predictions = vitmha.load(last).predict([r["path"] for r in rows])
    for r, p in zip(rows, predictions):
        probs = torch.tensor([float(r[f"prob_{n}"]) for n in names])
        above = [names[i] for i in torch.argsort(probs, descending=True).tolist() if probs[i] > thr[i]]
        assert r["labels"] == ";".join(above) == ";".join(p["labels"])
        assert len(r["probs"].split(";")) == len(above) if above else r["probs"] == ""
        assert torch.allclose(probs, torch.as_tensor(p["probs"]), atol=1e-6)

    report = load_tool("evaluate").main(["--checkpoint", str(last), "--output", str(tmp_path / "eval")])
    assert report["result"]["metrics"]["test/map"] == pytest.approx(logged["test/map"], abs=1e-6)


def test_vitmha_fit_with_the_csv_module_on_a_folder_of_images(tmp_path, capsys):
    from vitmha.cli import cli_main
    from vitmha.inference import load_task, task_kind

    root = Path(export_multilabel_shapes(str(tmp_path / "data"), n_train=16, n_val=8, n_test=8, image_size=16,
                                         shapes=["circle", "cross", "ring"]))
    common = ["--model", "vitmha.tasks.MultiLabelClassifier", "--model.init_args.backbone_kwargs", json.dumps(TINY),
              "--model.init_args.warmup_epochs", "0", "--data", "vitmha.data.MultiLabelCSVDataModule",
              "--data.init_args.root", str(root), "--data.init_args.image_size", "16",
              "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
              "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]
    cli_main(["fit", *common, "--trainer.max_epochs", "1"])
    last = run_dirs(tmp_path / "runs")[0] / "checkpoints" / "last.ckpt"
    task = load_task(str(last))
    assert task_kind(task) == "multilabel" and task.class_names == ["circle", "cross", "ring"]
    assert task.thresholds.tolist() == [0.5, 0.5, 0.5]
    cli_main(["test", *common, "--ckpt_path", str(last)])
    assert "test/map" in _logged(run_dirs(tmp_path / "runs")[-1])

    # a bad csv is one error line naming the file and line
    (root / "val.csv").write_text("images/val_0000.png,circle;hexagon\n")
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *common, "--trainer.max_epochs", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{root / 'val.csv'}:1: label(s) 'hexagon' not in the classes" in err
    assert "Traceback" not in err


def test_a_checkpoint_tested_on_data_with_other_classes_is_refused(tmp_path, capsys):
    from vitmha.cli import cli_main

    cfg = _tiny_config(tmp_path)
    load_tool("train").main(["--config", str(cfg), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"])
    last = run_dirs(tmp_path / "runs")[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        cli_main(["test", "--config", str(cfg), "--ckpt_path", str(last),
                  "--data.init_args.shapes", json.dumps(["star", "ring", "cross", "triangle", "rectangle", "circle"])])
    assert "differ from the data's" in capsys.readouterr().err
