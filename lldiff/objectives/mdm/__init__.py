"""MDM: LLaDA's masked diffusion, bidirectional attention and a mask token (SPEC §2-§6)."""

from __future__ import annotations

from lldiff.registry import Code, Family, Style


def load() -> Code:
    from lldiff.objectives.mdm.decoding import diffusion_complete
    from lldiff.objectives.mdm.likelihood import mdm_is_greedy, mdm_scorer
    from lldiff.objectives.mdm.loss import mdm_elbo_nats
    from lldiff.objectives.mdm.modules import MaskedDiffusionLM, MaskedDiffusionSFT

    return Code(module=MaskedDiffusionLM, sft_module=MaskedDiffusionSFT, decoder=diffusion_complete,
                scorer=mdm_scorer, greedy=mdm_is_greedy, elbo=mdm_elbo_nats)


FAMILY = Family(
    name="mdm", order=1, attention="bidirectional", mask_token=True, exact_likelihood=False, load=load,
    converts_from=("ar",),
    label="MDM", style=Style("tab:red", "^", "--", "MDM"),
    description="LLaDA masked diffusion, bidirectional attention",
    infill_sees_right_context=True,
    decode_options=("steps", "block_length", "remasking", "threshold", "cfg_scale", "forbid_eos", "cache"),
    decode_ignores=("use_cache", "steps_per_block"),
    length_is_budget=False, score_options=("n_mc", "batch_size", "cfg_scale", "seed"),
    legacy_class_paths=("lldiff.modules.MaskedDiffusionLM", "lldiff.finetune.MaskedDiffusionSFT"),
)
