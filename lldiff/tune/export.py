"""Write a study's best parameters into a sweep spec (``lldiff/sweep/spec.py``).

The spec's ``size_args: {SIZE: {...}}`` holds per-size *model* args; the best trial's
``model.*`` parameters are merged into ``size_args[SIZE]`` of a copy of the given spec
(a file or a preset), written atomically. A sweep shares one data config across sizes
and objectives and sets its own trainer, so searched ``data.*`` and ``trainer.*``
parameters are not written: they are returned as skipped, for the caller to report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lldiff.atomic import write_text
from lldiff.sweep.spec import PRESET_PACKAGE, SweepSpec, preset_names, spec_from_dict
from lldiff.tune import TuneError


@dataclass(frozen=True)
class SpecUpdate:
    spec: SweepSpec  # the written spec, as `lldiff.sweep.spec.load_spec` reads it back
    written: dict[str, Any]  # model args merged into size_args[size]
    skipped: dict[str, Any] = field(default_factory=dict)  # qualified data/trainer params not written
    notes: tuple[str, ...] = ()


def _read_source(source: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if path.is_file():
        text, name = path.read_text(), path.stem
    elif str(source) in preset_names():
        text, name = resources.files(PRESET_PACKAGE).joinpath(f"{source}.yaml").read_text(), str(source)
    else:
        raise TuneError(f"{str(source)!r} is neither a sweep spec file nor a preset; presets: {', '.join(preset_names())}")
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise TuneError(f"sweep spec {str(source)!r} is not a mapping")
    raw.setdefault("name", name)
    return raw, name


def write_best_into_spec(source: str | Path, size: str, params: dict[str, Any], dest: str | Path) -> SpecUpdate:
    """Copy the spec ``source`` (path or preset name) to ``dest`` with the ``model.*`` entries
    of ``params`` (qualified names, as a study stores them) merged into ``size_args[size]``."""
    raw, _ = _read_source(source)
    try:
        original = spec_from_dict(raw)
    except (ValueError, TypeError) as error:
        raise TuneError(f"sweep spec {str(source)!r} is invalid: {error}") from None
    if size not in original.sizes:
        raise TuneError(f"size {size!r} is not in the sweep spec's sizes {list(original.sizes)}; "
                        "size_args may only name the spec's sizes")
    written = {name.split(".", 1)[1]: value for name, value in params.items() if name.startswith("model.")}
    skipped = {name: value for name, value in params.items() if not name.startswith("model.")}
    size_args = {k: dict(v) for k, v in (raw.get("size_args") or {}).items()}
    size_args[size] = {**size_args.get(size, {}), **written}
    raw["size_args"] = size_args
    try:
        spec = spec_from_dict(raw)
    except (ValueError, TypeError) as error:
        raise TuneError(f"the merged spec is invalid: {error}") from None
    notes = []
    if len(spec.objectives) > 1:
        notes.append(f"size_args apply to every objective of the spec ({', '.join(spec.objectives)})")
    if "warmup_steps" in written and spec.warmup_fraction is not None:
        notes.append(f"the spec's warmup_fraction={spec.warmup_fraction} overrides warmup_steps in its runs")
    if skipped:
        notes.append("not written (a sweep shares one data config and sets its own trainer): "
                     + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    write_text(dest, yaml.safe_dump(raw, sort_keys=False))
    return SpecUpdate(spec=spec, written=written, skipped=skipped, notes=tuple(notes))
