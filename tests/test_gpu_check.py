"""benchmarks/gpu_check.py (issue 25): the GPU check's CPU dry run writes a record with every
section and finite figures, a failing section leaves the others running, and `lldiff sweep plan`
plans at the MFU of the newest record for its GPU."""

import dataclasses
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lldiff.sweep import cluster, measured
from lldiff.sweep.plan import make_plan
from lldiff.sweep.spec import load_preset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steadier under load


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def numbers(obj, path=""):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from numbers(value, f"{path}/{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from numbers(value, f"{path}/{i}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def assert_finite(section):
    found = dict(numbers(section))
    assert found and all(math.isfinite(v) for v in found.values()), found


def check_fast_sections(report):
    flex = report["sections"]["flex"]
    assert flex["status"] == "ok"
    for case in ("attention_fp32", "attention_bf16"):
        r = flex[case]
        assert r["forward_flex_vs_sdpa"] <= (1e-5 if case.endswith("fp32") else 5e-2) * max(1.0, r["output_scale"])
        assert "no backward on a CPU" in r["backward"]  # the CUDA run compares dq, dk, dv
    assert flex["backbone"]["logits_flex_vs_sdpa"] < 1e-4
    assert report["sections"]["xformers"]["status"] == "unavailable"
    assert "no CUDA" in report["sections"]["xformers"]["reason"]
    decoding = report["sections"]["decoding"]
    assert decoding["status"] == "ok"
    assert set(decoding["rows"]) == {"AR + KV cache", "AR, no cache", "MDM exact", "MDM + prefix cache",
                                     "MDM + dual cache", "MDM + dual + threshold 0.9", "BD3-16 + cache",
                                     "BD3-16, no cache"}
    for row in decoding["rows"].values():
        assert row["tokens_per_s"] > 0 and row["model_calls"] > 0
    assert decoding["rows"]["AR + KV cache"]["tokens_processed_per_answer_token"] < \
        decoding["rows"]["AR, no cache"]["tokens_processed_per_answer_token"]
    for name in ("flex", "decoding"):
        assert_finite(report["sections"][name])


def test_dry_run_of_the_fast_sections_writes_finite_figures(gpu_check, tmp_path):
    """flex, xformers and decoding in this process, as `make gpu-check` runs them without a GPU
    (the full dry run, every section in a process of its own: the slow test below)."""
    report = gpu_check.main(["--device", "cpu", "--sections", "flex,xformers,decoding", "--in-process",
                             "--results", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert saved["schema"] == gpu_check.SCHEMA and saved["device_key"] == "cpu" and saved["shapes"] == "tiny"
    assert list(saved["sections"]) == ["flex", "xformers", "decoding"] == list(report["sections"])
    check_fast_sections(saved)
    text = (tmp_path / "gpu-check-cpu.md").read_text()
    assert "CPU dry run" in text and "| MDM + dual cache |" in text and "xformers: unavailable" in text
    assert measured.from_gpu_check(saved, "x") == []  # a CPU record never reaches a plan


def test_a_failing_section_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(gpu_check.SECTION_RUNNERS, "flex", broken)
    gpu_check.main(["--device", "cpu", "--sections", "flex,xformers", "--in-process", "--results", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert saved["sections"]["flex"]["status"] == "error"
    assert "RuntimeError: kernel exploded" in saved["sections"]["flex"]["error"]
    assert saved["sections"]["xformers"]["status"] == "unavailable"


def test_bad_sections_are_refused(gpu_check, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--sections", "throughput,warp"])
    assert info.value.code == 2 and "unknown 'warp'; allowed: throughput, fit" in capsys.readouterr().err


@pytest.mark.slow
def test_full_dry_run_has_every_section_with_finite_figures(tmp_path):
    """`make gpu-check` without a GPU: every section in its own process, tiny shapes, fp32."""
    # --budget-scale 3: time limits for a CPU shared with other work (it takes about 2.5 CPU-minutes)
    result = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path), "--budget-scale", "3"], cwd=REPO,
                            capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert list(report["sections"]) == ["throughput", "fit", "flex", "xformers", "fsdp2", "decoding"]
    check_fast_sections(report)
    throughput = report["sections"]["throughput"]
    assert throughput["status"] == "ok"
    for objective in ("ar", "mdm", "bd3-16"):
        rows = throughput["rows"][objective]
        assert list(rows) == ["defaults", "no compile", "plain head", "unfused AdamW"]
        assert rows["defaults"]["fused_adamw"] and not rows["unfused AdamW"]["fused_adamw"]
        assert rows["defaults"]["lightning_tokens_per_s"] > 0 and rows["defaults"]["lightning_mfu"] > 0  # as a fit
        assert rows["plain head"]["loss_chunk_tokens"] is None and rows["defaults"]["loss_chunk_tokens"] == 4096
        for row in rows.values():
            assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and math.isfinite(row["loss"]), row
    fit = report["sections"]["fit"]
    for name in ("mdm", "ar", "bd3"):
        r = fit[name]
        assert r["loss_finite"] and r["loss_falling"], r
        assert r["resume_exact"] and r["resume_ok"] and r["resumed_from_step"] == r["steps"] // 2, r
    fsdp2 = report["sections"]["fsdp2"]["mdm"]
    assert fsdp2["strategy"] == "FSDP2Strategy" and fsdp2["tokens_per_s"] > 0 and fsdp2["mfu"] > 0
    for name in ("throughput", "fit", "fsdp2"):
        assert_finite({k: v for k, v in report["sections"][name].items() if k != "settings"})
    assert report["seconds"] < report["budget_s"]
    assert (tmp_path / "gpu-check-cpu.md").exists()


# -- `lldiff sweep plan` reads the newest record ----------------------------------------------
def gpu_record(date, mfu, device="NVIDIA H100 80GB HBM3", shapes="full"):
    row = lambda m: {"defaults": {"mfu": m + 0.02, "tokens_per_s": 4e5 * m, "lightning_mfu": m,  # noqa: E731
                                  "lightning_tokens_per_s": 4e5 * m}, "no compile": {"mfu": m / 2, "tokens_per_s": 1}}
    return {"schema": "lldiff-gpu-check/1", "date": date, "device": "cuda", "device_name": device, "shapes": shapes,
            "sections": {"throughput": {"settings": {"size": "smdm-113M", "batch": 16, "seq_len": 1024,
                                                     "precision": "bf16-mixed"},
                                        "rows": {"ar": row(mfu["ar"]), "mdm": row(mfu["mdm"]),
                                                 "bd3-16": {"defaults": {"error": "RuntimeError: out of memory"}}}}}}


def smdm_h100():
    spec = load_preset("smdm")
    return dataclasses.replace(spec, cluster=dataclasses.replace(spec.cluster, mfu=None, peak_tflops=None,
                                                                 gpu="h100-sxm"))


def test_the_plan_uses_the_newest_gpu_check_record(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "scaleout_gpu-h100.json").write_text((REPO / "benchmarks/results/scaleout_gpu-h100.json").read_text())
    (results / "gpu-check-h100-sxm.json").write_text(json.dumps(gpu_record("2026-12-08T02:00:00Z", {"ar": 0.44, "mdm": 0.42})))
    (results / "gpu-check-cpu.json").write_text(json.dumps({**gpu_record("2026-12-09T00:00:00Z", {"ar": 0.9, "mdm": 0.9}),
                                                            "device": "cpu", "device_name": "cpu", "shapes": "tiny"}))
    found = measured.measurements(results)
    bf16 = {m.objective: m for m in found if m.precision == "bf16"}
    # the gpu-check, not the undated scaleout; its defaults as a Lightning fit ran them (not the bare step's +2%)
    assert {o: m.mfu for o, m in bf16.items()} == {"ar": 0.44, "mdm": 0.42}
    assert bf16["mdm"].source == "benchmarks/results/gpu-check-h100-sxm.json"
    assert bf16["mdm"].case == "throughput/defaults in a Lightning fit"
    assert [m.case for m in found if m.precision == "tf32"] == ["single-mdm-tf32"]  # only the scaleout measured tf32
    monkeypatch.setattr(cluster, "measurements", lambda: found)
    spec = smdm_h100()
    text = cluster.plan_table(spec, make_plan(spec))
    assert "GPU-hours at MFU mdm 42%, ar 44% of 989.4 TFLOP/s" in text
    assert "MFU measured by benchmarks/gpu_check.py on 2026-12-08 on NVIDIA H100 80GB HBM3 at bf16 for smdm-113M" in text
    assert "gpu-check-h100-sxm.json" in text


def test_of_two_dated_records_the_newer_wins_and_tiny_shapes_never_count():
    old = measured.from_gpu_check(gpu_record("2026-12-01T00:00:00Z", {"ar": 0.30, "mdm": 0.31}), "old.json")
    new = measured.from_gpu_check(gpu_record("2026-12-08T00:00:00Z", {"ar": 0.45, "mdm": 0.41}), "new.json")
    assert {m.objective for m in new} == {"ar", "mdm"}  # bd3-16 failed: no figure
    picked = measured.newest(new + old)
    assert {(m.objective, m.mfu, m.source) for m in picked} == {("ar", 0.45, "new.json"), ("mdm", 0.41, "new.json")}
    assert measured.from_gpu_check(gpu_record("2026-12-08T00:00:00Z", {"ar": 0.4, "mdm": 0.4}, shapes="tiny"), "x") == []
    assert measured.from_gpu_check(gpu_record("2026-12-08T00:00:00Z", {"ar": 0.4, "mdm": 0.4}, device="Mystery"), "x") == []


def test_a_gpu_record_renders_its_tables_and_goals(gpu_check, tmp_path):
    """The GPU-only branches of the record (memory, backward errors, xformers figures, goals),
    on a made-up record of the GPU run's shape: no figure here was measured."""
    row = lambda tps, mfu: {"tokens_per_s": tps, "mfu": mfu, "lightning_tokens_per_s": tps * 0.97,  # noqa: E731
                            "lightning_mfu": mfu * 0.97, "peak_memory_gib": 12.0, "peak_memory_mib_per_token": 0.75,
                            "compile": True, "loss_chunk_tokens": 4096, "fused_adamw": True}
    rows = {"ar": {"defaults": row(4.0e5, 0.45)}, "mdm": {"defaults": row(3.9e5, 0.44)},
            "bd3-16": {"defaults": row(1.9e5, 0.43), "no compile": {"error": "RuntimeError: boom"}}}
    report = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "device_key": "h100-sxm", "shapes": "full",
              "date": "2026-12-08T02:00:00Z", "torch": "2.13.0", "lightning": "2.6.6", "sections": {
                  "throughput": {"status": "ok", "settings": {"size": "smdm-113M", "batch": 16, "seq_len": 1024,
                                                              "precision": "bf16-mixed"},
                                 "rows": rows, "summary": gpu_check.throughput_summary(rows)},
                  "flex": {"status": "ok", "attention_bf16": {"forward_flex_vs_sdpa": 1e-3, "backward_dq_flex_vs_sdpa": 2e-3,
                                                              "backward_dk_flex_vs_sdpa": 3e-3,
                                                              "backward_dv_flex_vs_sdpa": 4e-3,
                                                              "fwd_bwd_ms_flex": 1.5, "fwd_bwd_ms_sdpa_boolean": 2.5}},
                  "xformers": {"status": "ok", "worst": {"xformers_bfloat16_max_error": 0.01}},
                  "fsdp2": {"status": "ok", "settings": {"size": "smdm-1028M", "batch": 8, "seq_len": 1024},
                            "mdm": {"tokens_per_s": 3e4, "mfu": 0.4, "max_memory_gib": 30.0,
                                    "max_memory_mib_per_token": 3.75}}}}
    report["goals"] = gpu_check.goals(report, REPO / "benchmarks" / "results")
    goals = report["goals"]
    assert goals["applies"] and goals["mfu_ar"]["met"] and goals["mfu_ar"]["from"] == "Lightning fit"
    assert goals["mdm_over_ar_tokens_per_s"]["value"] == pytest.approx(3.9 / 4.0) and goals["mdm_over_ar_tokens_per_s"]["met"]
    assert goals["bd3_over_mdm_tokens_per_s"]["met"]
    assert goals["memory_per_token_mdm"]["met"]  # 0.75 MiB/token against scaleout_gpu-h100.json's ~1.0
    text = gpu_check.markdown(report)
    assert "| mdm | defaults | 390,000 | 44.0% | 378,300, 42.7% | 12.0 | 0.750 | True | 4096 | True |" in text
    assert "| bd3-16 | no compile | RuntimeError: boom |" in text
    assert "| attention_bf16 | 1.00e-03 | 2.00e-03 | 3.00e-03 | 4.00e-03 | 1.50 | 2.50 |" in text
    assert "- xformers_bfloat16_max_error: 1.00e-02" in text and "MFU 40.0%, peak 30.0 GiB" in text
    assert re.search(r"- mfu_ar: 0\.43\d \(goal >= 0\.4, Lightning fit\): met", text)
