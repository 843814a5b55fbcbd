#!/usr/bin/env python
"""What a masked-autoencoder training step costs against a supervised one on the same backbone.

    python benchmarks/mae.py --quick     # the Fashion-MNIST recipe's size and batch (256) only, 3 rounds (under a minute)
    python benchmarks/mae.py             # + 4-px patches, and ViT-Ti at 224 px; 5 rounds

A step = forward + loss + backward + AdamW step, in fp32 on the CPU (``--device cuda --dtype bfloat16`` on a
GPU), outside Lightning, the same optimiser for both (AdamW, fused on the CPU as the tasks use it). The MAE step is ``MaskedAutoencoder.masked_forward``
(keyed masks, the encoder on the visible 25 % of the patches plus the class token, the decoder on every
patch, the loss on the masked ones); the supervised step is ``ImageClassifier``'s backbone on every patch
with a cross-entropy. Each round times both once, alternating which goes first; the table gives img/s from the
median wall-clock time, the ratio to the supervised step, and the ratio of median process CPU times (the
steadier figure on a shared machine). "gflop" counts the matmuls of one image's forward analytically
(encoder and decoder blocks, patch projection, prediction).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitmha.tasks import ImageClassifier, MaskedAutoencoder  # noqa: E402

#: name -> (backbone_kwargs, MAE decoder options, batch): the recipes' sizes
SETTINGS: Dict[str, Tuple[dict, dict, int]] = {
    # configs/mae_fashion_mnist.yaml: ViT-Ti at 28 px, 7-px patches (16), one channel, the default decoder (96 x 2)
    "fashion-mnist recipe (ViT-Ti, 28 px, patch 7)": (dict(img_size=28, patch_size=7, in_chans=1), {}, 256),
    # the same images in 4-px patches (49)
    "ViT-Ti, 28 px, patch 4": (dict(img_size=28, patch_size=4, in_chans=1), {}, 256),
    # ViT-Ti at ImageNet size with the task's default decoder (96 wide, 2 blocks)
    "ViT-Ti 224 px, default decoder": (dict(img_size=224), {}, 32),
}


def blocks_gflop(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Matmul GFLOP of ``depth`` pre-norm blocks on ``tokens`` tokens (qkv, QK^T, AV, proj, MLP; 2 FLOP/MAC)."""
    hidden = dim * mlp_ratio
    per_block = 2 * tokens * dim * 4 * dim + 4 * tokens * tokens * dim + 4 * tokens * dim * hidden
    return depth * per_block / 1e9


def analytic_gflop(mae: MaskedAutoencoder) -> Tuple[float, float]:
    """(MAE forward, supervised forward) matmul GFLOP per image."""
    enc = mae.model
    n, p = enc.patch_embed.num_patches, enc.num_prefix_tokens
    ph, pw = enc.patch_embed.patch_size
    patch_dim = ph * pw * enc.in_chans
    keep = int(n * (1 - mae.hparams.mask_ratio))
    embed = 2 * n * patch_dim * enc.embed_dim / 1e9  # the supervised patch projection: every patch
    dec = mae.decoder
    d = dec.decoder_embed.out_features
    mae_flop = (embed * keep / n + blocks_gflop(p + keep, enc.embed_dim, len(enc.blocks))
                + 2 * (p + keep) * enc.embed_dim * d / 1e9 + blocks_gflop(p + n, d, len(dec.decoder_blocks))
                + 2 * n * d * patch_dim / 1e9)
    return mae_flop, embed + blocks_gflop(p + n, enc.embed_dim, len(enc.blocks))


def make_steps(kwargs: dict, decoder: dict, batch: int, device: str, dtype: torch.dtype
               ) -> Dict[str, Callable[[], None]]:
    """One training-step closure per kind ("MAE 75 %", "supervised") on fresh models with the same backbone."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(backbone_kwargs=kwargs, **decoder).to(device)
    clf = ImageClassifier(backbone_kwargs=kwargs, num_classes=10).to(device)
    c, s = mae.model.in_chans, mae.model.patch_embed.img_size
    x = torch.randn(batch, c, *s, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    steps = {}
    for name, module, loss_fn in (
            ("MAE 75 %", mae, lambda it: mae.masked_forward(mae.model, x, mae.noise("train", 0, it, x))[0]),
            ("supervised", clf, lambda it: F.cross_entropy(clf.model(x).float(), y))):
        # fused on the CPU, as the tasks' optimizer (vitmha.tasks.optim); torch's default elsewhere
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                fused=True if device == "cpu" else None)
        module.train()
        counter = [0]

        def step(module=module, opt=opt, loss_fn=loss_fn, counter=counter) -> None:
            with autocast:
                loss = loss_fn(counter[0])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counter[0] += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        steps[name] = step
    steps["_gflop"] = analytic_gflop(mae)  # type: ignore[assignment]
    return steps


def timed(steps: Dict[str, Callable[[], None]], rounds: int, iters: int) -> Dict[str, Tuple[float, float]]:
    """(median wall s, median CPU s) per step of each kind; rounds alternate which kind runs first."""
    names = [k for k in steps if not k.startswith("_")]
    for name in names:  # warm-up
        steps[name]()
    times: Dict[str, List[Tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                steps[name]()
            times[name].append(((time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters))
    return {n: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for n, v in times.items()}


def table(settings: Sequence[str], rounds: int, iters: int, device: str, dtype: torch.dtype,
          batch_size: Optional[int] = None) -> str:
    lines = ["| setting | step | batch | img/s | ratio vs supervised | cpu ratio | fwd gflop/img | flop ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for label in settings:
        kwargs, decoder, batch = SETTINGS[label]
        batch = batch_size or batch
        steps = make_steps(kwargs, decoder, batch, device, dtype)
        mae_flop, sup_flop = steps.pop("_gflop")  # type: ignore[misc]
        med = timed(steps, rounds, iters)
        sup_t, sup_c = med["supervised"]
        for name, flop in (("supervised", sup_flop), ("MAE 75 %", mae_flop)):
            t, c = med[name]
            lines.append(f"| {label} | {name} | {batch} | {batch / t:.1f} | {sup_t / t:.2f} | {sup_c / c:.2f} | "
                         f"{flop:.3f} | {sup_flop / flop:.2f} |")
        print(f"  {label}: MAE {batch / med['MAE 75 %'][0]:.1f} img/s, supervised {batch / sup_t:.1f} img/s",
              flush=True)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the Fashion-MNIST recipe's size and batch only, 3 rounds")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: each setting's)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5, --quick 3)")
    p.add_argument("--iters", type=int, default=None, help="steps per timing (default 2, --quick 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    settings = list(SETTINGS)[:1] if args.quick else list(SETTINGS)
    rounds = args.rounds or (3 if args.quick else 5)
    iters = args.iters or (1 if args.quick else 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, {args.dtype}; "
          f"median of {rounds} alternating rounds x {iters} steps", flush=True)
    print(table(settings, rounds, iters, args.device, getattr(torch, args.dtype), args.batch))


if __name__ == "__main__":
    main()
