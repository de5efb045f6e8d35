"""What the sweep layer needs to know about each objective, asked of :mod:`lldiff.objectives`:
how it is drawn and named (``Objective.style`` / ``.label``), whether its validation loss is
an exact likelihood (AR) or a bound (a diffusion objective's negative ELBO), and which
objective the others are compared with by default.

An objective without a fixed style in the registry (``bd3-64``, or a name the registry does
not know, e.g. in an old or hand-made ``results.csv``) gets a fallback style, and an unknown
name its upper-cased self as label and "bound" as its kind of loss, so a new objective needs
no edit to the analysis, figures or reports. No plotting library is imported here.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from lldiff import objectives as registry
from lldiff.objectives import Style as ObjectiveStyle

__all__ = ["DEFAULT_REFERENCE", "ObjectiveStyle", "OBJECTIVE_STYLES", "exact_likelihood", "objective_name",
           "objective_styles", "fixed_style"]

#: the objective every other one is compared with unless told otherwise.
DEFAULT_REFERENCE = "ar"


def _known(objective: str) -> registry.Objective | None:
    try:
        return registry.get(objective)
    except ValueError:
        return None


def exact_likelihood(objective: str) -> bool:
    """Whether ``objective``'s validation loss is an exact NLL rather than an upper bound
    (the registry's ``exact_likelihood``; False for a name it does not know)."""
    known = _known(objective)
    return bool(known and known.exact_likelihood)


def fixed_style(objective: str) -> ObjectiveStyle | None:
    """The registry's own style of ``objective`` (None: it has none, a fallback is drawn)."""
    known = _known(objective)
    return known.style if known is not None else None


#: the objectives with a fixed look in the registry (others get :func:`objective_styles`' fallback).
OBJECTIVE_STYLES: dict[str, ObjectiveStyle] = {
    objective.name: style for family in registry.families().values()
    for objective in ([registry.with_params(family, {family.parameter: value}) for value in family.parameter_styles]
                      if family.parameter else [registry.get(family.name)])
    if (style := objective.style) is not None
}
FALLBACK_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
                   "tab:gray")
FALLBACK_MARKERS = ("s", "D", "v", "P", "X", "<", ">", "h")
FALLBACK_LINESTYLES: tuple[str | tuple, ...] = ("-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)),
                                                (0, (8, 2, 2, 2)), (0, (4, 4)), (0, (2, 1)))


def objective_name(objective: str) -> str:
    """The display name: the registry's label (``bd3-4`` -> ``BD3-4``), else the upper-cased name."""
    known = _known(objective)
    return known.label if known is not None else objective.upper()


def objective_styles(objectives: Iterable[str]) -> dict[str, ObjectiveStyle]:
    """A style per objective. Those with a fixed style in the registry keep it; each other
    one, in name order, starts at a slot of the fallback cycles given by a stable hash of its
    name (CRC-32, not Python's salted ``hash``) and moves on to the next slot not yet taken,
    skipping the colours of every fixed style, so the result depends only on the set of
    names and no two objectives share a colour or marker (up to the cycle length)."""
    names = list(dict.fromkeys(objectives))
    fixed = {o: fixed_style(o) for o in names}
    styles = {o: s for o, s in fixed.items() if s is not None}
    taken_colors = {s.color for s in (*OBJECTIVE_STYLES.values(), *styles.values())}
    taken_markers = {s.marker for s in (*OBJECTIVE_STYLES.values(), *styles.values())}
    used: set[int] = set()
    for obj in sorted(o for o in names if fixed[o] is None):
        start = zlib.crc32(obj.encode()) % len(FALLBACK_COLORS)
        slot = next((i for k in range(len(FALLBACK_COLORS)) if (i := (start + k) % len(FALLBACK_COLORS)) not in used
                     and FALLBACK_COLORS[i] not in taken_colors
                     and FALLBACK_MARKERS[i % len(FALLBACK_MARKERS)] not in taken_markers), start)
        used.add(slot)
        styles[obj] = ObjectiveStyle(FALLBACK_COLORS[slot], FALLBACK_MARKERS[slot % len(FALLBACK_MARKERS)],
                                     FALLBACK_LINESTYLES[slot % len(FALLBACK_LINESTYLES)], objective_name(obj))
    return {o: styles[o] for o in names}
