"""Scale-out and throughput: strategy presets and refusals, MFU accounting against hand
computation, data sharding over ranks, and 2-process DDP / FSDP2 runs (a torchrun
subprocess) against one process with the same global batch, sharded-checkpoint resume and
single-process loading."""

import glob
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DistributedSampler

from lldiff import flops
from lldiff import objectives as registry
from lldiff.checkpoint import consolidate_checkpoint, is_sharded_checkpoint, load_model, read_checkpoint_meta
from lldiff.config import ModelConfig
from lldiff.data import PretrainDataModule
from lldiff.data.sampler import DataParallelShuffleSampler, ResumableShuffleSampler
from lldiff.launch import lightning_cli
from lldiff.strategies import PRESETS, FSDP2Strategy, check_strategy

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "distributed_fit.py"


def load_script():
    spec = importlib.util.spec_from_file_location("distributed_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- MFU accounting -------------------------------------------------------------------------

TINY = ModelConfig.from_name("tiny-0.03M", vocab_size=320)  # 2 layers, d 32, d_ff 128


def test_step_flops_per_token_by_hand():
    non_embedding = 2 * (4 * 32 * 32 + 3 * 32 * 128 + 2 * 32) + 32  # 32_928
    linear = 6 * (non_embedding + 32 * 320)  # blocks + LM head, forward + backward
    attention = 12 * 2 * 32 * 32  # n_layer * T * d at T = 32
    assert flops.step_flops_per_token(TINY, 32) == linear + attention == 283_584


def test_mfu_by_hand():
    achieved = 1000.0 * 283_584  # 1000 tokens/s
    assert flops.mfu(achieved, 1e9, 2) == pytest.approx(0.141792)
    with pytest.raises(ValueError, match="devices >= 1"):
        flops.mfu(achieved, 1e9, 0)


@pytest.mark.parametrize("name,key,bf16", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm", 989.4), ("NVIDIA H100 PCIe", "h100-pcie", 756.0),
    ("NVIDIA H100 NVL", "h100-nvl", 835.5), ("NVIDIA H200", "h200-sxm", 989.4), ("NVIDIA H200 NVL", "h200-nvl", 835.5),
    ("NVIDIA GH200 480GB", "gh200", 989.4), ("NVIDIA A100-SXM4-80GB", "a100", 312.0),
    ("NVIDIA A100 80GB PCIe", "a100", 312.0), ("NVIDIA A10G", "a10", 125.0), ("NVIDIA L40S", "l40s", 362.1),
    ("NVIDIA L40", "l40", 181.0), ("NVIDIA L4", "l4", 121.0), ("NVIDIA GeForce RTX 4090", "rtx-4090", 165.2),
    ("NVIDIA RTX A6000", "a6000", 154.8), ("Tesla V100-SXM2-16GB", "v100-sxm", None),
    ("Tesla V100-PCIE-32GB", "v100-pcie", None), ("Tesla T4", "t4", None), ("Mystery GPU 9000", None, None),
])
def test_gpu_peak_table(name, key, bf16):
    assert flops.gpu_table_key(name) == key
    assert flops.gpu_peak_flops(name, "bf16") == (None if bf16 is None else bf16 * 1e12)


def test_matmul_precision_of_a_run():
    assert flops.matmul_precision("bf16-mixed", tf32=True) == "bf16"
    assert flops.matmul_precision("bf16-true", tf32=False) == "bf16"
    assert flops.matmul_precision("16-mixed", tf32=True) == "fp16"
    assert flops.matmul_precision("32-true", tf32=True) == "tf32"
    assert flops.matmul_precision("32-true", tf32=False) == "fp32"
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.7e12
    with pytest.raises(ValueError, match="'64-true'"):
        flops.matmul_precision("64-true", tf32=False)


def test_device_peak_flops_configured_or_measured_on_cpu():
    assert flops.device_peak_flops(torch.device("cpu"), "32-true", 2.5) == (2.5e12, "configured 2.5 TFLOP/s")
    with pytest.raises(ValueError, match="peak_tflops must be > 0"):
        flops.device_peak_flops(torch.device("cpu"), "32-true", 0.0)
    flops.cpu_matmul_flops.cache_clear()
    rng = torch.get_rng_state()
    peak, source = flops.device_peak_flops(torch.device("cpu"), "32-true")
    assert torch.equal(rng, torch.get_rng_state())  # the benchmark leaves the masking draws alone
    assert 1e8 < peak < 1e14 and "measured CPU fp32 matmul" in source
    assert flops.device_peak_flops(torch.device("cpu"), "32-true")[0] == peak  # measured once per process


def test_throughput_window_counts_whole_steps():
    window = flops.ThroughputWindow(start=10.0, tokens=100, flops=1e6)  # step 0 starts at t = 10
    assert window.step(11.0, 100, 1e6) == (100.0, 1e6)  # step 0 took 1 s
    assert window.step(14.0, 50, 5e5) == pytest.approx((200 / 4, 2e6 / 4))  # step 1 took 3 s
    assert window.step(15.0, 100, 1e6) == pytest.approx((250 / 5, 2.5e6 / 5))  # step 2 (50 tokens) 1 s


@pytest.mark.parametrize("objective", ["ar", "bd3-4"])
def test_perf_metrics_are_logged_consistently(objective, toy_corpus, cache_dir, tmp_path):
    """FLOP/s = tokens/s x the objective's matmul FLOPs per token (BD3: its 2L forward), MFU
    = FLOP/s over the configured peak."""
    L.seed_everything(0, verbose=False)
    dm = PretrainDataModule(source="files", paths=[str(toy_corpus)], vocab_size=320, seq_len=32, batch_size=8,
                            cache_dir=str(cache_dir))
    entry = registry.get(objective)
    model = load_script().build_module(objective, size="tiny-0.03M", vocab_size=dm.vocab_size_real, warmup_steps=1,
                                       random_length_prob=0.0, peak_tflops=0.5)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="perf", version="")
    L.Trainer(accelerator="cpu", max_steps=12, log_every_n_steps=4, logger=logger, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    events = EventAccumulator(glob.glob(str(tmp_path / "perf" / "events*"))[0])
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in ("perf/tokens_per_s", "perf/flops_per_s", "perf/mfu")}
    assert [s for s, _ in scalars["perf/mfu"]] == [3, 7, 11]
    per_token = entry.matmul_flops_per_token(model.config, 32)
    by_hand = {"ar": flops.step_flops_per_token(model.config, 32),  # BD3: [x_t, x_0], 2L = 64 tokens a row
               "bd3-4": 2 * flops.step_flops_per_token(model.config, 64)}
    assert per_token == by_hand[objective]
    for (_, tps), (_, fps), (_, mfu) in zip(*scalars.values()):
        assert tps > 0
        assert fps == pytest.approx(tps * per_token, rel=1e-5)
        assert mfu == pytest.approx(fps / 0.5e12, rel=1e-5)


# -- strategies -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,ac,sharded", [("fsdp2", False, True), ("fsdp2_ac", True, True),
                                             ("fsdp2_full", False, False)])
def test_presets_are_fsdp2(name, ac, sharded):
    strategy = L.Trainer(accelerator="cpu", devices=1, strategy=name, logger=False).strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.activation_checkpointing is ac and strategy._save_distributed_checkpoint is sharded
    check_strategy(name, "cpu")


def test_unknown_strategy_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown trainer.strategy 'fsdp3'; lldiff presets: auto, ddp, fsdp2") as info:
        check_strategy("fsdp3", "cpu")
    assert all(name in str(info.value) for name in PRESETS)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload",
                                      {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}])
def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(strategy):
    with pytest.raises(ValueError, match="on a CPU: Lightning's FSDPStrategy .*needs CUDA.*fsdp2"):
        check_strategy(strategy, "cpu")


@pytest.mark.parametrize("strategy,error", [("fsdp3", "unknown trainer.strategy 'fsdp3'"),
                                            ("fsdp", "Use trainer.strategy: fsdp2")])
def test_cli_refuses_a_bad_strategy_before_any_work(strategy, error, tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "mdm-tiny.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.strategy", strategy, "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--data.init_args.cache_dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match=error):
        lightning_cli(args)
    assert not any(tmp_path.iterdir())  # no data built, no run directory


# -- data sharding --------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_one_order_step_by_step(world):
    n, b = 103, 4  # per-rank batch b, global batch b * world
    single = list(ResumableShuffleSampler(n, seed=5))
    ranks = [list(DataParallelShuffleSampler(n, 5, rank=r, world_size=world)) for r in range(world)]
    assert all(len(r) == n // world for r in ranks)
    for step in range(n // (b * world)):
        union = sorted(i for r in ranks for i in r[step * b:(step + 1) * b])
        assert union == sorted(single[step * b * world:(step + 1) * b * world])
    # resume after 2 global steps: each rank continues exactly where it was
    skip = 2 * b * world
    for r in range(world):
        sampler = DataParallelShuffleSampler(n, 5, rank=r, world_size=world)
        sampler.resume_at(0, skip)
        resumed = list(sampler)
        assert resumed == ranks[r][2 * b:2 * b + len(resumed)] and len(resumed) == (n - skip) // world
    assert isinstance(DataParallelShuffleSampler(n, 5, rank=1, world_size=2), DistributedSampler)
    epoch1 = DataParallelShuffleSampler(n, 5, rank=0, world_size=world)
    epoch1.set_epoch(1)
    assert list(epoch1) != ranks[0]
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ResumableShuffleSampler(n, 5, rank=2, world_size=2)


# -- two processes (torchrun subprocess) ------------------------------------------------------

@pytest.fixture(scope="module")
def runs(toy_corpus, cache_dir, tmp_path_factory):
    """The 2-process jobs of tests/scripts/distributed_fit.py (one torchrun launch) and the
    single-process references with the same global batch (in this process)."""
    out = tmp_path_factory.mktemp("distributed")
    script = load_script()
    reference = {o: script.fit_job(str(toy_corpus), str(cache_dir), objective=o) for o in ("ar", "mdm")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--corpus", str(toy_corpus), "--cache-dir", str(cache_dir), "--out", str(out), "--ckpt-at", "5"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    return {"reference": reference, "out": out, "script": script, **jobs}


def test_ddp_and_fsdp2_follow_one_process_ar_curve(runs):
    """AR is deterministic: 2 ranks x 8 rows must train like 1 process x 16 rows."""
    reference = runs["reference"]["ar"]
    for job in ("ddp_ar", "fsdp2_full_ar", "fsdp2_ac_ar"):
        assert runs[job]["world_size"] == 2 and runs[job]["tokens_seen"] == reference["tokens_seen"]
        assert runs[job]["losses"] == pytest.approx(reference["losses"], abs=2e-4), job
    assert runs["ddp_ar"]["sharded_blocks"] == 0 and runs["fsdp2_full_ar"]["sharded_blocks"] == 2


def test_two_process_mdm_curves(runs):
    """MDM masks are drawn per rank, so the 2-process curve equals one process's only in
    distribution; DDP and FSDP2 (same per-rank draws) agree step for step."""
    ddp, fsdp2, reference = runs["ddp_mdm"], runs["fsdp2_mdm"], runs["reference"]["mdm"]
    assert ddp["rng_states_distinct"] and fsdp2["rng_states_distinct"]
    assert fsdp2["losses"] == pytest.approx(ddp["losses"], abs=2e-4)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(fsdp2["losses"]) == pytest.approx(mean(reference["losses"]), rel=0.1)
    assert fsdp2["losses"][-1] < fsdp2["losses"][0]


def test_fsdp2_sharded_checkpoint_resumes_exactly(runs):
    """Checkpoint after step 5 (sharded), crash after step 7, resume from step 5: the same
    losses as the uninterrupted run (same rows per rank, each rank's own masking stream)."""
    crashed, resumed, full = runs["fsdp2_mdm_crashed"], runs["fsdp2_mdm_resumed"], runs["fsdp2_mdm"]
    assert is_sharded_checkpoint(crashed["ckpt"]) and len(crashed["losses"]) == 7
    assert resumed["losses"] == pytest.approx(full["losses"][5:], abs=1e-5)
    assert resumed["tokens_seen"] == full["tokens_seen"]
    meta = read_checkpoint_meta(crashed["ckpt"])
    assert meta["global_step"] == 5 and len(meta["lldiff"]["rng_by_rank"]) == 2
    assert meta["lldiff"]["model_config"]["n_layer"] == 2 and meta["lldiff"]["tokens_seen"] == 5 * 16 * 32


def test_fsdp2_checkpoints_load_on_one_cpu_process(runs, tmp_path):
    probe = runs["script"].PROBE
    for job, sharded in (("fsdp2_mdm_resumed", True), ("fsdp2_full_ar", False)):
        path = runs[job]["ckpt"]
        assert is_sharded_checkpoint(path) is sharded
        loaded = load_model(path, expect="mdm" if "mdm" in job else "ar")
        with torch.no_grad():
            assert torch.allclose(loaded.model(probe), torch.tensor(runs[job]["logits"]), atol=1e-5), job
    full = consolidate_checkpoint(runs["fsdp2_mdm_resumed"]["ckpt"], tmp_path / "full.ckpt")
    a, b = load_model(full).model, load_model(runs["fsdp2_mdm_resumed"]["ckpt"]).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_cli_fsdp2_with_lightnings_launcher_resumes_and_generates(toy_corpus, cache_dir, tmp_path):
    """`lldiff fit --trainer.devices 2 --trainer.strategy fsdp2` (Lightning starts the second
    process), `--ckpt_path` of its sharded step-4 checkpoint continues the run, `lldiff generate`
    reads it."""
    fit = [sys.executable, "-m", "lldiff.cli", "fit", "--config", str(REPO / "configs" / "ar-tiny.yaml"),
           "--config", str(REPO / "configs" / "strategies" / "fsdp2-cpu.yaml"),
           "--model.init_args.size", "tiny-0.03M", "--model.init_args.warmup_steps", "2",
           "--data.init_args.source", "files", "--data.init_args.paths", f"[{toy_corpus}]",
           "--data.init_args.max_bytes", "null", "--data.init_args.vocab_size", "320",
           "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8", "--data.init_args.val_max_rows", "16",
           "--data.init_args.cache_dir", str(cache_dir), "--trainer.val_check_interval", "4",
           "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
           "--checkpoint.every_n_train_steps", "4", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    # every 4 steps a sharded checkpoint is kept: the run resumed from step 4 (as if interrupted there)
    fit += ["--trainer.max_steps", "10", "--checkpoint.save_top_k", "-1"]
    subprocess.run(fit, cwd=REPO, check=True, timeout=300, capture_output=True)
    (step4,) = (tmp_path / "ar-tiny" / "checkpoints").glob("*step=4*")
    subprocess.run([*fit, "--ckpt_path", str(step4)], cwd=REPO, check=True, timeout=300, capture_output=True)
    # the resumed run's own last checkpoint (Lightning names it last-v1 beside the first run's)
    ckpt = max((tmp_path / "ar-tiny" / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert is_sharded_checkpoint(ckpt) and read_checkpoint_meta(ckpt)["global_step"] == 10
    events = EventAccumulator(glob.glob(str(tmp_path / "ar-tiny" / "events*"))[0])
    events.Reload()
    assert {"perf/tokens_per_s", "perf/flops_per_s", "perf/mfu", "train/loss"} <= set(events.Tags()["scalars"])
    gen = subprocess.run([sys.executable, "-m", "lldiff.cli", "generate", "--ckpt", str(ckpt), "--prompt", "the quick",
                          "--max-new-tokens", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr[-2000:]


# -- validation on 1, 2 and 3 processes -------------------------------------------------------

VALIDATE_SCRIPT = REPO / "tests" / "scripts" / "distributed_validate.py"


def validate_on(devices, toy_corpus, cache_dir, out, *, objectives, strategies, rows):
    """``{"<objective>/<strategy>/<rows>": val/nll_per_token}`` of one torchrun launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(devices),
           str(VALIDATE_SCRIPT), "--corpus", str(toy_corpus), "--cache-dir", str(cache_dir), "--out", str(out),
           "--devices", str(devices), "--objectives", *objectives, "--strategies", *strategies,
           "--rows", *map(str, rows)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def one_process_values(toy_corpus, cache_dir, objectives, rows):
    spec = importlib.util.spec_from_file_location("distributed_validate", VALIDATE_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return {(o, r): script.validate_job(str(toy_corpus), str(cache_dir), objective=o, rows=r)
            for o in objectives for r in rows}


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_validation_shares_sum_to_the_one_process_value(objective, toy_corpus, cache_dir):
    """Each of W ranks' validation batches (W = 1, 2, 3; 1 and 7 rows in batches of 3)
    run through the module's validation_step: the ranks' summed nats and tokens equal one
    process's (no row counted twice, each batch drawn as one process draws it)."""
    from lldiff.data.eval_batches import eval_loader

    script = load_script()
    dm = PretrainDataModule(source="files", paths=[str(toy_corpus)], vocab_size=320, seq_len=16, batch_size=3,
                            val_max_rows=15, cache_dir=str(cache_dir))
    dm.setup("validate")
    extra = {} if registry.get(objective).exact_likelihood else {"eval_mc_samples": 2}
    torch.manual_seed(0)
    module = script.build_module(objective, size="tiny-0.03M", vocab_size=dm.vocab_size_real, **extra).eval()

    def sums(rows, rank, world):
        module.val_metric.reset()
        with torch.no_grad():
            for i, batch in enumerate(eval_loader(rows, 3, rank=rank, world_size=world)):
                module.validation_step(batch, i)
        return float(module.val_metric.nats), float(module.val_metric.tokens)

    for n in (1, 7):
        rows = torch.utils.data.Subset(dm.val_rows, range(n))
        nats, tokens = sums(rows, 0, 1)
        assert tokens == n * 16
        for world in (2, 3):
            shares = [sums(rows, r, world) for r in range(world)]
            assert sum(t for _, t in shares) == tokens
            assert sum(x for x, _ in shares) == pytest.approx(nats, rel=1e-6, abs=0), (n, world)


@pytest.mark.slow
def test_two_process_validation_equals_one_process(toy_corpus, cache_dir, tmp_path):
    """7 rows in batches of 3 on 2 processes: rank 1 pads with a batch weighted 0 instead of
    counting a row twice, and the MDM's Monte-Carlo draws follow the one-process batches."""
    reference = one_process_values(toy_corpus, cache_dir, ("ar", "mdm"), (7,))
    values = validate_on(2, toy_corpus, cache_dir, tmp_path / "w2.json", objectives=["ar", "mdm"],
                         strategies=["ddp"], rows=[7])
    for (objective, rows), expected in reference.items():
        assert values[f"{objective}/ddp/{rows}"] == pytest.approx(expected, rel=1e-6, abs=0), objective


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3])
def test_validation_is_the_same_on_any_number_of_processes(devices, toy_corpus, cache_dir, tmp_path):
    """15, 7 and 1 rows (5, 3 and 1 batches of 3; with 3 processes and 1 row two ranks only
    pad) under DDP and FSDP2 (every rank runs as many forward passes: no hang)."""
    rows = (15, 7, 1)
    reference = one_process_values(toy_corpus, cache_dir, ("ar", "mdm"), rows)
    values = validate_on(devices, toy_corpus, cache_dir, tmp_path / "w.json", objectives=["ar", "mdm"],
                         strategies=["ddp", "fsdp2"], rows=rows)
    for (objective, n), expected in reference.items():
        for strategy in ("ddp", "fsdp2"):
            assert values[f"{objective}/{strategy}/{n}"] == pytest.approx(expected, rel=1e-6, abs=0), (objective, n)
