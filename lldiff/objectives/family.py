"""What an objective is, as data: a :class:`Family` (what every objective of one kind shares,
with its code as typed callables loaded on first use) and an :class:`Objective` (a family plus
its parameters, e.g. ``bd3-16`` = the ``bd3`` family with ``block_size=16``).

Importing this module imports no torch: sweep analysis and plots read the facts of an
objective (label, style, whether its loss is exact) without the model code. The code of a
family (its LightningModules, decoder, scorer) is reached through :meth:`Family.code`, which
imports the family's folder the first time it is asked.
"""

from __future__ import annotations

from collections.abc import Callable
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
class Code:
    """A family's code: the callables that differ between objectives.

    module / sft_module: the pre-training and fine-tuning LightningModule classes.
    decoder: ``(model, ids (B, P) left-padded, mask (B, P), options, *, eos_id, generator)
        -> lldiff.objectives.common.decoding.Completion``.
    scorer: ``(model, *, mask_id, **parameters, **score_options) -> Scorer`` for multiple choice.
    greedy: ``(model, prompt, answer, *, mask_id, **parameters) -> bool``: lm-eval's is_greedy.
    elbo: a Monte-Carlo bound on log p(x) (None when the validation loss is the exact NLL).
    """

    module: type
    sft_module: type
    decoder: Callable[..., Any]
    scorer: Callable[..., Any]
    greedy: Callable[..., bool]
    elbo: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Family:
    """What every objective of one family shares (``bd3-4`` and ``bd3-16`` are one family).

    ``load`` returns the family's :class:`Code`; it imports the family's folder (torch, model
    code) and is called once, on first use. ``parameter`` names the one integer parameter of a
    parametrised family (``block_size`` for ``bd3``: objectives ``bd3-4``, ``bd3-16``); None for
    a family that is a single objective (``ar``, ``mdm``).
    """

    name: str
    attention: str  # the backbone's attention kind (lldiff.config.ATTENTION_KINDS)
    mask_token: bool  # whether the backbone embeds a mask token
    exact_likelihood: bool  # the validation loss is an exact NLL (else an upper bound: a negative ELBO)
    load: Callable[[], Code]
    label: str
    description: str = ""
    style: Style | None = None
    parameter: str | None = None
    spelling: str = ""  # how a user writes its objectives, for messages (default: the name)
    parameter_styles: dict[int, Style] = field(default_factory=dict)  # a fixed look for some parameter values
    infill_sees_right_context: bool = False  # zero-shot infilling conditions on text after the gap
    converts_from: tuple[str, ...] = ()  # families whose runs this family's pre-training may start from (init_from, SPEC §14)
    forward_copies: int = 1  # the training forward runs on this many copies of the sequence (BD3: [x_t, x_0])
    # -- decoding and scoring (lldiff.completion, lldiff.evaluation) -----------------------------
    decode_options: tuple[str, ...] = ()  # DecodeOptions fields the decoder uses, beyond length and temperature
    decode_ignores: tuple[str, ...] = ()  # other decoders' fields it ignores when a recipe shared by several
    #   objectives carries them (library complete(); the CLIs refuse every field not in decode_options)
    length_is_budget: bool = False  # the answer length is a budget: decoding stops once every answer has ended
    #   (AR, BD3); else a fixed canvas filled in full (MDM)
    score_options: tuple[str, ...] = ()  # scorer settings that apply (n_mc, batch_size, cfg_scale, seed)
    legacy_class_paths: tuple[str, ...] = ()  # (pre-training, SFT) class paths before lldiff/objectives/: aliases

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"family {self.name!r}: attention={self.attention!r}; allowed: {', '.join(ATTENTION_KINDS)}")

    def code(self) -> Code:
        """The family's callables (imported on the first call, then kept)."""
        cached = _CODE.get(self.name)
        if cached is None or cached[0] is not self.load:
            cached = _CODE[self.name] = (self.load, self.load())
        return cached[1]


_CODE: dict[str, tuple[Callable[[], Code], Code]] = {}


def article(label: str) -> str:
    """``a`` or ``an`` before a label read letter by letter: an AR, an MDM, a BD3-4."""
    return "an" if label[:1].upper() in "AEFHILMNORSX" else "a"


@dataclass(frozen=True)
class Objective:
    """One objective: a family plus its parameters (``{"block_size": 16}`` for ``bd3-16``).

    What an objective is, is written into every checkpoint (:meth:`record`); loading reads it back
    (:func:`lldiff.objectives.from_record`).
    """

    name: str
    family: Family = field(repr=False, compare=False)
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def family_name(self) -> str:
        return self.family.name

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @property
    def block_size(self) -> int | None:
        """The block size of a block-attention objective (None otherwise)."""
        return self.param("block_size")

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores: ``{"name", "family", "params"}`` (plain types only)."""
        return {"name": self.name, "family": self.family.name, "params": dict(self.params)}

    # -- the backbone ----------------------------------------------------------------------------
    @property
    def attention(self) -> str:
        return self.family.attention

    @property
    def mask_token(self) -> bool:
        return self.family.mask_token

    def model_fields(self, vocab_size: int, mask_id: int | None = None) -> dict[str, Any]:
        """The ``ModelConfig`` fields this objective fixes: attention kind, block size, whether it
        has a mask token and the mask id (a new embedding row ``vocab_size``, or None without a mask token). ``mask_id``
        below ``vocab_size`` keeps a mask token that lies inside the vocabulary (an imported
        LLaDA's 126336); an objective without a mask token refuses one."""
        if mask_id is not None and not self.mask_token:
            raise ValueError(f"mask_id={mask_id}: {article(self.label)} {self.label} model has no mask token")
        if mask_id is not None and (isinstance(mask_id, bool) or not isinstance(mask_id, int)
                                    or not 0 <= mask_id <= vocab_size):
            raise ValueError(f"mask_id={mask_id!r} must be an id in [0, vocab_size={vocab_size}]")
        default = vocab_size if self.mask_token else None
        return {"attention": self.attention, "block_size": self.block_size,
                "mask_id": default if mask_id is None else mask_id, "mask_token": self.mask_token}

    # -- training --------------------------------------------------------------------------------
    def module_class(self, sft: bool = False) -> type:
        """The LightningModule class that trains this objective (pre-training or SFT)."""
        code = self.family.code()
        return code.sft_module if sft else code.module

    @property
    def module(self) -> str:
        """The class path of the pre-training module (for LightningCLI configs)."""
        return _class_path(self.module_class())

    @property
    def sft_module(self) -> str:
        return _class_path(self.module_class(sft=True))

    def module_args(self) -> dict[str, Any]:
        """Init args the module class needs to be this objective (``block_size`` for BD3)."""
        return dict(self.params)

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

    def decoder(self) -> Callable[..., Any]:
        return self.family.code().decoder

    def scorer(self) -> Callable[..., Any]:
        return self.family.code().scorer

    def elbo(self) -> Callable[..., Any] | None:
        return self.family.code().elbo

    def greedy(self) -> Callable[..., bool]:
        """``f(model, prompt, answer, *, mask_id[, block_size]) -> bool``: whether ``answer`` is
        the model's greedy continuation of ``prompt`` (lm-eval's ``is_greedy``)."""
        return self.family.code().greedy

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

    # -- presentation ----------------------------------------------------------------------------
    @property
    def label(self) -> str:
        value = self.param(self.family.parameter) if self.family.parameter else None
        return self.family.label if value is None else f"{self.family.label}-{value}"

    @property
    def style(self) -> Style | None:
        if self.family.parameter:
            return self.family.parameter_styles.get(self.param(self.family.parameter))
        return self.family.style


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
