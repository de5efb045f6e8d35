"""Decoding compared, measured in one run (issue 14): AR with its KV cache, the MDM exact and
with Fast-dLLM's prefix / dual caches (+ threshold parallel decoding), BD3 block diffusion with
its exact KV cache (+ threshold), all fp32 on the CPU.

    python benchmarks/sampling.py                       # the three parts below
    python benchmarks/sampling.py --skip-speed --skip-text     # part 1 alone (--skip-toy: without it)

Part 1, the one comparison table: every objective's backbone of the SAME size (2 layers,
d_model 64) trained here on the toy counting language (``benchmarks/toy.py``: ``x[i+1] = x[i] + 1
mod 12``), the same prompts (``--toy-prompts`` of ``--toy-prompt-len`` tokens) and answer length
(``--toy-new-tokens``). Columns: tokens/s (answer positions / wall-clock seconds), model calls
(forward passes), tokens processed per answer token (positions fed to the backbone over all
calls and rows, counted at its embedding, / answer positions), agreement (fraction of answer
tokens equal to the same model's exact decoder: AR without cache, MDM without cache one token
per step, BD3 without cache one token per step), toy exact match (whole answers right). Then
the issue's goals as ratios.

Part 2, real text: a trained tiny MDM checkpoint (``--text-ckpt``, default the largest MDM of
``runs/sweep-demo-long`` when it is there) continues ``--text-prompts`` held-out paragraphs of
its own run's validation split: agreement of the cached decoders with exact decoding, and
token accuracy against the paragraph's real continuation.

Part 3, speed at size (random weights: fixed-step decoding does not depend on them):
``--size`` backbones, ``--new-tokens`` answer positions: the MDM exact / prefix / dual and BD3-B
(``--bd3-blocks``) with and without its KV cache, all with the same number of steps, and AR with
and without its KV cache.
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lldiff import objectives as registry
from lldiff.objectives.ar.decoding import ar_generate
from lldiff.objectives.bd3.decoding import block_generate
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.objectives.ar.loss import ar_loss
from lldiff.objectives.mdm.decoding import generate, generate_threshold
from toy import _train, counting_sequences, train_toy_bd3, train_toy_mdm

BD3_CACHE = "use_cache" in inspect.signature(block_generate).parameters
DEFAULT_TEXT_CKPT = "runs/sweep-demo-long/tb/mdm/tiny-0.2M/C1.6e+12-seed0/checkpoints/last.ckpt"


class Counted:
    """Runs a decoder on a model once, timing it and counting the positions its backbone embeds."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.tokens = model, 0
        model.embed.register_forward_hook(self._count)

    def _count(self, module: Any, inputs: tuple, output: Any) -> None:
        self.tokens += inputs[0].numel()

    def run(self, decode: Callable[[], Any]) -> tuple[Any, float, int]:
        """(output, seconds, tokens processed) of one call of ``decode``."""
        self.tokens = 0
        start = time.perf_counter()
        out = decode()
        return out, time.perf_counter() - start, self.tokens


def answer_of(out: Any, prompt_len: int) -> Tensor:
    """The answer positions of any decoder's output (SampleOutput or the AR's)."""
    return out.answer_ids if hasattr(out, "answer_ids") else out.tokens[:, prompt_len:]


def table(rows: list[dict[str, Any]]) -> None:
    head = f"{'decoder':<34} {'tokens/s':>9} {'calls':>6} {'tokens proc./ans. tok.':>22} {'agreement':>9} {'exact match':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        agreement = "-" if r.get("agreement") is None else f"{r['agreement']:.3f}"
        match = "-" if r.get("match") is None else f"{r['match']:.1%}"
        print(f"{r['name']:<34} {r['tps']:>9.0f} {r['calls']:>6} {r['processed']:>22.1f} {agreement:>9} {match:>11}")


def toy_ar(steps: int, seq_len: int, batch: int) -> Transformer:
    """The toy language's AR of the same backbone as ``benchmarks/toy.py``'s MDM and BD3 models."""
    return _train(registry.get("ar"), ar_loss, steps, seq_len, batch, 0)


def part1(args: argparse.Namespace) -> None:
    p, n, seq_len = args.toy_prompt_len, args.toy_new_tokens, args.toy_prompt_len + args.toy_new_tokens
    train = {"steps": args.toy_steps, "seq_len": seq_len, "batch": 64}
    print(f"Part 1: toy language, 2-layer d64 backbones trained {args.toy_steps} steps on {seq_len}-token rows; "
          f"{args.toy_prompts} prompts of {p} tokens, {n} new tokens, MDM blocks of {args.toy_block}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    models = {"ar": toy_ar(**train), "mdm": train_toy_mdm(**train)}
    for b in (4, 16):
        models[f"bd3-{b}"] = train_toy_bd3(block_size=b, **train)
    print(f"(trained 4 models in {time.perf_counter() - start:.0f} s)")
    seqs = counting_sequences(args.toy_prompts, seq_len, generator=torch.Generator().manual_seed(1))
    prompt, target = seqs[:, :p], seqs[:, p:]
    answer_positions = target.numel()
    counters = {name: Counted(model) for name, model in models.items()}
    mdm, ar = models["mdm"], models["ar"]
    mdm_args = {"gen_length": n, "block_length": args.toy_block, "mask_id": mdm.cfg.mask_id}
    thr = args.threshold
    decoders: list[tuple[str, str, str | None, Callable[[], Any]]] = [  # (name, model, reference name, decode)
        ("AR, no cache", "ar", None, lambda: ar_generate(ar, prompt, max_new_tokens=n, use_cache=False)),
        ("AR + KV cache", "ar", "AR, no cache", lambda: ar_generate(ar, prompt, max_new_tokens=n, use_cache=True)),
        ("MDM exact", "mdm", None, lambda: generate(mdm, prompt, steps=n, **mdm_args)),
        ("MDM + prefix cache", "mdm", "MDM exact", lambda: generate(mdm, prompt, steps=n, cache="prefix", **mdm_args)),
        ("MDM + dual cache", "mdm", "MDM exact", lambda: generate(mdm, prompt, steps=n, cache="dual", **mdm_args)),
        (f"MDM exact + threshold {thr}", "mdm", "MDM exact",
         lambda: generate_threshold(mdm, prompt, threshold=thr, **mdm_args)),
        (f"MDM + prefix + threshold {thr}", "mdm", "MDM exact",
         lambda: generate_threshold(mdm, prompt, threshold=thr, cache="prefix", **mdm_args)),
        (f"MDM + dual + threshold {thr}", "mdm", "MDM exact",
         lambda: generate_threshold(mdm, prompt, threshold=thr, cache="dual", **mdm_args)),
    ]
    for b in (4, 16):
        model = models[f"bd3-{b}"]
        bd3_args = {"gen_length": n, "block_size": b, "mask_id": model.cfg.mask_id}

        def bd3(model=model, bd3_args=bd3_args, **kwargs):
            return lambda: block_generate(model, prompt, **bd3_args, **kwargs)

        exact_name = f"BD3-{b}, no cache"
        if BD3_CACHE:
            decoders += [(exact_name, f"bd3-{b}", None, bd3(use_cache=False)),
                         (f"BD3-{b} + cache", f"bd3-{b}", exact_name, bd3(use_cache=True)),
                         (f"BD3-{b} + cache + threshold {thr}", f"bd3-{b}", exact_name,
                          bd3(use_cache=True, remasking="threshold", threshold=thr))]
        else:  # block_generate has no KV cache yet
            decoders += [(exact_name, f"bd3-{b}", None, bd3()),
                         (f"BD3-{b} + threshold {thr}", f"bd3-{b}", exact_name,
                          bd3(remasking="threshold", threshold=thr))]
    for name, model_name, _, decode in decoders[:1] + decoders[2:3]:  # warm-up (first-call overheads)
        decode()
    answers: dict[str, Tensor] = {}
    rows = []
    for name, model_name, reference, decode in decoders:
        out, seconds, processed = counters[model_name].run(decode)
        answer = answer_of(out, p)
        answers[name] = answer
        rows.append({"name": name, "tps": answer_positions / seconds, "calls": out.model_calls,
                     "processed": processed / answer_positions, "seconds": seconds,
                     "agreement": (answer == answers[reference]).float().mean().item() if reference else None,
                     "match": (answer == target).all(dim=1).float().mean().item()})
    table(rows)
    by = {r["name"]: r for r in rows}
    if not BD3_CACHE:
        print("(block_generate has no use_cache yet: the BD3 rows decode without a KV cache)")
    print("\nGoals (ratios of this run):")
    exact, dual_thr = by["MDM exact"], by[f"MDM + dual + threshold {thr}"]
    print(f"  MDM dual + threshold {thr} vs exact: {dual_thr['tps'] / exact['tps']:.1f}x tokens/s (goal >= 5x), "
          f"exact match {dual_thr['match']:.1%} vs {exact['match']:.1%} "
          f"({100 * (exact['match'] - dual_thr['match']):+.1f} points lost; goal <= 1), "
          f"agreement {dual_thr['agreement']:.3f}")
    for b in (4, 16):
        cached = by.get(f"BD3-{b} + cache + threshold {thr}")
        if cached:
            ar_row = by["AR + KV cache"]
            print(f"  BD3-{b} + cache + threshold {thr} vs AR + KV cache: {cached['tps'] / ar_row['tps']:.2f}x tokens/s "
                  f"(goal >= 1 for BD3-16), exact match {cached['match']:.1%} vs {ar_row['match']:.1%}")
            plain, uncached = by[f"BD3-{b} + cache"], by[f"BD3-{b}, no cache"]
            print(f"  BD3-{b} KV cache vs none: {plain['tps'] / uncached['tps']:.1f}x tokens/s at {n} new tokens "
                  f"(the goal, >= 3x, is at 256: part 3)")


def part2(args: argparse.Namespace) -> None:
    from lldiff.checkpoint import load_model
    from lldiff.evaluation.tasks import (
        find_run_config,
        read_run_data,
        run_heldout_texts,
    )

    path = Path(args.text_ckpt)
    if not path.is_file():
        print(f"\nPart 2 skipped: no checkpoint at {path} (give --text-ckpt: a trained MDM with its run directory)")
        return
    loaded = load_model(path)
    model, tok = loaded.model.eval(), loaded.tokenizer
    texts = run_heldout_texts(read_run_data(find_run_config(path)))
    p, n, block = args.text_prompt_len, args.text_new_tokens, args.text_block
    rows = []
    for paragraph in (par for text in texts for par in text.split("\n\n")):  # the documents' paragraphs, in order
        ids = tok.encode(paragraph)
        if len(ids) >= p + n:
            rows.append(ids[: p + n])
        if len(rows) == args.text_prompts:
            break
    seqs = torch.tensor(rows)
    prompt, truth = seqs[:, :p], seqs[:, p:]
    print(f"\nPart 2: real text, {loaded.objective.label} {loaded.config.name} ({path}); {len(rows)} paragraphs of "
          f"held-out documents (its run's validation split) of >= {p + n} tokens, {p}-token prompts, {n} new tokens, "
          f"blocks of {block}; token accuracy: answer tokens equal to the paragraph's own continuation")
    counter = Counted(model)
    common = {"gen_length": n, "block_length": block, "mask_id": model.cfg.mask_id}
    thr = args.threshold
    decoders = [("MDM exact", lambda: generate(model, prompt, steps=n, **common)),
                ("MDM + prefix cache", lambda: generate(model, prompt, steps=n, cache="prefix", **common)),
                ("MDM + dual cache", lambda: generate(model, prompt, steps=n, cache="dual", **common)),
                (f"MDM exact + threshold {thr}", lambda: generate_threshold(model, prompt, threshold=thr, **common)),
                (f"MDM + dual + threshold {thr}",
                 lambda: generate_threshold(model, prompt, threshold=thr, cache="dual", **common))]
    decoders[0][1]()  # warm-up
    head = f"{'decoder':<34} {'tokens/s':>9} {'calls':>6} {'tokens proc./ans. tok.':>22} {'agreement':>9} {'token acc.':>10}"
    print(head)
    print("-" * len(head))
    exact = None
    for name, decode in decoders:
        out, seconds, processed = counter.run(decode)
        exact = out.answer_ids if exact is None else exact
        agreement = (out.answer_ids == exact).float().mean().item()
        accuracy = (out.answer_ids == truth).float().mean().item()
        print(f"{name:<34} {truth.numel() / seconds:>9.0f} {out.model_calls:>6} {processed / truth.numel():>22.1f} "
              f"{agreement:>9.3f} {accuracy:>10.3f}")


def backbone(objective: str, size: str, vocab: int) -> Transformer:
    """A randomly initialised backbone of the objective's shape (attention kind, mask token)."""
    fields = registry.get(objective).model_fields(vocab)
    return Transformer(ModelConfig.from_name(size, vocab_size=vocab, **fields)).eval()


def part3(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    blocks = args.new_tokens // args.block
    if args.new_tokens % args.block or args.mdm_steps % blocks:
        raise SystemExit(f"--block {args.block} must divide --new-tokens {args.new_tokens} into blocks that share "
                         f"--mdm-steps {args.mdm_steps} evenly")
    per_token = args.mdm_steps / args.new_tokens  # model calls per answer position, the same for every diffusion row
    for b in args.bd3_blocks:
        if (b * per_token) % 1 or b * per_token < 1:
            raise SystemExit(f"BD3-{b}: {args.mdm_steps} steps over {args.new_tokens} tokens is not a whole number of "
                             "steps per block")
    ar, mdm = backbone("ar", args.size, args.vocab), backbone("mdm", args.size, args.vocab)
    bd3 = {b: backbone(f"bd3-{b}", args.size, args.vocab) for b in args.bd3_blocks}
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len))
    print(f"\nPart 3: speed at size, random {args.size} weights, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; every diffusion decoder makes {args.mdm_steps} steps (MDM: blocks of "
          f"{args.block}; BD3-B: B x {per_token:g} steps per block)")
    ar_generate(ar, prompt, max_new_tokens=2)  # warm-up
    mdm_args = {"gen_length": args.new_tokens, "steps": args.mdm_steps, "block_length": args.block, "mask_id": mdm.cfg.mask_id}
    decoders = {
        "MDM exact": (mdm, lambda: generate(mdm, prompt, **mdm_args)),
        "MDM + prefix cache": (mdm, lambda: generate(mdm, prompt, cache="prefix", **mdm_args)),
        "MDM + dual cache": (mdm, lambda: generate(mdm, prompt, cache="dual", **mdm_args)),
    }
    for b, model in bd3.items():
        bd3_args = {"gen_length": args.new_tokens, "block_size": b, "mask_id": model.cfg.mask_id,
                        "steps_per_block": int(b * per_token)}
        if BD3_CACHE:
            decoders[f"BD3-{b}, no cache"] = (model, lambda m=model, a=bd3_args: block_generate(m, prompt, use_cache=False, **a))
            decoders[f"BD3-{b} + cache"] = (model, lambda m=model, a=bd3_args: block_generate(m, prompt, use_cache=True, **a))
        else:
            decoders[f"BD3-{b}"] = (model, lambda m=model, a=bd3_args: block_generate(m, prompt, **a))
    decoders["AR, no cache"] = (ar, lambda: ar_generate(ar, prompt, max_new_tokens=args.new_tokens, use_cache=False))
    decoders["AR + KV cache"] = (ar, lambda: ar_generate(ar, prompt, max_new_tokens=args.new_tokens, use_cache=True))
    counters = {id(m): Counted(m) for m in (ar, mdm, *bd3.values())}
    positions = args.batch * args.new_tokens
    rows = {}
    print(f"{'decoder':<34} {'s/batch':>8} {'tokens/s':>9} {'calls':>6} {'tokens proc./ans. tok.':>22}")
    for name, (model, decode) in decoders.items():
        out, seconds, processed = counters[id(model)].run(decode)
        rows[name] = seconds
        print(f"{name:<34} {seconds:>8.2f} {positions / seconds:>9.0f} {out.model_calls:>6} "
              f"{processed / positions:>22.1f}")
    print(f"MDM speed-up over exact: prefix {rows['MDM exact'] / rows['MDM + prefix cache']:.1f}x, "
          f"dual {rows['MDM exact'] / rows['MDM + dual cache']:.1f}x (same {args.mdm_steps} steps)")
    if BD3_CACHE:
        for b in args.bd3_blocks:
            print(f"BD3-{b} KV cache speed-up at {args.new_tokens} new tokens: "
                  f"{rows[f'BD3-{b}, no cache'] / rows[f'BD3-{b} + cache']:.1f}x (goal >= 3x)")
    print(f"AR KV cache speed-up: {rows['AR, no cache'] / rows['AR + KV cache']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    toy = parser.add_argument_group("part 1: the toy comparison")
    toy.add_argument("--skip-toy", action="store_true")
    toy.add_argument("--toy-steps", type=int, default=300,
                     help="training steps of each toy model (BD3-16 on 64-token rows diverged at 600)")
    toy.add_argument("--toy-prompts", type=int, default=128)
    toy.add_argument("--toy-prompt-len", type=int, default=16)
    toy.add_argument("--toy-new-tokens", type=int, default=48)
    toy.add_argument("--toy-block", type=int, default=16, help="the MDM's semi-autoregressive block length")
    toy.add_argument("--threshold", type=float, default=0.9, help="threshold decoding's confidence threshold")
    text = parser.add_argument_group("part 2: real text")
    text.add_argument("--skip-text", action="store_true")
    text.add_argument("--text-ckpt", default=DEFAULT_TEXT_CKPT)
    text.add_argument("--text-prompts", type=int, default=64)
    text.add_argument("--text-prompt-len", type=int, default=16)
    text.add_argument("--text-new-tokens", type=int, default=32)
    text.add_argument("--text-block", type=int, default=8)
    speed = parser.add_argument_group("part 3: speed at size")
    speed.add_argument("--skip-speed", action="store_true")
    speed.add_argument("--size", default="smdm-6M")
    speed.add_argument("--vocab", type=int, default=4096)
    speed.add_argument("--batch", type=int, default=4)
    speed.add_argument("--prompt-len", type=int, default=32)
    speed.add_argument("--new-tokens", type=int, default=256)
    speed.add_argument("--mdm-steps", type=int, default=64, help="MDM model calls for the whole answer")
    speed.add_argument("--block", type=int, default=32, help="the MDM's semi-autoregressive block length")
    speed.add_argument("--bd3-blocks", type=int, nargs="+", default=[4, 16], help="BD3 block sizes")
    args = parser.parse_args()
    if not args.skip_toy:
        part1(args)
    if not args.skip_text:
        part2(args)
    if not args.skip_speed:
        part3(args)


if __name__ == "__main__":
    main()
