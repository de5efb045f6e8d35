"""Sampling throughput, measured in one run: AR decoding with and without the KV cache.

    python benchmarks/sampling.py                       # smdm-6M, batch 4, 32-token prompts, 256 new tokens
    python benchmarks/sampling.py --size tiny-1M --new-tokens 128

Reports tokens/s and model calls for each decoder and the cache's speed-up. Weights are
random: speed does not depend on them. fp32 on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from lldiff.ar_decoding import ar_generate
from lldiff.config import ModelConfig
from lldiff.model import Transformer


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="smdm-6M")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(args.size, vocab_size=args.vocab, causal=True)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len))
    print(f"{args.size} (AR), batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = {}
    for name, use_cache in (("AR, KV cache", True), ("AR, no cache", False)):
        seconds, out = timed(lambda: ar_generate(model, prompt, max_new_tokens=args.new_tokens, use_cache=use_cache),
                             args.repeats)
        rows[name] = (seconds, out.model_calls)
    print(f"{'decoder':<16} {'s/batch':>9} {'tokens/s':>10} {'model calls':>12}")
    for name, (seconds, calls) in rows.items():
        print(f"{name:<16} {seconds:>9.2f} {args.batch * args.new_tokens / seconds:>10.0f} {calls:>12}")
    speedup = rows["AR, no cache"][0] / rows["AR, KV cache"][0]
    print(f"\nKV cache speed-up at {args.new_tokens} new tokens: {speedup:.1f}x")


if __name__ == "__main__":
    main()
