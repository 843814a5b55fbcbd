"""tools/evaluate.py and vitmha.reports: report files whose numbers are the metrics the task logs."""
from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from tests.helpers import CLF_CLASSES, MEAN, STD, assert_real_png, load_tool  # noqa: F401
from vitmha.inference import load_task
from vitmha.reports import EvaluationReport

evaluate = load_tool("evaluate")
SHAPES = ["background", "circle", "rectangle", "triangle"]


def _config(path, section):
    path.write_text(yaml.safe_dump({"data": section}))
    return path


def clf_config(tmp_path, ckpts):
    return _config(tmp_path / "clf.yaml", {"class_path": "vitmha.data.ImageFolderDataModule", "init_args": dict(
        root=str(ckpts["clf_root"]), image_size=16, batch_size=4, num_workers=0, mean=MEAN, std=STD)})


def seg_config(tmp_path, ckpts):
    return _config(tmp_path / "seg.yaml", {"class_path": "vitmha.data.SegmentationFolderDataModule", "init_args": dict(
        root=str(ckpts["seg_root"]), num_classes=4, classes=SHAPES, image_size=32, batch_size=3, num_workers=0)})


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_classification_report_equals_the_logged_test_metrics(ckpts, tmp_path):
    out = tmp_path / "report"
    res = evaluate.main(["--checkpoint", ckpts["clf"], "--config", clf_config(tmp_path, ckpts), "--split", "test",
                         "--output", out])
    summary = json.loads((out / "summary.json").read_text())
    logged = res["logged"]
    assert set(summary["metrics"]) == {"test/acc", "test/f1", "test/precision", "test/recall"}
    for k, v in summary["metrics"].items():
        assert v == pytest.approx(logged[k], abs=1e-7), k
    rows = _csv(out / "per_class.csv")
    assert [r["class"] for r in rows] == CLF_CLASSES
    assert sum(int(r["support"]) for r in rows) == summary["num_samples"] == 9
    assert sum(float(r["f1"]) for r in rows) / 3 == pytest.approx(logged["test/f1"], abs=1e-5)  # macro
    assert all(0.0 <= float(r["auroc"]) <= 1.0 for r in rows)
    auroc = json.loads((out / "auroc.json").read_text())
    assert set(auroc["per_class"]) == set(CLF_CLASSES)
    confusion = _csv(out / "confusion_matrix.csv")
    assert sum(int(r[c]) for r in confusion for c in CLF_CLASSES) == 9
    assert_real_png(out / "confusion_matrix.png")
    assert_real_png(out / "roc_curves.png")


def test_segmentation_report_equals_the_logged_val_metrics(ckpts, tmp_path):
    out = tmp_path / "report"
    res = evaluate.main(["--checkpoint", ckpts["seg"], "--config", seg_config(tmp_path, ckpts), "--split", "val",
                         "--output", out, "--samples", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert {"val/miou", "val/pixel_acc", "val/dice", "val/iou_0"} <= set(summary["metrics"])
    for k, v in summary["metrics"].items():
        if v is None:  # NaN IoU of a class absent from truth and prediction
            continue
        assert v == pytest.approx(res["logged"][k], abs=1e-7), k
    rows = _csv(out / "per_class_iou.csv")
    assert [r["class"] for r in rows] == SHAPES
    assert sum(int(r["pixels"]) for r in rows) == summary["pixels"] > 0
    assert_real_png(out / "samples.png")
    assert_real_png(out / "confusion_matrix.png")


def test_without_config_the_checkpoints_own_data_module_is_rebuilt(ckpts, tmp_path):
    ckpt = torch.load(ckpts["clf"], map_location="cpu", weights_only=True)
    ckpt["datamodule_hyper_parameters"]["_class_path"] = "vitmha.data.ImageFolderDataModule"  # as LightningCLI saves
    path = tmp_path / "cli.ckpt"
    torch.save(ckpt, path)
    res = evaluate.main(["--checkpoint", path, "--split", "val", "--output", tmp_path / "r"])
    assert res["result"]["metrics"]["val/acc"] == pytest.approx(res["logged"]["val/acc"])


def test_callback_writes_into_the_runs_log_dir_at_test_end(ckpts, tmp_path):
    from vitmha.data import SegmentationFolderDataModule

    task = load_task(str(ckpts["seg"]))
    dm = SegmentationFolderDataModule(root=str(ckpts["seg_root"]), num_classes=4, image_size=32, batch_size=2,
                                      num_workers=0)
    report = EvaluationReport()
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"), callbacks=[report],
                        enable_progress_bar=False, enable_model_summary=False)
    dm.setup("fit")
    logged = trainer.test(task, dataloaders=dm.val_dataloader(), verbose=False)[0]
    folder = tmp_path / "logs" / "version_0" / "report_test"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["test/miou"] == pytest.approx(logged["test/miou"], abs=1e-7)
    assert_real_png(folder / "samples.png")
    assert "predict_logits" not in task.__dict__  # the capture is removed after the epoch


def test_callback_ignores_validation_unless_asked(ckpts, tmp_path):
    from vitmha.data import ImageFolderDataModule

    task = load_task(str(ckpts["clf"]))
    dm = ImageFolderDataModule(root=str(ckpts["clf_root"]), image_size=16, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[EvaluationReport(tmp_path / "r")],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(task, datamodule=dm, verbose=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("init_args, message", [
    ({"root": "missing", "image_size": 16}, "missing: data root does not exist"),
    ({"root": ".", "image_sze": 16}, "vitmha.data.ImageFolderDataModule: Option 'image_sze' is not accepted"),
])
def test_bad_config_is_a_clean_error(ckpts, tmp_path, capsys, init_args, message):
    init_args = {**init_args, "root": str(tmp_path / init_args["root"])}
    cfg = _config(tmp_path / "bad.yaml", {"class_path": "vitmha.data.ImageFolderDataModule", "init_args": init_args})
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", ckpts["clf"], "--config", cfg, "--output", tmp_path / "o"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
