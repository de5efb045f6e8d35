"""What a checkpoint carries beside the weights, and the checks before a run trains: the
``checkpoint["lldiff"]`` dict (the objective, the model config, tokens and FLOPs seen, every
rank's RNG stream, the tokenizer's fingerprint) and the data's agreement with the model.

Read alone: every function takes the LightningModule (an ``lldiff.modules.LMBase``) and plain
dicts; ``LMBase``'s hooks call them.
"""

from __future__ import annotations

from typing import Any

import torch

from lldiff import registry as objectives
from lldiff.checkpoint import TOKENIZER_KEY, check_tokenizer
from lldiff.config import ModelConfig
from lldiff.registry import article

SETTINGS_NOT_SHAPE = ("name", "attn_backend", "max_seq_len", "rope_base", "norm_eps", "mask_token")
"""ModelConfig fields a resumed run may differ in without a word: the name and what fine-tuning may override
(lldiff.objectives.common.finetuning.ADJUSTABLE_FIELDS), and mask_token (None in configs stored before it: mask_id
carries the same fact); every other field is the weights' shape or meaning."""


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from a shared one (rank 0 keeps ``seed``)."""
    return (seed + 0x9E3779B97F4A7C15 * rank) % 2**63


def seed_this_rank(module: Any) -> None:
    """Lightning seeds every process alike; the masking draws must differ across ranks. A
    restored checkpoint overrides this with each rank's saved state."""
    if module._trainer is not None and module.trainer.global_rank > 0:
        torch.manual_seed(rank_seed(torch.initial_seed(), module.trainer.global_rank))


def data_tokenizer(module: Any) -> Any:
    """The tokenizer of the trainer's datamodule, if there is one."""
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(datamodule, "tokenizer", None) if datamodule is not None else None


def check_data(module: Any, datamodule: Any, stage: str) -> None:
    """Refuse data the model cannot take (rows longer than its context, another vocabulary,
    rows its objective cannot cut into whole blocks); hand the per-token byte counts of
    ``val/bpb`` to the module."""
    seq_len = getattr(datamodule, "seq_len", None)
    if seq_len is not None and seq_len > module.config.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the model's max_seq_len={module.config.max_seq_len}; "
            "lower data.seq_len or set model.model_overrides.max_seq_len"
        )
    data_vocab = getattr(datamodule, "vocab_size_real", None)
    if data_vocab is not None and data_vocab != module.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {data_vocab} real tokens but the model was built for "
            f"vocab_size={module.config.vocab_size}"
        )
    if stage == "fit" and isinstance(seq_len, int):  # whole blocks (bd3-B), before any step
        module.objective.check_seq_len(seq_len)
    token_bytes = getattr(datamodule, "token_bytes", None)
    if token_bytes is not None:
        module.token_bytes = token_bytes.to(module.device, torch.long)


def save_run_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint["lldiff"]``: the objective (name, family, parameters), the model
    config, the counters, this rank's RNG stream (every rank's, gathered, on several
    processes) and the tokenizer's fingerprint."""
    rng = {
        # masking draws use the global RNG: a resumed run continues
        # the exact random stream of an uninterrupted one
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    checkpoint["lldiff"] = {"objective": module.objective.record(), "tokens_seen": module.tokens_seen,
                            "matmul_flops_seen": module.matmul_flops_seen,
                            "model_config": dict(module.config.__dict__), **rng}
    tokenizer = data_tokenizer(module)
    if tokenizer is not None:  # which tokenizer the weights belong to (refused elsewhere)
        checkpoint["lldiff"][TOKENIZER_KEY] = tokenizer.fingerprint
    if module._trainer is not None and module.trainer.world_size > 1:
        # every rank calls this hook (and only rank 0's dict is written): gather each rank's stream
        gathered: list[Any] = [None] * module.trainer.world_size
        torch.distributed.all_gather_object(gathered, rng)
        checkpoint["lldiff"]["rng_by_rank"] = gathered


def check_checkpoint_model(module: Any, state: dict[str, Any]) -> None:
    """Refuse a checkpoint of another objective (its record, or the legacy rule for one
    written before the record) or of another shape, naming both, before the weights load."""
    saved = state.get("model_config")
    if saved is None:
        return
    config = ModelConfig.from_dict(saved)  # also checkpoints from before the attention kind
    theirs, mine = objectives.of_checkpoint(state, config), module.objective
    if theirs != mine:
        raise ValueError(
            f"the checkpoint holds {article(theirs.label)} {theirs.label} model (objective {theirs.name!r}) but "
            f"{type(module).__name__} trains {article(mine.label)} {mine.label} model (objective {mine.name!r}); "
            "use the matching model.class_path"
        )
    saved, current = dict(config.__dict__), dict(module.config.__dict__)
    differs = [k for k in saved if k not in SETTINGS_NOT_SHAPE and k in current and saved[k] != current[k]]
    if differs:
        pairs = ", ".join(f"{k}={current[k]!r} (checkpoint: {saved[k]!r})" for k in differs)
        raise ValueError(f"the checkpoint's model differs from this one: {pairs}; "
                         "resume with the run's own model settings (its config.yaml)")


def restore_run_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Read ``checkpoint["lldiff"]`` back: checks (:func:`check_checkpoint_model`, the
    tokenizer), the counters, and this rank's RNG stream (a checkpoint of another world size
    keeps the ranks' draws apart)."""
    state = checkpoint.get("lldiff", {})
    check_checkpoint_model(module, state)
    check_tokenizer(state.get(TOKENIZER_KEY), data_tokenizer(module), "the checkpoint")
    module.tokens_seen = int(state.get("tokens_seen", 0))
    module.matmul_flops_seen = float(state.get("matmul_flops_seen", 0.0))
    rank, world = (module.trainer.global_rank, module.trainer.world_size) if module._trainer is not None else (0, 1)
    by_rank = state.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world:
        state = {**state, **by_rank[rank]}  # this rank's own stream
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") and torch.cuda.is_available() and len(state["rng_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    if world > 1 and rank > 0 and (by_rank is None or len(by_rank) != world):
        torch.manual_seed(rank_seed(int(torch.randint(0, 2**62, (1,))), rank))
