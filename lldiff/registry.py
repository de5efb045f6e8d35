"""The objective registry: everything that differs between objectives, in one place.

An objective is a name: ``ar`` (next-token prediction, causal attention), ``mdm`` (LLaDA's
masked diffusion, bidirectional attention) or ``bd3-B`` (BD3-LM block diffusion with blocks
of ``B`` tokens, SPEC §9: block-causal attention; ``bd3-1`` is next-token prediction with a
mask token, ``bd3-L`` the MDM). :func:`get` turns a name into an :class:`Objective`, which
says what the backbone looks like (attention kind, block size, whether it embeds a mask
token), which LightningModules train it (pre-training and SFT), whether its validation loss
is an exact likelihood or a bound, which decoder answers prompts and which scorer computes
log-likelihoods (as import paths, resolved when used, so this module imports no model code),
and how plots draw it.

Code that must know what differs asks the registry (``get(name)``, ``of_config(cfg)``); it
never branches on a name or on the attention kind itself. Adding an objective means one
entry in :data:`FAMILIES` plus its own module (loss, decoder) and tests.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

ATTENTION_KINDS = ("causal", "bidirectional", "block")


@dataclass(frozen=True)
class Style:
    """How an objective is drawn and named in figures and reports."""

    color: str
    marker: str
    linestyle: str | tuple
    label: str


@dataclass(frozen=True)
class Family:
    """What every objective of one family shares (``bd3-4`` and ``bd3-16`` are one family)."""

    attention: str
    mask_token: bool
    exact_likelihood: bool
    module: str  # class path of the pre-training LightningModule
    sft_module: str  # class path of the fine-tuning LightningModule
    decoder: str  # "module:function" answering prompts: (model, ids, mask, options, ...) -> tokens
    scorer: str  # "module:function" making a multiple-choice scorer: (model, **kwargs) -> Scorer
    elbo: str | None  # "module:function" for a Monte-Carlo bound on log p(x) (None: exact chain rule)
    infill_sees_right_context: bool  # whether zero-shot infilling conditions on text after the gap
    label: str
    style: Style | None = None
    description: str = ""
    forward_copies: int = 1  # the training forward runs on this many copies of the sequence (BD3: [x_t, x_0])
    # -- decoding and scoring (lldiff.completion, lldiff.evaluation) ---------------------------
    decode_options: tuple[str, ...] = ()  # DecodeOptions fields the decoder uses, beyond length and temperature
    decode_ignores: tuple[str, ...] = ()  # other decoders' fields it ignores when a recipe shared by several
    #   objectives carries them (library complete(); the CLIs refuse every field not in decode_options)
    length_is_budget: bool = False  # the answer length is a budget: decoding stops once every answer has ended
    #   (AR, BD3); else a fixed canvas filled in full (MDM)
    score_options: tuple[str, ...] = ()  # scorer settings that apply (n_mc, batch_size, cfg_scale, seed)
    greedy: str = ""  # "module:function" (model, prompt, answer, *, mask_id[, block_size]) -> bool: lm-eval's is_greedy


FAMILIES: dict[str, Family] = {
    "ar": Family(
        attention="causal", mask_token=False, exact_likelihood=True,
        module="lldiff.modules.AutoregressiveLM", sft_module="lldiff.finetune.AutoregressiveSFT",
        decoder="lldiff.completion:ar_complete", scorer="lldiff.evaluation.multiple_choice:ar_scorer", elbo=None,
        infill_sees_right_context=False, label="AR",
        style=Style("tab:blue", "o", "-", "AR"),
        description="next-token prediction, causal attention",
        decode_options=("top_k", "top_p", "use_cache"),
        decode_ignores=("steps", "block_length", "remasking", "threshold", "cfg_scale", "forbid_eos", "steps_per_block"),
        length_is_budget=True, score_options=(), greedy="lldiff.likelihood:ar_is_greedy",
    ),
    "mdm": Family(
        attention="bidirectional", mask_token=True, exact_likelihood=False,
        module="lldiff.modules.MaskedDiffusionLM", sft_module="lldiff.finetune.MaskedDiffusionSFT",
        decoder="lldiff.completion:diffusion_complete", scorer="lldiff.evaluation.multiple_choice:mdm_scorer",
        elbo="lldiff.objectives:mdm_elbo_nats",
        infill_sees_right_context=True, label="MDM",
        style=Style("tab:red", "^", "--", "MDM"),
        description="LLaDA masked diffusion, bidirectional attention",
        decode_options=("steps", "block_length", "remasking", "threshold", "cfg_scale", "forbid_eos", "cache"),
        decode_ignores=("use_cache", "steps_per_block"),
        length_is_budget=False, score_options=("n_mc", "batch_size", "cfg_scale", "seed"),
        greedy="lldiff.likelihood:mdm_is_greedy",
    ),
    "bd3": Family(
        attention="block", mask_token=True, exact_likelihood=False,
        module="lldiff.modules.BlockDiffusionLM", sft_module="lldiff.finetune.BlockDiffusionSFT",
        decoder="lldiff.completion:block_diffusion_complete",
        scorer="lldiff.evaluation.multiple_choice:bd3_scorer", elbo="lldiff.block_diffusion:bd3_nelbo_nats",
        infill_sees_right_context=False, label="BD3",
        description="BD3-LM block diffusion: blocks left to right, masked diffusion inside a block",
        forward_copies=2,
        decode_options=("steps_per_block", "remasking", "threshold", "cfg_scale", "forbid_eos", "use_cache"),
        decode_ignores=("steps", "block_length"),  # use_cache: the exact block KV cache, on by default
        length_is_budget=True, score_options=("n_mc", "batch_size", "seed"),
        greedy="lldiff.likelihood:bd3_is_greedy",
    ),
}

BD3_STYLES = {  # a fixed look for the block sizes the presets use; others get the fallback cycle
    4: Style("tab:green", "s", "-.", "BD3-4"),
    16: Style("tab:purple", "D", ":", "BD3-16"),
}

_BD3 = re.compile(r"^bd3-(\d+)$")
ALLOWED = "ar, mdm, bd3-B (block diffusion with blocks of B tokens, e.g. bd3-4, bd3-16)"


@dataclass(frozen=True)
class Objective:
    """One objective: a family plus its parameters (the block size of ``bd3-B``)."""

    name: str
    family_name: str
    block_size: int | None = None
    family: Family = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    # -- the backbone ----------------------------------------------------------------------------
    @property
    def attention(self) -> str:
        return self.family.attention

    @property
    def mask_token(self) -> bool:
        return self.family.mask_token

    def model_fields(self, vocab_size: int, mask_id: int | None = None) -> dict[str, Any]:
        """The ``ModelConfig`` fields this objective fixes: attention kind, block size and the
        mask id (a new embedding row ``vocab_size``, or None without a mask token). ``mask_id``
        below ``vocab_size`` keeps a mask token that lies inside the vocabulary (an imported
        LLaDA's 126336); an objective without a mask token refuses one."""
        if mask_id is not None and not self.mask_token:
            raise ValueError(f"mask_id={mask_id}: {article(self.label)} {self.label} model has no mask token")
        if mask_id is not None and (isinstance(mask_id, bool) or not isinstance(mask_id, int)
                                    or not 0 <= mask_id <= vocab_size):
            raise ValueError(f"mask_id={mask_id!r} must be an id in [0, vocab_size={vocab_size}]")
        default = vocab_size if self.mask_token else None
        return {"attention": self.attention, "block_size": self.block_size,
                "mask_id": default if mask_id is None else mask_id}

    # -- training --------------------------------------------------------------------------------
    @property
    def module(self) -> str:
        return self.family.module

    @property
    def sft_module(self) -> str:
        return self.family.sft_module

    def module_args(self) -> dict[str, Any]:
        """Init args the module class needs to be this objective (``block_size`` for BD3)."""
        return {} if self.block_size is None else {"block_size": self.block_size}

    def module_config(self, sft: bool = False) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}`` for a LightningCLI config."""
        return {"class_path": self.sft_module if sft else self.module, "init_args": self.module_args()}

    def check_seq_len(self, seq_len: int) -> None:
        """Refuse a training length this objective cannot cut into whole blocks (``bd3-B``:
        ``B`` must divide ``seq_len``); other objectives take any length."""
        if self.block_size is None:
            return
        if self.block_size > seq_len or seq_len % self.block_size:
            divisors = [d for d in range(1, seq_len + 1) if seq_len % d == 0]
            raise ValueError(f"{self.name}: block_size={self.block_size} must divide seq_len={seq_len}; "
                             f"allowed block sizes: {', '.join(map(str, divisors))}")

    def matmul_flops_per_token(self, config: Any, seq_len: int) -> float:
        """Real forward + backward matmul FLOPs per training token at length ``seq_len``. BD3
        runs the backbone on ``[x_t ⊕ x_0]`` (2L tokens, attention over 2L keys), about twice
        the MDM's; SMDM's ``6ND`` axis ignores this (it counts parameters x tokens only)."""
        from lldiff.flops import step_flops_per_token

        copies = self.family.forward_copies
        return copies * step_flops_per_token(config, copies * seq_len)

    # -- evaluation ------------------------------------------------------------------------------
    @property
    def exact_likelihood(self) -> bool:
        """Whether the validation loss is an exact NLL (else an upper bound: a negative ELBO)."""
        return self.family.exact_likelihood

    @property
    def infill_sees_right_context(self) -> bool:
        return self.family.infill_sees_right_context

    def decoder(self) -> Any:
        return _resolve(self.family.decoder)

    def scorer(self) -> Any:
        return _resolve(self.family.scorer)

    def elbo(self) -> Any:
        return None if self.family.elbo is None else _resolve(self.family.elbo)

    @property
    def decode_options(self) -> tuple[str, ...]:
        """``DecodeOptions`` fields this objective's decoder uses (besides length, temperature)."""
        return self.family.decode_options

    @property
    def decode_ignores(self) -> tuple[str, ...]:
        return self.family.decode_ignores

    @property
    def length_is_budget(self) -> bool:
        """Whether the answer length is a budget (decoding stops once every answer has ended)
        rather than a canvas filled in full."""
        return self.family.length_is_budget

    @property
    def score_options(self) -> tuple[str, ...]:
        """Multiple-choice scorer settings that apply (``n_mc``, ``batch_size``, ``cfg_scale``, ``seed``)."""
        return self.family.score_options

    def greedy(self) -> Any:
        """``f(model, prompt, answer, *, mask_id[, block_size]) -> bool``: whether ``answer`` is
        the model's greedy continuation of ``prompt`` (lm-eval's ``is_greedy``)."""
        return _resolve(self.family.greedy)

    # -- presentation ----------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.family.label if self.block_size is None else f"{self.family.label}-{self.block_size}"

    @property
    def style(self) -> Style | None:
        if self.block_size is not None:
            return BD3_STYLES.get(self.block_size)
        return self.family.style


def get(name: str) -> Objective:
    """The objective called ``name`` (``ar``, ``mdm``, ``bd3-B``); a clear error otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"objective must be a name, got {name!r}; allowed: {ALLOWED}")
    if name in FAMILIES and name != "bd3":
        return Objective(name, name, None, FAMILIES[name])
    match = _BD3.match(name)
    if match:
        block = int(match.group(1))
        if block < 1:
            raise ValueError(f"objective {name!r}: the block size must be >= 1")
        if name != f"bd3-{block}":  # one spelling per objective: results, styles and configs key on it
            raise ValueError(f"objective {name!r}: write it as 'bd3-{block}'")
        return Objective(name, "bd3", block, FAMILIES["bd3"])
    raise ValueError(f"unknown objective {name!r}; allowed: {ALLOWED}")


def article(label: str) -> str:
    """``a`` or ``an`` before a label read letter by letter: an AR, an MDM, a BD3-4."""
    return "an" if label[:1].upper() in "AEFHILMNORSX" else "a"


def is_known(name: str) -> bool:
    try:
        get(name)
    except ValueError:
        return False
    return True


def of_config(config: Any) -> Objective:
    """The objective a backbone was built for, from its ``ModelConfig`` (attention kind and
    block size; a mask token tells an MDM from a bidirectional model without one)."""
    attention = getattr(config, "attention", None)
    if attention == "block":
        return get(f"bd3-{config.block_size}")
    for name, family in FAMILIES.items():
        if family.attention == attention and name != "bd3":
            return get(name)
    raise ValueError(f"no objective has attention={attention!r}; allowed kinds: {', '.join(ATTENTION_KINDS)}")


def of_model(model: Any) -> Objective:
    """The objective of a ``Transformer`` (or anything with a ``cfg``/``config``)."""
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} carries no ModelConfig; pass the objective explicitly")
    return of_config(config)


def of_module(class_path: str, init_args: dict[str, Any] | None = None) -> Objective:
    """The objective a LightningModule class path trains (pre-training or SFT), given the
    init args of its config (``block_size`` for BD3; the class's default when absent). A
    class path that is no objective's, or a block size that cannot be told, is refused."""
    for name, family in FAMILIES.items():
        if class_path not in (family.module, family.sft_module):
            continue
        if name != "bd3":
            return get(name)
        block = (init_args or {}).get("block_size")
        if block is None:
            import inspect

            module, _, cls = class_path.rpartition(".")
            default = inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters.get("block_size")
            block = None if default is None else default.default
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"{class_path} with block_size={block!r}: the objective (bd3-B) needs an integer block "
                             "size; give model.init_args.block_size")
        return get(f"bd3-{block}")
    known = ", ".join(p for f in FAMILIES.values() for p in (f.module, f.sft_module))
    raise ValueError(f"{class_path!r} is no objective's LightningModule; known: {known}")


def _resolve(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
