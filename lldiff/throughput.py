"""Throughput and MFU of a fit, as a callback every lldiff LightningModule brings along
(``LMBase.configure_callbacks``): ``perf/tokens_per_s`` (all devices), ``perf/flops_per_s`` (their
real matmul FLOP/s, :func:`lldiff.flops.step_flops_per_token`) and ``perf/mfu`` = FLOP/s / (peak
FLOP/s per device x devices).

The rates are over the whole steps of each logging interval (``trainer.log_every_n_steps``),
restarted after every validation, on the host clock only: no device synchronisation is added.
The module reports each step's tokens and FLOPs (``LMBase.step_work``); this callback turns them
into rates.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lldiff.flops import ThroughputWindow, device_peak_flops, mfu


class ThroughputMonitor(L.Callback):
    """Logs ``perf/*`` from the tokens and FLOPs each training step reports."""

    def __init__(self) -> None:
        self._window: ThroughputWindow | None = None
        self._peak_flops: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._peak_flops, source = device_peak_flops(
            pl_module.device, str(trainer.precision), pl_module.hparams.get("peak_tflops"))
        if self._peak_flops is None:
            rank_zero_info(f"lldiff perf: perf/mfu not logged: {source}")
        else:
            rank_zero_info(f"lldiff perf: perf/mfu against {source} per device x {trainer.world_size} device(s)")

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._window = None  # validation time is not training throughput

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        work = getattr(pl_module, "step_work", None)
        if work is None:
            return
        tokens, flops = work
        now = time.perf_counter()
        if self._window is None:
            self._window = ThroughputWindow(now, tokens, flops or 0.0)
            return
        rates = self._window.step(now, tokens, flops or 0.0)
        if trainer.global_step % trainer.log_every_n_steps:
            return  # Lightning writes step metrics at the end of each interval only
        tokens_per_s, flops_per_s = rates
        pl_module.log("perf/tokens_per_s", tokens_per_s)
        if flops is not None:
            pl_module.log("perf/flops_per_s", flops_per_s)
            if self._peak_flops is not None:
                pl_module.log("perf/mfu", mfu(flops_per_s, self._peak_flops, trainer.world_size))
        self._window = ThroughputWindow(now, tokens, flops or 0.0)  # the next interval starts here
