#!/usr/bin/env python
"""Token Merging (vitmha.models.tome) against the unmerged model: throughput, top-1 agreement on the
repository's real photos with the real ImageNet ViT-Ti, and a fine-tuned task's accuracy at each r.

    python benchmarks/tome.py --quick      # ViT-Ti only, 3 rounds, photo agreement (under a minute)
    python benchmarks/tome.py              # ViT-Ti/S/B, batch 1 and 32, 224 px, r 0/4/8/16, 7 rounds
    python benchmarks/tome.py --checkpoint last.ckpt --config configs/X.yaml [--split val] [--r 0 2 4 8]

Throughput: the same model (random weights: speed does not depend on them), inference mode, fp32, r switched
with ``apply_tome`` between timings; each round times every r once, in a rotated order, and the table gives
img/s from the median wall-clock time and its ratio to r = 0, and the ratio of the median process CPU times
("cpu_ratio": on a shared machine, with one thread, the steadier estimate of what a dedicated core gives).
"gflop" counts the encoder's matmuls analytically (token counts per block from the merge schedule), and
"flop_ratio" is the speed-up an implementation bound by those matmuls would reach.

Agreement: each JPEG photo in data/samples (and its mirror image) through the real ViT-Ti with its pretrained
config's preprocessing (mean = std = 0.5, 224 px, bicubic, crop 0.9); top-1 agreement with r = 0, the
probability of the unmerged top-1 class, and the overlap of the top-5 sets.

Task curve (``--checkpoint`` and ``--config``): the checkpoint's classification task, the data
module of the config's ``data:`` section, accuracy of the task's own evaluation (EMA weights, mirror-image TTA
when the task uses them) on the split at each r, and the backbone's img/s on that split's first batch,
alternating as above.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitmha.models import create_backbone  # noqa: E402
from vitmha.models.tome import apply_tome  # noqa: E402

REAL_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
WEIGHTS = REPO.parent / "shared" / "weights" / f"{REAL_NAME}.safetensors"
ARCHS = {"ViT-Ti": "vit_tiny_patch16_224", "ViT-S": "vit_small_patch16_224", "ViT-B": "vit_base_patch16_224"}


def tokens_per_block(num_patches: int, prefix: int, depth: int, r: int) -> List[int]:
    """Tokens entering each block's MLP (after its merge), as vitmha.models.tome schedules them."""
    n, out = num_patches, []
    for _ in range(depth):
        n -= min(r, n // 2)
        out.append(prefix + n)
    return out


def encoder_gflop(model, r: int) -> float:
    """Matmul GFLOP of one image through the blocks: qkv, QKᵀ, AV, proj on the tokens entering a block, the
    MLP on those left after its merge (2 FLOP per multiply-add)."""
    D, p = model.embed_dim, model.num_prefix_tokens
    hidden = model.blocks[0].mlp.fc1.out_features
    n0 = p + model.patch_embed.num_patches
    after = tokens_per_block(model.patch_embed.num_patches, p, len(model.blocks), r)
    flop = 0.0
    for before, now in zip([n0] + after[:-1], after):
        flop += 2 * before * D * 4 * D + 4 * before * before * D + 4 * now * D * hidden
    return flop / 1e9


def timed_rounds(model, x: torch.Tensor, rs: Sequence[int], rounds: int, iters: int
                 ) -> Dict[int, Tuple[float, float]]:
    """(median wall seconds, median process CPU seconds) per forward at each r; every round runs each r
    once, rotating the order."""
    times: Dict[int, List[Tuple[float, float]]] = {r: [] for r in rs}
    with torch.inference_mode():
        for r in rs:                                   # warm-up, every path once
            apply_tome(model, r)
            model(x)
        for k in range(rounds):
            for r in list(rs[k % len(rs):]) + list(rs[:k % len(rs)]):
                apply_tome(model, r)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    model(x)
                times[r].append(((time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters))
    apply_tome(model, 0)
    return {r: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for r, v in times.items()}


def throughput_table(archs: Sequence[str], batches: Sequence[int], rs: Sequence[int], rounds: int,
                     size: int) -> List[Dict]:
    rows = []
    for label in archs:
        torch.manual_seed(0)
        model = create_backbone(ARCHS[label], img_size=size).eval()
        for b in batches:
            x = torch.randn(b, 3, size, size)
            iters = 3 if b == 1 else 1
            med = timed_rounds(model, x, rs, rounds, iters)
            base_flop = encoder_gflop(model, 0)
            for r in rs:
                rows.append(dict(model=label, batch=b, r=r, img_s=b / med[r][0], ratio=med[0][0] / med[r][0],
                                 cpu_ratio=med[0][1] / med[r][1],
                                 tokens=tokens_per_block(model.patch_embed.num_patches, model.num_prefix_tokens,
                                                         len(model.blocks), r)[-1],
                                 gflop=encoder_gflop(model, r), flop_ratio=base_flop / encoder_gflop(model, r)))
            print(f"  {label} batch {b}: " + ", ".join(f"r={r} {b / med[r][0]:.1f} img/s" for r in rs), flush=True)
    return rows


def photo_agreement(weights: Path, rs: Sequence[int]) -> List[Dict]:
    from vitmha.inference import eval_transform, pretrained_backbone, read_image

    model, pre = pretrained_backbone(REAL_NAME, str(weights))
    tf = eval_transform(pre, "classification")
    photos = sorted((REPO / "data" / "samples").glob("*.jpg"))
    views, names = [], []
    for path in photos:
        img = tf(image=read_image(str(path)))["image"]
        views += [img, img.flip(-1)]
        names += [path.name, f"{path.name} (mirror)"]
    x = torch.stack(views)
    rows = []
    with torch.inference_mode():
        ref = model(x).softmax(-1)
        ref_top1, ref_top5 = ref.argmax(-1), ref.topk(5).indices
        for r in rs:
            apply_tome(model, r)
            probs = model(x).softmax(-1)
            top1, top5 = probs.argmax(-1), probs.topk(5).indices
            for i, name in enumerate(names):
                overlap = len(set(top5[i].tolist()) & set(ref_top5[i].tolist()))
                label = pre.classes[top1[i]] if pre.classes else str(int(top1[i]))
                rows.append(dict(r=r, image=name, top1=label.split(",")[0], same=bool(top1[i] == ref_top1[i]),
                                 p_ref_class=float(probs[i, ref_top1[i]]), top5_overlap=overlap))
    apply_tome(model, 0)
    return rows


def task_curve(checkpoint: str, config: str, split: str, rs: Optional[Sequence[int]], rounds: int,
               device: str) -> List[Dict]:
    import yaml

    from vitmha.commands.evaluate import build_datamodule
    from vitmha.inference import backbone_of, load_task
    from vitmha.tasks.base import batch_images

    task = load_task(checkpoint).to(device)
    if not hasattr(task, "eval_log_probs"):
        raise SystemExit(f"{checkpoint}: a {type(task).__name__}; the accuracy curve needs a classification task")
    with open(config) as f:
        data = (yaml.safe_load(f) or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise SystemExit(f"{config}: no data: section with a class_path")
    dm = build_datamodule({"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})},
                          task, config)
    dm.setup("validate" if split == "val" else "test")
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    bb = backbone_of(task)
    first = batch_images(next(iter(loader))).to(device)          # the batch the throughput is timed on
    ph, pw = bb.patch_embed.patch_size
    patches = (first.shape[-2] // ph) * (first.shape[-1] // pw)
    if rs is None:   # up to r = patches / depth, where the last blocks get down to the class token and one patch
        rs = sorted({round(patches / len(bb.blocks) * f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)})
    rs = [0] + [r for r in rs if r != 0]
    rows = []
    for r in rs:
        apply_tome(bb, r)
        correct = total = 0
        with torch.inference_mode():
            for batch in loader:
                x, y = batch_images(batch).to(device), batch[1].to(device)
                correct += int((task.eval_log_probs(x).argmax(-1) == y).sum())
                total += int(y.numel())
        rows.append(dict(r=r, acc=correct / total, n=total))
        print(f"  r={r}: {split} acc {correct / total:.4f} ({total} images)", flush=True)
    med = timed_rounds(bb, first, rs, rounds, 1)
    for row in rows:
        t, c = med[row["r"]]
        row.update(img_s=first.shape[0] / t, ratio=med[0][0] / t, cpu_ratio=med[0][1] / c,
                   tokens=tokens_per_block(patches, bb.num_prefix_tokens, len(bb.blocks), row["r"])[-1])
    return rows


def markdown(rows: List[Dict], cols: Sequence[str], fmt: Dict[str, str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[c], fmt.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="ViT-Ti only, 3 rounds (under a minute)")
    p.add_argument("--archs", nargs="+", default=None, choices=list(ARCHS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--r", nargs="+", type=int, default=None,
                   help="tokens merged per block (default 0 4 8 16; with --checkpoint 0, 1/4 .. 4/4 of patches/depth)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 7, --quick 3)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="the real ViT-Ti .safetensors")
    p.add_argument("--skip_throughput", action="store_true")
    p.add_argument("--checkpoint", default=None, help="a vitmha task checkpoint: accuracy curve at each r")
    p.add_argument("--config", default=None, help="its config (the data: section)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write every row here")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, rounds {rounds}")
    out: Dict[str, List[Dict]] = {}
    if args.checkpoint or args.config:
        if not (args.checkpoint and args.config):
            raise SystemExit("--checkpoint and --config go together")
        out["task"] = task_curve(args.checkpoint, args.config, args.split, args.r, rounds, args.device)
        print(f"\n{args.checkpoint}, {args.split} split:\n")
        print(markdown(out["task"], ["r", "acc", "n", "tokens", "img_s", "ratio", "cpu_ratio"],
                       {"acc": ".4f", "img_s": ".1f", "ratio": ".2f", "cpu_ratio": ".2f"}))
    else:
        args.r = [0] + [r for r in (args.r or [4, 8, 16]) if r != 0]
        if not args.skip_throughput:
            archs = args.archs or (["ViT-Ti"] if args.quick else list(ARCHS))
            out["throughput"] = throughput_table(archs, args.batches, args.r, rounds, args.size)
            print(f"\nthroughput, {args.size} px, fp32 (tokens = at the last block):\n")
            print(markdown(out["throughput"], ["model", "batch", "r", "tokens", "img_s", "ratio", "cpu_ratio",
                                               "gflop", "flop_ratio"],
                           {"img_s": ".1f", "ratio": ".2f", "cpu_ratio": ".2f", "gflop": ".2f",
                            "flop_ratio": ".2f"}))
        if args.weights.is_file():
            out["photos"] = photo_agreement(args.weights, args.r)
            print(f"\ntop-1 agreement with r=0 on data/samples/*.jpg and their mirror images ({REAL_NAME}):\n")
            summary = []
            for r in args.r:
                rows = [row for row in out["photos"] if row["r"] == r]
                summary.append(dict(r=r, agree=f"{sum(x['same'] for x in rows)}/{len(rows)}",
                                    p=statistics.mean(x["p_ref_class"] for x in rows),
                                    top5=statistics.mean(x["top5_overlap"] for x in rows)))
            print(markdown(summary, ["r", "agree", "p", "top5"], {"p": ".3f", "top5": ".2f"}))
            print()
            print(markdown(out["photos"], ["r", "image", "top1", "same", "p_ref_class", "top5_overlap"],
                           {"p_ref_class": ".3f"}))
        else:
            print(f"\n{args.weights} not found: photo agreement skipped")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
