"""`lldiff sweep plan`'s GPU-hours use the MFU measured by benchmarks/scaleout_gpu.py on the spec's
GPU (or the one given) and always say where it comes from (issue 16, item 3)."""

import dataclasses
import json
from pathlib import Path

import pytest

from lldiff.sweep import cluster, measured
from lldiff.sweep.cli import main as sweep_main
from lldiff.sweep.plan import make_plan, matmul_flops
from lldiff.sweep.spec import load_preset, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def smdm(**cluster_fields):
    spec = load_preset("smdm")
    fields = {"mfu": None, "peak_tflops": None, **cluster_fields}
    return dataclasses.replace(spec, cluster=dataclasses.replace(spec.cluster, **fields))


def report(device="NVIDIA H200", cases=None):
    return {"device": device, "size": "smdm-113M", "batch": 16, "seq_len": 1024, "cases": cases or {
        "single-mdm": {"objective": "mdm", "precision": "bf16-mixed", "backend": "sdpa", "mfu": 0.42, "tokens_per_s": 4e5},
        "fsdp2-mdm": {"objective": "mdm", "precision": "bf16-mixed", "backend": "sdpa", "mfu": 0.30, "tokens_per_s": 3e5},
        "fsdp2-ar": {"objective": "ar", "precision": "bf16-mixed", "backend": "sdpa", "mfu": 0.41, "tokens_per_s": 4e5},
        "fsdp2_ac-ar": {"objective": "ar", "precision": "bf16-mixed", "backend": "sdpa", "mfu": 0.9, "tokens_per_s": 1},
        "fsdp2-mdm-xformers": {"objective": "mdm", "precision": "bf16-mixed", "backend": "xformers", "mfu": 0.9,
                               "tokens_per_s": 1},
        "single-bd3-16": {"error": "RuntimeError: out of memory"},
        "single-mdm-tf32": {"objective": "mdm", "precision": "32-true", "backend": "sdpa", "mfu": 0.2, "tokens_per_s": 1},
    }}


@pytest.mark.skipif(not (REPO / "benchmarks" / "results").is_dir(), reason="no benchmarks/ in this checkout")
def test_the_shipped_table_is_what_the_benchmark_results_say():
    """An installed package (no benchmarks/) plans with the same figures as the checkout. After a
    new benchmark run, `python -m lldiff.sweep.measured` prints the table to paste."""
    assert measured.read_results(REPO / "benchmarks" / "results") == list(measured.MEASURED)
    h100 = {(m.precision, m.objective): m for m in measured.MEASURED}
    assert h100["bf16", "mdm"].mfu == pytest.approx(0.1853, abs=1e-4) and h100["bf16", "mdm"].gpu == "h100-sxm"


def test_a_report_gives_one_figure_per_precision_and_objective_single_device_first():
    found = {(m.precision, m.objective): m for m in measured.from_report(report(), "results/x.json")}
    assert set(found) == {("bf16", "mdm"), ("bf16", "ar"), ("tf32", "mdm")}
    assert found["bf16", "mdm"].mfu == 0.42 and found["bf16", "mdm"].case == "single-mdm"  # not fsdp2-mdm
    assert found["bf16", "ar"].mfu == 0.41  # plain FSDP2; not the activation-checkpointing case
    assert {m.gpu for m in found.values()} == {"h200-sxm"} and found["bf16", "ar"].source == "results/x.json"
    assert measured.from_report(report(device="Some Unknown GPU"), "x") == []


def test_the_plan_uses_the_measured_mfu_per_objective_and_says_so():
    spec = smdm()
    plan = make_plan(spec)
    text = cluster.plan_table(spec, plan)
    mdm = next(m for m in measured.MEASURED if (m.objective, m.precision) == ("mdm", "bf16"))
    ar = next(m for m in measured.MEASURED if (m.objective, m.precision) == ("ar", "bf16"))
    run = next(r for r in plan if r.objective == "mdm")
    assert cluster.gpu_hours(spec, run) == pytest.approx(matmul_flops(spec, run) / (mdm.mfu * 989.4e12) / 3600)
    total = text.splitlines()[-2]
    assert "GPU-hours at MFU mdm 18.5%, ar 18.1% of 989.4 TFLOP/s (h100-sxm dense bf16 peak)" in total
    source = text.splitlines()[-1]
    assert source.startswith("MFU measured by benchmarks/scaleout_gpu.py on NVIDIA H100 80GB HBM3 at bf16 for smdm-113M")
    assert "mdm 18.5% (single-mdm), ar 18.1% (fsdp2-ar)" in source and "scaleout_gpu-h100.json" in source
    assert "40%" not in text


def test_an_objective_without_a_measurement_takes_the_lowest_measured_on_that_gpu():
    spec = dataclasses.replace(smdm(), objectives=("mdm", "bd3-16"))
    text = cluster.plan_table(spec, make_plan(spec))
    assert "bd3-16 not measured: the lowest measured, 18.1%" in text


def test_a_given_mfu_is_used_and_named(capsys):
    spec = smdm(mfu=0.3)
    assert "MFU 30% from the spec's cluster.mfu, not measured; measured on h100-sxm at bf16" in cluster.plan_table(
        spec, make_plan(spec))
    sweep_main(["plan", "--preset", "smdm", "--mfu", "0.25"])
    printed = capsys.readouterr().out
    assert "GPU-hours at MFU 25% of 989.4 TFLOP/s (h100-sxm dense bf16 peak)" in printed
    assert "MFU 25% given by --mfu; measured on h100-sxm at bf16 by benchmarks/scaleout_gpu.py" in printed
    with pytest.raises(SystemExit):
        sweep_main(["plan", "--preset", "smdm", "--mfu", "40"])
    assert "--mfu must be a fraction in (0, 1]" in capsys.readouterr().err


def test_without_a_measurement_the_plan_says_it_assumes_40_percent():
    spec = smdm(gpu="a100")
    text = cluster.plan_table(spec, make_plan(spec))
    assert "at MFU 40% of 312 TFLOP/s (a100 dense bf16 peak)" in text
    assert "MFU 40% assumed: nothing measured on a100 at bf16 (measured: h100-sxm at bf16, h100-sxm at tf32)" in text


def test_a_new_benchmark_result_is_used(tmp_path, monkeypatch):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "scaleout_gpu-h200.json").write_text(json.dumps(report()))
    found = measured.measurements(tmp_path / "benchmarks" / "results")
    assert {m.source for m in found} == {"benchmarks/results/scaleout_gpu-h200.json"}
    monkeypatch.setattr(cluster, "measurements", lambda: found)
    spec = smdm(gpu="h200-sxm")
    text = cluster.plan_table(spec, make_plan(spec))
    assert "MFU mdm 42%, ar 41%" in text and "on NVIDIA H200 at bf16" in text


def test_a_32_bit_spec_is_planned_at_the_fp32_peak():
    spec = load_preset("demo")  # trainer.precision 32-true; no cluster section
    assert cluster.plan_precision(spec) == "fp32" and cluster.plan_peak(spec) == (66.9, "h100-sxm dense fp32 peak")


@pytest.mark.parametrize("fields,message", [
    ({"mfu": 1.5}, r"cluster.mfu must be in \(0, 1\]"),
    ({"mfu": 0}, r"cluster.mfu must be in \(0, 1\]"),
    ({"gpu": "h1000"}, "cluster.gpu='h1000' is unknown; allowed: h200-sxm"),
    ({"peak_tflops": -1}, "cluster.peak_tflops must be > 0"),
])
def test_bad_cluster_values_are_refused(fields, message):
    raw = {"objectives": ["mdm"], "sizes": ["tiny-0.1M"], "budgets": [1e12], "cluster": fields}
    with pytest.raises(ValueError, match=message):
        spec_from_dict(raw)
