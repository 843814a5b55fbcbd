"""Tiny trained checkpoints and data shared by the tool tests (tests/test_tools_*.py), plus checks of the
shared helpers in vitmha.inference."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vitmha.inference import (ToolError, collect_inputs, load_task, preprocess_config, read_checkpoint,
                              task_class_path)

REPO = Path(__file__).resolve().parents[1]
CLF_CLASSES = ["blue", "green", "red"]
CLF_BACKBONE = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
SEG_BACKBONE = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]

_CACHE: Dict[str, Path] = {}


def _colour_image(rng: np.random.Generator, c: int, size: int) -> np.ndarray:
    img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
    img[..., 2 - c] += 150  # class 0 = blue, 1 = green, 2 = red
    return img


def make_folder(root: Path, size: int = 20) -> Path:
    """root/{train,val,test}/{blue,green,red}/*.png: noisy images tinted by class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3), ("test", 3)):
        for c, name in enumerate(CLF_CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_colour_image(rng, c, size)).save(d / f"{name}{i}.png")
    return root


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def build_checkpoints(base: Path) -> Dict[str, Path]:
    """A classifier fitted 1 epoch on a colour ImageFolder and a segmenter fitted 1 epoch on synthetic shapes."""
    if _CACHE:
        return _CACHE
    from vitmha.data import ImageFolderDataModule, SegmentationFolderDataModule, export_shapes_folder
    from vitmha.tasks import ImageClassifier, SemanticSegmenter

    L.seed_everything(0, verbose=False)
    clf_root = make_folder(base / "colours")
    dm = ImageFolderDataModule(root=str(clf_root), image_size=16, batch_size=4, num_workers=0, mean=MEAN, std=STD)
    model = ImageClassifier(num_classes=3, backbone_kwargs=CLF_BACKBONE, warmup_epochs=0, lr=3e-3)
    tr = _trainer(base)
    tr.fit(model, datamodule=dm)
    tr.save_checkpoint(base / "clf.ckpt")

    seg_root = Path(export_shapes_folder(str(base / "shapes"), n_train=8, n_val=4, image_size=32))
    sdm = SegmentationFolderDataModule(root=str(seg_root), num_classes=4,
                                       classes=["background", "circle", "rectangle", "triangle"],
                                       image_size=32, batch_size=4, num_workers=0)
    seg = SemanticSegmenter(num_classes=4, backbone_kwargs=SEG_BACKBONE, warmup_epochs=0, lr=3e-3)
    tr = _trainer(base)
    tr.fit(seg, datamodule=sdm)
    tr.save_checkpoint(base / "seg.ckpt")
    _CACHE.update(clf=base / "clf.ckpt", seg=base / "seg.ckpt", clf_root=clf_root, seg_root=seg_root, base=base)
    return _CACHE


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> Dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("tool_ckpts"))


def load_tool(name: str):
    """tools/<name>.py imported as a module (its ``main(argv)`` runs in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_tool(name: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python tools/<name>.py args...`` from the repository root."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("VITMHA_TRACEBACK", None)
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_real_png(path: Path, size=None) -> np.ndarray:
    """The PNG at ``path`` opened with PIL: the expected (W, H) when given, and not blank."""
    assert Path(path).is_file(), f"{path} was not written"
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == tuple(size), f"{path}: {im.size}, expected {size}"
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert a.std() > 0, f"{path} is blank"
    return a


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
    with pytest.raises(ToolError, match="nope.ckpt: checkpoint not found"):
        read_checkpoint(str(tmp_path / "nope.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ToolError, match="bad.ckpt: not a readable checkpoint"):
        read_checkpoint(str(bad))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ToolError, match="plain.pt: not a Lightning checkpoint"):
        read_checkpoint(str(tmp_path / "plain.pt"))


def test_collect_inputs_expands_folders_and_globs_and_names_misses(ckpts):
    root = ckpts["clf_root"]
    assert len(collect_inputs([str(root / "val")])) == 9
    assert len(collect_inputs([str(root / "test" / "*" / "*0.png")])) == 3
    with pytest.raises(ToolError, match="missing.png"):
        collect_inputs([str(root / "missing.png")])
