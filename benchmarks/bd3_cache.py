"""BD3 decoding with and without its exact KV cache (issue 14), measured in one run.

    python benchmarks/bd3_cache.py                     # tiny-1M random + toy BD3s, batch 4, 256 new tokens
    python benchmarks/bd3_cache.py --new-tokens 128 --blocks 4

For each block size B (``--blocks``) and each rule inside a block (``steps``: B model calls per
block, one token each; ``threshold``: Fast-dLLM's confidence threshold 0.9), the same prompts are
decoded by ``block_generate`` with ``use_cache=False`` (each call re-runs the canvas up to the
current block) and ``use_cache=True`` (clean blocks' keys/values kept; each call feeds the
current block): seconds, tokens/s, model calls, tokens processed per answer token, whether the
tokens are identical, and the cache's speed-up.

Two backbones per block size: ``random`` (``--size``, random weights: speed does not depend on
them, but under the threshold rule a random model reveals about one token per call) and
``toy`` (a small BD3 trained here, in a minute or so, on benchmarks/toy.py's counting language at the
benchmark's length, so the threshold rule reveals several tokens per call; its exact match
against the language is printed too). fp32 on CPU, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import time

import torch

from lldiff import objectives as registry
from lldiff.objectives.bd3.decoding import block_generate
from lldiff.objectives.bd3.loss import bd3_loss
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from toy import VOCAB, counting_sequences


def random_bd3(size: str, vocab: int, block: int) -> Transformer:
    torch.manual_seed(0)
    fields = registry.get(f"bd3-{block}").model_fields(vocab)
    return Transformer(ModelConfig.from_name(size, vocab_size=vocab, **fields)).eval()


def toy_bd3(block: int, seq_len: int, steps: int, batch: int = 8) -> Transformer:
    """A 2-layer BD3 trained on the counting language at ``seq_len`` (plain PyTorch loop, as
    benchmarks/toy.py, with a context long enough for the benchmark)."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=64, n_heads=4, d_ff=128, vocab_size=VOCAB, max_seq_len=seq_len,
                      **registry.get(f"bd3-{block}").model_fields(VOCAB))
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = bd3_loss(model, counting_sequences(batch, seq_len, generator=data), cfg.mask_id, block)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def run(model: Transformer, prompt: torch.Tensor, new: int, rule: str, use_cache: bool, repeats: int):
    kw = {"remasking": "threshold", "threshold": 0.9} if rule == "threshold" else {}
    block_generate(model, prompt[:, :8], gen_length=8, block_size=model.cfg.block_size, mask_id=model.cfg.mask_id,
                   use_cache=use_cache, **kw)  # warm-up
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = block_generate(model, prompt, gen_length=new, block_size=model.cfg.block_size,
                             mask_id=model.cfg.mask_id, use_cache=use_cache, **kw)
        seconds = time.perf_counter() - start
        best = (seconds, out) if best is None or seconds < best[0] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny-1M")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--toy-steps", type=int, default=400, help="training steps of each toy BD3 (0: skip them)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per decoder (the fastest is kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = args.prompt_len + args.new_tokens
    print(f"BD3 KV cache: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    header = (f"{'model':<14} {'rule':<10} {'cache':<6} {'s/batch':>8} {'tokens/s':>9} {'calls':>6} "
              f"{'proc/ans':>9} {'same':>5} {'exact':>6} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    for block in args.blocks:
        models = [(f"{args.size} B={block}", random_bd3(args.size, args.vocab, block),
                   torch.randint(0, args.vocab, (args.batch, args.prompt_len),
                                 generator=torch.Generator().manual_seed(1)), None)]
        if args.toy_steps:
            start = time.perf_counter()
            toy = toy_bd3(block, -(-total // block) * block, args.toy_steps)
            truth = counting_sequences(args.batch, total, generator=torch.Generator().manual_seed(2))
            models.append((f"toy B={block}", toy, truth[:, :args.prompt_len], truth))
            print(f"(toy B={block} trained in {time.perf_counter() - start:.0f} s)")
        for name, model, prompt, truth in models:
            for rule in ("steps", "threshold"):
                plain = run(model, prompt, args.new_tokens, rule, False, args.repeats)
                cached = run(model, prompt, args.new_tokens, rule, True, args.repeats)
                for label, (seconds, out) in (("no", plain), ("yes", cached)):
                    exact = "" if truth is None else f"{(out.canvas == truth).all(1).float().mean().item():.2f}"
                    same = "" if label == "no" else str(torch.equal(out.canvas, plain[1].canvas))
                    speed = "" if label == "no" else f"{plain[0] / seconds:.2f}x"
                    print(f"{name:<14} {rule:<10} {label:<6} {seconds:>8.3f} {out.answer_ids.numel() / seconds:>9.0f} "
                          f"{out.model_calls:>6} {out.tokens_processed_per_answer_token:>9.2f} {same:>5} {exact:>6} "
                          f"{speed:>9}")


if __name__ == "__main__":
    main()
