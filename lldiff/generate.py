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

from lldiff.ar_decoding import ar_generate
from lldiff.checkpoint import load_model
from lldiff.sampling import generate, generate_threshold

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


def encode_batch(tokenizer, prompts: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask; an empty prompt becomes BOS."""
    encoded = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = True
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


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
    tokenizer, model = loaded.tokenizer, loaded.model
    ids, mask = encode_batch(tokenizer, prompts, args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    if loaded.objective == "mdm":
        gen_length = args.gen_length or 64
        block = args.block_length or min(32, gen_length)
        common = dict(gen_length=gen_length, block_length=block, mask_id=model.cfg.mask_id,
                      temperature=args.temperature, cfg_scale=args.cfg_scale or 0.0, attention_mask=mask,
                      eos_id=tokenizer.eos_id, forbid_eos=bool(args.forbid_eos), generator=generator)
        _check_context(ids.shape[1] + gen_length, model.cfg.max_seq_len, parser)
        if args.remasking == "threshold":
            out = generate_threshold(model, ids, threshold=args.threshold or 0.9, **common)
        else:
            out = generate(model, ids, steps=args.steps or gen_length, remasking=args.remasking or "low_confidence",
                           **common)
        answers, calls, new = out.answer(tokenizer.eos_id), out.model_calls, gen_length
    else:
        new = args.max_new_tokens or 64
        _check_context(ids.shape[1] + new, model.cfg.max_seq_len, parser)
        out = ar_generate(model, ids, max_new_tokens=new, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, attention_mask=mask, eos_id=tokenizer.eos_id,
                          use_cache=not args.no_cache, generator=generator)
        answers = [cut_at_eos(row.tolist(), tokenizer.eos_id) for row in out.tokens[:, ids.shape[1]:]]
        calls = out.model_calls
    seconds = time.perf_counter() - start
    for prompt, answer in zip(prompts, answers):
        print(prompt + tokenizer.decode(answer))
        print("-" * 40)
    print(f"{loaded.objective.upper()} {loaded.config.name}: {len(prompts)} prompt(s), {calls} model calls, "
          f"{len(prompts) * new / seconds:.0f} tokens/s ({seconds:.2f} s)")


def _check_context(total: int, context: int, parser: argparse.ArgumentParser) -> None:
    if total > context:
        parser.error(f"prompt + new tokens = {total} exceeds the model's context max_seq_len={context}")
