"""Run an Optuna study whose trials are vitmha fits of one training config.

Each trial is a separate ``python -m vitmha.cli fit --config <trial>/config.yaml`` process: a crash, a
NaN, an out-of-memory kill or a leak in one trial cannot take the study down or carry into the next one,
and DDP trials launch exactly as a user's run does. The trial process reports its validation metric to the
study through the storage (:class:`~vitmha.search.pruning.OptunaPruning`); this process asks, waits, and
tells. It costs one interpreter start per trial (a few seconds).

Resuming: ``n_trials`` is the study's total. A rerun of the same command opens the same storage, marks
the trials that this machine was running when its process died as FAIL (``interrupted``), queues their
parameters again, and runs only what is missing. Candidates that break a constraint or a budget are
recorded as rejected (state PRUNED, user attribute ``rejected``) without training and do not count.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from vitmha.search.cost import arch_of, backbone_of, check_arch, count_flops, count_params, measure_latency
from vitmha.search.pruning import make_pruner, open_storage
from vitmha.search.report import best_trials, write_best_configs, write_plots, write_trials_csv
from vitmha.search.space import SearchError, SearchSpace, combinations, get_key, set_key

__all__ = ["StudyOptions", "load_config", "check_space", "parse_directions", "run_study", "ANALYTIC"]

ANALYTIC = ("gflops", "params", "latency")   # objectives known before training
_BACKBONE = "model.init_args.backbone"
_KWARGS = "model.init_args.backbone_kwargs"


@dataclass
class StudyOptions:
    """What ``vitmha tune`` was asked (see its ``--help``)."""

    config_args: List[str]                   # ["--config", "X.yaml", "--section.key", "value", ...]
    space: SearchSpace
    n_trials: int
    output: str
    directions: List[Tuple[str, str]]        # [("val/acc", "maximize"), ("gflops", "minimize")]
    timeout: Optional[float] = None
    storage: Optional[str] = None
    study_name: Optional[str] = None
    max_gflops: Optional[float] = None
    max_params: Optional[float] = None
    seed: int = 0
    sampler: Dict[str, Any] = field(default_factory=dict)
    print_fn: Callable[[str], None] = print


def parse_directions(items: Sequence[str]) -> List[Tuple[str, str]]:
    """``["val/acc:maximize", "gflops:minimize"]`` -> pairs; raises SearchError on a bad item."""
    out = []
    for item in items:
        metric, _, direction = str(item).rpartition(":")
        if not metric or direction not in ("maximize", "minimize"):
            raise SearchError(f"--directions: {item!r}: expected metric:maximize or metric:minimize")
        out.append((metric, direction))
    if not out:
        raise SearchError("--directions: give at least one metric:direction (or directions: in the search file)")
    if len({m for m, _ in out}) != len(out):
        raise SearchError(f"--directions: a metric appears twice in {list(items)}")
    if all(m in ANALYTIC for m, _ in out):
        raise SearchError("--directions: at least one objective must be a metric the training logs (e.g. val/acc)")
    return out


# ------------------------------------------------------------------------------------------ the config
def load_config(config_args: Sequence[str]) -> Tuple[Any, Dict[str, Any]]:
    """(parser, complete config as a plain dict) for ``vitmha fit``'s arguments, parsed by the vitmha CLI
    itself (same YAML, same overrides, same errors) without building anything."""
    import warnings

    from vitmha.cli import VitmhaCLI

    class _ParseOnly(VitmhaCLI):
        def _set_seed(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    cli = _ParseOnly(args=list(config_args), run=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skip_none's deprecation: None must stay (e.g. grad_clip_norm: null)
        config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    return cli.parser, config


def _parser_check(parser: Any, config: Dict[str, Any]) -> Optional[str]:
    """The CLI parser's complaint about ``config`` (the one line that names the problem), or None."""
    old = parser.exit_on_error
    parser.exit_on_error = False
    try:
        parser.parse_object(config)
        return None
    except Exception as e:  # noqa: BLE001 - jsonargparse raises ArgumentError and friends
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        useful = [ln for ln in lines if "not accepted" in ln or "Expected" in ln or "not expected" in ln
                  or "does not" in ln.lower() and "Union" not in ln]
        return (useful or lines or [type(e).__name__])[-1].lstrip("- ")
    finally:
        parser.exit_on_error = old


def _uses_arch(keys: Sequence[str]) -> bool:
    return any(k == _BACKBONE or k.startswith(_KWARGS + ".") for k in keys)


class Candidates:
    """Turns searched values into complete trial configs and says why one may not train."""

    def __init__(self, space: SearchSpace, base: Dict[str, Any], max_gflops: Optional[float],
                 max_params: Optional[float], need_cost: bool) -> None:
        self.space, self.base = space, base
        self.max_gflops, self.max_params = max_gflops, max_params
        keys = [k for p in space.params for k in p.keys] + [k for c in space.constraints for k in c.keys]
        needed = need_cost or _uses_arch(keys) or max_gflops is not None or max_params is not None
        # cost goes into trials.csv whenever the model has a ViT backbone; it is an error only where it is needed
        self.arch = needed or bool(get_key(base, _BACKBONE, None))
        self._base_arch: Optional[Dict[str, Any]] = None
        if self.arch:
            name, kwargs = backbone_of(space.apply(base, {}))
            searched = {k.split(".")[-1] for p in space.params for k in p.keys if k.startswith(_KWARGS + ".")}
            try:  # any buildable arch will do: the fast path lays the searched values over it
                self._base_arch = arch_of(name, kwargs)
            except SearchError:
                try:
                    self._base_arch = arch_of(name, {k: v for k, v in kwargs.items() if k not in searched})
                except SearchError as e:
                    raise SearchError(f"{_KWARGS}: {e}") from None

    def config(self, values: Dict[str, Any]) -> Dict[str, Any]:
        return self.space.apply(self.base, values)

    def resolved(self, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The architecture ``config`` builds (None when nothing architectural is searched or counted)."""
        if not self.arch:
            return None
        name, kwargs = backbone_of(config)
        same_name = name == get_key(self.base, _BACKBONE, None)
        return arch_of(name, kwargs, base=self._base_arch if same_name else None)

    def context(self, config: Dict[str, Any], arch: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """``config`` whose backbone_kwargs also hold the resolved architecture's values, so constraints can
        name ``backbone_kwargs.embed_dim`` when the config leaves it at the architecture's default."""
        if arch is None:
            return config
        ctx = dict(config)
        ctx["model"] = {**config["model"], "init_args": {**config["model"]["init_args"]}}
        kwargs = {k: arch[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes")}
        kwargs.update(img_size=arch["img_size"][0], patch_size=arch["patch_size"][0])
        ctx["model"]["init_args"]["backbone_kwargs"] = {**kwargs, **(get_key(config, _KWARGS, None) or {})}
        return ctx

    def reject(self, config: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
        """(why ``config`` must not train, or None; its cost: gflops and params when counted)."""
        try:
            arch = self.resolved(config)
        except SearchError as e:
            return str(e), {}
        if arch is not None:
            reason = check_arch(arch)
            if reason:
                return reason, {}
        reason = self.space.violated(self.context(config, arch))
        if reason:
            return reason, {}
        cost: Dict[str, Any] = {}
        if arch is not None:
            cost = {"gflops": count_flops(arch) / 1e9, "params": count_params(arch)}
            if self.max_gflops is not None and cost["gflops"] > self.max_gflops:
                return f"{cost['gflops']:.4g} GFLOPs > --max_gflops {self.max_gflops:g}", cost
            if self.max_params is not None and cost["params"] > self.max_params:
                return f"{cost['params']:,} parameters > --max_params {self.max_params:g}", cost
        return None, cost


def check_space(parser: Any, cands: Candidates) -> None:
    """Refuse a space that cannot work, before any training: a key the config does not have, a value its
    type does not accept, a backbone argument the architecture does not take, a constraint over unknown keys,
    or a value with which no combination of the other searched values builds a valid model."""
    space, base = cands.space, cands.base
    for section, values in (("fixed", space.fixed), ("budget", space.budget)):
        for key, value in values.items():
            cfg = copy.deepcopy(base)
            set_key(cfg, key, value)
            reason = _parser_check(parser, cfg)
            if reason:
                raise SearchError(f"{section}: {key}={value!r}: {reason}")
    for p in space.params:
        for target in p.keys:
            head, _, _ = target.rpartition(".")
            if head and not isinstance(get_key(base, head, None), dict) and not head.startswith(_KWARGS):
                raise SearchError(f"{target}: unknown key ({head} is not a section of the config)")
        for v in p.corners():
            reason = _parser_check(parser, cands.config({p.key: v}))
            if reason:
                raise SearchError(f"{p.key}: {v!r} is not accepted: {reason}")
            if cands.arch and _uses_arch(p.keys):
                name, kwargs = backbone_of(cands.config({p.key: v}))
                try:
                    arch_of(name, kwargs)
                except SearchError as e:
                    if "bad override" in str(e):
                        raise SearchError(f"{p.key}: not an argument of {name} ({e})") from None
    probe = cands.config({p.key: p.corners()[0] for p in space.params})
    probe = cands.context(probe, cands.resolved(probe) if cands.arch else None)
    for c in space.constraints:
        for k in c.keys:
            try:
                get_key(probe, k)
            except KeyError:
                raise SearchError(f"constraints: {c.text!r}: {k} is not a key of the config") from None
    # every value must take part in at least one valid candidate (checked on the corners of the ranges)
    relevant = [p for p in space.params if _uses_arch(p.keys) and cands.arch
                or any(k in c.keys for c in space.constraints for k in p.keys)]
    if not relevant:
        return
    fixed = {p.key: p.corners()[0] for p in space.params if p not in relevant}
    outcome = []
    for combo in combinations(relevant):
        reason, _ = cands.reject(cands.config({**fixed, **combo}))
        budget = reason is not None and ("--max_gflops" in reason or "--max_params" in reason)
        outcome.append((combo, None if budget else reason))
    for p in relevant:
        for v in p.corners():
            reasons = [r for combo, r in outcome if combo[p.key] == v]
            if reasons and all(reasons):
                raise SearchError(f"{p.key}: {v!r} never gives a valid model with the other searched values "
                                  f"({reasons[0]})")


# ------------------------------------------------------------------------------------------ the study
def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _recover(study: Any, storage: Any, print_fn: Callable[[str], None]) -> None:
    """Trials this machine was running when its search process died: FAIL, and queued again."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("retry_of") for t in trials if t.state == optuna.trial.TrialState.WAITING}
    for t in trials:
        if t.state != optuna.trial.TrialState.RUNNING or not _dead_here(str(t.user_attrs.get("worker", ""))):
            continue
        if t.number not in queued:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        print_fn(f"trial {t.number} was running when the search stopped: marked FAIL, queued again")


def _counted(t: Any, me: str) -> bool:
    import optuna

    s, a = t.state, t.user_attrs
    if a.get("rejected") or a.get("interrupted"):
        return False
    if s == optuna.trial.TrialState.RUNNING:
        return a.get("worker") != me and not _dead_here(str(a.get("worker", "")))  # another live worker's
    return s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _sampler(n_objectives: int, seed: int, kwargs: Dict[str, Any]) -> Any:
    import optuna

    try:
        if n_objectives == 1:
            return optuna.samplers.TPESampler(seed=seed, **kwargs)
        return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
    except TypeError as e:
        raise SearchError(f"sampler: {e}") from None


def _metric_rows(run_root: str) -> Tuple[List[Dict[str, str]], Optional[str]]:
    """Rows of the newest metrics.csv under ``run_root``/lightning_logs, and its folder."""
    import csv
    import glob

    dirs = sorted(glob.glob(os.path.join(run_root, "lightning_logs", "version_*")),
                  key=lambda d: int(d.rsplit("_", 1)[-1]) if d.rsplit("_", 1)[-1].isdigit() else -1)
    for d in reversed(dirs):
        path = os.path.join(d, "metrics.csv")
        if os.path.isfile(path):
            with open(path, newline="") as f:
                return list(csv.DictReader(f)), d
    return [], (dirs[-1] if dirs else None)


def _last(rows: List[Dict[str, str]], metric: str) -> Tuple[Optional[float], int]:
    """The metric's value at the last epoch that logged it, and how many epochs logged it."""
    vals = [(r.get("epoch"), float(r[metric])) for r in rows if r.get(metric) not in (None, "")]
    return (vals[-1][1], len(vals)) if vals else (None, 0)


def _error_line(log: str) -> str:
    try:
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def _child_preexec() -> None:
    # the trial dies with the search process (SIGKILL included), so a killed study leaves no orphan fit
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    """SIGTERM or Ctrl-C reached the search process."""


def run_study(opts: StudyOptions) -> Any:
    """Run (or complete) the study; returns it. Raises SearchError for a bad space or study, before training."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say = opts.print_fn
    parser, base = load_config(opts.config_args)
    metrics = [m for m, _ in opts.directions]
    need_cost = any(m in ("gflops", "params") for m in metrics)
    cands = Candidates(opts.space, base, opts.max_gflops, opts.max_params, need_cost)
    check_space(parser, cands)
    # what best.yaml puts back for the trial-only budget keys: the training config's own values
    restore = {k: get_key(base, k, None) for k in opts.space.budget}

    os.makedirs(opts.output, exist_ok=True)
    url = opts.storage or "sqlite:///" + os.path.abspath(os.path.join(opts.output, "study.db"))
    name = opts.study_name or os.path.basename(os.path.normpath(opts.output))
    storage = open_storage(url)
    max_epochs = get_key(cands.config({}), "trainer.max_epochs", None)
    single = len(opts.directions) == 1
    pruner_spec = opts.space.pruner if single and metrics[0] not in ANALYTIC else {"type": "none"}
    pruner = make_pruner(pruner_spec, max_epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    directions=[d for _, d in opts.directions], pruner=pruner)
    except ValueError as e:
        raise SearchError(f"study {name!r} in {url}: {e}") from None
    if [d.name.lower() for d in study.directions] != [d for _, d in opts.directions]:
        raise SearchError(f"study {name!r} in {url} was created with directions "
                          f"{[d.name.lower() for d in study.directions]}; this run asks {opts.directions}")
    stored = study.user_attrs.get("metrics")
    if stored is None:
        study.set_user_attr("metrics", metrics)
    elif stored != metrics:
        raise SearchError(f"study {name!r} in {url} optimises {stored}; this run asks {metrics}")
    _recover(study, storage, say)
    study.sampler = _sampler(len(metrics), opts.seed + len(study.get_trials(deepcopy=False)), opts.sampler)

    me = _worker()
    param_keys = [p.key for p in opts.space.params]
    t_start = time.time()
    prune_note = "" if pruner_spec.get("type") != "none" else ", no pruning" + (
        " (Optuna prunes single-objective studies only)" if not single else "")
    say(f"study {name}: {opts.n_trials} trials in {opts.output} (storage {url}){prune_note}")
    rejected_in_a_row = 0

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            done = sum(_counted(t, me) for t in trials)
            if done >= opts.n_trials:
                break
            if opts.timeout is not None and time.time() - t_start > opts.timeout:
                say(f"--timeout {opts.timeout:g} s reached: {done}/{opts.n_trials} trials; rerun to continue")
                break
            trial = study.ask()
            storage.set_trial_user_attr(trial._trial_id, "worker", me)
            values = {p.key: p.suggest(trial) for p in opts.space.params}
            config = cands.config(values)
            reason, cost = cands.reject(config)
            for k, v in cost.items():
                trial.set_user_attr(k, v)
            if reason:
                trial.set_user_attr("rejected", reason)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                say(f"trial {trial.number}: rejected before training: {reason}")
                rejected_in_a_row += 1
                if rejected_in_a_row >= max(50, 10 * opts.n_trials):
                    raise SearchError(f"{rejected_in_a_row} candidates in a row were rejected (last: {reason}); "
                                      "widen the space, the constraints or the budgets")
                continue
            rejected_in_a_row = 0
            _run_trial(study, storage, trial, config, cost, opts, pruner_spec)
            _write_results(study, opts, metrics, param_keys, restore)
            say(_progress(study, metrics, opts.n_trials, me))
    except (_Stop, KeyboardInterrupt) as e:
        say(f"search stopped ({e or 'interrupted'}): rerun the same command to continue")
        _write_results(study, opts, metrics, param_keys, restore, plots=True)
        raise SystemExit(143 if isinstance(e, _Stop) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, old)
    files = _write_results(study, opts, metrics, param_keys, restore, plots=True)
    say(_summary(study, metrics, opts.output, files, time.time() - t_start))
    return study


def _run_trial(study: Any, storage: Any, trial: Any, config: Dict[str, Any], cost: Dict[str, Any],
               opts: StudyOptions, pruner_spec: Dict[str, Any]) -> None:
    """Train ``config`` as trial ``trial`` in its own process and tell the study how it went."""
    import optuna

    metrics = [m for m, _ in opts.directions]
    run_root = os.path.abspath(os.path.join(opts.output, "trials", f"trial_{trial.number:04d}"))
    os.makedirs(run_root, exist_ok=True)
    set_key(config, "trainer.default_root_dir", run_root)
    with open(os.path.join(run_root, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    trial.set_user_attr("run_root", run_root)
    if "latency" in metrics:
        name, kwargs = backbone_of(config)
        cost["latency"] = measure_latency(name, kwargs)
        trial.set_user_attr("latency_ms", cost["latency"])

    monitor = next(m for m in metrics if m not in ANALYTIC)
    callback = {"class_path": "vitmha.search.pruning.OptunaPruning",
                "init_args": {"storage": str(storage.url), "study_name": study.study_name,
                              "trial_number": trial.number, "monitor": monitor,
                              "pruner": pruner_spec if pruner_spec.get("type") != "none" else None}}
    cmd = [sys.executable, "-m", "vitmha.cli", "fit", "--config", os.path.join(run_root, "config.yaml"),
           "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=" + json.dumps(callback)]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    log = os.path.join(run_root, "train.log")
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_preexec)
        try:
            rc = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)  # the fit writes a resumable last.ckpt and exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
    wall = time.time() - t0
    rows, run_dir = _metric_rows(run_root)
    trial.set_user_attr("wall_s", round(wall, 1))
    trial.set_user_attr("run_dir", run_dir or run_root)
    last, epochs = _last(rows, monitor)
    trial.set_user_attr("epochs", epochs)
    if last is not None:
        trial.set_user_attr("last_value", last)
    if rc != 0:
        reason = f"killed by signal {-rc}" if rc < 0 else _error_line(log)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if "is not logged by" in reason:
            raise SearchError(f"--directions {monitor}: {reason.removeprefix('error: ')}")
        return
    attrs = storage.get_trial_user_attrs(trial._trial_id)
    if "pruned_epoch" in attrs:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    values = []
    for m in metrics:
        v = cost.get(m) if m in ANALYTIC else _last(rows, m)[0]
        if v is None or not math.isfinite(v):
            trial.set_user_attr("fail_reason", f"{m} is {v} at the end of the run")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        values.append(float(v))
    study.tell(trial, values)


def _write_results(study: Any, opts: StudyOptions, metrics: List[str], param_keys: List[str],
                   restore: Dict[str, Any], plots: bool = False) -> Dict[str, str]:
    write_trials_csv(study, os.path.join(opts.output, "trials.csv"), metrics, param_keys)
    files = {"trials": os.path.join(opts.output, "trials.csv")}
    best = write_best_configs(study, opts.output, metrics, restore)
    if best:
        files["best"] = best[0]
        if len(best) > 1:
            files["pareto configs"] = os.path.join(opts.output, "pareto")
    if plots:
        files.update(write_plots(study, opts.output, metrics))
    return files


def _progress(study: Any, metrics: List[str], n_trials: int, me: str) -> str:
    """One line: the trial that just ended, then trials done, pruned, failed, and the best so far."""
    import optuna

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    t = max((t for t in trials if t.state.is_finished() and not t.user_attrs.get("rejected")),
            key=lambda t: t.datetime_complete)
    a = t.user_attrs
    if t.state == S.COMPLETE:
        what = " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, t.values))
    elif t.state == S.PRUNED:
        what = f"pruned after epoch {a.get('pruned_epoch')} ({metrics[0]}={a.get('last_value', float('nan')):.4g})"
    else:
        what = f"failed: {a.get('fail_reason', '')}"
    count = lambda s: sum(x.state == s and not x.user_attrs.get("rejected") and not x.user_attrs.get("interrupted")
                          for x in trials)  # noqa: E731
    done = sum(_counted(x, me) for x in trials)
    best = best_trials(study)
    best_txt = (f"best #{best[0].number} " + " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, best[0].values))
                + (f" ({len(best)} on the Pareto front)" if len(metrics) > 1 else "")) if best else "best: none yet"
    return (f"trial {t.number:>3} {t.state.name:<8} {what} [{a.get('epochs', 0)} ep, {a.get('wall_s', 0):.0f} s] | "
            f"done {done}/{n_trials}, pruned {count(S.PRUNED)}, failed {count(S.FAIL)} | {best_txt}")


def _summary(study: Any, metrics: List[str], output: str, files: Dict[str, str], wall: float) -> str:
    import optuna

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    n = {s: sum(t.state == s and not t.user_attrs.get("rejected") and not t.user_attrs.get("interrupted")
                for t in trials) for s in (S.COMPLETE, S.PRUNED, S.FAIL)}
    rejected = sum(bool(t.user_attrs.get("rejected")) for t in trials)
    lines = [f"search done in {wall:.0f} s: {n[S.COMPLETE]} completed, {n[S.PRUNED]} pruned, {n[S.FAIL]} failed, "
             f"{rejected} rejected before training"]
    for t in best_trials(study):
        vals = ", ".join(f"{m} {v:.4g}" for m, v in zip(metrics, t.values))
        lines.append(f"  {'best' if len(metrics) == 1 else 'Pareto'} trial {t.number}: {vals}  "
                     f"{json.dumps(t.params)}")
    for k, v in files.items():
        lines.append(f"  {k}: {v}")
    if "best" in files:
        lines.append(f"  next: vitmha fit --config {files['best']}")
    return "\n".join(lines)
