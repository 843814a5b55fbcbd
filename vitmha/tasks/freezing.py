"""Linear probing, late unfreezing and frozen leading blocks: which parameters of a task train when."""
from __future__ import annotations

from typing import Any, List

from torch import nn


def leading_parameters(task: Any, n: int) -> List[nn.Parameter]:
    """The patch embedding, prefix tokens, position embedding and the first ``n`` blocks of the task's
    backbone (what ``freeze_blocks`` freezes). Raises ValueError when the backbone has fewer than ``n`` blocks."""
    bb = task.backbone_module()
    depth = len(bb.blocks)
    if n > depth:
        raise ValueError(f"freeze_blocks={n}, but the backbone has {depth} blocks")
    prefixes = ("patch_embed.", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre.") + tuple(
        f"blocks.{i}." for i in range(n))
    return [p for name, p in bb.named_parameters() if name.startswith(prefixes)]


def apply_freeze(task: Any, epoch: int) -> None:
    """Set ``requires_grad`` for training epoch ``epoch``: with ``freeze_backbone`` only the head trains
    (until ``unfreeze_at_epoch``), ``freeze_blocks`` keeps the first blocks frozen, a PEFT method keeps what it
    set when the task was built. Frozen modules stay in eval mode (no dropout/drop-path) while training."""
    if task.uses_peft:  # apply_peft set requires_grad when the task was built; it stays so
        return
    hp = task.hparams
    frozen = task.freezes_backbone and (hp.unfreeze_at_epoch is None or epoch < hp.unfreeze_at_epoch)
    for p in task.frozen_parameters():
        p.requires_grad_(not frozen)
    n = int(hp.freeze_blocks or 0)
    if n and not frozen:  # no gradient flows below block n: those blocks cost a forward pass only
        for p in leading_parameters(task, n):
            p.requires_grad_(False)
    task.backbone_frozen = frozen
    task.train(task.training)
