"""`lldiff chat`: talk to a fine-tuned checkpoint (AR, MDM or BD3), using its chat template.

    lldiff chat --ckpt runs/sft-mdm-tiny/checkpoints/last.ckpt                      # interactive (a terminal)
    lldiff chat --ckpt X --message "next line after: import os"                     # one-shot
    lldiff chat --ckpt X --message "hi" --message "and then?"                       # several turns, one-shot
    printf 'first question\\nfollow-up\\n' | lldiff chat --ckpt X                    # turns from stdin

The template is ``--template`` (a YAML file or a preset: ``plain``, ``llada``), else the one the
checkpoint was fine-tuned with (``data.init_args.template`` in the run's ``config.yaml``, or
``chat_template.json`` in its run directory), else an imported LLaDA's (LLaDA-Instruct's
headers, whose special tokens encode to their ids), else ``plain``. Each turn's prompt
is the whole conversation so far (oldest turns are dropped when it outgrows the context).
The MDM answers with the LLaDA reverse process in semi-autoregressive blocks
(``--block-length``, default ``min(32, --length)``; ``--length`` must be whole blocks) with
low-confidence remasking, exactly or with Fast-dLLM's approximate ``--cache prefix`` /
``--cache dual`` (SPEC §10); the BD3 block by block in its own blocks (``--steps-per-block``),
``--length`` a budget; the AR decodes with a KV cache. Answers end at the first EOS (or
end-of-turn token, ``<|eot_id|>`` for LLaDA). After
each answer a line on stderr gives the model calls, tokens/s of the answer's real tokens and the
token positions processed per answer position (of the --length budget). In a terminal,
``/reset`` starts over (and says so) and ``/quit`` (or Ctrl-D) leaves.

Option values are used exactly as given or refused (exit code 2), before the checkpoint is
loaded where they do not depend on it; options of another objective's decoder (the registry's
``decode_options``) are refused once the checkpoint is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
import yaml

from lldiff.checkpoint import LoadedModel, load_model
from lldiff.objectives.common.remasking import DECODER_REMASKING
from lldiff.objectives.common.decoding import Completion, DecodeOptions
from lldiff.completion import check_context, complete
from lldiff.data.chat import ChatTemplate, Message, saved_template
from lldiff.data.sft import encode_prompt
from lldiff.generate import (
    check_blocks,
    check_dual_cache,
    check_sources,
    check_values,
    one_line_errors,
    refuse,
    refuse_foreign_options,
    stats,
)
from lldiff.inputs import check_text, read_lines, read_yaml_file


class ChatSession:
    """A conversation with one model: keeps the history, renders it, decodes each answer."""

    def __init__(self, loaded: LoadedModel, template: ChatTemplate, options: DecodeOptions,
                 system: str | None = None, seed: int = 0) -> None:
        if loaded.tokenizer is None:
            raise ValueError(f"no tokenizer for {loaded.path}; pass --tokenizer PATH")
        self.loaded, self.template, self.options = loaded, template, options
        self.system = [Message("system", system)] if system else []
        self.history: list[Message] = []
        self.generator = torch.Generator(device=next(loaded.model.parameters()).device).manual_seed(seed)
        self.last: tuple[Completion, float, int] | None = None  # the latest answer's decoding, seconds, tokens

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self) -> list[int]:
        """``[EOS] + rendered conversation + generation prefix``, dropping the oldest
        exchanges (never the system message or the latest user turn) until it fits."""
        tok, context = self.loaded.tokenizer, self.loaded.config.max_seq_len
        history = list(self.history)
        while True:
            ids = encode_prompt(tok, self.template, self.system + history)
            if len(ids) + self.options.length <= context or len(history) <= 1:
                check_context(len(ids), self.options.length, context)
                return ids
            history = history[1:]

    def reply(self, text: str) -> str:
        self.history.append(Message("user", text))
        tok = self.loaded.tokenizer
        start = time.perf_counter()
        out = complete(self.loaded.model, [self.prompt_ids()], self.options, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       generator=self.generator)
        seconds = time.perf_counter() - start
        answer_ids = list(out.answers[0])
        if tok.eot_id is not None and tok.eot_id in answer_ids:  # the turn ends at its end-of-turn token
            answer_ids = answer_ids[:answer_ids.index(tok.eot_id)]
        self.last = (out, seconds, len(answer_ids))
        answer = tok.decode(answer_ids, skip_special_tokens=True).strip()
        self.history.append(Message("assistant", answer))
        return answer

    def stats(self) -> str:
        """``[MDM: N model calls, T tokens/s (A answer tokens in S s), P tokens processed per answer
        position]`` of the latest answer (its real tokens, up to its end of turn)."""
        out, seconds, tokens = self.last
        return f"[{self.loaded.objective.label}: {stats(out, self.options, 1, seconds, tokens)}]"


def run_template(ckpt: Path) -> ChatTemplate | None:
    """The chat template of the checkpoint's run: the one it was fine-tuned with
    (``data.init_args.template`` in ``config.yaml``, or ``chat_template.json`` beside its
    tokenizer: an SFT run's resolved template, an imported LLaDA's), or a LLaDA directory's own."""
    if ckpt.is_dir() and (ckpt / "config.json").is_file():  # a Hugging Face LLaDA directory
        from lldiff.interop.llada import chat_template

        fields = (chat_template(ckpt) or {}).get("template")
        return ChatTemplate.from_config(fields) if fields else None
    for config in (ckpt.parent.parent / "config.yaml", ckpt.parent / "config.yaml"):
        if config.is_file():
            data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
            pattern = (data.get("init_args") or {}).get("template")
            if pattern is not None:
                return ChatTemplate.from_config(pattern)
            break
    for directory in (ckpt.parent.parent, ckpt.parent):
        saved = saved_template(directory)
        if saved is not None:
            return saved
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(prog="lldiff chat", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--ckpt", required=True, help="checkpoint (usually of a fine-tuning run)")
    parser.add_argument("--message", action="append", help="a user turn (repeat for several); no terminal needed")
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--template", help="YAML {system, user, assistant[, begin, close_response]} patterns, or a "
                        "preset name (plain, llada) (default: the run's, or an imported LLaDA's)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's run directory)")
    parser.add_argument("--length", type=int, default=64,
                        help="answer tokens: MDM canvas / AR and BD3 budget (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, help="RNG seed for sampling (default 0; needs --temperature > 0 "
                        "or --remasking random)")
    parser.add_argument("--device", default="cpu")
    mdm = parser.add_argument_group("MDM")
    mdm.add_argument("--block-length", type=int,
                     help="semi-autoregressive block, dividing --length (default: min(32, --length))")
    mdm.add_argument("--steps", type=int,
                     help="model calls per answer, a multiple of the number of blocks (default: --length)")
    mdm.add_argument("--cache", choices=["none", "prefix", "dual"],
                     help="Fast-dLLM's approximate KV cache (default none: exact); dual needs --block-length < --length")
    bd3 = parser.add_argument_group("BD3")
    bd3.add_argument("--steps-per-block", type=int, help="model calls per block (default: the block size)")
    diffusion = parser.add_argument_group("diffusion (MDM and BD3)")
    diffusion.add_argument("--remasking", choices=DECODER_REMASKING, help="default low_confidence")
    diffusion.add_argument("--threshold", type=float, help="confidence threshold in (0, 1] for --remasking "
                           "threshold (default 0.9)")
    diffusion.add_argument("--cfg-scale", type=float, help="classifier-free guidance w (default 0: off)")
    return parser


def main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    check_values(args, parser)
    if args.block_length is not None or args.steps is not None or args.cache is not None:  # MDM-only: known now
        block = check_blocks(parser, args.length, "--length", args.block_length, args.steps)
        check_dual_cache(parser, args.cache, args.length, "--length", block)
    seed = 0 if args.seed is None else args.seed
    check_sources(args, parser)
    closed = stdin is None or getattr(stdin, "closed", False)
    interactive = not args.message and not closed and stdin.isatty()
    try:  # the turns and the template are read before the checkpoint
        for text in [*(args.message or []), *([args.system] if args.system else [])]:
            check_text(text, "--message" if text in (args.message or []) else "--system")
        turns = None if interactive else args.message or read_lines(stdin, "message")
        given = None if not args.template else Path(args.template)
        given_template = None if given is None else ChatTemplate.from_config(
            read_yaml_file(given, "--template") if given.is_file() else args.template)
    except (ValueError, OSError) as error:
        refuse(parser, str(error))
    if turns is not None and not turns:
        parser.error("no message: give --message TEXT, lines on stdin, or run in a terminal")
    try:
        loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
        objective = loaded.objective
        refuse_foreign_options(args, objective, parser)
        block = None
        if "block_length" in objective.decode_options:  # a canvas in blocks: --length must be whole blocks
            block = check_blocks(parser, args.length, "--length", args.block_length, args.steps)
        options = DecodeOptions.for_objective(  # every option given applies (refused above otherwise)
            objective, length=args.length, temperature=args.temperature, steps=args.steps, block_length=block,
            remasking=args.remasking, threshold=args.threshold, cfg_scale=args.cfg_scale,
            steps_per_block=args.steps_per_block, cache=args.cache)
        template = given_template or run_template(Path(args.ckpt)) or ChatTemplate()
        session = ChatSession(loaded, template, options, system=args.system, seed=seed)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if not interactive:
        for text in turns:
            print(session.reply(text), file=stdout, flush=True)
            print(session.stats(), file=sys.stderr, flush=True)
        return
    print(f"lldiff chat: {loaded.objective.label} {loaded.config.name} ({args.ckpt}); /reset, /quit", file=stdout)
    while True:
        try:
            text = _read_turn(stdin, stdout).strip()
        except EOFError:
            print(file=stdout)
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            session.reset()
            print("lldiff chat: conversation cleared" + (" (the system message is kept)" if args.system else ""),
                  file=stdout, flush=True)
            continue
        try:
            check_text(text, "input")
        except ValueError as error:  # one bad line does not end the conversation
            print(f"lldiff chat: error: {error}", file=sys.stderr, flush=True)
            continue
        if text:
            print(f"model> {session.reply(text)}", file=stdout, flush=True)
            print(session.stats(), file=sys.stderr, flush=True)


def _read_turn(stdin: TextIO, stdout: TextIO) -> str:
    if stdin is sys.stdin:
        return input("you> ")  # line editing in a terminal
    print("you> ", end="", file=stdout, flush=True)
    line = stdin.readline()
    if not line:
        raise EOFError
    return line
