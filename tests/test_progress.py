"""Progress and speed a user sees (issue 24 item 15): `lldiff eval` shows a bar while it scores,
`generate`/`chat` rate the answers' real tokens, `/reset` says what it did."""

from __future__ import annotations

import io
import json
import re
import sys

from lldiff.objectives.common.decoding import Completion, DecodeOptions
from lldiff.generate import stats


def test_speed_counts_the_answers_real_tokens_not_the_budget():
    one_token = Completion(answers=[[7]], model_calls=64, tokens_processed=64 * 80)
    line = stats(one_token, DecodeOptions(length=64), 1, 0.5)
    assert line.startswith("64 model calls, 2 tokens/s (1 answer tokens in 0.50 s), 80.0 tokens processed per "
                           "answer position")
    two_prompts = Completion(answers=[[1, 2, 3], []], model_calls=8, tokens_processed=160)
    assert "6 tokens/s (3 answer tokens in 0.50 s), 10.0 tokens processed" in stats(two_prompts, DecodeOptions(length=8), 2, 0.5)
    assert "(2 answer tokens" in stats(one_token, DecodeOptions(length=64), 1, 0.5, answer_tokens=2)  # chat: up to end of turn


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chat_reset_says_so_and_stats_match_the_answer(tiny_runs, capsys):
    from lldiff import chat

    stdin, stdout = _Terminal("hello\n/reset\nagain\n/quit\n"), io.StringIO()
    chat.main(["--ckpt", str(tiny_runs["ar"]), "--length", "8"], stdin=stdin, stdout=stdout)
    text = stdout.getvalue()
    assert "lldiff chat: conversation cleared" in text
    assert text.index("model>") < text.index("conversation cleared") < text.rindex("model>")
    for line in capsys.readouterr().err.strip().splitlines():
        tokens = int(re.search(r"\((\d+) answer tokens in", line).group(1))
        assert 0 <= tokens <= 8


def test_eval_shows_a_progress_bar_on_a_terminal_with_items_and_rate(tiny_runs, tmp_path, capsys, monkeypatch):
    from lldiff.evaluation.cli import main

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": "the quick brown", "choices": [" fox", " dog"], "label": 0}) + "\n"
                            for _ in range(3)))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main(["--ckpt", str(tiny_runs["ar"]), "--task", str(task)])
    assert re.search(r"lldiff eval: 100%.*3/3 \[.*(example/s|s/example)", terminal.getvalue()), terminal.getvalue()
    monkeypatch.undo()
    main(["--ckpt", str(tiny_runs["ar"]), "--task", str(task)])
    assert capsys.readouterr().err == ""  # redirected: no bar
