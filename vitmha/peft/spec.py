"""The tasks' ``peft`` option: which parameter-efficient fine-tuning method and its settings, checked once,
up front, so that a typo fails before any weights are loaded, with the offending key named."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

#: every method; ``full`` (train everything) and ``linear_probe`` (the head only) are the two ends
METHODS = ("full", "linear_probe", "lora", "dora", "bitfit", "vpt", "adapter")
#: where LoRA / DoRA go in each block: q, k, v are row blocks of the fused ``attn.qkv``
TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")

_LORA_KEYS = ("r", "alpha", "targets", "dropout", "rslora", "norms")
#: the keys each method takes besides ``method``
METHOD_KEYS: Dict[str, Tuple[str, ...]] = {
    "full": (),
    "linear_probe": (),
    "lora": _LORA_KEYS,
    "dora": _LORA_KEYS,
    "bitfit": ("norms",),
    "vpt": ("tokens", "dropout", "norms"),
    "adapter": ("hidden", "scale", "dropout", "norms"),
}


class PeftError(ValueError):
    """A bad ``peft`` spec, or a PEFT operation that cannot be done (e.g. merging prompts into timm weights).
    The message is one line that names the key or the module."""


@dataclass(frozen=True)
class PeftSpec:
    """A checked ``peft`` spec. Fields a method does not take keep their defaults and are ignored."""

    method: str
    r: int = 8                                # LoRA / DoRA rank
    alpha: Optional[float] = None             # LoRA scaling numerator; None = r (scaling 1)
    targets: Tuple[str, ...] = ("q", "v")     # the LoRA paper's choice for attention
    dropout: float = 0.0                      # on the LoRA / adapter input; on VPT's prompt tokens
    rslora: bool = False                      # alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)
    norms: bool = False                       # also train the backbone's norm layers
    tokens: int = 10                          # VPT-deep: prompt tokens per block
    hidden: int = 64                          # adapter bottleneck width (AdaptFormer's 64)
    scale: float = 0.1                        # adapter output scale (AdaptFormer's 0.1)

    @property
    def scaling(self) -> float:
        """The factor on LoRA's B A: alpha / r, or alpha / sqrt(r) with rslora."""
        alpha = float(self.r if self.alpha is None else self.alpha)
        return alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> Dict[str, Any]:
        """``{method, <the method's keys>}``: what parse_peft reads back (for file metadata)."""
        d = dataclasses.asdict(self)
        out = {"method": self.method, **{k: d[k] for k in METHOD_KEYS[self.method]}}
        if "targets" in out:
            out["targets"] = list(out["targets"])
        return out


def _int(key: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise PeftError(f"peft.{key}: expected an integer >= {low}, got {v!r}")
    return v


def _number(key: str, v: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and v < high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g})"
        raise PeftError(f"peft.{key}: expected a number in {span}, got {v!r}")
    return float(v)


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise PeftError(f"peft.{key}: expected true or false, got {v!r}")
    return v


def _targets(v: Any) -> Tuple[str, ...]:
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, (list, tuple)) or not names:
        raise PeftError(f"peft.targets: expected a list such as [q, v] (any of {', '.join(TARGETS)}), got {v!r}")
    for t in names:
        if t not in TARGETS:
            raise PeftError(f"peft.targets: unknown target {t!r}; expected any of {', '.join(TARGETS)}")
    if len(set(names)) != len(names):
        raise PeftError(f"peft.targets: a target is listed twice: {list(names)}")
    return tuple(t for t in TARGETS if t in names)  # model order: q, k, v, proj, fc1, fc2


_CHECKS = {
    "r": lambda v: _int("r", v, 1),
    "alpha": lambda v: _number("alpha", v, 0.0, low_open=True),
    "targets": _targets,
    "dropout": lambda v: _number("dropout", v, 0.0, 1.0),
    "rslora": lambda v: _bool("rslora", v),
    "norms": lambda v: _bool("norms", v),
    "tokens": lambda v: _int("tokens", v, 1),
    "hidden": lambda v: _int("hidden", v, 1),
    "scale": lambda v: _number("scale", v, -math.inf),
}


def parse_peft(value: Any) -> Optional[PeftSpec]:
    """The checked spec of a ``peft`` option such as ``{method: lora, r: 8, alpha: 16, targets: [q, v]}``;
    None for None or ``{method: full}`` (plain fine-tuning). ``rank`` is accepted for ``r``.
    Raises PeftError naming the key: unknown method, key or target, a rank below 1, a value of the wrong type."""
    if value is None or isinstance(value, PeftSpec):
        return None if value is not None and value.method == "full" else value
    if not isinstance(value, Mapping):
        raise PeftError(f"peft: expected a mapping such as {{method: lora, r: 8, targets: [q, v]}}, got {value!r}")
    d = dict(value)
    if "rank" in d:
        if "r" in d:
            raise PeftError("peft.rank: give the rank once, as r or as rank")
        d["r"] = d.pop("rank")
    if "method" not in d:
        raise PeftError(f"peft.method: missing; expected one of {', '.join(METHODS)}")
    method = d.pop("method")
    if method not in METHODS:
        raise PeftError(f"peft.method: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    allowed = METHOD_KEYS[method]
    for key in d:
        if key not in allowed:
            takes = f"its keys are {', '.join(allowed)}" if allowed else "it takes no other key"
            raise PeftError(f"peft.{key}: unknown key for method {method}; {takes}")
    checked = {k: _CHECKS[k](v) for k, v in d.items()}
    return None if method == "full" else PeftSpec(method=method, **checked)
