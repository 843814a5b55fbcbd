"""The defects a new user met in the first hour (issue 31): self-contained checkpoints, exports that say their
preprocessing and name their extra, a checkpoint read once, no weights_only warning."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitmha
from vitmha.cli import cli_main

from tests.helpers import CLF_BACKBONE, MEAN, STD, load_tool, make_folder, run_dirs

export = load_tool("export")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A classifier fine-tuned through the CLI from a weights file (`pretrained: <file>`), which is then moved
    away: {"last", "config", "root", "weights"}."""
    base = tmp_path_factory.mktemp("finetuned")
    weights = base / "weights" / "tiny.safetensors"
    from vitmha.models import save_timm_safetensors

    save_timm_safetensors(vitmha.create_backbone("vit_tiny_patch16_224", num_classes=0, **CLF_BACKBONE), weights)
    root = make_folder(base / "colours")
    cli_main(["fit", "--seed_everything", "0", "--model", "vitmha.tasks.ImageClassifier",
              "--model.init_args.pretrained", str(weights),
              "--model.init_args.backbone_kwargs", json.dumps(CLF_BACKBONE), "--model.init_args.warmup_epochs", "0",
              "--data", "vitmha.data.ImageFolderDataModule", "--data.init_args.root", str(root),
              "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4",
              "--data.init_args.mean", json.dumps(MEAN), "--data.init_args.std", json.dumps(STD),
              "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(base / "runs"),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    run = run_dirs(base / "runs")[0]
    shutil.move(str(weights.parent), str(base / "moved_away"))
    return {"last": run / "checkpoints" / "last.ckpt", "config": run / "config.yaml", "root": root}


def test_a_checkpoint_loads_tests_predicts_and_exports_after_its_pretrained_file_moved(finetuned, tmp_path, capsys):
    from vitmha.tasks import ImageClassifier

    task = ImageClassifier.load_from_checkpoint(finetuned["last"])
    assert str(task.hparams.pretrained).endswith("tiny.safetensors")  # the hyper-parameter is kept as it was
    files = sorted(str(p) for p in (finetuned["root"] / "test").rglob("*.png"))
    predictions = vitmha.load(finetuned["last"]).predict(files)
    assert len(predictions) == len(files) and all(p["label"] in ("blue", "green", "red") for p in predictions)
    cli_main(["test", "--config", str(finetuned["config"]), "--ckpt_path", str(finetuned["last"]),
              "--trainer.default_root_dir", str(tmp_path)])
    assert "test/acc" in capsys.readouterr().out
    info = export.main(["--checkpoint", finetuned["last"], "--format", "safetensors", "--output",
                        tmp_path / "bb.safetensors"])
    assert Path(info["preprocess"]).is_file()


def test_onnx_without_its_packages_names_the_extra(finetuned, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        export.main(["--checkpoint", finetuned["last"], "--format", "onnx", "--output", tmp_path / "m.onnx"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == ["error: --format onnx needs onnxscript, which are not installed: "
                                           "pip install 'vitmha[export]'"]
    assert not (tmp_path / "m.onnx").exists()


def test_the_onnx_export_says_its_preprocessing_and_following_it_gives_the_same_probabilities(finetuned, tmp_path):
    """A deployer who follows the written record by hand (PIL resize, /255, mean/std) and onnxruntime gets
    the probabilities vitmha gives."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "m.onnx"
    info = export.main(["--checkpoint", finetuned["last"], "--format", "onnx", "--output", out])
    record = json.loads(Path(info["preprocess"]).read_text())
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["vitmha.preprocess"]) == record
    assert record["mean"] == pytest.approx(MEAN) and record["std"] == pytest.approx(STD)
    assert record["classes"] == ["blue", "green", "red"] and record["resize"] == [16, 16]
    path = sorted((finetuned["root"] / "test").rglob("*.png"))[0]
    img = Image.open(path).convert("RGB").resize(tuple(record["resize"]), Image.BICUBIC)
    x = (np.asarray(img, np.float32) / 255 - np.array(record["mean"], np.float32)) / np.array(record["std"], np.float32)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
    by_hand = torch.from_numpy(logits).softmax(-1).numpy()
    want = vitmha.load(finetuned["last"]).predict(str(path))["probs"]
    assert np.abs(by_hand - want).max() < 0.02  # PIL's bicubic vs OpenCV's: a few thousandths here


def test_the_ckpt_path_is_read_once_and_without_a_weights_only_warning(finetuned, tmp_path, capsys, caplog,
                                                                       monkeypatch):
    import vitmha.checkpoints as checkpoints

    reads = []
    real = checkpoints.load_torch_file
    monkeypatch.setattr(checkpoints, "load_torch_file", lambda path, **kw: reads.append(str(path)) or real(path, **kw))
    cli_main(["validate", "--config", str(finetuned["config"]), "--ckpt_path", str(finetuned["last"]),
              "--trainer.default_root_dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert reads == [str(finetuned["last"])]
    assert "weights_only" not in captured.out + captured.err + caplog.text


def test_a_command_called_from_python_leaves_the_callers_logging_as_it_was(finetuned, tmp_path, caplog):
    """`vitmha evaluate` quiets Lightning's banner for its own output; called as ``main(argv)`` it must put the
    level and the warning filters back, or the caller's later INFO records (e.g. the data modules' "skipped N
    file(s)") vanish."""
    import logging
    import warnings

    from vitmha.commands import evaluate

    lightning_log = logging.getLogger("lightning.pytorch")
    level, filters = lightning_log.level, list(warnings.filters)
    evaluate.main(["--checkpoint", str(finetuned["last"]), "--config", str(finetuned["config"]),
                   "--output", str(tmp_path / "report"), "--device", "cpu", "--num-workers", "0"])
    assert (tmp_path / "report").is_dir()
    assert lightning_log.level == level and warnings.filters == filters
    from lightning.pytorch.utilities import rank_zero_info

    with caplog.at_level("INFO"):
        rank_zero_info("still heard")
    assert any(r.getMessage() == "still heard" for r in caplog.records)
