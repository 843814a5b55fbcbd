#!/usr/bin/env python
"""Parameter-efficient fine-tuning against full fine-tuning and a linear probe, on timm's real ImageNet ViT-Ti,
same data and the same training budget for every method; prints one table.

    python benchmarks/peft.py [--tasks fashion_mnist nuclei] [--methods full linear_probe lora_qv ...] \
        [--budget_steps N | --budget_seconds S] [--weights PATH] [--lr vpt=0.005 ...] [--json out.json]

Tasks: ``fashion_mnist`` (configs/fashion_mnist_finetune.yaml's data and model: 28-px images, 7-px patches,
batch 128, flips, mirror-image TTA; accuracy on the official 10,000 test images; default budget 1290 steps
= 3 epochs), ``mnist5k`` (benchmarks/transfer.py's few-label task: 10 % of MNIST-5k's training split, 350
labels, batch 16, 28-px images, 7-px patches; test accuracy; default 660 steps = 30 epochs) and ``nuclei`` (configs/nuclei_finetune.yaml's: 64-px crops, 8-px patches, linear decoder, Dice
+ CE; foreground IoU and mIoU on the held-out columns; default 640 steps = 20 epochs). Methods (``--methods``):
``full``, ``linear_probe``, ``lora_qv`` (rank 8, alpha 16, on q and v), ``lora_all`` (q, k, v, proj, fc1,
fc2), ``dora`` (rank 8 on q and v), ``bitfit``, ``vpt`` (VPT-deep, 10 prompts per block) and ``adapter``
(AdaptFormer, bottleneck 16: about LoRA q,v's parameter count). Full fine-tuning uses its recipe's lr (5e-4,
1e-4); the others 1e-3 (the PEFT default; ``--lr NAME=VALUE`` changes one). Warmup 5 % of the steps.

``--budget_seconds S`` gives each method S seconds of training instead: its step time is measured on 10 steps
first and it runs as many steps as fit (its schedule fitted to them).

Each (task, method) runs in a fresh process, so its peak RSS is its own. Columns: the metric; parameters
trained (including the head or decoder) and their share of the backbone's (without its head); median train
step time (forward, backward, optimiser step; data loading excluded); bytes saved for backward in one
training step (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded); gradient + AdamW state of
the trained parameters (12 bytes each); peak RSS of the process while training; the size of the file that
holds only the trained parameters (``tools/export.py --format peft``). Smoke run:
``python benchmarks/peft.py --methods lora_qv bitfit --budget_steps 3 --eval_batches 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
WEIGHTS = REPO.parent / "shared" / "weights" / f"{NAME}.safetensors"
LORA = {"r": 8, "alpha": 16}
METHODS: Dict[str, Optional[Dict[str, Any]]] = {
    "full": None,
    "linear_probe": {"method": "linear_probe"},
    "lora_qv": {"method": "lora", **LORA, "targets": ["q", "v"]},
    "lora_all": {"method": "lora", **LORA, "targets": ["q", "k", "v", "proj", "fc1", "fc2"]},
    "dora": {"method": "dora", **LORA, "targets": ["q", "v"]},
    "bitfit": {"method": "bitfit"},
    "vpt": {"method": "vpt", "tokens": 10},
    "adapter": {"method": "adapter", "hidden": 16},
}
TASKS = {
    # steps = the recipe's epochs; full_lr = the recipe's lr for full fine-tuning
    "fashion_mnist": {"steps": 1290, "full_lr": 5e-4, "metrics": ["test/acc"]},
    "nuclei": {"steps": 640, "full_lr": 1e-4, "metrics": ["val/iou_nucleus", "val/miou"]},
    # benchmarks/transfer.py's few-label task: 10 % of MNIST-5k's training split (350 labels), 30 epochs
    "mnist5k": {"steps": 660, "full_lr": 5e-4, "metrics": ["test/acc"]},
}
PEFT_LR = 1e-3


# ------------------------------------------------------------------------------------------ one run
def build(task: str, peft: Optional[Dict[str, Any]], lr: float, steps: int, weights: str):
    """(LightningModule, LightningDataModule) of ``task`` as its recipe builds them, with ``peft``."""
    common = dict(backbone=NAME, pretrained=weights, peft=peft, lr=lr, warmup_steps=max(1, steps // 20))
    if task == "fashion_mnist":
        from vitmha.data import FashionMNISTDataModule
        from vitmha.tasks import ImageClassifier

        model = ImageClassifier(num_classes=10, backbone_kwargs={"img_size": 28, "patch_size": 7},
                                scheduler="cosine", label_smoothing=0.0, tta_hflip=True, **common)
        data = FashionMNISTDataModule(image_size=28, batch_size=128, hflip=0.5, max_shift=0.0, scale=(1.0, 1.0),
                                      backbone=NAME)
    elif task == "mnist5k":  # benchmarks/transfer.py's ImageNet arm (layer decay 0.75 for full fine-tuning)
        from vitmha.data import MNIST5kDataModule
        from vitmha.tasks import ImageClassifier

        model = ImageClassifier(num_classes=10, backbone_kwargs={"img_size": 28, "patch_size": 7}, scheduler="cosine",
                                layer_decay=0.75 if peft is None else 1.0, **common)
        data = MNIST5kDataModule(image_size=28, subset_fraction=0.1, batch_size=16, backbone=NAME)
    else:
        from vitmha.data import NucleiDataModule
        from vitmha.tasks import SemanticSegmenter

        model = SemanticSegmenter(num_classes=2, head="linear", backbone_kwargs={"img_size": 64, "patch_size": 8},
                                  scheduler="poly", dice_weight=0.5, class_names=["background", "nucleus"], **common)
        data = NucleiDataModule(crop_size=64, train_crops=512, batch_size=16, backbone=NAME)
    return model, data


def rss_peak_mb() -> float:
    """The process's peak resident memory so far (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_probe(measure_step: int):
    """A Lightning callback timing training steps and counting the bytes saved for backward in step
    ``measure_step`` (0-based; not the first, whose lazy initialisations are not typical)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        def __init__(self) -> None:
            self.times: List[float] = []
            self.saved_bytes = 0
            self.rss_mb = float("nan")
            self._hooks = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._t0 = time.perf_counter()
            if trainer.global_step == measure_step:
                params = {p.untyped_storage().data_ptr() for p in module.parameters()}
                seen: Dict[int, int] = {}

                def pack(t):
                    st = t.untyped_storage()
                    if st.data_ptr() not in params:
                        seen[st.data_ptr()] = st.nbytes()
                    return t

                self._seen = seen
                self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                self._hooks.__enter__()

        def on_before_backward(self, trainer, module, loss):
            if self._hooks is not None:  # everything the step saves was saved by its forward
                self._hooks.__exit__(None, None, None)
                self._hooks = None
                self.saved_bytes = sum(self._seen.values())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t0)

        def on_train_end(self, trainer, module):
            self.rss_mb = rss_peak_mb()

    return Probe()


def train(model, data, steps: int):
    """(probe, seconds): ``steps`` optimizer steps, no validation."""
    import lightning as L

    probe = make_probe(measure_step=min(2, steps - 1))
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[probe])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return probe, time.perf_counter() - start


def evaluate(task: str, model, data, batches: Optional[int]) -> Dict[str, float]:
    """The task's metrics: the official test sets of Fashion-MNIST and MNIST-5k, the nuclei's held-out columns."""
    import lightning as L

    stage = "validate" if task == "nuclei" else "test"
    limit = {f"limit_{'test' if stage == 'test' else 'val'}_batches": batches} if batches else {}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, **limit)
    scores = getattr(trainer, stage)(model, datamodule=data, verbose=False)[0]
    return {m: float(scores[m]) for m in TASKS[task]["metrics"]}


def run_one(task: str, method: str, args) -> Dict[str, Any]:
    """Train ``method`` on ``task`` in this process and measure it."""
    import lightning as L

    from vitmha.peft import parameter_counts, save_trainable, trainable_state_dict

    spec = METHODS[method]
    lr = args.lr.get(method, TASKS[task]["full_lr"] if spec is None else PEFT_LR)
    steps = args.budget_steps or TASKS[task]["steps"]
    L.seed_everything(0, verbose=False)
    model, data = build(task, spec, lr, steps, args.weights)
    if args.budget_seconds:  # as many steps as fit in the time, at this method's own step time
        probe, _ = train(*build(task, spec, lr, 10, args.weights), 10)
        steps = max(1, int(args.budget_seconds / statistics.median(probe.times[2:])))
        L.seed_everything(0, verbose=False)
        model, data = build(task, spec, lr, steps, args.weights)  # the warmup and schedule follow the steps
    probe, seconds = train(model, data, steps)
    metrics = evaluate(task, model, data, args.eval_batches)

    bb = model.backbone_module()
    counts = parameter_counts(bb)
    head = sum(p.numel() for n, p in bb.named_parameters() if n.startswith("head."))
    trained = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_trainable(trainable_state_dict(model.model), Path(tmp) / "trained.safetensors")
        file_bytes = path.stat().st_size
    return {
        "task": task, "method": method, "spec": spec, "lr": lr, "steps": steps, "train_s": seconds,
        "metrics": metrics,
        "trained": trained, "backbone": counts["base"] - head,
        "step_ms": 1000 * statistics.median(probe.times[2:] or probe.times),
        "saved_mb": probe.saved_bytes / 2**20, "optim_mb": 12 * trained / 2**20,
        "rss_mb": probe.rss_mb, "file_kb": file_bytes / 1024,
    }


# ------------------------------------------------------------------------------------------ the table
def row(r: Dict[str, Any]) -> str:
    metric = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
    share = 100 * r["trained"] / r["backbone"]
    return (f"| {r['task']} | {r['method']} | {metric} | {r['trained']:,} | {share:.2f} | {r['step_ms']:.0f} | "
            f"{r['saved_mb']:.1f} | {r['optim_mb']:.1f} | {r['rss_mb']:.0f} | {r['file_kb']:.0f} | {r['steps']} | "
            f"{r['train_s']:.0f} |")


HEADER = ("| task | method | metric | trained params | % of backbone | step ms | saved for backward MB | "
          "grad + AdamW MB | peak RSS MB | trained-only file KB | steps | train s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--budget_steps", type=int, default=None,
                        help="optimizer steps per method (default: the recipe's, per task)")
    budget.add_argument("--budget_seconds", type=float, default=None, help="training seconds per method instead")
    ap.add_argument("--eval_batches", type=int, default=None, help="evaluate on this many batches only (smoke runs)")
    ap.add_argument("--weights", default=str(WEIGHTS), help=f"{NAME} as .safetensors (or 'true': the hub cache)")
    ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's lr")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--one", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    try:
        args.lr = {k: float(v) for k, v in (s.split("=", 1) for s in args.lr)}
    except ValueError:
        ap.error(f"--lr: expected METHOD=LR pairs, got {args.lr}")
    if args.weights.lower() == "true":
        args.weights = True
    elif not Path(args.weights).is_file():
        ap.error(f"--weights {args.weights}: file not found (give the file, or 'true' for the hub cache)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.one:
        warnings.simplefilter("ignore")
        print("RESULT " + json.dumps(run_one(*args.one, args)), flush=True)
        return 0
    results = []
    t0 = time.time()
    for task in args.tasks:
        for method in args.methods:
            cmd = [sys.executable, __file__, *argv, "--one", task, method]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{task} {method}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(row(results[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n{NAME}, CPU, OMP_NUM_THREADS {threads}; {time.time() - t0:.0f} s in all\n")
    print(HEADER)
    for r in results:
        print(row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
