"""BD3: BD3-LM block diffusion (SPEC §9), blocks of ``block_size`` tokens left to right with
masked diffusion inside each; ``bd3-1`` is next-token prediction, ``bd3-L`` the MDM."""

from __future__ import annotations

from lldiff.registry import Code, Family, Style


def load() -> Code:
    from lldiff.objectives.bd3.decoding import block_diffusion_complete
    from lldiff.objectives.bd3.likelihood import bd3_is_greedy, bd3_scorer
    from lldiff.objectives.bd3.loss import bd3_nelbo_nats
    from lldiff.objectives.bd3.modules import BlockDiffusionLM, BlockDiffusionSFT

    return Code(module=BlockDiffusionLM, sft_module=BlockDiffusionSFT, decoder=block_diffusion_complete,
                scorer=bd3_scorer, greedy=bd3_is_greedy, elbo=bd3_nelbo_nats)


FAMILY = Family(
    name="bd3", order=2, attention="block", mask_token=True, exact_likelihood=False, load=load, converts_from=("ar",),
    label="BD3", parameter="block_size",
    spelling="bd3-B (block diffusion with blocks of B tokens, e.g. bd3-4, bd3-16)",
    parameter_styles={4: Style("tab:green", "s", "-.", "BD3-4"), 16: Style("tab:purple", "D", ":", "BD3-16")},
    description="BD3-LM block diffusion: blocks left to right, masked diffusion inside a block",
    infill_sees_right_context=False, forward_copies=2,
    decode_options=("steps_per_block", "remasking", "threshold", "cfg_scale", "forbid_eos", "use_cache"),
    decode_ignores=("steps", "block_length"),  # use_cache: the exact block KV cache, on by default
    length_is_budget=True, score_options=("n_mc", "batch_size", "seed"),
    legacy_class_paths=("lldiff.modules.BlockDiffusionLM", "lldiff.finetune.BlockDiffusionSFT"),
)
