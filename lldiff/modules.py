"""Old home of the LightningModules, kept so configs and checkpoints of earlier versions load:
``lldiff.modules.MaskedDiffusionLM`` (and ``AutoregressiveLM``, ``BlockDiffusionLM``) name the
classes that now live in ``lldiff/objectives/<family>/modules.py``; ``LMBase`` is
:class:`lldiff.objectives.common.base.LMBase`."""

from __future__ import annotations

from lldiff import registry
from lldiff.objectives.common.base import LMBase

__all__ = ["LMBase"]


def __getattr__(name: str) -> type:
    try:
        return registry.legacy_class(f"{__name__}.{name}")
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
