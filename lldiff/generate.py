"""`lldiff generate`: sample from a trained checkpoint (AR, MDM or BD3).

    lldiff generate --ckpt runs/mdm-tiny/checkpoints/last.ckpt --prompt "def main(" --gen-length 64
    lldiff generate --ckpt runs/mdm-tiny/checkpoints/last.ckpt --prompt "def main(" --cache dual --remasking threshold
    lldiff generate --ckpt runs/ar-tiny/checkpoints/last.ckpt --prompt "import os" --max-new-tokens 64 --temperature 0.8 --top-p 0.9
    lldiff generate --ckpt runs/bd3-tiny/checkpoints/last.ckpt --prompt "import os" --max-new-tokens 64 --steps-per-block 4
    echo "class Foo" | lldiff generate --ckpt ...        # prompts from stdin, one per line

Several prompts are batched with left padding. Everything from the first EOS on is dropped.
Prints each completion, then the number of model calls, tokens/s of the answers' real tokens and
the token positions the model processed per answer position of the length budget (what a KV
cache saves). The MDM decodes exactly by default;
--cache prefix or dual turns on Fast-dLLM's approximate caches (SPEC §10: at each block's start
one call over the whole canvas, then calls over the block and what follows it, or the block
alone). The AR and BD3 use their exact KV caches (--no-cache turns them off where the registry
lists use_cache).

Every option value is used exactly as given or refused (exit code 2) before the checkpoint
is loaded: out-of-range values, MDM lengths that are not whole blocks, and options that
have no effect in the chosen mode (--threshold without --remasking threshold, --top-k /
--top-p / --seed at --temperature 0, --steps / --steps-per-block with --remasking threshold).
Options of another objective's decoder are refused once the checkpoint says which objective
it holds (the registry's ``decode_options``; the answer length is --gen-length for a fixed
canvas, the MDM's, and --max-new-tokens for a budget, the AR's and BD3's).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NoReturn

import torch

from lldiff.checkpoint import load_model
from lldiff.completion import article, complete
from lldiff.inputs import check_text, read_lines
from lldiff.objectives.common.decoding import Completion, DecodeOptions
from lldiff.registry import Objective

# the DecodeOptions field each decoding flag sets; which fields apply to an objective is the registry's
FLAG_FIELDS = {"steps": "steps", "block_length": "block_length", "remasking": "remasking", "threshold": "threshold",
               "cfg_scale": "cfg_scale", "forbid_eos": "forbid_eos", "top_k": "top_k", "top_p": "top_p",
               "no_cache": "use_cache", "steps_per_block": "steps_per_block", "cache": "cache"}
# the answer-length flag by the registry's length_is_budget: a fixed canvas or a budget
LENGTH_FLAGS = {False: "gen_length", True: "max_new_tokens"}


def build_parser() -> argparse.ArgumentParser:
    parser = one_line_errors(argparse.ArgumentParser(prog="lldiff generate", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--ckpt", required=True, help="checkpoint written by lldiff fit (AR, MDM or BD3)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: stdin lines)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's run directory)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy / argmax (default)")
    parser.add_argument("--seed", type=int, help="RNG seed for sampling (default 0; needs --temperature > 0 "
                        "or --remasking random)")
    parser.add_argument("--device", default="cpu")
    diffusion = parser.add_argument_group("diffusion (MDM and BD3)")
    diffusion.add_argument("--remasking", choices=["low_confidence", "random", "threshold"],
                           help="low_confidence (default), random (Alg. 4), threshold (Fast-dLLM parallel decoding)")
    diffusion.add_argument("--threshold", type=float,
                           help="confidence threshold in (0, 1] for --remasking threshold (default 0.9)")
    diffusion.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale w (default 0: off)")
    diffusion.add_argument("--forbid-eos", action="store_true", default=None, help="never generate EOS")
    mdm = parser.add_argument_group("MDM (LLaDA reverse process over a fixed canvas)")
    mdm.add_argument("--gen-length", type=int, help="answer length (default 64)")
    mdm.add_argument("--steps", type=int, help="model calls for the whole answer, a multiple of the number of blocks "
                     "(default: gen_length)")
    mdm.add_argument("--block-length", type=int, help="semi-autoregressive block length, dividing --gen-length "
                     "(default: min(32, gen_length))")
    mdm.add_argument("--cache", choices=["none", "prefix", "dual"],
                     help="Fast-dLLM's approximate KV cache (default none: exact): prefix keeps the keys/values "
                     "before the current block, dual also those after it (needs --block-length < --gen-length)")
    bd3 = parser.add_argument_group("BD3 (block diffusion in the model's own blocks)")
    bd3.add_argument("--steps-per-block", type=int, help="model calls per block (default: the block size, one "
                     "token per call)")
    budget = parser.add_argument_group("AR and BD3")
    budget.add_argument("--max-new-tokens", type=int, help="tokens to generate, a budget: decoding stops once every "
                        "answer has ended (default 64)")
    ar = parser.add_argument_group("AR")
    ar.add_argument("--top-k", type=int, help="sample among the k most likely tokens (needs --temperature > 0)")
    ar.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (needs --temperature > 0)")
    ar.add_argument("--no-cache", action="store_true", default=None, help="re-encode every step (slow; for checks)")
    return parser


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with code 2 and ONE line ``<prog>: error: <message>`` on stderr (as ``parser.error``,
    without the usage block): how option values are refused."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with its errors (argparse's own included) as :func:`refuse`'s one line, no usage block."""
    parser.error = lambda message: refuse(parser, message)  # type: ignore[method-assign]
    return parser


def check_sources(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, before the checkpoint is loaded, a device this machine lacks and a --tokenizer
    that is not a tokenizer (shared by ``generate`` and ``chat``)."""
    from lldiff.data.tokenizer import Tokenizer
    from lldiff.inputs import check_device

    try:
        check_device(args.device)
        if args.tokenizer is not None:
            Tokenizer.from_file(args.tokenizer)
    except (ValueError, OSError) as error:
        refuse(parser, str(error))


def applies(name: str, objective: Objective) -> bool:
    """Whether the decoding flag ``name`` (its dest) applies to ``objective`` (the registry's
    ``decode_options`` and ``length_is_budget``)."""
    if name in LENGTH_FLAGS.values():
        return LENGTH_FLAGS[objective.length_is_budget] == name
    return FLAG_FIELDS[name] in objective.decode_options


def refuse_foreign_options(args: argparse.Namespace, objective: Objective, parser: argparse.ArgumentParser) -> None:
    """Refuse the decoding options given that do not apply to this ``objective``'s decoder
    (options a parser does not define are skipped)."""
    flags = [*FLAG_FIELDS, *LENGTH_FLAGS.values()]
    given = [name for name in flags if getattr(args, name, None) is not None and not applies(name, objective)]
    if given:
        options = ", ".join(flag(name) for name in given)
        refuse(parser, f"{options} do(es) not apply to {article(objective.label)} {objective.label} checkpoint "
                       f"({args.ckpt}){cache_hint(given, objective)}")


def cache_hint(given: list[str], objective: Objective) -> str:
    """What to use instead of a cache flag another objective's decoder takes (asked of the
    registry's ``decode_options``: ``use_cache`` is an exact KV cache, ``cache`` the MDM's
    approximate ones)."""
    if "cache" in given and "use_cache" in objective.decode_options:
        return f"; {article(objective.label)} {objective.label} decodes with its exact KV cache, on by default " \
               "(--no-cache turns it off)"
    if "no_cache" in given and "cache" in objective.decode_options:
        return f"; {article(objective.label)} {objective.label} decodes exactly by default; its approximate " \
               "caches are --cache prefix and --cache dual"
    return ""


def check_dual_cache(parser: argparse.ArgumentParser, cache: str | None, length: int, length_flag: str,
                     block: int) -> None:
    """Refuse --cache dual with one block (nothing after the block to keep), naming the block
    lengths that allow it."""
    if cache == "dual" and block >= length:
        smaller = [d for d in range(1, length) if length % d == 0]
        allowed = f"a --block-length below {length} that divides it ({', '.join(map(str, smaller))})" if smaller \
            else f"a longer {length_flag}"
        refuse(parser, f"--cache dual keeps the keys/values after the current block, so it needs more than one block, "
                       f"but --block-length {block} covers {length_flag} {length}; use {allowed}, or --cache prefix")


def check_values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse (``refuse``: exit code 2, one line) every value that decoding would otherwise
    replace, round or ignore. Needs no checkpoint; shared by ``lldiff generate`` and ``lldiff chat``
    (options a parser does not define are skipped)."""

    def value(name: str):
        return getattr(args, name, None)

    for name in ("gen_length", "max_new_tokens", "length", "steps", "block_length", "top_k", "steps_per_block"):
        if value(name) is not None and value(name) < 1:
            refuse(parser, f"{flag(name)} must be >= 1, got {value(name)}")
    if not args.temperature >= 0:  # also NaN
        refuse(parser, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if value("cfg_scale") is not None and not value("cfg_scale") >= 0:
        refuse(parser, f"--cfg-scale must be >= 0 (0 = off), got {value('cfg_scale')}")
    for name in ("threshold", "top_p"):
        if value(name) is not None and not 0.0 < value(name) <= 1.0:
            refuse(parser, f"{flag(name)} must be in (0, 1], got {value(name)}")
    remasking = "low_confidence" if value("remasking") is None else value("remasking")
    if value("threshold") is not None and remasking != "threshold":
        refuse(parser, f"--threshold {value('threshold')} needs --remasking threshold "
                     f"(--remasking {remasking} ignores it)")
    for name in ("steps", "steps_per_block"):
        if value(name) is not None and remasking == "threshold":
            refuse(parser, f"{flag(name)} {value(name)} has no effect with --remasking threshold (it calls the model "
                           f"until each block is full); drop {flag(name)} or use --remasking low_confidence or random")
    if args.temperature == 0:
        for name in ("top_k", "top_p"):
            if value(name) is not None:
                refuse(parser, f"{flag(name)} {value(name)} needs --temperature > 0 "
                             "(decoding at --temperature 0 is greedy and ignores it)")
        if value("seed") is not None and remasking != "random":
            refuse(parser, f"--seed {value('seed')} needs --temperature > 0 or --remasking random "
                         "(decoding at --temperature 0 is deterministic and ignores it)")


def check_blocks(parser: argparse.ArgumentParser, length: int, length_flag: str, block_length: int | None,
                 steps: int | None) -> int:
    """The MDM block length for an answer of ``length`` (``block_length``, default ``min(32, length)``);
    refuses, naming the allowed values, a length that is not whole blocks or ``steps`` that do not
    split evenly over the blocks. Never rounds."""
    block = min(32, length) if block_length is None else block_length
    if length % block:
        lower, upper = length // block * block, (length // block + 1) * block
        use = f"{lower} or {upper}" if lower else f"{upper}"
        default = " the default" if block_length is None else ""
        refuse(parser, f"{length_flag} {length} is not a multiple of{default} --block-length {block}; "
                     f"use {length_flag} {use}, or a --block-length that divides {length}")
    blocks = length // block
    if steps is not None and steps % blocks:
        lower, upper = steps // blocks * blocks, (steps // blocks + 1) * blocks
        use = f"{lower} or {upper}" if lower else f"{upper}"
        refuse(parser, f"--steps {steps} is not a multiple of the number of blocks {blocks} ({length_flag} {length} / "
                     f"--block-length {block}); use --steps {use}")
    return block


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_values(args, parser)
    if any(getattr(args, name) is not None for name in ("gen_length", "block_length", "steps", "cache")):  # MDM-only
        gen_length = 64 if args.gen_length is None else args.gen_length
        block = check_blocks(parser, gen_length, "--gen-length", args.block_length, args.steps)
        check_dual_cache(parser, args.cache, gen_length, "--gen-length", block)
    check_sources(args, parser)
    try:
        prompts = [check_text(p, "--prompt") for p in args.prompt] if args.prompt else read_lines(sys.stdin, "prompt")
    except ValueError as error:
        refuse(parser, str(error))
    if not prompts:
        parser.error("no prompt: give --prompt TEXT or lines on stdin")
    loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    if loaded.tokenizer is None:
        parser.error(f"no tokenizer.json beside {args.ckpt}; pass --tokenizer PATH")
    objective = loaded.objective
    refuse_foreign_options(args, objective, parser)
    tokenizer = loaded.tokenizer
    length = getattr(args, LENGTH_FLAGS[objective.length_is_budget])
    options = DecodeOptions.for_objective(  # every option given applies (refused above otherwise); None: defaults
        objective, length=64 if length is None else length, temperature=args.temperature, steps=args.steps,
        block_length=args.block_length, remasking=args.remasking,
        threshold=args.threshold,  # None: DecodeOptions' default (0.9) under --remasking threshold
        cfg_scale=args.cfg_scale, forbid_eos=args.forbid_eos, top_k=args.top_k, top_p=args.top_p,
        use_cache=None if args.no_cache is None else not args.no_cache, steps_per_block=args.steps_per_block,
        cache=args.cache,
    )
    encoded = []
    for number, prompt in enumerate(prompts, 1):
        ids = tokenizer.encode(prompt)
        if not ids:  # the model needs one token to continue from: start the answer after BOS
            print(f"lldiff generate: prompt {number} is empty; decoding from BOS", file=sys.stderr)
            ids = [tokenizer.bos_id]
        encoded.append(ids)
    generator = torch.Generator(device=args.device).manual_seed(0 if args.seed is None else args.seed)
    start = time.perf_counter()
    try:
        out = complete(loaded.model, encoded, options, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                       generator=generator)
    except ValueError as error:  # context overflow, bad block layout: name it, no traceback
        parser.error(str(error))
    seconds = time.perf_counter() - start
    for prompt, answer in zip(prompts, out.answers):
        print(prompt + tokenizer.decode(answer))
        print("-" * 40)
    print(f"{objective.label} {loaded.config.name}: {len(prompts)} prompt(s), "
          f"{stats(out, options, len(prompts), seconds)}")


def stats(out: Completion, options: DecodeOptions, prompts: int, seconds: float, answer_tokens: int | None = None) -> str:
    """``N model calls, T tokens/s (A answer tokens in S s), P tokens processed per answer
    position[, C cache]``. The rate counts the answers' real tokens (``answer_tokens``, else
    those of ``out.answers``, cut at their EOS), not the length budget: a 1-token answer is 1
    token. The work is per answer position, ``prompts x length`` (the MDM's canvas, the AR's
    and BD3's budget), which every answer's decoding pays whatever its length."""
    answer = sum(len(a) for a in out.answers) if answer_tokens is None else answer_tokens
    positions = prompts * options.length
    line = (f"{out.model_calls} model calls, {answer / seconds:.0f} tokens/s ({answer} answer tokens in "
            f"{seconds:.2f} s), {out.tokens_processed / positions:.1f} tokens processed per answer position")
    return line + (f", {options.cache} cache" if options.cache != "none" else "")
