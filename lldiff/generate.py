"""`lldiff generate`: sample from a trained MDM or AR checkpoint.

    lldiff generate --ckpt runs/mdm-tiny/checkpoints/last.ckpt --prompt "def main(" --gen-length 64
    lldiff generate --ckpt runs/ar-tiny/checkpoints/last.ckpt --prompt "import os" --max-new-tokens 64 --temperature 0.8 --top-p 0.9
    echo "class Foo" | lldiff generate --ckpt ...        # prompts from stdin, one per line

Several prompts are batched with left padding. Everything from the first EOS on is dropped.
Prints each completion, then the number of model calls and tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lldiff.checkpoint import load_model
from lldiff.completion import DecodeOptions, complete

MDM_ONLY = ("gen_length", "steps", "block_length", "remasking", "threshold", "cfg_scale", "forbid_eos")
AR_ONLY = ("max_new_tokens", "top_k", "top_p", "no_cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lldiff generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by lldiff fit (MDM or AR)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: stdin lines)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's run directory)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy / argmax (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    mdm = parser.add_argument_group("MDM (LLaDA reverse process)")
    mdm.add_argument("--gen-length", type=int, help="answer length (default 64)")
    mdm.add_argument("--steps", type=int, help="model calls for the whole answer (default: gen_length)")
    mdm.add_argument("--block-length", type=int, help="semi-autoregressive block length (default 32)")
    mdm.add_argument("--remasking", choices=["low_confidence", "random", "threshold"],
                     help="low_confidence (default), random (Alg. 4), threshold (Fast-dLLM parallel decoding)")
    mdm.add_argument("--threshold", type=float, help="confidence threshold for --remasking threshold (default 0.9)")
    mdm.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale w (default 0: off)")
    mdm.add_argument("--forbid-eos", action="store_true", default=None, help="never generate EOS")
    ar = parser.add_argument_group("AR")
    ar.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 64)")
    ar.add_argument("--top-k", type=int)
    ar.add_argument("--top-p", type=float)
    ar.add_argument("--no-cache", action="store_true", default=None, help="re-encode every step (slow; for checks)")
    return parser


def _refuse_foreign_options(args: argparse.Namespace, objective: str, parser: argparse.ArgumentParser) -> None:
    foreign = AR_ONLY if objective == "mdm" else MDM_ONLY
    given = [name for name in foreign if getattr(args, name) is not None]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{options} do(es) not apply to an {objective.upper()} checkpoint ({args.ckpt})")


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    if loaded.tokenizer is None:
        parser.error(f"no tokenizer.json beside {args.ckpt}; pass --tokenizer PATH")
    _refuse_foreign_options(args, loaded.objective, parser)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        parser.error("no prompt: give --prompt TEXT or lines on stdin")
    tokenizer = loaded.tokenizer
    options = DecodeOptions(
        length=(args.gen_length if loaded.objective == "mdm" else args.max_new_tokens) or 64,
        temperature=args.temperature, steps=args.steps, block_length=args.block_length,
        remasking=args.remasking or "low_confidence", threshold=args.threshold or 0.9,
        cfg_scale=args.cfg_scale or 0.0, forbid_eos=bool(args.forbid_eos), top_k=args.top_k, top_p=args.top_p,
        use_cache=not args.no_cache,
    )
    encoded = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]  # an empty prompt becomes BOS
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
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
    print(f"{loaded.objective.upper()} {loaded.config.name}: {len(prompts)} prompt(s), {out.model_calls} model calls, "
          f"{len(prompts) * options.length / seconds:.0f} tokens/s ({seconds:.2f} s)")
