"""`lldiff tune`: search-space parsing and its errors, bad storages, pruning keyed on the
global step, exact trial counts over several worker processes, best params into a sweep spec."""

import multiprocessing
import random
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lldiff.sweep.spec import load_preset, load_spec
from lldiff.tune import TuneError
from lldiff.tune.cli import main as tune_main
from lldiff.tune.setup import RESERVED, load_setup, parse_overrides, trial_config
from lldiff.tune.space import parse_space
from lldiff.tune.storage import resolve_storage
from lldiff.tune.study import open_study, quiet_lightning, run_trial, run_worker

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, EVALS = 20, 4  # validations at global steps 5, 10, 15, 20, all within epoch 0

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def base_config(tmp_path, toy_corpus, cache_dir) -> Path:
    """configs/mdm-tiny.yaml shrunk to seconds per fit on the toy corpus (~140 batches/epoch)."""
    cfg = yaml.safe_load((REPO / "configs" / "mdm-tiny.yaml").read_text())
    cfg["model"]["init_args"].update(size="tiny-0.016M", warmup_steps=2, random_length_prob=0.0, val_mc_samples=2)
    cfg["data"]["init_args"].update(source="files", paths=[str(toy_corpus)], max_bytes=None, vocab_size=320,
                                    seq_len=32, batch_size=8, val_max_rows=16, cache_dir=str(cache_dir))
    cfg["trainer"].update(accelerator="cpu", max_steps=MAX_STEPS, num_sanity_val_steps=1)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_space(tmp_path, space: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space))
    return path


LR_SPACE = {"lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}


# -- search space ------------------------------------------------------------------------

def test_space_resolves_names_and_samples_each_type(tmp_path, base_config):
    space = {
        "lr": {"type": "float", "low": "1e-4", "high": 1.0e-2, "log": True},  # YAML's 1e-4 is a string
        "warmup_steps": {"type": "int", "low": 0, "high": 10, "step": 5},
        "data.batch_size": {"type": "categorical", "choices": [8, 16]},
        "vocab_size": {"type": "categorical", "choices": [320, 512]},  # model's is linked: the data's
        "trainer.gradient_clip_val": {"type": "float", "low": 0.5, "high": 2.0},
    }
    setup = load_setup(base_config, write_space(tmp_path, space))
    assert setup.space.to_dict() == {
        "model.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "model.warmup_steps": {"type": "int", "low": 0, "high": 10, "step": 5},
        "data.batch_size": {"type": "categorical", "choices": [8, 16]},
        "data.vocab_size": {"type": "categorical", "choices": [320, 512]},
        "trainer.gradient_clip_val": {"type": "float", "low": 0.5, "high": 2.0},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = setup.space.suggest(study.ask())
        assert 1e-4 <= values["model.lr"] <= 1e-2
        assert values["model.warmup_steps"] in range(0, 11, 5)
        assert values["data.batch_size"] in (8, 16) and 0.5 <= values["trainer.gradient_clip_val"] <= 2.0
    groups = setup.space.groups(values)
    assert set(groups) == {"model", "data", "trainer"} and set(groups["data"]) == {"batch_size", "vocab_size"}


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"lr": {"type": "float", "low": 0.01, "high": 0.001}}, r"lr: empty range: low=0.01 must be < high=0.001"),
        ({"lr": {"type": "float", "low": 0.01, "high": 0.01}}, r"empty range: low=0.01 must be < high=0.01"),
        ({"warmup_steps": {"type": "int", "low": 5, "high": 5}}, r"warmup_steps: empty range: low=5"),
        ({"data.batch_size": {"type": "categorical", "choices": []}}, r"batch_size: choices must be a non-empty list"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, r"log scale needs low > 0, got low=0.0"),
        ({"lr": {"type": "float", "low": -1.0, "high": 0.1, "log": True}}, r"log scale needs low > 0, got low=-1.0"),
        ({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, r"unknown type 'uniform'; allowed: float, int, categorical"),
        ({"lr": {"type": "float", "low": 0.1}}, r"lr: high is missing"),
        ({"lr": {"type": "float", "low": "small", "high": 0.2}}, r"low must be a number, got 'small'"),
        ({"warmup_steps": {"type": "int", "low": 0.5, "high": 10}}, r"low must be an integer for type int, got 0.5"),
        ({"lr": {"type": "float", "low": 0.1, "high": 0.2, "lg": True}}, r"unknown key\(s\) \['lg'\]"),
        ({"learning_rate": {"type": "float", "low": 0.1, "high": 0.2}},
         r"unknown parameter 'learning_rate': not an init arg of the model or data class.*allowed model: .*\blr\b"),
        ({"data.lr": {"type": "float", "low": 0.1, "high": 0.2}},
         r"unknown parameter 'data.lr': not an init arg of the data class; allowed data: .*batch_size"),
        ({"size": {"type": "categorical", "choices": ["tiny-0.1M"]}}, r"'size' cannot be searched: a study is for one size"),
        ({"trainer.max_steps": {"type": "int", "low": 10, "high": 20}}, r"cannot be searched: every trial runs --max-steps"),
        ({"betas": {"type": "categorical", "choices": [[0.9, 0.95]]}}, r"choices must be scalars"),
    ],
)
def test_bad_space_is_refused_naming_the_value(tmp_path, base_config, entry, message):
    with pytest.raises(TuneError, match=message):
        load_setup(base_config, write_space(tmp_path, entry))


def test_bare_name_in_model_and_data_is_ambiguous():
    targets = {"model": {"seed", "lr"}, "data": {"seed"}, "trainer": set()}
    with pytest.raises(TuneError, match=r"'seed' is ambiguous: write model.seed or data.seed"):
        parse_space({"seed": {"type": "int", "low": 0, "high": 9}}, targets, {})
    assert parse_space({"data.seed": {"type": "int", "low": 0, "high": 9}}, targets, {}).params[0].name == "data.seed"
    with pytest.raises(TuneError, match="non-empty mapping"):
        parse_space({}, targets, RESERVED)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(objective="gpt"), r"unknown objective 'gpt'; allowed: ar, mdm, bd3-B"),
        (dict(size="tiny-7M"), r"unknown size 'tiny-7M'; known sizes: .*tiny-0.016M"),
        (dict(max_steps=22), r"--max-steps 22 is not a multiple of --evals 4"),
        (dict(max_steps=0), r"--max-steps must be >= 1, got 0"),
        (dict(max_steps=8, evals=2, space={"warmup_steps": {"type": "int", "low": 0, "high": 10}}),
         r"warmup_steps reaches 10, more than half of --max-steps 8; allowed: at most 4"),
        (dict(max_steps=8, evals=2, space={"warmup_steps": {"type": "int", "low": 0, "high": 5}}),
         r"warmup_steps reaches 5, more than half of --max-steps 8; allowed: at most 4"),
        (dict(max_steps=2, evals=1), r"model.init_args.warmup_steps=2 is 2 steps, more than half of --max-steps 2"),
        (dict(max_steps=8, evals=2, overrides=[("model.init_args.warmup_steps", None)]),
         r"the default warmup_steps \(SMDM's max\(1% of steps, 100\)\) is 8 steps, more than half"),
        (dict(overrides=[("trainer.max_steps", 4)]), r"--trainer.max_steps cannot be overridden.*--max-steps"),
        (dict(overrides=[("model.init_args.size", "tiny-0.1M")]), r"--model.init_args.size cannot be overridden"),
        (dict(overrides=[("optimizer.lr", 1)]), r"unknown option --optimizer.lr"),
        (dict(overrides=[("data.init_args.val_max_row", 4)]), r"unknown data.init_args \['val_max_row'\]"),
        (dict(overrides=[("trainer.precison", "32")]), r"unknown trainer option\(s\) \['precison'\]"),
    ],
)
def test_bad_setup_is_refused(tmp_path, base_config, kwargs, message):
    space = write_space(tmp_path, kwargs.pop("space", LR_SPACE))
    with pytest.raises(TuneError, match=message):
        load_setup(base_config, space, **kwargs)


def test_config_overrides_reach_every_trial(tmp_path, base_config, capsys):
    """`tune run` takes `lldiff fit`-style overrides after its own options, for every trial."""
    setup = load_setup(base_config, write_space(tmp_path, LR_SPACE), max_steps=8, evals=2,
                       overrides=parse_overrides(["--data.init_args.val_max_rows", "4", "--trainer.precision=32-true"]))
    cfg = trial_config(setup, {"model.lr": 1e-3}, tmp_path, 0)
    assert cfg["data"]["init_args"]["val_max_rows"] == 4 and cfg["trainer"]["precision"] == "32-true"
    out = tmp_path / "tune"
    tune_main(["run", "--config", str(base_config), "--space", str(write_space(tmp_path, LR_SPACE)), "--n-trials", "1",
               "--max-steps", "4", "--evals", "2", "--out", str(out), "--pruner", "none",
               "--data.init_args.val_max_rows", "4"])
    written = yaml.safe_load((out / "trials" / "0000" / "config.yaml").read_text())
    assert written["data"]["init_args"]["val_max_rows"] == 4
    assert "A new study created" not in "".join(capsys.readouterr())  # Optuna's banner is silenced (item 14)
    with pytest.raises(SystemExit) as exit_info:
        tune_main(["run", "--config", str(base_config), "--space", str(write_space(tmp_path, LR_SPACE)),
                   "--n-trials", "1", "--out", str(tmp_path / "o2"), "--data.init_args.val_max_rows"])
    assert exit_info.value.code == 2
    assert "--data.init_args.val_max_rows needs a value" in capsys.readouterr().err


def test_a_runs_saved_config_is_a_base_config(tmp_path, base_config):
    """A run's config.yaml (with `fit`'s ckpt_path/weights_only: null) can seed a study."""
    saved = yaml.safe_load(base_config.read_text())
    saved.update(ckpt_path=None, weights_only=None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    setup = load_setup(path, write_space(tmp_path, LR_SPACE), max_steps=8, evals=2)
    assert "ckpt_path" not in setup.base and "weights_only" not in setup.base
    saved["ckpt_path"] = "last"
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(TuneError, match="ckpt_path is set; every trial trains from scratch"):
        load_setup(path, write_space(tmp_path, LR_SPACE), max_steps=8, evals=2)


def test_switching_objective_drops_args_the_other_class_lacks(tmp_path, base_config):
    setup = load_setup(base_config, write_space(tmp_path, LR_SPACE), objective="ar", size="tiny-0.03M")
    model = setup.base["model"]
    assert model["class_path"] == "lldiff.objectives.ar.modules.AutoregressiveLM"
    assert model["init_args"]["size"] == "tiny-0.03M" and "mask_eps" not in model["init_args"]
    assert setup.describe()["objective"] == "ar"


def test_a_bd3_objective_is_tuned_with_its_class_and_block_size(tmp_path, base_config, capsys):
    """--objective bd3-4 on an MDM config: BlockDiffusionLM with block_size 4, which no search
    may change; one tiny trial runs to a finite validation loss."""
    setup = load_setup(base_config, write_space(tmp_path, LR_SPACE), objective="bd3-4")
    model = setup.base["model"]
    assert model["class_path"] == "lldiff.objectives.bd3.modules.BlockDiffusionLM" and model["init_args"]["block_size"] == 4
    assert model["init_args"]["mask_eps"] == 1.0e-3  # the MDM config's args the BD3 class also takes are kept
    assert setup.describe()["objective"] == "bd3-4"
    with pytest.raises(TuneError, match=r"'block_size' cannot be searched: the objective bd3-4 fixes it"):
        load_setup(base_config, write_space(tmp_path, {"block_size": {"type": "categorical", "choices": [4, 8]}},
                                            "bad.yaml"), objective="bd3-4")
    out = tmp_path / "tune"
    tune_main(["run", "--config", str(base_config), "--space", str(write_space(tmp_path, LR_SPACE)), "--objective",
               "bd3-4", "--n-trials", "1", "--max-steps", "4", "--evals", "2", "--out", str(out), "--pruner", "none"])
    assert "ran trials [0]" in capsys.readouterr().out
    (trial,) = optuna.load_study(study_name="lldiff-tune", storage=f"sqlite:///{out}/study.db").trials
    assert trial.state == TrialState.COMPLETE and 0 < trial.value < 20 and sorted(trial.intermediate_values) == [2, 4]
    config = yaml.safe_load((out / "trials" / "0000" / "trial.yaml").read_text())
    assert config["model"]["class_path"] == "lldiff.objectives.bd3.modules.BlockDiffusionLM"
    assert config["model"]["init_args"]["block_size"] == 4


def test_the_objective_is_read_from_a_bd3_config(tmp_path, base_config):
    cfg = yaml.safe_load(base_config.read_text())
    bd3 = yaml.safe_load((REPO / "configs" / "bd3-tiny.yaml").read_text())["model"]
    cfg["model"] = {"class_path": bd3["class_path"], "init_args": {**cfg["model"]["init_args"], "block_size": 8}}
    path = tmp_path / "bd3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    setup = load_setup(path, write_space(tmp_path, LR_SPACE))
    assert setup.objective == "bd3-8" and setup.base["model"]["init_args"]["block_size"] == 8
    ar = load_setup(path, write_space(tmp_path, LR_SPACE), objective="ar")  # switching drops block_size
    assert ar.base["model"]["class_path"] == "lldiff.objectives.ar.modules.AutoregressiveLM"
    assert "block_size" not in ar.base["model"]["init_args"]


# -- storages ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "url,message",
    [
        ("sqlite:////nonexistent-dir-lldiff/x/study.db", r"storage 'sqlite:////nonexistent-dir-lldiff/x/study.db' cannot be reached"),
        ("postgresql://tuner:s3cret@127.0.0.1:9/optuna",
         r"storage 'postgresql://tuner:\*\*\*@127.0.0.1:9/optuna' cannot be reached"),
        ("nosuchdb://host/db", r"storage 'nosuchdb://host/db' cannot be reached: NoSuchModuleError"),
        ("journal:/nonexistent-dir-lldiff/study.log", r"journal storage 'journal:/nonexistent-dir-lldiff/study.log': directory"),
        ("study.db", r"unrecognised storage 'study.db'; allowed: an RDB URL .* journal:PATH"),
    ],
)
def test_unreachable_storage_is_named(tmp_path, url, message):
    with pytest.raises(TuneError, match=message) as info:
        resolve_storage(url, tmp_path)
    assert "s3cret" not in str(info.value)


def test_storage_syntaxes_open(tmp_path):
    default = resolve_storage(None, tmp_path)
    assert default.spec == f"sqlite:///{tmp_path.resolve()}/study.db" and default.claim_lock is not None
    for spec in (f"journal:{tmp_path}/a.log", str(tmp_path / "b.journal")):
        journal = resolve_storage(spec, tmp_path)
        assert isinstance(journal.storage, optuna.storages.JournalStorage) and journal.spec.startswith("journal:")


def test_cli_refuses_bad_input_before_any_trial(tmp_path, base_config, capsys):
    out = tmp_path / "out"
    bad_space = write_space(tmp_path, {"lr": {"type": "float", "low": 1.0, "high": 0.1}})
    with pytest.raises(SystemExit) as exit_info:
        tune_main(["run", "--config", str(base_config), "--space", str(bad_space), "--n-trials", "2", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "lldiff tune: error:" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        tune_main(["run", "--config", str(base_config), "--space", str(write_space(tmp_path, LR_SPACE)),
                   "--n-trials", "2", "--out", str(out), "--storage", "postgresql://u@127.0.0.1:9/db"])
    assert "storage 'postgresql://u@127.0.0.1:9/db' cannot be reached" in capsys.readouterr().err
    assert not (out / "trials").exists()


# -- exact trial counts over several processes ---------------------------------------------

def _claiming_worker(storage_spec: str, out: str, n_trials: int, seed: int, queue) -> None:
    """A worker process: the real open + claim loop around a trial that only sleeps."""
    rng = random.Random(seed)

    def trial_fn(trial: optuna.Trial) -> float:
        time.sleep(rng.uniform(0.0, 0.05))
        return trial.suggest_float("x", 0.0, 1.0)

    try:
        storage = resolve_storage(storage_spec, Path(out))
        study = open_study(storage, "claims")
        queue.put(run_worker(study, storage.claim_lock, n_trials, trial_fn, log=lambda line: None))
    except BaseException as error:  # reported, so the test fails at once instead of waiting
        queue.put(repr(error))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_together_run_exactly_n_trials(tmp_path, kind):
    """Four processes create/join one study at once and race for trials: exactly N trials,
    numbers 0..N-1, each run by one worker."""
    spec = None if kind == "sqlite" else f"journal:{tmp_path}/study.log"  # created by the racing workers
    n_trials, context = 13, multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_claiming_worker, args=(spec, str(tmp_path), n_trials, i, queue)) for i in range(4)]
    for worker in workers:
        worker.start()
    ran = [queue.get(timeout=120) for _ in workers]
    assert all(isinstance(numbers, list) for numbers in ran), ran
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    trials = open_study(resolve_storage(spec, tmp_path), "claims").trials
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(n for numbers in ran for n in numbers) == list(range(n_trials))  # none twice, none lost


# -- pruning keyed on the global step ------------------------------------------------------

def test_step_pruning_prunes_a_diverging_trial_within_one_epoch(tmp_path, base_config):
    space = write_space(tmp_path, {"lr": {"type": "float", "low": 1.0e-3, "high": 20.0, "log": True}})
    setup = load_setup(base_config, space, max_steps=MAX_STEPS, evals=EVALS)
    storage = resolve_storage(None, tmp_path)
    study = open_study(storage, "prune", setup, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.enqueue_trial({"model.lr": 3e-3})  # a sane trial first
    study.enqueue_trial({"model.lr": 10.0})  # absurd: diverges in the first steps
    with quiet_lightning():
        run_worker(study, storage.claim_lock, 2, lambda trial: run_trial(setup, trial, tmp_path), log=lambda line: None)
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [5, 10, 15, 20]  # global steps; the sanity check (step 0) is not reported
    assert good.value == pytest.approx(good.intermediate_values[20])
    assert bad.state == TrialState.PRUNED and bad.params == {"model.lr": 10.0}
    step = bad.user_attrs["pruned_at_step"]
    assert step == max(bad.intermediate_values) and step in (5, 10, 15) and 0 not in bad.intermediate_values
    assert bad.user_attrs["pruned_at_epoch"] == 0  # one epoch: an epoch-keyed callback would never have pruned
    assert bad.intermediate_values[step] > good.intermediate_values[step]
    assert (tmp_path / "trials" / "0001" / "trial.yaml").is_file() and not (tmp_path / "trials" / "0002").exists()


# -- the command, resumption, best params into a sweep spec ----------------------------------

def test_tune_run_then_best_into_spec(tmp_path, base_config, capsys):
    space = write_space(tmp_path, {**LR_SPACE, "data.batch_size": {"type": "categorical", "choices": [4, 8]}})
    out = tmp_path / "tune"
    args = ["run", "--config", str(base_config), "--space", str(space), "--n-trials", "2", "--max-steps", "8",
            "--evals", "2", "--out", str(out), "--pruner", "none", "--seed", "0"]
    tune_main(args)
    printed = capsys.readouterr().out
    assert "ran trials [0, 1]" in printed and "best: trial" in printed
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001"]
    tune_main(args)  # the study already holds 2 trials: nothing runs twice
    assert "2/2 trials" in (again := capsys.readouterr().out) and "ran trials none" in again
    with pytest.raises(SystemExit):  # another setup on the same study is refused
        tune_main([*args[:-4], "--max-steps", "4"])
    assert "was created with another setup; differing max_steps" in capsys.readouterr().err

    spec_out = tmp_path / "demo-tuned.yaml"
    tune_main(["best", "--out", str(out), "--into-spec", "demo", "--spec-out", str(spec_out)])
    printed = capsys.readouterr().out
    study = optuna.load_study(study_name="lldiff-tune", storage=f"sqlite:///{out}/study.db")
    best = study.best_trial
    spec = load_spec(spec_out)
    assert spec.size_args["tiny-0.016M"] == {"lr": best.params["model.lr"]}
    preset = load_preset("demo")  # everything but the tuned size's args stays the preset's
    assert (spec.model, spec.objective_args, spec.sizes) == (preset.model, preset.objective_args, preset.sizes)
    assert "not written" in printed and "data.batch_size" in printed
    with pytest.raises(SystemExit):
        tune_main(["best", "--out", str(out), "--into-spec", "demo", "--size", "tiny-3.5M", "--spec-out", str(spec_out)])
    assert "size 'tiny-3.5M' is not in the sweep spec's sizes" in capsys.readouterr().err


# -- the real command, several processes (slow: each process imports torch and Lightning) ----

def _tune_command(base_config, space, out, *extra):
    return [sys.executable, "-m", "lldiff.cli", "tune", "run", "--config", str(base_config), "--space", str(space),
            "--n-trials", "4", "--max-steps", "8", "--evals", "2", "--out", str(out), *extra]


def _assert_exactly(study: optuna.Study, out: Path, n: int) -> None:
    assert sorted(t.number for t in study.trials) == list(range(n))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:04d}" for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_cli_processes_share_one_study(tmp_path, base_config, storage):
    space, out = write_space(tmp_path, LR_SPACE), tmp_path / "tune"
    extra = ["--storage", f"journal:{tmp_path}/study.log"] if storage == "journal" else []
    out.mkdir()
    procs = [subprocess.Popen(_tune_command(base_config, space, out, *extra, "--seed", str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    resolved = resolve_storage(extra[1] if extra else None, out)
    _assert_exactly(optuna.load_study(study_name="lldiff-tune", storage=resolved.storage), out, 4)


@pytest.mark.slow
def test_workers_flag_launches_subprocess_workers(tmp_path, base_config):
    space, out = write_space(tmp_path, LR_SPACE), tmp_path / "tune"
    done = subprocess.run(_tune_command(base_config, space, out, "--workers", "2"), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[worker 0] study" in done.stdout and (out / "logs" / "worker-1.log").is_file()
    _assert_exactly(optuna.load_study(study_name="lldiff-tune", storage=f"sqlite:///{out}/study.db"), out, 4)


@pytest.mark.slow
def test_sigterm_records_the_running_trial_as_failed(tmp_path, base_config):
    """A worker stopped with SIGTERM (kill, scancel) tells the study its trial FAILED,
    instead of leaving it RUNNING for ever."""
    space, out = write_space(tmp_path, LR_SPACE), tmp_path / "tune"
    proc = subprocess.Popen(_tune_command(base_config, space, out, "--max-steps", "4000", "--evals", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "trials" / "0000" / "trial.yaml").is_file() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        time.sleep(3)  # inside fit
        proc.terminate()
        log = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15, log[-3000:]
    (trial,) = optuna.load_study(study_name="lldiff-tune", storage=f"sqlite:///{out}/study.db").trials
    assert trial.state == TrialState.FAIL
