"""Old home of the SFT modules, kept so configs and checkpoints of earlier versions load:
``lldiff.finetune.MaskedDiffusionSFT`` (and ``AutoregressiveSFT``, ``BlockDiffusionSFT``) name the
classes that now live in ``lldiff/objectives/<family>/modules.py``."""

from __future__ import annotations

from lldiff import registry


def __getattr__(name: str) -> type:
    try:
        return registry.legacy_class(f"{__name__}.{name}")
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
