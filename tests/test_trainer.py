"""vitmha.Trainer: a script that builds its own run gets what `vitmha fit` gives (atomic checkpoints, the best
and the last one, preemption, exact resume, reports, the CPU thread choice), through public Lightning hooks."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

import vitmha
from vitmha.callbacks import (AtomicCheckpointIO, BestCheckpoint, CpuThreads, FiniteWeights, LastCheckpoint,
                              LogInterval, RunSummary, usable_cpus)
from vitmha.preemption import Preemption
from vitmha.reports import EvaluationReport

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys
    import lightning as L
    import vitmha
    from vitmha.data import DigitsDataModule
    from vitmha.tasks import ImageClassifier
    sys.path.insert(0, {repo!r})
    from tests.helpers import SignalAt, WeightDigests

    root, digests, epochs, resume, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    L.seed_everything(0)
    task = ImageClassifier(num_classes=10, backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1,
                           num_heads=2), warmup_epochs=0, drop_path_rate=0.2, mixup_alpha=0.2)
    dm = DigitsDataModule(image_size=8, batch_size=32)
    callbacks = [WeightDigests(digests)] + ([SignalAt(epoch=1, batch=2, signal=stop)] if stop != "none" else [])
    trainer = vitmha.Trainer(max_epochs=epochs, default_root_dir=root, limit_train_batches=4, limit_val_batches=2,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(task, datamodule=dm, ckpt_path=None if resume == "none" else resume)
""")


def run_script(tmp_path: Path, root: Path, digests: Path, epochs: int, resume="none", stop="none"):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(root), str(digests), str(epochs), str(resume), stop],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def digests(path: Path) -> dict:
    return {int(e): (int(s), d) for e, s, d in (ln.split() for ln in path.read_text().splitlines())}


def test_the_defaults_are_the_clis():
    tr = vitmha.Trainer(logger=False, enable_progress_bar=False)
    kinds = {type(c) for c in tr.callbacks}
    assert {BestCheckpoint, LastCheckpoint, FiniteWeights, Preemption, EvaluationReport, RunSummary, CpuThreads,
            LogInterval} <= kinds
    assert isinstance(tr.strategy.checkpoint_io, AtomicCheckpointIO)


def test_given_callbacks_and_plugins_replace_the_defaults_of_their_type(tmp_path):
    mine = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")
    tr = vitmha.Trainer(logger=False, callbacks=[mine, CpuThreads(threads=1)], log_every_n_steps=7,
                        enable_progress_bar=False)
    checkpoints = [c for c in tr.callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    assert checkpoints == [mine]
    assert [c.threads for c in tr.callbacks if isinstance(c, CpuThreads)] == [1]
    assert not any(isinstance(c, LogInterval) for c in tr.callbacks) and tr.log_every_n_steps == 7
    assert not any(isinstance(c, (BestCheckpoint, LastCheckpoint)) for c in
                   vitmha.Trainer(logger=False, enable_checkpointing=False).callbacks)


def test_a_script_run_is_preempted_with_a_resumable_checkpoint_and_resumes_bitwise(tmp_path):
    straight = run_script(tmp_path, tmp_path / "a", tmp_path / "a.txt", 3)
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_script(tmp_path, tmp_path / "b", tmp_path / "b.txt", 3, stop="SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"resumable checkpoint: {last}" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not list(last.parent.glob("*.tmp-*"))  # the atomic writer left no temporary file
    resumed = run_script(tmp_path, tmp_path / "b", tmp_path / "b2.txt", 3, resume=str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = digests(tmp_path / "a.txt"), digests(tmp_path / "b2.txt")
    assert sorted(got) == [1, 2] and all(got[e] == want[e] for e in got)
    # the run summary names the checkpoints and what to run next (no config file: the Python way)
    assert "last checkpoint:" in straight.stdout and "next: vitmha.load(" in straight.stdout


def test_a_signal_during_setup_is_caught_too(tmp_path):
    """SIGUSR1 before training starts (a data module's slow setup) ends in the same resumable stop."""
    from vitmha.data import DigitsDataModule

    class SignalInSetup(DigitsDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            import signal

            os.kill(os.getpid(), signal.SIGUSR1)

    L.seed_everything(0)
    task = vitmha.tasks.ImageClassifier(num_classes=10, warmup_epochs=0,
                                        backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1,
                                                             num_heads=2))
    trainer = vitmha.Trainer(max_epochs=2, default_root_dir=tmp_path, limit_train_batches=2, limit_val_batches=1,
                             enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(SystemExit) as stop:
        trainer.fit(task, datamodule=SignalInSetup(image_size=8, batch_size=32))
    assert stop.value.code == 143 and trainer.global_step == 1
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_short_epochs_still_log_the_training_loss(tmp_path):
    import csv

    from vitmha.data import DigitsDataModule

    task = vitmha.tasks.ImageClassifier(num_classes=10, warmup_epochs=0,
                                        backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1,
                                                             num_heads=2))
    trainer = vitmha.Trainer(max_epochs=2, default_root_dir=tmp_path, limit_train_batches=3, limit_val_batches=1,
                             enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    assert trainer.log_every_n_steps == 3
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    assert sum(1 for r in rows if r.get("train/loss")) == 2  # one per epoch, where Lightning's 50 logs none


def test_cpu_threads_follow_the_environment_and_what_is_free(monkeypatch):
    import types

    trainer = types.SimpleNamespace(num_devices=1, datamodule=types.SimpleNamespace(num_workers=1))
    monkeypatch.setenv("VITMHA_NUM_THREADS", "3")
    assert CpuThreads().choose(trainer)[0] == 3
    monkeypatch.delenv("VITMHA_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("vitmha.callbacks.busy_cpus", lambda window=0.15: 0.0)
    monkeypatch.setattr("vitmha.callbacks.usable_cpus", lambda: 4)
    assert CpuThreads().choose(trainer)[0] == 3  # 4 CPUs, 1 loader worker
    monkeypatch.setattr("vitmha.callbacks.busy_cpus", lambda window=0.15: 1.2)  # a neighbour holds a core
    assert CpuThreads().choose(trainer)[0] == 2
    monkeypatch.setattr("vitmha.callbacks.busy_cpus", lambda window=0.15: 9.0)
    assert CpuThreads().choose(trainer)[0] == 1
    assert CpuThreads(threads=2).choose(trainer)[0] == 2
    assert usable_cpus() >= 1


def test_the_thread_choice_is_printed_once_and_undone_after_the_run(tmp_path, capsys, monkeypatch):
    from vitmha.data import DigitsDataModule

    monkeypatch.setenv("VITMHA_NUM_THREADS", "1")
    before = torch.get_num_threads()
    task = vitmha.tasks.ImageClassifier(num_classes=10, warmup_epochs=0,
                                        backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1,
                                                             num_heads=2))
    vitmha.Trainer(max_epochs=1, default_root_dir=tmp_path, limit_train_batches=1, limit_val_batches=1,
                   enable_progress_bar=False, enable_model_summary=False).fit(
        task, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    out = capsys.readouterr().out
    assert out.count("vitmha: 1 intra-op CPU thread(s) (VITMHA_NUM_THREADS=1)") == 1
    assert torch.get_num_threads() == before


def test_a_linear_probe_counts_the_frozen_backbone_in_the_model_summary():
    from lightning.pytorch.utilities.model_summary import ModelSummary

    task = vitmha.tasks.ImageClassifier(num_classes=10, freeze_backbone=True,
                                        backbone_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1,
                                                             num_heads=2))
    summary = ModelSummary(task)
    head = sum(p.numel() for p in task.model.head.parameters())
    assert summary.trainable_parameters == head and summary.total_parameters > head


def test_nothing_in_vitmha_reads_private_lightning_or_torch_attributes():
    """The package uses Lightning's and torch's public API only, so their next releases cannot break it
    silently (``trainer._`` attributes, torch's ``_global_`` hook registries, ``_should_*`` and
    ``_save_last_checkpoint`` overrides of ModelCheckpoint)."""
    pattern = re.compile(r"trainer\._(?!_)|\._global_|\b_should_\w+\(|_save_last_checkpoint|_get_next_version")
    found = []
    for path in sorted((REPO / "vitmha").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_task_option_is_in_the_cli_help_of_every_task():
    """Options are declared once (BackboneTask/SupervisedTask) and every task takes all of them."""
    from vitmha.tasks.base import BackboneTask, SupervisedTask, task_arguments

    shared = set(task_arguments(SupervisedTask))
    assert {"optimizer", "momentum", "nesterov", "class_weights", "peft", "ema_decay", "layer_decay"} <= shared
    for name in ("ImageClassifier", "MultiLabelClassifier", "SemanticSegmenter"):
        out = subprocess.run([sys.executable, "-m", "vitmha", "fit", "--model.help", f"vitmha.tasks.{name}"],
                             capture_output=True, text=True, timeout=120).stdout
        for option in shared:
            assert re.search(rf"--model\.{option}\b", out), (name, option)
        # each option's words come from the one docstring that declares it
        assert "layer-wise lr decay; block i gets lr * layer_decay" in " ".join(out.split())
    assert issubclass(SupervisedTask, BackboneTask)


def test_the_package_is_layered_without_import_cycles():
    """Module-level imports inside vitmha/ form no cycle (imports inside functions are deliberate and lazy)."""
    import ast

    graph = {}
    for path in (REPO / "vitmha").rglob("*.py"):
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitmha"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vitmha"))
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}

    def parent_packages(m):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))} & set(graph)

    state, cycle = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1 and d not in parent_packages(m):
                cycle.append(stack + [m, d])
            elif d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycle, " -> ".join(cycle[0])
