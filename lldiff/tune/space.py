"""The search space: which init args a study samples, and from which distribution.

A space file is a YAML mapping from a parameter name to its distribution::

    lr:               {type: float, low: 3.0e-4, high: 3.0e-2, log: true}
    warmup_steps:     {type: int, low: 0, high: 100, step: 10}
    weight_decay:     {type: float, low: 0.0, high: 0.2}
    data.batch_size:  {type: categorical, choices: [8, 16, 32]}

Types: ``float`` (``low``, ``high``, optional ``log`` or ``step``), ``int`` (``low``,
``high`` inclusive, optional ``step`` or ``log``), ``categorical`` (``choices``: a
non-empty list of scalars). A name is an init arg of the model class (``model.NAME``),
of the data class (``data.NAME``) or of the ``Trainer`` (``trainer.NAME``); a bare name
is looked up in the model's then the data's args and must name exactly one of them.
The Optuna parameter is always stored under the qualified name (``model.lr``), so a
study's parameters say which init arg they set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna

from lldiff.tune import TuneError, read_yaml

GROUPS = ("model", "data", "trainer")
KINDS = ("float", "int", "categorical")
_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: the init arg ``group.arg`` drawn from one distribution."""

    group: str  # "model" | "data" | "trainer"
    arg: str  # the init arg it sets
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        """The Optuna parameter name (qualified: ``model.lr``)."""
        return f"{self.group}.{self.arg}"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[ParamSpec, ...]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter for ``trial``: ``{qualified name: value}``."""
        return {p.name: p.suggest(trial) for p in self.params}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The normalised space (qualified names): what a study records to refuse a mismatch."""
        return {p.name: p.to_dict() for p in self.params}

    def groups(self, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """``{"model.lr": 1e-3, "data.batch_size": 8}`` -> ``{"model": {"lr": 1e-3}, "data": {...}}``."""
        by_name = {p.name: p for p in self.params}
        out: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            spec = by_name[name]
            out.setdefault(spec.group, {})[spec.arg] = value
        return out


def load_space(path: str | Path, targets: Mapping[str, set[str]], reserved: Mapping[str, str]) -> SearchSpace:
    """Read and check a space file (see the module docstring); errors name the bad value."""
    return parse_space(read_yaml(path, "search space file"), targets, reserved, source=str(path))


def parse_space(
    raw: Any, targets: Mapping[str, set[str]], reserved: Mapping[str, str], source: str = "search space"
) -> SearchSpace:
    """Check ``raw`` (the parsed YAML) against the init args that may be searched.

    ``targets`` maps each group (``model``, ``data``, ``trainer``) to its init arg names;
    ``reserved`` maps a qualified name the study itself sets (``model.size``) to the reason.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise TuneError(f"{source}: expected a non-empty mapping of parameter name -> distribution, got {raw!r}")
    params: list[ParamSpec] = []
    seen: dict[str, str] = {}
    for name, body in raw.items():
        group, arg = _resolve_name(str(name), targets, reserved, source)
        qualified = f"{group}.{arg}"
        if qualified in seen:
            raise TuneError(f"{source}: {name!r} and {seen[qualified]!r} both set {qualified}")
        seen[qualified] = str(name)
        params.append(_parse_param(group, arg, body, f"{source}: {name}"))
    return SearchSpace(tuple(params))


def _resolve_name(
    name: str, targets: Mapping[str, set[str]], reserved: Mapping[str, str], source: str
) -> tuple[str, str]:
    """``lr`` -> ``("model", "lr")``; ``data.batch_size`` -> ``("data", "batch_size")``."""
    group, _, arg = name.partition(".")
    if arg and group in GROUPS:
        scope, candidates = (group,), [(group, arg)] if arg in targets.get(group, set()) else []
    else:
        scope = ("model", "data")
        candidates = [(g, name) for g in scope if name in targets.get(g, set())]
    blocked = [f"{g}.{a}" for g, a in candidates if f"{g}.{a}" in reserved]
    candidates = [(g, a) for g, a in candidates if f"{g}.{a}" not in reserved]
    if not candidates and blocked:
        raise TuneError(f"{source}: {name!r} cannot be searched: {reserved[blocked[0]]}")
    if not candidates:
        allowed = "; ".join(
            f"{g}: " + ", ".join(sorted(a for a in targets.get(g, set()) if f"{g}.{a}" not in reserved))
            for g in scope
        )
        where = f"the {scope[0]} class" if len(scope) == 1 else "the model or data class (or qualify it: model.NAME, data.NAME, trainer.NAME)"
        raise TuneError(f"{source}: unknown parameter {name!r}: not an init arg of {where}; allowed {allowed}")
    if len(candidates) > 1:
        raise TuneError(f"{source}: parameter {name!r} is ambiguous: write " + " or ".join(f"{g}.{a}" for g, a in candidates))
    return candidates[0]


def _parse_param(group: str, arg: str, body: Any, where: str) -> ParamSpec:
    if not isinstance(body, Mapping):
        raise TuneError(f"{where}: expected a mapping like {{type: float, low: 1.0e-4, high: 1.0e-2}}, got {body!r}")
    kind = body.get("type")
    if kind not in KINDS:
        raise TuneError(f"{where}: unknown type {kind!r}; allowed: {', '.join(KINDS)}")
    unknown = set(body) - _KEYS[kind]
    if unknown:
        raise TuneError(f"{where}: unknown key(s) {sorted(unknown)} for type {kind}; allowed: {', '.join(sorted(_KEYS[kind]))}")
    if kind == "categorical":
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise TuneError(f"{where}: choices must be scalars (number, string, bool, null), got {bad!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise TuneError(f"{where}: choices {choices!r} repeat a value")
        return ParamSpec(group, arg, kind, choices=tuple(choices))

    integer = kind == "int"
    low, high = (_number(body.get(key), key, integer, where) for key in ("low", "high"))
    log = body.get("log", False)
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log must be true or false, got {log!r}")
    step = None if body.get("step") is None else _number(body["step"], "step", integer, where)
    if low >= high:
        raise TuneError(f"{where}: empty range: low={low} must be < high={high}")
    if log and low <= 0:
        raise TuneError(f"{where}: log scale needs low > 0, got low={low}")
    if step is not None and step <= 0:
        raise TuneError(f"{where}: step must be > 0, got {step}")
    if log and step is not None and not (integer and step == 1):
        raise TuneError(f"{where}: log scale and step={step} exclude each other (Optuna samples log ranges continuously)")
    return ParamSpec(group, arg, kind, low=low, high=high, log=log, step=step)


def _number(value: Any, key: str, integer: bool, where: str) -> float | int:
    """A bound as a number; YAML reads ``1e-4`` (no dot) as a string, so strings are parsed."""
    if value is None:
        raise TuneError(f"{where}: {key} is missing")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise TuneError(f"{where}: {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TuneError(f"{where}: {key} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise TuneError(f"{where}: {key} must be an integer for type int, got {value!r}")
        return int(value)
    return float(value)
