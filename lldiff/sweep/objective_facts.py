"""What the sweep layer needs to know about each objective, in one place: how it is drawn
and named, whether its validation loss is an exact likelihood (AR) or a bound (a diffusion
objective's negative ELBO), and which objective the others are compared with by default.

An objective not listed gets a fallback style and an upper-cased name, so a new objective
needs no edit to the analysis, figures or reports. No plotting library is imported here.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

#: the objective every other one is compared with unless told otherwise.
DEFAULT_REFERENCE = "ar"
#: objectives whose validation loss is an exact NLL (the others report an upper bound).
EXACT_LIKELIHOOD = frozenset({"ar"})


def exact_likelihood(objective: str) -> bool:
    """Whether ``objective``'s validation loss is an exact NLL rather than an upper bound."""
    return objective in EXACT_LIKELIHOOD


@dataclass(frozen=True)
class ObjectiveStyle:
    """How one objective is drawn and named."""

    color: str
    marker: str
    linestyle: str | tuple
    label: str


#: known objectives; others get :func:`objective_styles`' fallback.
OBJECTIVE_STYLES = {
    "ar": ObjectiveStyle("tab:blue", "o", "-", "AR"),
    "mdm": ObjectiveStyle("tab:red", "^", "--", "MDM"),
}
OBJECTIVE_NAMES = {obj: style.label for obj, style in OBJECTIVE_STYLES.items()}
FALLBACK_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
                   "tab:gray")
FALLBACK_MARKERS = ("s", "D", "v", "P", "X", "<", ">", "h")
FALLBACK_LINESTYLES: tuple[str | tuple, ...] = ("-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)),
                                                (0, (8, 2, 2, 2)), (0, (4, 4)), (0, (2, 1)))


def objective_name(objective: str) -> str:
    """The display name: from the style table, else the upper-cased name (``bd3-4`` -> ``BD3-4``)."""
    return OBJECTIVE_NAMES.get(objective, objective.upper())


def objective_styles(objectives: Iterable[str]) -> dict[str, ObjectiveStyle]:
    """A style per objective. Known ones come from :data:`OBJECTIVE_STYLES`; each unknown one,
    in name order, starts at a slot of the fallback cycles given by a stable hash of its
    name (CRC-32, not Python's salted ``hash``) and moves on to the next slot not yet taken,
    so the result depends only on the set of names and unknown objectives never share a
    colour or marker (up to the cycle length) with each other or the known ones."""
    names = list(dict.fromkeys(objectives))
    styles = {o: OBJECTIVE_STYLES[o] for o in names if o in OBJECTIVE_STYLES}
    taken_colors = {s.color for s in OBJECTIVE_STYLES.values()}
    used: set[int] = set()
    for obj in sorted(o for o in names if o not in OBJECTIVE_STYLES):
        start = zlib.crc32(obj.encode()) % len(FALLBACK_COLORS)
        slot = next((i for k in range(len(FALLBACK_COLORS)) if (i := (start + k) % len(FALLBACK_COLORS)) not in used
                     and FALLBACK_COLORS[i] not in taken_colors), start)
        used.add(slot)
        styles[obj] = ObjectiveStyle(FALLBACK_COLORS[slot], FALLBACK_MARKERS[slot % len(FALLBACK_MARKERS)],
                                     FALLBACK_LINESTYLES[slot % len(FALLBACK_LINESTYLES)], objective_name(obj))
    return {o: styles[o] for o in names}
