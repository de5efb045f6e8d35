"""``lldiff eval``: zero-shot multiple-choice accuracy of a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from lldiff.atomic import write_text

from .tasks import (
    BUILTIN_TASKS,
    HELDOUT_TASK,
    RunData,
    RunDataUnavailable,
    UnigramScorer,
    build_heldout_task,
    find_run_config,
    heldout_texts,
    load_jsonl_task,
    read_run_data,
    run_heldout_texts,
    unigram_baseline,
)

DEFAULT_VAL_FRACTION = 0.05

DESCRIPTION = """\
Zero-shot multiple-choice evaluation: every choice is scored by log p(choice | context)
(AR: exact; MDM: LLaDA's Monte-Carlo lower bound, BD3: the block diffusion lower bound, each
with --n-mc draws, the same random draws for every choice of an example) and the best one is the prediction. Reports accuracy (total
log-likelihood) and accuracy_norm (log-likelihood per UTF-8 byte of the choice).

TASK is a .jsonl file, one JSON object per line:
  {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}
(context: string; choices: >= 2 non-empty strings; label: index of the correct choice).
Context and choice are tokenised separately: put the separating space in the CHOICE.

Or the built-in offline task 'heldout-continuation': contexts are the starts of paragraphs of
validation documents, the true continuation is the next --continuation-chars characters, and
the other choices are the continuations of paragraphs of other documents, cut the same way
(which one is true: the choice at rank r under a character unigram of the text, r running
through a shuffled 0..n-1 in every --n-choices consecutive examples, so each rank is the truth
equally often and a context-free guess is right 1/--n-choices of the time).
The text is the checkpoint's own run's validation split, read from the run's config.yaml
(<run>/config.yaml beside <run>/checkpoints/): its corpus, max_bytes and val_fraction (a fine-tuning run: the responses of its validation turns). --corpus/--paths
choose other text (a note says when it differs from the run's); without a run config the
default is the stdlib corpus at --val-fraction 0.05 (a note says so).

Beside the model's accuracy the output shows a context-free baseline on the same examples:
the accuracy of a unigram model (characters, and the checkpoint's tokens; counts from the
held-out text, or from the contexts of a JSONL task) that scores each choice alone.
"""


def build_parser() -> argparse.ArgumentParser:
    from lldiff.generate import one_line_errors

    p = one_line_errors(argparse.ArgumentParser(
        prog="lldiff eval", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    ))
    p.add_argument("--ckpt", required=True, help="lldiff checkpoint (.ckpt file or sharded directory) or a LLaDA "
                   "directory")
    p.add_argument("--task", help=f"a .jsonl task file or one of: {', '.join(BUILTIN_TASKS)}")
    p.add_argument("--harness-tasks", help="instead of --task: lm-eval-harness task names, comma-separated "
                   "(extra `eval`; the tasks' data must be reachable)")
    p.add_argument("--harness-include", help="directory of extra lm-eval task YAMLs (e.g. over local data files)")
    p.add_argument("--n-mc", type=int, default=None,
                   help="MDM/BD3 Monte-Carlo draws per choice (default 32; upstream 128)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=None, help="MDM/BD3 draws per forward pass (default 32)")
    p.add_argument("--cfg-scale", type=float, default=None, help="MDM classifier-free guidance weight (default 0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the MDM/BD3 draws (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's run directory)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default=None, help="write the results (with per-example predictions) to this JSON file")
    p.add_argument("--no-boundary-token", action="store_true",
                   help="do not put the EOS document boundary before each context")
    g = p.add_argument_group(f"built-in task '{HELDOUT_TASK}'")
    g.add_argument("--corpus", choices=("stdlib", "files"), default=None,
                   help="text source (default: the run's data from its config.yaml, else stdlib)")
    g.add_argument("--paths", nargs="+", default=None, help="files/globs/directories for --corpus files "
                   "(implies --corpus files)")
    g.add_argument("--max-bytes", type=int, default=None,
                   help="corpus cap in bytes (default: the run's; without a run config 4,000,000 for stdlib, "
                   "like training, none for files)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="validation fraction of the split (default: the run's; without a run config 0.05)")
    g.add_argument("--n-examples", type=int, default=100, help="examples to build (default 100)")
    g.add_argument("--context-chars", type=int, default=200, help="context length in characters (default 200)")
    g.add_argument("--continuation-chars", type=int, default=50, help="continuation length in characters (default 50)")
    g.add_argument("--n-choices", type=int, default=4, help="choices per example (default 4)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of the task construction (default 0)")
    return p


def _note(message: str) -> None:
    print(f"lldiff eval: note: {message}", file=sys.stderr)


def _same_paths(a: list[str] | None, b: list[str] | None) -> bool:
    from lldiff.data.corpora import resolve_paths

    try:
        return resolve_paths(a or []) == resolve_paths(b or [])
    except (OSError, ValueError):
        return sorted(str(Path(p).absolute()) for p in a or []) == sorted(str(Path(p).absolute()) for p in b or [])


def _flags_match_run(corpus: str, paths: list[str] | None, run: RunData) -> bool:
    return run.kind == "pretrain" and run.args["source"] == corpus and (
        corpus != "files" or _same_paths(paths, run.args["paths"]))


def _heldout_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, Any]]:
    """The built-in task's documents: the run's validation split by default (see DESCRIPTION),
    and what they are (``task_args``). Notes go to stderr, one line each."""
    corpus = args.corpus or ("files" if args.paths else None)
    if args.paths and corpus != "files":
        parser.error(f"--paths needs --corpus files (got --corpus {corpus})")
    if corpus == "files" and not args.paths:
        parser.error("--corpus files needs --paths")
    if args.max_bytes is not None and args.max_bytes < 1:
        parser.error(f"--max-bytes must be >= 1, got {args.max_bytes}")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be strictly between 0 and 1, got {args.val_fraction}")
    if args.n_choices < 2:
        parser.error(f"--n-choices must be >= 2, got {args.n_choices}")
    config = find_run_config(args.ckpt)
    run: RunData | None = None
    why = f"no run config (config.yaml) beside {args.ckpt} or in its run directory"
    if config is not None:
        try:
            run = read_run_data(config)
        except RunDataUnavailable as e:
            why = str(e)
        except ValueError as e:
            parser.error(str(e))
    info: dict[str, Any] = {"run_config": str(config) if run is not None else None}
    if run is not None and (corpus is None or _flags_match_run(corpus, args.paths, run)):
        vf = args.val_fraction if args.val_fraction is not None else run.val_fraction
        if vf > run.val_fraction:
            _note(f"--val-fraction {vf} is larger than the run's val_fraction {run.val_fraction} ({config}): "
                  f"some of the task's documents were training documents")
        if run.kind == "sft" and args.max_bytes is not None:
            _note("--max-bytes does not apply to a fine-tuning run's data; ignored")
        max_bytes = args.max_bytes if args.max_bytes is not None else "run"
        try:
            texts = run_heldout_texts(run, max_bytes=max_bytes, val_fraction=vf)
        except (ValueError, FileNotFoundError) as e:
            parser.error(f"cannot read the run's data ({run.describe()}, from {config}): {e}; "
                         f"pass --corpus/--paths to use other text")
        if run.kind == "sft":
            info.update(data_from="run config", corpus="sft", paths=run.args["train_files"],
                        val_files=run.args["val_files"], max_bytes=None, val_fraction=vf)
        else:
            info.update(data_from="run config", corpus=run.args["source"], paths=run.args["paths"],
                        max_bytes=run.args["max_bytes"] if max_bytes == "run" else max_bytes, val_fraction=vf)
        return texts, info
    vf = args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION
    source = corpus or "stdlib"
    shown = f"--corpus {source}" + (f" --paths {' '.join(args.paths)}" if args.paths else "")
    if run is not None:
        _note(f"{shown} differs from the data this run trained on ({run.describe()}, from {config}); "
              f"the task is built from the flags, not from the run's validation split")
    elif corpus is None:
        _note(f"{why}; {HELDOUT_TASK} uses the default corpus stdlib (val_fraction {vf})")
    else:
        _note(f"{why}; {HELDOUT_TASK} uses {shown} as given (val_fraction {vf}), not checked against the "
              f"training data")
    texts = heldout_texts(source, paths=args.paths, max_bytes=args.max_bytes, val_fraction=vf)
    info.update(data_from="flags" if corpus else "default", corpus=source, paths=args.paths,
                max_bytes=args.max_bytes, val_fraction=vf)
    return texts, info


def _load_task(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(examples, texts the unigram baseline counts, what those texts are, task_args or None)."""
    if args.task in BUILTIN_TASKS:
        texts, info = _heldout_data(args, parser)
        examples = build_heldout_task(
            texts, n_examples=args.n_examples, context_chars=args.context_chars,
            continuation_chars=args.continuation_chars, n_choices=args.n_choices, seed=args.task_seed,
        )
        info.update({k: getattr(args, k) for k in (
            "n_examples", "context_chars", "continuation_chars", "n_choices", "task_seed")})
        return examples, texts, "the held-out documents", info
    from lldiff.inputs import read_text_file

    path = Path(args.task)
    if path.suffix != ".jsonl":
        parser.error(f"unknown task {args.task!r}: give a .jsonl file or one of: {', '.join(BUILTIN_TASKS)}")
    if not path.is_file():
        parser.error(f"task file {args.task!r} does not exist")
    try:
        read_text_file(path, "--task")  # a binary file is named here, not as a decoding error
        examples = load_jsonl_task(path)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    return examples, [e.context for e in examples], "the task's contexts", None


def _unigram_baselines(examples, texts: list[str], counts_from: str, tokenizer: Any) -> dict[str, Any]:
    """Context-free unigram accuracy on the same examples: characters and the model's tokens."""
    out: dict[str, Any] = {"counts_from": counts_from}
    for name, unit in (("char", "char"), ("token", tokenizer.encode)):
        out[name] = unigram_baseline(examples, UnigramScorer(texts, unit=unit))
        out[name].pop("chance")
        out[name].pop("n_examples")
    return out


def _run_harness(args: argparse.Namespace, parser: argparse.ArgumentParser, given: list[str]) -> dict[str, Any]:
    """Evaluate through lm-eval-harness with the checkpoint wrapped as ``LLDiffLM``."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from .lm_eval_adapter import LLDiffLM
    except ImportError:
        parser.error("--harness-tasks needs lm-eval-harness: pip install 'lldiff[eval]'")
    try:
        lm = LLDiffLM(ckpt=args.ckpt, n_mc=args.n_mc, batch_size=args.batch_size, cfg_scale=args.cfg_scale,
                      tokenizer=args.tokenizer, device=args.device, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    _refuse_foreign_score_options(given, lm.loaded.objective, parser, args.ckpt)
    manager = TaskManager(include_path=args.harness_include) if args.harness_include else None
    tasks = [t.strip() for t in args.harness_tasks.split(",") if t.strip()]
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=manager)
    objective = lm.loaded.objective
    results = {"checkpoint": str(Path(args.ckpt).resolve()), "objective": objective.name,
               "n_mc": args.n_mc if "n_mc" in objective.score_options else None, "results": output["results"]}
    for task, metrics in output["results"].items():
        shown = ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    if args.out:
        write_text(args.out, json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.out}")
    return results


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr (examples scored, examples/s, time left) while the examples are
    scored: an MDM's Monte-Carlo scoring takes minutes on a CPU. Shown on a terminal only (a
    redirected stderr keeps its lines). Yields the ``progress(done, total)`` callback of
    :func:`evaluate_multiple_choice`."""
    from tqdm import tqdm

    with tqdm(total=total, desc="lldiff eval", unit="example", file=sys.stderr, dynamic_ncols=True,
              disable=None) as bar:
        yield lambda done, _total: bar.update(done - bar.n)


def _check_values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Refuse, before anything is read, every value that is out of range or could not be used;
    fill in the scorer's defaults and return the scorer options that were given."""
    from lldiff.inputs import check_device, check_output_file

    from .multiple_choice import SCORE_DEFAULTS

    for name in ("n_mc", "batch_size", "n_examples", "context_chars", "continuation_chars", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.cfg_scale is not None and not args.cfg_scale >= 0:
        parser.error(f"--cfg-scale must be >= 0 (0 = off), got {args.cfg_scale}")
    if not Path(args.ckpt).exists():
        parser.error(f"--ckpt {args.ckpt!r} does not exist (give a .ckpt file, a sharded checkpoint directory "
                     "or a LLaDA directory)")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer {args.tokenizer!r} does not exist")
    try:
        check_device(args.device)
        if args.out is not None:
            check_output_file(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    given = [name for name in SCORE_DEFAULTS if getattr(args, name) is not None]
    for name, default in SCORE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return given


def _refuse_foreign_score_options(given: list[str], objective: Any, parser: argparse.ArgumentParser,
                                  args_ckpt: str) -> None:
    """Refuse scorer options given that this checkpoint's objective does not use (the registry's
    ``score_options``): an AR's likelihood is exact, it takes no Monte-Carlo draws."""
    from lldiff.completion import article, option_owners

    foreign = [name for name in given if name not in objective.score_options]
    if foreign:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
        owners = "; ".join(f"--{n.replace('_', '-')} applies to {option_owners(n, 'score_options')} checkpoints"
                           for n in foreign)
        parser.error(f"{flags} do(es) not apply to {article(objective.label)} {objective.label} checkpoint "
                     f"({args_ckpt}): {owners}")


def main(argv: list[str]) -> dict[str, Any]:
    """Run ``lldiff eval`` with ``argv`` (the arguments after ``eval``); returns the results.
    Bad input exits with status 2 and a one-line message."""
    from lldiff.checkpoint import load_model

    from .multiple_choice import evaluate_multiple_choice

    parser = build_parser()
    args = parser.parse_args(list(argv))
    if (args.task is None) == (args.harness_tasks is None):
        parser.error("give exactly one of --task (JSONL file or built-in task) and --harness-tasks")
    given = _check_values(args, parser)
    if args.harness_tasks is not None:
        return _run_harness(args, parser, given)
    task = None if args.task in BUILTIN_TASKS else _load_task(args, parser)  # a task file is read before the model
    try:
        loaded = load_model(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    except Exception as e:  # noqa: BLE001 (not an lldiff checkpoint, unreadable, tokenizer mismatch)
        parser.error(f"cannot load --ckpt {args.ckpt}: {' '.join(str(e).split())}")
    _refuse_foreign_score_options(given, loaded.objective, parser, args.ckpt)
    if loaded.tokenizer is None:
        parser.error(f"no tokenizer.json next to {args.ckpt} (or its parent); pass --tokenizer PATH")
    try:
        examples, count_texts, counts_from, task_args = task or _load_task(args, parser)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.limit is not None:
        examples = examples[: args.limit]
    start = time.perf_counter()
    try:
        with progress_bar(len(examples)) as progress:
            results = evaluate_multiple_choice(
                loaded, None, examples, n_mc=args.n_mc, batch_size=args.batch_size, cfg_scale=args.cfg_scale,
                seed=args.seed, boundary_token=not args.no_boundary_token, progress=progress,
            )
    except ValueError as e:
        parser.error(str(e))
    results = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "task": args.task if args.task in BUILTIN_TASKS else str(Path(args.task).resolve()),
        "seconds": round(time.perf_counter() - start, 3),
        **results,
    }
    results["unigram_baseline"] = _unigram_baselines(examples, count_texts, counts_from, loaded.tokenizer)
    if task_args is not None:
        results["task_args"] = task_args
    n_mc = "exact" if results["n_mc"] is None else str(results["n_mc"])
    print(f"task: {results['task']}  checkpoint: {args.ckpt}")
    print(f"objective: {results['objective']}  n_mc: {n_mc}  cfg_scale: {results['cfg_scale']}  "
          f"examples: {results['n_examples']}  truncated choices: {results['n_truncated']}")
    print(f"accuracy: {results['accuracy']:.4f}  accuracy_norm (per byte): {results['accuracy_norm']:.4f}  "
          f"chance: {results['chance']:.4f}  ({results['seconds']:.1f}s)")
    uni = results["unigram_baseline"]
    print(f"context-free unigram baseline, same examples (counts: {uni['counts_from']}): "
          f"chars accuracy: {uni['char']['accuracy']:.4f} accuracy_norm: {uni['char']['accuracy_norm']:.4f}  "
          f"model tokens accuracy: {uni['token']['accuracy']:.4f} accuracy_norm: {uni['token']['accuracy_norm']:.4f}")
    if args.out:
        write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")
    sys.stdout.flush()
    return results
