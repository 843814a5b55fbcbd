"""Search hyper-parameters or architectures of a vitmha training config with Optuna.

    vitmha tune --config configs/quickstart.yaml --search configs/search/quickstart_hparams.yaml \
        --n_trials 20 --output runs/search/quickstart_hparams [--section.key value ...]
    vitmha tune --config configs/quickstart.yaml --lr_find --output runs/lr_find/quickstart

--config and any --section.key value are read exactly as vitmha fit reads them (they are the fixed part
of every trial). --search names a space file (configs/search/*.yaml): dotted config keys with
{type: float|int|categorical, low, high, log, step, choices}, constraints, fixed overrides, pruner. Each
trial is a real `vitmha fit` in its own process with its own run folder, <output>/trials/trial_NNNN/
(config.yaml, train.log, lightning_logs/version_0/ with metrics.csv and checkpoints). The study folder
gets trials.csv, best.yaml (vitmha fit --config <output>/best.yaml retrains the best), the
Pareto-optimal configs in pareto/ for two or more objectives, history.png, importances.png, pareto.png.
--n_trials is the study's total: rerunning the same command after an interruption runs only what is
missing (a trial running when the search was killed is run again). A bad space is one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple


from vitmha.errors import exit_on_user_error


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """(tune's own options, the training config's arguments: --config and --section.key overrides)."""
    p = argparse.ArgumentParser(prog="vitmha tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", action="append", default=[],
                   help="the training config (as vitmha fit; may be repeated, or left out for overrides only)")
    p.add_argument("--search", help="search space YAML (configs/search/*.yaml)")
    p.add_argument("--n_trials", type=int, default=20, help="trials in the study, in total (default 20)")
    p.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
    p.add_argument("--output", required=True, help="the study folder (created)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL (default sqlite:///<output>/study.db)")
    p.add_argument("--study_name", default=None, help="default: the output folder's name")
    p.add_argument("--directions", nargs="+", default=None,
                   help="metric:maximize|minimize ... (val/acc, val/loss, ...; gflops, params, latency are counted "
                        "before training); default: the search file's directions")
    p.add_argument("--max_gflops", type=float, default=None, help="reject candidates above this, untrained")
    p.add_argument("--max_params", type=float, default=None, help="reject candidates above this, untrained")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--lr_find", action="store_true", help="run the lr range test instead of a search")
    p.add_argument("--lr_min", type=float, default=1e-6, help="lr finder: first lr (default 1e-6)")
    p.add_argument("--lr_max", type=float, default=1.0, help="lr finder: last lr (default 1)")
    p.add_argument("--lr_steps", type=int, default=100, help="lr finder: training steps (default 100)")
    args, rest = p.parse_known_args(None if argv is None else [str(a) for a in argv])
    for item in rest:
        if item.startswith("-") and not item.startswith("--"):
            p.error(f"unknown option {item}")
    config_args = [x for c in args.config for x in ("--config", c)] + rest
    return args, config_args


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the search (or the lr finder) described by ``argv`` (default ``sys.argv[1:]``)."""
    args, config_args = parse_args(argv)
    from vitmha.search.space import SearchError

    if args.lr_find:
        from vitmha.search.lr_find import lr_find

        lr_find(config_args, args.output, args.lr_min, args.lr_max, args.lr_steps)
        return
    if not args.search:
        raise SearchError("--search: give a search space file (or --lr_find)")
    import yaml

    from vitmha.search.space import parse_space
    from vitmha.search.study import StudyOptions, parse_directions, run_study

    if not os.path.isfile(args.search):
        raise SearchError(f"{args.search}: search space file not found")
    with open(args.search) as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise SearchError(f"{args.search}: not valid YAML ({e})") from None
    space = parse_space(doc, args.search)
    given = {a[2:].split("=", 1)[0].removesuffix("+") for a in config_args if a.startswith("--") and a != "--config"}
    for key in sorted(given & set(space.fixed)):  # the command line wins over the search file's fixed values
        print(f"--{key} on the command line replaces fixed: {key}: {space.fixed.pop(key)!r} of {args.search}")
    if args.n_trials < 1:
        raise SearchError(f"--n_trials must be >= 1, got {args.n_trials}")
    opts = StudyOptions(
        config_args=config_args, space=space, n_trials=args.n_trials, output=args.output,
        directions=parse_directions(args.directions or space.directions), timeout=args.timeout,
        storage=args.storage, study_name=args.study_name,
        max_gflops=args.max_gflops if args.max_gflops is not None else space.max_gflops,
        max_params=args.max_params if args.max_params is not None else space.max_params,
        seed=args.seed, sampler=space.sampler,
        print_fn=lambda s: print(s, flush=True))
    run_study(opts)


if __name__ == "__main__":
    main()
