"""Average fine-tuned checkpoints into one model: uniform and greedy model soups, and WiSE-FT.

    vitmha soup --checkpoints a.ckpt b.ckpt c.ckpt --method uniform --output soup.ckpt
    vitmha soup --checkpoints a.ckpt b.ckpt c.ckpt --method greedy --config X.yaml --output soup.ckpt
    vitmha soup --checkpoints ft.ckpt --method wise --alpha 0.5 --output wise.ckpt
    vitmha soup --checkpoints ft.ckpt --method wise --alpha 0:1:0.1 --config X.yaml --split test \\
        --robustness --output wise_sweep/

``uniform`` averages the weights of checkpoints of one architecture and classes (Wortsman et al. 2022, *Model
soups*). ``greedy`` scores each checkpoint on the validation split of ``--config``'s data (never the test
split), then, best first, adds each to the soup only when the soup's validation score rises (the paper's
Recipe 1). ``wise`` (Wortsman et al. 2022, *Robust fine-tuning of zero-shot models*) interpolates one
fine-tuned checkpoint with the pretrained weights its run started from (its ``pretrained``, or
``--pretrained``): θ = (1 − α)·θ_pretrained + α·θ_finetuned for the backbone. The head is interpolated too when
the pretrained weights had a head of the same shape (a zero-shot head); a head trained from a fresh
initialisation has no pretrained counterpart, so the fine-tuned head is kept (the command says which).
Several α (``0.2,0.5,0.8`` or ``start:stop:step``) write ``wise.csv`` and ``wise.png`` into the ``--output``
folder: the metric of each α on ``--split``, and with ``--robustness`` under the corruptions (and attacks) of
``vitmha evaluate --robustness`` (vitmha.robustness) on the first ``--robustness-subset`` samples.

The output of one soup or one α is an ordinary task checkpoint (``vitmha test``, ``predict``, ``export``,
``evaluate`` and ``vitmha.load`` take it; the members and α are under its ``vitmha_fusion`` entry). vitmha's
ViTs have no BatchNorm, so averaged weights need no re-calibration of running statistics.
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from vitmha.fusion import (FusionError, average_state_dicts, batchnorm_layers, check_soup, fused_checkpoint,
                           greedy_soup, parse_alphas, pretrained_task, save_checkpoint, wise_ft, wise_keys)
from vitmha.inference import ToolError, load_task, read_checkpoint, run_tool

METHODS = ("uniform", "greedy", "wise")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitmha soup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoints", "--checkpoint", nargs="+", required=True,
                   help="task checkpoints of one architecture and classes (wise: the one fine-tuned checkpoint)")
    p.add_argument("--method", choices=METHODS, required=True, help="uniform, greedy or wise")
    p.add_argument("--output", required=True,
                   help="the checkpoint to write (.ckpt); for a WiSE-FT sweep of several α, a folder")
    p.add_argument("--config", default=None,
                   help="YAML config whose data: section gives the evaluation data (greedy: its validation split; "
                        "default for uniform/wise: the data module saved in the first checkpoint, used only to print "
                        "scores)")
    p.add_argument("--alpha", default="0.5",
                   help="wise: α (0 = pretrained, 1 = fine-tuned), a list 0.2,0.5 or a sweep start:stop:step")
    p.add_argument("--pretrained", default=None,
                   help="wise: the pretrained weights (file, or 'true' for timm's) instead of the run's own")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="the split a WiSE-FT sweep is scored on (default val; greedy always selects on val)")
    p.add_argument("--batch-size", type=int, default=None, help="override the data module's batch size")
    p.add_argument("--num-workers", type=int, default=None, help="override the data module's loader workers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r = p.add_argument_group("robustness of a WiSE-FT sweep (vitmha.robustness)")
    r.add_argument("--robustness", action="store_true", help="also score every α under corruptions and attacks")
    r.add_argument("--robustness-subset", "--robustness_subset", type=int, default=512, metavar="N",
                   help="the first N samples of the split (default 512; 0 = all)")
    r.add_argument("--robustness-corruptions", "--robustness_corruptions", default=None, metavar="LIST",
                   help="comma-separated subset of gaussian_noise, gaussian_blur, jpeg, brightness, contrast, fgsm, "
                        "pgd (default all, as vitmha evaluate --robustness)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(None if argv is None else [str(a) for a in argv])


# ------------------------------------------------------------------------------------------------ evaluation
class Scorer:
    """Scores state dicts of one task on a split of the config's data: ``score(state_dict)`` -> the task's
    monitored metric (``val/acc``, ``val/map``, ``val/miou``) on ``split``."""

    def __init__(self, args: argparse.Namespace, template: Any, ckpt: Dict[str, Any], path: str, split: str) -> None:
        from vitmha.commands.evaluate import _data_section, build_datamodule
        from vitmha.inference import resolve_device

        ns = argparse.Namespace(config=args.config, checkpoint=path)
        section = _data_section(ns, ckpt)
        for key, value in (("batch_size", args.batch_size), ("num_workers", args.num_workers)):
            if value is not None:
                section["init_args"][key] = value
        self.dm = build_datamodule(section, template, args.config or path)
        self.task, self.split = template, split
        self.device = resolve_device(args.device)
        monitor = str(getattr(template, "monitor", "val/loss"))
        self.metric = monitor.replace("val/", f"{split}/", 1)
        mode = getattr(template, "monitor_mode", None)
        self.mode = mode or ("min" if monitor.endswith("loss") else "max")

    def evaluate(self, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
        """Every metric the task logs on the split, with ``state_dict`` loaded (when given)."""
        import lightning as L

        if state_dict is not None:
            self.task.load_state_dict(state_dict)
        trainer = L.Trainer(accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
        run = trainer.validate if self.split == "val" else trainer.test
        return {k: float(v) for k, v in run(self.task, datamodule=self.dm, verbose=False)[0].items()}

    def __call__(self, state_dict: Dict[str, torch.Tensor]) -> float:
        return self.evaluate(state_dict)[self.metric]


def _quiet() -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _note_batchnorm(task: Any) -> None:
    bn = batchnorm_layers(task)
    if bn:
        print(f"note: {len(bn)} BatchNorm layer(s) ({bn[0]}, ...): their running statistics were averaged too; "
              "re-estimate them on training images (torch.optim.swa_utils.update_bn) before trusting the soup")
    else:
        print("no BatchNorm layers: the averaged weights need no re-calibration")


# ------------------------------------------------------------------------------------------------ methods
def soup(args: argparse.Namespace) -> Dict[str, Any]:
    """uniform or greedy: write the soup checkpoint; returns what was done."""
    paths = [os.fspath(p) for p in args.checkpoints]
    if len(paths) < 2:
        raise ToolError(f"--method {args.method}: needs at least two checkpoints, got {len(paths)}")
    ckpts = [read_checkpoint(p) for p in paths]
    check_soup(ckpts, paths)
    sds = [c["state_dict"] for c in ckpts]
    template = load_task(paths[0], ckpt=ckpts[0])
    scorer = Scorer(args, template, ckpts[0], paths[0], "val") if (args.method == "greedy" or args.config) else None
    info: Dict[str, Any] = {"method": args.method, "members": paths}
    first = 0
    if args.method == "greedy":
        g = greedy_soup(sds, scorer, scorer.mode)
        first, sd = g.ingredients[0], g.state_dict
        info.update(ingredients=[paths[i] for i in g.ingredients], metric=scorer.metric, score=g.score,
                    alone={paths[i]: g.alone[i] for i in range(len(paths))})
        print(f"greedy soup on the validation split, by {scorer.metric} ({scorer.mode}):")
        print(f"  {'checkpoint':<50} {'alone':>8} {'soup with it':>13}  kept")
        print(f"  {paths[g.order[0]]:<50} {g.alone[g.order[0]]:>8.4f} {g.alone[g.order[0]]:>13.4f}  yes (best alone)")
        for i, s, kept in g.trials:
            print(f"  {paths[i]:<50} {g.alone[i]:>8.4f} {s:>13.4f}  {'yes' if kept else 'no'}")
        print(f"  soup of {len(g.ingredients)}: {scorer.metric} = {g.score:.4f}")
    else:
        sd = average_state_dicts(sds)
        if scorer is not None:
            alone = [scorer(s) for s in sds]
            score = scorer(sd)
            info.update(metric=scorer.metric, score=score, alone=dict(zip(paths, alone)))
            for p, s in zip(paths, alone):
                print(f"  {p:<50} {scorer.metric} = {s:.4f}")
            print(f"  uniform soup of {len(paths)}: {scorer.metric} = {score:.4f}")
    _note_batchnorm(template)
    out = save_checkpoint(fused_checkpoint(ckpts[first], sd, info), args.output)
    print(f"wrote {out} ({args.method} soup of {len(info.get('ingredients', paths))} checkpoint(s))")
    return {"output": out, "info": info}


def wise(args: argparse.Namespace) -> Dict[str, Any]:
    """WiSE-FT: one α -> a checkpoint; several -> the sweep's table and plot in a folder."""
    from vitmha.inference import parse_pretrained

    paths = [os.fspath(p) for p in args.checkpoints]
    if len(paths) != 1:
        raise ToolError(f"--method wise: interpolates one fine-tuned checkpoint with its pretrained weights; got "
                        f"{len(paths)} checkpoints")
    path = paths[0]
    alphas = parse_alphas(str(args.alpha))
    sweep = len(alphas) > 1
    if sweep and args.output.endswith(".ckpt"):
        raise ToolError(f"--output {args.output}: a sweep of {len(alphas)} α writes a table and a plot: give a folder")
    if args.robustness and not sweep:
        raise ToolError("--robustness: scores a sweep of several α (for one α: vitmha evaluate --robustness on its "
                        "checkpoint)")
    ckpt = read_checkpoint(path)
    check_soup([ckpt], [path])  # refuses a peft run
    pre = parse_pretrained(args.pretrained) if args.pretrained is not None else None
    base, zero_shot = pretrained_task(ckpt, path, pre)
    keys = wise_keys(base, zero_shot)
    theta0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    del base
    print("head: " + ("interpolated (the pretrained weights have a head of the same shape: a zero-shot head)"
                      if zero_shot else "the fine-tuned one (the run trained a new head; the pretrained weights have "
                                        "none of this shape to interpolate with)"))
    source = args.pretrained or (ckpt.get("hyper_parameters") or {}).get("pretrained")
    info = {"method": "wise", "members": [path], "pretrained": str(source), "zero_shot_head": zero_shot}
    if not sweep:
        sd = wise_ft(ckpt["state_dict"], theta0, alphas[0], keys)
        out = save_checkpoint(fused_checkpoint(ckpt, sd, {**info, "alpha": alphas[0]}), args.output)
        print(f"wrote {out} (WiSE-FT, α = {alphas[0]:g}: (1 - α)·pretrained + α·fine-tuned)")
        return {"output": out, "info": info}
    return wise_sweep(args, path, ckpt, theta0, keys, alphas, info)


def _robustness_spec(args: argparse.Namespace):
    from vitmha.robustness import RobustnessError, RobustnessSpec

    try:
        return RobustnessSpec.create(perturbations=args.robustness_corruptions, subset=args.robustness_subset)
    except RobustnessError as e:
        raise ToolError(f"--robustness: {e}") from None


def wise_sweep(args: argparse.Namespace, path: str, ckpt: Dict[str, Any], theta0: Dict[str, torch.Tensor],
               keys: List[str], alphas: List[float], info: Dict[str, Any]) -> Dict[str, Any]:
    """Score every α on ``--split`` (and under the robustness sweep), write wise.csv and wise.png."""
    from vitmha import robustness as rb

    spec = _robustness_spec(args) if args.robustness else None
    task = load_task(path, ckpt=ckpt)
    if spec is not None:
        try:
            rb.check_task(task)
        except rb.RobustnessError as e:
            raise ToolError(f"{path}: --robustness: {e}") from None
    scorer = Scorer(args, task, ckpt, path, args.split)
    rows: List[Dict[str, Any]] = []
    for a in alphas:
        scores = scorer.evaluate(wise_ft(ckpt["state_dict"], theta0, a, keys))
        row: Dict[str, Any] = {"alpha": a, scorer.metric: scores[scorer.metric]}
        line = f"  α = {a:<5g} {scorer.metric} = {scores[scorer.metric]:.4f}"
        if spec is not None:
            res = _sweep(task, scorer, spec)
            row.update({_column(r): r.score for r in res.rows})
            row["robustness_samples"] = res.samples
            corr = [r.score for r in res.rows if r.kind == "corruption"]
            if corr:
                row["corruption_mean"] = sum(corr) / len(corr)
                line += f"   corruptions (mean of {len(corr)}, {res.samples} samples) = {row['corruption_mean']:.4f}"
        print(line, flush=True)
        rows.append(row)
    os.makedirs(args.output, exist_ok=True)
    table = write_table(rows, os.path.join(args.output, "wise.csv"))
    plot = save_wise_plot(rows, scorer.metric, os.path.join(args.output, "wise.png"),
                          title=f"WiSE-FT of {os.path.basename(path)} on the {args.split} split")
    print(f"wrote {table}\n      {plot}")
    return {"output": args.output, "rows": rows, "info": info, "metric": scorer.metric}


def _sweep(task: Any, scorer: Scorer, spec: Any) -> Any:
    from vitmha import robustness as rb

    dm = scorer.dm
    dm.setup("validate" if scorer.split == "val" else "test")
    loader = dm.val_dataloader() if scorer.split == "val" else dm.test_dataloader()
    prefix = f"{scorer.split}/"
    return rb.robustness_sweep(task, loader, dm.mean, dm.std, spec, prefix=prefix, device=scorer.device)


def _column(row: Any) -> str:
    return "clean_subset" if row.kind == "clean" else f"{row.perturbation}@{row.level}"


def write_table(rows: List[Dict[str, Any]], path: str) -> str:
    """The sweep as CSV (one row per α), written atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([f"{r[c]:.6f}" if isinstance(r.get(c), float) else r.get(c, "") for c in columns])
    os.replace(tmp, path)
    return path


def save_wise_plot(rows: List[Dict[str, Any]], metric: str, path: str, title: str = "") -> str:
    """The metric against α: clean (whole split), and the mean over corruptions and each corruption/attack
    (mean over its levels) when the sweep has them."""
    from vitmha.visualize import _pyplot, _save

    plt = _pyplot()
    xs = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(xs, [r[metric] for r in rows], "-o", color="black", lw=2, ms=4, label=f"clean ({metric})")
    groups: Dict[str, List[str]] = {}
    for c in rows[0]:
        if "@" in c:
            groups.setdefault(c.split("@")[0], []).append(c)
    cmap = plt.get_cmap("tab10")
    for i, (name, cols) in enumerate(groups.items()):
        ys = [sum(r[c] for c in cols) / len(cols) for r in rows]
        style = "--" if name in ("fgsm", "pgd") else "-"
        ax.plot(xs, ys, style, color=cmap(i % 10), lw=1, alpha=0.7, label=f"{name} (mean of {len(cols)} levels)")
    if "corruption_mean" in rows[0]:
        ax.plot(xs, [r["corruption_mean"] for r in rows], "-s", color="tab:red", lw=2, ms=4,
                label=f"mean over corruptions ({rows[0].get('robustness_samples')} samples)")
    ax.set_xlabel("α  (θ = (1 − α)·θ_pretrained + α·θ_fine-tuned)")
    ax.set_ylabel(metric.split("/")[-1])
    ax.set_xlim(min(xs) - 0.02, max(xs) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


@run_tool
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run ``vitmha soup``; returns what was written and scored."""
    args = parse_args(argv)
    if args.method == "greedy" and not args.config:
        raise ToolError("--method greedy: needs --config whose data has a validation split (the soup is selected "
                        "on it, never on the test split)")
    if args.method != "wise" and (args.pretrained is not None or args.robustness or args.alpha != "0.5"):
        raise ToolError("--alpha, --pretrained and --robustness go with --method wise")
    if args.method == "wise" and len(parse_alphas(str(args.alpha))) == 1 and args.split != "val":
        raise ToolError("--split: scores a WiSE-FT sweep of several α; one α writes a checkpoint")
    _quiet()
    try:
        return wise(args) if args.method == "wise" else soup(args)
    except FusionError as e:
        raise ToolError(str(e)) from None


if __name__ == "__main__":
    main()
