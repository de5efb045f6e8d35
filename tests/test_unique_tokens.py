"""The ``unique_tokens`` cap: a fixed set of U training tokens repeated over D / U epochs.

Checked against the arithmetic, not the implementation: batches are mapped back to rows of
the training split packed here independently from the split documents, so every claim (U
distinct tokens, k epochs, fresh permutations, no validation tokens) is about what the
loader actually yields.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lldiff.data import PretrainDataModule, join_documents, pack_rows
from lldiff.objectives.ar.modules import AutoregressiveLM

SEQ_LEN, BATCH = 16, 4
BATCH_TOKENS = BATCH * SEQ_LEN  # 64 training tokens per batch (a row of 17 scores 16)


def write_corpus(path: Path, n: int = 150) -> Path:
    """Numbered paragraphs of random syllables: every packed row is distinct."""
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ne", "ru", "sta", "ther", "ion", "pre", "vel", "qu", "zor"]
    paras = [f"Paragraph {i}: " + " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3)))
                                           for _ in range(rng.randint(10, 30))) for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("unique")
    return write_corpus(root / "corpus.txt"), root / "cache"


def make_dm(corpus, **kwargs) -> PretrainDataModule:
    path, cache = corpus
    args = dict(source="files", paths=[str(path)], vocab_size=300, seq_len=SEQ_LEN, batch_size=BATCH,
                val_fraction=0.2, val_max_rows=8, cache_dir=str(cache))
    return PretrainDataModule(**{**args, **kwargs})


@pytest.fixture(scope="module")
def packed(corpus):
    """The train and val splits packed here from the split documents: row bytes -> row index."""
    dm = make_dm(corpus)
    train_docs, val_docs = dm.split()
    out = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        stream = join_documents(dm.tokenizer.encode_batch([d.text for d in docs]), dm.tokenizer.eos_id)
        rows = pack_rows(stream, SEQ_LEN)
        out[name] = {r.tobytes(): i for i, r in enumerate(rows.astype(np.int64))}
        assert len(out[name]) == len(rows)  # rows are distinct, so content identifies a row
    assert not set(out["train"]).intersection(out["val"])
    return out


def epoch_rows(loader, epoch: int, train_index: dict[bytes, int]) -> list[int]:
    """Training-split row indices the loader yields in ``epoch``, in order."""
    loader.sampler.set_epoch(epoch)
    return [train_index[r.numpy().tobytes()] for b in loader for r in b["input_ids"]]


@pytest.mark.parametrize("requested, effective", [
    (5 * BATCH_TOKENS, 5 * BATCH_TOKENS),  # a whole number of batches: U itself
    (5 * BATCH_TOKENS + 63, 5 * BATCH_TOKENS),  # rounded down to whole batches
])
def test_epochs_repeat_exactly_the_capped_tokens(corpus, packed, requested, effective, caplog):
    dm = make_dm(corpus, unique_tokens=requested, seed=3)
    assert dm.unique_tokens_effective == effective and dm.unique_rows == effective // SEQ_LEN  # before setup
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
        dm.setup("validate")
    rounded = [r.getMessage() for r in caplog.records if "rounded down" in r.getMessage()]
    assert rounded == ([] if requested == effective else [f"lldiff data: unique_tokens={requested} rounded down to "
                                                         f"{effective} = {effective // SEQ_LEN} rows x seq_len=16 "
                                                         f"(whole global batches of 4 rows)"])
    assert dm.unique_tokens_effective == effective
    loader = dm.train_dataloader()
    epochs = [epoch_rows(loader, e, packed["train"]) for e in range(4)]
    capped = sorted(epochs[0])
    seen_positions, tokens = set(), 0
    for k, rows in enumerate(epochs, start=1):
        assert sorted(rows) == capped and len(set(rows)) == len(rows)  # a permutation of the capped rows
        seen_positions.update((r, p) for r in rows for p in range(1, SEQ_LEN + 1))  # the scored positions
        tokens += len(rows) * SEQ_LEN
        assert tokens / effective == k == dm.epochs_for(tokens)
    assert len(seen_positions) == effective
    assert all(a != b for a, b in zip(epochs, epochs[1:]))  # consecutive epochs are reshuffled
    # the subset spans the corpus and does not depend on the seed (MDM and AR share it too)
    assert capped[0] == 0 and capped[-1] == len(packed["train"]) - 1
    other = make_dm(corpus, unique_tokens=requested, seed=4)
    other.setup("fit")
    assert sorted(epoch_rows(other.train_dataloader(), 0, packed["train"])) == capped


def test_validation_tokens_are_never_among_the_capped_rows(corpus, packed):
    dm = make_dm(corpus, unique_tokens=20 * BATCH_TOKENS)
    dm.setup("fit")
    assert len(dm.train_rows) == 20 * BATCH
    indices = np.asarray(dm.train_rows.indices)
    assert indices.max() < len(packed["train"])  # indices into the training split ...
    assert not np.shares_memory(dm.train_rows.rows, dm.val_rows.rows)  # ... which is not the val array
    for i in range(len(dm.train_rows)):
        row = dm.train_rows[i]["input_ids"].numpy().tobytes()
        assert row in packed["train"] and row not in packed["val"]
    assert len(packed["val"]) == len(dm.val_rows.rows)  # all validation rows were compared


def fake_data_parallel(dm: PretrainDataModule, rank: int, world: int) -> None:
    """What ``data_parallel_rank`` reads from a DDP trainer: this process is ``rank`` of ``world``."""
    kwargs = {"rank": rank, "num_replicas": world}
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=kwargs))


def test_data_parallel_rounds_to_global_batches_and_ranks_share_each_epoch(corpus, packed):
    per_rank = []
    for rank in (0, 1):
        dm = make_dm(corpus, unique_tokens=7 * BATCH_TOKENS)  # 7 batches of one process
        fake_data_parallel(dm, rank, 2)
        dm.setup("fit")
        assert dm.unique_tokens_effective == 6 * BATCH_TOKENS  # 3 global batches of 2 x 4 rows
        per_rank.append(epoch_rows(dm.train_dataloader(), 1, packed["train"]))
    assert len(per_rank[0]) == len(per_rank[1]) == 3 * BATCH
    assert len(set(per_rank[0] + per_rank[1])) == 6 * BATCH  # every capped row once per epoch


@pytest.mark.parametrize("value", [0, -64, 64.0, True, "128"])
def test_unique_tokens_must_be_a_positive_int(corpus, value):
    with pytest.raises(ValueError, match=rf"unique_tokens must be a positive integer.*got {value!r}"):
        make_dm(corpus, unique_tokens=value, cache_dir=str(corpus[1].parent / "untouched"))
    assert not (corpus[1].parent / "untouched").exists()


def test_less_than_one_batch_fails_before_any_corpus_work(corpus, monkeypatch, tmp_path):
    import lldiff.data.datamodule as datamodule

    monkeypatch.setattr(datamodule, "build_corpus", lambda *a, **k: pytest.fail("corpus work started"))
    with pytest.raises(ValueError, match=r"unique_tokens=63 .*batch_size x seq_len = 4 x 16 = 64"):
        make_dm(corpus, unique_tokens=63, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_less_than_one_global_batch_fails_at_setup(corpus):
    dm = make_dm(corpus, unique_tokens=BATCH_TOKENS)  # one batch of one process: fine here
    fake_data_parallel(dm, 0, 2)
    with pytest.raises(ValueError, match=r"unique_tokens=64 .*batch_size x world size x seq_len = 4 x 2 x 16 = 128"):
        dm.setup("fit")


def test_more_than_the_training_split_fails_before_training(corpus, packed):
    split_tokens = len(packed["train"]) * SEQ_LEN
    make_dm(corpus, unique_tokens=split_tokens).setup("fit")  # all of it is allowed
    for hook in ("prepare_data", "setup"):
        dm = make_dm(corpus, unique_tokens=split_tokens + 1)
        with pytest.raises(ValueError, match=rf"unique_tokens={split_tokens + 1} exceeds .*'s {split_tokens} "):
            getattr(dm, hook)()


def test_no_cap_changes_nothing_and_the_cap_reuses_the_cached_rows(corpus):
    dm = make_dm(corpus)
    dm.setup("fit")
    assert dm.unique_tokens_effective is None and dm.unique_rows is None and dm.train_rows.indices is None
    assert np.isnan(dm.epochs_for(1000))
    capped = make_dm(corpus, unique_tokens=3 * BATCH_TOKENS)
    capped.setup("fit")
    assert capped.cache_report == {"tokenizer": "hit", "tokens": "hit", "rows": "hit"}
    assert capped.train_rows.rows.filename == dm.train_rows.rows.filename  # the same packed rows


def test_cli_parses_unique_tokens():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PretrainDataModule, "data")
    assert parser.parse_args([]).data.unique_tokens is None
    assert parser.parse_args(["--data.unique_tokens=4096"]).data.unique_tokens == 4096
    assert "Cap U on the unique training tokens" in parser.format_help()


# -- resume inside an epoch ---------------------------------------------------------------------


class Recorder(L.Callback):
    def __init__(self, crash_at: int | None = None):
        self.batches, self.crash_at = [], crash_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.crash_at:
            raise RuntimeError("simulated crash")


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.parametrize("every, crash_at", [(3, 7), (4, 10)], ids=["mid-epoch", "epoch-end"])
def test_resume_with_the_cap_matches_an_uninterrupted_run(corpus, tmp_path, every, crash_at):
    """Epochs of 4 batches, 12 steps: crash, resume from ``last.ckpt`` (step 6: epoch 1 after 2
    of its batches; step 8: the end of epoch 1) and end with the uninterrupted run's weights."""
    def run(dirpath, crash_at=None, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        dm = make_dm(corpus, unique_tokens=4 * BATCH_TOKENS)
        model = AutoregressiveLM(size="tiny-0.016M", vocab_size=dm.vocab_size_real, lr=3e-3, warmup_steps=2,
                                 random_length_prob=0.0)
        recorder = Recorder(crash_at)
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, callbacks=[recorder, ckpt],
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0)
        try:
            trainer.fit(model, dm, ckpt_path=ckpt_path)
        finally:
            run.batches = recorder.batches
        return model, dm

    reference, dm = run(tmp_path / "a")
    expected = run.batches
    assert len(expected) == 12 and dm.epochs_for(reference.tokens_seen) == 3.0
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", crash_at=crash_at)
    resumed_from = crash_at // every * every
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["PretrainDataModule"]
    # rows are counted within the capped epoch (16 rows); the end-of-epoch checkpoint holds a full epoch
    assert state["epoch"] == 1 and state["rows_in_epoch"] == resumed_from * BATCH - 4 * BATCH
    resumed, _ = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert len(run.batches) == 12 - resumed_from
    assert all(torch.equal(a, b) for a, b in zip(run.batches, expected[resumed_from:]))
    assert resumed.tokens_seen == reference.tokens_seen
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
