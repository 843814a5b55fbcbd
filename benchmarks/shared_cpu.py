"""The quickstart on a shared CPU: alone, and beside a CPU-bound neighbour, with vitmha's thread choice and with
every core's thread (what torch does by itself), all in one script so the rows share the machine's hour.

    python benchmarks/shared_cpu.py [--config configs/quickstart.yaml] [--epochs N] [--quick]

Each row is ``vitmha fit --config ...`` in a subprocess, timed by wall clock; the neighbour is a second
process spinning a busy Python loop on one core (as another user's job does). Prints a table: wall time,
ratio to the run alone, the threads vitmha chose, and the last val/acc.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def spin() -> None:
    while True:
        pass


def run(config: str, epochs: int, root: str, threads: str = "") -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("VITMHA_NUM_THREADS", None)
    if threads:
        env["VITMHA_NUM_THREADS"] = threads
    cmd = [sys.executable, "-m", "vitmha", "fit", "--config", config, "--trainer.max_epochs", str(epochs),
           "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    chosen = re.search(r"vitmha: (\d+) intra-op CPU thread", out.stdout)
    metrics = next(Path(root).rglob("metrics.csv"))
    acc = [float(r["val/acc"]) for r in csv.DictReader(open(metrics)) if r.get("val/acc")]
    return {"wall": wall, "threads": int(chosen.group(1)) if chosen else None, "val_acc": acc[-1] if acc else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--epochs", type=int, default=35)
    p.add_argument("--quick", action="store_true", help="3 epochs: checks the script, not a measurement")
    args = p.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("alone", False, ""), ("beside a busy process", False, ""),
                 (f"beside a busy process, {cores} threads fixed", True, str(cores))]
        for i, (name, _, threads) in enumerate(cases):
            neighbour = None
            if i > 0:
                neighbour = mp.get_context("spawn").Process(target=spin, daemon=True)
                neighbour.start()
                time.sleep(1.0)
            try:
                rows.append((name, run(args.config, epochs, os.path.join(tmp, str(i)), threads)))
            finally:
                if neighbour is not None:
                    neighbour.terminate()
                    neighbour.join()
    base = rows[0][1]["wall"]
    print(f"\n{Path(args.config).name}, {epochs} epochs, {cores} usable CPUs\n")
    print("| run | wall s | ratio to alone | intra-op threads | last val/acc |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        acc = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "-"
        print(f"| {name} | {r['wall']:.1f} | {r['wall'] / base:.2f} | {r['threads']} | {acc} |")


if __name__ == "__main__":
    main()
