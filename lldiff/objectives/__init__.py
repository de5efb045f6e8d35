"""The objective registry: every objective lldiff trains, in one place.

An objective is a name: ``ar`` (next-token prediction, causal attention), ``mdm`` (LLaDA's
masked diffusion, bidirectional attention) or ``bd3-B`` (BD3-LM block diffusion with blocks of
``B`` tokens, SPEC §9; ``bd3-1`` is next-token prediction with a mask token, ``bd3-L`` the
MDM). Each lives in its own folder, ``lldiff/objectives/<family>/``: its losses and validation
bound (``loss.py``), its decoder (``decoding.py``), its likelihood and multiple-choice scorer
(``likelihood.py``) and its LightningModules (``modules.py``); the folder's ``__init__`` holds its
:class:`Family` entry. What several share (the forward process, remasking rules, CFG, the SFT
base) is in ``lldiff/objectives/common/``.

Code that must know what differs asks the registry (:func:`get`, :func:`of_model`,
:func:`from_record`); it never branches on a name or on the attention kind itself.

Adding an objective: one folder with a ``FAMILY`` entry, and one :func:`register` line below
(or a call of :func:`register` from a plug-in, e.g. a test file).

The objective is data. Every checkpoint records it (``checkpoint["lldiff"]["objective"]``,
:meth:`Objective.record`: name, family, parameters), and loading reads it back. Checkpoints
written before it was recorded follow the **legacy rule** (:func:`legacy_objective`): the
objective is read off the stored model config, causal attention = ``ar``, bidirectional =
``mdm``, block attention with block size ``B`` = ``bd3-B`` (configs from before the attention
kind, with ``causal: true/false``, read as ``ar``/``mdm``). This module imports no torch.
"""

from __future__ import annotations

import re
from typing import Any

from lldiff.objectives import ar, bd3, mdm
from lldiff.objectives.family import ATTENTION_KINDS, Code, Family, Objective, Style, article

__all__ = ["ATTENTION_KINDS", "Code", "Family", "Objective", "Style", "article", "FAMILIES", "register", "get",
           "is_known", "allowed", "of_model", "from_record", "legacy_objective", "of_checkpoint", "of_module",
           "UnknownObjective"]

FAMILIES: dict[str, Family] = {}


class UnknownObjective(ValueError):
    """A name (or a checkpoint's recorded objective) that no registered family knows."""


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a plug-in may register its own); a second family under
    the same name replaces the first only if it is the same object."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*(-[a-z][a-z0-9_]*)*", family.name):
        raise ValueError(f"objective family name {family.name!r}: use lower-case letters, digits, '_' and '-'")
    existing = FAMILIES.get(family.name)
    if existing is not None and existing is not family:
        raise ValueError(f"an objective family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


register(ar.FAMILY)
register(mdm.FAMILY)
register(bd3.FAMILY)


def allowed() -> str:
    """The registered objectives, spelled as a user writes them."""
    return ", ".join(f.spelling or f.name for f in FAMILIES.values())


def get(name: str) -> Objective:
    """The objective called ``name`` (``ar``, ``mdm``, ``bd3-B``, or a registered plug-in's);
    :class:`UnknownObjective` (a ValueError) naming the known ones otherwise."""
    if not isinstance(name, str):
        raise UnknownObjective(f"objective must be a name, got {name!r}; allowed: {allowed()}")
    family = FAMILIES.get(name)
    if family is not None and family.parameter is None:
        return Objective(name, family)
    match = re.fullmatch(r"(.+)-(\d+)", name)
    family = FAMILIES.get(match.group(1)) if match else None
    if family is not None and family.parameter is not None:
        value = int(match.group(2))
        if value < 1:
            raise UnknownObjective(f"objective {name!r}: the {family.parameter.replace('_', ' ')} must be >= 1")
        if name != f"{family.name}-{value}":  # one spelling per objective: results, styles and configs key on it
            raise UnknownObjective(f"objective {name!r}: write it as '{family.name}-{value}'")
        return with_params(family, {family.parameter: value})
    raise UnknownObjective(f"unknown objective {name!r}; allowed: {allowed()}")


def with_params(family: Family, params: dict[str, Any]) -> Objective:
    """The objective of ``family`` with ``params`` (its name spelled from them)."""
    if family.parameter is None:
        if params:
            raise ValueError(f"objective {family.name!r} takes no parameters, got {params}")
        return Objective(family.name, family)
    value = params.get(family.parameter)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"objective {family.name}: {family.parameter} must be a positive integer, got {value!r}")
    return Objective(f"{family.name}-{value}", family, ((family.parameter, value),))


def is_known(name: str) -> bool:
    try:
        get(name)
    except ValueError:
        return False
    return True


def from_record(record: Any) -> Objective:
    """The objective a checkpoint recorded (:meth:`Objective.record`), checked against the
    registry: an unknown name is refused naming the known ones."""
    if isinstance(record, str):
        return get(record)
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise UnknownObjective(f"the checkpoint's objective record {record!r} is not {{name, family, params}}")
    try:
        objective = get(record["name"])
    except UnknownObjective:
        raise UnknownObjective(f"the checkpoint was trained as objective {record['name']!r}, which this version of "
                               f"lldiff does not know; known: {allowed()}") from None
    params = record.get("params") or {}
    if dict(objective.params) != params:
        raise UnknownObjective(f"the checkpoint's objective record {record!r} disagrees with its name "
                               f"({record['name']!r} has parameters {dict(objective.params)})")
    return objective


def legacy_objective(config: Any) -> Objective:
    """The legacy rule, for checkpoints and models that carry no objective record: causal
    attention = ``ar``, bidirectional = ``mdm``, block attention with block size ``B`` =
    ``bd3-B``. (What this version writes is never read this way.)"""
    attention = getattr(config, "attention", None)
    if attention == "causal":
        return get("ar")
    if attention == "bidirectional":
        return get("mdm")
    if attention == "block":
        return get(f"bd3-{config.block_size}")
    raise ValueError(f"no objective has attention={attention!r}; allowed kinds: {', '.join(ATTENTION_KINDS)}")


def of_checkpoint(lldiff_state: dict[str, Any], config: Any) -> Objective:
    """The objective of a checkpoint, from its ``checkpoint["lldiff"]`` dict: its record, or
    the legacy rule on ``config`` (its ``ModelConfig``) when it has none."""
    record = lldiff_state.get("objective")
    return legacy_objective(config) if record is None else from_record(record)


def of_model(model: Any) -> Objective:
    """The objective of a backbone: the one it was loaded or built as (``model.objective``,
    set by :func:`lldiff.checkpoint.load_model` and the LightningModules), else the legacy rule
    on its config."""
    objective = getattr(model, "objective", None)
    if isinstance(objective, Objective):
        return objective
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} carries no ModelConfig; pass the objective explicitly")
    return legacy_objective(config)


def of_module(class_path: str, init_args: dict[str, Any] | None = None) -> Objective:
    """The objective a LightningModule class path trains (pre-training or SFT, also an old
    ``lldiff.modules.*`` / ``lldiff.finetune.*`` path), given its config's init args (a
    parametrised family's parameter; the class's default when absent)."""
    for family in FAMILIES.values():
        if class_path in family.legacy_class_paths:
            break
        code = family.code()
        if class_path in (_path(code.module), _path(code.sft_module)):
            break
    else:
        known = ", ".join(_path(c) for f in FAMILIES.values() for c in (f.code().module, f.code().sft_module))
        raise ValueError(f"{class_path!r} is no objective's LightningModule; known: {known}")
    if family.parameter is None:
        return get(family.name)
    value = (init_args or {}).get(family.parameter)
    if value is None:
        import inspect

        cls = family.code().module
        default = inspect.signature(cls.__init__).parameters.get(family.parameter)
        value = None if default is None else default.default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{class_path} with {family.parameter}={value!r}: the objective ({family.name}-N) needs an "
                         f"integer {family.parameter}; give model.init_args.{family.parameter}")
    return get(f"{family.name}-{value}")


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def legacy_class(path: str) -> type:
    """The class an old class path (``lldiff.modules.MaskedDiffusionLM``, ...) now names."""
    for family in FAMILIES.values():
        if path in family.legacy_class_paths:  # (pre-training, SFT)
            code = family.code()
            return (code.module, code.sft_module)[family.legacy_class_paths.index(path)]
    raise AttributeError(path)
