"""Third-party console noise, silenced at its source (never lldiff's own lines or warnings).

A fit's console shows lldiff's lines (``lldiff data: ...``, ``lldiff model: ...``) and
Lightning's progress. Each entry below names the logger a message comes from and the start
of the message; only those records are dropped, everything else from the same logger stays.
Imported by ``lldiff/__init__.py``: it imports neither Lightning nor Optuna (filters on a
``logging`` logger work before the library that uses it is loaded).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

NOISE: dict[str, tuple[str, ...]] = {
    # Lightning's banners: the accelerator lldiff was asked for is in the config
    "lightning.pytorch.utilities.rank_zero": (
        "GPU available:", "TPU available:", "HPU available:",
        "💡 Tip:",  # product adverts, one per fit
        "`Trainer.fit` stopped: `max_steps=",  # how every lldiff fit ends; its bar shows step N/N
    ),
    "lightning.fabric.utilities.seed": ("Seed set to",),  # the seed is in the run's config.yaml
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK:",),
    "optuna.storages._rdb.storage": ("A new study created in RDB",),  # `lldiff tune` says which study it uses
    "optuna.storages.journal._storage": ("A new study created in Journal",),
    "optuna.storages._in_memory": ("A new study created in memory",),
}

EVALUATION_ADVICE = (
    # lldiff validate/test read no callback state from the checkpoint (only a resumed fit does)
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
    # lldiff's validation counts every row once on any number of processes (no padding duplicates)
    r"Using `DistributedSampler` with the dataloaders\. During `trainer\.(validate|test)\(\)`",
)
"""Lightning's advice printed by a validation or test (messages of ``warnings.warn``)."""


class DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_noise() -> None:
    """Install the :data:`NOISE` filters (once per logger; calling again changes nothing)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))


@contextlib.contextmanager
def quiet_evaluation_advice() -> Iterator[None]:
    """Around a validation or test: without Lightning's :data:`EVALUATION_ADVICE`."""
    with warnings.catch_warnings():
        for message in EVALUATION_ADVICE:
            warnings.filterwarnings("ignore", message=message)
        yield
