"""Checks of the shared tool helpers in vitmha.inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitmha.checkpoints import CheckpointError
from vitmha.inference import (ToolError, collect_inputs, load_task, preprocess_config, read_checkpoint,
                              task_class_path)

from tests.helpers import CLF_CLASSES, MEAN, STD, REPO  # noqa: F401


# ------------------------------------------------------------------------------------------ helper tests
def test_load_task_detects_the_task_class(ckpts):
    from vitmha.tasks import ImageClassifier, SemanticSegmenter

    assert isinstance(load_task(str(ckpts["clf"])), ImageClassifier)
    seg = load_task(str(ckpts["seg"]))
    assert isinstance(seg, SemanticSegmenter) and not seg.training


def test_class_path_stored_by_the_cli_wins(ckpts):
    ckpt = read_checkpoint(str(ckpts["clf"]))
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "_class_path": "vitmha.tasks.SemanticSegmenter"}
    assert task_class_path(ckpt) == "vitmha.tasks.SemanticSegmenter"
    ckpt["hyper_parameters"]["_class_path"] = "mypackage.Other"
    with pytest.raises(ToolError, match="mypackage.Other"):
        task_class_path(ckpt)


def test_preprocessing_comes_from_the_runs_data_module(ckpts):
    ckpt = read_checkpoint(str(ckpts["clf"]))
    pre = preprocess_config(load_task(str(ckpts["clf"])), ckpt)
    assert pre.image_size == 16 and pre.source == "datamodule"
    assert np.allclose(pre.mean, MEAN) and np.allclose(pre.std, STD)
    assert pre.classes == CLF_CLASSES
    seg_pre = preprocess_config(load_task(str(ckpts["seg"])), read_checkpoint(str(ckpts["seg"])))
    assert seg_pre.classes == ["background", "circle", "rectangle", "triangle"]


def test_preprocessing_falls_back_to_the_backbone_config(ckpts, tmp_path):
    ckpt = read_checkpoint(str(ckpts["clf"]))
    del ckpt["datamodule_hyper_parameters"]
    task = load_task(str(ckpts["clf"]))
    pre = preprocess_config(task, ckpt)
    assert pre.source == "backbone" and pre.image_size == 16
    assert tuple(pre.mean) == tuple(task.model.pretrained_cfg["mean"])


def test_missing_and_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.ckpt: checkpoint not found"):
        read_checkpoint(str(tmp_path / "nope.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt: not a readable checkpoint"):
        read_checkpoint(str(bad))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a Lightning checkpoint"):
        read_checkpoint(str(tmp_path / "plain.pt"))


def test_collect_inputs_expands_folders_and_globs_and_names_misses(ckpts):
    root = ckpts["clf_root"]
    assert len(collect_inputs([str(root / "val")])) == 9
    assert len(collect_inputs([str(root / "test" / "*" / "*0.png")])) == 3
    with pytest.raises(ToolError, match="missing.png"):
        collect_inputs([str(root / "missing.png")])
