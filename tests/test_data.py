"""Tests of the data layer: corpora, tokenizer, split, packing, caching and the DataModule.

All corpora are tiny synthetic files under ``tmp_path`` (or a small slice of the running
interpreter's stdlib), tokenizers have a few hundred ids, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lldiff.data import (
    EOS,
    MASK,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    Document,
    FilesCorpus,
    HubCorpus,
    PretrainDataModule,
    StdlibCorpus,
    Tokenizer,
    build_corpus,
    cache_root,
    join_documents,
    pack_rows,
    split_documents,
    split_paragraphs,
    train_tokenizer,
)
from lldiff.data import pipeline

VOCAB = 320
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sta", "ther", "ion", "pre", "vel", "qu", "zor", "é", "ß", "日本"]

TRICKY = [
    "",
    "plain ascii text",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\nand CRLF\r\n",
    "unicode: héllo wörld, 日本語, Ελληνικά, emoji 😀🚀, combining e\u0301, nbsp\u00a0, zwj \u200d",
    "literal specials: <|mask|> <|eos|><|bos|> <|pad|>",
    "<|mask|>",
    "<|eos|>",
    "x<|mask|>y<|mask|><|mask|>z",
    "\x00 control \x07 chars \x7f",
]


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def write_txt(path: Path, n_paragraphs: int, seed: int = 0, words_per: tuple[int, int] = (20, 60)) -> Path:
    """A .txt of blank-line separated paragraphs, each unique (numbered)."""
    rng = random.Random(seed)
    paragraphs = [f"Paragraph {i}:\n{words(rng, rng.randint(*words_per))}." for i in range(n_paragraphs)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(1)
    texts = [words(rng, 200) for _ in range(40)] + TRICKY
    return train_tokenizer(texts, VOCAB)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    return write_txt(tmp_path / "corpus.txt", 120)


def make_dm(tmp_path: Path, corpus: Path, **kwargs) -> PretrainDataModule:
    args = dict(
        source="files",
        paths=[str(corpus)],
        vocab_size=VOCAB,
        seq_len=32,
        batch_size=4,
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    args.update(kwargs)
    return PretrainDataModule(**args)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trips_byte_for_byte(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids).encode("utf-8") == text.encode("utf-8")


def test_literal_special_text_never_encodes_to_special_ids(tokenizer: Tokenizer) -> None:
    specials = set(tokenizer.special_ids)
    for text in TRICKY + ["".join(SPECIAL_TOKENS) * 3, " <|mask|>\n<|eos|>\t<|pad|> <|bos|>"]:
        assert specials.isdisjoint(tokenizer.encode(text)), text
    for batch in tokenizer.encode_batch(TRICKY):
        assert specials.isdisjoint(batch)
    # and the backend itself, as saved and reloaded, keeps that behaviour
    reloaded = Tokenizer.from_str(tokenizer.to_json())
    assert specials.isdisjoint(reloaded.encode("<|mask|><|eos|>"))


def test_mask_is_last_id_and_equals_real_vocab_size(tokenizer: Tokenizer) -> None:
    total = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    assert total == VOCAB + 1  # exactly V real ids + the mask
    assert tokenizer.vocab_size == VOCAB == tokenizer.mask_id
    assert tokenizer.backend.token_to_id(MASK) == total - 1
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (0, 1, 2)
    assert len(tokenizer) == VOCAB + 1


def test_token_bytes_sum_to_utf8_length(tokenizer: Tokenizer) -> None:
    tb = tokenizer.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (tokenizer.vocab_size,)
    assert tb[tokenizer.eos_id] == tb[tokenizer.bos_id] == tb[tokenizer.pad_id] == 0
    assert (tb[3:] > 0).all()
    for text in TRICKY:
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        assert int(tb[ids].sum()) == len(text.encode("utf-8")), text


def test_train_tokenizer_is_deterministic() -> None:
    rng = random.Random(5)
    texts = [words(rng, 100) for _ in range(20)]
    assert train_tokenizer(texts, 300).to_json() == train_tokenizer(texts, 300).to_json()


def test_vocab_size_too_small_is_rejected() -> None:
    with pytest.raises(ValueError, match=rf"vocab_size=258 is too small.*at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], 258)
    train_tokenizer(["some text"], MIN_VOCAB_SIZE)  # the minimum itself works (no merges)


def test_corpus_too_small_for_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"too small to learn vocab_size=5000.*smaller vocab_size"):
        train_tokenizer(["tiny corpus, tiny corpus"], 5000)


def test_save_and_load_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    loaded = Tokenizer.from_file(path)
    assert loaded.to_json() == tokenizer.to_json()
    assert loaded.mask_id == tokenizer.mask_id
    assert loaded.encode(TRICKY[4]) == tokenizer.encode(TRICKY[4])


def _rewrite_vocab(tokenizer: Tokenizer, tmp_path: Path, mutate) -> Path:
    spec = json.loads(tokenizer.to_json())
    mutate(spec)
    path = tmp_path / "bad_tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


def test_loaded_tokenizer_without_mask_is_rejected(tokenizer: Tokenizer, tmp_path: Path) -> None:
    def drop_mask(spec):
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != MASK]

    with pytest.raises(ValueError, match=r"lacks special token\(s\) \['<\|mask\|>'\]"):
        Tokenizer.from_file(_rewrite_vocab(tokenizer, tmp_path, drop_mask))


def test_loaded_tokenizer_with_mask_not_last_is_rejected(tmp_path: Path) -> None:
    # a plausible foreign tokenizer: <|mask|> registered first, so it has id 0 (a "real" id)
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270, special_tokens=[MASK, EOS, "<|bos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator([words(random.Random(0), 300)], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    match = r"<\|mask\|> has id 0 but must be the last id \(269\).*collides with a real token"
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------------


def test_txt_paragraph_split_and_file_unit(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\n\nfirst para\nline two\n\n\n  \n   indented second\r\n\r\nthird\n", encoding="utf-8")
    assert split_paragraphs(path.read_text()) == ["first para\nline two", "   indented second", "third\n"]
    docs = list(FilesCorpus([str(path)]).documents())
    assert [d.text for d in docs] == ["first para\nline two", "   indented second", "third\n"]
    assert [d.id for d in docs] == [f"{path.resolve()}#{i}" for i in range(3)]
    whole = list(FilesCorpus([str(path)], txt_unit="file").documents())
    assert len(whole) == 1 and whole[0].text == path.read_text()


def test_jsonl_parquet_glob_and_directory(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(["one", "", "two"])) + "\n\n"
    )
    pq.write_table(pa.table({"body": ["three", None, "four"]}), d / "b.parquet")
    docs = list(FilesCorpus([str(d / "*.jsonl"), str(d / "b.parquet")], text_field="body").documents())
    assert [doc.text for doc in docs] == ["one", "two", "three", "four"]
    assert [doc.text for doc in FilesCorpus([str(d)], text_field="body").documents()] == ["one", "two", "three", "four"]
    capped = list(FilesCorpus([str(d)], text_field="body", max_bytes=4).documents())
    assert [doc.text for doc in capped] == ["one", "two"]


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        FilesCorpus([str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.jsonl.* matched no files"):
        FilesCorpus([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.* is empty"):
        FilesCorpus([str(tmp_path / "empty.txt")])
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="blank.txt.* contains no text"):
        list(FilesCorpus([str(tmp_path / "blank.txt")]).documents())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported data file .*x\.csv.*\.txt, \.jsonl, \.parquet"):
        FilesCorpus([str(tmp_path / "x.csv")])
    (tmp_path / "r.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl.* has no field 'text'.*content"):
        FilesCorpus([str(tmp_path / "r.jsonl")])
    with pytest.raises(ValueError, match="at least one entry in paths"):
        FilesCorpus([])


def test_stdlib_corpus_is_deterministic_and_excludes_tests(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for rel in ["a.py", "pkg/__init__.py", "pkg/b.py", "test/test_x.py", "pkg/tests/t.py",
                "site-packages/c.py", "idlelib/idle_test/i.py", "notes.txt", "pkg/empty.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("" if rel.endswith("empty.py") else f"# {rel}\nx = 1\n")
    corpus = StdlibCorpus(max_bytes=None, root=str(root))
    assert [d.id for d in corpus.documents()] == ["a.py", "pkg/__init__.py", "pkg/b.py"]
    # the cap keeps whole files, deterministically, within the budget
    size = len("# a.py\nx = 1\n".encode())
    capped = StdlibCorpus(max_bytes=2 * size + 5, root=str(root))
    assert len(capped.files) == 2
    assert capped.fingerprint() == StdlibCorpus(max_bytes=2 * size + 5, root=str(root)).fingerprint()


def test_real_stdlib_subset() -> None:
    corpus = StdlibCorpus(max_bytes=200_000)
    docs = list(corpus.documents())
    assert docs and sum(len(d.text.encode()) for d in docs) <= 200_000
    ids = [d.id for d in docs]
    assert ids == sorted(ids)
    assert not any(part in {"test", "tests", "site-packages"} for i in ids for part in i.split("/"))
    assert [d.id for d in StdlibCorpus(max_bytes=200_000).documents()] == ids


def test_hub_corpus_with_mocked_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = {}

    def fake_load_dataset(name, config=None, split=None, revision=None, streaming=False):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return datasets.Dataset.from_dict({"story": ["once upon", "", "a time"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = HubCorpus("someone/stories", "cfg", "validation", text_field="story")
    docs = list(corpus.documents())
    assert [d.text for d in docs] == ["once upon", "a time"]
    assert calls == {"name": "someone/stories", "config": "cfg", "split": "validation", "streaming": False}
    assert list(HubCorpus("x", text_field="story", max_bytes=3).documents())[0].text == "once upon"
    assert calls["streaming"] is True
    with pytest.raises(ValueError, match=r"no field 'text'.*story"):
        list(HubCorpus("x").documents())
    with pytest.raises(ValueError, match="needs hub_name"):
        HubCorpus(None)


def test_build_corpus_rejects_unknown_source_and_conflicting_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data source 'books'; allowed: stdlib, files, hub"):
        build_corpus("books")
    with pytest.raises(ValueError, match=r"paths=.* given but source='stdlib'"):
        build_corpus("stdlib", paths=["x.txt"])
    with pytest.raises(ValueError, match="needs hub_name"):
        build_corpus("hub")


# ---------------------------------------------------------------------------------------------
# split and packing
# ---------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_document_level() -> None:
    docs = [Document(f"d{i}", f"document number {i}") for i in range(400)] + [Document("dup", "document number 7")]
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.id for d in val} == {d.id for d in val2} and {d.id for d in train} == {d.id for d in train2}
    assert {d.id for d in train}.isdisjoint({d.id for d in val})
    assert {d.text for d in train}.isdisjoint({d.text for d in val})  # duplicates stay together
    assert len(train) + len(val) == len(docs)
    assert 20 <= len(val) <= 60
    # a tiny corpus still gets one validation document
    train, val = split_documents([Document("a", "alpha"), Document("b", "beta")], 0.01)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_documents([Document("a", "alpha")], 0.1)
    with pytest.raises(ValueError, match=r"val_fraction must be strictly between 0 and 1, got 1\.0"):
        split_documents(docs, 1.0)


def test_pack_rows_shapes_and_stream_prefix(tokenizer: Tokenizer) -> None:
    texts = ["first doc", "second, longer document with more words", "x", "last one here"]
    encoded = tokenizer.encode_batch(texts)
    stream = join_documents(encoded, tokenizer.eos_id)
    assert len(stream) == sum(len(e) + 1 for e in encoded)
    seq_len = 5
    rows = pack_rows(stream, seq_len)
    assert rows.dtype == np.int32 and rows.shape == (len(stream) // (seq_len + 1), seq_len + 1)
    assert np.array_equal(rows.reshape(-1), stream[: rows.size])  # partial last row dropped
    # EOS after every document: splitting the stream at EOS gives back the documents
    pieces = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id) + 1)[:-1]
    assert [tokenizer.decode(p[:-1]) for p in pieces] == texts


# ---------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------


def test_datamodule_end_to_end(tmp_path: Path, corpus_file: Path) -> None:
    dm = make_dm(tmp_path, corpus_file)
    assert dm.vocab_size_real == VOCAB == dm.tokenizer.mask_id  # available before prepare/setup
    assert dm.token_bytes.shape == (VOCAB,)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_report == {"tokenizer": "built", "tokens": "built", "rows": "built"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 33) and batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"].max()) < dm.vocab_size_real  # never the mask id
    # rows reproduce the packed token stream of the training documents, EOS-separated
    train_docs, val_docs = dm.split()
    assert {d.text for d in train_docs}.isdisjoint({d.text for d in val_docs})
    stream = join_documents(dm.tokenizer.encode_batch([d.text for d in train_docs]), dm.tokenizer.eos_id)
    rows = dm.train_rows.rows
    assert np.array_equal(np.asarray(rows).reshape(-1), stream[: rows.size])
    val_loader = dm.val_dataloader()
    assert [b["input_ids"].tolist() for b in val_loader] == [b["input_ids"].tolist() for b in dm.val_dataloader()]
    assert sum(b["input_ids"].shape[0] for b in dm.test_dataloader()) == len(dm.val_rows)  # every row once


def test_second_setup_hits_every_cache(tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    dm = make_dm(tmp_path, corpus_file)
    dm.prepare_data()
    dm.setup("fit")
    first = [b["input_ids"] for b in dm.val_dataloader()]

    def forbidden(*args, **kwargs):
        raise AssertionError("cache miss: work was redone")

    monkeypatch.setattr(datasets.Dataset, "map", forbidden)
    monkeypatch.setattr(pipeline, "train_tokenizer", forbidden)
    dm2 = make_dm(tmp_path, corpus_file)
    monkeypatch.setattr(dm2.corpus, "documents", forbidden)  # the corpus is not even read
    dm2.prepare_data()
    dm2.setup("fit")
    assert dm2.cache_report == {"tokenizer": "hit", "tokens": "hit", "rows": "hit"}
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(first, dm2.val_dataloader()))
    # a different seq_len re-packs from the token cache without re-tokenising
    dm3 = make_dm(tmp_path, corpus_file, seq_len=16)
    dm3.setup("fit")
    assert dm3.cache_report == {"tokenizer": "hit", "tokens": "hit", "rows": "built"}
    assert dm3.train_rows.seq_len == 16


def test_cache_is_invalidated_when_the_file_changes(tmp_path: Path, corpus_file: Path) -> None:
    make_dm(tmp_path, corpus_file).prepare_data()
    write_txt(corpus_file, 130, seed=3)
    dm = make_dm(tmp_path, corpus_file)
    dm.prepare_data()
    assert dm.cache_report["tokenizer"] == "built"


def _train_batches(dm: PretrainDataModule, n: int = 5) -> list[torch.Tensor]:
    it = iter(dm.train_dataloader())
    return [next(it)["input_ids"] for _ in range(n)]


def test_train_order_depends_only_on_seed(tmp_path: Path, corpus_file: Path) -> None:
    dms = [make_dm(tmp_path, corpus_file, seed=s) for s in (7, 7, 8)]
    for dm in dms:
        dm.setup("fit")
    torch.manual_seed(0)
    a = _train_batches(dms[0])
    torch.manual_seed(999)  # the global seed must not matter
    b = _train_batches(dms[1])
    c = _train_batches(dms[2])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # epochs differ from each other but are reproducible (Lightning calls set_epoch)
    loader = dms[0].train_dataloader()
    epoch1 = [b["input_ids"] for b in loader]
    loader.sampler.set_epoch(1)
    epoch2 = [b["input_ids"] for b in loader]
    loader.sampler.set_epoch(0)
    assert all(torch.equal(x, y) for x, y in zip(epoch1, [b["input_ids"] for b in loader]))
    assert not all(torch.equal(x, y) for x, y in zip(epoch1, epoch2))
    assert all(torch.equal(x, y) for x, y in zip(epoch1, a))
    assert len(epoch1) == len(dms[0].train_rows) // 4  # drop_last


def test_val_max_rows_caps_validation(tmp_path: Path, corpus_file: Path) -> None:
    dm = make_dm(tmp_path, corpus_file, val_max_rows=3, seq_len=8)
    dm.setup("validate")
    assert len(dm.val_rows.rows) > 3 and len(dm.val_rows) == 3
    assert dm.val_rows.indices[0] == 0 and dm.val_rows.indices[-1] == len(dm.val_rows.rows) - 1


def test_given_tokenizer_path_is_used(tmp_path: Path, corpus_file: Path, tokenizer: Tokenizer) -> None:
    path = tokenizer.save(tmp_path / "my" / "tokenizer.json")
    dm = make_dm(tmp_path, corpus_file, tokenizer_path=str(path), vocab_size=10)  # vocab_size ignored
    assert dm.vocab_size_real == tokenizer.vocab_size
    dm.setup("fit")
    assert dm.cache_report["tokenizer"] == "given"


def test_stdlib_source_through_datamodule(tmp_path: Path) -> None:
    dm = PretrainDataModule(max_bytes=150_000, vocab_size=400, seq_len=64, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    assert dm.vocab_size_real == 400 and len(dm.train_rows) > len(dm.val_rows) > 0


def test_cache_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLDIFF_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cache_root() == tmp_path / "data" / "cache"
    monkeypatch.setenv("LLDIFF_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(source="books"), ValueError, r"unknown data source 'books'; allowed: stdlib, files, hub"),
        (dict(seq_len=0), ValueError, r"seq_len must be a positive integer, got 0"),
        (dict(batch_size=0), ValueError, r"batch_size must be a positive integer, got 0"),
        (dict(val_fraction=0.0), ValueError, r"val_fraction must be strictly between 0 and 1, got 0\.0"),
        (dict(val_fraction=1.5), ValueError, r"val_fraction must be strictly between 0 and 1, got 1\.5"),
        (dict(vocab_size=100), ValueError, r"vocab_size=100 is too small.*at least 259"),
        (dict(val_max_rows=0), ValueError, r"val_max_rows must be a positive integer, got 0"),
        (dict(paths=["/nonexistent/corpus.txt"]), FileNotFoundError, r"/nonexistent/corpus\.txt"),
        (dict(paths=["/nonexistent/*.txt"]), FileNotFoundError, r"glob '/nonexistent/\*\.txt' matched no files"),
        (dict(tokenizer_path="/nonexistent/tokenizer.json"), FileNotFoundError, r"tokenizer_path"),
        (dict(source="hub"), ValueError, r"needs hub_name"),
        (dict(source="stdlib", paths=["a.txt"]), ValueError, r"set source='files'"),
    ],
)
def test_datamodule_rejects_bad_arguments_up_front(tmp_path: Path, kwargs, error, match) -> None:
    args = dict(source="files", paths=[str(write_txt(tmp_path / "ok.txt", 5))], cache_dir=str(tmp_path / "c"))
    args.update(kwargs)
    if args["source"] != "files" and "paths" not in kwargs:
        args.pop("paths")
    with pytest.raises(error, match=match):
        PretrainDataModule(**args)
    assert not (tmp_path / "c").exists()  # no work was started


def test_corpus_too_small_for_one_row(tmp_path: Path) -> None:
    corpus = write_txt(tmp_path / "small.txt", 30, words_per=(3, 5))
    dm = PretrainDataModule(
        source="files", paths=[str(corpus)], vocab_size=MIN_VOCAB_SIZE, seq_len=4096, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match=r"split has only \d+ tokens, fewer than one row of seq_len \+ 1 = 4097"):
        dm.prepare_data()
    dm = PretrainDataModule(
        source="files", paths=[str(corpus)], vocab_size=MIN_VOCAB_SIZE, seq_len=8, batch_size=10_000,
        cache_dir=str(tmp_path / "c"),
    )
    with pytest.raises(ValueError, match=r"fewer than batch_size=10000"):
        dm.setup("fit")


def test_datamodule_signature_is_cli_friendly() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PretrainDataModule, "data")
    cfg = parser.parse_args(["--data.source=files", "--data.paths=[a.txt,b.txt]", "--data.seq_len=128"])
    assert cfg.data.paths == ["a.txt", "b.txt"] and cfg.data.seq_len == 128 and cfg.data.vocab_size == 4096
    assert "Real vocabulary size V of the trained tokenizer" in parser.format_help()


def test_lightning_fit_sees_the_seeded_batches(tmp_path: Path, corpus_file: Path) -> None:
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab_size + 1, 4)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())
            return self.emb(batch["input_ids"]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            assert batch["input_ids"].shape[1] == 33

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm(tmp_path, corpus_file)
    model = Recorder(dm.vocab_size_real)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    pl.seed_everything(123)
    trainer.fit(model, datamodule=dm)
    fresh = make_dm(tmp_path, corpus_file)
    fresh.setup("fit")
    expected = _train_batches(fresh, 3)
    assert len(model.seen) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.seen, expected))


def test_parallel_tokenisation_and_loader_workers_change_nothing(tmp_path: Path, corpus_file: Path) -> None:
    serial = make_dm(tmp_path / "a", corpus_file, num_proc=1)
    serial.setup("fit")
    parallel = make_dm(tmp_path / "b", corpus_file, num_proc=2, num_workers=2)
    parallel.setup("fit")
    assert parallel.cache_report["tokens"] == "built"
    assert np.array_equal(serial.train_rows.rows, parallel.train_rows.rows)
    assert all(torch.equal(x, y) for x, y in zip(_train_batches(serial, 3), _train_batches(parallel, 3)))
