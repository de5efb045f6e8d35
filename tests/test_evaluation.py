"""Zero-shot multiple-choice evaluation: task files, the built-in task, scoring, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lldiff.config import ModelConfig
from lldiff.data.tokenizer import train_tokenizer
from lldiff.evaluation import (
    Example,
    build_heldout_task,
    evaluate_multiple_choice,
    load_jsonl_task,
    save_jsonl_task,
)
from lldiff.evaluation.cli import main
from lldiff.objectives.common.scoring import score_choices
from lldiff.objectives.mdm.likelihood import mdm_scorer
from lldiff.objectives.ar.likelihood import ar_loglik
from lldiff.model import Transformer

# ----------------------------------------------------------------------------- helpers

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
V = len(ALPHABET) + 1  # + eos; the mask id is V


class CharTokenizer:
    """One token per character (so tokens == bytes); EOS is the last real id."""

    eos_id = V - 1

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]


def prefers(token: str, strength: float):
    """A context-free model: logit ``strength`` for ``token``, 0 for the other V-1 tokens.
    Every position costs c_tok = log(e^s + V - 1) - s (that token) or log(e^s + V - 1)."""
    idx = ALPHABET.index(token)

    def model(ids, attention_mask=None):
        logits = torch.zeros(*ids.shape, V)
        logits[..., idx] = strength
        return logits

    return model


def uniform(ids, attention_mask=None):
    return torch.zeros(*ids.shape, V)


def ex(context, choices, label):
    return Example(context, list(choices), label)


TEXTS = [
    "\n\n".join(
        f"doc{d} paragraph {p}: " + " ".join(f"d{d}w{(p * 3 + k) % 23}" for k in range(40))
        for p in range(3)
    )
    for d in range(6)
]


@pytest.fixture(scope="module")
def tokenizer():
    extra = ["the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."] * 3
    return train_tokenizer(TEXTS + extra + [t.upper() for t in TEXTS], 300)


def tiny(tokenizer, causal: bool, max_seq_len: int = 256) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=32, n_heads=2, d_ff=64, vocab_size=tokenizer.vocab_size,
                      max_seq_len=max_seq_len, attention="causal" if causal else "bidirectional")
    return Transformer(cfg).eval()


def save_checkpoint(model: Transformer, tokenizer, run_dir, with_tokenizer=True):
    (run_dir / "checkpoints").mkdir(parents=True)
    path = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "lldiff": {"model_config": dict(model.cfg.__dict__)}}, path)
    if with_tokenizer:
        tokenizer.save(run_dir / "tokenizer.json")
    return path


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
    examples = [ex("The sky is", [" blue", " green", " red"], 0), ex("", ["x", "y"], 1)]
    examples[1].meta["id"] = "q2"
    save_jsonl_task(tmp_path / "t.jsonl", examples)
    loaded = load_jsonl_task(tmp_path / "t.jsonl")
    assert loaded == examples
    assert loaded[1].meta == {"id": "q2"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"context": "a", "choices": ["x", "y"], "label": 0', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"context": "a", "choices": ["x", "y"]}', "missing key"),
        ('{"context": "a", "choices": ["x", "y"], "label": 2}', "out of range"),
        ('{"context": "a", "choices": ["x", "y"], "label": -1}', "out of range"),
        ('{"context": "a", "choices": ["x"], "label": 0}', "at least 2"),
        ('{"context": "a", "choices": ["x", ""], "label": 0}', "empty"),
        ('{"context": 3, "choices": ["x", "y"], "label": 0}', "'context' must be a string"),
        ('{"context": "a", "choices": ["x", "y"], "label": true}', "must be an integer"),
        ('{"context": "a", "choices": "xy", "label": 0}', "list of strings"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    good = json.dumps({"context": "c", "choices": ["a", "b"], "label": 1})
    path = tmp_path / "task.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad}\n")  # blank line 2 is skipped; the bad one is line 4
    with pytest.raises(ValueError, match=message) as info:
        load_jsonl_task(path)
    assert f"{path}:4:" in str(info.value)


def test_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl_task(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl_task(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- built-in task


def test_heldout_task_structure_and_determinism():
    task = build_heldout_task(TEXTS, n_examples=8, context_chars=60, continuation_chars=30, n_choices=4, seed=1)
    assert len(task) == 8
    assert task == build_heldout_task(TEXTS, n_examples=8, context_chars=60, continuation_chars=30,
                                      n_choices=4, seed=1)
    assert task != build_heldout_task(TEXTS, n_examples=8, context_chars=60, continuation_chars=30,
                                      n_choices=4, seed=2)
    paragraphs = [p for t in TEXTS for p in t.split("\n\n")]
    labels = set()
    for e in task:
        assert len(e.choices) == 4 and 0 <= e.label < 4
        labels.add(e.label)
        truth = e.choices[e.label]
        source = [p for p in paragraphs if p.startswith(e.context + truth)]
        assert source, "context + true continuation is the start of a paragraph"
        assert len(e.context) <= 60 and 15 <= len(truth) <= 30
        assert truth[0].isspace() and not e.context[-1].isspace()  # the space belongs to the choice
        assert len(set(e.choices)) == 4  # distractors differ from the truth and each other
        doc = source[0].split(" ")[0][3:]  # "doc{d}"
        for j, c in enumerate(e.choices):
            if j != e.label:
                assert 15 <= len(c) <= 30
                assert f"d{doc}w" not in c  # distractors come from other documents
    assert len(labels) > 1


def test_heldout_task_errors():
    with pytest.raises(ValueError, match="at least 2 documents"):
        build_heldout_task(TEXTS[:1], 3)
    with pytest.raises(ValueError, match="no paragraph"):
        build_heldout_task(TEXTS, 3, context_chars=5000)
    with pytest.raises(ValueError, match="n_choices"):
        build_heldout_task(TEXTS, 3, n_choices=1)


# ----------------------------------------------------------------------------- scoring


def test_score_choices_calls_scorer_per_choice():
    calls = []

    def scorer(context, choice):
        calls.append((context.tolist(), choice.tolist()))
        return -float(len(choice))

    assert score_choices(scorer, [5, 6], [[1], [1, 2, 3]]) == [-1.0, -3.0]
    assert calls == [([5, 6], [1]), ([5, 6], [1, 2, 3])]


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_model_that_knows_the_answer_scores_one(objective):
    # the true choice is all 'a'; distractors contain no 'a', so every draw scores them lower
    examples = [
        ex("xyz", ["aaaa", "bbbb", "cbcb"], 0),
        ex("q", ["bcd", "aaa", "ddd"], 1),
        ex("", ["bc", "cd", "aa"], 2),
        ex("hello", ["zzzzz", "bcbcb", "yyyyy", "aaaaa"], 3),
    ]
    res = evaluate_multiple_choice(prefers("a", 5.0), CharTokenizer(), examples, objective=objective,
                                   mask_id=V, n_mc=8)
    assert res["accuracy"] == 1.0 and res["accuracy_norm"] == 1.0
    assert res["n_examples"] == 4 and res["objective"] == objective
    assert [p["pred"] for p in res["predictions"]] == [0, 1, 2, 3]
    assert res["n_mc"] == (8 if objective == "mdm" else None)
    json.dumps(res)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_uniform_model_prefers_short_choices_unless_normalised(objective):
    # uniform: log p = -n_tokens * log V exactly (for the MDM estimator too); per byte all
    # choices tie (1 token per byte) and ties go to index 0
    examples = [
        ex("a", ["bbb", "b", "bb"], 1),  # shortest is the label
        ex("a", ["bb", "bbbb", "b"], 0),  # shortest is 2
        ex("a", ["b", "bbb"], 0),  # shortest is 0
        ex("a", ["bbbb", "bbb", "bb", "b"], 2),  # shortest is 3
    ]
    res = evaluate_multiple_choice(uniform, CharTokenizer(), examples, objective=objective, mask_id=V, n_mc=4)
    assert [p["pred"] for p in res["predictions"]] == [1, 2, 0, 3]
    assert res["accuracy"] == 2 / 4
    assert [p["pred_norm"] for p in res["predictions"]] == [0, 0, 0, 0]
    assert res["accuracy_norm"] == 2 / 4
    first = res["predictions"][0]
    assert first["loglik"] == pytest.approx([-3 * math.log(V), -math.log(V), -2 * math.log(V)], rel=1e-5)
    assert first["loglik_norm"] == pytest.approx([-math.log(V)] * 3, rel=1e-5)
    assert first["n_tokens"] == first["n_bytes"] == [3, 1, 2]


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_length_normalisation_changes_the_decision(objective):
    # logit 2 for 'a': c_a = log(e^2 + 27) - 2 ~ 1.54 nats, c_b = c_a + 2 ~ 3.54 nats.
    # "b" costs 3.54 in total < "aaa" 4.61, but per byte "aaa" (1.54) beats "b" (3.54).
    z = math.log(math.exp(2.0) + V - 1)
    c_a, c_b = z - 2.0, z
    res = evaluate_multiple_choice(prefers("a", 2.0), CharTokenizer(), [ex("z", ["b", "aaa"], 1)],
                                   objective=objective, mask_id=V, n_mc=4)
    p = res["predictions"][0]
    assert p["loglik"] == pytest.approx([-c_b, -3 * c_a], rel=1e-5)
    assert p["pred"] == 0 and p["pred_norm"] == 1
    assert res["accuracy"] == 0.0 and res["accuracy_norm"] == 1.0


def test_mdm_uses_common_random_numbers_per_example():
    seen = []

    def model(ids, attention_mask=None):
        seen.append(ids.clone())
        return uniform(ids)

    scorer = mdm_scorer(model, mask_id=V, n_mc=3, seed=7)
    context = torch.tensor([1, 2])
    scorer(context, torch.tensor([3, 4, 5, 6]))
    scorer(context, torch.tensor([7, 8, 9, 10]))
    # same seed, same length: the same positions are masked for both choices
    assert torch.equal(seen[0] == V, seen[1] == V)


def test_cfg_on_ar_is_refused_and_objective_checked(tokenizer):
    with pytest.raises(ValueError, match="MDM checkpoints only"):
        evaluate_multiple_choice(uniform, CharTokenizer(), [ex("a", ["b", "c"], 0)], objective="ar", cfg_scale=1.0)
    with pytest.raises(ValueError, match="AR model"):
        evaluate_multiple_choice(tiny(tokenizer, causal=True), tokenizer, [ex("a", ["b", "c"], 0)], objective="mdm")
    with pytest.raises(ValueError, match="non-empty prompt"):
        evaluate_multiple_choice(uniform, CharTokenizer(), [ex("", ["b", "c"], 0)], objective="ar",
                                 boundary_token=False)


# ----------------------------------------------------------------------------- real models


def test_ar_transformer_end_to_end_matches_ar_loglik(tokenizer):
    model = tiny(tokenizer, causal=True)
    examples = build_heldout_task(TEXTS, n_examples=3, context_chars=60, continuation_chars=20, n_choices=3)
    res = evaluate_multiple_choice(model, tokenizer, examples)
    assert res["objective"] == "ar" and res["n_examples"] == 3 and 0 <= res["accuracy"] <= 1
    e, p = examples[0], res["predictions"][0]
    prompt = torch.tensor([tokenizer.eos_id] + tokenizer.encode(e.context))
    want = [float(ar_loglik(model, [prompt], [torch.tensor(tokenizer.encode(c))])[0]) for c in e.choices]
    assert p["loglik"] == pytest.approx(want, rel=1e-5)
    assert p["pred"] == max(range(3), key=lambda j: want[j])


def test_mdm_transformer_end_to_end_is_reproducible(tokenizer):
    model = tiny(tokenizer, causal=False)
    examples = build_heldout_task(TEXTS, n_examples=3, context_chars=60, continuation_chars=20, n_choices=3)
    res = evaluate_multiple_choice(model, tokenizer, examples, n_mc=4, batch_size=3, seed=5)
    assert res["objective"] == "mdm" and res["n_mc"] == 4
    assert all(math.isfinite(x) and x < 0 for p in res["predictions"] for x in p["loglik"])
    again = evaluate_multiple_choice(model, tokenizer, examples, n_mc=4, batch_size=3, seed=5)
    assert again["predictions"] == res["predictions"]
    # an example's scores do not depend on the other examples (--limit)
    alone = evaluate_multiple_choice(model, tokenizer, examples[:1], n_mc=4, batch_size=3, seed=5)
    assert alone["predictions"][0] == res["predictions"][0]
    other = evaluate_multiple_choice(model, tokenizer, examples, n_mc=4, batch_size=3, seed=6)
    assert other["predictions"][0]["loglik"] != res["predictions"][0]["loglik"]
    guided = evaluate_multiple_choice(model, tokenizer, examples[:1], n_mc=4, cfg_scale=1.0)
    assert guided["cfg_scale"] == 1.0


def test_long_context_is_truncated_from_the_left(tokenizer):
    model = tiny(tokenizer, causal=True, max_seq_len=16)
    examples = [ex(" ".join(["d1w1"] * 40), [" d1w2", " d1w3"], 0)]
    res = evaluate_multiple_choice(model, tokenizer, examples)
    assert res["n_truncated"] == 2


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    save_jsonl_task(path, [ex("doc1 paragraph", [" 0: d1w7", " 2: d1w9", " 9"], 0),
                           ex("d2w3 d2w4", [" d2w5", " d3w1 d3w2"], 0),
                           ex("", ["d1w1", "doc"], 1)])
    return path


@pytest.mark.parametrize("causal", [False, True])
def test_cli_end_to_end(tmp_path, tokenizer, task_file, capsys, causal):
    ckpt = save_checkpoint(tiny(tokenizer, causal), tokenizer, tmp_path / "run")
    out = tmp_path / "results" / "r.json"
    n_mc = [] if causal else ["--n-mc", "4"]  # an AR's likelihood is exact: --n-mc is refused there
    res = main(["--ckpt", str(ckpt), "--task", str(task_file), *n_mc, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "accuracy_norm" in printed
    assert f"objective: {'ar' if causal else 'mdm'}" in printed
    assert ("n_mc: exact" if causal else "n_mc: 4") in printed and "examples: 3" in printed
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == res["accuracy"] and saved["n_examples"] == 3
    assert len(saved["predictions"]) == 3 and saved["normalisation"].startswith("loglik / utf8")
    limited = main(["--ckpt", str(ckpt), "--task", str(task_file), *n_mc, "--limit", "1"])
    assert limited["n_examples"] == 1


def test_cli_builtin_task_on_files_corpus(tmp_path, tokenizer, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS))  # 18 distinct paragraphs = documents (choices need 4 documents)
    ckpt = save_checkpoint(tiny(tokenizer, True), tokenizer, tmp_path / "run")
    res = main(["--ckpt", str(ckpt), "--task", "heldout-continuation", "--corpus", "files", "--paths", str(corpus),
                "--val-fraction", "0.5", "--n-examples", "3", "--context-chars", "60", "--continuation-chars", "20"])
    assert res["n_examples"] == 3 and res["task"] == "heldout-continuation"
    assert res["task_args"]["corpus"] == "files"


def test_cli_bad_input(tmp_path, tokenizer, task_file, capsys):
    ar_ckpt = save_checkpoint(tiny(tokenizer, True), tokenizer, tmp_path / "ar")
    no_tok = save_checkpoint(tiny(tokenizer, False), tokenizer, tmp_path / "notok", with_tokenizer=False)
    cases = [
        (["--ckpt", str(ar_ckpt), "--task", str(task_file), "--cfg-scale", "1.0"], "AR checkpoint"),
        (["--ckpt", str(tmp_path / "missing.ckpt"), "--task", str(task_file)], "does not exist"),
        (["--ckpt", str(ar_ckpt), "--task", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--ckpt", str(ar_ckpt), "--task", "hellaswag"], "unknown task"),
        (["--ckpt", str(no_tok), "--task", str(task_file)], "--tokenizer"),
        (["--ckpt", str(ar_ckpt), "--task", str(task_file), "--n-mc", "0"], "--n-mc"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv
    # the tokenizer can be given explicitly
    res = main(["--ckpt", str(no_tok), "--task", str(task_file), "--n-mc", "2",
                "--tokenizer", str(tmp_path / "ar" / "tokenizer.json")])
    assert res["objective"] == "mdm"
