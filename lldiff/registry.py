"""The objective registry's data and lookups: what an objective is (a :class:`Family` of objectives,
with its code as typed callables loaded on first use, and an :class:`Objective`: a family plus its
parameters, e.g. ``bd3-16`` = the ``bd3`` family with ``block_size=16``), the registered families,
and every question asked of them (look an objective up by name, read a checkpoint's record, tell a
model's objective).

The families themselves live in ``lldiff/objectives/<family>/`` and are found through the
``lldiff.objectives`` entry points (``pyproject.toml``: one line each). This module imports no torch and nothing of
the objectives' code, so that everything below them (the checkpoint reader, interop, sweep
analysis and plots) can ask it without importing torch or running back up. A family's code
(:meth:`Family.code`) is imported the first time it is asked for.

The objective is data. Every checkpoint records it (``checkpoint["lldiff"]["objective"]``,
:meth:`Objective.record`: name, family, parameters), and loading reads it back. Checkpoints
written before it was recorded follow the **legacy rule** (:func:`legacy_objective`): the
objective is read off the stored model config, causal attention = ``ar``, bidirectional =
``mdm``, block attention with block size ``B`` = ``bd3-B`` (configs from before the attention
kind, with ``causal: true/false``, read as ``ar``/``mdm``).
"""


from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
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
    order: int = 100  # where it stands in lists and messages (lldiff's own: ar 0, mdm 1, bd3 2)
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


# -- the registered families and the questions asked of them ----------------------------------------



FAMILIES: dict[str, Family] = {}
"""The registered families by name. Read it through :func:`families` (which first registers the
built-in ones); plug-ins add theirs with :func:`register`."""


ENTRY_POINTS = "lldiff.objectives"
"""The entry-point group that names every installed objective family (lldiff's own in its
``pyproject.toml``; a plug-in package adds its own lines)."""

_discovered = False


def families() -> dict[str, Family]:
    """The registered families: on first use, every family the installed packages name under the
    ``lldiff.objectives`` entry points (each loads a folder's torch-free ``__init__``), then those a
    plug-in registered in this process."""
    global _discovered
    if not _discovered:
        _discovered = True
        for entry in entry_points(group=ENTRY_POINTS):
            family = entry.load()
            if FAMILIES.get(family.name) is not family:
                register(family)
        ordered = sorted(FAMILIES.values(), key=lambda f: f.order)
        FAMILIES.clear()
        FAMILIES.update((f.name, f) for f in ordered)
        if not FAMILIES:
            raise RuntimeError(f"no objective is registered: no package names one under the {ENTRY_POINTS!r} entry "
                               "points; install lldiff (pip install -e .) rather than running it from a source tree")
    return FAMILIES


class UnknownObjective(ValueError):
    """A name (or a checkpoint's recorded objective) that no registered family knows."""


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a plug-in may register its own); a second family under
    the same name replaces the first only if it is the same object."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*(-[a-z][a-z0-9_]*)*", family.name):
        raise ValueError(f"objective family name {family.name!r}: use lower-case letters, digits, '_' and '-'")
    existing = FAMILIES.get(family.name)
    if existing is not None and existing is not family:
        raise ValueError(f"an objective family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def allowed() -> str:
    """The registered objectives, spelled as a user writes them."""
    return ", ".join(f.spelling or f.name for f in families().values())


def get(name: str) -> Objective:
    """The objective called ``name`` (``ar``, ``mdm``, ``bd3-B``, or a registered plug-in's);
    :class:`UnknownObjective` (a ValueError) naming the known ones otherwise."""
    if not isinstance(name, str):
        raise UnknownObjective(f"objective must be a name, got {name!r}; allowed: {allowed()}")
    family = families().get(name)
    if family is not None and family.parameter is None:
        return Objective(name, family)
    match = re.fullmatch(r"(.+)-(\d+)", name)
    family = FAMILIES.get(match.group(1)) if match else None
    if family is not None and family.parameter is not None:
        value = int(match.group(2))
        if value < 1:
            raise UnknownObjective(f"objective {name!r}: the {family.parameter.replace('_', ' ')} must be >= 1")
        if name != f"{family.name}-{value}":  # one spelling per objective: results, styles and configs key on it
            raise UnknownObjective(f"objective {name!r}: write it as '{family.name}-{value}'")
        return with_params(family, {family.parameter: value})
    raise UnknownObjective(f"unknown objective {name!r}; allowed: {allowed()}")


def with_params(family: Family, params: dict[str, Any]) -> Objective:
    """The objective of ``family`` with ``params`` (its name spelled from them)."""
    if family.parameter is None:
        if params:
            raise ValueError(f"objective {family.name!r} takes no parameters, got {params}")
        return Objective(family.name, family)
    value = params.get(family.parameter)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"objective {family.name}: {family.parameter} must be a positive integer, got {value!r}")
    return Objective(f"{family.name}-{value}", family, ((family.parameter, value),))


def is_known(name: str) -> bool:
    try:
        get(name)
    except ValueError:
        return False
    return True


def from_record(record: Any) -> Objective:
    """The objective a checkpoint recorded (:meth:`Objective.record`), checked against the
    registry: an unknown name is refused naming the known ones."""
    if isinstance(record, str):
        return get(record)
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise UnknownObjective(f"the checkpoint's objective record {record!r} is not {{name, family, params}}")
    try:
        objective = get(record["name"])
    except UnknownObjective:
        raise UnknownObjective(f"the checkpoint was trained as objective {record['name']!r}, which this version of "
                               f"lldiff does not know; known: {allowed()}") from None
    params = record.get("params") or {}
    if dict(objective.params) != params:
        raise UnknownObjective(f"the checkpoint's objective record {record!r} disagrees with its name "
                               f"({record['name']!r} has parameters {dict(objective.params)})")
    return objective


def legacy_objective(config: Any) -> Objective:
    """The legacy rule, for checkpoints and models that carry no objective record: causal
    attention = ``ar``, bidirectional = ``mdm``, block attention with block size ``B`` =
    ``bd3-B``. (What this version writes is never read this way.)"""
    attention = getattr(config, "attention", None)
    if attention == "causal":
        return get("ar")
    if attention == "bidirectional":
        return get("mdm")
    if attention == "block":
        return get(f"bd3-{config.block_size}")
    raise ValueError(f"no objective has attention={attention!r}; allowed kinds: {', '.join(ATTENTION_KINDS)}")


def of_checkpoint(lldiff_state: dict[str, Any], config: Any) -> Objective:
    """The objective of a checkpoint, from its ``checkpoint["lldiff"]`` dict: its record, or
    the legacy rule on ``config`` (its ``ModelConfig``) when it has none."""
    record = lldiff_state.get("objective")
    return legacy_objective(config) if record is None else from_record(record)


def of_model(model: Any) -> Objective:
    """The objective of a backbone: the one it was loaded or built as (``model.objective``,
    set by :func:`lldiff.checkpoint.load_model` and the LightningModules), else the legacy rule
    on its config."""
    objective = getattr(model, "objective", None)
    if isinstance(objective, Objective):
        return objective
    config = getattr(model, "cfg", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} carries no ModelConfig; pass the objective explicitly")
    return legacy_objective(config)


def of_module(class_path: str, init_args: dict[str, Any] | None = None) -> Objective:
    """The objective a LightningModule class path trains (pre-training or SFT, also an old
    ``lldiff.modules.*`` / ``lldiff.finetune.*`` path), given its config's init args (a
    parametrised family's parameter; the class's default when absent)."""
    for family in families().values():
        if class_path in family.legacy_class_paths:
            break
        code = family.code()
        if class_path in (_path(code.module), _path(code.sft_module)):
            break
    else:
        known = ", ".join(_path(c) for f in families().values() for c in (f.code().module, f.code().sft_module))
        raise ValueError(f"{class_path!r} is no objective's LightningModule; known: {known}")
    if family.parameter is None:
        return get(family.name)
    value = (init_args or {}).get(family.parameter)
    if value is None:
        import inspect

        cls = family.code().module
        default = inspect.signature(cls.__init__).parameters.get(family.parameter)
        value = None if default is None else default.default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{class_path} with {family.parameter}={value!r}: the objective ({family.name}-N) needs an "
                         f"integer {family.parameter}; give model.init_args.{family.parameter}")
    return get(f"{family.name}-{value}")


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def legacy_class(path: str) -> type:
    """The class an old class path (``lldiff.modules.MaskedDiffusionLM``, ...) now names."""
    for family in families().values():
        if path in family.legacy_class_paths:  # (pre-training, SFT)
            code = family.code()
            return (code.module, code.sft_module)[family.legacy_class_paths.index(path)]
    raise AttributeError(path)
