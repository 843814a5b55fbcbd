"""Search spaces over a training config: dotted keys, Optuna distributions, and constraints.

A space file (``configs/search/*.yaml``) holds::

    directions: [val/acc:maximize]            # optional; --directions wins
    pruner: {type: median, n_warmup_steps: 4} # median | hyperband | none
    fixed: {data.init_args.batch_size: 64}    # set in every trial and in best.yaml
    budget: {trainer.max_epochs: 12}          # set in every trial only: best.yaml keeps the config's value
    space:
      model.init_args.lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      model.init_args.backbone_kwargs.num_heads: {type: categorical, choices: [2, 4]}
      model.init_args.backbone_kwargs.img_size: {type: categorical, choices: [16, 32],
                                                 also: [data.init_args.image_size]}
    constraints:
      - model.init_args.backbone_kwargs.embed_dim % model.init_args.backbone_kwargs.num_heads == 0

Constraints are Python expressions over dotted config keys (arithmetic, comparisons, ``and``/``or``/``not``,
nothing else is evaluated); a candidate that breaks one is rejected before it trains.
"""
from __future__ import annotations

import ast
import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["SearchError", "Param", "Constraint", "SearchSpace", "parse_space", "get_key", "set_key"]

TYPES = ("float", "int", "categorical")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "also"}
_MISSING = object()


class SearchError(ValueError):
    """A bad search space, search option or study state; printed as one ``error:`` line naming the key."""


# ------------------------------------------------------------------------------------------ dotted keys
def get_key(config: Dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``config["a"]["b"]["c"]`` for ``key = "a.b.c"``; ``default`` (or KeyError) when a part is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def set_key(config: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``key = "a.b.c"`` in ``config`` in place, creating missing dicts (``backbone_kwargs`` may lack it)."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise SearchError(f"{key}: {part} is a {type(node[part]).__name__}, not a section")
        node = node[part]
    node[last] = value


# ------------------------------------------------------------------------------------------ parameters
@dataclass
class Param:
    """One searched key and its Optuna distribution; ``also`` are keys that receive the same value."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: List[Any] = field(default_factory=list)
    also: List[str] = field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` suggests for this key."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> List[Any]:
        """Values that stand for the whole range when checking a space: every choice, or low and high."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low)] if self.low == self.high else [cast(self.low), cast(self.high)]

    @property
    def keys(self) -> List[str]:
        return [self.key, *self.also]


def _number(key: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchError(f"{key}: {name} must be a finite number, got {value!r}")
    return value


def _reject_unknown(where: str, given: dict, allowed: set, what: str) -> None:
    """SearchError naming the keys of ``given`` that are not in ``allowed``."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SearchError(f"{where}: unknown {what} {unknown}; expected any of {sorted(allowed)}")


def _parse_param(key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise SearchError(f"{key}: expected a mapping such as {{type: float, low: 1e-4, high: 1e-2}}, got {spec!r}")
    _reject_unknown(key, spec, _SPEC_KEYS, "field(s)")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SearchError(f"{key}: type must be one of {list(TYPES)}, got {kind!r}")
    also = spec.get("also") or []
    if isinstance(also, str):
        also = [also]
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchError(f"{key}: categorical needs a non-empty list of choices, got {choices!r}")
        if len({repr(c) for c in choices}) != len(choices):
            raise SearchError(f"{key}: choices repeat a value: {choices}")
        for name in ("low", "high", "log", "step"):
            if name in spec:
                raise SearchError(f"{key}: {name} does not apply to a categorical")
        return Param(key, kind, choices=list(choices), also=list(also))
    if "choices" in spec:
        raise SearchError(f"{key}: choices apply to type categorical only")
    for name in ("low", "high"):
        if name not in spec:
            raise SearchError(f"{key}: type {kind} needs low and high")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    step = spec.get("step")
    log = bool(spec.get("log", False))
    if low > high:
        raise SearchError(f"{key}: low ({low}) > high ({high})")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise SearchError(f"{key}: type int needs whole low and high, got {low}, {high}")
    if log and low <= 0:
        raise SearchError(f"{key}: log: true needs low > 0, got {low}")
    if step is not None:
        if _number(key, "step", step) <= 0:
            raise SearchError(f"{key}: step must be > 0, got {step}")
        if log:
            raise SearchError(f"{key}: step and log: true do not combine (Optuna samples one or the other)")
    return Param(key, kind, low=low, high=high, log=log, step=step, also=list(also))


# ------------------------------------------------------------------------------------------ constraints
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


class Constraint:
    """A boolean expression over dotted config keys, e.g. ``model.init_args.backbone_kwargs.embed_dim %
    model.init_args.backbone_kwargs.num_heads == 0``; parsed once, evaluated without ``eval``."""

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self._tree = ast.parse(text, mode="eval").body
        except SyntaxError as e:
            raise SearchError(f"constraints: {text!r} is not an expression ({e.msg})") from None
        self.keys: List[str] = []
        self._check(self._tree)

    def _check(self, node: ast.AST) -> None:
        key = _dotted(node)
        if key is not None:
            self.keys.append(key)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left), self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            self._check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                self._check(v)
        elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            for v in (node.left, *node.comparators):
                self._check(v)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for v in node.elts:
                self._check(v)
        elif not isinstance(node, ast.Constant):
            raise SearchError(f"constraints: {self.text!r}: {type(node).__name__} is not allowed (use dotted keys, "
                              "numbers, arithmetic, comparisons, and/or/not)")

    def holds(self, config: Dict[str, Any]) -> bool:
        """Whether ``config`` satisfies the expression."""
        return bool(self._eval(self._tree, config))

    def _eval(self, node: ast.AST, config: Dict[str, Any]) -> Any:
        key = _dotted(node)
        if key is not None:
            return get_key(config, key)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](self._eval(node.left, config), self._eval(node.right, config))
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, config)
            return (not v) if isinstance(node.op, ast.Not) else -v
        if isinstance(node, ast.BoolOp):
            vals = (self._eval(v, config) for v in node.values)
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._eval(v, config) for v in node.elts]
        left = self._eval(node.left, config)
        for op, right_node in zip(node.ops, node.comparators):
            right = self._eval(right_node, config)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True


# ------------------------------------------------------------------------------------------ the space
@dataclass
class SearchSpace:
    """What a space file says: the searched parameters, constraints, fixed overrides, and study settings."""

    params: List[Param]
    constraints: List[Constraint] = field(default_factory=list)
    fixed: Dict[str, Any] = field(default_factory=dict)
    budget: Dict[str, Any] = field(default_factory=dict)    # trial-only overrides (a shorter schedule)
    directions: List[str] = field(default_factory=list)
    pruner: Dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    max_gflops: Optional[float] = None
    max_params: Optional[float] = None
    sampler: Dict[str, Any] = field(default_factory=dict)   # TPESampler / NSGAIISampler keyword arguments

    def apply(self, config: Dict[str, Any], values: Dict[str, Any]) -> Dict[str, Any]:
        """A copy of ``config`` with the ``fixed`` and ``budget`` overrides and the searched ``values`` set."""
        out = copy.deepcopy(config)
        for key, value in {**self.fixed, **self.budget}.items():
            set_key(out, key, value)
        by_key = {p.key: p for p in self.params}
        for key, value in values.items():
            for target in by_key[key].keys if key in by_key else [key]:
                set_key(out, target, value)
        return out

    def violated(self, config: Dict[str, Any]) -> Optional[str]:
        """The first constraint ``config`` breaks, with the values it saw, or None."""
        for c in self.constraints:
            if not c.holds(config):
                seen = ", ".join(f"{k}={get_key(config, k, None)!r}" for k in dict.fromkeys(c.keys))
                return f"constraint {c.text!r} is false ({seen})"
        return None


_TOP_KEYS = {"space", "constraints", "fixed", "budget", "directions", "pruner", "sampler", "max_gflops", "max_params"}


def parse_space(doc: Any, source: str = "search space") -> SearchSpace:
    """A :class:`SearchSpace` from the parsed YAML ``doc``; raises SearchError naming the bad key."""
    if not isinstance(doc, dict):
        raise SearchError(f"{source}: expected a mapping with a 'space:' section")
    _reject_unknown(source, doc, _TOP_KEYS, "section(s)")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise SearchError(f"{source}: 'space:' must map dotted config keys to {{type: ...}} specs")
    params = [_parse_param(str(k), v) for k, v in space.items()]
    targets: Dict[str, str] = {}
    for p in params:
        for k in p.keys:
            if k in targets:
                raise SearchError(f"{k}: set by both {targets[k]} and {p.key}")
            targets[k] = p.key
    constraints = doc.get("constraints") or []
    if not isinstance(constraints, list):
        raise SearchError(f"{source}: constraints must be a list of expressions")
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SearchError(f"{source}: fixed must map dotted config keys to values")
    budget = doc.get("budget") or {}
    if not isinstance(budget, dict):
        raise SearchError(f"{source}: budget must map dotted config keys to values")
    for k in list(fixed) + list(budget):
        if k in targets:
            raise SearchError(f"{k}: both {'fixed' if k in fixed else 'budget'} and searched")
    for k in set(fixed) & set(budget):
        raise SearchError(f"{k}: both fixed and budget")
    directions = doc.get("directions") or []
    directions = [directions] if isinstance(directions, str) else list(directions)
    pruner = doc.get("pruner", "median")
    pruner = {"type": pruner} if isinstance(pruner, str) or pruner is None else dict(pruner)
    sampler = doc.get("sampler") or {}
    if not isinstance(sampler, dict):
        raise SearchError(f"{source}: sampler must map keyword arguments of the Optuna sampler to values")
    return SearchSpace(params, [Constraint(str(c)) for c in constraints], dict(fixed), dict(budget), directions,
                       pruner, doc.get("max_gflops"), doc.get("max_params"), dict(sampler))


def combinations(params: Sequence[Param], limit: int = 4096) -> List[Dict[str, Any]]:
    """Every combination of the params' corner values (up to ``limit``, taken evenly beyond it)."""
    combos: List[Dict[str, Any]] = [{}]
    for p in params:
        combos = [{**c, p.key: v} for c in combos for v in p.corners()]
        if len(combos) > limit:
            stride = math.ceil(len(combos) / limit)
            combos = combos[::stride]
    return combos
