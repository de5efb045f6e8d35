"""Sampling, measured in one run: MDM reverse process vs BD3 block diffusion vs AR decoding,
tokens/s and model calls.

    python benchmarks/sampling.py                       # smdm-6M, batch 4, 32-token prompts, 256 new tokens
    python benchmarks/sampling.py --size tiny-1M --new-tokens 128

Part 1 (speed, random weights: speed does not depend on them): the MDM with low-confidence
remasking, one block and semi-autoregressive blocks, a BD3 model (block attention, blocks of
``--block``) with the same number of model calls, and AR decoding with and without the KV
cache, on the same backbone size (each built from its objective's registry entry); prints
the cache's speed-up.
Part 2 (calls at equal quality): a tiny MDM trained on a deterministic toy language, fixed-step
decoding vs confidence-threshold (Fast-dLLM) decoding: exact-match accuracy and model calls.
fp32 on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from lldiff import registry
from lldiff.ar_decoding import ar_generate
from lldiff.block_decoding import block_generate
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.sampling import generate, generate_threshold
from lldiff.toy import counting_sequences, train_toy_mdm


def timed(fn, repeats: int) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def backbone(objective: str, size: str, vocab: int) -> Transformer:
    """A randomly initialised backbone of the objective's shape (attention kind, mask token)."""
    fields = registry.get(objective).model_fields(vocab)
    return Transformer(ModelConfig.from_name(size, vocab_size=vocab, **fields)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="smdm-6M")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--mdm-steps", type=int, default=64, help="MDM model calls for the whole answer")
    parser.add_argument("--block", type=int, default=32,
                        help="block length of the semi-autoregressive MDM run and the BD3 model's block size")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.new_tokens % args.block or args.mdm_steps % (args.new_tokens // args.block):
        parser.error(f"--block {args.block} must divide --new-tokens {args.new_tokens} into blocks that share "
                     f"--mdm-steps {args.mdm_steps} evenly")
    ar, mdm = backbone("ar", args.size, args.vocab), backbone("mdm", args.size, args.vocab)
    bd3 = backbone(f"bd3-{args.block}", args.size, args.vocab)
    per_block = args.mdm_steps // (args.new_tokens // args.block)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len))
    print(f"Part 1: {args.size}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ar_generate(ar, prompt, max_new_tokens=2)  # warm-up
    mdm_args = dict(gen_length=args.new_tokens, steps=args.mdm_steps, mask_id=mdm.cfg.mask_id)
    decoders = {
        "MDM, 1 block": lambda: generate(mdm, prompt, block_length=args.new_tokens, **mdm_args),
        f"MDM, blocks of {args.block}": lambda: generate(mdm, prompt, block_length=args.block, **mdm_args),
        f"BD3-{args.block}": lambda: block_generate(bd3, prompt, gen_length=args.new_tokens, block_size=args.block,
                                                    mask_id=bd3.cfg.mask_id, steps_per_block=per_block),
        "AR, KV cache": lambda: ar_generate(ar, prompt, max_new_tokens=args.new_tokens, use_cache=True),
        "AR, no cache": lambda: ar_generate(ar, prompt, max_new_tokens=args.new_tokens, use_cache=False),
    }
    rows = {name: timed(fn, args.repeats) for name, fn in decoders.items()}
    print(f"{'decoder':<20} {'s/batch':>9} {'tokens/s':>10} {'model calls':>12}")
    for name, (seconds, out) in rows.items():
        print(f"{name:<20} {seconds:>9.2f} {args.batch * args.new_tokens / seconds:>10.0f} {out.model_calls:>12}")
    speedup = rows["AR, no cache"][0] / rows["AR, KV cache"][0]
    print(f"KV cache speed-up at {args.new_tokens} new tokens: {speedup:.1f}x")
    mdm_vs_ar = rows["AR, KV cache"][0] / rows["MDM, 1 block"][0]
    print(f"MDM ({args.mdm_steps} calls) throughput / cached AR throughput: {mdm_vs_ar:.2f}x")

    print("\nPart 2: toy language x[i+1] = x[i] + 1 mod 12, tiny MDM trained here; 128 prompts of 4, 12 new tokens")
    toy = train_toy_mdm()
    seqs = counting_sequences(128, 16, generator=torch.Generator().manual_seed(1))
    toy_prompt, target = seqs[:, :4], seqs[:, 4:]
    toy_args = dict(gen_length=12, block_length=12, mask_id=toy.cfg.mask_id)
    results = {
        "fixed steps (12)": generate(toy, toy_prompt, steps=12, **toy_args),
        "threshold 0.95": generate_threshold(toy, toy_prompt, threshold=0.95, **toy_args),
    }
    for name, out in results.items():
        accuracy = (out.answer_ids == target).all(1).float().mean().item()
        print(f"{name:<18} exact match {accuracy:6.1%}   model calls {out.model_calls}")
    ratio = results["fixed steps (12)"].model_calls / results["threshold 0.95"].model_calls
    print(f"threshold decoding: {ratio:.1f}x fewer model calls")


if __name__ == "__main__":
    main()
