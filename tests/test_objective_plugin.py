"""Proof of the seam (issue 22): a new objective defined entirely in this file, registered, and run
through `lldiff fit`, `lldiff sweep run` (next to ar and mdm), `lldiff generate`, `lldiff eval` and a
checkpoint round trip, with no edit anywhere else.

The objective, ``mdm-linear``: the MDM's backbone and forward process, but its loss weights the
masked cross-entropy by 1 (not LLaDA's 1/t: a "linear" weighting, a biased but lower-variance
surrogate), its validation bound stays the MDM's ELBO, and its decoder reveals strictly left to
right (one token per call: the most "AR-like" reverse process), with a multiple-choice scorer and
is_greedy borrowed from the MDM.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lldiff import objectives
from lldiff.checkpoint import load_model
from lldiff.cli import main
from lldiff.launch import lightning_cli
from lldiff.objectives import Code, Family, Style
from lldiff.objectives.common.decoding import Completion, DecodeOptions, strip_after_eos
from lldiff.objectives.common.masking import forward_mask, sample_mask_ratio
from lldiff.objectives.mdm.likelihood import mdm_is_greedy, mdm_scorer
from lldiff.objectives.mdm.loss import mdm_elbo_nats
from lldiff.objectives.mdm.modules import MaskedDiffusionLM, MaskedDiffusionSFT
from lldiff.evaluation.tasks import Example, save_jsonl_task
from lldiff.sweep.runner import run_sweep
from lldiff.sweep.spec import spec_from_dict


# -- the objective: what only it knows ----------------------------------------------------------------
def linear_loss(model, x0: Tensor, mask_id: int, eps: float = 1e-3) -> Tensor:
    """Masked cross-entropy weighted 1 (not 1/t), per token of the batch."""
    t = sample_mask_ratio(x0.shape[0], eps=eps, device=x0.device)
    xt, masked = forward_mask(x0, t, mask_id)
    logits = model(xt).float()
    ce = torch.nn.functional.cross_entropy(logits[masked], x0[masked], reduction="sum")
    return ce / x0.numel()


@torch.no_grad()
def left_to_right_complete(model, ids: Tensor, mask: Tensor, options: DecodeOptions, *, eos_id: int,
                           generator: torch.Generator | None = None) -> Completion:
    """Reveal the canvas one position per call, left to right, greedily."""
    mask_id = model.cfg.mask_id
    canvas = torch.cat([ids, torch.full((ids.shape[0], options.length), mask_id, dtype=ids.dtype)], dim=1)
    attention = torch.cat([mask, torch.ones(ids.shape[0], options.length, dtype=torch.bool)], dim=1)
    for i in range(ids.shape[1], canvas.shape[1]):
        logits = model(canvas, attention)[:, i].float()
        logits[:, mask_id:] = -float("inf")
        canvas[:, i] = logits.argmax(-1)
    return Completion(strip_after_eos(canvas[:, ids.shape[1]:], eos_id), options.length)


class LinearMDM(MaskedDiffusionLM):
    """The MDM with weight-1 masked cross-entropy."""

    def loss(self, rows: Tensor) -> Tensor:
        return linear_loss(self, rows[:, 1:], self.mask_id, eps=self.hparams.mask_eps)


class LinearMDMSFT(MaskedDiffusionSFT):
    pass


def load() -> Code:  # the family's code (a plug-in in another package would import it lazily here)
    return Code(module=LinearMDM, sft_module=LinearMDMSFT, decoder=left_to_right_complete, scorer=mdm_scorer,
                greedy=mdm_is_greedy, elbo=mdm_elbo_nats)


FAMILY = Family(
    name="mdm-linear", attention="bidirectional", mask_token=True, exact_likelihood=False, load=load,
    label="MDM-lin", style=Style("tab:orange", "v", "-", "MDM-lin"),
    description="masked diffusion, weight-1 loss, left-to-right decoding (a test plug-in)",
    decode_options=(), length_is_budget=False, score_options=("n_mc", "batch_size", "seed"),
)
LinearMDM.family = FAMILY
LinearMDMSFT.family = FAMILY


@pytest.fixture(autouse=True)
def registered():
    objectives.register(FAMILY)  # the one registry line
    yield
    objectives.FAMILIES.pop(FAMILY.name)


# -- the commands ---------------------------------------------------------------------------------------
DATA_ARGS = ["--data.init_args.source", "files", "--data.init_args.vocab_size", "300", "--data.init_args.seq_len", "32",
             "--data.init_args.batch_size", "4", "--data.init_args.max_bytes", "null",
             "--data.init_args.val_max_rows", "8"]


def fit(tmp_path: Path, toy_corpus: Path, cache_dir: Path, steps: int, *extra: str) -> Path:
    lightning_cli([
        "fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "mdm-tiny.yaml"),
        "--model.class_path", f"{__name__}.LinearMDM", "--model.init_args.size", "tiny-0.03M",
        "--model.init_args.warmup_steps", "2", "--model.init_args.val_mc_samples", "2", "--model.init_args.lr", "3e-3",
        "--data.init_args.paths", f"[{toy_corpus}]", "--data.init_args.cache_dir", str(cache_dir), *DATA_ARGS,
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.logger.init_args.name", "linear", *extra,
    ])
    return tmp_path / "linear" / "checkpoints" / "last.ckpt"


def test_fit_generate_eval_and_round_trip(tmp_path, toy_corpus, cache_dir, capsys):
    ckpt = fit(tmp_path, toy_corpus, cache_dir, 30)
    state = torch.load(ckpt, weights_only=True)
    assert state["lldiff"]["objective"] == {"name": "mdm-linear", "family": "mdm-linear", "params": {}}
    loaded = load_model(ckpt)
    assert loaded.objective.name == "mdm-linear" and loaded.objective.label == "MDM-lin"
    # the round trip: the loaded backbone is the trained one
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    assert list((tmp_path / "linear").rglob("events.out.tfevents*"))  # it logged like every objective

    main(["generate", "--ckpt", str(ckpt), "--prompt", "the quick", "--gen-length", "5"])
    out = capsys.readouterr()
    assert "MDM-lin tiny-0.03M: 1 prompt(s), 5 model calls" in out.out  # its own decoder: one call per position

    task = tmp_path / "task.jsonl"
    save_jsonl_task(task, [Example("the quick brown", [" fox", " dog"], 0), Example("hello", [" world", " there"], 0)])
    result = main(["eval", "--ckpt", str(ckpt), "--task", str(task), "--n-mc", "2"])
    assert result is None
    assert "accuracy" in capsys.readouterr().out

    # resume: the record says what the checkpoint is, and the class agrees (a finished run stays at its end)
    fit(tmp_path, toy_corpus, cache_dir, 30, "--ckpt_path", "last")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 30
    # a config naming the MDM's class on this checkpoint is refused, naming both objectives
    with pytest.raises(ValueError, match="objective 'mdm-linear'.*objective 'mdm'"):
        lightning_cli(["fit", "--config", str(tmp_path / "linear" / "config.yaml"), "--ckpt_path", "last",
                       "--model.class_path", "lldiff.objectives.mdm.modules.MaskedDiffusionLM"])


def test_sweep_runs_the_new_objective_next_to_ar_and_mdm(tmp_path, toy_corpus, cache_dir):
    spec = spec_from_dict(dict(
        name="plugin", objectives=["ar", "mdm", "mdm-linear"], sizes=["tiny-0.1M"], budgets=[1.0e10], seeds=[0],
        data=dict(source="files", paths=[str(toy_corpus)], vocab_size=320, seq_len=32, batch_size=8,
                  val_max_rows=16, cache_dir=str(cache_dir)),
        model=dict(lr=3e-3, random_length_prob=0.0),
        objective_args={"mdm": {"val_mc_samples": 2}, "mdm-linear": {"val_mc_samples": 2}},
        trainer=dict(accelerator="cpu", devices=1), warmup_fraction=0.1, evals_per_run=1, final_val_mc_samples=2,
    ))
    run_sweep(spec, tmp_path, log=lambda _: None)
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = {r["objective"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"ar", "mdm", "mdm-linear"}
    assert all(float(r["val_nll_per_token"]) > 0 for r in rows.values())
    config = (tmp_path / "tb" / "mdm-linear" / "tiny-0.1M").rglob("config.yaml")
    assert f"{__name__}.LinearMDM" in next(config).read_text()
