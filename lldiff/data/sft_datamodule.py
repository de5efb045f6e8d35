"""``SFTDataModule``: chat-formatted (prompt, response) batches for both SFT objectives."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ..loading import loader_options
from .chat import ChatTemplate, saved_template
from .eval_batches import eval_loader
from .packing import evenly_spaced
from .resumable import TokenizedDataModule, data_parallel_rank
from .sft import (
    OVERLONG_POLICIES,
    PAD_MODES,
    EncodedTurn,
    EncodeStats,
    collate,
    encode_turns,
    load_turns,
    split_turns,
)
from .tokenizer import Tokenizer


def resolve_tokenizer_path(path: str | Path) -> Path:
    """A ``tokenizer.json``, or a checkpoint / run directory whose run holds one."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return path
    candidates = [path / "tokenizer.json"] if path.is_dir() else [path.parent / "tokenizer.json",
                                                                  path.parent.parent / "tokenizer.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"tokenizer_path {str(path)!r}: no tokenizer.json there; give the pre-training run's tokenizer.json, "
        f"its run directory or one of its checkpoints"
    )


class SFTDataModule(TokenizedDataModule):
    """JSONL conversations -> chat template -> ``[EOS] prompt response EOS...`` rows.

    Each line of a data file is ``{"messages": [{"role": "system"|"user"|"assistant",
    "content": "..."}, ...]}`` or a pair ``{"prompt": "...", "response": "..."}``. Every
    assistant turn becomes one example whose prompt is the whole conversation before it
    (see :mod:`lldiff.data.chat`). Batches are ``input_ids`` (B, L), ``response_mask``
    (B, L: response and its EOS padding) and ``prompt_lengths`` (B,).

    Args:
        train_files: JSONL files of conversations or prompt/response pairs.
        val_files: held-out JSONL files; when None, ``val_fraction`` of the training turns
            are held out (deterministically by content).
        val_fraction: fraction of turns held out when ``val_files`` is None (0: no validation).
        tokenizer_path: the pre-trained model's ``tokenizer.json``, or its run directory or
            checkpoint (the run directory holds ``tokenizer.json``).
        template: chat template: a preset (``plain``, ``llada``) or patterns ``{system, user,
            assistant}``, each with one ``{content}`` slot, plus optional ``begin`` (start text,
            default the EOS token) and ``close_response`` (see :class:`lldiff.data.chat.ChatTemplate`).
            None: the template saved beside the tokenizer (``chat_template.json``, written by
            ``lldiff import llada``), else ``plain`` (``"User: {content}\\n"``,
            ``"Assistant: {content}\\n"``, ``"System: {content}\\n"``).
        max_length: longest row in tokens (the model's context for fine-tuning).
        overlong: ``truncate`` (the oldest prompt tokens go first; the response is cut only
            if it alone does not fit) or ``drop``; the counts are logged.
        pad_to: ``batch`` (EOS-pad responses to the batch's longest row, LLaDA) or ``fixed``
            (to ``max_length``). The padding is part of the target either way.
        batch_size: examples per batch.
        val_max_examples: cap on validation examples (evenly spaced); None = all.
        seed: seed of the training order (private generator; resumes exactly).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_files: list[str],
        tokenizer_path: str,
        val_files: list[str] | None = None,
        val_fraction: float = 0.05,
        template: dict[str, str | bool | None] | str | None = None,
        max_length: int = 256,
        overlong: str = "truncate",
        pad_to: str = "batch",
        batch_size: int = 16,
        val_max_examples: int | None = 256,
        seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not train_files:
            raise ValueError("train_files is empty: give at least one JSONL file")
        missing = [f for f in [*train_files, *(val_files or [])] if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"SFT data file(s) do not exist: {missing}")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong={overlong!r}; allowed: {', '.join(OVERLONG_POLICIES)}")
        if pad_to not in PAD_MODES:
            raise ValueError(f"pad_to={pad_to!r}; allowed: {', '.join(PAD_MODES)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.save_hyperparameters()
        self.template = ChatTemplate.from_config(template)  # validates the patterns now
        self.tokenizer_file = resolve_tokenizer_path(tokenizer_path)
        self.tokenizer = Tokenizer.from_file(self.tokenizer_file)
        if template is None:
            self.template = saved_template(Path(self.tokenizer_file).parent) or self.template
        self.seq_len = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.stats: dict[str, EncodeStats] = {}
        self.train_examples: list[EncodedTurn] | None = None
        self.val_examples: list[EncodedTurn] | None = None

    @property
    def token_bytes(self) -> torch.Tensor:
        """LongTensor (V,): UTF-8 bytes per real token (0 for specials), for ``val/bpb``."""
        return self.tokenizer.token_bytes()

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        hp = self.hparams
        turns = load_turns(hp.train_files)  # every file is parsed (and checked) before any training
        if hp.val_files:
            train_turns, val_turns = turns, load_turns(hp.val_files)
        else:
            train_turns, val_turns = split_turns(turns, hp.val_fraction)
        encode = functools.partial(encode_turns, tokenizer=self.tokenizer, template=self.template,
                                   max_length=hp.max_length, overlong=hp.overlong)
        self.train_examples, self.stats["train"] = encode(train_turns)
        val_examples, self.stats["val"] = encode(val_turns)
        self.val_examples = [val_examples[i] for i in evenly_spaced(len(val_examples), hp.val_max_examples)]
        if len(self.train_examples) < self.batch_size:
            raise ValueError(
                f"only {len(self.train_examples)} training examples (after the over-long policy), fewer than "
                f"batch_size={self.batch_size}; use a smaller batch_size or more data"
            )
        for split, s in self.stats.items():
            rank_zero_info(f"lldiff sft data: {split}: {s.examples} turns, {s.truncated} truncated, "
                           f"{s.dropped} dropped (over max_length={hp.max_length}, overlong={hp.overlong})")

    def _collate(self):
        pad_to = self.hparams.max_length if self.hparams.pad_to == "fixed" else None
        return functools.partial(collate, eos_id=self.tokenizer.eos_id, pad_to=pad_to)

    def train_dataloader(self) -> DataLoader:
        examples = self._require(self.train_examples)
        sampler = self.train_sampler(len(examples))
        return DataLoader(examples, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=self._collate(), **loader_options(self.trainer, self.hparams.num_workers),
                          generator=torch.Generator().manual_seed(self.seed))  # keeps the global RNG untouched

    def val_dataloader(self) -> DataLoader | list:
        examples = self._require(self.val_examples)
        if not examples:
            return []
        rank, world = data_parallel_rank(self.trainer)  # the same value on any number of processes
        return eval_loader(examples, self.batch_size, rank=rank, world_size=world, collate=self._collate(),
                           **loader_options(self.trainer, self.hparams.num_workers),
                           generator=torch.Generator().manual_seed(0))

    @staticmethod
    def _require(examples: list[EncodedTurn] | None) -> list[EncodedTurn]:
        if examples is None:
            raise RuntimeError("SFTDataModule.setup() must run before requesting a dataloader")
        return examples
