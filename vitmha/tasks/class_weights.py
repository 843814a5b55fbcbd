"""``class_weights`` of the supervised tasks: checked when the task is built, ``auto``/``effective`` computed
from the data module's training counts when fit starts, kept in the checkpoint as a buffer."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from vitmha.tasks.losses import AUTO_WEIGHTS, class_weights_from_counts


def init_class_weights(task: Any, num_classes: int) -> None:
    """Check ``class_weights`` and register the ``class_weight`` buffer (C,) it fills: the given list, or
    NaN until ``setup("fit")`` computes ``auto``/``effective`` weights from the training counts (kept in the
    state dict, so test and predict need no data). No buffer without class weights, so checkpoints of runs
    without them keep their keys."""
    from vitmha.tasks.base import TaskConfigError

    cw = task.hparams.get("class_weights")
    if cw is None:
        return
    if isinstance(cw, str):
        if cw not in AUTO_WEIGHTS:
            raise TaskConfigError(f"class_weights: expected null, {' or '.join(AUTO_WEIGHTS)}, or a list of "
                                  f"{num_classes} weights; got {cw!r}")
        weight = torch.full((num_classes,), float("nan"))
        task.register_buffer("class_counts", torch.full((num_classes,), -1, dtype=torch.long))
    else:
        try:
            weight = torch.tensor([float(w) for w in cw], dtype=torch.float32)
        except (TypeError, ValueError):
            raise TaskConfigError(f"class_weights: expected a list of {num_classes} numbers, got {cw!r}") from None
        if weight.numel() != num_classes or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()) \
                or not bool((weight > 0).any()):
            raise TaskConfigError(f"class_weights: expected {num_classes} finite weights >= 0 (num_classes="
                                  f"{num_classes}), not all 0; got {list(cw)}")
    task.register_buffer("class_weight", weight)


def compute_class_weights(task: Any) -> None:
    """Fill ``class_weight`` from the data module's ``train_class_counts()``; log the table."""
    from vitmha.tasks.base import TaskConfigError

    method, k = task.hparams.class_weights, int(task.hparams.num_classes)
    dm = getattr(task.trainer, "datamodule", None) if task._trainer is not None else None
    counter = getattr(dm, "train_class_counts", None)
    if counter is None:
        raise TaskConfigError(
            f"class_weights: {method!r} needs the training class counts from the data module, but "
            f"{type(dm).__name__ if dm is not None else 'no data module'} has no train_class_counts() "
            "(vitmha's data modules have it); give the weights as a list [w0, w1, ...] instead")
    counts = np.asarray(counter(), dtype=np.int64)
    if counts.shape != (k,):
        raise TaskConfigError(f"class_weights: the data module counted {counts.shape[0]} classes, the model "
                              f"has num_classes={k}")
    weight = class_weights_from_counts(counts, method)
    task.class_weight.copy_(weight)
    task.class_counts.copy_(torch.from_numpy(counts))
    names = getattr(dm, "classes", None) or [str(i) for i in range(k)]
    kind = "inverse frequency" if method == "auto" else "effective number, beta 0.999"
    what = {"segmentation": "pixels", "multilabel": "positives"}.get(task.task, "images")
    table = ", ".join(f"{n}: {w:.3g} ({c})" for n, w, c in zip(names, weight.tolist(), counts.tolist()))
    rank_zero_info(f"class_weights {method} ({kind}, mean 1 over the classes present), "
                   f"class: weight (train {what}): {table}")
    for logger in task.loggers:
        logger.log_hyperparams({"class_weights_used": {str(n): round(float(w), 6) for n, w in zip(names, weight)},
                                "train_class_counts": {str(n): int(c) for n, c in zip(names, counts)}})
