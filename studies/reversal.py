"""The reversal curse, every objective side by side (LLaDA Table 3; SPEC §8 and §12).

    python studies/reversal.py --task facts --preset cpu --out runs/reversal-facts   # synthetic facts (~20 min)
    python studies/reversal.py --task lines --preset cpu --out runs/reversal-lines   # next/previous line
    python studies/reversal.py --task lines --preset cpu --out runs/reversal-verse --text ../shared/data/tinyshakespeare.txt

Two tasks, one protocol:

* **facts** (``lldiff.data.fact_tasks``, Berglund et al. 2023): invented people linked by
  relations, each fact written in pre-training in one direction only ("A is the mentor of
  B", several paraphrases). Forward asks for B given A, backward for A given B.
* **lines** (``lldiff.data.line_tasks``, LLaDA's poem task): distinct lines of a text in
  forward order; forward asks for the next line, reversal for the previous one.

1. **Pre-train** every objective (AR, MDM by default; ``--objectives ar,mdm,bd3-8`` adds
   others from ``lldiff.objectives``) of the same size on the same text, same batches
   and steps (same tokens, same compute). An ``ExactMatchProbe`` measures, every
   ``probe_every`` steps, recall of the held-out items by **infilling** their own
   pre-training text: the answer's tokens masked, a model that sees the right context
   (registry: ``infill_sees_right_context``, the MDM) both sides, the others (AR, BD3) their
   left context only (so their backward infilling is not defined). The study reports
   the step at which forward recall plateaus: under-trained is told apart from cannot-reverse.
2. **Fine-tune** every objective on the question format (``lldiff.finetune``) with one
   share of the items, both directions, same steps; the probe follows the held-out
   questions during fine-tuning.
3. **Evaluate** exact match on the held-out items: instructions (after fine-tuning) and
   infilling (zero-shot, after pre-training).

Writes ``OUT/reversal.md`` (the table in the shape of LLaDA's Table 3 with the paper's rows,
the plateau steps), ``OUT/results.json``, ``OUT/answers-<objective>.json``, figures of recall
over training steps (``OUT/recall.png``, ``.svg``) and TensorBoard scalars under ``OUT/tb``.
Every stage is an ordinary ``lldiff fit`` whose config is saved in ``OUT/configs``;
re-running the command resumes an interrupted stage and skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lldiff import objectives as registry
from lldiff.atomic import write_text
from lldiff.checkpoint import load_model
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.config import ModelConfig
from lldiff.data.chat import ChatTemplate
from lldiff.data.fact_tasks import fact_tasks, write_fact_tasks
from lldiff.data.line_tasks import corpus_text, distinct_lines, line_tasks, write_line_tasks
from lldiff.data.split import split_score
from lldiff.evaluation.exact_match import accuracy, answers_for, expected_text, read_items

OBJECTIVES = ("ar", "mdm")  # the default; any names of lldiff.objectives (--objectives)
NOTES = {"mdm": "LLaDA objective"}  # presentation only: a word after an objective's label in the table
# the question ends the prompt, right before the answer, as in pre-training ("X\nY")
STUDY_TEMPLATE = ChatTemplate(system="{content}\n", user="{content}\n", assistant="{content}\n")
PAPER_ROWS = [("GPT-4o (paper)", 82.7, 34.3), ("Qwen2.5-7B Instruct (paper)", 75.9, 38.0),
              ("LLaDA-8B Instruct (paper)", 48.8, 42.4)]
DIRECTIONS = ("forward", "backward")
KINDS = {"instruction": "instructions after fine-tuning", "infill": "infilling after pre-training, zero-shot",
         "infill_after_sft": "infilling after fine-tuning"}
PLATEAU_TOLERANCE = 0.02  # recall within 2 points of its best from then on


@dataclass(frozen=True, kw_only=True)
class Preset:
    size: str
    vocab_size: int
    pretrain_steps: int
    sft_steps: int
    seq_len: int = 64
    batch_size: int = 32
    sft_batch_size: int = 32
    lr: float = 2e-3
    sft_lr: float = 1e-3
    answer_tokens: int = 24
    mdm_block_length: int = 8  # semi-autoregressive blocks (LLaDA's instruct setting): EOS padding cannot win early
    val_every: int = 250
    probe_every: int = 250
    probe_items: int = 128  # held-out items per probe during training (all are scored at the end)
    val_fraction: float = 0.05


@dataclass(frozen=True, kw_only=True)
class LinesPreset(Preset):
    lines: int
    block: int = 8
    window: int = 4
    copies: int = 8  # shuffled passes over the windows: each line at many row offsets
    max_chars: int = 40


@dataclass(frozen=True, kw_only=True)
class FactsPreset(Preset):
    facts: int
    paraphrases: int = 3
    copies: int = 4  # shuffled passes over the statements
    sft_fraction: float = 0.5


PRESETS: dict[str, dict[str, Preset]] = {
    "lines": {
        # ~10 min on 2 CPU cores: tiny models pre-train on 128 lines, then learn the two instructions
        # (sft_lr 1e-4: at 5e-4 fine-tuning wiped most of the MDM's pre-trained recall; AR unchanged either way)
        "cpu": LinesPreset(lines=128, size="tiny-1M", vocab_size=512, pretrain_steps=1500, sft_steps=300, sft_lr=1e-4),
        # seconds: plumbing only (tests)
        "smoke": LinesPreset(lines=48, size="tiny-0.016M", vocab_size=300, pretrain_steps=12, sft_steps=6,
                             batch_size=8, copies=2, sft_batch_size=8, answer_tokens=8, val_every=6, probe_every=6,
                             probe_items=8),
        # a GPU node: a real model on a few thousand lines (bf16)
        "gpu": LinesPreset(lines=4096, size="smdm-34M", vocab_size=4096, pretrain_steps=20000, sft_steps=2000,
                           batch_size=128, sft_batch_size=64, lr=1e-3, sft_lr=2e-4, val_every=1000, probe_every=1000),
    },
    "facts": {
        # ~19 min on 2 CPU cores; the MDM's recall is still rising at the end (cpu-long: both plateau)
        "cpu": FactsPreset(facts=200, size="tiny-1M", vocab_size=512, pretrain_steps=3750, sft_steps=300, lr=5e-3,
                           sft_lr=5e-4, answer_tokens=8, mdm_block_length=8, val_fraction=0.01, probe_every=250),
        # ~40 min: the same with twice the steps, so that the MDM's recall plateaus too
        "cpu-long": FactsPreset(facts=200, size="tiny-1M", vocab_size=512, pretrain_steps=8000, sft_steps=300, lr=5e-3,
                                sft_lr=5e-4, answer_tokens=8, mdm_block_length=8, val_fraction=0.01, probe_every=500),
        "smoke": FactsPreset(facts=24, size="tiny-0.016M", vocab_size=300, pretrain_steps=12, sft_steps=6,
                             batch_size=8, sft_batch_size=8, answer_tokens=8, val_every=6, probe_every=6,
                             probe_items=8, copies=2, val_fraction=0.25),
        "gpu": FactsPreset(facts=1000, size="smdm-19M", vocab_size=1024, pretrain_steps=10000, sft_steps=1000,
                           batch_size=128, sft_batch_size=64, lr=1e-3, sft_lr=2e-4, answer_tokens=8,
                           val_every=1000, probe_every=500, probe_items=500, val_fraction=0.01),
    },
}


@dataclass(frozen=True)
class TaskData:
    files: dict[str, Path]  # pretrain, train, eval-forward/backward, probe-forward/backward
    description: str
    direction_labels: tuple[str, str]
    missing: int = 0  # held-out items with none of their pre-training text in the training split


def prepare_facts(p: FactsPreset, out: Path, text: str | None) -> TaskData:
    tasks = fact_tasks(p.facts, paraphrases=p.paraphrases, sft_fraction=p.sft_fraction)
    files = write_fact_tasks(tasks, out, copies=p.copies)
    in_val = {d for d in tasks.documents if split_score(d) < p.val_fraction}
    statements = {f: [d for d in tasks.documents if f.a in d] for f in tasks.heldout_facts}
    missing = sum(all(d in in_val for d in docs) for docs in statements.values())
    description = (f"{p.facts} invented facts (4 relations, {p.paraphrases} paraphrases each, always A before B, "
                   f"{p.copies} shuffled passes); {len(tasks.sft_facts)} facts teach the question format (both "
                   f"directions), {len(tasks.heldout_facts)} are held out")
    return TaskData(files, description, ("forward", "backward"), missing)


def prepare_lines(p: LinesPreset, out: Path, text: str | None) -> TaskData:
    lines = distinct_lines(corpus_text(text, 4_000_000), max_chars=p.max_chars)[: p.lines]
    if len(lines) < p.lines:
        raise ValueError(f"the text has only {len(lines)} distinct lines of 8..{p.max_chars} characters; "
                         f"the preset needs {p.lines}")
    tasks = line_tasks(lines, block=p.block)
    files = write_line_tasks(tasks, out, window=p.window, copies=p.copies)
    files.pop("eval-reversal").unlink()  # one name per direction across tasks: eval-backward
    # the other neighbour: the answer a model gives when it ignores which direction was asked
    for name, queries, other in (("eval-forward", tasks.eval_forward, tasks.eval_reversal),
                                 ("eval-backward", tasks.eval_reversal, tasks.eval_forward)):
        files[name] = out / f"{name}.jsonl"
        items = [{**item, "confusable": o["response"]} for item, o in zip(queries, other)]
        write_text(files[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    probes = {"probe-forward": [], "probe-backward": []}
    for fwd, rev in zip(tasks.eval_forward, tasks.eval_reversal):
        line = fwd["prompt"].split(": ", 1)[1]
        probes["probe-forward"].append({"prefix": line + "\n", "answer": fwd["response"], "suffix": ""})
        probes["probe-backward"].append({"prefix": "", "answer": rev["response"], "suffix": "\n" + line})
    for name, records in probes.items():
        files[name] = out / f"{name}.jsonl"
        write_text(files[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    source = text or "offline corpus (Python standard library lines)"
    description = (f"{source}, {p.lines} distinct lines in windows of {p.window}; half of the blocks of {p.block} "
                   "lines teach next/previous-line instructions, the other half are held out")
    return TaskData(files, description, ("forward", "reversal"))


PREPARE = {"facts": prepare_facts, "lines": prepare_lines}


def trainer_config(out: Path, name: str, steps: int, val_every: int, gpu: bool,
                   callbacks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "accelerator": "auto", "devices": 1, "precision": "bf16-mixed" if gpu else "32-true",
        "max_steps": steps, "val_check_interval": min(val_every, steps), "check_val_every_n_epoch": None,
        "log_every_n_steps": max(1, min(10, steps // 4)), "gradient_clip_val": 1.0, "enable_progress_bar": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(out / "tb"), "name": name, "version": "", "default_hp_metric": False}},
        "callbacks": callbacks,
    }


def probe_callback(p: Preset, items: dict[str, Path], every: int, **extra: Any) -> dict[str, Any]:
    return {"class_path": "lldiff.evaluation.exact_match.ExactMatchProbe", "init_args": {
        "items": {name: str(path) for name, path in items.items()}, "every_n_steps": every,
        "max_items": p.probe_items, **extra}}


def table_label(objective: str) -> str:
    """The objective's name in the table: the registry's label, with a note for some."""
    text = registry.get(objective).label
    return f"{text} ({NOTES[objective]})" if objective in NOTES else text


def pretrain_config(p: Preset, out: Path, objective: str, data: TaskData, gpu: bool) -> dict[str, Any]:
    module = registry.get(objective).module_config()
    model = {**module["init_args"], "size": p.size, "lr": p.lr, "warmup_steps": max(1, p.pretrain_steps // 20),
             "weight_decay": 0.0, "random_length_prob": 0.0}
    if not registry.get(objective).exact_likelihood:  # a Monte-Carlo bound: fewer draws during training
        model["val_mc_samples"] = 4
    probes = {f"infill_{d}": data.files[f"probe-{d}"] for d in infill_directions(objective)}
    return {
        "seed_everything": 1234,
        "model": {"class_path": module["class_path"], "init_args": model},
        "data": {"class_path": "lldiff.data.PretrainDataModule", "init_args": {
            "source": "files", "paths": [str(data.files["pretrain"])], "txt_unit": "paragraph",
            "vocab_size": p.vocab_size, "seq_len": p.seq_len, "batch_size": p.batch_size,
            "val_fraction": p.val_fraction, "val_max_rows": 64, "cache_dir": str(out / "cache"), "seed": 1234}},
        "trainer": trainer_config(out, f"pretrain-{objective}", p.pretrain_steps, p.val_every, gpu,
                                  [probe_callback(p, probes, p.probe_every)]),
    }


def sft_config(p: Preset, out: Path, objective: str, data: TaskData, gpu: bool) -> dict[str, Any]:
    run = out / "tb" / f"pretrain-{objective}"
    probes = {f"instruction_{d}": data.files[f"eval-{d}"] for d in DIRECTIONS}
    module = registry.get(objective).module_config(sft=True)
    return {
        "seed_everything": 1234,
        "model": {"class_path": module["class_path"], "init_args": {
            **module["init_args"], "init_from": str(run / "checkpoints" / "last.ckpt"), "lr": p.sft_lr,
            "warmup_steps": max(1, p.sft_steps // 20), "weight_decay": 0.0}},
        "data": {"class_path": "lldiff.data.SFTDataModule", "init_args": {
            "train_files": [str(data.files["train"])], "tokenizer_path": str(run), "val_fraction": 0.1,
            "template": STUDY_TEMPLATE.to_dict(),
            "max_length": p.seq_len, "batch_size": p.sft_batch_size, "seed": 1234}},
        "trainer": trainer_config(out, f"sft-{objective}", p.sft_steps, p.val_every, gpu, [probe_callback(
            p, probes, max(1, p.sft_steps // 6), template=STUDY_TEMPLATE.to_dict(), answer_tokens=p.answer_tokens,
            block_length=p.mdm_block_length)]),
    }


def infill_directions(objective: str) -> tuple[str, ...]:
    """A model whose infilling sees only the left context (AR, BD3) cannot infill a span that
    text follows: forward only."""
    return DIRECTIONS if registry.get(objective).infill_sees_right_context else ("forward",)


def fit(config: dict[str, Any], path: Path) -> Path:
    """Run (or resume, or skip if finished) one ``lldiff fit``; returns its last checkpoint."""
    from lldiff.launch import lightning_cli, resume_args

    write_text(path, yaml.safe_dump(config, sort_keys=False))
    logger = config["trainer"]["logger"]["init_args"]
    last = Path(logger["save_dir"]) / logger["name"] / str(logger.get("version") or "") / "checkpoints" / "last.ckpt"
    lightning_cli(["fit", "--config", str(path), *resume_args(config)])
    return last


def evaluate(ckpt: Path, items: list[dict[str, str]], p: Preset) -> tuple[float, list[dict[str, str]]]:
    """Exact match of a checkpoint's greedy answers on ``items`` (one kind), and the answers."""
    loaded = load_model(ckpt)
    options = DecodeOptions(length=p.answer_tokens, block_length=p.mdm_block_length)
    answers = answers_for(loaded.model, loaded.tokenizer, items, template=STUDY_TEMPLATE, options=options)
    expected = [expected_text(i) for i in items]
    examples = [{**item, "model_answer": a} for item, a in zip(items, answers)]
    return accuracy(answers, expected), examples


def wrong_answers(examples: list[dict[str, str]]) -> dict[str, int | None]:
    """How the answers to one query set went: correct, the ``confusable`` answer (the other
    direction's, where the task has one), empty, or anything else."""
    counts = {"correct": 0, "other direction": 0, "empty": 0, "other": 0}
    for e in examples:
        answer = e["model_answer"].strip()
        if answer == expected_text(e).strip():
            counts["correct"] += 1
        elif "confusable" in e and answer == e["confusable"].strip():
            counts["other direction"] += 1
        elif not answer:
            counts["empty"] += 1
        else:
            counts["other"] += 1
    if not any("confusable" in e for e in examples):
        counts["other direction"] = None  # the task has no such answer (facts)
    return counts


def plateau(curve: dict[int, float], total_steps: int) -> dict[str, Any]:
    """The first probe step from which recall stays within ``PLATEAU_TOLERANCE`` of its best;
    ``reached`` when that step leaves at least the last quarter of training flat."""
    if not curve:
        return {"step": None, "best": None, "final": None, "reached": False}
    steps = sorted(curve)
    best = max(curve.values())
    step = next(s for s in steps if all(curve[t] >= best - PLATEAU_TOLERANCE for t in steps if t >= s))
    return {"step": step, "best": best, "final": curve[steps[-1]], "reached": step <= 0.75 * total_steps}


def table(task: str, results: dict[str, Any], p: Preset, data: TaskData) -> str:
    fwd, bwd = data.direction_labels
    title = {"facts": "synthetic facts", "lines": "next / previous line"}[task]
    lines = [f"# Reversal: {title} (LLaDA Table 3 shape)", "",
             (f"Data: {data.description}. Every objective: {p.size}, {p.pretrain_steps} pre-training steps of "
              f"{p.batch_size}x{p.seq_len} tokens (same data, same tokens, same compute), then {p.sft_steps} "
              "fine-tuning steps on the question format. Exact match (%) on the held-out items."), "",
             f"| model | {fwd} | {bwd} |", "|---|---:|---:|"]
    for objective in results:
        for kind, how in KINDS.items():
            values = results[objective][kind]
            back = f"{100 * values['backward']:.1f}" if "backward" in values else "n/a (left context only)"
            lines.append(f"| {table_label(objective)}, {p.size}, {how} (this run) | {100 * values['forward']:.1f} | "
                         f"{back} |")
    lines += [f"| {name} | {f} | {b} |" for name, f, b in PAPER_ROWS]
    lines += ["", ("Paper rows: poem completion at scale (LLaDA, Nie et al. 2025, Table 3), for the shape of the "
              "result only; the numbers are not comparable with this run's."), "",
              "## Pre-training recall plateau (infilling, forward)", "",
              "| model | plateau step | best | final | plateaued |", "|---|---:|---:|---:|---|"]
    for objective in results:
        if "plateau" in results[objective]:
            q = results[objective]["plateau"]
            if q["step"] is None:
                lines.append(f"| {table_label(objective)} | n/a | n/a | n/a | no probe |")
                continue
            lines.append(f"| {table_label(objective)} | {q['step']} | {100 * q['best']:.1f} | {100 * q['final']:.1f} | "
                         f"{'yes' if q['reached'] else 'no: train longer'} |")
    lines += ["", (f"Plateau step: the first probe from which forward infilling recall stays within "
                   f"{100 * PLATEAU_TOLERANCE:.0f} points of its best; 'plateaued' when that leaves at least the "
                   "last quarter of pre-training flat.")]
    lines += ["", "## How the answers went (held-out items)", "",
              "| model | query | correct | other direction's answer | empty | other |", "|---|---|---:|---:|---:|---:|"]
    for objective in results:
        for name, c in results[objective].get("answers", {}).items():
            kind, direction = name.rsplit("_", 1)
            query = f"{kind.replace('_', ' ')} {fwd if direction == 'forward' else bwd}"
            lines.append(f"| {table_label(objective)} | {query} | {c['correct']} | {_count(c['other direction'])} | {c['empty']} | "
                         f"{c['other']} |")
    if data.missing:
        lines += ["", f"{data.missing} held-out items have all their pre-training text in the validation split."]
    return "\n".join(lines) + "\n"


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def curves(out: Path, objectives: tuple[str, ...] = OBJECTIVES) -> dict[str, dict[str, dict[int, float]]]:
    from lldiff.sweep.figures import read_scalars

    found = {}
    for stage in ("pretrain", "sft"):
        for objective in objectives:
            scalars = read_scalars(out / "tb" / f"{stage}-{objective}")
            found[f"{stage}-{objective}"] = {k.split("/", 1)[1]: v for k, v in scalars.items() if k.startswith("probe/")}
    return found


def draw(out: Path, series: dict[str, dict[str, dict[int, float]]], labels: tuple[str, str],
         objectives: tuple[str, ...] = OBJECTIVES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lldiff.sweep.objective_facts import objective_name, objective_styles

    styles = objective_styles(list(objectives))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage, kind, title in ((axes[0], "pretrain", "infill", "pre-training: infilling recall"),
                                   (axes[1], "sft", "instruction", "fine-tuning: held-out questions")):
        for objective in objectives:
            for direction, label, dash in zip(DIRECTIONS, labels, ("-", "--")):
                curve = series.get(f"{stage}-{objective}", {}).get(f"{kind}_{direction}")
                if curve:
                    steps = sorted(curve)
                    ax.plot(steps, [100 * curve[s] for s in steps], dash, marker="o", ms=3,
                            color=styles[objective].color, label=f"{objective_name(objective)} {label}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("exact match (%)")
    fig.tight_layout()
    paths = [out / "recall.png", out / "recall.svg"]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def log_tensorboard(out: Path, results: dict[str, Any], markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for objective, r in results.items():
        with SummaryWriter(str(out / "tb" / f"reversal-{objective}")) as writer:
            for kind in KINDS:
                for direction, value in r[kind].items():
                    writer.add_scalar(f"reversal/{kind}_{direction}_exact_match", value, 0)
            writer.add_text("reversal/table", markdown, 0)


def prepare(task: str, preset: Preset, out: Path, text: str | None = None) -> TaskData:
    """The task's data files under ``OUT/data`` (ValueError on data the preset cannot use)."""
    return PREPARE[task](preset, out / "data", text)


def run_study(task: str, preset: Preset, out: Path, text: str | None = None, log=print,
              data: TaskData | None = None, objectives: tuple[str, ...] = OBJECTIVES) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    data = data or prepare(task, preset, out, text)
    results: dict[str, Any] = {}
    for objective in objectives:
        registry.get(objective)  # a clear error for an unknown name, before any training
    for objective in objectives:
        start = time.perf_counter()
        pretrained = fit(pretrain_config(preset, out, objective, data, gpu), out / "configs" / f"pretrain-{objective}.yaml")
        tuned = fit(sft_config(preset, out, objective, data, gpu), out / "configs" / f"sft-{objective}.yaml")
        r: dict[str, Any] = {kind: {} for kind in KINDS}
        answers: dict[str, Any] = {}
        for direction in DIRECTIONS:
            r["instruction"][direction], answers[f"instruction_{direction}"] = evaluate(
                tuned, read_items(data.files[f"eval-{direction}"]), preset)
        for direction in infill_directions(objective):
            # the knowledge itself, after pre-training and again after fine-tuning (forgetting shows here)
            for kind, ckpt in (("infill", pretrained), ("infill_after_sft", tuned)):
                r[kind][direction], answers[f"{kind}_{direction}"] = evaluate(
                    ckpt, read_items(data.files[f"probe-{direction}"]), preset)
        r["answers"] = {name: wrong_answers(examples) for name, examples in answers.items()}
        results[objective] = r
        write_text(out / f"answers-{objective}.json", json.dumps(answers, indent=1, ensure_ascii=False))
        log(f"{registry.get(objective).label}: " + "; ".join(
            f"{kind.replace('_', ' ')} " + " / ".join(f"{d} {100 * v:.1f}%" for d, v in r[kind].items())
            for kind in KINDS) + f" ({time.perf_counter() - start:.0f} s)")
    series = curves(out, tuple(objectives))
    for objective in results:
        results[objective]["plateau"] = plateau(series[f"pretrain-{objective}"].get("infill_forward", {}),
                                                preset.pretrain_steps)
    markdown = table(task, results, preset, data)
    write_text(out / "reversal.md", markdown)
    write_text(out / "results.json", json.dumps({"task": task, "preset": asdict(preset), "text": text,
                                                 "results": results, "curves": series}, indent=1))
    draw(out, series, data.direction_labels, tuple(objectives))
    log_tensorboard(out, results, markdown)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="facts", choices=sorted(PRESETS))
    parser.add_argument("--preset", default="cpu", help="cpu | smoke | gpu (per task)")
    parser.add_argument("--out", required=True, help="study directory (re-run to resume)")
    parser.add_argument("--text", help="lines task: a line-structured text file (default: the offline corpus)")
    parser.add_argument("--size", help="override the preset's model size")
    parser.add_argument("--pretrain-steps", type=int, help="override the preset's pre-training steps")
    parser.add_argument("--sft-steps", type=int, help="override the preset's fine-tuning steps")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help=f"comma-separated objectives (default {','.join(OBJECTIVES)}; allowed: {registry.allowed()})")
    args = parser.parse_args(argv)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    for objective in objectives:
        try:
            registry.get(objective)
        except ValueError as error:
            parser.error(f"--objectives: {error}")
    if not objectives or len(set(objectives)) != len(objectives):
        parser.error(f"--objectives must name distinct objectives, got {args.objectives!r}")
    presets = PRESETS[args.task]
    if args.preset not in presets:
        parser.error(f"--preset {args.preset!r} does not exist for --task {args.task}; allowed: {', '.join(presets)}")
    if args.text is not None and args.task != "lines":
        parser.error(f"--text applies to --task lines only, not --task {args.task}")
    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text {args.text!r} does not exist")
    overrides = {"size": args.size, "pretrain_steps": args.pretrain_steps, "sft_steps": args.sft_steps}
    preset = replace(presets[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    for name in ("pretrain_steps", "sft_steps"):
        if getattr(preset, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(preset, name)}")
    try:  # every check on the size and the data before any training
        ModelConfig.from_name(preset.size)
        data = prepare(args.task, preset, Path(args.out), args.text)
    except ValueError as error:
        parser.error(str(error))
    run_study(args.task, preset, Path(args.out), args.text, data=data, objectives=objectives)
    print((Path(args.out) / "reversal.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
