"""`lldiff sweep plan` for the spec's device kind, and cluster scripts that run as written
(issue 24 item 18)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lldiff.sweep import cluster
from lldiff.sweep.plan import make_plan, matmul_flops
from lldiff.sweep.spec import load_preset


def with_layout(spec, nodes: int, devices: int, cluster_nodes: int | None = None, cluster_devices: int | None = None,
                **cluster_fields):
    return dataclasses.replace(
        spec, trainer={**spec.trainer, "num_nodes": nodes, "devices": devices},
        cluster=dataclasses.replace(spec.cluster, nodes_per_run=cluster_nodes or nodes,
                                    gpus_per_run=cluster_devices or devices, **cluster_fields))


def test_a_cpu_spec_is_planned_in_cpu_hours_at_the_measured_rate(monkeypatch):
    monkeypatch.setattr(cluster, "cpu_matmul_flops", lambda: 2.0e10)
    spec = load_preset("demo")  # trainer.accelerator: cpu
    plan = make_plan(spec)
    text = cluster.plan_table(spec, plan)
    hours = sum(matmul_flops(spec, r) for r in plan) / 2.0e10 / 3600
    assert f"~{hours:.3g} CPU process-hours at 20.0 GFLOP/s" in text
    assert "CPU-h" in text.splitlines()[1] and "fp32 matmul rate measured on this machine" in text
    assert "GPU-h" not in text and "MFU" not in text and "40%" not in text and "h100" not in text
    assert "x 50% (--mfu)" in cluster.plan_table(spec, plan, mfu=0.5)


def test_a_gpu_spec_is_still_planned_in_gpu_hours():
    spec = load_preset("smdm")
    text = cluster.plan_table(spec, make_plan(spec))
    assert "GPU-hours at MFU" in text and "CPU" not in text


def test_multi_node_runs_get_a_rendezvous_not_standalone(tmp_path):
    spec = with_layout(load_preset("smdm"), nodes=2, devices=8)
    plan = make_plan(spec)
    lines = cluster.torchrun_commands(spec, plan, tmp_path / "spec.yaml", tmp_path).splitlines()
    runs = [line for line in lines if line.startswith("torchrun ")]
    assert len(runs) == len(plan) and not any("--standalone" in line for line in runs)
    assert all("--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\""
               in line for line in runs)
    assert len({line.split("--rdzv-id=")[1].split()[0] for line in runs}) == len(plan)  # one rendezvous per run
    assert any(line.startswith(': "${MASTER_ADDR:?') for line in lines)
    single = cluster.torchrun_commands(load_preset("smdm"), plan, tmp_path / "spec.yaml", tmp_path)
    assert "torchrun --standalone --nproc-per-node=8 " in single and "--nnodes" not in single


@pytest.mark.parametrize("nodes,devices,cluster_nodes,cluster_devices,message", [
    (1, 8, 2, 8, "trainer.num_nodes=1 but cluster.nodes_per_run=2"),
    (1, 8, 1, 4, "trainer.devices=8 but cluster.gpus_per_run=4"),
])
def test_a_layout_that_disagrees_with_the_cluster_is_refused(tmp_path, capsys, nodes, devices, cluster_nodes,
                                                             cluster_devices, message):
    spec = with_layout(load_preset("smdm"), nodes, devices, cluster_nodes, cluster_devices)
    with pytest.raises(ValueError, match=message):
        cluster.emit(spec, make_plan(spec), tmp_path / "spec.yaml", tmp_path, tmp_path)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    from lldiff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "plan", str(spec_file), "--emit", str(tmp_path / "jobs")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def test_a_cpu_spec_asks_for_no_gpu_and_the_script_names_its_environment(tmp_path):
    spec = load_preset("demo")
    plan = make_plan(spec)
    slurm = cluster.slurm_script(spec, plan, tmp_path / "spec.yaml", tmp_path)
    assert "--gres" not in slurm
    assert "No cluster.setup in the spec" in slurm and 'echo "lldiff: $(command -v lldiff)' in slurm
    gpu = load_preset("smdm")
    assert "#SBATCH --gres=gpu:8" in cluster.slurm_script(gpu, make_plan(gpu), tmp_path / "s.yaml", tmp_path)
    set_up = dataclasses.replace(spec, cluster=dataclasses.replace(spec.cluster, setup="source /venv/bin/activate"))
    for script in (cluster.slurm_script(set_up, plan, tmp_path / "s.yaml", tmp_path),
                   cluster.torchrun_commands(set_up, plan, tmp_path / "s.yaml", tmp_path)):
        assert "source /venv/bin/activate" in script and "No cluster.setup" not in script


def test_emit_says_what_it_did_with_the_sweep_directory(tmp_path, capsys):
    from lldiff.sweep.cli import main

    args = ["plan", "--preset", "smdm", "--emit", str(tmp_path / "jobs"), "--out", str(tmp_path / "sweep")]
    main(args)
    assert f"sweep directory {Path(tmp_path / 'sweep').resolve()} (created with spec.yaml and logs/)" in capsys.readouterr().out
    main(args)
    assert "(exists, holds this spec: kept)" in capsys.readouterr().out
