"""tools/predict.py: predictions.csv for classifiers, index masks and overlays for segmenters."""
from __future__ import annotations

import csv
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import (CLF_BACKBONE, CLF_CLASSES, MEAN, STD, assert_real_png, load_tool,  # noqa: F401
                                     make_folder, run_tool)
from vitmha.inference import load_task, normalize_only, preprocess_config, read_checkpoint


predict = load_tool("predict")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_classification_writes_one_row_per_image_with_topk(ckpts, tmp_path):
    predict.main(["--checkpoint", ckpts["clf"], "--input", ckpts["clf_root"] / "val", ckpts["clf_root"] / "test" / "red",
                  "--output", tmp_path, "--topk", "2", "--batch-size", "4", "--no-progress"])
    rows = _rows(tmp_path / "predictions.csv")
    assert rows[0] == ["path", "label1", "prob1", "label2", "prob2"]
    assert len(rows) == 1 + 9 + 3
    for r in rows[1:]:
        assert r[1] in CLF_CLASSES and r[3] in CLF_CLASSES and r[1] != r[3]
        assert 1.0 >= float(r[2]) >= float(r[4]) >= 0.0


def test_an_output_folder_with_a_trailing_slash_is_printed_as_one_path(ckpts, tmp_path, capsys):
    predict.main(["--checkpoint", ckpts["clf"], "--input", ckpts["clf_root"] / "test" / "red",
                  "--output", f"{tmp_path}/preds/", "--no-progress"])
    out = capsys.readouterr().out
    assert f"{tmp_path}/preds/predictions.csv" in out and "//" not in out
    assert len(_rows(tmp_path / "preds" / "predictions.csv")) == 1 + 3


def test_classification_probabilities_equal_the_task_on_the_data_modules_eval_batches(ckpts, tmp_path):
    from vitmha.data import ImageFolderDataModule
    from tests.helpers import MEAN, STD

    predict.main(["--checkpoint", ckpts["clf"], "--input", ckpts["clf_root"] / "val", "--output", tmp_path,
                  "--topk", "3", "--no-progress"])
    got = {r[0]: {r[1]: float(r[2]), r[3]: float(r[4]), r[5]: float(r[6])} for r in _rows(tmp_path / "predictions.csv")[1:]}
    dm = ImageFolderDataModule(root=str(ckpts["clf_root"]), image_size=16, batch_size=16, num_workers=0, mean=MEAN, std=STD)
    dm.setup("fit")
    task = load_task(str(ckpts["clf"]))
    ds = dm.datasets["val"]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        probs = task(x).softmax(-1)
    for (path, _), p in zip(ds.items, probs):
        for c, name in enumerate(CLF_CLASSES):
            assert got[path][name] == pytest.approx(float(p[c]), abs=2e-6)


def test_topk_is_capped_at_the_number_of_classes(ckpts, tmp_path):
    predict.main(["--checkpoint", ckpts["clf"], "--input", ckpts["clf_root"] / "val" / "red", "--output", tmp_path,
                  "--no-progress"])
    assert len(_rows(tmp_path / "predictions.csv")[0]) == 1 + 2 * 3


def _odd_images(tmp_path):
    rng = np.random.default_rng(1)
    small = tmp_path / "in" / "small.png"   # smaller than the 32-px training size: resized and back
    big = tmp_path / "in" / "big.jpg"       # larger: sliding windows at full resolution
    small.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (27, 45, 3), dtype=np.uint8)).save(small)
    Image.fromarray(rng.integers(0, 255, (70, 81, 3), dtype=np.uint8)).save(big)
    return small, big


def test_segmentation_writes_masks_and_overlays_at_the_original_size(ckpts, tmp_path):
    small, big = _odd_images(tmp_path)
    out = tmp_path / "out"
    predict.main(["--checkpoint", ckpts["seg"], "--input", small, big, ckpts["seg_root"] / "val" / "images" / "s0000.png",
                  "--output", out, "--no-progress"])
    for stem, (w, h) in (("small", (45, 27)), ("big", (81, 70)), ("s0000", (32, 32))):
        with Image.open(out / f"{stem}_mask.png") as im:
            assert im.mode == "L" and im.size == (w, h)
            assert np.asarray(im).max() < 4
        assert_real_png(out / f"{stem}_overlay.png", (w, h))


def test_files_sharing_a_stem_get_distinct_outputs(ckpts, tmp_path):
    src = ckpts["seg_root"] / "val" / "images" / "s0000.png"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s0000.png").write_bytes(src.read_bytes())
    predict.main(["--checkpoint", ckpts["seg"], "--input", src, tmp_path / "a", "--output", tmp_path / "o",
                  "--no-progress"])
    assert sorted(p.name for p in (tmp_path / "o").glob("*_mask.png")) == ["a_s0000_mask.png", "s0000_mask.png"]


def test_large_images_use_the_tasks_sliding_window(ckpts, tmp_path):
    _, big = _odd_images(tmp_path)
    out = tmp_path / "out"
    predict.main(["--checkpoint", ckpts["seg"], "--input", big, "--output", out, "--no-progress"])
    ckpt = read_checkpoint(str(ckpts["seg"]))
    task = load_task(str(ckpts["seg"]))
    pre = preprocess_config(task, ckpt)
    img = np.asarray(Image.open(big).convert("RGB"))
    with torch.no_grad():
        want = task.sliding_window_inference(normalize_only(img, pre)[None], window=32)[0].argmax(0).numpy()
    assert np.array_equal(np.asarray(Image.open(out / "big_mask.png")), want)


def test_missing_checkpoint_is_one_clean_error(tmp_path):
    r = run_tool("predict", "--checkpoint", tmp_path / "none.ckpt", "--input", tmp_path, "--output", tmp_path / "o")
    assert r.returncode == 2
    assert "none.ckpt: checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def test_missing_input_exits_2_naming_it(ckpts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", ckpts["clf"], "--input", tmp_path / "nope.png", "--output", tmp_path / "o"])
    assert e.value.code == 2
    assert "nope.png: no such file" in capsys.readouterr().err


def test_predict_tool_cli_predict_and_cli_test_agree_with_tta_and_ema(tmp_path, capsys):
    """One checkpoint trained with mirror-image TTA and EMA: tools/predict.py and `vitmha predict` write the
    same probabilities, and `vitmha test`'s report equals the metric it logs."""
    import csv
    import json

    from vitmha.cli import cli_main

    root = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    common = ["--model", "vitmha.tasks.ImageClassifier", "--model.init_args.backbone_kwargs", json.dumps(CLF_BACKBONE),
              "--model.init_args.tta_hflip", "true", "--model.init_args.ema_decay", "0.9",
              "--model.init_args.warmup_epochs", "0", "--model.init_args.lr", "0.003",
              "--data", "vitmha.data.ImageFolderDataModule", "--data.init_args.root", str(root),
              "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4",
              "--data.init_args.mean", json.dumps(MEAN), "--data.init_args.std", json.dumps(STD),
              "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false"]
    cli_main(["fit", *common, "--trainer.max_epochs", "2"])
    last = run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    summary_lines = capsys.readouterr().out  # the run ends with what the user needs next
    assert "val/acc: best" in summary_lines and "next: vitmha test --config" in summary_lines
    assert f"--ckpt_path {last}" in summary_lines
    files = sorted(str(p) for p in (root / "test").rglob("*.png"))

    # three ways users predict: the command, Trainer.predict on a data module, and vitmha.load in Python
    predict.main(["--checkpoint", last, "--input", *files, "--output", tmp_path / "tool", "--no-progress"])
    import vitmha
    from vitmha.data import ImageFolderDataModule
    from vitmha.predictions import PredictionWriter

    loaded = vitmha.load(last)
    dm = ImageFolderDataModule(root=str(root), image_size=16, batch_size=4, mean=MEAN, std=STD, predict_paths=files)
    vitmha.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[PredictionWriter(str(tmp_path / "cli"))]).predict(loaded.task, datamodule=dm)
    in_python = {f: p for f, p in zip(files, loaded.predict(files))}

    def probs(path):
        return {r["path"]: {r[f"label{i}"]: float(r[f"prob{i}"]) for i in (1, 2, 3)}
                for r in csv.DictReader(open(path))}

    a, b = probs(tmp_path / "cli" / "predictions.csv"), probs(tmp_path / "tool" / "predictions.csv")
    assert set(a) == set(b) == set(files)
    for f in files:
        assert a[f].keys() == b[f].keys()
        assert in_python[f]["label"] == max(b[f], key=b[f].get)
        for k in a[f]:
            assert abs(a[f][k] - b[f][k]) <= 2e-6, (f, k)
            assert abs(float(in_python[f]["probs"][CLF_CLASSES.index(k)]) - b[f][k]) <= 2e-6, (f, k)

    cli_main(["test", *common, "--ckpt_path", str(last)])
    test_dir = next(run.glob("lightning_logs/version_*/report_test")).parent
    logged = {k: float(v) for r in csv.DictReader(open(test_dir / "metrics.csv")) for k, v in r.items()
              if k.startswith("test/") and v}
    summary = json.loads((test_dir / "report_test" / "summary.json").read_text())["metrics"]
    for name in ("test/acc", "test/f1", "test/precision", "test/recall"):
        assert summary[name] == pytest.approx(logged[name], abs=1e-7), name
    assert "report: " + str(test_dir / "report_test") in capsys.readouterr().out


def test_the_mask_writer_keeps_files_that_share_a_stem_apart(tmp_path):
    """One mask/overlay writer and one naming rule for `vitmha predict`, vitmha.load and Trainer.predict."""
    from vitmha.predictions import MaskFiles

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(tmp_path / d / "x.png")
    writer = MaskFiles(str(tmp_path / "out"))
    masks = [np.ones((6, 8), np.int64), np.full((6, 8), 2, np.int64)]
    writer.write([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")], [{"mask": m} for m in masks],
                 [np.full((6, 8, 3), 90, np.uint8)] * 2)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["b_x_mask.png", "b_x_overlay.png", "x_mask.png", "x_overlay.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "b_x_mask.png")).max() == 2
