"""vitmha.fusion and `vitmha soup` / `vitmha evaluate --checkpoint a b`: soups, WiSE-FT and ensembles against
hand-computed references (averaged state dicts, torch's AveragedModel, the members' own probabilities)."""
from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from tests.helpers import CLF_BACKBONE, MEAN, STD, load_tool, make_folder, randomize, run_tool
from vitmha.fusion import (EnsembleTask, FusionError, average_state_dicts, greedy_soup, parse_alphas,
                           pretrained_task, wise_ft, wise_keys)
from vitmha.inference import load_task, read_checkpoint

soup_cmd = load_tool("soup")
evaluate = load_tool("evaluate")
predict = load_tool("predict")


def _trainer(root) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def _datamodule(root):
    from vitmha.data import ImageFolderDataModule

    return ImageFolderDataModule(root=str(root), image_size=16, batch_size=4, num_workers=0, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short fine-tunes of one tiny 'pretrained' ViT (saved in timm's layout with a 1000-class head, so
    each run trains a new 3-class head) on a colour ImageFolder, and a config of that data."""
    from vitmha.models import create_backbone
    from vitmha.models.weights import save_timm_safetensors
    from vitmha.tasks import ImageClassifier

    base = tmp_path_factory.mktemp("fusion")
    root = make_folder(base / "colours")
    pre = base / "pretrained.safetensors"
    save_timm_safetensors(randomize(create_backbone("vit_tiny_patch16_224", **CLF_BACKBONE), 1), pre)
    paths = []
    for seed, lr in ((0, 3e-3), (1, 1e-2), (2, 3e-2)):
        L.seed_everything(seed, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task = ImageClassifier(num_classes=3, pretrained=str(pre), backbone_kwargs=CLF_BACKBONE,
                                   warmup_epochs=0, lr=lr)
            tr = _trainer(base)
            tr.fit(task, datamodule=_datamodule(root))
        tr.save_checkpoint(base / f"ft{seed}.ckpt")
        paths.append(base / f"ft{seed}.ckpt")
    config = base / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "vitmha.data.ImageFolderDataModule", "init_args": dict(
        root=str(root), image_size=16, batch_size=4, num_workers=0, mean=MEAN, std=STD)}}))
    return {"ckpts": paths, "config": config, "root": root, "pretrained": pre, "base": base}


def _sd(path):
    return read_checkpoint(str(path))["state_dict"]


# ------------------------------------------------------------------------------------------------ soups
def test_uniform_soup_is_the_hand_average_and_torchs_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)) for _ in range(3)]
    sds = [m.state_dict() for m in models]
    soup = average_state_dicts(sds)
    for k in sds[0]:
        assert torch.allclose(soup[k], (sds[0][k] + sds[1][k] + sds[2][k]) / 3, atol=1e-7, rtol=0), k
    swa = AveragedModel(models[0])  # a running mean: the first update copies, the next ones average
    for m in models:
        swa.update_parameters(m)
    for k, v in swa.module.state_dict().items():
        assert torch.allclose(soup[k], v, atol=1e-6, rtol=0), k
    weighted = average_state_dicts(sds[:2], weights=[3, 1])
    assert torch.allclose(weighted["0.weight"], 0.75 * sds[0]["0.weight"] + 0.25 * sds[1]["0.weight"], atol=1e-7)


def test_averaging_keeps_integer_buffers_and_dtypes():
    a = {"w": torch.ones(2, dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.zeros(2, dtype=torch.float16), "n": torch.tensor(5)}
    out = average_state_dicts([a, b])
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], torch.full((2,), 0.5, dtype=torch.float16))
    assert int(out["n"]) == 3


def test_greedy_soup_keeps_exactly_the_ingredients_that_help_on_a_toy():
    # score = -|w|: the best soups average towards 0. Alone: d (-0.5) > a (-1) > b (-1.2) > c (-3).
    # d+a -> 0.25 (kept), d+a+b -> -0.233 (kept), d+a+b+c -> 0.575 (worse: dropped)
    values = {"a": 1.0, "b": -1.2, "c": 3.0, "d": -0.5}
    sds = [{"w": torch.tensor([v])} for v in values.values()]
    calls = []

    def score(sd):
        calls.append(float(sd["w"]))
        return -abs(float(sd["w"]))

    g = greedy_soup(sds, score)
    assert g.order == [3, 0, 1, 2]
    assert g.ingredients == [3, 0, 1]
    assert [kept for _, _, kept in g.trials] == [True, True, False]
    assert float(g.state_dict["w"]) == pytest.approx((-0.5 + 1.0 - 1.2) / 3)
    assert g.score == pytest.approx(-0.7 / 3)
    assert len(calls) == 4 + 3  # each alone, then each candidate soup once
    low = greedy_soup(sds, lambda sd: abs(float(sd["w"])), mode="min")  # the same as a loss
    assert low.ingredients == [3, 0, 1]


def test_greedy_soup_keeps_an_ingredient_only_when_validation_rises():
    sds = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([0.5])}]
    g = greedy_soup(sds, lambda sd: 1.0)  # every soup scores the same: a tie adds nothing
    assert g.ingredients == [0] and [kept for _, _, kept in g.trials] == [False, False]
    assert torch.equal(g.state_dict["w"], sds[0]["w"])
    # score = w rounded down to 0.1: the best alone is 2.0; with 1.0 the soup scores 1.5 (falls, rejected)
    g = greedy_soup(sds, lambda sd: float(sd["w"]))
    assert g.order == [1, 0, 2] and g.ingredients == [1] and g.score == 2.0


def test_alphas_parse_and_refuse():
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0.2,0.8") == [0.2, 0.8]
    assert len(parse_alphas("0:1:0.1")) == 11
    for bad in ("1.5", "x", "1:0:0.1", "0:1:0"):
        with pytest.raises(FusionError, match="--alpha"):
            parse_alphas(bad)


# ------------------------------------------------------------------------------------------------ WiSE-FT
def test_wise_ft_endpoints_are_exact_and_the_midpoint_is_the_mean():
    torch.manual_seed(0)
    a = {"x": torch.randn(5), "h": torch.randn(2)}
    b = {"x": torch.randn(5), "h": torch.randn(2)}
    assert torch.equal(wise_ft(b, a, 0.0, ["x"])["x"], a["x"])
    assert torch.equal(wise_ft(b, a, 1.0, ["x"])["x"], b["x"])
    mid = wise_ft(b, a, 0.5, ["x"])
    assert torch.allclose(mid["x"], (a["x"] + b["x"]) / 2, atol=1e-7)
    assert torch.equal(mid["h"], b["h"])  # keys not interpolated keep the fine-tuned weights
    with pytest.raises(FusionError, match="alpha"):
        wise_ft(b, a, 1.2, ["x"])


def test_wise_theta0_is_the_runs_pretrained_backbone_and_a_new_head_stays_fine_tuned(runs):
    from vitmha.models import create_backbone

    path = str(runs["ckpts"][0])
    ckpt = read_checkpoint(path)
    base, zero_shot = pretrained_task(ckpt, path)
    assert zero_shot is False  # the pretrained file's head has 1000 classes: the run trained a new one
    keys = wise_keys(base, zero_shot)
    assert keys and not any(k.startswith("model.head.") for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = create_backbone("vit_tiny_patch16_224", pretrained=str(runs["pretrained"]), num_classes=3, **CLF_BACKBONE)
    theta0 = base.state_dict()
    ft = ckpt["state_dict"]
    at0 = wise_ft(ft, theta0, 0.0, keys)
    at1 = wise_ft(ft, theta0, 1.0, keys)
    for k, v in ref.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(at0[f"model.{k}"], v), k  # α = 0: the pretrained weights as loaded for the run
    for k in ft:
        assert torch.equal(at1[k], ft[k]), k  # α = 1: the fine-tuned checkpoint
        if k.startswith("model.head."):
            assert torch.equal(at0[k], ft[k]), k  # the new head is the fine-tuned one at every α
    assert any(not torch.equal(theta0[k], ft[k]) for k in keys)  # the endpoints differ


def test_wise_interpolates_a_zero_shot_head(runs, tmp_path):
    from vitmha.models import create_backbone
    from vitmha.models.weights import save_timm_safetensors

    three = tmp_path / "three_classes.safetensors"  # pretrained weights with a head for the run's 3 classes
    save_timm_safetensors(randomize(create_backbone("vit_tiny_patch16_224", num_classes=3, **CLF_BACKBONE), 4), three)
    path = str(runs["ckpts"][0])
    base, zero_shot = pretrained_task(read_checkpoint(path), path, pretrained=str(three))
    assert zero_shot is True
    keys = wise_keys(base, zero_shot)
    assert "model.head.weight" in keys and "model.head.bias" in keys
    ft = _sd(path)
    mid = wise_ft(ft, base.state_dict(), 0.5, keys)
    assert torch.allclose(mid["model.head.weight"], (base.state_dict()["model.head.weight"] + ft["model.head.weight"]) / 2,
                          atol=1e-7)


def test_wise_refuses_a_run_from_scratch(runs, tmp_path):
    from vitmha.tasks import ImageClassifier

    task = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    with pytest.raises(FusionError, match="from scratch"):
        pretrained_task(ckpt, "scratch.ckpt")


# ------------------------------------------------------------------------------------------------ ensembles
def _images(n=6, c=3, size=16, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_ensemble_probabilities_are_the_mean_of_the_members(runs):
    members = [load_task(str(p)) for p in runs["ckpts"]]
    ens = EnsembleTask(members, [str(p) for p in runs["ckpts"]]).eval()
    x = _images()
    with torch.no_grad():
        ref = torch.stack([m.eval_log_probs(x).exp() for m in members]).mean(0)
        assert torch.allclose(ens(x), ref, atol=1e-7)
        assert torch.allclose(ens.eval_log_probs(x).exp(), ref, atol=1e-6)
        assert not torch.allclose(ref, members[0].eval_log_probs(x).exp(), atol=1e-3)  # the members differ


def test_ensemble_of_multilabel_and_segmentation_members_averages_their_probabilities():
    from tests.helpers import SEG_BACKBONE
    from vitmha.tasks import MultiLabelClassifier, SemanticSegmenter

    torch.manual_seed(0)
    ml = [randomize(MultiLabelClassifier(num_classes=4, backbone_kwargs=CLF_BACKBONE), s).eval() for s in (1, 2)]
    x = _images()
    with torch.no_grad():
        ens = EnsembleTask(ml, ["a", "b"]).eval()
        assert torch.allclose(ens(x), (ml[0].eval_probs(x) + ml[1].eval_probs(x)) / 2, atol=1e-7)
        assert torch.allclose(ens.eval_outputs(x).sigmoid(), ens(x), atol=1e-5)
    seg = [randomize(SemanticSegmenter(num_classes=3, backbone_kwargs=SEG_BACKBONE), s).eval() for s in (1, 2)]
    xs = _images(2, size=32)
    with torch.no_grad():
        ens = EnsembleTask(seg, ["a", "b"]).eval()
        ref = (seg[0].predict_logits(xs).softmax(1) + seg[1].predict_logits(xs).softmax(1)) / 2
        assert ens(xs).shape == (2, 3, 32, 32)
        assert torch.allclose(ens(xs), ref, atol=1e-6)
        assert torch.equal(ens.predict_logits(xs).argmax(1), ref.argmax(1))


def test_an_ensemble_member_with_other_statistics_gets_renormalised_images(runs):
    from vitmha.robustness import to_model, to_pixels

    members = [load_task(str(p)) for p in runs["ckpts"][:2]]
    other = ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    ens = EnsembleTask(members, ["a", "b"], input_stats=(MEAN, STD), member_stats=[(MEAN, STD), other]).eval()
    x = _images()
    assert torch.equal(ens._member_input(0, x), x)
    assert torch.allclose(ens._member_input(1, x), to_model(to_pixels(x, MEAN, STD), *other), atol=1e-5)


def test_evaluate_an_ensemble_scores_the_mean_probabilities_and_says_so(runs, tmp_path):
    from sklearn.metrics import accuracy_score

    paths = [str(p) for p in runs["ckpts"]]
    out = tmp_path / "report"
    res = evaluate.main(["--checkpoint", *paths, "--config", runs["config"], "--split", "test", "--output", out])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble"]["members"] == paths
    assert "mean of the members' probabilities" in summary["ensemble"]["combine"]
    dm = _datamodule(runs["root"])
    dm.setup("test")
    members = [load_task(p) for p in paths]
    probs, targets = [], []
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            probs.append(torch.stack([m.eval_log_probs(x).exp() for m in members]).mean(0))
            targets.append(y)
    pred, y = torch.cat(probs).argmax(1), torch.cat(targets)
    assert summary["metrics"]["test/acc"] == pytest.approx(accuracy_score(y.numpy(), pred.numpy()), abs=1e-7)
    assert res["logged"]["test/acc"] == pytest.approx(summary["metrics"]["test/acc"], abs=1e-7)
    assert summary["num_samples"] == 9


def _user_error(main, argv, capsys) -> str:
    """The one ``error:`` line a command prints (exit 2) for bad input, run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    return lines[-1]


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
def test_ensembles_refuse_members_of_another_task_or_classes_in_one_line(tool, runs, ckpts, tmp_path, capsys):
    four = _task_checkpoint(tmp_path / "four.ckpt", num_classes=4, backbone_kwargs=CLF_BACKBONE)
    extra = (["--config", runs["config"]] if tool == "evaluate"
             else ["--input", sorted(runs["root"].glob("test/*/*.png"))[0]])
    main = evaluate.main if tool == "evaluate" else predict.main
    for other, what in ((ckpts["seg"], "task differ"), (four, "number of classes differ")):
        line = _user_error(main, ["--checkpoint", runs["ckpts"][0], other, *extra, "--output", tmp_path / "r"],
                           capsys)
        assert "cannot form an ensemble" in line and what in line, line
        assert str(runs["ckpts"][0]) in line and str(other) in line


def test_predict_an_ensemble_writes_the_mean_probabilities_and_says_so(runs, tmp_path, capsys):
    import csv

    import vitmha

    paths = [str(p) for p in runs["ckpts"]]
    images = sorted(runs["root"].glob("test/*/*.png"))[:4]
    predict.main(["--checkpoint", *paths, "--input", *images, "--output", tmp_path / "p", "--topk", "3",
                  "--no-progress"])
    out = capsys.readouterr().out
    assert f"an ensemble of 3: {', '.join(paths)}" in out
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    members = [vitmha.load(p) for p in paths]
    ref = torch.stack([torch.stack(m.probs(images)) for m in members]).mean(0)  # (N, C): each member alone, then the mean
    names = members[0].classes
    assert len(rows) == len(images)
    for row, p in zip(rows, ref):
        got = {row[f"label{i}"]: float(row[f"prob{i}"]) for i in (1, 2, 3)}  # the top 3 of 3 classes
        for name, prob in zip(names, p.tolist()):
            assert got[name] == pytest.approx(prob, abs=1e-4), (row, name)
    assert not torch.allclose(ref, torch.stack(members[0].probs(images)), atol=1e-3)  # the members differ


# ------------------------------------------------------------------------------------------------ vitmha soup
def test_soup_uniform_writes_the_hand_average_as_an_ordinary_checkpoint(runs, tmp_path):
    import vitmha

    paths = [str(p) for p in runs["ckpts"]]
    out = tmp_path / "soup.ckpt"
    res = soup_cmd.main(["--checkpoints", *paths, "--method", "uniform", "--output", out])
    soup = read_checkpoint(str(out))
    sds = [_sd(p) for p in paths]
    for k, v in soup["state_dict"].items():
        assert torch.allclose(v, sum(sd[k] for sd in sds) / 3, atol=1e-7), k
    assert soup["vitmha_fusion"]["members"] == paths and res["info"]["method"] == "uniform"
    assert "optimizer_states" not in soup
    pred = vitmha.load(out).predict(sorted(runs["root"].glob("test/*/*.png"))[:2])
    assert len(pred) == 2 and pred[0]["label"] in ("blue", "green", "red")
    exported = tmp_path / "soup.safetensors"
    load_tool("export").main(["--checkpoint", out, "--format", "safetensors", "--output", exported])
    assert exported.is_file()
    report = evaluate.main(["--checkpoint", out, "--config", runs["config"], "--output", tmp_path / "rep"])
    assert 0.0 <= report["logged"]["test/acc"] <= 1.0


class ValOnlyFolder:
    """An ImageFolderDataModule whose test split may not be touched (greedy soups select on validation)."""


def _val_only_module():
    from vitmha.data import ImageFolderDataModule

    class Module(ImageFolderDataModule):
        def test_dataloader(self):
            raise AssertionError("a greedy soup read the test split")

    return Module


ValOnlyFolder = _val_only_module()  # noqa: F811 - importable by its path for jsonargparse


def test_soup_greedy_selects_on_the_validation_split_only(runs, tmp_path, capsys):
    config = tmp_path / "val_only.yaml"
    cfg = yaml.safe_load(runs["config"].read_text())
    cfg["data"]["class_path"] = "tests.test_fusion.ValOnlyFolder"
    config.write_text(yaml.safe_dump(cfg))
    paths = [str(p) for p in runs["ckpts"]]
    out = tmp_path / "greedy.ckpt"
    res = soup_cmd.main(["--checkpoints", *paths, "--method", "greedy", "--config", config, "--output", out])
    info = read_checkpoint(str(out))["vitmha_fusion"]
    assert info["metric"] == "val/acc" and set(info["alone"]) == set(paths)
    best = max(paths, key=lambda p: (info["alone"][p], -paths.index(p)))
    assert info["ingredients"][0] == best
    kept = [_sd(p) for p in info["ingredients"]]
    soup = read_checkpoint(str(out))["state_dict"]
    for k, v in soup.items():
        assert torch.allclose(v, sum(sd[k] for sd in kept) / len(kept), atol=1e-7), k
    assert info["score"] >= info["alone"][best]  # a greedy soup never scores below its best ingredient
    assert "greedy soup on the validation split" in capsys.readouterr().out
    assert res["output"] == str(out)


def _task_checkpoint(path, **kwargs):
    from vitmha.tasks import ImageClassifier

    task = ImageClassifier(**kwargs)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_soup_refuses_other_architectures_and_bad_input_in_one_line(runs, tmp_path, capsys):
    deeper = _task_checkpoint(tmp_path / "deeper.ckpt", num_classes=3, backbone_kwargs={**CLF_BACKBONE, "depth": 3})
    four = _task_checkpoint(tmp_path / "four.ckpt", num_classes=4, backbone_kwargs=CLF_BACKBONE)
    r = run_tool("soup", "--checkpoints", runs["ckpts"][0], deeper, "--method", "uniform",
                 "--output", tmp_path / "s.ckpt")  # the installed command: one line, exit 2
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and line.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "cannot be souped" in line and "backbone_kwargs differ" in line and str(deeper) in line
    line = _user_error(soup_cmd.main, ["--checkpoints", runs["ckpts"][0], four, "--method", "greedy", "--config",
                                       runs["config"], "--output", tmp_path / "s.ckpt"], capsys)
    assert "cannot be souped" in line and "num_classes differ" in line and str(four) in line
    assert not (tmp_path / "s.ckpt").exists()
    line = _user_error(soup_cmd.main, ["--checkpoints", runs["ckpts"][0], "--method", "greedy",
                                       "--output", tmp_path / "g.ckpt"], capsys)
    assert "needs --config" in line
    line = _user_error(soup_cmd.main, ["--checkpoints", runs["ckpts"][0], "--method", "wise", "--alpha", "2",
                                       "--output", tmp_path / "w.ckpt"], capsys)
    assert "every α must be in [0, 1]" in line
    line = _user_error(soup_cmd.main, ["--checkpoints", runs["ckpts"][0], "--method", "uniform",
                                       "--output", tmp_path / "u.ckpt"], capsys)
    assert "needs at least two checkpoints" in line
    with pytest.raises(SystemExit) as e:
        soup_cmd.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "greedy" in out and "WiSE-FT" in out and "BatchNorm" in out


def test_a_soup_says_it_needs_no_batchnorm_recalibration(runs, tmp_path, capsys):
    paths = [str(p) for p in runs["ckpts"][:2]]
    soup_cmd.main(["--checkpoints", *paths, "--method", "uniform", "--output", tmp_path / "s.ckpt"])
    assert "no BatchNorm layers: the averaged weights need no re-calibration" in capsys.readouterr().out


def test_soup_wise_one_alpha_writes_the_interpolated_checkpoint(runs, tmp_path):
    path = str(runs["ckpts"][0])
    out = tmp_path / "wise.ckpt"
    soup_cmd.main(["--checkpoints", path, "--method", "wise", "--alpha", "0.25", "--output", out])
    ckpt = read_checkpoint(path)
    base, zero_shot = pretrained_task(ckpt, path)
    expected = wise_ft(ckpt["state_dict"], base.state_dict(), 0.25, wise_keys(base, zero_shot))
    got = read_checkpoint(str(out))
    assert got["vitmha_fusion"]["alpha"] == 0.25 and got["vitmha_fusion"]["zero_shot_head"] is False
    for k, v in expected.items():
        assert torch.equal(got["state_dict"][k], v), k
    load_task(str(out))  # an ordinary checkpoint


def test_soup_wise_sweep_writes_a_table_and_plot_whose_endpoints_are_the_two_models(runs, tmp_path):
    import csv

    from tests.helpers import assert_real_png

    path = str(runs["ckpts"][0])
    out = tmp_path / "sweep"
    res = soup_cmd.main(["--checkpoints", path, "--method", "wise", "--alpha", "0:1:0.5", "--config", runs["config"],
                         "--split", "test", "--robustness", "--robustness-subset", "6",
                         "--robustness-corruptions", "gaussian_blur", "--output", out])
    rows = list(csv.DictReader(open(out / "wise.csv")))
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.5, 1.0]
    assert {"test/acc", "clean_subset", "gaussian_blur@1", "gaussian_blur@5", "corruption_mean"} <= set(rows[0])
    assert_real_png(out / "wise.png")
    fine_tuned = evaluate.main(["--checkpoint", path, "--config", runs["config"], "--split", "test",
                                "--output", tmp_path / "ft"])["logged"]["test/acc"]
    assert res["rows"][-1]["test/acc"] == pytest.approx(fine_tuned, abs=1e-7)


def test_vitmha_test_runs_on_a_soup_checkpoint(tmp_path):
    import vitmha
    from tests.helpers import classifier_args, run_dirs
    from vitmha.cli import cli_main

    members = []
    for seed in (0, 1):
        root = tmp_path / f"run{seed}"
        cli_main(["fit", *classifier_args(root, "--seed_everything", str(seed), "--trainer.max_epochs", "1")])
        members.append(run_dirs(root)[-1] / "checkpoints" / "last.ckpt")
    out = tmp_path / "soup.ckpt"
    soup_cmd.main(["--checkpoints", *members, "--method", "uniform", "--output", out])
    sds = [_sd(p) for p in members]
    predictor = vitmha.load(out)  # the soup's weights, loaded by vitmha.load
    for k, v in predictor.task.state_dict().items():
        assert torch.allclose(v, (sds[0][k] + sds[1][k]) / 2, atol=1e-7), k
    r = run_tool("test", *classifier_args(tmp_path / "test"), "--ckpt_path", out)  # the installed command
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = (run_dirs(tmp_path / "test")[-1] / "metrics.csv").read_text()
    assert "test/acc" in metrics
