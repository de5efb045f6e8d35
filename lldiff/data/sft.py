"""Supervised fine-tuning data: JSONL conversations -> (prompt, response) token rows.

Pure pieces (no Lightning): :func:`read_jsonl` (records with their line numbers),
:func:`encode_turns` (template, tokeniser, over-long policy) and :func:`collate` (EOS
padding and the response mask). :class:`SFTDataModule` wires them to Lightning.

Row layout (SPEC §3): ``[EOS] prompt response EOS EOS ...``. The leading EOS is the
document separator the model saw before every pre-training document (a template's ``begin``
replaces it: LLaDA's rows start with BOS, and its responses end with ``<|eot_id|>``); the response is
followed by at least one EOS and padded with EOS to the batch's longest row (or to a fixed
length). The response mask covers the response and all of its EOS padding, which are the
tokens the MDM may mask and both objectives score; the prompt is never masked and never
scored.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .chat import ChatTemplate, Message, Turn, expand_turns, parse_record
from .tokenizer import Tokenizer

OVERLONG_POLICIES = ("truncate", "drop")
PAD_MODES = ("batch", "fixed")


@dataclass(frozen=True)
class EncodedTurn:
    prompt: tuple[int, ...]
    response: tuple[int, ...]  # the response text's tokens and its closing EOS (if not truncated)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass
class EncodeStats:
    """How many examples the over-long policy touched (logged at set-up)."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0


def read_jsonl(path: str | Path) -> list[tuple[str, Any]]:
    """``(where, record)`` for each non-blank line, ``where`` = ``"file:line"``. A line that
    is not JSON raises ``ValueError`` naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
    return records


def load_turns(paths: Sequence[str | Path]) -> list[Turn]:
    """Every assistant turn of every conversation in ``paths`` (multi-turn expanded)."""
    turns: list[Turn] = []
    for path in paths:
        for where, record in read_jsonl(path):
            turns.extend(expand_turns(parse_record(record, where)))
    return turns


def conversation_start(tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    """The ids every conversation starts with: the template's ``begin`` (LLaDA: BOS), else the
    tokenizer's document start (lldiff: EOS)."""
    if template.begin is None:
        return [tokenizer.document_start_id]
    return tokenizer.encode_marked([(template.begin, True)])


def encode_prompt(tokenizer: Tokenizer, template: ChatTemplate, history: Sequence[Message]) -> list[int]:
    """``start + rendered history + generation prefix``: what the model continues (SFT rows'
    prompts and ``lldiff chat`` encode alike)."""
    return [*conversation_start(tokenizer, template), *tokenizer.encode_marked(template.prompt_segments(history))]


def encode_turns(
    turns: Iterable[Turn],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    max_length: int,
    overlong: str = "truncate",
) -> tuple[list[EncodedTurn], EncodeStats]:
    """Tokenise each turn as ``start + prompt`` and ``response + closing + [EOS]`` (``start``:
    :func:`conversation_start`; ``closing``: the template's ``response_closing``, if any).

    An example longer than ``max_length`` tokens is dropped (``overlong="drop"``) or
    truncated (``"truncate"``): the prompt loses its oldest tokens first (the start tokens
    and the generation prefix stay, the most recent context is kept), and only when the
    response alone does not fit is the response cut at its end (it then has no closing
    EOS, since the real answer goes on).
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r}; allowed: {', '.join(OVERLONG_POLICIES)}")
    turns = list(turns)
    eos = tokenizer.eos_id
    start = conversation_start(tokenizer, template)
    prefix = tokenizer.encode_marked([(template.generation_prefix, True)])
    closing = tokenizer.encode_marked([(template.response_closing, True)])
    if max_length < len(start) + len(prefix) + 2:
        raise ValueError(f"max_length={max_length} cannot hold the start, the generation prefix "
                         f"{template.generation_prefix!r} and a response token; use at least {len(start) + len(prefix) + 2}")
    histories = tokenizer.encode_marked_batch(
        [[piece for m in t.history for piece in template.message_segments(m)] for t in turns])
    responses = tokenizer.encode_batch([t.response for t in turns])
    stats, encoded = EncodeStats(), []
    for history, response in zip(histories, responses):
        prompt, answer = [*start, *history, *prefix], [*response, *closing, eos]
        stats.examples += 1
        if len(prompt) + len(answer) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            room_for_answer = max_length - len(start) - len(prefix)
            answer = answer[:room_for_answer]
            keep_history = max_length - len(answer) - len(start) - len(prefix)
            prompt = [*start, *history[len(history) - keep_history:], *prefix] if keep_history else [*start, *prefix]
        encoded.append(EncodedTurn(tuple(prompt), tuple(answer)))
    return encoded, stats


def collate(examples: Sequence[EncodedTurn], eos_id: int, pad_to: int | None = None) -> dict[str, Tensor]:
    """Rows of ``prompt + response``, right-padded with EOS to the longest row (or to
    ``pad_to``). Returns ``input_ids`` (B, L), ``response_mask`` (B, L) bool (response and
    EOS padding) and ``prompt_lengths`` (B,)."""
    width = max(len(e) for e in examples)
    if pad_to is not None:
        if width > pad_to:
            raise ValueError(f"an example has {width} tokens, more than pad_to={pad_to}")
        width = pad_to
    ids = torch.full((len(examples), width), eos_id, dtype=torch.long)
    response = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, example in enumerate(examples):
        p, n = len(example.prompt), len(example)
        ids[row, :n] = torch.tensor(example.prompt + example.response)
        response[row, p:] = True
    prompt_lengths = torch.tensor([len(e.prompt) for e in examples], dtype=torch.long)
    return {"input_ids": ids, "response_mask": response, "prompt_lengths": prompt_lengths}


def split_turns(turns: Sequence[Turn], val_fraction: float) -> tuple[list[Turn], list[Turn]]:
    """Deterministic split by a hash of the conversation so far (the same turns always land
    on the same side, whatever the file order). Turns of one conversation may land on
    different sides; give ``val_files`` for a split by conversation."""
    if val_fraction <= 0:
        return list(turns), []
    train, val = [], []
    for turn in turns:
        key = json.dumps([[m.role, m.content] for m in turn.history] + [turn.response]).encode()
        (val if zlib.crc32(key) % 10_000 < val_fraction * 10_000 else train).append(turn)
    return train, val

