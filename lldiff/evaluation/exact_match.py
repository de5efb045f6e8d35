"""Exact-match recall: a model's greedy answers to instructions or to masked spans, scored
against the expected text (the reversal study, SPEC §8 and §12).

Two kinds of item, both JSON records:

* **instruction** ``{"prompt", "response"}``: the prompt is rendered with a chat template and
  answered by ``lldiff.completion.complete`` (LLaDA's reverse process with EOS padding, or
  AR decoding);
* **infill** ``{"prefix", "answer", "suffix"}``: the text ``prefix + answer + suffix`` as one
  pre-training document (EOS on both sides), the answer's tokens masked. A model whose
  objective lets infilling see the right context (registry ``infill_sees_right_context``: the
  MDM) fills the span seeing both sides (``lldiff.objectives.mdm.decoding.infill``, as many masks as the
  answer has tokens); the others (AR, BD3: nothing attends to later blocks) continue ``prefix``
  by as many tokens with their decoder, their only possible view.

``ExactMatchProbe`` runs both during training and logs ``probe/<name>`` to the logger, so
the accuracy curves sit beside the loss in TensorBoard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from lldiff import objectives as registry
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import complete
from lldiff.data.chat import ChatTemplate, Message
from lldiff.data.sft import encode_prompt
from lldiff.data.tokenizer import Tokenizer
from lldiff.model import Transformer
from lldiff.objectives.mdm.decoding import infill

BATCH = 128


def normalise(text: str) -> str:
    """What exact match compares: the text with surrounding whitespace removed."""
    return text.strip()


def accuracy(answers: Sequence[str], expected: Sequence[str]) -> float:
    """Share of ``answers`` equal to ``expected`` after ``normalise`` (0 for no items)."""
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers for {len(expected)} expected values")
    hits = sum(normalise(a) == normalise(e) for a, e in zip(answers, expected))
    return hits / len(expected) if expected else 0.0


def item_kind(item: Mapping[str, str]) -> str:
    if {"prompt", "response"} <= item.keys():
        return "instruction"
    if {"prefix", "answer", "suffix"} <= item.keys():
        return "infill"
    raise ValueError(f"an exact-match item needs prompt/response (instruction) or prefix/answer/suffix (infill) "
                     f"keys, got {sorted(item)}")


def expected_text(item: Mapping[str, str]) -> str:
    return item["response"] if item_kind(item) == "instruction" else item["answer"]


@torch.no_grad()
def instruction_answers(model: Transformer, tokenizer: Tokenizer, items: Sequence[Mapping[str, str]],
                        template: ChatTemplate, options: DecodeOptions) -> list[str]:
    """Greedy answers to ``items``' prompts, decoded and cut at EOS."""
    prompts = [encode_prompt(tokenizer, template, [Message("user", item["prompt"])]) for item in items]
    answers: list[str] = []
    for start in range(0, len(prompts), BATCH):
        out = complete(model, prompts[start:start + BATCH], options, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, generator=torch.Generator().manual_seed(0))
        answers += [tokenizer.decode(a) for a in out.answers]
    return answers


@torch.no_grad()
def infill_answers(model: Transformer, tokenizer: Tokenizer, items: Sequence[Mapping[str, str]]) -> list[str]:
    """Each item's masked span as the model fills it (see the module docstring)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_id
    encoded = [(tokenizer.encode(i["prefix"]), len(tokenizer.encode(i["answer"])), tokenizer.encode(i["suffix"]))
               for i in items]
    answers: list[str] = [""] * len(items)
    if not registry.of_model(model).infill_sees_right_context:
        for n in sorted({n for _, n, _ in encoded}):
            rows = [k for k, (_, m, _) in enumerate(encoded) if m == n]
            for start in range(0, len(rows), BATCH):
                chunk = rows[start:start + BATCH]
                out = complete(model, [[eos, *encoded[k][0]] for k in chunk], DecodeOptions(length=n),
                               eos_id=eos, pad_id=tokenizer.pad_id)
                for k, ids in zip(chunk, out.answers):
                    answers[k] = tokenizer.decode(ids)
        return answers
    mask = model.cfg.mask_id
    canvases = [[eos, *p, *([mask] * n), *s, eos] for p, n, s in encoded]
    for length in sorted({len(c) for c in canvases}):
        rows = [k for k, c in enumerate(canvases) if len(c) == length]
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            canvas = torch.tensor([canvases[k] for k in chunk], device=device)
            filled = infill(model, canvas, mask_id=mask)
            for k, row in zip(chunk, filled.tolist()):
                first = 1 + len(encoded[k][0])
                answers[k] = tokenizer.decode(row[first:first + encoded[k][1]])
    return answers


def answers_for(model: Transformer, tokenizer: Tokenizer, items: Sequence[Mapping[str, str]], *,
                template: ChatTemplate | None = None, options: DecodeOptions | None = None) -> list[str]:
    """Answers to a list of items of one kind (instructions need ``template`` and ``options``)."""
    kinds = {item_kind(i) for i in items}
    if len(kinds) > 1:
        raise ValueError(f"one list holds one kind of item, got {sorted(kinds)}")
    if kinds == {"instruction"}:
        if template is None or options is None:
            raise ValueError("instruction items need a chat template and decode options")
        return instruction_answers(model, tokenizer, items, template, options)
    return infill_answers(model, tokenizer, items)


def read_items(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """The JSON-lines items of ``path`` (the first ``limit``), each checked for its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exact-match item file {str(path)!r} does not exist")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, item in enumerate(items, 1):
        try:
            item_kind(item)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    return items[:limit]


class ExactMatchProbe(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of fitting), the exact-match
    accuracy of each item file in ``items`` (name -> JSON-lines path), logged as
    ``probe/<name>``. Instruction items use ``template`` (a ``ChatTemplate`` mapping) and
    ``answer_tokens`` / ``block_length``; at most ``max_items`` items of each file are used."""

    def __init__(self, items: dict[str, str], every_n_steps: int = 100, max_items: int | None = None,
                 template: dict[str, str] | None = None, answer_tokens: int = 16,
                 block_length: int | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not items:
            raise ValueError("ExactMatchProbe needs at least one item file")
        self.sets = {name: read_items(path, max_items) for name, path in items.items()}
        self.every_n_steps = every_n_steps
        self.template = ChatTemplate.from_config(template)
        self.options = DecodeOptions(length=answer_tokens, block_length=block_length)
        self._last_step = -1

    def evaluate(self, model: Transformer, tokenizer: Tokenizer) -> dict[str, float]:
        return {f"probe/{name}": accuracy(answers_for(model, tokenizer, items, template=self.template,
                                                      options=self.options), [expected_text(i) for i in items])
                for name, items in self.sets.items()}

    def _probe(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or trainer.logger is None or not trainer.is_global_zero:
            return
        self._last_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            metrics = self.evaluate(pl_module.model, trainer.datamodule.tokenizer)
        finally:
            pl_module.train(was_training)
        trainer.logger.log_metrics(metrics, step=step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._probe(trainer, pl_module)
