"""Next-line / previous-line instruction data from any line-structured text (verse, code).

The reversal study (``studies/reversal.py``, LLaDA Table 3) and the SFT demo both use it:

    python -m lldiff.data.line_tasks --out data/sft/stdlib-lines                 # offline corpus
    python -m lldiff.data.line_tasks --text ../shared/data/tinyshakespeare.txt --out data/sft/verse

The text becomes a sequence of distinct lines (duplicated lines are removed everywhere, so
that every line has one next and one previous line). The lines are cut into consecutive
blocks; alternate blocks (by a seeded draw) go to fine-tuning and to evaluation, so no pair
of neighbouring lines of an evaluation block ever appears in a fine-tuning example, in
either direction. Writes ``pretrain.txt`` (the lines in forward order as overlapping
windows, blank-line separated: knowledge seen forwards only), ``train.jsonl`` (both
directions on the fine-tuning blocks), ``eval-forward.jsonl`` and ``eval-reversal.jsonl``
(queries on the interior lines of the evaluation blocks), all as prompt/response pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lldiff.atomic import write_text

NEXT = "next line after: {line}"
PREVIOUS = "line before: {line}"


def distinct_lines(text: str, *, min_chars: int = 8, max_chars: int = 48) -> list[str]:
    """Stripped lines of ``text`` within the length bounds, in order, without any line that
    occurs more than once (its neighbours would be ambiguous)."""
    if min_chars < 1 or max_chars < min_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if min_chars <= len(line) <= max_chars]
    counts = Counter(lines)
    return [line for line in lines if counts[line] == 1]


def windows(lines: list[str], size: int) -> list[str]:
    """Every run of ``size`` consecutive lines (stride 1): each neighbouring pair appears,
    in forward order, in up to ``size - 1`` documents."""
    if size < 2:
        raise ValueError(f"window size must be >= 2 lines, got {size}")
    return ["\n".join(lines[i:i + size]) for i in range(max(1, len(lines) - size + 1))]


@dataclass(frozen=True)
class LineTasks:
    lines: list[str]
    train: list[dict[str, str]]
    eval_forward: list[dict[str, str]]
    eval_reversal: list[dict[str, str]]


def line_tasks(lines: list[str], *, block: int = 8, finetune_fraction: float = 0.5, seed: int = 0) -> LineTasks:
    """Split ``lines`` into blocks of ``block`` lines; a ``finetune_fraction`` of the blocks
    give next/previous-line training pairs, the others give held-out queries on their
    interior lines (whose both neighbours lie in the same block)."""
    if block < 3:
        raise ValueError(f"block must be >= 3 lines (a query line needs both neighbours), got {block}")
    if not 0.0 < finetune_fraction < 1.0:
        raise ValueError(f"finetune_fraction must be in (0, 1), got {finetune_fraction}")
    starts = list(range(0, len(lines) - block + 1, block))
    if len(starts) < 2:
        raise ValueError(f"{len(lines)} lines make fewer than 2 blocks of {block}; use more text or a smaller block")
    rng = random.Random(seed)
    chosen = set(rng.sample(starts, max(1, min(len(starts) - 1, round(finetune_fraction * len(starts))))))
    train, forward, reversal = [], [], []
    for start in starts:
        blk = lines[start:start + block]
        if start in chosen:
            train += [pair(NEXT, a, b) for a, b in itertools.pairwise(blk)]
            train += [pair(PREVIOUS, b, a) for a, b in itertools.pairwise(blk)]
        else:
            forward += [pair(NEXT, blk[i], blk[i + 1]) for i in range(1, block - 1)]
            reversal += [pair(PREVIOUS, blk[i], blk[i - 1]) for i in range(1, block - 1)]
    rng.shuffle(train)
    return LineTasks(lines, train, forward, reversal)


def pair(instruction: str, line: str, answer: str) -> dict[str, str]:
    return {"prompt": instruction.format(line=line), "response": answer}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_line_tasks(tasks: LineTasks, out: Path, *, window: int = 4, copies: int = 1, seed: int = 0) -> dict[str, Path]:
    """The files of a line-task dataset (atomic writes); returns their paths by name.

    ``pretrain.txt`` holds ``copies`` passes over the windows, each in its own seeded
    order: packed into fixed rows, every window then appears at several offsets and next
    to several neighbours, so a model learns the lines themselves rather than the rows."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "eval-forward", "eval-reversal")}
    rng, docs = random.Random(seed), []
    for _ in range(copies):
        order = windows(tasks.lines, window)
        rng.shuffle(order)
        docs += order
    write_text(out / "pretrain.txt", "\n\n".join(docs) + "\n")
    write_jsonl(paths["train"], tasks.train)
    write_jsonl(paths["eval-forward"], tasks.eval_forward)
    write_jsonl(paths["eval-reversal"], tasks.eval_reversal)
    return {"pretrain": out / "pretrain.txt", **paths}


def corpus_text(text_path: str | None, max_bytes: int) -> str:
    """The text of ``text_path``, or of the offline corpus (Python's standard library)."""
    if text_path is not None:
        path = Path(text_path)
        if not path.is_file():
            raise FileNotFoundError(f"text file {text_path!r} does not exist")
        return path.read_text(encoding="utf-8", errors="replace")[:max_bytes]
    from lldiff.data.corpora import StdlibCorpus

    return "\n".join(d.text for d in StdlibCorpus(max_bytes=max_bytes).documents())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lldiff.data.line_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a line-structured text file (default: the offline stdlib corpus)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--lines", type=int, default=512, help="distinct lines to use (default 512)")
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--window", type=int, default=4, help="lines per pre-training document")
    parser.add_argument("--copies", type=int, default=1, help="shuffled passes over the windows in pretrain.txt")
    parser.add_argument("--min-chars", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lines = distinct_lines(corpus_text(args.text, 2_000_000), min_chars=args.min_chars, max_chars=args.max_chars)
    tasks = line_tasks(lines[: args.lines], block=args.block, seed=args.seed)
    paths = write_line_tasks(tasks, Path(args.out), window=args.window, copies=args.copies, seed=args.seed)
    print(f"{len(tasks.lines)} lines: {len(tasks.train)} training pairs, {len(tasks.eval_forward)} forward and "
          f"{len(tasks.eval_reversal)} reversal queries -> " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
