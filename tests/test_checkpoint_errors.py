"""A bad checkpoint, a full disk, two runs at once: each ends in one ``error: ...`` line naming the file
(exit 2), never a traceback, never code from the file, never two runs in one folder."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import CLF_BACKBONE, MEAN, REPO, SEG_BACKBONE, STD, classifier_args, load_tool, run_dirs, run_tool
from vitmha.callbacks import AtomicCheckpointIO, RunVersion, run_loggers
from vitmha.checkpoints import find_last_checkpoint
from vitmha.cli import cli_main


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: it must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# what each bad file is, and the words its error line must hold (through --ckpt_path / --checkpoint)
BAD = {
    "missing": "checkpoint not found",
    "truncated": "not a readable checkpoint: truncated",
    "png": "not a readable checkpoint",
    "text": "not a readable checkpoint",
    "runs-code": "refused to unpickle",
}


@pytest.fixture(scope="module")
def bad(ckpts, tmp_path_factory) -> dict:
    """Paths by case: a missing file, the first half of a real checkpoint, a PNG and a text file named .ckpt,
    and a pickle that would run ``touch <marker>`` (``bad["marker"]``)."""
    d = tmp_path_factory.mktemp("bad_ckpts")
    data = Path(ckpts["clf"]).read_bytes()
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (8, 8), (200, 30, 30)).save(d / "png.ckpt", format="PNG")
    (d / "text.ckpt").write_text("epoch: 3\nval/acc: 0.97\n")
    marker = d / "code-ran"
    torch.save({"state_dict": {}, "payload": RunsCode(str(marker))}, d / "runs-code.ckpt")
    return {**{case: d / f"{case}.ckpt" for case in BAD}, "marker": marker}


@pytest.fixture(autouse=True)
def no_code_ran(request):
    yield
    if "bad" in request.fixturenames:
        assert not request.getfixturevalue("bad")["marker"].exists(), "a checkpoint ran code"


def error_line(err: str, path) -> str:
    """The one ``error:`` line of ``err``, which names ``path``; no traceback."""
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], err
    assert err.rstrip().splitlines()[-1] == errors[0], err  # nothing after it
    return errors[0]


def cli_error(capsys, argv: list, path) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    return error_line(capsys.readouterr().err, path)


def colour_args(ckpts, root: Path, **backbone) -> list:
    """A classifier config for the colour folder the ``ckpts["clf"]`` run used (architecture overridable)."""
    return ["--model", "vitmha.tasks.ImageClassifier",
            "--model.init_args.backbone_kwargs", json.dumps({**CLF_BACKBONE, **backbone}),
            "--data", "vitmha.data.ImageFolderDataModule", "--data.init_args.root", str(ckpts["clf_root"]),
            "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4",
            "--data.init_args.mean", json.dumps(MEAN), "--data.init_args.std", json.dumps(STD),
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def shapes_args(ckpts, root: Path) -> list:
    """A segmenter config for the shapes folder the ``ckpts["seg"]`` run used."""
    return ["--model", "vitmha.tasks.SemanticSegmenter", "--model.init_args.backbone_kwargs", json.dumps(SEG_BACKBONE),
            "--data", "vitmha.data.SegmentationFolderDataModule", "--data.init_args.root", str(ckpts["seg_root"]),
            "--data.init_args.num_classes", "4", "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ---------------------------------------------------------------------------------------- --ckpt_path


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_ckpt_path_is_one_error_line_before_anything_runs(case, subcommand, bad, tmp_path, capsys):
    line = cli_error(capsys, [subcommand, *classifier_args(tmp_path), "--ckpt_path", str(bad[case])], bad[case])
    assert BAD[case] in line
    assert not (tmp_path / "lightning_logs").exists()  # no run was started


@pytest.fixture(scope="module")
def seg_from_cli(ckpts, tmp_path_factory) -> Path:
    """The segmenter checkpoint as ``vitmha fit`` writes it: its hyper-parameters name the task class."""
    ckpt = torch.load(ckpts["seg"], weights_only=True, map_location="cpu")
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "_class_path": "vitmha.tasks.SemanticSegmenter"}
    path = tmp_path_factory.mktemp("seg_cli") / "seg.ckpt"
    torch.save(ckpt, path)
    return path


MISFITS = {  # the config, the checkpoint, what the error line says
    "segmenter-ckpt-to-classifier": ("clf", "seg", "does not fit this ImageClassifier: model.cls_token (and "),
    "vitmha-fit-segmenter-ckpt-to-classifier": (
        "clf", "seg_from_cli", "a checkpoint of vitmha.tasks.SemanticSegmenter, not of this ImageClassifier"),
    "classifier-ckpt-to-segmenter": ("seg", "clf", "does not fit this SemanticSegmenter: model.backbone.cls_token"),
    "wider": ("clf-wide", "clf", "model.cls_token is (1, 1, 16) in the checkpoint, (1, 1, 32) in the model"),
    "deeper": ("clf-deep", "clf", "model.blocks.2.norm1.weight (and 11 more) missing from the checkpoint"),
    "shallower": ("clf-shallow", "clf",
                  "model.blocks.1.norm1.weight (and 11 more) in the checkpoint, not in the model"),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_a_checkpoint_of_another_task_or_architecture_names_the_first_mismatch(case, ckpts, seg_from_cli, tmp_path,
                                                                               capsys):
    config, ckpt, words = MISFITS[case]
    path = seg_from_cli if ckpt == "seg_from_cli" else ckpts[ckpt]
    args = {"clf": lambda: colour_args(ckpts, tmp_path), "seg": lambda: shapes_args(ckpts, tmp_path),
            "clf-wide": lambda: colour_args(ckpts, tmp_path, embed_dim=32),
            "clf-deep": lambda: colour_args(ckpts, tmp_path, depth=3),
            "clf-shallow": lambda: colour_args(ckpts, tmp_path, depth=1)}[config]()
    for subcommand in ("fit", "validate"):
        assert words in cli_error(capsys, [subcommand, *args, "--ckpt_path", str(path)], path)
    assert not run_dirs(tmp_path)  # checked before the run started


def test_the_checkpoints_own_config_loads_it(ckpts, seg_from_cli, tmp_path):
    cli_main(["validate", *colour_args(ckpts, tmp_path / "clf"), "--ckpt_path", str(ckpts["clf"])])
    cli_main(["validate", *shapes_args(ckpts, tmp_path / "seg"), "--ckpt_path", str(seg_from_cli)])
    assert len(run_dirs(tmp_path / "clf")) == len(run_dirs(tmp_path / "seg")) == 1


def test_a_code_running_ckpt_path_through_train_py_prints_one_line_and_no_traceback(bad, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("VITMHA_TRACEBACK", None)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), *classifier_args(tmp_path),
                           "--ckpt_path", str(bad["runs-code"])], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [error_line(proc.stderr, bad["runs-code"])]
    assert "refused to unpickle: it would import posix.system" in proc.stderr


# ---------------------------------------------------------------------------------------- pretrained:

PRETRAINED = {
    "missing": "weights file not found",
    "truncated": "not a readable weights file: truncated",
    "png": "not a readable weights file",
    "text": "not a readable weights file",
    "runs-code": "refused to unpickle",
}


@pytest.mark.parametrize("case", list(PRETRAINED) + ["wider"])
def test_a_bad_pretrained_file_is_one_error_line(case, bad, ckpts, tmp_path, capsys):
    if case == "wider":
        path, args = ckpts["clf"], colour_args(ckpts, tmp_path, embed_dim=32)
    else:
        path, args = bad[case], classifier_args(tmp_path)
    line = cli_error(capsys, ["fit", *args, "--model.init_args.pretrained", str(path)], path)
    assert (PRETRAINED.get(case) or "weights do not fit this model") in line


# ---------------------------------------------------------------------------------------- --ckpt_path last


def test_ckpt_path_last_resumes_the_newest_runs_last_ckpt(tmp_path, capsys):
    cli_main(["fit", *classifier_args(tmp_path, "--trainer.max_epochs", "1")])
    capsys.readouterr()
    cli_main(["fit", *classifier_args(tmp_path, "--trainer.max_epochs", "2"), "--ckpt_path", "last"])
    first, second = run_dirs(tmp_path)
    assert f"--ckpt_path last: {first / 'checkpoints' / 'last.ckpt'}\n" in capsys.readouterr().out
    with open(second / "metrics.csv") as f:
        assert {r["epoch"] for r in csv.DictReader(f)} == {"1"}  # resumed after epoch 0, not started again
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    cli_main(["validate", *classifier_args(tmp_path), "--ckpt_path", "last"])  # now the second run's
    assert f"--ckpt_path last: {second / 'checkpoints' / 'last.ckpt'}\n" in capsys.readouterr().out


def test_ckpt_path_last_without_a_run_is_one_error_line(tmp_path, capsys):
    line = cli_error(capsys, ["fit", *classifier_args(tmp_path), "--ckpt_path", "last"], tmp_path / "lightning_logs")
    assert "--ckpt_path last: no " in line and "last.ckpt" in line


def test_the_newest_last_ckpt_is_the_highest_version_number(tmp_path):
    for name in ("version_2", "version_10", "version_11", "version_x"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        if name != "version_11":  # a run that wrote no checkpoint yet
            (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "version_10" / "checkpoints" / "last.ckpt")
    assert find_last_checkpoint(str(tmp_path / "none")) is None


# ---------------------------------------------------------------------------------------- the tools

TOOL_ARGS = {
    "predict": lambda c, out: ["--input", str(next(Path(c["clf_root"]).rglob("*.png"))), "--output", str(out)],
    "export": lambda c, out: ["--format", "safetensors", "--output", str(out / "model.safetensors")],
    "attention": lambda c, out: ["--input", str(next(Path(c["clf_root"]).rglob("*.png"))), "--output",
                                 str(out / "a.png")],
    "evaluate": lambda c, out: ["--output", str(out)],
}


def tool_error(capsys, tool: str, argv: list, path) -> str:
    with pytest.raises(SystemExit) as exc:
        load_tool(tool).main(argv)
    assert exc.value.code == 2
    return error_line(capsys.readouterr().err, path)


@pytest.mark.parametrize("tool", list(TOOL_ARGS))
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_checkpoint_of_a_tool_is_one_error_line(tool, case, bad, ckpts, tmp_path, capsys):
    line = tool_error(capsys, tool, ["--checkpoint", str(bad[case]), *TOOL_ARGS[tool](ckpts, tmp_path)], bad[case])
    assert BAD[case] in line


@pytest.mark.parametrize("ckpt, config", [("seg", "clf"), ("clf", "seg")])
def test_evaluate_refuses_a_config_of_another_task(ckpt, config, ckpts, tmp_path, capsys):
    import yaml

    model = {"clf": "vitmha.tasks.ImageClassifier", "seg": "vitmha.tasks.SemanticSegmenter"}[config]
    data = {"clf": {"class_path": "vitmha.data.ImageFolderDataModule", "init_args": {"root": str(ckpts["clf_root"])}},
            "seg": {"class_path": "vitmha.data.SegmentationFolderDataModule",
                    "init_args": {"root": str(ckpts["seg_root"]), "num_classes": 4}}}[config]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"class_path": model}, "data": data}))
    line = tool_error(capsys, "evaluate", ["--checkpoint", str(ckpts[ckpt]), "--config", str(cfg), "--output",
                                           str(tmp_path / "out")], ckpts[ckpt])
    assert f"but {cfg} is a config for {model}" in line


def test_a_tool_given_a_code_running_pickle_prints_one_line_and_no_traceback(bad, ckpts, tmp_path):
    proc = run_tool("predict", "--checkpoint", bad["runs-code"], *TOOL_ARGS["predict"](ckpts, tmp_path))
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [error_line(proc.stderr, bad["runs-code"])]


# ---------------------------------------------------------------------------------------- a full disk

SNAPSHOT: dict = {}


class NoSpaceOnSecondLastSave(AtomicCheckpointIO):
    """The disk fills up while the second ``last.ckpt`` is written (after half of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_saves = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if os.fspath(path).endswith("last.ckpt"):
            self.last_saves += 1
            if self.last_saves == 2:
                SNAPSHOT.update(path=os.fspath(path), sha=hashlib.sha256(Path(path).read_bytes()).hexdigest())
        super().save_checkpoint(checkpoint, path, storage_options)

    def _write(self, f, data):
        if self.last_saves == 2:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write(data)


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_previous_last_ckpt(tmp_path, capsys):
    SNAPSHOT.clear()
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *classifier_args(tmp_path, "--trainer.max_epochs", "3"),
                  "--trainer.plugins", "tests.test_checkpoint_errors.NoSpaceOnSecondLastSave"])
    assert exc.value.code == 2
    last = Path(SNAPSHOT["path"])
    line = error_line(capsys.readouterr().err, last)
    assert "no space left on device" in line.lower()
    assert hashlib.sha256(last.read_bytes()).hexdigest() == SNAPSHOT["sha"]  # byte-identical
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert not [p.name for p in last.parent.iterdir() if ".tmp-" in p.name]  # no half-written file left


# ---------------------------------------------------------------------------------------- parallel runs


def test_a_stale_version_guess_claims_the_next_free_folder(tmp_path):
    (tmp_path / "version_0").mkdir()  # another run claimed 0 after this one looked
    assert RunVersion(str(tmp_path))(lambda: 0) == 1 and (tmp_path / "version_1").is_dir()
    a, b = run_loggers(str(tmp_path / "root")), run_loggers(str(tmp_path / "root"))  # two runs, neither has logged
    assert [lg.version for lg in a] == [0, 0] and [lg.version for lg in b] == [1, 1]
    assert a[1].log_dir == str(tmp_path / "root" / "lightning_logs" / "version_0" / "tb")


def test_two_runs_started_together_get_their_own_version_folders(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "train.py"),
           *classifier_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false")]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    runs = run_dirs(tmp_path)
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for run in runs:
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert len(list((run / "checkpoints").glob("epoch000-*.ckpt"))) == 1
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert sum(bool(r["train/loss"]) for r in rows) == 3 and sum(bool(r["val/acc"]) for r in rows) == 1
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
