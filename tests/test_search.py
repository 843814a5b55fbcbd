"""tools/tune.py and vitmha.search: spaces, costs, pruning, the lr finder, and a study that survives
SIGKILL, refuses bad spaces before training and goes on past a diverging trial. Tiny models on 8x8 digits."""
from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.helpers import REPO, assert_real_png, classifier_args, load_tool

optuna = pytest.importorskip("optuna")

from vitmha.search import (OptunaPruning, SearchError, arch_of, count_flops, count_params,  # noqa: E402
                           parse_space, suggest_lr)
from vitmha.search.lr_find import lr_find  # noqa: E402

HEADS = "model.init_args.backbone_kwargs.num_heads"
LR = "model.init_args.lr"


def write_space(path: Path, space: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"directions": ["val/acc:maximize"], "space": space, **extra}))
    return path


def tune_args(tmp_path: Path, search: Path, out: Path, n_trials: int, *extra: str) -> list[str]:
    return ["--search", str(search), "--n_trials", str(n_trials), "--output", str(out),
            *classifier_args(tmp_path / "unused"), "--trainer.max_epochs", "1", *extra]


def trial_rows(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ spaces
@pytest.mark.parametrize("spec, message", [
    ({"type": "float", "low": 1.0, "high": 0.1}, "low (1.0) > high (0.1)"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
    ({"type": "categorical", "choices": []}, "non-empty list of choices"),
    ({"type": "uniform", "low": 0, "high": 1}, "type must be one of"),
    ({"type": "int", "low": 1, "high": 4, "lowest": 0}, "unknown field"),
])
def test_bad_spec_names_the_key(spec, message):
    with pytest.raises(SearchError, match=re.escape(message)) as e:
        parse_space({"space": {LR: spec}})
    assert str(e.value).startswith(LR)


def test_constraints_read_dotted_keys_and_reject_code():
    space = parse_space({"space": {HEADS: {"type": "categorical", "choices": [2, 3]}},
                         "constraints": ["model.init_args.backbone_kwargs.embed_dim % " + HEADS + " == 0"]})
    config = {"model": {"init_args": {"backbone_kwargs": {"embed_dim": 16}}}}
    assert space.violated(space.apply(config, {HEADS: 2})) is None
    assert "num_heads=3" in space.violated(space.apply(config, {HEADS: 3}))
    with pytest.raises(SearchError, match="not allowed"):
        parse_space({"space": {LR: {"type": "float", "low": 0.1, "high": 1}}, "constraints": ["__import__('os')"]})


# ------------------------------------------------------------------------------------------ costs
@pytest.mark.parametrize("kwargs", [
    dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=10),
    dict(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=0),
])
def test_params_and_flops_formula_match_the_built_model(kwargs):
    from torch.utils.flop_counter import FlopCounterMode

    from vitmha.models import create_backbone

    cfg = arch_of("vit_tiny_patch16_224", kwargs)
    model = create_backbone("vit_tiny_patch16_224", **kwargs).eval()
    model.set_fused_attn(False)  # FlopCounterMode does not count the CPU flash-attention kernel; the math is equal
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, kwargs["img_size"], kwargs["img_size"]))
    assert count_flops(cfg) == counter.get_total_flops()


# ------------------------------------------------------------------------------------------ pruning
def _digits_fit(tmp_path: Path, callback: L.Callback, max_epochs: int) -> L.Trainer:
    from vitmha.data import DigitsDataModule
    from vitmha.tasks import ImageClassifier

    L.seed_everything(0, verbose=False)
    model = ImageClassifier(num_classes=10, backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1,
                                                                 num_heads=2), warmup_epochs=0)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                        limit_val_batches=1, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=16))
    return trainer


def test_pruning_callback_reports_each_epoch_and_stops_when_pruned(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={e: 1.0 for e in range(4)}))
    trial = study.ask()
    pruner = {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1}
    trainer = _digits_fit(tmp_path, OptunaPruning(url, "s", trial.number, "val/acc", pruner), max_epochs=4)
    frozen = optuna.load_study(study_name="s", storage=url).trials[trial.number]
    assert sorted(frozen.intermediate_values) == [0, 1]          # epoch 0 (warm-up) and 1, then pruned
    assert frozen.user_attrs["pruned_epoch"] == 1 and trainer.current_epoch == 2


def test_pruning_callback_names_a_metric_the_task_does_not_log(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    trial = optuna.create_study(storage=url, study_name="s", direction="maximize").ask()
    with pytest.raises(SearchError, match="val/accuracy is not logged by ImageClassifier"):
        _digits_fit(tmp_path, OptunaPruning(url, "s", trial.number, "val/accuracy"), max_epochs=1)


# ------------------------------------------------------------------------------------------ lr finder
def test_lr_find_suggests_a_finite_lr_inside_the_sweep(tmp_path):
    args = classifier_args(tmp_path, "--model.init_args.layer_decay", "0.8", "--model.init_args.warmup_epochs", "1")
    result = lr_find(args, str(tmp_path / "lr"), min_lr=1e-5, max_lr=1.0, num_steps=20, print_fn=lambda s: None)
    assert math.isfinite(result.suggestion) and 1e-5 <= result.suggestion <= 1.0
    assert result.lrs[0] == pytest.approx(1e-5) and len(result.lrs) >= 5
    assert_real_png(Path(result.png))


def test_suggest_lr_picks_the_steepest_descent_before_the_minimum():
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    loss = [2.0] * 8 + [2.0 - 0.3 * i for i in range(1, 6)] + [0.5] * 4 + [1.0, 3.0, 9.0, 20.0, 40.0, 80.0, 160.0, 320.0]
    assert lrs[8] <= suggest_lr(lrs, loss) <= lrs[12]


# ------------------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("space, key, message", [
    ({"model.init_args.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "model.init_args.lrr", "not accepted"),
    ({LR: {"type": "float", "low": 1e-2, "high": 1e-4}}, LR, "low"),
    ({HEADS: {"type": "categorical", "choices": [2, 3]}}, HEADS, "3 never gives a valid model"),
    ({"model.init_args.backbone_kwargs.depthh": {"type": "int", "low": 1, "high": 2}},
     "model.init_args.backbone_kwargs.depthh", "not an argument"),
])
def test_bad_space_is_one_error_line_before_any_training(tmp_path, capsys, space, key, message):
    search = write_space(tmp_path / "space.yaml", space)
    with pytest.raises(SystemExit) as e:
        load_tool("tune").main(tune_args(tmp_path, search, tmp_path / "study", 2))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1 and key in err[0] and message in err[0], err
    assert not (tmp_path / "study" / "trials").exists()


def _tune_cmd(tmp_path: Path, search: Path, out: Path, n: int) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "tune.py"), *tune_args(tmp_path, search, out, n)]


def test_sigkill_mid_trial_then_rerun_completes_the_study(tmp_path):
    search = write_space(tmp_path / "space.yaml", {LR: {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
                         pruner="none")
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_tune_cmd(tmp_path, search, out, 3), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "trials" / "trial_0001" / "train.log").exists():  # trial 1 has started
        assert proc.poll() is None and time.time() < deadline, "the study ended before trial 1 started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rerun = subprocess.run(_tune_cmd(tmp_path, search, out, 3), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "trial 1 was running when the search stopped" in rerun.stdout
    trials = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    killed = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(complete) == 3 and [t.number for t in killed] == [1]
    assert any(t.user_attrs.get("retry_of") == 1 and t.params == killed[0].params for t in complete)
    assert (out / "best.yaml").is_file() and len(trial_rows(out)) == 4


def test_diverging_trial_fails_and_the_study_goes_on(tmp_path, capsys):
    search = write_space(tmp_path / "space.yaml", {LR: {"type": "categorical", "choices": [1e-3, 1e30]}},
                         pruner="none", budget={"trainer.max_epochs": 1})
    out = tmp_path / "study"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="study", direction="maximize")
    study.enqueue_trial({LR: 1e30})
    study.enqueue_trial({LR: 1e-3})
    load_tool("tune").main(tune_args(tmp_path, search, out, 2, "--trainer.max_epochs", "3"))
    rows = {r[LR]: r for r in trial_rows(out)}
    assert rows["1e+30"]["state"] == "FAIL" and "non-finite" in rows["1e+30"]["reason"]
    assert rows["0.001"]["state"] == "COMPLETE" and float(rows["0.001"]["val/acc"]) > 0
    assert "failed 1" in capsys.readouterr().out
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["init_args"]["lr"] == 1e-3 and best["trainer"]["default_root_dir"] == str(out / "best")
    # the trials ran the 1-epoch budget; best.yaml trains the config's 3 epochs
    trial = yaml.safe_load(next((out / "trials").glob("*/config.yaml")).read_text())
    assert trial["trainer"]["max_epochs"] == 1 and best["trainer"]["max_epochs"] == 3
    assert "search budget trainer.max_epochs=1" in (out / "best.yaml").read_text()


@pytest.mark.parametrize("name", ["quickstart_hparams", "quickstart_arch"])
def test_shipped_search_spaces_pass_the_checks(name):
    from vitmha.search.study import Candidates, check_space, load_config, parse_directions

    doc = yaml.safe_load((REPO / "configs" / "search" / f"{name}.yaml").read_text())
    space = parse_space(doc)
    metrics = [m for m, _ in parse_directions(space.directions)]
    parser, base = load_config(["--config", str(REPO / "configs" / "quickstart.yaml")])
    cands = Candidates(space, base, space.max_gflops, space.max_params, need_cost="gflops" in metrics)
    check_space(parser, cands)
    quickstart = cands.reject(cands.config({}))
    assert quickstart[0] is None and quickstart[1]["gflops"] == pytest.approx(0.0281, abs=1e-4)  # no head: num_classes comes from the data
