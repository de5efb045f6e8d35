"""Data layer: corpora, tokenizer, token cache, packing, the pre-training and SFT DataModules.

Flow: corpus (documents) -> document-level split -> byte-level BPE trained on the train split
-> Arrow token cache -> packed rows of ``seq_len + 1`` tokens -> ``PretrainDataModule`` batches.
See ``data/README.md`` for recipes.
"""

from .cache import cache_root
from .corpora import (
    SOURCES,
    Corpus,
    Document,
    FilesCorpus,
    HubCorpus,
    StdlibCorpus,
    build_corpus,
    split_paragraphs,
)
from .packing import PackedRows, join_documents, pack_rows
from .split import split_documents
from .tokenizer import (
    BOS,
    EOS,
    MASK,
    MIN_VOCAB_SIZE,
    PAD,
    SPECIAL_TOKENS,
    Tokenizer,
    train_tokenizer,
)


def __getattr__(name: str):
    # Lazy: importing the tokenizer or corpora (sampling, evaluation) does not pull in Lightning.
    if name == "PretrainDataModule":
        from .datamodule import PretrainDataModule

        return PretrainDataModule
    if name == "SFTDataModule":
        from .sft_datamodule import SFTDataModule

        return SFTDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BOS",
    "Corpus",
    "Document",
    "EOS",
    "FilesCorpus",
    "HubCorpus",
    "MASK",
    "MIN_VOCAB_SIZE",
    "PAD",
    "PackedRows",
    "PretrainDataModule",
    "SFTDataModule",
    "SOURCES",
    "SPECIAL_TOKENS",
    "StdlibCorpus",
    "Tokenizer",
    "build_corpus",
    "cache_root",
    "join_documents",
    "pack_rows",
    "split_documents",
    "split_paragraphs",
    "train_tokenizer",
]
