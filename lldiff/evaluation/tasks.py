"""Multiple-choice tasks: the JSONL file format and the built-in offline task.

JSONL task format
    One JSON object per line (blank lines are skipped)::

        {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

    * ``context`` (string, may be empty): the text the choices continue.
    * ``choices`` (list of at least 2 non-empty strings): candidate continuations. They are
      scored as continuations of the context, tokenised SEPARATELY from it, so the separating
      whitespace belongs to the choice (lm-eval-harness convention): write ``" Paris"``, not
      ``"Paris"`` with a trailing space in the context.
    * ``label`` (integer): index of the correct choice, ``0 <= label < len(choices)``.

    Other keys (e.g. ``"id"``) are allowed and ignored. :func:`load_jsonl_task` reports every
    problem with the file name and line number.

Built-in task ``heldout-continuation`` (offline)
    :func:`build_heldout_task` turns held-out text into examples: a paragraph's first
    ``context_chars`` characters (cut back to a word end) are the context, the next
    ``continuation_chars`` characters (also cut back to a word end, leading whitespace
    included) are the true continuation, and ``n_choices - 1`` distractors are word-aligned
    segments of the same maximal length from OTHER documents. Everything is drawn from
    ``random.Random(seed)``, so the same texts and seed give the same task.
    :func:`heldout_texts` reads the validation documents of a corpus with the training split
    rule (:func:`lldiff.data.split.split_documents`, a per-document hash): a document that is
    validation at ``val_fraction`` is validation for every run trained with a
    ``val_fraction`` at least as large, whatever the corpus subset.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lldiff.atomic import write_text

HELDOUT_TASK = "heldout-continuation"
BUILTIN_TASKS = (HELDOUT_TASK,)
DEFAULT_STDLIB_MAX_BYTES = 4_000_000
"""Default corpus cap for the built-in task on the stdlib source: the training default
(:data:`lldiff.data.corpora.STDLIB_DEFAULT_MAX_BYTES`), read in a few seconds."""


@dataclass
class Example:
    """One multiple-choice question: ``choices[label]`` is the correct continuation of ``context``."""

    context: str
    choices: list[str]
    label: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"context": self.context, "choices": list(self.choices), "label": self.label}
        out.update(self.meta)
        return out


# ----------------------------------------------------------------------------- JSONL


def validate_example(record: Any, where: str = "example") -> Example:
    """An :class:`Example` from a decoded JSON record; ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("context", "choices", "label") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; each line needs 'context', 'choices', 'label'")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of strings")
    if len(choices) < 2:
        raise ValueError(f"{where}: 'choices' has {len(choices)} entr{'y' if len(choices) == 1 else 'ies'}; need at least 2")
    empty = [i for i, c in enumerate(choices) if not c]
    if empty:
        raise ValueError(f"{where}: choice(s) {empty} are empty strings; a choice needs at least one character")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: 'label' must be an integer, got {label!r}")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    meta = {k: v for k, v in record.items() if k not in ("context", "choices", "label")}
    return Example(context, list(choices), label, meta)


def load_jsonl_task(path: str | os.PathLike) -> list[Example]:
    """Examples of a JSONL task file (format: module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(validate_example(record, where))
    if not examples:
        raise ValueError(f"task file {str(path)!r} contains no examples")
    return examples


def save_jsonl_task(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write examples as a JSONL task file (atomically)."""
    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in examples]
    write_text(path, "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------- built-in task


def _word_end(text: str, start: int, max_chars: int) -> int:
    """Largest ``e`` in ``(start, start + max_chars]`` that ends a word (``text[e]`` is
    whitespace or the end of the text, ``text[e-1]`` is not), or ``-1`` if none."""
    stop = min(len(text), start + max_chars)
    for e in range(stop, start, -1):
        if (e == len(text) or text[e].isspace()) and not text[e - 1].isspace():
            return e
    return -1


def _split_paragraphs(text: str) -> list[str]:
    from lldiff.data.corpora import split_paragraphs

    return split_paragraphs(text)


def build_heldout_task(
    texts: Sequence[str],
    n_examples: int = 100,
    context_chars: int = 200,
    continuation_chars: int = 50,
    n_choices: int = 4,
    seed: int = 0,
) -> list[Example]:
    """The ``heldout-continuation`` task from documents ``texts`` (a pure function).

    Each example comes from a different paragraph (blank-line separated) that holds at least
    ``context_chars + continuation_chars`` characters: context = its start cut back to the
    last word end within ``context_chars`` characters; true continuation = the following
    text (leading whitespace included) cut back to the last word end within
    ``continuation_chars`` characters. Every choice has at least ``continuation_chars // 2``
    characters (limits length cues). Distractors: segments starting at a word end of a
    paragraph of another document, cut the same way, distinct from the truth and from each
    other. The true continuation sits at a uniformly drawn ``label``. Fewer than
    ``n_examples`` examples are returned if the texts have fewer usable paragraphs; at least
    one is required, and at least two documents (distractors come from other documents).
    """
    for name, value in (("n_examples", n_examples), ("context_chars", context_chars),
                        ("continuation_chars", continuation_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(n_choices, bool) or not isinstance(n_choices, int) or n_choices < 2:
        raise ValueError(f"n_choices must be an integer >= 2, got {n_choices!r}")
    texts = list(texts)
    if len(texts) < 2:
        raise ValueError(f"need at least 2 documents (distractors come from other documents), got {len(texts)}")
    rng = random.Random(seed)
    min_len = max(1, continuation_chars // 2)  # no very short choices (limits length cues)
    paragraphs = [_split_paragraphs(t) for t in texts]
    candidates = []  # (doc, context, continuation)
    for d, paras in enumerate(paragraphs):
        for p in paras:
            if len(p) < context_chars + continuation_chars:
                continue
            c = _word_end(p, 0, context_chars)
            if c < 1:
                continue
            e = _word_end(p, c, continuation_chars)
            if e < 0 or e - c < min_len or not p[c:e].strip():
                continue
            candidates.append((d, p[:c], p[c:e]))
    if not candidates:
        raise ValueError(
            f"no paragraph has at least {context_chars + continuation_chars} characters with word "
            f"boundaries; use smaller context_chars/continuation_chars or more text"
        )
    # word-end start positions per document, for distractors
    starts: list[list[tuple[str, int]]] = []
    for paras in paragraphs:
        pos = []
        for p in paras:
            pos += [(p, i) for i in range(1, len(p)) if p[i].isspace() and not p[i - 1].isspace()]
        starts.append(pos)
    rng.shuffle(candidates)
    examples = []
    for d, context, truth in candidates[:n_examples]:
        others = [o for o in range(len(texts)) if o != d and starts[o]]
        if not others:
            continue
        distractors: list[str] = []
        for _ in range(100 * n_choices):
            if len(distractors) == n_choices - 1:
                break
            p, s = rng.choice(starts[rng.choice(others)])
            e = _word_end(p, s, continuation_chars)
            if e < 0:
                continue
            seg = p[s:e]
            if len(seg) >= min_len and seg.strip() and seg != truth and seg not in distractors:
                distractors.append(seg)
        if len(distractors) < n_choices - 1:
            continue  # too little other text for distinct distractors
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [truth] + distractors[label:]
        examples.append(Example(context, choices, label))
    if not examples:
        raise ValueError("could not build any example: the other documents hold too little text for distractors")
    return examples


def heldout_texts(
    source: str = "stdlib",
    *,
    paths: Sequence[str] | None = None,
    max_bytes: int | None = None,
    val_fraction: float = 0.05,
    **corpus_kwargs: Any,
) -> list[str]:
    """Texts of the validation documents of a corpus (same split rule as training).

    ``max_bytes=None`` means :data:`DEFAULT_STDLIB_MAX_BYTES` for ``stdlib`` and no cap
    otherwise. Use ``val_fraction`` <= the training run's (default 0.05) so that every
    document used here was held out from training.
    """
    from lldiff.data.corpora import build_corpus
    from lldiff.data.split import split_documents

    if max_bytes is None and source == "stdlib":
        max_bytes = DEFAULT_STDLIB_MAX_BYTES
    corpus = build_corpus(source, paths=paths, max_bytes=max_bytes, **corpus_kwargs)
    _, val = split_documents(corpus.documents(), val_fraction)
    return [d.text for d in val]


__all__ = [
    "BUILTIN_TASKS", "HELDOUT_TASK", "Example", "build_heldout_task", "heldout_texts",
    "load_jsonl_task", "save_jsonl_task", "validate_example",
]
