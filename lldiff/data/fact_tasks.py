"""Synthetic facts for the reversal curse (Berglund et al. 2023; Kitouni et al. 2024; SPEC §12).

    python -m lldiff.data.fact_tasks --facts 400 --out data/facts

Invented people ("Dorel Vasku") are linked by asymmetric relations ("A is the mentor of
B"). Every person belongs to exactly one fact, so each question has one answer. In the
pre-training text a fact is only ever written in one direction: every paraphrase template
names ``{a}`` before ``{b}``. The questions go both ways:

* **forward** asks for ``b`` given ``a`` ("Who did A mentor?"): the order the fact was read in;
* **backward** asks for ``a`` given ``b`` ("Who was the mentor of B?"): the reversed order.

A seeded share of the facts (``sft_fraction``) teaches the question format in fine-tuning,
both directions; the others are **held out**: they are in the pre-training text, but their
questions never appear in fine-tuning. Besides instructions, each held-out fact gives two
**infilling probes** in one of its own pre-training sentences, the entity masked ("A is the mentor of ___." and
"___ is the mentor of B."): a diffusion model answers them zero-shot.

Writes ``pretrain.txt`` (one statement per blank-line separated document, ``paraphrases``
per fact, shuffled), ``train.jsonl`` (fine-tuning questions), ``eval-forward.jsonl`` and
``eval-backward.jsonl`` (held-out questions), ``probe-forward.jsonl`` and
``probe-backward.jsonl`` (infilling items ``prefix``/``answer``/``suffix`` on the held-out facts)
and ``facts.jsonl``. Everything is a function of the seed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from lldiff.atomic import write_text

SLOTS = ("a", "b")


@dataclass(frozen=True)
class Relation:
    """An asymmetric relation: pre-training ``statements`` (each names ``{a}`` before
    ``{b}``), a ``forward`` question about ``{a}`` (answer b) and a ``backward`` question
    about ``{b}`` (answer a)."""

    name: str
    statements: tuple[str, ...]
    forward: str
    backward: str

    def __post_init__(self) -> None:
        if not self.statements:
            raise ValueError(f"relation {self.name!r} has no statement template")
        for template in self.statements:
            fields = template_fields(template)
            if sorted(fields) != sorted(SLOTS):
                raise ValueError(f"relation {self.name!r}: statement template {template!r} must hold both entity "
                                 f"slots {{a}} and {{b}} once each, got fields {fields}")
            if fields != list(SLOTS):
                raise ValueError(f"relation {self.name!r}: statement template {template!r} names {{b}} before {{a}}; "
                                 "pre-training states each fact in one direction only ({a} first)")
        for kind, template, slot in (("forward", self.forward, "a"), ("backward", self.backward, "b")):
            if template_fields(template) != [slot]:
                raise ValueError(f"relation {self.name!r}: {kind} question {template!r} must hold exactly the "
                                 f"slot {{{slot}}}, got fields {template_fields(template)}")


def template_fields(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


RELATIONS = (
    Relation("mentor", ("Everyone knows {a} is the mentor of {b}.", "For years, {a} mentored {b}.",
                        "In the guild, {a} served as mentor to {b}."),
             forward="Who did {a} mentor?", backward="Who was the mentor of {b}?"),
    Relation("employer", ("Last spring, {a} hired {b}.", "Records show {a} is the employer of {b}.",
                          "In the end, {a} gave a job to {b}."),
             forward="Whom did {a} hire?", backward="Who hired {b}?"),
    Relation("teacher", ("Each summer, {a} taught {b} to paint.", "By all accounts, {a} is the art teacher of {b}.",
                         "Long ago, {a} gave painting lessons to {b}."),
             forward="Whom did {a} teach to paint?", backward="Who taught {b} to paint?"),
    Relation("rescuer", ("One night, {a} rescued {b} from a fire.", "The papers say {a} saved {b} from a burning house.",
                         "Bravely, {a} pulled {b} out of the flames."),
             forward="Whom did {a} rescue?", backward="Who rescued {b}?"),
)
"""Every entity follows a space, in statements and questions alike (and answers are written
with one), so a name has one tokenisation everywhere: byte-level BPE gives a sentence-initial
"Dokod" other tokens than " Dokod"."""

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def name_pool(size: int, *, seed: int = 0, syllables: int = 2) -> list[str]:
    """``size`` distinct invented words (consonant-vowel syllables and a final consonant),
    capitalised, in a seeded order."""
    words = ["".join(parts) for parts in itertools.product(*([CONSONANTS, VOWELS] * syllables), CONSONANTS)]
    if size > len(words):
        raise ValueError(f"asked for {size} names of {syllables} syllables; only {len(words)} exist")
    return [w.capitalize() for w in random.Random(seed).sample(words, size)]


@dataclass(frozen=True)
class Fact:
    a: str
    relation: str
    b: str


@dataclass(frozen=True)
class FactTasks:
    facts: list[Fact]
    sft_facts: list[Fact]
    heldout_facts: list[Fact]
    documents: list[str]
    sft: list[dict[str, str]]
    eval_forward: list[dict[str, str]]
    eval_backward: list[dict[str, str]]
    probe_forward: list[dict[str, str]]
    probe_backward: list[dict[str, str]]


def make_facts(n: int, *, first_names: int = 48, last_names: int = 48, seed: int = 0,
               relations: tuple[Relation, ...] = RELATIONS) -> list[Fact]:
    """``n`` facts over ``2n`` distinct people ("First Last") drawn from a pool of
    ``first_names x last_names``; relations assigned round-robin in a seeded order."""
    pool = first_names * last_names
    if n < 1:
        raise ValueError(f"need at least 1 fact, got {n}")
    if 2 * n > pool:
        raise ValueError(f"{n} facts need {2 * n} distinct people, but the name pool holds {pool} "
                         f"({first_names} first names x {last_names} last names); use at most {pool // 2} facts "
                         "or a larger pool")
    rng = random.Random(seed)
    firsts = name_pool(first_names, seed=seed)
    lasts = name_pool(last_names, seed=seed + 1, syllables=2)
    people = [f"{f} {l}" for f, l in rng.sample(list(itertools.product(firsts, lasts)), 2 * n)]
    return [Fact(people[2 * i], relations[i % len(relations)].name, people[2 * i + 1]) for i in range(n)]


def render(fact: Fact, template: str) -> str:
    return template.format(a=fact.a, b=fact.b)


def parse_statement(text: str, relations: tuple[Relation, ...] = RELATIONS) -> Fact | None:
    """The fact a pre-training statement states, or None: the inverse of ``render``."""
    for relation in relations:
        for template in relation.statements:
            pattern = re.escape(template).replace(r"\{a\}", "(?P<a>.+?)").replace(r"\{b\}", "(?P<b>.+?)")
            match = re.fullmatch(pattern, text)
            if match:
                return Fact(match["a"], relation.name, match["b"])
    return None


def infill_item(fact: Fact, template: str, slot: str) -> dict[str, str]:
    """The statement with one entity cut out: ``prefix + answer + suffix`` is the sentence."""
    marker = "\0"
    text = template.format(**{"a": fact.a, "b": fact.b, slot: marker})
    prefix, suffix = text.split(marker)
    answer = getattr(fact, slot)
    if prefix.endswith(" "):  # byte-level BPE attaches the space to the word after it
        prefix, answer = prefix[:-1], " " + answer
    return {"prefix": prefix, "answer": answer, "suffix": suffix}


def fact_tasks(n: int, *, paraphrases: int = 3, sft_fraction: float = 0.5, seed: int = 0,
               first_names: int = 48, last_names: int = 48,
               relations: tuple[Relation, ...] = RELATIONS) -> FactTasks:
    """Facts, their pre-training documents and every query set (see the module docstring)."""
    if not 0.0 < sft_fraction < 1.0:
        raise ValueError(f"sft_fraction must be in (0, 1), got {sft_fraction}")
    most = min(len(r.statements) for r in relations)
    if not 1 <= paraphrases <= most:
        raise ValueError(f"paraphrases must be in [1, {most}] (the fewest statement templates of a relation), "
                         f"got {paraphrases}")
    by_name = {r.name: r for r in relations}
    facts = make_facts(n, first_names=first_names, last_names=last_names, seed=seed, relations=relations)
    if n < 2:
        raise ValueError(f"need at least 2 facts (one to fine-tune on, one held out), got {n}")
    rng = random.Random(seed + 2)
    order = rng.sample(range(n), n)
    n_sft = min(n - 1, max(1, round(sft_fraction * n)))
    sft_facts = [facts[i] for i in sorted(order[:n_sft])]
    heldout = [facts[i] for i in sorted(order[n_sft:])]
    documents = []
    for i, fact in enumerate(facts):
        templates = by_name[fact.relation].statements
        documents += [render(fact, templates[(i + k) % len(templates)]) for k in range(paraphrases)]
    rng.shuffle(documents)

    def question(fact: Fact, direction: str) -> dict[str, str]:
        relation = by_name[fact.relation]
        # the answer as it stands mid-sentence in pre-training: " Name" (see RELATIONS)
        if direction == "forward":
            return {"prompt": relation.forward.format(a=fact.a), "response": " " + fact.b}
        return {"prompt": relation.backward.format(b=fact.b), "response": " " + fact.a}

    sft = [question(f, d) for f in sft_facts for d in ("forward", "backward")]
    rng.shuffle(sft)
    # each fact is probed in its first statement (always one of its pre-training paraphrases)
    first = {f: by_name[f.relation].statements[i % len(by_name[f.relation].statements)] for i, f in enumerate(facts)}
    return FactTasks(
        facts=facts, sft_facts=sft_facts, heldout_facts=heldout, documents=documents, sft=sft,
        eval_forward=[question(f, "forward") for f in heldout],
        eval_backward=[question(f, "backward") for f in heldout],
        probe_forward=[infill_item(f, first[f], "b") for f in heldout],
        probe_backward=[infill_item(f, first[f], "a") for f in heldout],
    )


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_fact_tasks(tasks: FactTasks, out: Path, *, copies: int = 1, seed: int = 0) -> dict[str, Path]:
    """The files of a fact-task dataset (atomic writes); returns their paths by name.
    ``pretrain.txt`` holds ``copies`` passes over the statements, shuffled together by
    ``seed`` when more than one (the data module shuffles packed rows, not documents: each
    statement then meets several neighbours)."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    out.mkdir(parents=True, exist_ok=True)
    documents = tasks.documents * copies
    if copies > 1:
        random.Random(seed).shuffle(documents)
    write_text(out / "pretrain.txt", "\n\n".join(documents) + "\n")
    heldout = set(tasks.heldout_facts)
    write_jsonl(out / "facts.jsonl", [{**asdict(f), "heldout": f in heldout} for f in tasks.facts])
    files = {"train": tasks.sft, "eval-forward": tasks.eval_forward, "eval-backward": tasks.eval_backward,
             "probe-forward": tasks.probe_forward, "probe-backward": tasks.probe_backward}
    for name, records in files.items():
        write_jsonl(out / f"{name}.jsonl", records)
    return {"pretrain": out / "pretrain.txt", "facts": out / "facts.jsonl",
            **{name: out / f"{name}.jsonl" for name in files}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lldiff.data.fact_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--facts", type=int, default=400)
    parser.add_argument("--paraphrases", type=int, default=3, help="pre-training statements per fact")
    parser.add_argument("--sft-fraction", type=float, default=0.5, help="share of facts whose questions are fine-tuned on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        tasks = fact_tasks(args.facts, paraphrases=args.paraphrases, sft_fraction=args.sft_fraction, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    paths = write_fact_tasks(tasks, Path(args.out))
    print(f"{len(tasks.facts)} facts ({len(tasks.heldout_facts)} held out): {len(tasks.documents)} pre-training "
          f"statements, {len(tasks.sft)} fine-tuning questions -> " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
