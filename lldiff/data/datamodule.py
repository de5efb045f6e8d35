"""``PretrainDataModule``: packed pre-training rows for both the MDM and the AR objective."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ..loading import loader_options
from . import pipeline
from .cache import cache_root
from .corpora import Corpus, Document, build_corpus
from .eval_batches import eval_loader
from .packing import PackedRows, check_seq_len, evenly_spaced
from .resumable import TokenizedDataModule, data_parallel_rank
from .sampler import ResumableShuffleSampler
from .split import check_val_fraction, describe_split, split_documents
from .tokenizer import Tokenizer, check_vocab_size


class PretrainDataModule(TokenizedDataModule):
    """Text corpus -> byte-level BPE -> Arrow token cache -> packed rows -> batches.

    Batches are ``{"input_ids": LongTensor(batch_size, seq_len + 1)}``: documents joined with
    an EOS after each one, cut into rows of ``seq_len + 1`` tokens (AR shifts by one; the MDM
    scores the last ``seq_len`` tokens, so both objectives see the same tokens). The
    train/val split is document-level and deterministic (hash of the document text). Training
    order comes from a private ``torch.Generator`` seeded with ``seed``, so MDM and AR runs with
    the same seed see identical batches whatever the global seed. Every step is cached on disk
    and a second run skips tokenisation entirely.

    With ``unique_tokens=U`` training repeats a fixed set of U training tokens (data-constrained
    training): a run of D tokens makes D / U epochs (:meth:`epochs_for`), each a fresh
    permutation of the same rows. A row counts ``seq_len`` training tokens (the tokens both
    objectives score). U is rounded down to whole global batches (``batch_size`` x data-parallel
    world size x ``seq_len`` tokens) so every epoch trains on each capped row exactly once; the
    rows are evenly spaced over the training split (the same for every seed and objective) and
    are taken from the cached packed rows, so changing U never re-tokenises or re-packs.

    Args:
        source: Where documents come from: ``stdlib`` (Python standard-library sources of the
            running interpreter, offline, default), ``files`` (``paths``) or ``hub`` (``hub_name``).
        paths: For ``source=files``: ``.txt``/``.jsonl``/``.parquet`` files, globs or directories.
        text_field: Field of ``.jsonl`` records / column of ``.parquet`` files / Hub dataset
            feature holding the text.
        txt_unit: How ``.txt`` files become documents: ``paragraph`` (split at blank lines) or
            ``file`` (one document per file).
        hub_name: For ``source=hub``: Hugging Face dataset name, e.g. ``roneneldan/TinyStories``.
        hub_config: Hub dataset configuration name, if any.
        hub_split: Hub dataset split to read.
        hub_revision: Hub dataset revision (commit/tag) to pin, if any.
        max_bytes: Cap on the corpus text in bytes (None = source default: 4 MB for ``stdlib``,
            no cap for ``files``/``hub``; the Hub source then streams only what it needs).
        tokenizer_path: Existing ``tokenizer.json`` to use instead of training one (its last id
            must be ``<|mask|>``); ``vocab_size`` is then ignored.
        vocab_size: Real vocabulary size V of the trained tokenizer (the LM head's outputs);
            ``<|mask|>`` is appended as id V. At least 259 (256 bytes + eos, bos, pad).
        seq_len: Tokens the model sees per row; rows hold ``seq_len + 1`` tokens.
        batch_size: Rows per batch (train, val and test), per process under data parallelism.
        val_fraction: Fraction of documents held out for validation, in (0, 1).
        val_max_rows: Cap on validation/test rows (evenly spaced over the validation set) so
            validation stays cheap; None = all.
        num_workers: DataLoader worker processes.
        cache_dir: Cache root (default ``$LLDIFF_CACHE`` or ``./data/cache``).
        seed: Seed of the training-order generator (independent of the global seed).
        num_proc: Processes for ``datasets.map`` tokenisation (default 1: the Rust encoder is
            already multi-threaded; more processes only help on very large corpora).
        unique_tokens: Cap U on the unique training tokens (``seq_len`` per row), repeated over
            epochs; rounded down to whole global batches (``unique_tokens_effective``). At least
            one batch (``batch_size`` x ``seq_len``), at most the training split. None = no cap
            (one pass over the whole training split per epoch).
    """

    def __init__(
        self,
        source: str = "stdlib",
        paths: Optional[list[str]] = None,
        text_field: str = "text",
        txt_unit: str = "paragraph",
        hub_name: Optional[str] = None,
        hub_config: Optional[str] = None,
        hub_split: str = "train",
        hub_revision: Optional[str] = None,
        max_bytes: Optional[int] = None,
        tokenizer_path: Optional[str] = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        val_max_rows: Optional[int] = 256,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        seed: int = 1234,
        num_proc: Optional[int] = None,
        unique_tokens: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_seq_len(seq_len)
        _check_positive("batch_size", batch_size)
        if unique_tokens is not None:
            _check_unique_tokens(unique_tokens, batch_size, seq_len, world_size=1)
        check_val_fraction(val_fraction)
        if val_max_rows is not None:
            _check_positive("val_max_rows", val_max_rows)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if num_proc is not None:
            _check_positive("num_proc", num_proc)
        if tokenizer_path is None:
            check_vocab_size(vocab_size)
        elif not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer_path {tokenizer_path!r} does not exist")
        self.save_hyperparameters()
        self.corpus: Corpus = build_corpus(
            source,
            paths=paths,
            text_field=text_field,
            txt_unit=txt_unit,
            hub_name=hub_name,
            hub_config=hub_config,
            hub_split=hub_split,
            hub_revision=hub_revision,
            max_bytes=max_bytes,
        )
        self.tokenizer_path = tokenizer_path
        self.requested_vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_max_rows = val_max_rows
        self.num_workers = num_workers
        self.cache_root = cache_root(cache_dir)
        self.seed = seed
        self.num_proc = num_proc
        self.unique_tokens = unique_tokens
        """The requested cap U (None = no cap); see :attr:`unique_tokens_effective`."""
        self._world_size = 1  # data-parallel processes sharing one batch order (known at setup)
        self._logged_cap: Optional[int] = None
        self.cache_report: dict[str, str] = {}
        """Per cache step (``tokenizer``, ``tokens``, ``rows``): ``hit``, ``built`` or ``given``."""
        self._fingerprint: Optional[dict[str, Any]] = None
        self._split: Optional[tuple[list[Document], list[Document]]] = None
        self._tokenizer: Optional[Tokenizer] = None
        self._rows_dir: Optional[Path] = None
        self.train_rows: Optional[PackedRows] = None
        self.val_rows: Optional[PackedRows] = None
        self._sampler: Optional[ResumableShuffleSampler] = None

    # -- lazily computed pieces -------------------------------------------------------------

    @property
    def corpus_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = self.corpus.fingerprint()
        return self._fingerprint

    def split(self) -> tuple[list[Document], list[Document]]:
        """Read the corpus once and split it into (train, val) documents."""
        if self._split is None:
            self._split = split_documents(self.corpus.documents(), self.val_fraction)
            rank_zero_info(f"lldiff data: {self.corpus.source} corpus: {describe_split(*self._split)}")
        return self._split

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded from ``tokenizer_path`` or trained on the train split, cached)."""
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
                self.cache_report["tokenizer"] = "given"
            else:
                key = pipeline.tokenizer_key(self.corpus_fingerprint, self.requested_vocab_size, self.val_fraction)
                t0 = time.perf_counter()
                self._tokenizer, path, hit = pipeline.ensure_tokenizer(
                    self.cache_root, key, self.requested_vocab_size, lambda: [d.text for d in self.split()[0]]
                )
                self.cache_report["tokenizer"] = "hit" if hit else "built"
                if not hit:
                    rank_zero_info(f"lldiff data: trained tokenizer in {time.perf_counter() - t0:.1f}s -> {path}")
        return self._tokenizer

    # -- the unique-tokens cap ----------------------------------------------------------------

    @property
    def unique_rows(self) -> Optional[int]:
        """Training rows under the ``unique_tokens`` cap (None without a cap): U rounded down to
        whole global batches of ``batch_size`` x world size rows. Before ``setup`` the world
        size is taken as 1."""
        if self.unique_tokens is None:
            return None
        global_batch = self.batch_size * self._world_size
        return self.unique_tokens // (global_batch * self.seq_len) * global_batch

    @property
    def unique_tokens_effective(self) -> Optional[int]:
        """The training tokens actually repeated each epoch: ``unique_rows * seq_len`` (None
        without a cap)."""
        rows = self.unique_rows
        return None if rows is None else rows * self.seq_len

    def epochs_for(self, tokens: float) -> float:
        """Epochs over the capped rows that ``tokens`` training tokens make (``tokens`` / the
        effective U); NaN without a cap."""
        effective = self.unique_tokens_effective
        return math.nan if effective is None else tokens / effective

    def _capped_indices(self, n_train_rows: int) -> Optional[np.ndarray]:
        """Check the cap against this run's world size and training split; the capped rows."""
        if self.unique_tokens is None:
            return None
        _, self._world_size = data_parallel_rank(self.trainer)
        _check_unique_tokens(self.unique_tokens, self.batch_size, self.seq_len, self._world_size)
        split_tokens = n_train_rows * self.seq_len
        if self.unique_tokens > split_tokens:
            raise ValueError(
                f"unique_tokens={self.unique_tokens} exceeds the training split's {split_tokens} training tokens "
                f"({n_train_rows} rows x seq_len={self.seq_len}); use unique_tokens <= {split_tokens}, "
                f"or more text"
            )
        n_rows = self.unique_rows
        effective = self.unique_tokens_effective
        if effective != self.unique_tokens and self._logged_cap != effective:
            rank_zero_info(
                f"lldiff data: unique_tokens={self.unique_tokens} rounded down to {effective} = {n_rows} rows x "
                f"seq_len={self.seq_len} (whole global batches of {self.batch_size * self._world_size} rows)"
            )
            self._logged_cap = effective
        indices = evenly_spaced(n_train_rows, n_rows)
        assert len(indices) == n_rows, (len(indices), n_rows)
        return indices

    @property
    def token_bytes(self) -> torch.Tensor:
        """LongTensor (V,): UTF-8 bytes per real token (0 for specials), for bits per byte."""
        return self.tokenizer.token_bytes()

    # -- Lightning hooks ----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build (or find) the tokenizer, token cache and packed rows on disk."""
        rows_dir = self._ensure_rows()
        self._capped_indices(pipeline.load_meta(rows_dir)["train"]["rows"])  # fail before setup

    def setup(self, stage: Optional[str] = None) -> None:
        """Memory-map the packed rows (building them first if ``prepare_data`` did not run)."""
        rows = pipeline.load_rows(self._ensure_rows())
        if len(rows["train"]) < self.batch_size:
            raise ValueError(
                f"only {len(rows['train'])} training rows of seq_len + 1 = {self.seq_len + 1} tokens, fewer than "
                f"batch_size={self.batch_size}; use a smaller batch_size or seq_len, or more text"
            )
        self.train_rows = PackedRows(rows["train"], self._capped_indices(len(rows["train"])))
        self.val_rows = PackedRows(rows["val"], evenly_spaced(len(rows["val"]), self.val_max_rows))

    def _ensure_rows(self) -> Path:
        if self._rows_dir is not None:
            return self._rows_dir
        tokenizer = self.tokenizer
        t0 = time.perf_counter()
        tkey = pipeline.tokens_key(self.corpus_fingerprint, tokenizer, self.val_fraction)
        tokens_dir, hit = pipeline.ensure_tokens(self.cache_root, tkey, self.split, tokenizer, self.num_proc)
        self.cache_report["tokens"] = "hit" if hit else "built"
        rows_dir, hit = pipeline.ensure_rows(
            self.cache_root, pipeline.rows_key(tkey, self.seq_len), tokens_dir, self.seq_len
        )
        self.cache_report["rows"] = "hit" if hit else "built"
        meta = pipeline.load_meta(rows_dir)
        rank_zero_info(
            f"lldiff data: {meta['train']['rows']} train / {meta['val']['rows']} val rows of {self.seq_len + 1} "
            f"tokens (cache: {self.cache_report}, {time.perf_counter() - t0:.1f}s) in {rows_dir}"
        )
        self._rows_dir = rows_dir
        return rows_dir

    # -- loaders ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch by ``seed + epoch`` (see :class:`ResumableShuffleSampler`);
        incomplete last batch dropped. A run restored from a checkpoint continues with the
        exact batches an uninterrupted run would have seen.

        Under data parallelism ``batch_size`` is per process and the processes share one
        order: W processes with batch ``b`` train, step by step, on the rows one process
        with batch ``b W`` would (see :class:`DataParallelShuffleSampler`)."""
        rows = self._require(self.train_rows)
        self._sampler = self.train_sampler(len(rows))
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds; keeps the global RNG untouched
            **loader_options(self.trainer, self.num_workers),  # workers, persistent; pinned on CUDA
        )

    def val_dataloader(self) -> DataLoader:
        """Fixed order, the same rows for every run on this corpus/tokenizer/seq_len."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """Same rows as validation (there is no separate test split)."""
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        """Whole batches of the one-process order dealt to the ranks, padding weighted 0: the
        same value on any number of processes (:mod:`lldiff.data.eval_batches`)."""
        rank, world = data_parallel_rank(self.trainer)
        return eval_loader(
            self._require(self.val_rows), self.batch_size, rank=rank, world_size=world,
            generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
            **loader_options(self.trainer, self.num_workers),  # workers, persistent; pinned on CUDA
        )

    @staticmethod
    def _require(rows: Optional[PackedRows]) -> PackedRows:
        if rows is None:
            raise RuntimeError("PretrainDataModule.setup() must run before requesting a dataloader")
        return rows


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_unique_tokens(unique_tokens: int, batch_size: int, seq_len: int, world_size: int) -> None:
    """U is a positive int of at least one global batch of training tokens."""
    if isinstance(unique_tokens, bool) or not isinstance(unique_tokens, int) or unique_tokens < 1:
        raise ValueError(f"unique_tokens must be a positive integer (or None for no cap), got {unique_tokens!r}")
    if world_size == 1:
        batch, what = batch_size * seq_len, f"batch_size x seq_len = {batch_size} x {seq_len}"
    else:
        batch = batch_size * world_size * seq_len
        what = f"batch_size x world size x seq_len = {batch_size} x {world_size} x {seq_len}"
    if unique_tokens < batch:
        raise ValueError(
            f"unique_tokens={unique_tokens} is less than one batch of training tokens ({what} = {batch}); "
            f"use unique_tokens >= {batch} (it is rounded down to whole batches)"
        )
