"""AR: next-token prediction with causal attention (the baseline of identical architecture)."""

from __future__ import annotations

from lldiff.registry import Code, Family, Style


def load() -> Code:
    from lldiff.objectives.ar.decoding import ar_complete
    from lldiff.objectives.ar.likelihood import ar_is_greedy, ar_scorer
    from lldiff.objectives.ar.modules import AutoregressiveLM, AutoregressiveSFT

    return Code(module=AutoregressiveLM, sft_module=AutoregressiveSFT, decoder=ar_complete, scorer=ar_scorer,
                greedy=ar_is_greedy, elbo=None)


FAMILY = Family(
    name="ar", order=0, attention="causal", mask_token=False, exact_likelihood=True, load=load,
    label="AR", style=Style("tab:blue", "o", "-", "AR"), description="next-token prediction, causal attention",
    infill_sees_right_context=False,
    decode_options=("top_k", "top_p", "use_cache"),
    decode_ignores=("steps", "block_length", "remasking", "threshold", "cfg_scale", "forbid_eos", "steps_per_block"),
    length_is_budget=True, score_options=(),
    legacy_class_paths=("lldiff.modules.AutoregressiveLM", "lldiff.finetune.AutoregressiveSFT"),
)
