"""Sweeps: steps from C = 6ND, plan invariants, bad input, skip/resume, SIGKILL safety."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lldiff.config import SIZES
from lldiff.objectives.common.masking import expected_length
from lldiff.sweep.plan import make_plan, steps_for_budget, tokens_per_step
from lldiff.sweep.spec import load_preset, preset_names
from lldiff.sweep.plan import run_config
from lldiff.sweep.results import ResultsTable
from lldiff.sweep.runner import run_sweep
from lldiff.sweep.spec import spec_from_dict


def toy_spec(toy_corpus, cache_dir, **overrides):
    raw = dict(
        name="toy", objectives=["mdm", "ar"], sizes=["tiny-0.1M", "tiny-0.4M"], budgets=[2.0e10], seeds=[0],
        data=dict(source="files", paths=[str(toy_corpus)], vocab_size=320, seq_len=32, batch_size=8,
                  val_max_rows=16, cache_dir=str(cache_dir)),
        model=dict(lr=3e-3, random_length_prob=0.0),
        objective_args={"mdm": {"val_mc_samples": 2}},
        trainer=dict(accelerator="cpu", devices=1), warmup_fraction=0.1, evals_per_run=2, final_val_mc_samples=4,
    )
    raw.update(overrides)
    return spec_from_dict(raw)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_steps_formula_with_random_length_correction():
    spec = spec_from_dict(dict(objectives=["mdm"], sizes=["smdm-6M"], budgets=[1e15],
                               data=dict(seq_len=2048, batch_size=256), model=dict(random_length_prob=0.01)))
    tps = tokens_per_step(spec)
    assert tps == pytest.approx(256 * (2048 * 0.99 + 0.01 * 2049 / 2))
    assert tps == pytest.approx(256 * expected_length(2048, 0.01))
    n = SIZES["smdm-6M"].non_embedding_params()
    (run,) = make_plan(spec)
    assert run.max_steps == round(1e15 / (6 * n * tps)) == steps_for_budget(1e15, 6 * n, tps)
    assert run.flops == pytest.approx(1e15, rel=1 / run.max_steps)


def test_tokens_per_step_counts_devices_and_accumulation():
    spec = spec_from_dict(dict(objectives=["ar"], sizes=["smdm-6M"], budgets=[1e18], data=dict(seq_len=100, batch_size=4),
                               model=dict(random_length_prob=0.0),
                               trainer=dict(devices=8, num_nodes=2, accumulate_grad_batches=3)))
    assert tokens_per_step(spec) == 4 * 8 * 2 * 3 * 100


def test_plan_names_runs_and_shares_data_across_objectives(tmp_path):
    spec = load_preset("demo")
    plan = make_plan(spec)
    cells = {(r.size, r.budget) for r in plan}
    assert len(plan) == len(spec.objectives) * len(cells) * len(spec.seeds) >= 12
    low, high = spec.tokens_per_param
    assert all(low <= r.tokens_per_param <= high for r in plan)
    assert all(len({s for s, b in cells if b == c}) >= 3 for c in spec.budgets)
    for run in plan:  # learning rates scaled as 32 / d_model above width 32
        base = spec.objective_args[run.objective]["lr"]
        assert run.model_args["lr"] == pytest.approx(base * min(1.0, 32 / SIZES[run.size].d_model))
    assert len({r.run_id for r in plan}) == len(plan)
    assert {r.run_id.split("/")[0] for r in plan} == {"mdm", "ar"}
    configs = {r.run_id: run_config(spec, r, str(tmp_path)) for r in plan}
    for run in plan:
        cfg = configs[run.run_id]
        assert cfg["trainer"]["max_steps"] == run.max_steps
        assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{run.objective}/{run.size}"
        twin = configs[run.run_id.replace(run.objective, "ar" if run.objective == "mdm" else "mdm", 1)]
        assert cfg["data"] == twin["data"] and cfg["seed_everything"] == twin["seed_everything"]
        assert cfg["trainer"]["max_steps"] == twin["trainer"]["max_steps"]
        assert cfg["model"]["init_args"]["warmup_steps"] == max(1, round(0.1 * run.max_steps))


def test_plan_emits_cluster_scripts(tmp_path, capsys):
    from lldiff.sweep.cli import main as sweep_main

    sweep_main(["plan", "--preset", "smdm", "--emit", str(tmp_path / "jobs"), "--out", str(tmp_path / "sweep")])
    printed = capsys.readouterr().out
    plan = make_plan(load_preset("smdm"))
    assert "total: " in printed and "GPU-hours at MFU mdm 18.5%, ar 18.1% of 989.4 TFLOP/s" in printed  # measured, not assumed
    slurm = (tmp_path / "jobs" / "sweep.slurm").read_text()
    assert f"#SBATCH --array=0-{len(plan) - 1}" in slurm and "--gres=gpu:8" in slurm
    assert "lldiff sweep run" in slurm and "--only" in slurm
    torchrun = (tmp_path / "jobs" / "torchrun.sh").read_text().splitlines()
    assert sum(line.startswith("torchrun --standalone --nproc-per-node=8 -m lldiff.cli sweep run") for line in torchrun) == len(plan)
    assert (tmp_path / "sweep" / "spec.yaml").is_file() and (tmp_path / "sweep" / "logs").is_dir()


def test_presets_plan():
    assert {"demo", "smdm"} <= set(preset_names())
    smdm = make_plan(load_preset("smdm"))
    assert "mdm/smdm-1028M/C3e+20" in {r.run_id for r in smdm}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(budgets=[1e3]), r"2 \(size, budget\) cell\(s\) give fewer than 10 optimizer steps.*tiny-0.1M x C=1e\+03: 0 steps; tiny-0.4M"),
        (dict(sizes=["tiny-0.1M", "tiny-0.4M", "tiny-0.1M"]), "sizes lists tiny-0.1M more than once"),
        (dict(budgets=[2e10, 3e10, 2e10]), r"budgets lists 2e\+10 more than once"),
        (dict(compute="real"), "compute='real' is unknown; allowed: 6nd, matmul"),
        (dict(tokens_per_param=[10, 5]), r"tokens_per_param must be \[low, high\] with 0 < low < high"),
        (dict(tokens_per_param=[1, 2]), r"leaves fewer than 3 sizes.*C=2e\+10: 0 size\(s\) kept, tiny-0.1M, tiny-0.4M outside"),
        (dict(epochs=[1, 2]), "epochs needs data.unique_tokens"),
        (dict(lr_reference_width=0), "lr_reference_width must be a positive integer"),
        (dict(sizes=["tiny-7M"]), "unknown size"),
        (dict(objectives=["mdm", "gpt"]), "unknown objective 'gpt'; allowed: ar, mdm, bd3-B"),
        (dict(objectives=["ar", "bd3-0"]), "objective 'bd3-0': the block size must be >= 1"),
        (dict(objectives=["ar", "bd3-5"]), "bd3-5: block_size=5 must divide seq_len=32; allowed block sizes: 1, 2, 4, 8, 16, 32"),
        (dict(objectives=["ar", "bd3-64"]), "bd3-64: block_size=64 must divide seq_len=32"),
        (dict(objectives=["ar", "bd3-04"]), "objective 'bd3-04': write it as 'bd3-4'"),
        (dict(objective_args={"gpt": {"lr": 1e-3}}), "objective_args: unknown objective 'gpt'"),
        (dict(objectives=["ar", "bd3-4"], objective_args={"bd3-4": {"block_size": 8}}),
         r"objective_args.bd3-4.block_size is set by the objective's name"),
        (dict(objectives=["ar", "bd3-4"], model={"block_size": 8}), r"model.block_size \(bd3-4\) is set by the objective"),
        (dict(objective_args={"ar": {"seq_len": 64}}), "must share one data config"),
        (dict(budgets=[]), "budgets is empty"),
        (dict(trainer={"max_steps": 10}), "set per run by the sweep"),
    ],
)
def test_bad_specs_are_refused(overrides, message, toy_corpus, cache_dir):
    with pytest.raises(ValueError, match=message):
        make_plan(toy_spec(toy_corpus, cache_dir, **overrides))


def data_constrained(toy_corpus, cache_dir, **overrides):
    base = toy_spec(toy_corpus, cache_dir, sizes=["tiny-0.1M"]).to_dict()
    raw = {**base, "budgets": [], "epochs": [1, 4], "data": {**base["data"], "unique_tokens": 8 * 32 * 12 + 100},
           **overrides}
    raw.pop("cluster")
    return spec_from_dict(raw)


def test_epochs_plan_repeated_passes_over_unique_tokens(toy_corpus, cache_dir):
    spec = data_constrained(toy_corpus, cache_dir)
    plan = make_plan(spec)
    assert [r.run_id for r in plan] == ["mdm/tiny-0.1M/E1", "ar/tiny-0.1M/E1", "mdm/tiny-0.1M/E4", "ar/tiny-0.1M/E4"]
    # U rounded down to whole batches of 8 x 32 tokens: 12 batches per epoch
    assert {r.unique_tokens for r in plan} == {8 * 32 * 12}
    assert [r.max_steps for r in plan] == [12, 12, 48, 48] and {r.epochs for r in plan} == {1.0, 4.0}
    n = SIZES["tiny-0.1M"].non_embedding_params()
    assert plan[2].budget == pytest.approx(6 * n * 48 * tokens_per_step(spec))


def test_epochs_must_fit_the_compute_cap(toy_corpus, cache_dir):
    spec = data_constrained(toy_corpus, cache_dir)
    need = max(r.budget for r in make_plan(spec))
    make_plan(data_constrained(toy_corpus, cache_dir, budgets=[need]))  # exactly enough
    with pytest.raises(ValueError, match=r"epochs \[1.0, 4.0\] of U=3072 unique tokens need more compute than "
                                         r"the budget .* provides .*: E4 x tiny-0.1M"):
        make_plan(data_constrained(toy_corpus, cache_dir, budgets=[need / 2]))
    with pytest.raises(ValueError, match="with epochs, budgets may hold one value"):
        data_constrained(toy_corpus, cache_dir, budgets=[1e12, 2e12])


def test_unique_tokens_below_one_batch_is_refused_by_the_spec(toy_corpus, cache_dir):
    with pytest.raises(ValueError, match=r"data.unique_tokens=100 is smaller than one batch \(batch_size 8 x "
                                         r"seq_len 32 = 256 tokens\)"):
        data_constrained(toy_corpus, cache_dir, data={**toy_spec(toy_corpus, cache_dir).data, "unique_tokens": 100})


def test_unique_tokens_beyond_the_training_split_fails_before_the_output_exists(toy_corpus, cache_dir, tmp_path):
    spec = data_constrained(toy_corpus, cache_dir, data={**toy_spec(toy_corpus, cache_dir).data,
                                                         "unique_tokens": 10**9})
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=r"unique_tokens=1000000000 exceeds the training split's \d+ training tokens"):
        run_sweep(spec, out, log=lambda _: None)
    assert not out.exists()


def test_matmul_axis_plans_steps_from_real_flops(toy_corpus, cache_dir):
    spec = toy_spec(toy_corpus, cache_dir, compute="matmul", budgets=[1e11])
    from lldiff.flops import step_flops_per_token

    for run in make_plan(spec):
        per_token = step_flops_per_token(SIZES[run.size].replace(vocab_size=320), 32)
        assert run.max_steps == round(1e11 / (per_token * run.tokens_per_step))
        assert run.flops == pytest.approx(1e11, rel=1 / run.max_steps) and run.compute == "matmul"
        assert run.flops_6nd == pytest.approx(6 * run.n_nonemb * run.tokens)


def test_tokens_per_param_window_keeps_each_budgets_sizes_near_its_optimum():
    sizes = ["tiny-0.004M", "tiny-0.009M", "tiny-0.016M", "tiny-0.03M", "tiny-0.07M", "tiny-0.1M", "tiny-0.2M",
             "tiny-0.3M"]
    spec = spec_from_dict(dict(objectives=["ar"], sizes=sizes, budgets=[1e11, 1e12], tokens_per_param=[2, 1000],
                               data=dict(seq_len=64, batch_size=16), model=dict(random_length_prob=0.0)))
    plan = make_plan(spec)
    for run in plan:
        assert 2 <= run.tokens / run.n_nonemb <= 1000
    # D/N = C / (6 N^2) on the 6nd axis: the window keeps N in [sqrt(C/6000), sqrt(C/12)]
    kept = {c: [r.size for r in plan if r.budget == c] for c in (1e11, 1e12)}
    assert kept[1e11] == sizes[:5]  # N in [4.08e3, 9.13e4]
    assert kept[1e12] == sizes[2:7]  # N in [1.29e4, 2.89e5]


def test_fresh_control_repeats_the_steps_and_compute_on_distinct_tokens(toy_corpus, cache_dir):
    from lldiff.sweep.plan import fresh_control

    spec = data_constrained(toy_corpus, cache_dir, epochs=[1, 2, 4, 8])
    unique = 8 * 32 * 12
    control = fresh_control(spec, train_tokens=4 * unique)  # 8 epochs of U do not fit in one pass
    assert "unique_tokens" not in control.data and not control.epochs and control.name == "toy-fresh"
    repeated = {r.run_id: r for r in make_plan(spec)}
    fresh = make_plan(control)
    assert [r.max_steps for r in fresh if r.objective == "ar"] == [24, 48]  # E = 2 and 4
    for run in fresh:
        twin = repeated[f"{run.objective}/{run.size}/E{run.max_steps // 12}"]
        assert run.max_steps == twin.max_steps and run.flops == pytest.approx(twin.flops)
    with pytest.raises(ValueError, match="2 epochs of U=3072 tokens need more than the training split's 5000"):
        fresh_control(spec, train_tokens=5000)
    with pytest.raises(ValueError, match="no epochs and data.unique_tokens"):
        fresh_control(toy_spec(toy_corpus, cache_dir), train_tokens=10**6)


def test_repeated_data_sweep_records_u_epochs_and_both_flop_counts(toy_corpus, cache_dir, tmp_path):
    spec = data_constrained(toy_corpus, cache_dir, objectives=["ar"], epochs=[1, 2], compute="matmul")
    run_sweep(spec, tmp_path, parallel=1, log=lambda _: None)
    rows = {r["run_id"]: r for r in read_rows(tmp_path / "results.csv")}
    assert sorted(rows) == ["ar/tiny-0.1M/E1", "ar/tiny-0.1M/E2"]
    n = SIZES["tiny-0.1M"].non_embedding_params()
    for epochs in (1, 2):
        row = rows[f"ar/tiny-0.1M/E{epochs}"]
        assert int(row["unique_tokens"]) == 3072 and float(row["epochs"]) == epochs
        assert int(row["max_steps"]) == 12 * epochs and row["compute"] == "matmul"
        tokens = float(row["tokens"])
        assert float(row["flops_6nd"]) == pytest.approx(6 * n * tokens)
        assert float(row["flops"]) == float(row["flops_matmul"]) > float(row["flops_6nd"])


def test_parallel_auto_is_one_worker_per_core_for_cpu_sweeps_only(toy_corpus, cache_dir):
    from lldiff.sweep.runner import auto_parallel

    assert auto_parallel(toy_spec(toy_corpus, cache_dir)) == len(os.sched_getaffinity(0))
    gpu = toy_spec(toy_corpus, cache_dir, trainer=dict(accelerator="gpu", devices=1))
    assert auto_parallel(gpu) == 1


def test_fields_added_later_keep_old_fingerprints():
    raw = dict(objectives=["ar"], sizes=["tiny-1M"], budgets=[1e12])
    spec = spec_from_dict(raw)
    assert spec.fingerprint == spec_from_dict({**raw, "compute": "6nd", "epochs": []}).fingerprint
    assert spec.fingerprint != spec_from_dict({**raw, "compute": "matmul"}).fingerprint


def test_unknown_spec_key_is_named():
    with pytest.raises(ValueError, match="unknown sweep spec key.*'budget'"):
        spec_from_dict(dict(objectives=["ar"], sizes=["tiny-1M"], budget=[1e12]))


def test_results_table_records_each_run_once(tmp_path):
    table = ResultsTable(tmp_path / "results.csv", "abc")
    assert table.record({"run_id": "ar/x/C1"}) and not table.record({"run_id": "ar/x/C1"})
    assert [r["run_id"] for r in read_rows(tmp_path / "results.csv")] == ["ar/x/C1"]
    with pytest.raises(ValueError, match="different sweep spec"):
        ResultsTable(tmp_path / "results.csv", "other").run_ids()


def test_sweep_skips_finished_runs_and_refuses_a_foreign_directory(toy_corpus, cache_dir, tmp_path, monkeypatch):
    spec = toy_spec(toy_corpus, cache_dir, sizes=["tiny-0.1M"], objectives=["ar"])
    done = run_sweep(spec, tmp_path, log=lambda _: None)
    rows = read_rows(tmp_path / "results.csv")
    assert len(done) == 1 and [r["run_id"] for r in rows] == ["ar/tiny-0.1M/C2e+10"]
    assert int(rows[0]["max_steps"]) == done[0].max_steps and float(rows[0]["val_nll_per_token"]) > 0
    run_dir = tmp_path / "tb" / "ar" / "tiny-0.1M" / "C2e+10"
    assert (run_dir / "config.yaml").is_file()
    # the run's own cosine schedule reached its floor exactly at its planned max_steps
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == done[0].max_steps
    (scheduler,) = state["lr_schedulers"]
    assert scheduler["last_epoch"] == done[0].max_steps
    assert scheduler["_last_lr"][0] == pytest.approx(3e-3 * 0.1)

    import lldiff.sweep.runner as runner

    monkeypatch.setattr(runner, "execute_run", lambda *a: pytest.fail("a finished run was executed again"))
    assert run_sweep(spec, tmp_path, log=lambda _: None) == []

    before = (tmp_path / "results.csv").read_text()
    other = toy_spec(toy_corpus, cache_dir, sizes=["tiny-0.1M"], objectives=["ar"], budgets=[3.0e10])
    with pytest.raises(ValueError, match="different spec.*Nothing was overwritten"):
        run_sweep(other, tmp_path, log=lambda _: None)
    assert (tmp_path / "results.csv").read_text() == before


def test_a_foreign_results_table_is_refused_before_anything_is_written(toy_corpus, cache_dir, tmp_path):
    """A directory with another spec's results.csv (and no spec.yaml) gets no spec.yaml of ours."""
    ResultsTable(tmp_path / "results.csv", "someone-else").record({"run_id": "ar/x/C1"})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="different sweep spec"):
        run_sweep(toy_spec(toy_corpus, cache_dir, sizes=["tiny-0.1M"]), tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "spec.yaml").exists()


def test_sweep_killed_mid_run_resumes_and_records_each_run_once(toy_corpus, cache_dir, tmp_path):
    spec = toy_spec(toy_corpus, cache_dir, budgets=[1.5e10])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    out = tmp_path / "sweep"
    plan = make_plan(spec)
    cmd = [sys.executable, "-m", "lldiff.cli", "sweep", "run", str(spec_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def unfinished_with_checkpoint() -> list[str]:  # runs may finish in any order (parallel workers)
        recorded = {r["run_id"] for r in read_rows(out / "results.csv")} if (out / "results.csv").exists() else set()
        return [r.run_id for r in plan
                if r.run_id not in recorded and (out / "tb" / r.run_id / "checkpoints" / "last.ckpt").exists()]

    deadline = time.time() + 240
    try:  # kill once one run is recorded and another has written a checkpoint
        while not ((out / "results.csv").exists() and unfinished_with_checkpoint()) and time.time() < deadline:
            assert proc.poll() is None, "sweep ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    recorded_before = {r["run_id"] for r in read_rows(out / "results.csv")}
    assert recorded_before and len(recorded_before) < len(plan), "not killed between runs"

    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    rows = read_rows(out / "results.csv")
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in plan)  # each exactly once
    for row, run in zip(sorted(rows, key=lambda r: r["run_id"]), sorted(plan, key=lambda r: r.run_id)):
        assert int(row["max_steps"]) == run.max_steps
    assert yaml.safe_load((out / "spec.yaml").read_text())["name"] == "toy"


@pytest.mark.slow
def test_parallel_sweep_runs_k_at_a_time(toy_corpus, cache_dir, tmp_path):
    spec = toy_spec(toy_corpus, cache_dir, sizes=["tiny-0.1M"], budgets=[1.0e10])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lldiff.cli", "sweep", "run", str(spec_file), "--out", str(out), "--parallel", "2"]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    rows = read_rows(out / "results.csv")
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in make_plan(spec))
    assert len(list((out / "logs").glob("*.log"))) == 2  # one worker log per run


# --------------------------------------------------------------------------- block diffusion (bd3-B)


def by_hand_matmul_per_token(size, vocab, seq_len, copies):
    """Forward + backward matmul FLOPs per training token on ``copies`` x L input tokens
    (BD3: [x_t, x_0], 2 copies): copies x (6 (N + d V) + 12 n_layer (copies L) d)."""
    cfg = SIZES[size]
    return copies * (6 * (cfg.non_embedding_params() + cfg.d_model * vocab) + 12 * cfg.n_layer * copies * seq_len * cfg.d_model)


def test_bd3_objectives_plan_their_module_and_block_size(tmp_path, toy_corpus, cache_dir):
    spec = toy_spec(toy_corpus, cache_dir, objectives=["ar", "bd3-4", "bd3-16", "mdm"],
                    objective_args={"mdm": {"val_mc_samples": 2}, "bd3-4": {"val_mc_samples": 3, "lr": 1e-3}})
    plan = make_plan(spec)
    assert {r.run_id.split("/")[0] for r in plan} == {"ar", "bd3-4", "bd3-16", "mdm"}
    steps = {(r.objective, r.size): r.max_steps for r in plan}
    for size in spec.sizes:  # the 6ND axis costs the same per token for every objective
        assert len({steps[o, size] for o in spec.objectives}) == 1
    for run in plan:
        model = run_config(spec, run, str(tmp_path))["model"]
        if run.objective.startswith("bd3-"):
            block = int(run.objective.split("-")[1])
            assert model["class_path"] == "lldiff.objectives.bd3.modules.BlockDiffusionLM" and model["init_args"]["block_size"] == block
        else:
            assert "block_size" not in model["init_args"]
    bd3 = next(r for r in plan if r.objective == "bd3-4")
    assert bd3.model_args["val_mc_samples"] == 3 and bd3.model_args["lr"] == 1e-3


def test_matmul_axis_gives_bd3_its_2l_forward_and_the_6nd_axis_does_not(toy_corpus, cache_dir):
    spec = toy_spec(toy_corpus, cache_dir, objectives=["ar", "bd3-4", "mdm"], compute="matmul", budgets=[2e11])
    plan = make_plan(spec)
    for run in plan:
        copies = 2 if run.objective == "bd3-4" else 1
        per_token = by_hand_matmul_per_token(run.size, 320, 32, copies)
        assert run.flops_per_token == pytest.approx(per_token)
        assert run.max_steps == round(2e11 / (per_token * run.tokens_per_step))
        assert run.flops == pytest.approx(2e11, rel=1 / run.max_steps)
    for size in spec.sizes:  # about half the steps: the same real compute
        ar, bd3 = (next(r for r in plan if r.objective == o and r.size == size) for o in ("ar", "bd3-4"))
        assert 0.3 < bd3.max_steps / ar.max_steps < 0.5
    six = make_plan(toy_spec(toy_corpus, cache_dir, objectives=["ar", "bd3-4"], budgets=[2e11]))
    assert len({r.max_steps for r in six if r.size == "tiny-0.1M"}) == 1


def test_a_bd3_sweep_runs_and_its_analysis_draws_and_reports_it(toy_corpus, cache_dir, tmp_path):
    from lldiff.sweep.analysis import analyze_results
    from lldiff.sweep.report import analyze, load_results

    spec = toy_spec(toy_corpus, cache_dir, objectives=["ar", "bd3-4"], compute="matmul", budgets=[1e9],
                    sizes=["tiny-0.002M", "tiny-0.004M", "tiny-0.009M"], objective_args={"bd3-4": {"val_mc_samples": 2}})
    plan = make_plan(spec)
    run_sweep(spec, tmp_path, parallel=1, log=lambda _: None)
    rows = {r["run_id"]: r for r in read_rows(tmp_path / "results.csv")}
    assert sorted(rows) == sorted(r.run_id for r in plan) and len(rows) == 6
    for run in plan:
        row = rows[run.run_id]
        tokens = float(row["tokens"])
        copies = 2 if run.objective == "bd3-4" else 1
        assert int(row["max_steps"]) == run.max_steps and row["objective"] == run.objective
        assert float(row["flops_matmul"]) == pytest.approx(tokens * by_hand_matmul_per_token(run.size, 320, 32, copies))
        assert float(row["flops_6nd"]) == pytest.approx(6 * run.n_nonemb * tokens)
        assert int(row["val_mc_samples"]) == (4 if run.objective == "bd3-4" else 0)  # final_val_mc_samples: a bound
        assert 0 < float(row["val_nll_per_token"]) < 10
        assert (tmp_path / "tb" / run.run_id / "checkpoints" / "last.ckpt").is_file()
    result = analyze_results(load_results(tmp_path, "val_nll_per_token"), bootstrap=0)
    assert result.objectives == ["ar", "bd3-4"] and result.candidates == ["bd3-4"]
    report = analyze(tmp_path, bootstrap=0).read_text()
    assert "### BD3-4 vs AR" in report and "BD3-4: Monte-Carlo negative ELBO" in report and "3 BD3-4" in report
    assert (tmp_path / "analysis" / "loss_vs_flops.png").is_file()
