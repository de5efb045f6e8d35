"""lm-eval-harness adapter: a local multiple-choice task run through the harness, offline."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from lldiff.evaluation.cli import main as eval_main  # noqa: E402
from lldiff.evaluation.lm_eval_adapter import LLDiffLM  # noqa: E402
from lldiff.objectives.ar.likelihood import ar_loglik

TASK_YAML = """task: lldiff_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def harness_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    data = root / "toy.jsonl"
    rows = [{"context": "the quick brown fox", "choices": [" jumps over", " sells sea"], "label": 0},
            {"context": "she sells sea", "choices": [" swans swam", " shells on"], "label": 1},
            {"context": "red lorry yellow", "choices": [" lorry red", " good boy"], "label": 0}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "lldiff_toy_mc.yaml").write_text(TASK_YAML.format(data=data))
    return root


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_harness_runs_a_multiple_choice_task(objective, tiny_runs, harness_task):
    lm = LLDiffLM(ckpt=str(tiny_runs[objective]), n_mc=4)
    manager = TaskManager(include_path=str(harness_task))
    out = lm_eval.simple_evaluate(model=lm, tasks=["lldiff_toy_mc"], task_manager=manager)
    acc = out["results"]["lldiff_toy_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_ar_loglikelihood_is_the_exact_chain_rule(tiny_runs):
    lm = LLDiffLM(ckpt=str(tiny_runs["ar"]))

    class Request:
        args = ("the quick brown", " fox jumps")

    (loglik, greedy), = lm.loglikelihood([Request()])
    prompt = torch.tensor([lm.tok.eos_id] + lm.tok.encode("the quick brown"))
    answer = torch.tensor(lm.tok.encode(" fox jumps"))
    assert loglik == pytest.approx(float(ar_loglik(lm.model, prompt[None], answer[None])[0]), abs=1e-5)
    assert loglik < 0 and isinstance(greedy, bool)


def test_generate_until_stops_at_the_stop_sequence(tiny_runs):
    for objective in ("ar", "mdm"):
        lm = LLDiffLM(ckpt=str(tiny_runs[objective]), gen_length=16, block_length=8)

        class Request:
            args = ("the quick", {"until": ["."], "max_gen_toks": 16})

        (text,) = lm.generate_until([Request()])
        assert isinstance(text, str) and "." not in text


def test_rolling_loglikelihood_is_finite_and_negative(tiny_runs):
    for objective in ("ar", "mdm"):
        lm = LLDiffLM(ckpt=str(tiny_runs[objective]), n_mc=4)

        class Request:
            args = ("seven silver swans swam slowly south.",)

        (value,) = lm.loglikelihood_rolling([Request()])
        assert math.isfinite(value) and value < 0


def test_cfg_on_ar_checkpoint_is_refused(tiny_runs):
    with pytest.raises(ValueError, match="cfg_scale applies to MDM"):
        LLDiffLM(ckpt=str(tiny_runs["ar"]), cfg_scale=1.0)


def test_lldiff_eval_harness_route(tiny_runs, harness_task, capsys, tmp_path):
    out = tmp_path / "r.json"
    eval_main(["--ckpt", str(tiny_runs["mdm"]), "--harness-tasks", "lldiff_toy_mc", "--harness-include",
               str(harness_task), "--n-mc", "4", "--out", str(out)])
    assert "lldiff_toy_mc: acc,none: " in capsys.readouterr().out
    assert json.loads(out.read_text())["objective"] == "mdm"
