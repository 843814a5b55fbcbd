"""Helpers shared by the test modules (imported by them; the fixtures built on them are in conftest.py):
tiny data and checkpoints, running the tools, tiny CLI arguments, and comparisons with timm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

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


COMMAND_MODULES = {"seed_hf_cache": "seed_cache"}
VITMHA = Path(sys.executable).with_name("vitmha")  # the installed command of this environment


def load_tool(name: str):
    """The module of ``vitmha <name>`` (``vitmha.commands.<name>``; its ``main(argv)`` runs in this process);
    ``train`` is tools/train.py."""
    import importlib.util

    if name == "train":
        spec = importlib.util.spec_from_file_location("tool_train", REPO / "tools" / "train.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(f"vitmha.commands.{COMMAND_MODULES.get(name, name)}")


def run_tool(name: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """The installed ``vitmha <name> args...`` in a subprocess, from the repository root (``train``:
    ``python tools/train.py``)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("VITMHA_TRACEBACK", None)
    if name == "train":  # tools/train.py as a user runs it
        cmd = [sys.executable, str(REPO / "tools" / "train.py")]
    else:
        cmd = [str(VITMHA), {"seed_hf_cache": "seed-cache"}.get(name, name)]
    return subprocess.run([*cmd, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


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


# ------------------------------------------------------------------------------------------ CLI arguments
TINY_VIT = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2})
TINY_SEG_VIT = json.dumps({"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2})


def classifier_args(root: Path, *extra: str) -> list[str]:
    return [
        "--seed_everything", "0",
        "--model", "vitmha.tasks.ImageClassifier",
        "--model.init_args.backbone_kwargs", TINY_VIT,
        "--model.init_args.warmup_epochs", "0",
        "--data", "vitmha.data.DigitsDataModule",
        "--data.init_args.image_size", "8",
        "--data.init_args.batch_size", "32",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(root),
        "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2",
        "--trainer.limit_predict_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


def run_dirs(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


# ------------------------------------------------------------------------------------------ comparisons
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (timm zero-inits heads, biases and layer scales, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------ interruptions
# Callbacks for runs of tools/train.py in a subprocess (``--trainer.callbacks+=tests.helpers.Name`` with
# PYTHONPATH at the repository root): they stop a run the way a crash or a scheduler does.
class KillAt(L.Callback):
    """SIGKILL this process when batch ``batch`` of epoch ``epoch`` ends (nothing after it is saved)."""

    def __init__(self, epoch: int = 2, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), 9)


class SignalAt(L.Callback):
    """Send ``signal`` to this process when batch ``batch`` of epoch ``epoch`` starts (as a scheduler would
    at any moment; the handler only sets a flag, so where it lands inside the step does not matter)."""

    def __init__(self, epoch: int = 2, batch: int = 1, signal: str = "SIGTERM") -> None:
        self.epoch, self.batch, self.signal = epoch, batch, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import signal as _signal

        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), getattr(_signal, self.signal))


class WeightDigests(L.Callback):
    """Append ``epoch step sha256(weights)`` to ``path`` at every training-epoch end."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(pl_module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        with open(self.path, "a") as f:
            f.write(f"{trainer.current_epoch} {trainer.global_step} {h.hexdigest()}\n")
