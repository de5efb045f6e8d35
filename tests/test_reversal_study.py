"""The reversal study runs end to end (smoke preset) and writes its table, results and curves."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("reversal_study", REPO / "studies" / "reversal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_reversal_study_smoke_writes_table_results_and_tensorboard(tmp_path):
    from lldiff.sweep.figures import read_scalars

    study = load_study()
    out = tmp_path / "study"
    study.main(["--preset", "smoke", "--out", str(out)])
    table = (out / "reversal.md").read_text()
    assert "| model | forward | reversal |" in table
    assert "| AR, tiny-0.016M (this run) |" in table and "| MDM (LLaDA objective), tiny-0.016M (this run) |" in table
    assert "| LLaDA-8B Instruct (paper) | 48.8 | 42.4 |" in table
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"ar", "mdm"}
    assert all(0.0 <= r[k] <= 1.0 for r in results.values() for k in ("forward", "reversal"))
    answers = json.loads((out / "answers-mdm.json").read_text())
    queries = (out / "data" / "eval-reversal.jsonl").read_text().splitlines()
    assert len(answers["reversal"]) == len(queries) > 0
    for objective in ("ar", "mdm"):
        scalars = read_scalars(out / "tb" / f"reversal-{objective}")
        assert "reversal/reversal_exact_match" in scalars
        assert read_scalars(out / "tb" / f"sft-{objective}")["train/loss"]  # the fine-tuning curve
    # the pre-training text holds the lines in forward order only
    lines = [json.loads(q)["prompt"].split(": ", 1)[1] for q in queries]
    pretrain = (out / "data" / "pretrain.txt").read_text()
    assert all(line in pretrain for line in lines)
    # re-running resumes: the finished fits are not trained again
    ckpt = out / "tb" / "pretrain-ar" / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    study.main(["--preset", "smoke", "--out", str(out)])
    assert ckpt.stat().st_mtime_ns == before
