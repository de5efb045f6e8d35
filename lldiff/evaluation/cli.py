"""``lldiff eval``: zero-shot multiple-choice accuracy of a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lldiff.atomic import write_text

from .tasks import (
    BUILTIN_TASKS,
    HELDOUT_TASK,
    build_heldout_task,
    heldout_texts,
    load_jsonl_task,
)

DESCRIPTION = """\
Zero-shot multiple-choice evaluation: every choice is scored by log p(choice | context)
(AR: exact; MDM: LLaDA's Monte-Carlo lower bound with --n-mc draws, the same random draws for
every choice of an example) and the best one is the prediction. Reports accuracy (total
log-likelihood) and accuracy_norm (log-likelihood per UTF-8 byte of the choice).

TASK is a .jsonl file, one JSON object per line:
  {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}
(context: string; choices: >= 2 non-empty strings; label: index of the correct choice).
Context and choice are tokenised separately: put the separating space in the CHOICE.

Or the built-in offline task 'heldout-continuation': contexts are the starts of paragraphs of
the corpus's validation documents (same split rule as training), the true continuation is
the next --continuation-chars characters, distractors are segments of other documents.
Use --val-fraction <= the training run's (default 0.05) so all of it was held out.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lldiff eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="lldiff checkpoint (.ckpt)")
    p.add_argument("--task", help=f"a .jsonl task file or one of: {', '.join(BUILTIN_TASKS)}")
    p.add_argument("--harness-tasks", help="instead of --task: lm-eval-harness task names, comma-separated "
                   "(extra `eval`; the tasks' data must be reachable)")
    p.add_argument("--harness-include", help="directory of extra lm-eval task YAMLs (e.g. over local data files)")
    p.add_argument("--n-mc", type=int, default=32, help="MDM Monte-Carlo draws per choice (default 32; upstream 128)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=32, help="MDM draws per forward pass (default 32)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="MDM classifier-free guidance weight (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MDM draws (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's run directory)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=None, help="write the results (with per-example predictions) to this JSON file")
    p.add_argument("--no-boundary-token", action="store_true",
                   help="do not put the EOS document boundary before each context")
    g = p.add_argument_group(f"built-in task '{HELDOUT_TASK}'")
    g.add_argument("--corpus", choices=("stdlib", "files"), default="stdlib", help="text source (default stdlib)")
    g.add_argument("--paths", nargs="+", default=None, help="files/globs/directories for --corpus files")
    g.add_argument("--max-bytes", type=int, default=None,
                   help="corpus cap in bytes (default 4,000,000 for stdlib, like training, none for files)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="validation fraction of the split (default 0.05)")
    g.add_argument("--n-examples", type=int, default=100, help="examples to build (default 100)")
    g.add_argument("--context-chars", type=int, default=200, help="context length in characters (default 200)")
    g.add_argument("--continuation-chars", type=int, default=50, help="continuation length in characters (default 50)")
    g.add_argument("--n-choices", type=int, default=4, help="choices per example (default 4)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of the task construction (default 0)")
    return p


def _load_task(args: argparse.Namespace, parser: argparse.ArgumentParser):
    if args.task in BUILTIN_TASKS:
        if args.paths and args.corpus != "files":
            parser.error("--paths needs --corpus files")
        if args.corpus == "files" and not args.paths:
            parser.error("--corpus files needs --paths")
        texts = heldout_texts(args.corpus, paths=args.paths, max_bytes=args.max_bytes, val_fraction=args.val_fraction)
        return build_heldout_task(
            texts, n_examples=args.n_examples, context_chars=args.context_chars,
            continuation_chars=args.continuation_chars, n_choices=args.n_choices, seed=args.task_seed,
        )
    path = Path(args.task)
    if path.suffix != ".jsonl":
        parser.error(f"unknown task {args.task!r}: give a .jsonl file or one of: {', '.join(BUILTIN_TASKS)}")
    if not path.is_file():
        parser.error(f"task file {args.task!r} does not exist")
    return load_jsonl_task(path)


def _run_harness(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Evaluate through lm-eval-harness with the checkpoint wrapped as ``LLDiffLM``."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from .lm_eval_adapter import LLDiffLM
    except ImportError:
        parser.error("--harness-tasks needs lm-eval-harness: pip install 'lldiff[eval]'")
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint {args.ckpt!r} does not exist")
    try:
        lm = LLDiffLM(ckpt=args.ckpt, n_mc=args.n_mc, batch_size=args.batch_size, cfg_scale=args.cfg_scale,
                      tokenizer=args.tokenizer, device=args.device, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    manager = TaskManager(include_path=args.harness_include) if args.harness_include else None
    tasks = [t.strip() for t in args.harness_tasks.split(",") if t.strip()]
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=manager)
    results = {"checkpoint": str(Path(args.ckpt).resolve()), "objective": lm.loaded.objective,
               "n_mc": args.n_mc if lm.loaded.objective == "mdm" else None, "results": output["results"]}
    for task, metrics in output["results"].items():
        shown = ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    if args.out:
        write_text(args.out, json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")
    return results


def main(argv: list[str]) -> dict[str, Any]:
    """Run ``lldiff eval`` with ``argv`` (the arguments after ``eval``); returns the results.
    Bad input exits with status 2 and a one-line message."""
    from lldiff.checkpoint import load_model

    from .multiple_choice import evaluate_multiple_choice

    parser = build_parser()
    args = parser.parse_args(list(argv))
    if (args.task is None) == (args.harness_tasks is None):
        parser.error("give exactly one of --task (JSONL file or built-in task) and --harness-tasks")
    if args.harness_tasks is not None:
        return _run_harness(args, parser)
    for name in ("n_mc", "batch_size", "n_examples", "context_chars", "continuation_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if not args.cfg_scale >= 0:
        parser.error("--cfg-scale must be >= 0")
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint {args.ckpt!r} does not exist")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        parser.error(f"tokenizer {args.tokenizer!r} does not exist")
    try:
        loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    except Exception as e:  # noqa: BLE001 (not an lldiff checkpoint, unreadable, tokenizer mismatch)
        parser.error(f"cannot load {args.ckpt}: {e}")
    if loaded.objective == "ar" and args.cfg_scale > 0:
        parser.error("--cfg-scale applies to MDM checkpoints only; this is an AR checkpoint")
    if loaded.tokenizer is None:
        parser.error(f"no tokenizer.json next to {args.ckpt} (or its parent); pass --tokenizer PATH")
    try:
        examples = _load_task(args, parser)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.limit is not None:
        examples = examples[: args.limit]
    start = time.perf_counter()
    try:
        results = evaluate_multiple_choice(
            loaded, None, examples, n_mc=args.n_mc, batch_size=args.batch_size, cfg_scale=args.cfg_scale,
            seed=args.seed, boundary_token=not args.no_boundary_token,
        )
    except ValueError as e:
        parser.error(str(e))
    results = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "task": args.task if args.task in BUILTIN_TASKS else str(Path(args.task).resolve()),
        "seconds": round(time.perf_counter() - start, 3),
        **results,
    }
    if args.task in BUILTIN_TASKS:
        results["task_args"] = {k: getattr(args, k) for k in (
            "corpus", "paths", "max_bytes", "val_fraction", "n_examples", "context_chars",
            "continuation_chars", "n_choices", "task_seed")}
    n_mc = "exact" if results["objective"] == "ar" else str(results["n_mc"])
    print(f"task: {results['task']}  checkpoint: {args.ckpt}")
    print(f"objective: {results['objective']}  n_mc: {n_mc}  cfg_scale: {results['cfg_scale']}  "
          f"examples: {results['n_examples']}  truncated choices: {results['n_truncated']}")
    print(f"accuracy: {results['accuracy']:.4f}  accuracy_norm (per byte): {results['accuracy_norm']:.4f}  "
          f"chance: {results['chance']:.4f}  ({results['seconds']:.1f}s)")
    if args.out:
        write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")
    sys.stdout.flush()
    return results
