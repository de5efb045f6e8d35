"""Shared fixtures: a tiny deterministic toy language written to a temp dir."""

import random
import warnings
from pathlib import Path

import pytest
import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine stitches later.",
    "seven silver swans swam slowly south.",
    "every good boy deserves fudge and cake.",
    "red lorry yellow lorry red lorry yellow lorry.",
    "she sells sea shells on the sea shore.",
]


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    """600 documents, each a few sentences drawn from six fixed ones: given any context the
    rest of a sentence is determined, so a model that learns drops far below the unigram
    entropy, and both objectives can do so in seconds."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 5))) for _ in range(600)]
    path = tmp_path_factory.mktemp("toy") / "toy.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (restored after it): tiny models' many small
    matmuls run faster alone than split across threads that other processes also use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_runs(toy_corpus, cache_dir, tmp_path_factory):
    """Checkpoints of a tiny MDM and AR fitted with `lldiff fit` on the toy corpus (seconds)."""
    from lldiff.launch import lightning_cli

    out = tmp_path_factory.mktemp("runs")
    repo = Path(__file__).resolve().parents[1]
    for objective in ("mdm", "ar"):
        lightning_cli([
            "fit", "--config", str(repo / "configs" / f"{objective}-tiny.yaml"),
            "--model.init_args.size", "tiny-0.1M", "--model.init_args.warmup_steps", "2",
            "--model.init_args.random_length_prob", "0.0",
            "--data.init_args.source", "files", "--data.init_args.paths", f"[{toy_corpus}]",
            "--data.init_args.max_bytes", "null", "--data.init_args.vocab_size", "320",
            "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8",
            "--data.init_args.cache_dir", str(cache_dir), "--trainer.max_steps", "20",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
        ])
    return {o: out / f"{o}-tiny" / "checkpoints" / "last.ckpt" for o in ("mdm", "ar")}


@pytest.fixture(scope="session")
def tiny_bd3_run(toy_corpus, cache_dir, tmp_path_factory):
    """The checkpoint of a tiny BD3 (blocks of 4 tokens: objective bd3-4) fitted like
    ``tiny_runs`` (a fixture of its own, so tests of the other objectives do not pay for it)."""
    from lldiff.launch import lightning_cli

    out = tmp_path_factory.mktemp("runs-bd3")
    repo = Path(__file__).resolve().parents[1]
    lightning_cli([
        "fit", "--config", str(repo / "configs" / "bd3-tiny.yaml"),
        "--model.init_args.size", "tiny-0.1M", "--model.init_args.warmup_steps", "2",
        "--model.init_args.block_size", "4", "--model.init_args.random_length_prob", "0.0",
        "--data.init_args.source", "files", "--data.init_args.paths", f"[{toy_corpus}]",
        "--data.init_args.max_bytes", "null", "--data.init_args.vocab_size", "320",
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8",
        "--data.init_args.cache_dir", str(cache_dir), "--trainer.max_steps", "20",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
    ])
    return out / "bd3-tiny" / "checkpoints" / "last.ckpt"


def load_benchmark(name: str):
    """A module of ``benchmarks/`` (not a package), loaded by path: e.g. ``load_benchmark("toy")``."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # benchmarks import their neighbours (toy) by name
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
