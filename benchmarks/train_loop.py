#!/usr/bin/env python
"""Overhead of vitmha's training path (the LightningCLI behind tools/train.py) over a bare PyTorch loop.

Both train the same model (built from the config's `model:` section) on the same data module (its
`data:` section, same augmentation and loaders) with the same AdamW parameter groups and per-step
schedule, and run a validation pass each epoch (weight EMA off in both, as the bare loop has none). They alternate in one process; the table gives seconds
per epoch (median over rounds, first epoch of each run excluded as warm-up) and the ratio. vitmha's epoch
runs from one train epoch's start to the next, so it includes validation, logging and checkpoint writes.

    python benchmarks/train_loop.py [--config configs/quickstart.yaml] [--epochs 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(config: dict):
    from jsonargparse import ArgumentParser

    def instantiate(section):
        module, _, cls = section["class_path"].rpartition(".")
        klass = getattr(__import__(module, fromlist=[cls]), cls)
        return klass(**section.get("init_args", {}))

    data = instantiate(config["data"])
    model_cfg = dict(config["model"])
    model_cfg["init_args"] = {**model_cfg.get("init_args", {}), "num_classes": data.num_classes, "ema_decay": None}
    del ArgumentParser
    return instantiate(model_cfg), data


def bare_epochs(config: dict, epochs: int) -> list[float]:
    """The loop a user would write by hand: same model, data, param groups, schedule, label smoothing and
    gradient clipping."""
    import lightning as L

    from vitmha.tasks.optim import make_optimizer, param_groups

    L.seed_everything(config.get("seed_everything", 0), verbose=False)
    task, data = build(config)
    data.setup("fit")
    net = task.model
    hp = task.hparams
    groups = param_groups(net, [], lr=task.learning_rate, weight_decay=hp.weight_decay, layer_decay=hp.layer_decay)
    opt = make_optimizer("adamw", groups, lr=task.learning_rate)     # torch's AdamW, fused on the CPU as the task's
    train, val = data.train_dataloader(), data.val_dataloader()
    total = epochs * len(train)
    warm = int(hp.warmup_epochs * len(train))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(warm, 1) if s < warm else 0.5 * (1 + torch.cos(
            torch.tensor((s - warm) / max(total - warm, 1) * torch.pi)).item()))
    times = []
    for epoch in range(epochs):
        if hasattr(train.sampler, "set_epoch"):
            train.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        net.train()
        for x, y in train:
            loss = F.cross_entropy(net(x), y, label_smoothing=hp.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hp.get("grad_clip_norm"):
                torch.nn.utils.clip_grad_norm_(net.parameters(), hp.grad_clip_norm)
            opt.step()
            sched.step()
        net.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in val:
                correct += (net(x).argmax(1) == y).sum().item()
                n += len(y)
        times.append(time.perf_counter() - t0)
    return times


def vitmha_epochs(config_path: str, epochs: int) -> list[float]:
    """tools/train.py's path: the same CLI, in process, with a callback timing each epoch."""
    from lightning.pytorch.callbacks import Callback

    from vitmha.cli import cli_main

    times: list[float] = []

    class EpochTimer(Callback):
        """From one train epoch's start to the next (the last: to the end of fit), so an epoch includes its
        validation, metric logging and the checkpoint writes that follow it."""

        def on_train_epoch_start(self, trainer, pl_module):
            self._mark()

        def on_train_end(self, trainer, pl_module):
            self._mark()

        def _mark(self):
            now = time.perf_counter()
            if hasattr(self, "t0"):
                times.append(now - self.t0)
            self.t0 = now

    EpochTimer.__module__ = __name__
    sys.modules[__name__].EpochTimer = EpochTimer
    with tempfile.TemporaryDirectory() as tmp:
        cli_main(["fit", "--config", config_path, "--trainer.max_epochs", str(epochs),
                  "--trainer.default_root_dir", tmp, "--trainer.enable_progress_bar", "false",
                  "--trainer.num_sanity_val_steps", "0", "--model.init_args.ema_decay", "null",
                  "--trainer.callbacks+=" + __name__ + ".EpochTimer"])
    return times


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    warnings.filterwarnings("ignore")
    res = {"bare PyTorch loop": [], "vitmha (tools/train.py)": []}
    for r in range(args.rounds):
        res["bare PyTorch loop"] += bare_epochs(config, args.epochs)[1:]
        res["vitmha (tools/train.py)"] += vitmha_epochs(args.config, args.epochs)[1:]
        print(f"round {r + 1}: bare {statistics.median(res['bare PyTorch loop']):.2f} s/epoch, vitmha "
              f"{statistics.median(res['vitmha (tools/train.py)']):.2f} s/epoch", flush=True)
    base = statistics.median(res["bare PyTorch loop"])
    print(f"\n{args.config}: {args.epochs} epochs x {args.rounds} alternating rounds, {torch.get_num_threads()} "
          "threads; median seconds per epoch (train + validation), first epoch of each run excluded")
    print("| loop | s/epoch | ratio |")
    print("|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.2f} | {statistics.median(v) / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
