"""Hyper-parameter and architecture search over vitmha training configs, with Optuna.

``vitmha tune`` is the command; this package holds its parts: the search-space file
(:mod:`~vitmha.search.space`), cost of a candidate before it trains (:mod:`~vitmha.search.cost`), the
pruning callback that runs inside each trial (:mod:`~vitmha.search.pruning`), the study runner
(:mod:`~vitmha.search.study`), its reports (:mod:`~vitmha.search.report`) and the lr finder
(:mod:`~vitmha.search.lr_find`). Optuna is imported only when a study or the pruning callback runs.
"""
from vitmha.search.cost import arch_of, check_arch, count_flops, count_params, measure_latency
from vitmha.search.lr_find import lr_find, suggest_lr
from vitmha.search.pruning import OptunaPruning, make_pruner
from vitmha.search.space import SearchError, SearchSpace, parse_space
from vitmha.search.study import StudyOptions, run_study

__all__ = ["SearchError", "SearchSpace", "parse_space", "arch_of", "check_arch", "count_flops", "count_params",
           "measure_latency", "OptunaPruning", "make_pruner", "StudyOptions", "run_study", "lr_find", "suggest_lr"]
