"""Zero-shot multiple-choice evaluation by (conditional) log-likelihood (SPEC §5).

Each choice is scored as a continuation of the context: ``log p(choice | context)`` in nats,
with the context and the choice tokenised SEPARATELY (``ids = [boundary] + enc(context) +
enc(choice)``), so whitespace between them belongs to the choice (lm-eval-harness
convention: ``context="The sky is"``, ``choices=[" blue", " green"]``).

Scores (the objective's scorer in :mod:`lldiff.objectives`; the settings that apply to it are
its ``score_options``)
    * AR: exact, :func:`lldiff.objectives.ar.likelihood.ar_loglik`.
    * MDM: LLaDA's Monte-Carlo lower bound, :func:`lldiff.objectives.mdm.likelihood.mdm_conditional_loglik`
      with ``n_mc`` draws.
    * BD3: the block diffusion lower bound (each block given the clean earlier ones),
      :func:`lldiff.objectives.bd3.likelihood.bd3_conditional_loglik` with ``n_mc`` draws.
    Common random numbers (MDM, BD3): every choice of example ``i`` is scored with a fresh
    generator seeded with the same value (derived from ``seed`` and ``i``), so the choices see
    the same stream of draws and the comparison is fairer; examples get different seeds so
    their estimation errors are independent. An example's scores do not depend on which other
    examples are evaluated (``--limit``).

Decisions
    * ``accuracy``: argmax of the total log-likelihood.
    * ``accuracy_norm``: argmax of log-likelihood divided by the choice's length in UTF-8
      BYTES (lm-eval's ``acc_norm`` divides by the length in characters; the two agree on
      ASCII; bytes do not depend on the tokenizer).
    Ties (scores within a relative ``1e-6``, float32 rounding) go to the lowest choice index.

Boundary token: training packs documents as ``doc EOS doc EOS ...``, so every document start
follows an EOS. By default the EOS id is put before the context (for AR it also makes an
empty context scorable: ``ar_loglik`` needs a non-empty prompt). Inputs longer than the
model's ``max_seq_len`` lose context tokens from the left (and then the boundary token);
such choices are counted in ``n_truncated``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lldiff import objectives as registry
from lldiff.completion import article, option_owners
from lldiff.objectives import Objective

from .tasks import Example, first_argmax, validate_example
from lldiff.objectives.common.scoring import Scorer, score_choices

"""``scorer(context_ids (P,), choice_ids (L,)) -> log p(choice | context)`` in nats."""

NORMALISATION = "loglik / utf8_bytes(choice)"


SCORE_DEFAULTS = {"n_mc": 32, "batch_size": 32, "cfg_scale": 0.0, "seed": 0}


def make_scorer(objective: Objective, model: Callable[..., Tensor], *, mask_id: int | None, **settings: Any) -> Scorer:
    """The registry's scorer of ``objective`` for ``model``, given the ``settings`` (``n_mc``,
    ``batch_size``, ``cfg_scale``, ``seed``) that apply to it (its ``score_options``); the
    others are not passed on. ``cfg_scale > 0`` for a scorer without guidance is refused."""
    check_score_settings(objective, settings.get("cfg_scale", 0.0))
    applied = {name: settings.get(name, SCORE_DEFAULTS[name]) for name in objective.score_options}
    return objective.scorer()(model, mask_id=mask_id, **objective.module_args(), **applied)


def check_score_settings(objective: Objective, cfg_scale: float, what: str = "model") -> None:
    """Refuse classifier-free guidance for an objective whose scorer has none (ValueError)."""
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    if cfg_scale > 0 and "cfg_scale" not in objective.score_options:
        owners = option_owners("cfg_scale", "score_options")
        raise ValueError(f"classifier-free guidance (cfg_scale > 0) applies to {owners} checkpoints only; "
                         f"this is {article(objective.label)} {objective.label} {what}")


def example_seed(seed: int, index: int) -> int:
    """A 63-bit seed for example ``index`` derived from the run's ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _resolve(loaded_or_model: Any, tokenizer: Any, objective: str | Objective | None, mask_id: int | None):
    """(model, tokenizer, objective, mask_id, max_len) from a LoadedModel or a model callable."""
    model = getattr(loaded_or_model, "model", loaded_or_model)
    if tokenizer is None:
        tokenizer = getattr(loaded_or_model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one (the checkpoint's run directory has no tokenizer.json)")
    cfg = getattr(model, "cfg", None)
    inferred = getattr(loaded_or_model, "objective", None)
    if inferred is None and cfg is not None:
        inferred = registry.of_model(model)
    if objective is None:
        if inferred is None:
            raise ValueError(f"objective must be given for a model without a config; allowed: {registry.allowed()}")
        objective = inferred
    if not isinstance(objective, Objective):
        objective = registry.get(objective)
    if inferred is not None and objective.name != inferred.name:
        raise ValueError(f"objective={objective.name!r} given but the model is {article(inferred.label)} "
                         f"{inferred.label} model")
    if mask_id is None and cfg is not None:
        mask_id = cfg.mask_id
    if objective.mask_token and mask_id is None:
        raise ValueError(f"the {objective.label} objective needs mask_id")
    max_len = cfg.max_seq_len if cfg is not None else None
    return model, tokenizer, objective, mask_id, max_len


def _fit(context: list[int], prefix: list[int], choice: list[int], max_len: int | None) -> tuple[list[int], bool]:
    """Prompt ids ``prefix + context`` cut from the left so that prompt + choice fit ``max_len``."""
    prompt = prefix + context
    if max_len is None or len(prompt) + len(choice) <= max_len:
        return prompt, False
    room = max_len - len(choice)
    if room < 0 or (room == 0 and not prompt):
        raise ValueError(f"a choice of {len(choice)} tokens does not fit the model's max_seq_len={max_len}")
    return (context[len(context) - room:] if room else []), True


def evaluate_multiple_choice(
    loaded_or_model: Any,
    tokenizer: Any,
    examples: Sequence[Example | dict],
    *,
    objective: str | None = None,
    mask_id: int | None = None,
    n_mc: int = 32,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    seed: int = 0,
    boundary_token: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy of a model (see the module docstring).

    Args:
        loaded_or_model: a :class:`lldiff.checkpoint.LoadedModel` or a model callable
            ``model(ids (B, T)) -> logits (B, T, V)`` (an :class:`lldiff.model.Transformer`
            or a hand-made function).
        tokenizer: anything with ``encode(str) -> list[int]`` (and ``eos_id`` when
            ``boundary_token``); None: the LoadedModel's.
        examples: :class:`Example` objects or dicts ``{"context", "choices", "label"}``.
        objective: a registry name (``"ar"``, ``"mdm"``, ``"bd3-4"``, ...) or ``Objective``;
            inferred from a LoadedModel / Transformer.
        mask_id: the mask id (MDM, BD3); inferred from a Transformer's config.
        n_mc, batch_size, cfg_scale: Monte-Carlo estimator settings, used where the registry's
            ``score_options`` include them (none for the exact AR; no ``cfg_scale`` for BD3);
            ``cfg_scale > 0`` where it does not apply raises ``ValueError``.
        seed: base seed of the Monte-Carlo draws (per-example seeds via :func:`example_seed`).
        boundary_token: put the tokenizer's document start (``document_start_id``: EOS for
            lldiff's tokenizers, BOS for LLaDA's) before every context.
        progress: optional ``progress(done, total)`` callback after each example.

    Returns a JSON-serialisable dict: ``accuracy``, ``accuracy_norm``, ``n_examples``,
    ``objective`` (its name), ``n_mc`` (None for an exact scorer), ``cfg_scale``, ``seed``, ``normalisation``,
    ``n_truncated`` and ``predictions`` (per example: ``index``, ``label``, ``pred``,
    ``pred_norm``, ``correct``, ``correct_norm``, ``loglik``, ``loglik_norm``, ``n_tokens``,
    ``n_bytes``).
    """
    model, tokenizer, objective, mask_id, max_len = _resolve(loaded_or_model, tokenizer, objective, mask_id)
    check_score_settings(objective, cfg_scale)
    examples = [e if isinstance(e, Example) else validate_example(e, f"example {i}") for i, e in enumerate(examples)]
    if not examples:
        raise ValueError("no examples to evaluate")
    prefix: list[int] = []
    if boundary_token:
        start = getattr(tokenizer, "document_start_id", getattr(tokenizer, "eos_id", None))
        if start is None:
            raise ValueError("boundary_token=True needs a tokenizer with an eos_id")
        prefix = [int(start)]
    device = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        first = next(model.parameters(), None)
        device = first.device if first is not None else device
        was_training = model.training
        model.eval()
    else:
        was_training = False
    predictions = []
    n_truncated = 0
    try:
        for i, ex in enumerate(examples):
            context = list(tokenizer.encode(ex.context))
            choices = [list(tokenizer.encode(c)) for c in ex.choices]
            for j, c in enumerate(choices):
                if not c:
                    raise ValueError(f"example {i}: choice {j} ({ex.choices[j]!r}) encodes to no tokens")
            scorer = make_scorer(objective, model, mask_id=mask_id, n_mc=n_mc, batch_size=batch_size,
                                 cfg_scale=cfg_scale, seed=example_seed(seed, i))
            loglik = []
            for j, c in enumerate(choices):
                prompt, cut = _fit(context, prefix, c, max_len)
                n_truncated += cut
                if not objective.mask_token and not prompt:  # no mask token: predictions come from a prompt token
                    raise ValueError(
                        f"example {i}: empty context and no boundary token; {article(objective.label)} "
                        f"{objective.label} model needs a non-empty prompt"
                    )
                loglik += score_choices(scorer, torch.tensor(prompt, dtype=torch.long, device=device),
                                        [torch.tensor(c, dtype=torch.long, device=device)])
            n_bytes = [len(c.encode("utf-8")) for c in ex.choices]
            norm = [ll / nb for ll, nb in zip(loglik, n_bytes)]
            pred, pred_norm = first_argmax(loglik), first_argmax(norm)
            predictions.append({
                "index": i, "label": ex.label, "pred": pred, "pred_norm": pred_norm,
                "correct": pred == ex.label, "correct_norm": pred_norm == ex.label,
                "loglik": loglik, "loglik_norm": norm,
                "n_tokens": [len(c) for c in choices], "n_bytes": n_bytes,
            })
            if progress is not None:
                progress(i + 1, len(examples))
    finally:
        if was_training:
            model.train()
    n = len(predictions)
    return {
        "accuracy": sum(p["correct"] for p in predictions) / n,
        "accuracy_norm": sum(p["correct_norm"] for p in predictions) / n,
        "n_examples": n,
        "objective": objective.name,
        "n_mc": n_mc if "n_mc" in objective.score_options else None,
        "cfg_scale": float(cfg_scale),
        "seed": seed,
        "normalisation": NORMALISATION,
        "chance": sum(1 / len(e.choices) for e in examples) / n,
        "n_truncated": n_truncated,
        "predictions": predictions,
    }


__all__ = [
    "NORMALISATION", "Scorer", "ar_scorer", "bd3_scorer", "check_score_settings", "evaluate_multiple_choice",
    "example_seed", "make_scorer", "mdm_scorer", "score_choices",
]
