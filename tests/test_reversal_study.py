"""The reversal study runs end to end on both tasks (smoke presets) and writes its table,
results, answers, recall curves and TensorBoard scalars; bad input stops it before training."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("reversal_study", REPO / "studies" / "reversal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, labels", [("facts", ("forward", "backward")), ("lines", ("forward", "reversal"))])
def test_reversal_study_smoke_writes_table_results_curves_and_tensorboard(tmp_path, task, labels):
    from lldiff.sweep.figures import read_scalars

    study = load_study()
    out = tmp_path / "study"
    study.main(["--task", task, "--preset", "smoke", "--out", str(out)])
    table = (out / "reversal.md").read_text()
    assert f"| model | {labels[0]} | {labels[1]} |" in table
    assert "| AR, tiny-0.016M, instructions after fine-tuning (this run) |" in table
    assert "| MDM (LLaDA objective), tiny-0.016M, infilling after pre-training, zero-shot (this run) |" in table
    assert "| MDM (LLaDA objective), tiny-0.016M, infilling after fine-tuning (this run) |" in table
    assert "n/a (left context only)" in table  # AR cannot infill a span with text after it
    assert "| LLaDA-8B Instruct (paper) | 48.8 | 42.4 |" in table
    assert "## Pre-training recall plateau" in table
    saved = json.loads((out / "results.json").read_text())
    results = saved["results"]
    assert set(results) == {"ar", "mdm"} and saved["task"] == task
    for kind in ("infill", "infill_after_sft"):
        assert set(results["mdm"][kind]) == {"forward", "backward"} and set(results["ar"][kind]) == {"forward"}
    for objective, r in results.items():
        assert all(0.0 <= v <= 1.0 for kind in ("instruction", "infill", "infill_after_sft") for v in r[kind].values())
        assert str(r["plateau"]["step"]) in saved["curves"][f"pretrain-{objective}"]["infill_forward"]
        outcomes = r["answers"]["instruction_backward"]  # every answer lands in exactly one bin
        n_queries = len((out / "data" / "eval-backward.jsonl").read_text().splitlines())
        assert sum(v or 0 for v in outcomes.values()) == n_queries
        assert (outcomes["other direction"] is None) == (task == "facts")  # facts have no other-direction answer
    answers = json.loads((out / "answers-mdm.json").read_text())
    queries = (out / "data" / "eval-backward.jsonl").read_text().splitlines()
    assert len(answers["instruction_backward"]) == len(queries) > 0
    assert all("model_answer" in a for a in answers["infill_backward"])
    assert (out / "recall.png").stat().st_size > 0 and (out / "recall.svg").is_file()
    for objective in ("ar", "mdm"):
        assert "reversal/instruction_backward_exact_match" in read_scalars(out / "tb" / f"reversal-{objective}")
        assert "probe/infill_forward" in read_scalars(out / "tb" / f"pretrain-{objective}")  # the recall curve
        sft = read_scalars(out / "tb" / f"sft-{objective}")
        assert sft["train/loss"] and "probe/instruction_backward" in sft
    # re-running resumes: the finished fits are not trained again
    ckpt = out / "tb" / "pretrain-ar" / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    study.main(["--task", task, "--preset", "smoke", "--out", str(out)])
    assert ckpt.stat().st_mtime_ns == before


def test_lines_pretraining_text_holds_the_lines_in_forward_order(tmp_path):
    study = load_study()
    data = study.prepare("lines", study.PRESETS["lines"]["smoke"], tmp_path)
    pretrain = data.files["pretrain"].read_text()
    for line in data.files["probe-backward"].read_text().splitlines():
        item = json.loads(line)
        assert item["answer"] + item["suffix"] in pretrain  # previous line, then the queried line


@pytest.mark.parametrize("argv, message", [
    (["--task", "facts", "--preset", "huge"], "--preset 'huge' does not exist for --task facts; allowed: cpu, cpu-long, smoke, gpu"),
    (["--task", "facts", "--text", "x.txt"], "--text applies to --task lines only"),
    (["--task", "facts", "--size", "tiny-7B"], "unknown model size 'tiny-7B'"),
    (["--task", "facts", "--pretrain-steps", "0"], "--pretrain-steps must be >= 1, got 0"),
])
def test_bad_arguments_exit_2_with_the_allowed_values(tmp_path, capsys, argv, message):
    study = load_study()
    with pytest.raises(SystemExit) as exit_info:
        study.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "tb").exists()  # nothing trained


def test_more_facts_than_the_name_pool_stops_before_training(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    study = load_study()
    monkeypatch.setitem(study.PRESETS["facts"], "smoke", replace(study.PRESETS["facts"]["smoke"], facts=5000))
    with pytest.raises(SystemExit):
        study.main(["--task", "facts", "--preset", "smoke", "--out", str(tmp_path)])
    assert "5000 facts need 10000 distinct people, but the name pool holds 2304" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()
