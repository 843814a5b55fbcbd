"""Optuna pruning for a vitmha fit: a Lightning callback that reports each epoch's validation metric to
the trial in the study's storage and stops the fit when the pruner says so.

It is vitmha's own (optuna-integration's callback has broken across Lightning versions) and it runs inside
the trial's own ``vitmha fit`` process, which reaches the study through its storage URL: the search
process only waits. Only global rank 0 talks to the storage; the decision is broadcast, so all DDP ranks
stop at the same epoch. A pruned fit ends normally (``trainer.should_stop``), with its checkpoints and
metrics.csv, and leaves the user attribute ``pruned_epoch`` on the trial for the search process to read.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import lightning as L

from vitmha.search.space import SearchError

__all__ = ["OptunaPruning", "make_pruner", "open_storage", "PRUNERS"]

PRUNERS = ("median", "hyperband", "none")


def make_pruner(spec: Optional[Dict[str, Any]], max_epochs: Optional[int] = None) -> Any:
    """An Optuna pruner from ``{type: median|hyperband|none, ...its keyword arguments}``. Median defaults to
    3 startup trials and 3 warm-up epochs; Hyperband to ``min_resource`` 2 and ``max_resource`` max_epochs.
    The search process and each trial build the same pruner from the same spec (Optuna stores no pruner)."""
    import optuna

    spec = dict(spec or {"type": "none"})
    kind = spec.pop("type", "median") or "none"
    if kind not in PRUNERS:
        raise SearchError(f"pruner.type: expected one of {list(PRUNERS)}, got {kind!r}")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**{"n_startup_trials": 3, "n_warmup_steps": 3, **spec})
        if kind == "hyperband":
            spec.setdefault("min_resource", 2)
            spec.setdefault("max_resource", int(max_epochs) if max_epochs and max_epochs > 0 else "auto")
            return optuna.pruners.HyperbandPruner(**spec)
    except TypeError as e:
        raise SearchError(f"pruner: {e}") from None
    if spec:
        raise SearchError(f"pruner: type none takes no options, got {sorted(spec)}")
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at ``url``; SQLite waits up to a minute for a lock (the search process and a
    trial write to the same file)."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class OptunaPruning(L.Callback):
    """Report ``monitor`` after every validation epoch to trial ``trial_number`` of study ``study_name`` in
    ``storage``; stop the fit when the pruner prunes it (``pruner`` as for :func:`make_pruner`, or None to
    report without pruning, e.g. multi-objective studies, which Optuna cannot prune).

    Raises SearchError when the task does not log ``monitor``.
    """

    def __init__(self, storage: str, study_name: str, trial_number: int, monitor: str,
                 pruner: Optional[Dict[str, Any]] = None) -> None:
        self.storage, self.study_name, self.trial_number = storage, study_name, int(trial_number)
        self.monitor, self.pruner = monitor, pruner
        self._trial: Any = None

    def _optuna_trial(self, trainer: L.Trainer) -> Any:
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            pruner = make_pruner(self.pruner, trainer.max_epochs) if self.pruner else optuna.pruners.NopPruner()
            storage = open_storage(self.storage)
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
            study_id = storage.get_study_id_from_name(self.study_name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
                raise SearchError(f"{self.monitor} is not logged by {type(pl_module).__name__}; it logs {logged}")
            value, epoch = float(value), int(trainer.current_epoch)
            trial = self._optuna_trial(trainer)
            if self.pruner and len(trial.study.directions) == 1:
                trial.report(value if math.isfinite(value) else float("nan"), epoch)
                last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1
                prune = not last and trial.should_prune()  # a fit that ran all its epochs is complete
            else:
                trial.set_user_attr(f"epoch_{epoch}", value)  # multi-objective: kept for the record only
            if prune:
                trial.set_user_attr("pruned_epoch", epoch)
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            trainer.should_stop = True
