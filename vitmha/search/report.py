"""What a study leaves for its user: trials.csv, best.yaml (one per Pareto-optimal trial for several
objectives) and PNG plots (optimisation history, parameter importances, Pareto front)."""
from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import yaml

from vitmha.search.space import get_key, set_key

__all__ = ["write_trials_csv", "write_best_configs", "write_plots", "best_trials"]


def _fmt(v: Any) -> Any:
    return "" if v is None else v


def best_trials(study: Any) -> List[Any]:
    """The best trial (one objective) or the Pareto-optimal trials sorted by the first objective (best first)."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(study.best_trials, key=lambda t: sign * t.values[0])


def write_trials_csv(study: Any, path: str, metrics: Sequence[str], param_keys: Sequence[str]) -> None:
    """One row per trial: number, state, the objectives, cost, epochs, wall time, parameters, reason, run folder."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row: Dict[str, Any] = {"number": t.number, "state": "REJECTED" if a.get("rejected") else t.state.name}
        for i, m in enumerate(metrics):
            value = t.values[i] if t.values else a.get("last_value") if i == 0 else None
            row[m] = _fmt(value)
        row.update(gflops=_fmt(a.get("gflops")), params=_fmt(a.get("params")), latency_ms=_fmt(a.get("latency_ms")),
                   epochs=_fmt(a.get("epochs")), wall_s=_fmt(a.get("wall_s")))
        row.update({k: _fmt(t.params.get(k)) for k in param_keys})
        row.update(reason=a.get("rejected") or a.get("fail_reason") or
                   (f"pruned after epoch {a['pruned_epoch']}" if "pruned_epoch" in a else ""),
                   run_dir=_fmt(a.get("run_dir")))
        rows.append(row)
    fields = ["number", "state", *metrics, "gflops", "params", "latency_ms", "epochs", "wall_s", *param_keys,
              "reason", "run_dir"]
    fields = list(dict.fromkeys(fields))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _header(t: Any, metrics: Sequence[str], command: str, note: str) -> str:
    values = ", ".join(f"{m} {v:.6g}" for m, v in zip(metrics, t.values))
    return (f"# trial {t.number} of the study: {values}\n# {note}\n# retrain: {command}\n"
            f"# searched: " + ", ".join(f"{k}={v!r}" for k, v in t.params.items()) + "\n")


def write_best_configs(study: Any, output: str, metrics: Sequence[str],
                       restore: Optional[Dict[str, Any]] = None) -> List[str]:
    """best.yaml (and, for several objectives, pareto/trial_NNNN.yaml per Pareto-optimal trial): each the
    complete config the trial trained with, its runs going to ``<output>/best`` (or ``pareto/trial_NNNN``).
    ``restore`` maps the search's trial-only ``budget`` keys to the training config's own values (None: the
    key was not set there), so the written config trains on the full schedule with the values found."""
    trials = best_trials(study)
    restore = restore or {}
    written = []
    for rank, t in enumerate(trials):
        src = os.path.join(t.user_attrs.get("run_root", ""), "config.yaml")
        if not os.path.isfile(src):
            continue
        with open(src) as f:
            config = yaml.safe_load(f)
        t_note = ", ".join(f"{k}={get_key(config, k, None)!r}" for k in restore)
        for key, value in restore.items():
            _put_back(config, key, value)
        if restore:
            full = ", ".join(f"{k}={v!r}" for k, v in restore.items())
            budget_note = f"\n# found with the search budget {t_note}; this config has the training config's {full}"
        else:
            budget_note = ""
        if rank == 0:
            path = os.path.join(output, "best.yaml")
            root = os.path.join(output, "best")
            note = ("the best trial" if len(metrics) == 1 else
                    f"of the {len(trials)} Pareto-optimal trials, the best by {metrics[0]} (all in pareto/)")
            note += budget_note
            _write_config(path, config, root, _header(t, metrics, f"vitmha fit --config {path}", note))
            written.append(path)
        if len(metrics) > 1:
            path = os.path.join(output, "pareto", f"trial_{t.number:04d}.yaml")
            root = os.path.join(output, "pareto", f"trial_{t.number:04d}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_config(path, config, root, _header(t, metrics, f"vitmha fit --config {path}",
                                                      "a Pareto-optimal trial" + budget_note))
            written.append(path)
    return written


def _put_back(config: Dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value``, or remove it when ``value`` is None (the default applies)."""
    if value is not None:
        set_key(config, key, value)
        return
    *heads, last = key.split(".")
    node = config
    for h in heads:
        node = node.get(h) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _write_config(path: str, config: Dict[str, Any], root: str, header: str) -> None:
    config = dict(config)
    config["trainer"] = {**(config.get("trainer") or {}), "default_root_dir": root}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(header)
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ plots
def write_plots(study: Any, output: str, metrics: Sequence[str]) -> Dict[str, str]:
    """history.png, importances.png (>= 2 completed trials with varied parameters) and pareto.png (two
    objectives) in ``output``; returns what was written, and why a plot was left out under "skipped"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.PRUNED and "last_value" in t.user_attrs]
    out: Dict[str, str] = {}
    skipped: List[str] = []
    if not done:
        return {"skipped": "no completed trial yet"}
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [t.number for t in done], [t.values[0] for t in done]
    ax.scatter(xs, ys, label="completed", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.user_attrs["last_value"] for t in pruned], marker="x",
                   color="grey", label="pruned (last epoch reported)")
    best, running = [], None
    for y in ys:
        running = y if running is None else (max if maximize else min)(running, y)
        best.append(running)
    ax.step(xs, best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=metrics[0], title="optimisation history")
    ax.legend(fontsize=8)
    out["history"] = _save(fig, os.path.join(output, "history.png"))

    varied = {k for k in done[0].params if len({repr(t.params.get(k)) for t in done}) > 1}
    if len(done) >= 2 and varied:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=lambda t: t.values[0])
            fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(imp)))
            names = list(imp)[::-1]
            ax.barh([n.replace("model.init_args.", "") for n in names], [imp[n] for n in names])
            ax.set(xlabel=f"importance for {metrics[0]} (fANOVA)", title="parameter importances")
            out["importances"] = _save(fig, os.path.join(output, "importances.png"))
        except Exception as e:  # noqa: BLE001 - importances need enough distinct trials; a study is not wrong without
            skipped.append(f"importances ({e})")
    else:
        skipped.append("importances (needs 2 completed trials with different parameters)")

    if len(metrics) == 2:
        front = {t.number for t in study.best_trials}
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], color="lightgrey", label="trials")
        pts = sorted((t.values[1], t.values[0], t.number) for t in done if t.number in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front")
        for x, y, n in pts:
            ax.annotate(f"#{n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=metrics[1], ylabel=metrics[0], title="Pareto front")
        ax.legend(fontsize=8)
        out["pareto"] = _save(fig, os.path.join(output, "pareto.png"))
    if skipped:
        out["skipped"] = "; ".join(skipped)
    return out


def _save(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
