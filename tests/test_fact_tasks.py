"""Synthetic facts for the reversal study (SPEC §12): one direction in pre-training, held-out
questions never fine-tuned on, templates that render and parse back, exact-match scoring."""

import json
import re

import pytest

from lldiff.data.fact_tasks import (
    RELATIONS,
    Fact,
    Relation,
    fact_tasks,
    infill_item,
    make_facts,
    name_pool,
    parse_statement,
    render,
    write_fact_tasks,
)
from lldiff.evaluation.exact_match import accuracy, expected_text, item_kind, normalise, read_items


def test_every_person_is_in_one_fact_and_the_generator_is_seeded():
    facts = make_facts(300, seed=3)
    people = [p for f in facts for p in (f.a, f.b)]
    assert len(set(people)) == 600
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", p) for p in people)
    assert make_facts(300, seed=3) == facts and make_facts(300, seed=4) != facts
    assert {f.relation for f in facts} == {r.name for r in RELATIONS}


def test_no_fact_appears_in_both_directions_in_the_pretraining_text():
    tasks = fact_tasks(120, paraphrases=3, seed=1)
    people = {p: f for f in tasks.facts for p in (f.a, f.b)}
    seen = set()
    for document in tasks.documents:
        fact = parse_statement(document)
        assert fact is not None and fact in set(tasks.facts)
        seen.add(fact)
        # every name the document mentions belongs to its fact, a written before b
        names = [m for m in re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", document) if m in people]
        assert names == [fact.a, fact.b]
        assert document.index(fact.a) < document.index(fact.b)
    assert seen == set(tasks.facts)
    assert len(tasks.documents) == 3 * len(tasks.facts)
    # a fact's paraphrases are distinct statements
    for fact in tasks.facts[:10]:
        assert len({d for d in tasks.documents if parse_statement(d) == fact}) == 3


def test_heldout_queries_are_never_in_fine_tuning():
    tasks = fact_tasks(200, sft_fraction=0.5, seed=2)
    assert set(tasks.sft_facts).isdisjoint(tasks.heldout_facts)
    assert set(tasks.sft_facts) | set(tasks.heldout_facts) == set(tasks.facts)
    sft_prompts = {q["prompt"] for q in tasks.sft}
    sft_text = " ".join(q["prompt"] + " " + q["response"] for q in tasks.sft)
    for query in tasks.eval_forward + tasks.eval_backward:
        assert query["prompt"] not in sft_prompts
    for fact in tasks.heldout_facts:  # not even the names of a held-out fact are fine-tuned on
        assert fact.a not in sft_text and fact.b not in sft_text
    # fine-tuning teaches both directions of its facts
    assert len(tasks.sft) == 2 * len(tasks.sft_facts)
    answers = {q["response"].strip() for q in tasks.sft}
    assert all(f.a in answers and f.b in answers for f in tasks.sft_facts)
    # held-out questions: forward answers b, backward answers a
    assert [q["response"] for q in tasks.eval_forward] == [" " + f.b for f in tasks.heldout_facts]
    assert [q["response"] for q in tasks.eval_backward] == [" " + f.a for f in tasks.heldout_facts]
    assert all(f.a in q["prompt"] for f, q in zip(tasks.heldout_facts, tasks.eval_forward))
    assert all(f.b in q["prompt"] for f, q in zip(tasks.heldout_facts, tasks.eval_backward))


@pytest.mark.parametrize("relation", RELATIONS, ids=lambda r: r.name)
def test_paraphrases_render_and_parse_back(relation):
    fact = Fact("Dorel Vasku", relation.name, "Mirak Tolun")
    for template in relation.statements:
        text = render(fact, template)
        assert " Dorel Vasku" in text and " Mirak Tolun" in text
        assert parse_statement(text) == fact
        for slot in ("a", "b"):  # the infilling item reassembles the statement
            item = infill_item(fact, template, slot)
            assert item["prefix"] + item["answer"] + item["suffix"] == text
            assert normalise(item["answer"]) == getattr(fact, slot)
    assert parse_statement("Dorel Vasku likes Mirak Tolun.") is None
    for question in (relation.forward.format(a=fact.a), relation.backward.format(b=fact.b)):
        assert " Dorel Vasku" in question or " Mirak Tolun" in question


def test_probe_items_are_the_heldout_facts_statements():
    tasks = fact_tasks(60, seed=5)
    assert len(tasks.probe_forward) == len(tasks.probe_backward) == len(tasks.heldout_facts)
    for fact, fwd, bwd in zip(tasks.heldout_facts, tasks.probe_forward, tasks.probe_backward):
        sentence = fwd["prefix"] + fwd["answer"] + fwd["suffix"]
        assert sentence == bwd["prefix"] + bwd["answer"] + bwd["suffix"] and sentence in tasks.documents
        assert normalise(fwd["answer"]) == fact.b and normalise(bwd["answer"]) == fact.a
        assert fact.b in bwd["suffix"] and fact.b not in bwd["prefix"]  # b only after the masked a
        # every entity follows a space: one tokenisation per name, in statements and answers alike
        assert fwd["answer"] == " " + fact.b and bwd["answer"] == " " + fact.a


def test_files_round_trip(tmp_path):
    tasks = fact_tasks(40, seed=0)
    paths = write_fact_tasks(tasks, tmp_path)
    assert (tmp_path / "pretrain.txt").read_text().strip().split("\n\n") == tasks.documents
    assert read_items(paths["eval-backward"]) == tasks.eval_backward
    assert read_items(paths["probe-forward"]) == tasks.probe_forward
    facts = [json.loads(line) for line in paths["facts"].read_text().splitlines()]
    assert sum(f["heldout"] for f in facts) == len(tasks.heldout_facts)


def test_exact_match_scoring_on_hand_made_cases():
    assert accuracy(["Dorel Vasku", " Dorel Vasku\n", "Dorel", "dorel vasku"], ["Dorel Vasku"] * 4) == 0.5
    assert accuracy([], []) == 0.0
    assert accuracy(["Mirak Tolun"], [" Mirak Tolun"]) == 1.0
    with pytest.raises(ValueError, match="2 answers for 1 expected"):
        accuracy(["a", "b"], ["a"])
    assert item_kind({"prompt": "q", "response": "r"}) == "instruction"
    assert expected_text({"prefix": "p", "answer": " x", "suffix": "."}) == " x"
    with pytest.raises(ValueError, match="prefix/answer/suffix"):
        item_kind({"question": "q"})


def test_bad_input_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"3000 facts need 6000 distinct people, but the name pool holds 2304"):
        make_facts(3000)
    with pytest.raises(ValueError, match=r"must hold both entity slots"):
        Relation("likes", ("{a} likes someone.",), forward="Whom does {a} like?", backward="Who likes {b}?")
    with pytest.raises(ValueError, match=r"names \{b\} before \{a\}"):
        Relation("likes", ("{b} is liked by {a}.",), forward="Whom does {a} like?", backward="Who likes {b}?")
    with pytest.raises(ValueError, match=r"backward question .* exactly the slot \{b\}"):
        Relation("likes", ("{a} likes {b}.",), forward="Whom does {a} like?", backward="Who likes them?")
    with pytest.raises(ValueError, match="paraphrases must be in"):
        fact_tasks(10, paraphrases=4)
    with pytest.raises(ValueError, match="only"):
        name_pool(10**7)
