#!/usr/bin/env python
"""The GPU checks, ready for when a GPU is lent: one script, one printed table per part.

    python benchmarks/gpu.py                   # on a CUDA GPU: ViT-B/16 at 224 px
    python benchmarks/gpu.py --dry             # the whole script on the CPU at tiny sizes (CI: it cannot rot)

1. bf16 training step of ViT-B/16 at 224 (batch 64): img/s and MFU = model FLOP/s (counted by
   ``torch.utils.flop_counter.FlopCounterMode`` on one step) over the GPU's dense bf16 peak (``--peak-tflops``,
   or a table of known GPUs);
2. the same step with SDPA limited to the flash kernel, and to the math kernel (``torch.nn.attention.sdpa_kernel``);
3. the same step under ``torch.compile`` (``--dry``: the ``eager`` backend, which needs no compiler);
4. data-loader img/s of ``vitmha.data.ImageFolderDataModule`` (default training augmentation, pinned memory)
   on a generated folder of JPEGs at 256 px, against the model's img/s from part 1;
5. a 200-step fine-tune (``vitmha.Trainer``, ``bf16-mixed``; ``--dry``: ``32-true``) of ``vitmha.tasks.ImageClassifier`` on that
   folder: wall time and steps/s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(device: torch.device, given: Optional[float]) -> Optional[float]:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def seconds_per_call(fn: Callable[[], None], device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_flop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def model_parts(args, device: torch.device) -> float:
    """Parts 1-3; returns the model's img/s of part 1."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vitmha

    kw = TINY if args.dry else {}
    name = "vit_base_patch16_224"
    size = TINY["img_size"] if args.dry else 224
    model = vitmha.create_backbone(name, pretrained=False, num_classes=1000, **kw).to(device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    flop = step_flop(model, x, y)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"\n1-3. bf16 training step, {name}{' (dry: tiny)' if args.dry else ''}, batch {args.batch}, "
          f"{flop / 1e9:.3g} GFLOP per step; peak {peak or '?'} TFLOP/s")
    print(f"{'variant':24} {'img/s':>9} {'TFLOP/s':>9} {'MFU':>7}")
    rows: Dict[str, float] = {}
    variants = [("eager (SDPA default)", None, False), ("SDPA flash only", SDPBackend.FLASH_ATTENTION, False),
                ("SDPA math only", SDPBackend.MATH, False), ("torch.compile", None, True)]
    for label, backend, compiled in variants:
        net = torch.compile(model, backend="eager" if args.dry else "inductor") if compiled else model
        step = train_step(net, x, y)
        try:
            if backend is None:
                t = seconds_per_call(step, device, args.iters)
            else:
                with sdpa_kernel([backend]):
                    t = seconds_per_call(step, device, args.iters)
        except RuntimeError as e:  # a kernel this device or dtype does not have
            print(f"{label:24} unavailable: {' '.join(str(e).split())[:100]}")
            continue
        tflops = flop / t / 1e12
        rows[label] = args.batch / t
        mfu = f"{100 * tflops / peak:6.1f}%" if peak else "     ?"
        print(f"{label:24} {rows[label]:9.1f} {tflops:9.2f} {mfu}")
    return rows.get("eager (SDPA default)", float("nan"))


def jpeg_folder(root: Path, n: int, size: int, classes: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(max(1, n // classes) if split == "train" else 2):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] = 255 - img[..., c % 3] // 4
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


def loader_part(args, root: Path, model_img_s: float) -> None:
    from vitmha.data import ImageFolderDataModule

    size = TINY["img_size"] if args.dry else 224
    print(f"\n4. data loader, {root} ({args.images} JPEGs), {size} px, default training augmentation")
    print(f"{'workers':>7} {'img/s':>9} {'img/s per worker':>17} {'vs model (part 1)':>18}")
    for workers in args.workers:
        dm = ImageFolderDataModule(root=str(root), image_size=size, batch_size=args.batch, num_workers=workers,
                                   persistent_workers=False)
        dm.setup("fit")
        loader = dm.train_dataloader()
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t0, n = time.perf_counter(), 0
        for xb, _ in it:
            n += xb.shape[0]
        dt = max(time.perf_counter() - t0, 1e-9)
        per = n / dt / max(workers, 1)
        print(f"{workers:7d} {n / dt:9.1f} {per:17.1f} {n / dt / model_img_s:17.2f}x")


def finetune_part(args, root: Path, device: torch.device) -> None:
    import vitmha
    from vitmha.data import ImageFolderDataModule
    from vitmha.tasks import ImageClassifier

    size = TINY["img_size"] if args.dry else 224
    kw = TINY if args.dry else {}
    dm = ImageFolderDataModule(root=str(root), image_size=size, batch_size=args.batch, num_workers=args.workers[-1])
    task = ImageClassifier(backbone="vit_base_patch16_224", pretrained=False, num_classes=4, backbone_kwargs=kw,
                           warmup_epochs=0)
    # on the CPU the task's fused AdamW and Lightning's bf16-mixed gradient clipping refuse each other
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    with tempfile.TemporaryDirectory() as out:
        trainer = vitmha.Trainer(max_steps=args.steps, accelerator="gpu" if device.type == "cuda" else "cpu",
                                 devices=1, precision=precision, default_root_dir=out, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                 limit_val_batches=0)
        t0 = time.perf_counter()
        trainer.fit(task, datamodule=dm)
        dt = time.perf_counter() - t0
    print(f"\n5. fine-tune, {args.steps} steps of batch {args.batch}, {dt:.1f} s, "
          f"{precision}: {args.steps / dt:.2f} steps/s, {args.steps * args.batch / dt:.1f} img/s (start-up included)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="run everything on the CPU at tiny sizes")
    p.add_argument("--batch", type=int, default=None, help="default 64; 4 with --dry")
    p.add_argument("--iters", type=int, default=None, help="timed steps per variant (default 20; 2 with --dry)")
    p.add_argument("--images", type=int, default=None, help="JPEGs generated (default 2048; 16 with --dry)")
    p.add_argument("--workers", nargs="+", type=int, default=None, help="loader workers (default 1 4 8; 0 with --dry)")
    p.add_argument("--steps", type=int, default=None, help="fine-tune steps (default 200; 3 with --dry)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.dry else 64)
    args.iters = args.iters or (2 if args.dry else 20)
    args.images = args.images or (16 if args.dry else 2048)
    args.workers = args.workers or ([0] if args.dry else [1, 4, 8])
    args.steps = args.steps or (3 if args.dry else 200)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry:
        p.error("no CUDA device: run with --dry (tiny sizes on the CPU)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    model_img_s = model_parts(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = jpeg_folder(Path(tmp) / "jpegs", args.images, 64 if args.dry else 256)
        loader_part(args, root, model_img_s)
        finetune_part(args, root, device)


if __name__ == "__main__":
    main()
