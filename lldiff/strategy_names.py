"""The scale-out strategy names lldiff documents, without importing Lightning.

``lldiff --help`` lists them; :mod:`lldiff.strategies` registers the ``fsdp2*`` ones in
Lightning's ``StrategyRegistry`` (``auto`` and ``ddp`` are Lightning's own). Kept apart so
that printing the overview does not import Lightning (seconds of start-up).
"""

from __future__ import annotations

PRESETS: dict[str, str] = {
    "auto": "Lightning's choice: one device (no distribution) unless devices > 1",
    "ddp": "DistributedDataParallel, one process per device, CPU (gloo) or GPU (NCCL)",
    "fsdp2": "FSDP2 fully_shard per block over all processes, sharded checkpoints (CPU or GPU)",
    "fsdp2_ac": "fsdp2 with activation checkpointing of every block",
    "fsdp2_full": "fsdp2 writing full single-file checkpoints (assembled on rank 0)",
}
"""The strategy names lldiff documents and tests (any other Lightning name is allowed too)."""
