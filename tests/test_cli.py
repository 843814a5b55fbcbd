"""The vitmha command line: fit/validate/test/predict on tiny data, run folders, config errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from vitmha.cli import cli_main

from tests.helpers import TINY_SEG_VIT, TINY_VIT, classifier_args, run_dirs  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

# a 4k-parameter ViT on 8x8 digits: every command below runs in a few seconds
def metric_columns(run: Path) -> set[str]:
    with open(run / "metrics.csv") as f:
        return set(next(csv.reader(f)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One 2-epoch classifier run shared by the tests that only read what it wrote."""
    root = tmp_path_factory.mktemp("fit")
    cli_main(["fit", *classifier_args(root, "--trainer.max_epochs", "2")])
    return root


def test_fit_logs_the_contract_metrics_to_metrics_csv(fitted):
    (run,) = run_dirs(fitted)
    expected = {"train/loss", "val/loss", "val/acc", "val/acc_top5", "val/f1", "val/precision", "val/recall"}
    assert expected <= metric_columns(run)


def test_fit_saves_the_resolved_config_and_tensorboard_events(fitted):
    (run,) = run_dirs(fitted)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "vitmha.tasks.ImageClassifier"
    assert config["trainer"]["max_epochs"] == 2
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_fit_keeps_last_and_best_checkpoint_with_flat_names(fitted):
    (run,) = run_dirs(fitted)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names
    best = [n for n in names if n != "last.ckpt"]
    assert len(best) == 1 and best[0].startswith("epoch") and "val_acc" in best[0], names
    assert not [p for p in (run / "checkpoints").rglob("*") if p.is_dir()]  # "/" in val/acc made no folder


def test_checkpoints_load_with_weights_only(fitted):
    import torch

    (run,) = run_dirs(fitted)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"]["num_classes"] == 10  # linked from the data


def test_validate_and_test_from_checkpoint_log_their_metrics(fitted, tmp_path):
    last = run_dirs(fitted)[0] / "checkpoints" / "last.ckpt"
    cli_main(["validate", *classifier_args(tmp_path), "--ckpt_path", str(last)])
    cli_main(["test", *classifier_args(tmp_path), "--ckpt_path", str(last)])
    val_run, test_run = run_dirs(tmp_path)
    assert {"val/acc", "val/f1", "val/loss"} <= metric_columns(val_run)
    assert {"test/acc", "test/acc_top5", "test/f1", "test/precision", "test/recall"} <= metric_columns(test_run)
    # `test` writes the evaluation report by default, and its numbers are the logged ones
    report = test_run / "report_test"
    assert {"confusion_matrix.png", "per_class.csv", "roc_curves.png", "summary.json"} <= {
        p.name for p in report.iterdir()}
    import json
    summary = json.loads((report / "summary.json").read_text())
    with open(test_run / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("test/acc")][-1]
    assert abs(summary["metrics"]["test/acc"] - float(logged["test/acc"])) < 1e-6


def test_predict_writes_topk_csv(fitted, tmp_path):
    last = run_dirs(fitted)[0] / "checkpoints" / "last.ckpt"
    out = tmp_path / "preds"
    digits = sorted(str(p) for p in (REPO / "data" / "samples").glob("digit_*.png"))
    cli_main(["predict", "--checkpoint", str(last), "--input", *digits, "--output", str(out), "--topk", "3",
              "--no-progress"])
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == digits
    assert list(rows[0]) == ["path", "label1", "prob1", "label2", "prob2", "label3", "prob3"]
    assert rows[0]["label1"] in [str(d) for d in range(10)]
    probs = [float(rows[0][f"prob{i}"]) for i in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5


def test_segmentation_fit_monitors_miou_and_predict_writes_masks_and_overlays(tmp_path):
    from PIL import Image

    args = [
        "--seed_everything", "0",
        "--model", "vitmha.tasks.SemanticSegmenter",
        "--model.init_args.backbone_kwargs", TINY_SEG_VIT,
        "--model.init_args.warmup_epochs", "0",
        "--data", "vitmha.data.SyntheticShapesDataModule",
        "--data.init_args.image_size", "16",
        "--data.init_args.n_train", "16",
        "--data.init_args.n_val", "8",
        "--data.init_args.n_test", "4",
        "--data.init_args.batch_size", "4",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_model_summary", "false",
    ]
    cli_main(["fit", *args, "--trainer.max_epochs", "1"])
    (run,) = run_dirs(tmp_path)
    assert {"val/miou", "val/pixel_acc", "val/dice"} <= metric_columns(run)
    assert [p.name for p in (run / "checkpoints").glob("epoch*")][0].startswith("epoch000-val_miou")

    out = tmp_path / "masks"
    shapes = sorted(str(p) for p in (REPO / "data" / "samples").glob("shapes_?.png"))
    cli_main(["predict", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--input", *shapes, "--output",
              str(out), "--no-progress"])
    masks = sorted(out.glob("*_mask.png"))
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(masks) == len(overlays) == len(shapes) == 2
    mask = Image.open(masks[0])
    assert mask.mode == "L" and mask.size == Image.open(shapes[0]).size and max(mask.getdata()) < 4
    assert Image.open(overlays[0]).mode == "RGB"


@pytest.mark.parametrize("head", ["linear", "mask_transformer", "uper", "setr_pup"])
def test_every_segmentation_head_trains_end_to_end_through_the_cli(tmp_path, head):
    """`vitmha fit` on a segmentation folder (png/jpg, 255 bands), then resumed to 4 epochs: the loss falls,
    and both the backbone and the head keep changing after the first epoch."""
    import torch

    from vitmha.data import export_shapes_folder

    root = export_shapes_folder(str(tmp_path / "seg"), n_train=16, n_val=4, image_size=16)
    head_kwargs = {"channels": 8} if head in ("uper", "setr_pup") else {}
    args = ["--seed_everything", "0", "--model", "vitmha.tasks.SemanticSegmenter",
            "--model.init_args.backbone_kwargs", TINY_SEG_VIT, "--model.init_args.head", head,
            "--model.init_args.head_kwargs", json.dumps(head_kwargs), "--model.init_args.lr", "0.003",
            "--model.init_args.warmup_epochs", "0",
            "--data", "vitmha.data.SegmentationFolderDataModule", "--data.init_args.root", root,
            "--data.init_args.num_classes", "4", "--data.init_args.image_size", "16",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.log_every_n_steps", "1",
            "--trainer.enable_model_summary", "false", "--trainer.enable_progress_bar", "false"]
    cli_main(["fit", *args, "--trainer.max_epochs", "1"])
    first = run_dirs(tmp_path / "runs")[0]
    after1 = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    cli_main(["fit", *args, "--trainer.max_epochs", "4", "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])
    second = run_dirs(tmp_path / "runs")[1]
    after4 = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    losses = []
    for run in (first, second):
        with open(run / "metrics.csv") as f:
            losses += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]), losses
    for part in ("model.backbone.", "model.head."):
        keys = [k for k in after1 if k.startswith(part) and after1[k].is_floating_point()]
        assert keys and any(not torch.equal(after1[k], after4[k]) for k in keys), part


def test_print_config_prints_yaml_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"])
    assert exc.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "vitmha.data.DigitsDataModule"
    assert config["model"]["init_args"]["backbone_kwargs"]["img_size"] == config["data"]["init_args"]["image_size"]


def test_data_gets_num_classes_and_backbone_from_the_links(tmp_path):
    from vitmha.cli import VitmhaCLI

    cli = VitmhaCLI(args=classifier_args(tmp_path, "--model.init_args.backbone", "vit_small_patch16_224"), run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10
    assert cli.datamodule.hparams.backbone == "vit_small_patch16_224"  # normalises with its mean/std


def test_misspelt_key_is_named_in_one_clean_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *classifier_args(tmp_path), "--model.init_args.lerning_rate", "0.1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "lerning_rate" in err and "error:" in err
    assert "Traceback" not in err and "usage:" not in err


def test_wrong_type_is_named_in_one_clean_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *classifier_args(tmp_path), "--trainer.max_epochs", "three"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert 'key "trainer.max_epochs"' in err and "three" in err and "Traceback" not in err


def folder_args(root: Path, data_root: Path) -> list[str]:
    args = classifier_args(root)
    args[args.index("vitmha.data.DigitsDataModule")] = "vitmha.data.ImageFolderDataModule"
    return [*args, "--data.init_args.root", str(data_root), "--data.init_args.num_workers", "0"]


def test_a_missing_data_folder_prints_one_clean_error_with_exit_code_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *folder_args(tmp_path, tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and str(tmp_path / "nowhere") in err and "Traceback" not in err


def test_a_broken_image_found_in_setup_prints_one_clean_error_with_exit_code_2(capsys, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / cls / "ok.png")
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *folder_args(tmp_path, tmp_path / "data")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error: ") and "broken.png" in err and "Traceback" not in err


class RaiseOnTrainStart(Callback):
    """Stands in for a bug: an ordinary exception from inside the run."""

    def on_train_start(self, trainer, pl_module):
        raise KeyError("a bug")


def test_real_bugs_keep_their_traceback(tmp_path):
    with pytest.raises(KeyError, match="a bug"):
        cli_main(["fit", *classifier_args(tmp_path), "--trainer.callbacks", "tests.test_cli.RaiseOnTrainStart"])


def test_train_script_runs_fit_from_a_config(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
           *classifier_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_train_script_help_shows_fit_options():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--ckpt_path" in proc.stdout and "--trainer.max_epochs" in proc.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_parses_and_starts_with_its_command(config, capsys):
    text = (REPO / "configs" / config).read_text()
    assert text.startswith("# ") and f"configs/{config}" in text.splitlines()[0]
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exc.value.code == 0, capsys.readouterr().err


def test_the_best_checkpoint_follows_the_tasks_validation_metric():
    from vitmha.callbacks import _checkpoint_filename, task_monitor as default_monitor
    from vitmha.tasks import ImageClassifier, SemanticSegmenter

    assert default_monitor(ImageClassifier.__new__(ImageClassifier)) == ("val/acc", "max")
    assert default_monitor(SemanticSegmenter.__new__(SemanticSegmenter)) == ("val/miou", "max")

    class Custom:
        monitor = "val/loss"

    assert default_monitor(Custom()) == ("val/loss", "min")
    assert "/" not in _checkpoint_filename("val/miou").replace("{val/miou", "")


def test_rich_progress_bar_only_on_a_terminal(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from vitmha.trainer import _progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert isinstance(_progress_bar(), RichProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert isinstance(_progress_bar(), TQDMProgressBar) and not isinstance(_progress_bar(), RichProgressBar)
