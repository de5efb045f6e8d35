"""`lldiff generate` / `chat` / `eval`, the lm-eval adapter and exact match on a real (tiny) BD3
checkpoint; options of other objectives' decoders refused by asking the registry."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from lldiff import chat, generate
from lldiff.checkpoint import load_model
from lldiff.evaluation.cli import main as eval_main
from lldiff.evaluation.exact_match import answers_for


@pytest.fixture
def bd3_ckpt(tiny_bd3_run) -> Path:
    """The session's tiny BD3 (blocks of 4; tests/conftest.py), fitted once for every test file."""
    return tiny_bd3_run


def test_the_checkpoint_is_a_bd3_model(bd3_ckpt):
    loaded = load_model(bd3_ckpt, expect="bd3-4")
    assert loaded.objective.name == "bd3-4" and loaded.model.cfg.attention == "block"
    with pytest.raises(ValueError, match="BD3-4 model"):
        load_model(bd3_ckpt, expect="mdm")


@pytest.mark.parametrize("extra", [(), ("--steps-per-block", "2"), ("--remasking", "threshold", "--threshold", "0.5"),
                                   ("--remasking", "random", "--temperature", "1.0", "--seed", "3"),
                                   ("--cfg-scale", "1.0", "--forbid-eos")])
def test_generate_on_a_bd3_checkpoint(bd3_ckpt, capsys, extra):
    generate.main(["--ckpt", str(bd3_ckpt), "--prompt", "the quick", "--prompt", "she sells sea shells",
                   "--max-new-tokens", "10", *extra])
    out = capsys.readouterr().out
    assert out.startswith("the quick") and "she sells sea shells" in out
    calls = int(re.search(r"BD3-4 tiny-0.1M: 2 prompt\(s\), (\d+) model calls", out).group(1))
    per_block = 2 if "--steps-per-block" in extra else 4
    assert 1 <= calls <= 4 * per_block  # at most 4 blocks hold 10 new tokens, whatever the prompts' alignment


@pytest.mark.parametrize("which,argv,named", [
    ("bd3", ("--gen-length", "16"), "--gen-length do(es) not apply to a BD3-4 checkpoint"),
    ("bd3", ("--steps", "4"), "--steps do(es) not apply to a BD3-4 checkpoint"),
    ("bd3", ("--block-length", "8", "--gen-length", "16"), "--block-length, --gen-length do(es) not apply to a BD3-4"),
    ("bd3", ("--top-k", "5", "--temperature", "1"), "--top-k do(es) not apply to a BD3-4 checkpoint"),
    ("mdm", ("--steps-per-block", "2"), "--steps-per-block do(es) not apply to an MDM checkpoint"),
    ("mdm", ("--max-new-tokens", "8"), "--max-new-tokens do(es) not apply to an MDM checkpoint"),
    ("ar", ("--steps-per-block", "2"), "--steps-per-block do(es) not apply to an AR checkpoint"),
])
def test_generate_refuses_options_of_other_decoders(bd3_ckpt, tiny_runs, capsys, which, argv, named):
    ckpt = bd3_ckpt if which == "bd3" else tiny_runs[which]
    with pytest.raises(SystemExit) as info:
        generate.main(["--ckpt", str(ckpt), "--prompt", "the", *argv])
    assert info.value.code == 2
    assert named in capsys.readouterr().err


def test_steps_per_block_is_refused_with_threshold_before_loading(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", "/nonexistent/x.ckpt", "--prompt", "a", "--remasking", "threshold",
                       "--steps-per-block", "2"])
    assert "--steps-per-block 2 has no effect with --remasking threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.main(["--ckpt", "/nonexistent/x.ckpt", "--message", "a", "--steps-per-block", "0"])
    assert "--steps-per-block must be >= 1, got 0" in capsys.readouterr().err


def test_chat_on_a_bd3_checkpoint(bd3_ckpt, capsys, monkeypatch):
    seen = []
    real = chat.complete
    monkeypatch.setattr(chat, "complete", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    chat.main(["--ckpt", str(bd3_ckpt), "--message", "hi", "--message", "again", "--length", "6",
               "--steps-per-block", "2", "--remasking", "random", "--temperature", "0.5"])
    assert len(capsys.readouterr().out.strip().splitlines()) <= 2
    assert (seen[-1].length, seen[-1].steps_per_block, seen[-1].remasking, seen[-1].block_length) == (6, 2, "random",
                                                                                                      None)
    with pytest.raises(SystemExit):
        chat.main(["--ckpt", str(bd3_ckpt), "--message", "hi", "--block-length", "4", "--length", "8"])
    assert "--block-length do(es) not apply to a BD3-4 checkpoint" in capsys.readouterr().err


@pytest.fixture()
def task_file(tmp_path):
    rows = [{"context": "the quick brown fox", "choices": [" jumps over", " sells sea"], "label": 0},
            {"context": "she sells sea", "choices": [" swans swam", " shells on"], "label": 1}]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_on_a_bd3_checkpoint(bd3_ckpt, task_file, capsys, tmp_path):
    out = tmp_path / "r.json"
    results = eval_main(["--ckpt", str(bd3_ckpt), "--task", str(task_file), "--n-mc", "3", "--batch-size", "2",
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert "objective: bd3-4  n_mc: 3" in printed
    assert results["objective"] == "bd3-4" and json.loads(out.read_text())["n_mc"] == 3
    assert all(math.isfinite(x) and x < 0 for p in results["predictions"] for x in p["loglik"])
    with pytest.raises(SystemExit):
        eval_main(["--ckpt", str(bd3_ckpt), "--task", str(task_file), "--cfg-scale", "1"])
    err = capsys.readouterr().err
    assert "--cfg-scale do(es) not apply to a BD3-4 checkpoint" in err and "applies to MDM checkpoints" in err


def test_exact_match_infill_sees_the_left_context_only(bd3_ckpt):
    loaded = load_model(bd3_ckpt)
    items = [{"prefix": "the quick brown", "answer": " fox", "suffix": " jumps over"},
             {"prefix": "she sells", "answer": " sea shells", "suffix": " on the sea shore."}]
    answers = answers_for(loaded.model, loaded.tokenizer, items)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    changed = [{**item, "suffix": " something else entirely"} for item in items]
    assert answers_for(loaded.model, loaded.tokenizer, changed) == answers  # the suffix is never seen


def test_lm_eval_adapter_on_a_bd3_checkpoint(bd3_ckpt):
    pytest.importorskip("lm_eval")
    from lldiff.evaluation.lm_eval_adapter import LLDiffLM
    from lldiff.objectives.bd3.likelihood import bd3_conditional_loglik

    lm = LLDiffLM(ckpt=str(bd3_ckpt), n_mc=4, gen_length=9, steps_per_block=2)

    class Score:
        args = ("the quick brown", " fox jumps")

    class Rolling:
        args = ("seven silver swans swam slowly south.",)

    class Until:
        args = ("the quick", {"until": ["."], "max_gen_toks": 9})

    (loglik, greedy), = lm.loglikelihood([Score()])
    prompt = torch.tensor([lm.tok.eos_id] + lm.tok.encode("the quick brown"))
    answer = torch.tensor(lm.tok.encode(" fox jumps"))
    want = bd3_conditional_loglik(lm.model, [prompt], [answer], mask_id=lm.model.cfg.mask_id, block_size=4, n_mc=4,
                                  generator=torch.Generator().manual_seed(0))
    assert loglik == pytest.approx(float(want[0]), rel=1e-5) and loglik < 0 and isinstance(greedy, bool)
    (rolling,) = lm.loglikelihood_rolling([Rolling()])
    assert math.isfinite(rolling) and rolling < 0
    (text,) = lm.generate_until([Until()])
    assert isinstance(text, str) and "." not in text
    with pytest.raises(ValueError, match="cfg_scale applies to MDM checkpoints only"):
        LLDiffLM(ckpt=str(bd3_ckpt), cfg_scale=1.0)


def test_bd3_no_cache_gives_the_cached_answer(bd3_ckpt, capsys):
    """BD3's KV cache is exact: --no-cache decodes the same tokens, with more positions fed."""
    from lldiff.generate import main as generate_main

    answers = []
    for extra in ((), ("--no-cache",)):
        generate_main(["--ckpt", str(bd3_ckpt), "--prompt", "def main(", "--max-new-tokens", "12", *extra])
        out = capsys.readouterr().out.splitlines()
        answers.append([line for line in out if "model calls" not in line])  # the answer, not the speed line
    assert answers[0] == answers[1] and answers[0]
