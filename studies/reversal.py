"""The reversal curse, MDM vs AR (LLaDA Table 3, SPEC §8), at a scale of your choosing.

    python studies/reversal.py --preset cpu --out runs/reversal                    # offline corpus (code lines)
    python studies/reversal.py --preset cpu --out runs/reversal-verse --text ../shared/data/tinyshakespeare.txt

1. **Data** (``lldiff.data.line_tasks``): distinct lines of the text, cut into blocks; the
   pre-training corpus is the lines in forward order (overlapping windows).
2. **Pre-train** an MDM and an AR model of the same size on that corpus, same batches and
   steps (so the same tokens and compute): the knowledge is only ever seen forwards.
3. **Fine-tune** both on "next line after: X" and "line before: X" instructions drawn from
   one half of the blocks (``lldiff.finetune``, same data and chat template).
4. **Evaluate** exact match on the other half's lines, which were pre-trained on but never
   fine-tuned on: forward queries (next line) and reversal queries (previous line).

Writes ``OUT/reversal.md`` (the table, in the shape of LLaDA's Table 3, with the paper's
rows for reference), ``OUT/results.json`` and TensorBoard scalars/text under ``OUT/tb``.
Every stage is an ordinary ``lldiff fit`` whose config is saved in ``OUT/configs``;
re-running the command resumes an interrupted stage and skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from lldiff.atomic import write_text
from lldiff.checkpoint import load_model
from lldiff.completion import DecodeOptions, complete
from lldiff.data.chat import ChatTemplate, Message
from lldiff.data.line_tasks import (
    corpus_text,
    distinct_lines,
    line_tasks,
    write_line_tasks,
)
from lldiff.data.sft import read_jsonl

MODULES = {
    "pretrain": {"mdm": "lldiff.modules.MaskedDiffusionLM", "ar": "lldiff.modules.AutoregressiveLM"},
    "sft": {"mdm": "lldiff.finetune.MaskedDiffusionSFT", "ar": "lldiff.finetune.AutoregressiveSFT"},
}
# the queried line ends the prompt, right before the answer, as it stood before its
# neighbour in pre-training ("X\nY"): the instruction says which neighbour is wanted
STUDY_TEMPLATE = ChatTemplate(system="{content}\n", user="{content}\n", assistant="{content}\n")
PAPER_ROWS = [("GPT-4o (paper)", 82.7, 34.3), ("Qwen2.5-7B Instruct (paper)", 75.9, 38.0),
              ("LLaDA-8B Instruct (paper)", 48.8, 42.4)]


@dataclass(frozen=True)
class Preset:
    lines: int
    size: str
    vocab_size: int
    pretrain_steps: int
    sft_steps: int
    seq_len: int = 64
    batch_size: int = 32
    sft_batch_size: int = 32
    lr: float = 2e-3
    sft_lr: float = 1e-3
    block: int = 8
    window: int = 4
    copies: int = 8  # shuffled passes over the windows: each line at many row offsets
    max_chars: int = 40
    answer_tokens: int = 24
    mdm_block_length: int = 8  # semi-autoregressive blocks (LLaDA's instruct setting): EOS padding cannot win early
    val_every: int = 250


PRESETS = {
    # ~10 min on 2 CPU cores: tiny models pre-train on 128 lines, then learn the two instructions
    "cpu": Preset(lines=128, size="tiny-1M", vocab_size=512, pretrain_steps=1500, sft_steps=300, sft_lr=5e-4),
    # seconds: plumbing only (tests)
    "smoke": Preset(lines=48, size="tiny-0.016M", vocab_size=300, pretrain_steps=12, sft_steps=6, batch_size=8, copies=2,
                    sft_batch_size=8, answer_tokens=8, mdm_block_length=8, val_every=6),
    # a GPU node: a real model on a few thousand lines (bf16)
    "gpu": Preset(lines=4096, size="smdm-34M", vocab_size=4096, pretrain_steps=20000, sft_steps=2000,
                  batch_size=128, sft_batch_size=64, lr=1e-3, sft_lr=2e-4, val_every=1000),
}


def trainer_config(out: Path, name: str, steps: int, val_every: int, gpu: bool) -> dict[str, Any]:
    return {
        "accelerator": "auto", "devices": 1, "precision": "bf16-mixed" if gpu else "32-true",
        "max_steps": steps, "val_check_interval": min(val_every, steps), "check_val_every_n_epoch": None,
        "log_every_n_steps": max(1, min(10, steps // 4)), "gradient_clip_val": 1.0, "enable_progress_bar": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(out / "tb"), "name": name, "version": "", "default_hp_metric": False}},
    }


def pretrain_config(p: Preset, out: Path, objective: str, corpus: Path, gpu: bool) -> dict[str, Any]:
    model = {"size": p.size, "lr": p.lr, "warmup_steps": max(1, p.pretrain_steps // 20), "weight_decay": 0.0,
             "random_length_prob": 0.0}
    if objective == "mdm":
        model["val_mc_samples"] = 4
    return {
        "seed_everything": 1234,
        "model": {"class_path": MODULES["pretrain"][objective], "init_args": model},
        "data": {"class_path": "lldiff.data.PretrainDataModule", "init_args": {
            "source": "files", "paths": [str(corpus)], "txt_unit": "paragraph", "vocab_size": p.vocab_size,
            "seq_len": p.seq_len, "batch_size": p.batch_size, "val_fraction": 0.05, "val_max_rows": 64,
            "cache_dir": str(out / "cache"), "seed": 1234}},
        "trainer": trainer_config(out, f"pretrain-{objective}", p.pretrain_steps, p.val_every, gpu),
    }


def sft_config(p: Preset, out: Path, objective: str, data: dict[str, Path], gpu: bool) -> dict[str, Any]:
    run = out / "tb" / f"pretrain-{objective}"
    return {
        "seed_everything": 1234,
        "model": {"class_path": MODULES["sft"][objective], "init_args": {
            "init_from": str(run / "checkpoints" / "last.ckpt"), "lr": p.sft_lr,
            "warmup_steps": max(1, p.sft_steps // 20), "weight_decay": 0.0}},
        "data": {"class_path": "lldiff.data.SFTDataModule", "init_args": {
            "train_files": [str(data["train"])], "tokenizer_path": str(run), "val_fraction": 0.1,
            "template": STUDY_TEMPLATE.to_dict(),
            "max_length": p.seq_len, "batch_size": p.sft_batch_size, "seed": 1234}},
        "trainer": trainer_config(out, f"sft-{objective}", p.sft_steps, p.val_every, gpu),
    }


def fit(config: dict[str, Any], path: Path) -> Path:
    """Run (or resume, or skip if finished) one ``lldiff fit``; returns its last checkpoint."""
    from lldiff.cli import lightning_cli

    write_text(path, yaml.safe_dump(config, sort_keys=False))
    logger = config["trainer"]["logger"]["init_args"]
    last = Path(logger["save_dir"]) / logger["name"] / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*there is no last checkpoint available.*")
        lightning_cli(["fit", "--config", str(path), "--ckpt_path", "last"])
    return last


def exact_match(ckpt: Path, queries: list[dict[str, str]], p: Preset, template: ChatTemplate) -> tuple[float, list]:
    """Fraction of queries whose greedy answer equals the expected line exactly."""
    loaded = load_model(ckpt)
    tok = loaded.tokenizer
    prompts = [[tok.eos_id, *tok.encode(template.render_prompt([Message("user", q["prompt"])]))] for q in queries]
    options = DecodeOptions(length=p.answer_tokens, block_length=p.mdm_block_length)
    answers: list[str] = []
    for start in range(0, len(prompts), 64):
        out = complete(loaded.model, prompts[start:start + 64], options, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       generator=torch.Generator().manual_seed(0))
        answers += [tok.decode(a).strip() for a in out.answers]
    hits = [a == q["response"].strip() for a, q in zip(answers, queries)]
    examples = [{"prompt": q["prompt"], "expected": q["response"], "answer": a} for q, a in zip(queries, answers)]
    return sum(hits) / max(1, len(hits)), examples


def table(results: dict[str, dict[str, float]], p: Preset, source: str) -> str:
    lines = ["# Reversal: forward vs reversed line recall (LLaDA Table 3 shape)", "",
             (f"Corpus: {source}, {p.lines} distinct lines; both models {p.size}, {p.pretrain_steps} pre-training "
             f"steps of {p.batch_size}x{p.seq_len} tokens (same data, same compute), then {p.sft_steps} SFT steps "
             "on next/previous-line instructions for half of the blocks. Exact match (%) on held-out lines."), "",
             "| model | forward | reversal |", "|---|---:|---:|"]
    for objective, label in (("ar", "AR"), ("mdm", "MDM (LLaDA objective)")):
        if objective in results:
            r = results[objective]
            lines.append(f"| {label}, {p.size} (this run) | {100 * r['forward']:.1f} | {100 * r['reversal']:.1f} |")
    lines += [f"| {name} | {fwd} | {rev} |" for name, fwd, rev in PAPER_ROWS]
    lines += ["", ("Paper rows: poem completion at scale (LLaDA, Nie et al. 2025, Table 3), for the shape of the "
              "result only; the numbers are not comparable with this run's.")]
    return "\n".join(lines) + "\n"


def log_tensorboard(out: Path, results: dict[str, dict[str, float]], markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for objective, r in results.items():
        with SummaryWriter(str(out / "tb" / f"reversal-{objective}")) as writer:
            writer.add_scalar("reversal/forward_exact_match", r["forward"], 0)
            writer.add_scalar("reversal/reversal_exact_match", r["reversal"], 0)
            writer.add_text("reversal/table", markdown, 0)


def run_study(preset: Preset, out: Path, text: str | None, log=print) -> dict[str, dict[str, float]]:
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    lines = distinct_lines(corpus_text(text, 4_000_000), max_chars=preset.max_chars)[: preset.lines]
    if len(lines) < preset.lines:
        raise ValueError(f"the text has only {len(lines)} distinct lines of 8..{preset.max_chars} characters; "
                         f"the preset needs {preset.lines}")
    data = write_line_tasks(line_tasks(lines, block=preset.block), out / "data", window=preset.window,
                            copies=preset.copies)
    template = STUDY_TEMPLATE
    results: dict[str, dict[str, float]] = {}
    for objective in ("ar", "mdm"):
        start = time.perf_counter()
        fit(pretrain_config(preset, out, objective, data["pretrain"], gpu), out / "configs" / f"pretrain-{objective}.yaml")
        ckpt = fit(sft_config(preset, out, objective, data, gpu), out / "configs" / f"sft-{objective}.yaml")
        forward, fwd_examples = exact_match(ckpt, [r for _, r in read_jsonl(data["eval-forward"])], preset, template)
        reversal, rev_examples = exact_match(ckpt, [r for _, r in read_jsonl(data["eval-reversal"])], preset, template)
        results[objective] = {"forward": forward, "reversal": reversal}
        write_text(out / f"answers-{objective}.json",
                   json.dumps({"forward": fwd_examples, "reversal": rev_examples}, indent=1, ensure_ascii=False))
        log(f"{objective.upper()}: forward {100 * forward:.1f}%, reversal {100 * reversal:.1f}% "
            f"({time.perf_counter() - start:.0f} s)")
    markdown = table(results, preset, text or "offline corpus (Python standard library lines)")
    write_text(out / "reversal.md", markdown)
    write_text(out / "results.json", json.dumps({"preset": asdict(preset), "text": text, "results": results}, indent=1))
    log_tensorboard(out, results, markdown)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="study directory (re-run to resume)")
    parser.add_argument("--text", help="a line-structured text file (default: the offline corpus)")
    parser.add_argument("--size", help="override the preset's model size")
    parser.add_argument("--pretrain-steps", type=int, help="override the preset's pre-training steps")
    parser.add_argument("--sft-steps", type=int, help="override the preset's fine-tuning steps")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {"size": args.size, "pretrain_steps": args.pretrain_steps, "sft_steps": args.sft_steps}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text {args.text!r} does not exist")
    run_study(preset, Path(args.out), args.text)
    print((Path(args.out) / "reversal.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
