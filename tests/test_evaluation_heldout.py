"""The built-in ``heldout-continuation`` task: a context-free guess is at chance, the task is
built from the checkpoint's own run's validation data, and ``lldiff eval`` reports the
context-free unigram baseline next to the model's accuracy."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from lldiff.config import ModelConfig
from lldiff.data.corpora import Document, split_paragraphs
from lldiff.data.split import split_documents
from lldiff.data.tokenizer import train_tokenizer
from lldiff.evaluation.cli import main
from lldiff.evaluation.tasks import (
    UnigramScorer,
    build_heldout_task,
    find_run_config,
    heldout_texts,
    read_run_data,
    unigram_baseline,
)
from lldiff.model import Transformer

N_CHOICES = 4

# ----------------------------------------------------------------------------- helpers


def fortune_texts(n_files: int = 300, seed: int = 0) -> list[str]:
    """A synthetic, offline "fortunes" corpus: each document is a fortune-cookie file of 4-12
    fortunes separated by blank lines, most of them one-liners, some long (invented words,
    Zipf-distributed, lines wrapped at 64 characters). Like verse, most paragraphs are short,
    which is what made the old distractors (cut short at paragraph ends) likelier than the
    truth under a unigram scorer."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "en", "or", "th", "qu", "ba", "de", "fi", "a", "e"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1500)})
    weights = [1 / (r + 1) for r in range(len(vocab))]
    docs = []
    for _ in range(n_files):
        fortunes = []
        for _ in range(rng.randint(4, 12)):
            words: list[str] = []
            for _ in range(rng.choice([1, 1, 1, 2, 8])):
                s = rng.choices(vocab, weights, k=rng.randint(3, 14))
                words += [s[0].capitalize(), *s[1:-1], s[-1] + rng.choice(".!?;,")]
            lines, line = [], ""
            for w in words:
                if line and len(line) + len(w) + 1 > 64:
                    lines.append(line)
                    line = w
                else:
                    line = f"{line} {w}" if line else w
            fortunes.append("\n".join(lines + [line]))
        docs.append("\n\n".join(fortunes))
    return docs


def corpus_texts(name: str) -> list[str]:
    if name == "stdlib":  # validation documents of the default 4 MB stdlib corpus, a larger split
        return heldout_texts("stdlib", val_fraction=0.25)
    return fortune_texts()


def unigram_logprob(texts: list[str], units) -> callable:
    """An independent add-one unigram scorer (log-probability of a string, context-free)."""
    counts = Counter(u for t in texts for u in units(t))
    total, distinct = sum(counts.values()), len(counts)
    return lambda s: sum(math.log((counts[u] + 1) / (total + distinct + 1)) for u in units(s))


def chars(s: str) -> list[str]:
    return list(s)


def words(s: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", s)


def accuracy(task, score) -> float:
    """Share of examples where ``score(choice)`` (context ignored) is highest for the label."""
    right = 0
    for e in task:
        values = [score(c) for c in e.choices]
        right += max(range(len(values)), key=lambda j: (values[j], -j)) == e.label
    return right / len(task)


def binomial_interval(n: int, p: float, level: float) -> tuple[float, float]:
    """Central ``level`` interval of Binomial(n, p) / n (exact)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    tail = (1 - level) / 2
    lo, cdf = 0, 0.0
    while cdf + pmf[lo] <= tail:
        cdf += pmf[lo]
        lo += 1
    hi, sf = n, 0.0
    while sf + pmf[hi] <= tail:
        sf += pmf[hi]
        hi -= 1
    return lo / n, hi / n


# ----------------------------------------------------------------------------- chance level


@pytest.fixture(scope="module", params=["stdlib", "fortunes"])
def corpus(request):
    texts = corpus_texts(request.param)
    return request.param, texts, build_heldout_task(texts, n_examples=400, n_choices=N_CHOICES, seed=0)


def test_context_free_unigram_scorers_are_at_chance(corpus):
    """On both corpora a unigram scorer that ignores the context is right as often as a coin
    with 1/4: characters and words, total and per byte, counts from the held-out text or from
    other text, and pure length rules, each within the binomial interval around 1/4 (99%
    for the whole family of rules: Bonferroni, 1 - 0.01/7 each)."""
    name, texts, task = corpus
    n = len(task)
    assert n >= 300, (name, n)
    char = unigram_logprob(texts, chars)
    word = unigram_logprob(texts, words)
    other = unigram_logprob(corpus_texts("fortunes" if name == "stdlib" else "stdlib")[:40], chars)
    rules = {
        "char unigram": char,
        "char unigram per byte": lambda c: char(c) / len(c.encode()),
        "word unigram": word,
        "word unigram per byte": lambda c: word(c) / len(c.encode()),
        "char unigram, counts of other text": other,
        "shortest choice": lambda c: -len(c),
        "longest choice": len,
    }
    lo, hi = binomial_interval(n, 1 / N_CHOICES, 1 - 0.01 / len(rules))
    measured = {rule: accuracy(task, f) for rule, f in rules.items()}
    print(f"{name}: n={n}, interval [{lo:.3f}, {hi:.3f}]:",
          ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
    outside = {k: v for k, v in measured.items() if not lo <= v <= hi}
    assert not outside, f"{name}: context-free accuracy outside [{lo:.3f}, {hi:.3f}]: {outside}"


def test_character_unigram_is_exactly_at_chance(corpus):
    """The truth's rank under the character unigram cycles through 0..3 in every block of 4
    examples, so that scorer (the one ``lldiff eval`` reports) has no sampling noise."""
    _, texts, task = corpus
    res = unigram_baseline(task, UnigramScorer(texts, "char"))
    assert abs(res["accuracy"] * len(task) - len(task) / N_CHOICES) <= 1
    assert res["chance"] == 1 / N_CHOICES and res["n_examples"] == len(task)
    assert res["accuracy"] == accuracy(task, unigram_logprob(texts, chars))  # the independent scorer agrees
    labels = Counter(e.label for e in task)
    assert len(labels) == N_CHOICES and min(labels.values()) > len(task) / N_CHOICES / 2


def test_choices_are_continuations_of_other_documents(corpus):
    _, texts, task = corpus
    paragraphs = {}  # paragraph -> document index
    for d, t in enumerate(texts):
        for p in split_paragraphs(t):
            paragraphs.setdefault(p, d)
    truths = set()
    for e in task[:60]:
        assert len(set(e.choices)) == N_CHOICES and 0 <= e.label < N_CHOICES
        docs = set()
        for j, c in enumerate(e.choices):
            assert c[0].isspace() and not c[-1].isspace() and 25 <= len(c) <= 50
            sources = [d for p, d in paragraphs.items() if (e.context + c if j == e.label else c) in p]
            assert sources, "every choice is text of a held-out paragraph"
            if j == e.label:
                truths.add(e.context + c)
                assert any(p.startswith(e.context + c) for p in paragraphs), "truth continues the context"
            docs.add(sources[0])
        assert len(docs) == N_CHOICES, "the choices come from different documents"
    assert len(truths) == len(task[:60]), "a paragraph is the truth of one example at most"


def test_deterministic_and_seeded():
    texts = fortune_texts(60)
    a = build_heldout_task(texts, n_examples=40, seed=3)
    assert a == build_heldout_task(texts, n_examples=40, seed=3)
    assert a != build_heldout_task(texts, n_examples=40, seed=4)
    assert a[:10] == build_heldout_task(texts, n_examples=10, seed=3)


def test_bad_input_names_value_and_what_is_allowed():
    texts = fortune_texts(10)
    for kwargs, message in [
        ({"n_examples": 0}, "n_examples must be a positive integer, got 0"),
        ({"context_chars": "200"}, "context_chars must be a positive integer, got '200'"),
        ({"n_choices": 1}, "n_choices must be an integer >= 2, got 1"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"n_choices": 11}, "come from 9 document(s), but n_choices=11 needs 11 different documents"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            build_heldout_task(texts, **kwargs)
    with pytest.raises(ValueError, match="texts must be strings; entry 1 is a int"):
        build_heldout_task(["a", 3])
    with pytest.raises(ValueError, match=r"unit must be one of \('char', 'word'\) or a callable.*'bytes'"):
        UnigramScorer(texts, unit="bytes")


# ----------------------------------------------------------------------------- the run's own data


def _tokenizer_and_model(texts):
    tokenizer = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=32, n_heads=2, d_ff=64, vocab_size=tokenizer.vocab_size,
                      max_seq_len=256, attention="causal")
    return tokenizer, Transformer(cfg).eval()


@pytest.fixture(scope="module")
def run_factory(tmp_path_factory):
    """``make(data)``: a run directory like ``lldiff fit`` writes (``config.yaml`` with the
    data section ``data``, ``tokenizer.json``, ``checkpoints/last.ckpt``); ``data=None``: a
    bare checkpoint with no config."""
    tokenizer, model = _tokenizer_and_model(fortune_texts(40, seed=9))
    root = tmp_path_factory.mktemp("runs")

    def make(data, name):
        run = root / name
        (run / "checkpoints").mkdir(parents=True)
        ckpt = run / "checkpoints" / "last.ckpt"
        torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                    "lldiff": {"model_config": dict(model.cfg.__dict__)}}, ckpt)
        tokenizer.save(run / "tokenizer.json")
        if data is not None:
            config = {"seed_everything": 1, "model": {"class_path": "lldiff.objectives.ar.modules.AutoregressiveLM"}, "data": data}
            (run / "config.yaml").write_text(yaml.safe_dump(config))
        return ckpt

    return make


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    a, b = d / "a.txt", d / "b.txt"
    a.write_text("\n\n".join(fortune_texts(80, seed=1)))
    b.write_text("\n\n".join(fortune_texts(80, seed=2)))
    return a, b


def pretrain_data(paths, val_fraction=0.3, **extra):
    return {"class_path": "lldiff.data.PretrainDataModule",
            "init_args": {"source": "files", "paths": [str(p) for p in paths], "max_bytes": None,
                          "val_fraction": val_fraction, "vocab_size": 300, **extra}}


TASK = ["--task", "heldout-continuation", "--n-examples", "12", "--context-chars", "80",
        "--continuation-chars", "30"]


def eval_run(ckpt, *extra, capsys):
    res = main(["--ckpt", str(ckpt), *TASK, *extra])
    out = capsys.readouterr()
    return res, out.out, [line for line in out.err.splitlines() if line.strip()]


def split_of(path, val_fraction):
    docs = [Document(str(i), p) for i, p in enumerate(split_paragraphs(Path(path).read_text()))]
    train, val = split_documents(docs, val_fraction)
    return [d.text for d in train], [d.text for d in val]


def test_task_comes_from_the_runs_validation_split(run_factory, two_corpora, capsys):
    a, _ = two_corpora
    ckpt = run_factory(pretrain_data([a]), "pretrain-a")
    assert find_run_config(ckpt) == ckpt.parent.parent / "config.yaml"
    assert read_run_data(find_run_config(ckpt)).kind == "pretrain"
    res, _, err = eval_run(ckpt, capsys=capsys)
    assert err == [], "the run's own data: nothing to warn about"
    args = res["task_args"]
    assert args["data_from"] == "run config" and args["corpus"] == "files" and args["paths"] == [str(a)]
    assert args["val_fraction"] == 0.3 and args["run_config"] == str(ckpt.parent.parent / "config.yaml")
    train, val = split_of(a, 0.3)
    task = build_heldout_task(val, n_examples=12, context_chars=80, continuation_chars=30)
    assert res["n_examples"] == len(task) == 12
    assert [p["label"] for p in res["predictions"]] == [e.label for e in task]
    for e in task:  # every choice is validation text, none is training text
        for c in e.choices:
            assert any(c in p for p in val) and not any(c in p for p in train)
    # flags naming the run's own data change nothing and print nothing
    same, _, err = eval_run(ckpt, "--corpus", "files", "--paths", str(a), capsys=capsys)
    assert err == [] and same["predictions"] == res["predictions"]


def test_other_data_on_the_command_line_is_noted(run_factory, two_corpora, capsys):
    a, b = two_corpora
    ckpt = run_factory(pretrain_data([a]), "pretrain-a-flags")
    res, _, err = eval_run(ckpt, "--paths", str(b), capsys=capsys)
    assert len(err) == 1 and "differs from the data this run trained on" in err[0] and str(a) in err[0]
    assert res["task_args"]["data_from"] == "flags" and res["task_args"]["paths"] == [str(b)]
    _, val_b = split_of(b, 0.05)
    labels = [p["label"] for p in res["predictions"]]
    assert labels == [e.label for e in build_heldout_task(val_b, n_examples=12, context_chars=80,
                                                          continuation_chars=30)]
    # a larger validation fraction than the run's brings training documents in: said in one line
    _, _, err = eval_run(ckpt, "--val-fraction", "0.5", capsys=capsys)
    assert len(err) == 1 and "larger than the run's val_fraction 0.3" in err[0]


def test_without_a_run_config_the_corpus_used_is_named(run_factory, two_corpora, capsys):
    a, _ = two_corpora
    ckpt = run_factory(None, "bare")
    res, _, err = eval_run(ckpt, "--paths", str(a), "--val-fraction", "0.3", capsys=capsys)
    assert len(err) == 1 and "no run config (config.yaml)" in err[0] and f"--paths {a}" in err[0]
    assert res["task_args"]["data_from"] == "flags" and res["task_args"]["run_config"] is None
    res, _, err = eval_run(ckpt, "--limit", "2", capsys=capsys)
    assert len(err) == 1 and "uses the default corpus stdlib" in err[0]
    assert res["task_args"]["data_from"] == "default" and res["task_args"]["corpus"] == "stdlib"
    # a data module the task cannot rebuild: said, then the same fallback
    other = run_factory({"class_path": "mypkg.MyData", "init_args": {}}, "other-data")
    res, _, err = eval_run(other, "--paths", str(a), capsys=capsys)
    assert len(err) == 1 and "mypkg.MyData" in err[0] and "PretrainDataModule or SFTDataModule" in err[0]


def test_sft_run_uses_its_held_out_responses(run_factory, tmp_path, capsys):
    docs = [p for t in fortune_texts(60, seed=5) for p in split_paragraphs(t) if len(p) > 130]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell fortune {i}.", "response": r}) + "\n"
                            for i, r in enumerate(docs)))
    data = {"class_path": "lldiff.data.SFTDataModule",
            "init_args": {"train_files": [str(path)], "tokenizer_path": "x", "val_fraction": 0.4}}
    ckpt = run_factory(data, "sft")
    res, _, err = eval_run(ckpt, capsys=capsys)
    assert err == [] and res["task_args"]["corpus"] == "sft" and res["task_args"]["val_fraction"] == 0.4
    from lldiff.data.sft import load_turns, split_turns

    train, val = split_turns(load_turns([path]), 0.4)
    val_text = [t.response for t in val]
    task = build_heldout_task(val_text, n_examples=12, context_chars=80, continuation_chars=30)
    assert [p["label"] for p in res["predictions"]] == [e.label for e in task]
    for e in task:
        assert not any(e.context in t.response for t in train)


def test_bad_run_data_is_one_clear_error(run_factory, tmp_path, capsys):
    missing = run_factory(pretrain_data([tmp_path / "gone.txt"]), "missing-data")
    with pytest.raises(SystemExit) as info:
        main(["--ckpt", str(missing), *TASK])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot read the run's data" in err and "gone.txt" in err
    broken = run_factory(None, "broken-yaml")
    (broken.parent.parent / "config.yaml").write_text("data: [unclosed\n")
    with pytest.raises(SystemExit):
        main(["--ckpt", str(broken), *TASK])
    assert "is not valid YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ckpt", str(missing), *TASK, "--val-fraction", "1.5"])
    assert "--val-fraction must be strictly between 0 and 1, got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ckpt", str(missing), *TASK, "--n-choices", "1"])
    assert "--n-choices must be >= 2, got 1" in capsys.readouterr().err


def test_eval_reports_the_unigram_baseline_beside_accuracy(run_factory, two_corpora, tmp_path, capsys):
    a, _ = two_corpora
    ckpt = run_factory(pretrain_data([a]), "pretrain-report")
    out_file = tmp_path / "r.json"
    res, out, _ = eval_run(ckpt, "--out", str(out_file), capsys=capsys)
    lines = out.splitlines()
    acc_line = next(i for i, line in enumerate(lines) if line.startswith("accuracy:"))
    assert "chance: 0.2500" in lines[acc_line]
    baseline = lines[acc_line + 1]
    assert baseline.startswith("context-free unigram baseline, same examples")
    assert "chars accuracy: 0.2500" in baseline and "model tokens accuracy:" in baseline
    saved = json.loads(out_file.read_text())
    uni = saved["unigram_baseline"]
    assert uni["char"]["accuracy"] == 0.25 and 0 <= uni["token"]["accuracy"] <= 1
    assert len(uni["char"]["preds"]) == saved["n_examples"] == 12
    assert saved["accuracy"] == res["accuracy"] and saved["chance"] == 0.25


def test_jsonl_task_baseline_counts_the_contexts(run_factory, tmp_path, capsys):
    ckpt = run_factory(None, "bare-jsonl")
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "aaa bbb aaa", "choices": [" aaa", " zzz"], "label": 0}) + "\n")
    res = main(["--ckpt", str(ckpt), "--task", str(task)])
    assert res["unigram_baseline"]["counts_from"] == "the task's contexts"
    assert res["unigram_baseline"]["char"]["accuracy"] == 1.0  # 'a' is frequent in the contexts
    assert "task_args" not in res and capsys.readouterr().err == ""


def test_a_real_fit_run_config_is_read(tiny_runs, toy_corpus, capsys):
    """The config.yaml `lldiff fit` writes (LightningCLI's resolved config) names the data."""
    ckpt = tiny_runs["ar"]
    run = read_run_data(find_run_config(ckpt))
    assert run.kind == "pretrain" and run.args["source"] == "files" and run.args["paths"] == [str(toy_corpus)]
    res = main(["--ckpt", str(ckpt), "--task", "heldout-continuation", "--n-examples", "8",
                "--context-chars", "60", "--continuation-chars", "30"])
    assert capsys.readouterr().err == ""
    assert res["task_args"]["data_from"] == "run config" and res["task_args"]["val_fraction"] == 0.05
    assert res["n_examples"] == 8
