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
    included) are the true continuation. The ``n_choices`` choices are the continuations of
    paragraphs of ``n_choices`` different documents, cut the same way, and the truth is a
    uniformly random one of them, so a context-free guess (:class:`UnigramScorer`,
    :func:`unigram_baseline`) is right ``1 / n_choices`` of the time. Everything is drawn
    from ``random.Random(seed)``, so the same texts and seed give the same task.
    :func:`heldout_texts` reads the validation documents of a corpus with the training split
    rule (:func:`lldiff.data.split.split_documents`, a per-document hash): a document that is
    validation at ``val_fraction`` is validation for every run trained with a
    ``val_fraction`` at least as large, whatever the corpus subset.
    :func:`find_run_config` / :func:`read_run_data` / :func:`run_heldout_texts` rebuild a
    ``lldiff fit`` run's own validation documents from its ``config.yaml``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {want}, got {value!r}")


MAX_DRAWS_PER_CHOICE = 100
"""Paragraph draws per choice before :func:`build_heldout_task` gives up on one example's set."""


def build_heldout_task(
    texts: Sequence[str],
    n_examples: int = 100,
    context_chars: int = 200,
    continuation_chars: int = 50,
    n_choices: int = 4,
    seed: int = 0,
) -> list[Example]:
    """The ``heldout-continuation`` task from documents ``texts`` (a pure function).

    A *usable paragraph* (blank-line separated) holds at least ``context_chars +
    continuation_chars`` characters; its context is its start cut back to the last word end
    within ``context_chars`` characters, its continuation the following text (leading
    whitespace included) cut back to the last word end within ``continuation_chars``
    characters, at least ``continuation_chars // 2`` characters long. Identical
    (context, continuation) pairs count once.

    Each example draws ``n_choices`` usable paragraphs from ``n_choices`` DIFFERENT documents
    (with distinct continuations), makes one of them the truth (its context is the example's
    context) and offers all their continuations, in random order, as the choices. Every
    distractor is thus the true continuation of another document's paragraph, cut exactly
    like the truth: same kind of position in a paragraph, same length distribution.

    Which member is the truth: the one at rank ``r`` (0 = likeliest) under a character
    unigram model of ``texts`` (:class:`UnigramScorer`), with ``r`` running through a random
    permutation of ``0 .. n_choices - 1`` for every ``n_choices`` consecutive examples. So
    the truth is a uniformly random member of its set, chosen without looking at what it
    says beyond that rank: ANY rule that looks at the choices without the context (a unigram
    model of characters, words or the model's tokens, the lengths, ...) picks it with
    probability ``1 / n_choices``; and the character unigram scorer (its total
    log-probability, counts from ``texts``, as :func:`unigram_baseline` with
    ``UnigramScorer(texts)``) is right on exactly one example of each block, i.e. at chance
    with no sampling noise. Why characters: they need no tokenizer, so the
    task is the same for every checkpoint (AR and MDM runs, any vocabulary), and their counts
    are dense. (The previous construction took distractors from arbitrary positions of other
    paragraphs, cut at most ``continuation_chars`` long: distractors near a paragraph's end
    came out shorter and likelier than the truth, so a unigram scorer picked a distractor
    ~89% of the time on verse; on Python code they were less likely, and it scored ~0.30.)

    A paragraph is the truth of at most one example (a set whose rank-``r`` member already
    was is drawn again); a set never holds two continuations that tie under the character
    unigram (relative difference ``<= 1e-6``, e.g. the same characters in another order).
    Everything is drawn from ``random.Random(seed)``: the same texts and seed give the same
    task. Examples are built until there are ``n_examples`` or every usable paragraph has
    been a truth, so fewer are returned from little text. The usable paragraphs must span at
    least ``n_choices`` documents.
    """
    _check_int("n_examples", n_examples, 1)
    _check_int("context_chars", context_chars, 1)
    _check_int("continuation_chars", continuation_chars, 1)
    _check_int("n_choices", n_choices, 2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts must be strings; entry {i} is a {type(t).__name__}")
    if len(texts) < 2:
        raise ValueError(f"need at least 2 documents (distractors come from other documents), got {len(texts)}")
    min_len = max(1, continuation_chars // 2)  # no very short choices
    candidates: list[tuple[int, str, str]] = []  # (doc, context, continuation)
    seen: set[tuple[str, str]] = set()
    for d, text in enumerate(texts):
        for p in _split_paragraphs(text):
            if len(p) < context_chars + continuation_chars:
                continue
            c = _word_end(p, 0, context_chars)
            if c < 1:
                continue
            e = _word_end(p, c, continuation_chars)
            if e < 0 or e - c < min_len or not p[c:e].strip() or (p[:c], p[c:e]) in seen:
                continue
            seen.add((p[:c], p[c:e]))
            candidates.append((d, p[:c], p[c:e]))
    if not candidates:
        raise ValueError(
            f"no paragraph has at least {context_chars + continuation_chars} characters with word "
            f"boundaries; use smaller context_chars/continuation_chars or more text"
        )
    n_docs = len({d for d, _, _ in candidates})
    if n_docs < n_choices:
        raise ValueError(
            f"usable paragraphs (>= {context_chars + continuation_chars} characters) come from {n_docs} "
            f"document(s), but n_choices={n_choices} needs {n_choices} different documents (each choice is "
            f"another document's continuation); use fewer n_choices, smaller context_chars/continuation_chars "
            f"or more text"
        )
    rng = random.Random(seed)
    unigram = UnigramScorer(texts, "char")
    scores: dict[int, float] = {}
    ranks: list[int] = []  # truth ranks still due in the current block of n_choices examples
    used: set[int] = set()  # candidates already the truth of an example
    examples: list[Example] = []
    failures = 0
    max_failures = 100 + 10 * n_examples
    while len(examples) < n_examples and len(used) < len(candidates) and failures < max_failures:
        members: list[int] = []
        docs: set[int] = set()
        continuations: set[str] = set()
        for _ in range(MAX_DRAWS_PER_CHOICE * n_choices):
            j = rng.randrange(len(candidates))
            d, _, cont = candidates[j]
            if d in docs or cont in continuations:
                continue
            if j not in scores:
                scores[j] = unigram(cont)
            if any(_tied(scores[j], scores[m]) for m in members):
                continue  # e.g. the same characters in another order: no strict ranking
            members.append(j)
            docs.add(d)
            continuations.add(cont)
            if len(members) == n_choices:
                break
        if len(members) < n_choices:
            failures += 1
            continue
        if not ranks:
            ranks = list(range(n_choices))
            rng.shuffle(ranks)
        truth = sorted(members, key=lambda j: (-scores[j], j))[ranks[-1]]
        if truth in used:
            failures += 1
            continue
        ranks.pop()
        used.add(truth)
        rng.shuffle(members)
        examples.append(Example(candidates[truth][1], [candidates[j][2] for j in members], members.index(truth)))
    if not examples:
        raise ValueError(
            f"could not build any example: no {n_choices} usable paragraphs from different documents with "
            f"distinct continuations were found; use fewer n_choices or more text"
        )
    return examples


# ----------------------------------------------------------------------------- context-free baseline

UNIGRAM_UNITS = ("char", "word")
"""Built-in units of :class:`UnigramScorer` (a tokenizer's ``encode`` may be given instead)."""

_WORD = re.compile(r"\w+|[^\w\s]")
TIE_RTOL = 1e-6
"""Scores within this relative distance count as equal (float32 rounding of equal sums)."""


class UnigramScorer:
    """A context-free scorer: the log-probability of a string under a unigram model.

    ``scorer(s) = sum_u log((count(u) + 1) / (N + K + 1))`` in nats over the units ``u`` of
    ``s``, with ``count`` the unit counts of ``texts``, ``N`` their total and ``K`` the number
    of distinct units (add-one smoothing; an unseen unit gets ``1 / (N + K + 1)``).

    ``unit``: ``"char"`` (characters), ``"word"`` (runs of letters/digits/underscore and
    single punctuation characters; whitespace is not scored) or a callable ``str -> sequence``
    such as a tokenizer's ``encode`` (the units the model scores).

    ``lldiff eval`` reports two: characters, because they need no tokenizer, so the number is
    the same for every checkpoint evaluated on a task, and their counts are dense (a word
    unigram over held-out code or verse leaves many words unseen); and the checkpoint's own
    tokens, the context-free model closest to what the model itself could learn.
    """

    def __init__(self, texts: Iterable[str], unit: str | Callable[[str], Sequence[Any]] = "char") -> None:
        if callable(unit):
            self._units = unit
        elif unit == "char":
            self._units = list
        elif unit == "word":
            self._units = _WORD.findall
        else:
            raise ValueError(f"unit must be one of {UNIGRAM_UNITS} or a callable (e.g. tokenizer.encode), got {unit!r}")
        counts: Counter[Any] = Counter()
        for t in texts:
            counts.update(self._units(t))
        self.n_units = sum(counts.values())
        denom = self.n_units + len(counts) + 1
        self._logp = {u: math.log((n + 1) / denom) for u, n in counts.items()}
        self._unseen = math.log(1 / denom)

    def __call__(self, text: str) -> float:
        logp, unseen = self._logp, self._unseen
        return sum(logp.get(u, unseen) for u in self._units(text))


def _tied(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_RTOL * max(1.0, abs(a), abs(b))


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; near-ties (:data:`TIE_RTOL`) go to the lowest index."""
    best = 0
    for i, v in enumerate(values):
        if v - values[best] > TIE_RTOL * max(1.0, abs(values[best])):
            best = i
    return best


def unigram_baseline(examples: Sequence[Example], scorer: Callable[[str], float]) -> dict[str, Any]:
    """Accuracy of a context-free scorer on ``examples``: each choice is scored by
    ``scorer(choice)`` alone (the context is ignored); predictions are the argmax of the
    total (``accuracy``) and of the score per UTF-8 byte of the choice (``accuracy_norm``),
    ties to the lowest index, as in :func:`lldiff.evaluation.evaluate_multiple_choice`.
    Returns ``accuracy``, ``accuracy_norm``, ``chance``, ``n_examples``, and per example
    ``preds`` and ``preds_norm``."""
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to score")
    preds, preds_norm = [], []
    for e in examples:
        scores = [float(scorer(c)) for c in e.choices]
        preds.append(first_argmax(scores))
        preds_norm.append(first_argmax([s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, e.choices)]))
    n = len(examples)
    return {
        "accuracy": sum(p == e.label for p, e in zip(preds, examples)) / n,
        "accuracy_norm": sum(p == e.label for p, e in zip(preds_norm, examples)) / n,
        "chance": sum(1 / len(e.choices) for e in examples) / n,
        "n_examples": n,
        "preds": preds,
        "preds_norm": preds_norm,
    }


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


# ----------------------------------------------------------------------------- the run's own data

RUN_CONFIG_NAME = "config.yaml"
RUN_DATA_CLASSES = ("PretrainDataModule", "SFTDataModule")
"""Data modules of a ``lldiff fit`` run whose validation text :func:`run_heldout_texts` can rebuild."""

_PRETRAIN_CORPUS_KEYS = ("source", "paths", "text_field", "txt_unit", "hub_name", "hub_config", "hub_split",
                         "hub_revision", "max_bytes")
_PRETRAIN_DEFAULTS = {"source": "stdlib", "paths": None, "text_field": "text", "txt_unit": "paragraph",
                      "hub_name": None, "hub_config": None, "hub_split": "train", "hub_revision": None,
                      "max_bytes": None, "val_fraction": 0.05}
_SFT_DEFAULTS = {"train_files": None, "val_files": None, "val_fraction": 0.05}


class RunDataUnavailable(Exception):
    """A run's ``config.yaml`` names no data the built-in task can rebuild (no data section,
    or a data module other than :data:`RUN_DATA_CLASSES`); the message says which."""


@dataclass
class RunData:
    """The data section of a ``lldiff fit`` run's ``config.yaml`` (LightningCLI's resolved config).

    ``kind`` is ``"pretrain"`` (``lldiff.data.PretrainDataModule``) or ``"sft"``
    (``lldiff.data.SFTDataModule``); ``args`` holds the data module's arguments that select
    text (missing ones at the module's defaults).
    """

    config: Path
    kind: str
    args: dict[str, Any]

    @property
    def val_fraction(self) -> float:
        return self.args["val_fraction"]

    def describe(self) -> str:
        """One line, e.g. ``source=files paths=['a.txt'] val_fraction=0.05``."""
        if self.kind == "sft":
            keys = ("train_files", "val_files", "val_fraction")
        else:
            keys = [k for k in (*_PRETRAIN_CORPUS_KEYS, "val_fraction")
                    if self.args.get(k) != _PRETRAIN_DEFAULTS[k] or k in ("source", "val_fraction")]
        return f"{'SFT ' if self.kind == 'sft' else ''}" + " ".join(f"{k}={self.args.get(k)!r}" for k in keys)

    def corpus_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`heldout_texts` (pre-training runs)."""
        return {k: self.args[k] for k in _PRETRAIN_CORPUS_KEYS}


def find_run_config(ckpt: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` of the run a checkpoint belongs to: ``<run>/config.yaml`` for
    ``<run>/checkpoints/<name>.ckpt`` (what ``lldiff fit`` writes), else one beside the
    checkpoint; None if there is none."""
    ckpt = Path(ckpt).absolute()
    candidates = [ckpt.parent / RUN_CONFIG_NAME]
    if ckpt.parent.name == "checkpoints":
        candidates.insert(0, ckpt.parent.parent / RUN_CONFIG_NAME)
    return next((c for c in candidates if c.is_file()), None)


def read_run_data(config: str | os.PathLike) -> RunData:
    """The data section of a run's ``config.yaml`` (read with ``yaml.safe_load`` only).

    ``ValueError`` if the file is not valid YAML or its data section is malformed;
    :class:`RunDataUnavailable` if it has no data section or names a data module other than
    :data:`RUN_DATA_CLASSES`."""
    import yaml

    config = Path(config)
    try:
        loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"run config {str(config)!r} is not valid YAML ({e})") from None
    data = loaded.get("data") if isinstance(loaded, dict) else None
    if data is None:
        raise RunDataUnavailable(f"{config} has no 'data' section")
    if not isinstance(data, dict) or not isinstance(data.get("class_path"), str):
        raise ValueError(f"run config {str(config)!r}: 'data' must be a mapping with a class_path, got {data!r}")
    init_args = data.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"run config {str(config)!r}: data.init_args must be a mapping, got {init_args!r}")
    name = data["class_path"].rsplit(".", 1)[-1]
    if name not in RUN_DATA_CLASSES:
        raise RunDataUnavailable(
            f"{config} trains on {data['class_path']}; the built-in task can rebuild the validation text of "
            f"{' or '.join(RUN_DATA_CLASSES)} only"
        )
    kind, defaults = ("pretrain", _PRETRAIN_DEFAULTS) if name == "PretrainDataModule" else ("sft", _SFT_DEFAULTS)
    args = {k: init_args.get(k, v) for k, v in defaults.items()}
    if kind == "sft" and not args["train_files"]:
        raise ValueError(f"run config {str(config)!r}: data.init_args.train_files is empty")
    return RunData(config, kind, args)


def sft_heldout_texts(
    train_files: Sequence[str], val_files: Sequence[str] | None = None, val_fraction: float = 0.05
) -> list[str]:
    """Held-out text of a fine-tuning run: the responses of its validation turns (``val_files``,
    or the ``val_fraction`` hash split of ``train_files`` that :class:`SFTDataModule` uses),
    minus any text the run trained on (a training turn's response or any message of its
    history: with the hash split, turns of one conversation can land on both sides).
    Each response is one document; duplicates count once."""
    from lldiff.data.sft import load_turns, split_turns

    turns = load_turns(list(train_files))
    if val_files:
        train, val = turns, load_turns(list(val_files))
    else:
        train, val = split_turns(turns, val_fraction)
    seen = {t.response for t in train} | {m.content for t in train for m in t.history}
    texts = list(dict.fromkeys(t.response for t in val if t.response not in seen and t.response.strip()))
    if not texts:
        raise ValueError(
            f"the fine-tuning data has no held-out responses (val_files={val_files!r}, val_fraction={val_fraction}); "
            f"give --corpus/--paths"
        )
    return texts


def run_heldout_texts(run: RunData, *, max_bytes: Any = "run", val_fraction: float | None = None) -> list[str]:
    """Validation documents of the run's own data with the run's split, so none of them was
    trained on. ``max_bytes`` (``"run"``: the run's) and ``val_fraction`` (None: the run's)
    override the run's values for a pre-training run; a ``val_fraction`` above the run's
    brings training documents in (the caller warns). SFT runs: :func:`sft_heldout_texts`."""
    vf = run.val_fraction if val_fraction is None else val_fraction
    if run.kind == "sft":
        return sft_heldout_texts(run.args["train_files"], run.args["val_files"], vf)
    kwargs = run.corpus_kwargs()
    if max_bytes != "run":
        kwargs["max_bytes"] = max_bytes
    return heldout_texts(kwargs.pop("source"), val_fraction=vf, **kwargs)


__all__ = [
    "BUILTIN_TASKS", "HELDOUT_TASK", "RUN_DATA_CLASSES", "UNIGRAM_UNITS", "Example", "RunData",
    "RunDataUnavailable", "UnigramScorer", "build_heldout_task", "find_run_config", "heldout_texts",
    "load_jsonl_task", "read_run_data", "run_heldout_texts", "save_jsonl_task", "sft_heldout_texts",
    "unigram_baseline", "validate_example",
]
