"""Scale-out strategies chosen by name in the config, and how FSDP2 shards the backbone.

``trainer.strategy`` takes a name or a ``class_path``. Importing this module registers
lldiff's FSDP2 presets in Lightning's ``StrategyRegistry``, next to Lightning's own names:

* ``auto`` (one device), ``ddp`` (CPU and GPU, one process per device; Lightning's
  launcher, SLURM or torchrun start the processes).
* ``fsdp2``: :class:`FSDP2Strategy`, FSDP2 (``fully_shard``) data parallelism over every
  process through Lightning's ``ModelParallelStrategy``: weights, gradients and optimizer
  states are sharded, each transformer block is its own all-gather unit. CPU (gloo) and
  GPU (NCCL); checkpoints are sharded (a directory, one file per rank + ``meta.pt``).
* ``fsdp2_ac``: the same with activation checkpointing of every block.
* ``fsdp2_full``: the same, but checkpoints are one full ``.ckpt`` file assembled on rank 0.

Lightning's FSDP1 ``FSDPStrategy`` (``fsdp``, ``fsdp_cpu_offload``) is refused: it needs
CUDA, and it flattens parameters, so the optimizer's weight-decay groups (matrices vs norm
gains, chosen by shape) would silently lose their meaning. :func:`check_strategy` says so
before any work, as it names an unknown strategy with the allowed ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry
from torch import nn

from lldiff.checkpoint_io import (
    check_sharded_metadata,
    disk_full_error,
    no_space,
    publish_directory,
    recover_directory,
    remove_path,
    staging_path,
)
from lldiff.model import Block, Transformer
from lldiff.strategy_names import PRESETS

FSDP1_NAMES = ("fsdp", "fsdp_cpu_offload")
FSDP1_ERROR = (
    "Lightning's FSDPStrategy (FSDP1) is not supported by lldiff: it needs CUDA (it refuses a CPU), and it "
    "flattens parameters, which breaks the weight-decay groups. Use trainer.strategy: fsdp2 (FSDP2 "
    "fully_shard per block, CPU and GPU), fsdp2_ac (with activation checkpointing) or fsdp2_full (full "
    "checkpoints)."
)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (``ModelParallelStrategy`` with a 1-D mesh).

    ``data_parallel_size`` is the world size (``num_nodes * devices``) and there is no
    tensor parallelism, so every process holds ``1 / world`` of each block's weights,
    gradients and AdamW states. The LightningModule's ``configure_model`` calls
    :func:`shard_transformer` with this strategy's options. Precision is the trainer's:
    ``bf16-mixed`` autocasts the matmuls to bf16 over fp32 sharded weights.

    Args:
        activation_checkpointing: recompute each block's activations in the backward
            pass instead of storing them (less memory, about one more forward of compute).
        reshard_after_forward: free each block's gathered weights after its forward and
            gather them again for the backward (ZeRO-3); False keeps them (ZeRO-2-like:
            more memory, one all-gather fewer per block).
        save_distributed_checkpoint: True writes a sharded checkpoint directory (each rank
            its shard, plus ``meta.pt`` with everything else); False a full ``.ckpt`` file
            assembled on rank 0. Both resume and both load in ``lldiff.checkpoint.load_model``.
        process_group_backend: ``gloo`` / ``nccl``; None picks by device.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every process is a data-parallel rank (ModelParallelStrategy's "auto" means num_nodes)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written whole into a staging directory beside the target
        (every rank its shards, rank 0 ``meta.pt``), then swapped in by rank 0: the previous
        checkpoint stays loadable until the new one is complete. (Lightning writes the shards
        into the existing directory in place.) A full checkpoint goes through the strategy's
        ``checkpoint_io`` (:class:`lldiff.checkpoint_io.AtomicCheckpointIO` under the CLI)."""
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(filepath))
        staging = staging_path(target)
        if self.global_rank == 0:
            recover_directory(target)
            remove_path(staging)
            staging.mkdir(parents=True)
        self.barrier("lldiff_checkpoint_staged")
        try:
            super().save_checkpoint(checkpoint, staging)
        except BaseException as error:
            code = no_space(error)
            if code is None:
                raise
            if self.global_rank == 0:
                written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
                remove_path(staging)
                raise disk_full_error(target, code, written) from None
            raise disk_full_error(target, code) from None
        self.barrier("lldiff_checkpoint_written")
        if self.global_rank == 0:
            publish_directory(staging, target)
        self.barrier("lldiff_checkpoint_published")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume from a full file or a sharded directory; a directory's ``.metadata`` index is
        first read with the restricted unpickler (PyTorch's reader uses plain pickle)."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            check_sharded_metadata(path)
        return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only)


def shard_transformer(
    model: Transformer,
    mesh: Any,
    *,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> Transformer:
    """Apply FSDP2 in place: ``fully_shard`` each block, then the root (embedding, final
    norm, head), over the 1-D data-parallel ``mesh``. With ``activation_checkpointing``
    each block is first wrapped in a non-reentrant checkpoint wrapper (state-dict keys are
    unchanged). Idempotent: an already sharded model is returned as it is."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for i, block in enumerate(model.blocks):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            model.blocks[i] = block
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def compile_on(compile: bool | None, device: torch.device) -> bool:
    """Whether a run compiles its blocks: as ``compile`` says, or (None) on a CUDA device only."""
    return bool(compile) if compile is not None else torch.device(device).type == "cuda"


def prepare_backbone(model: Transformer, trainer: Any, compile: bool | None, device_mesh: Any) -> None:
    """A LightningModule's ``configure_model``: regional compile of the blocks when
    :func:`compile_on` says so, then, under ``ModelParallelStrategy`` (``trainer.strategy:
    fsdp2``), FSDP2 sharding per block then the root over the data-parallel mesh (compile
    first, then shard, as torchtitan does)."""
    if trainer is not None and compile_on(compile, trainer.strategy.root_device):
        model.compile_blocks()
    if device_mesh is None:
        return
    strategy = trainer.strategy
    shard_transformer(model, device_mesh["data_parallel"],
                      activation_checkpointing=getattr(strategy, "activation_checkpointing", False),
                      reshard_after_forward=getattr(strategy, "reshard_after_forward", True))


def count_sharded_blocks(model: nn.Module) -> int:
    """How many transformer blocks are FSDP2 units (for tests and logs)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) and _is_block(m) for m in model.modules())


def _is_block(module: nn.Module) -> bool:
    inner = getattr(module, "_checkpoint_wrapped_module", module)
    return isinstance(inner, Block)


def _class_path(strategy: Any) -> str | None:
    """The ``class_path`` of a jsonargparse Namespace/dict strategy, else None."""
    if isinstance(strategy, dict):
        return strategy.get("class_path")
    return getattr(strategy, "class_path", None)


def allowed_names() -> list[str]:
    """Every accepted strategy name: lldiff's presets, then Lightning's other registered
    names (FSDP1 ones excluded)."""
    lightning = [n for n in StrategyRegistry.available_strategies() if n not in PRESETS and n not in FSDP1_NAMES]
    return [*PRESETS, *lightning]


def check_strategy(strategy: str | Strategy | Any, accelerator: str | Any = "auto") -> None:
    """Refuse a bad ``trainer.strategy`` with a clear message, before any work.

    Accepts a name, a ``Strategy`` instance, or a jsonargparse ``class_path`` config.
    Raises ValueError for an unknown name (naming the allowed ones) and for FSDP1
    (``fsdp*`` names, ``FSDPStrategy``), with a pointer to ``fsdp2``.
    """
    if strategy is None:
        return
    if isinstance(strategy, str):
        if strategy in FSDP1_NAMES:
            where = " on a CPU" if _runs_on_cpu(accelerator) else ""
            raise ValueError(f"trainer.strategy={strategy!r}{where}: {FSDP1_ERROR}")
        if strategy not in allowed_names():
            raise ValueError(
                f"unknown trainer.strategy {strategy!r}; lldiff presets: {', '.join(PRESETS)} "
                f"(other Lightning names: {', '.join(n for n in allowed_names() if n not in PRESETS)}), "
                "or a class_path"
            )
        return
    class_path = _class_path(strategy)
    is_fsdp1 = isinstance(strategy, FSDPStrategy) or (
        class_path is not None and class_path.rsplit(".", 1)[-1] == "FSDPStrategy"
    )
    if is_fsdp1:
        where = " on a CPU" if _runs_on_cpu(accelerator) else ""
        raise ValueError(f"trainer.strategy FSDPStrategy{where}: {FSDP1_ERROR}")


def _runs_on_cpu(accelerator: str | Any) -> bool:
    if isinstance(accelerator, str):
        return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return False


def _register() -> None:
    presets = {
        "fsdp2": {},
        "fsdp2_ac": {"activation_checkpointing": True},
        "fsdp2_full": {"save_distributed_checkpoint": False},
    }
    for name, init_params in presets.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, FSDP2Strategy, description=PRESETS[name], **init_params)


_register()
