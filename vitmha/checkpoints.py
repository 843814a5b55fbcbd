"""Lightning checkpoints as the CLI and the tools take them: read safely, checked against the model they are
meant for, and ``last`` found among a root's runs.

Everything is read with ``torch.load(weights_only=True)`` (:func:`vitmha.models.weights.load_torch_file`,
the loader ``pretrained:`` weights go through too): a pickle that would build arbitrary objects is refused
and nothing in it runs. Each problem is a :class:`CheckpointError` whose one-line message names the file
and the reason, so ``vitmha`` and the tools print it as ``error: ...`` (exit 2).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, Optional

from torch import nn

from vitmha.models.weights import WeightsError, load_torch_file

__all__ = ["CheckpointError", "read_checkpoint", "check_fits", "find_last_checkpoint"]


class CheckpointError(WeightsError):
    """A checkpoint that is missing, unreadable, or not one of the model it is given to."""


_LAST_READ: Dict[str, Any] = {}  # the last checkpoint read: {"key": (path, mtime, size), "ckpt": dict}


def _file_key(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict of ``path`` (tensors memory-mapped); raises when the file is missing, unreadable,
    refused (it would run code), or not a Lightning checkpoint.

    The last file read is kept until it is read once more, unchanged: the CLI checks ``--ckpt_path`` before
    the run and Lightning then loads the same file through :class:`vitmha.callbacks.AtomicCheckpointIO`,
    which reads it only once that way."""
    key = _file_key(os.fspath(path))
    if key is not None and _LAST_READ.get("key") == key and "ckpt" in _LAST_READ:
        ckpt = _LAST_READ.pop("ckpt")
        _LAST_READ.clear()
        return ckpt
    try:
        ckpt = load_torch_file(path, what="checkpoint")
    except WeightsError as e:  # the loader's message, as this module's one kind of error
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict'); expected a file written by "
                              "`vitmha fit` or trainer.save_checkpoint")
    _LAST_READ.clear()
    if key is not None:
        _LAST_READ.update(key=key, ckpt=ckpt)
    return ckpt


def forget_read_checkpoint() -> None:
    """Drop the kept checkpoint (see :func:`read_checkpoint`)."""
    _LAST_READ.clear()


def check_fits(ckpt: Dict[str, Any], model: nn.Module, path: str) -> None:
    """Raise CheckpointError unless ``ckpt`` holds weights of ``model``: the same state-dict keys with the
    same shapes (keys only when the model loads strictly, Lightning's ``strict_loading`` rule).

    Lightning finds the same problems only inside ``load_state_dict``, as a traceback listing every key;
    this names the first one with both shapes, and the checkpoint's task class when it is another.
    """
    problem = _first_mismatch(ckpt["state_dict"], model.state_dict(), getattr(model, "strict_loading", True))
    if problem is None:
        return
    name = type(model).__name__
    saved_class = str((ckpt.get("hyper_parameters") or {}).get("_class_path") or "")
    if saved_class and saved_class.rsplit(".", 1)[-1] != name:
        raise CheckpointError(f"{path}: a checkpoint of {saved_class}, not of this {name} ({problem})")
    raise CheckpointError(f"{path}: does not fit this {name}: {problem} (another task, architecture or size?)")


def _first_mismatch(theirs: Dict[str, Any], own: Dict[str, Any], strict: bool) -> Optional[str]:
    """The first key of another shape (in the model's order), else the first missing or unexpected key."""
    for key, tensor in own.items():
        if key in theirs and tuple(theirs[key].shape) != tuple(tensor.shape):
            return f"{key} is {tuple(theirs[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
    if not strict:
        return None
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    for keys, where in ((missing, "missing from the checkpoint"), (unexpected, "in the checkpoint, not in the model")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            return f"{keys[0]}{more} {where}"
    return None


def find_last_checkpoint(versions_root: str) -> Optional[str]:
    """``<versions_root>/version_N/checkpoints/last.ckpt`` with the highest N, or None.

    What ``--ckpt_path last`` means in vitmha: the newest run under the root. (Lightning's own ``last`` looks
    only in the folder of the run being started, which is always empty.)
    """
    def version(path: str) -> int:
        n = os.path.basename(os.path.dirname(os.path.dirname(path))).split("_", 1)[1]
        return int(n) if n.isdigit() else -1

    found = [p for p in glob.glob(os.path.join(glob.escape(versions_root), "version_*", "checkpoints", "last.ckpt"))
             if version(p) >= 0]
    return max(found, key=version) if found else None
