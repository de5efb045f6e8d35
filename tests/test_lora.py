"""LoRA fine-tuning (lldiff.lora) against the math: an injected model starts as the base model
(B = 0); the merged plain weights W + (alpha/r) B A give the adapted model's logits (the fused
qkv and gate_up included); only the adapters train and reach the optimizer; a LoRA SFT run
through the CLI resumes and loads everywhere (merged, without peft); bad options are refused
before any work."""

import io
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lldiff import lora
from lldiff.chat import main as chat_main
from lldiff.checkpoint import load_model
from lldiff.config import ModelConfig
from lldiff.objectives.ar.modules import AutoregressiveSFT
from lldiff.objectives.bd3.modules import BlockDiffusionSFT
from lldiff.objectives.mdm.modules import MaskedDiffusionSFT
from lldiff.launch import lightning_cli
from lldiff.lora import (
    BLOCK_LINEARS,
    LINEAR_NAMES,
    LoraOptions,
    apply_lora,
    merge_lora_state_dict,
)
from lldiff.model import Transformer
from lldiff.sweep.figures import read_scalars
from test_sft_training import _sft_file  # the SFT tests' word-pair data

REPO = Path(__file__).resolve().parents[1]
TOY_TEMPLATE = {"system": "{content}", "user": "{content}=", "assistant": "{content}"}
ALL = list(BLOCK_LINEARS)  # every Linear layer of a block


def config(attention="bidirectional", n_kv_heads=None):
    """Two blocks, GQA when ``n_kv_heads`` < 4 heads (the fused qkv splits unevenly then)."""
    block = 4 if attention == "block" else None
    return ModelConfig(n_layer=2, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, d_ff=48, vocab_size=50,
                       max_seq_len=32, attention=attention, block_size=block,
                       mask_id=None if attention == "causal" else 50)


def adapted_copy(model, options):
    twin = Transformer(model.cfg)
    twin.load_state_dict(model.state_dict())
    return apply_lora(twin, options).eval()


def perturb(model, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_target_names_are_the_backbones_linear_layers():
    assert lora.backbone_linear_names(Transformer(config())) == list(LINEAR_NAMES) == [*ALL, "head"]
    assert LoraOptions().target_modules == ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.proj")
    assert (LoraOptions().r, LoraOptions().alpha, LoraOptions().dropout, LoraOptions().scaling) == (16, 32.0, 0.05, 2.0)


@pytest.mark.parametrize("attention", ["bidirectional", "causal", "block"])
def test_injected_model_computes_the_base_model_exactly(attention):
    torch.manual_seed(0)
    base = Transformer(config(attention, n_kv_heads=2)).eval()
    adapted = adapted_copy(base, LoraOptions(r=4, target_modules=ALL))
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        assert torch.equal(adapted(ids), base(ids))  # B = 0: not one bit differs
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.lora_parameters(adapted) if "lora_B" in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in lora.lora_parameters(adapted) if "lora_A" in n)


@pytest.mark.parametrize("targets", [ALL, ["attn.qkv"], ["mlp.gate_up", "attn.proj"]], ids=["all", "qkv", "gate_up-proj"])
@pytest.mark.parametrize("attention,n_kv_heads", [("bidirectional", None), ("causal", 2), ("block", 1)])
def test_merged_weights_give_the_adapted_models_logits(targets, attention, n_kv_heads):
    """W + (alpha/r) B @ A loaded into a fresh plain Transformer = the adapted model, fp32."""
    torch.manual_seed(0)
    base = Transformer(config(attention, n_kv_heads)).eval()
    options = LoraOptions(r=3, alpha=7.0, target_modules=targets)
    adapted = adapted_copy(base, options)
    perturb(adapted)
    plain = Transformer(base.cfg).eval()
    plain.load_state_dict(merge_lora_state_dict(adapted.state_dict(), r=3, alpha=7.0))  # strict: plain keys only
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        want, got, before = adapted(ids), plain(ids), base(ids)
    assert (want - before).abs().max() > 1e-2  # the adapters do change the function
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # the fused qkv by hand: one rank-3 update of the concatenated q, k and v rows
    if "attn.qkv" in targets:
        state = adapted.state_dict()
        a, b = state["blocks.1.attn.qkv.lora_A.default.weight"], state["blocks.1.attn.qkv.lora_B.default.weight"]
        rows = base.blocks[1].attn.qkv.weight.shape[0]
        assert rows == (4 + 2 * (n_kv_heads or 4)) * 8 and b.shape == (rows, 3)
        expected = base.blocks[1].attn.qkv.weight + 7.0 / 3 * b @ a
        assert torch.allclose(plain.blocks[1].attn.qkv.weight, expected, atol=1e-6)


def test_merge_is_pure_and_leaves_a_plain_state_dict_alone():
    state = Transformer(config()).state_dict()
    assert merge_lora_state_dict(state, r=4, alpha=8) == state
    adapted = apply_lora(Transformer(config()), LoraOptions(r=4))
    with pytest.raises(ValueError, match="do not fit r=8"):
        merge_lora_state_dict(adapted.state_dict(), r=8, alpha=8)


# -- training --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """Reverse a 4-letter string over 6 letters (one byte token per letter)."""
    from lldiff.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lora-reverse")
    strings = ["".join(p) for p in itertools.product("abcdef", repeat=4)]
    random.Random(0).shuffle(strings)
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": s, "response": s[::-1]}) + "\n" for s in strings))
    train_tokenizer(["abcdef="], 259).save(root / "tokenizer.json")
    return root


def reversal_data(root, batch_size=32):
    from lldiff.data import SFTDataModule

    return SFTDataModule([str(root / "train.jsonl")], str(root / "tokenizer.json"), val_fraction=0.0,
                         template=TOY_TEMPLATE, max_length=16, batch_size=batch_size, seed=0)


def trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0, **kwargs)


@pytest.mark.parametrize("module,extra", [(MaskedDiffusionSFT, {}), (AutoregressiveSFT, {}),
                                          (BlockDiffusionSFT, {"block_size": 4})], ids=["mdm", "ar", "bd3"])
def test_only_the_adapters_train(module, extra, reversal):
    L.seed_everything(0, verbose=False)
    model = module(size="tiny-0.03M", vocab_size=259, lr=1e-2, warmup_steps=1, lora={"r": 4}, **extra)
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    adapters = dict(lora.lora_parameters(model.model))
    assert {n for n, p in model.model.named_parameters() if p.requires_grad} == set(adapters)
    assert len(adapters) == 2 * 4 * 2  # A and B on 4 layers of 2 blocks
    fit = trainer(5)
    fit.fit(model, reversal_data(reversal))
    held = [p for group in fit.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in adapters.values()} and len(held) == len(adapters)
    after = model.model.state_dict()
    for key, value in initial.items():
        if lora.is_lora_key(key):
            assert "lora_A" in key or not torch.equal(after[key], value), key  # every B has left zero
        else:
            assert torch.equal(after[key], value), key  # frozen: bit-identical


def test_adapters_stay_float32_under_bf16_true_and_resume_exactly(reversal, tmp_path):
    """bf16-true makes the frozen weights bf16, the adapters and AdamW states stay fp32; a
    run resumed from a mid-run checkpoint ends bit-identical to an uninterrupted one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(dirpath, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        model = MaskedDiffusionSFT(size="tiny-0.016M", vocab_size=259, lr=1e-2, warmup_steps=1, lora={"r": 4})
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=3, save_last=True, save_top_k=0)
        fit = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, precision="bf16-true", callbacks=[ckpt, *callbacks])
        fit.fit(model, reversal_data(reversal, batch_size=16), ckpt_path=ckpt_path)
        return model, fit

    reference, fit = run(tmp_path / "a")
    dtypes = {("lora" if lora.is_lora_key(n) else "base", p.dtype) for n, p in reference.model.named_parameters()}
    assert dtypes == {("base", torch.bfloat16), ("lora", torch.float32)}
    assert {s["exp_avg"].dtype for s in fit.optimizers[0].state.values()} == {torch.float32}
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", callbacks=[Crash(4)])
    resumed, _ = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))  # from step 3
    for (key, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    saved = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert saved["lldiff"]["lora"] == {"r": 4, "alpha": 32.0, "dropout": 0.05,
                                       "target_modules": ["attn.qkv", "attn.proj", "mlp.gate_up", "mlp.proj"]}
    with pytest.raises(ValueError, match="trained with lora=.*this module has lora=None"):
        L.Trainer(max_steps=7, logger=False, enable_progress_bar=False, limit_val_batches=0,
                  enable_checkpointing=False, default_root_dir=tmp_path / "c").fit(
            MaskedDiffusionSFT(size="tiny-0.016M", vocab_size=259), reversal_data(reversal),
            ckpt_path=str(tmp_path / "a" / "last.ckpt"))


class Crash(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_lora_sft_through_the_cli_resumes_and_loads_everywhere(tiny_runs, tmp_path, monkeypatch):
    """configs/sft-mdm-tiny-lora.yaml on the tiny pre-trained MDM: the train loss falls, the
    base weights stay the pre-trained ones, ``--ckpt_path last`` resumes, and load_model (hence
    generate / chat / eval / export) reads the merged model, without peft."""
    pretrained = tiny_runs["mdm"]
    args = [
        "fit", "--config", str(REPO / "configs" / "sft-mdm-tiny-lora.yaml"),
        "--model.init_args.init_from", str(pretrained),
        "--data.init_args.tokenizer_path", str(pretrained.parent.parent),
        "--data.init_args.train_files", f"[{_sft_file(tmp_path / 'sft.jsonl')}]",
        "--data.init_args.max_length", "32", "--data.init_args.batch_size", "16", "--model.init_args.warmup_steps", "2",
        "--model.init_args.lora.r", "8", "--trainer.val_check_interval", "60", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]
    cli = lightning_cli([*args, "--trainer.max_steps", "60"])
    assert cli.model.hparams.lora["r"] == 8 and cli.model.hparams.lora["alpha"] == 32
    ckpt = tmp_path / "sft-mdm-tiny-lora" / "checkpoints" / "last.ckpt"
    losses = list(read_scalars(ckpt.parent.parent)["train/loss"].values())
    assert len(losses) == 60 and sum(losses[-15:]) / 15 < sum(losses[:15]) / 15  # measured 3.78 vs 4.82
    state = torch.load(ckpt, weights_only=True)
    base = torch.load(pretrained, weights_only=True)["state_dict"]
    assert state["state_dict"]["model.blocks.0.attn.qkv.lora_A.default.weight"].shape[0] == 8
    assert torch.equal(state["state_dict"]["model.blocks.1.mlp.gate_up.base_layer.weight"],
                       base["model.blocks.1.mlp.gate_up.weight"])  # frozen: the pre-trained weights

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails: downstream needs no peft
    loaded = load_model(ckpt, expect="mdm")
    assert type(loaded.model) is Transformer and not lora.has_lora_keys(loaded.model.state_dict())
    probe = torch.arange(24).remainder(300).view(2, 12)
    live = cli.model.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(probe), live(probe), atol=1e-5, rtol=0)
        assert not torch.allclose(loaded.model(probe), load_model(pretrained).model(probe), atol=1e-3)
    out = io.StringIO()
    chat_main(["--ckpt", str(ckpt), "--message", "the quick fox", "--length", "8"], stdin=io.StringIO(""), stdout=out)
    assert len(out.getvalue().splitlines()) == 1
    monkeypatch.undo()

    # a fine-tuning run started from the LoRA checkpoint begins at the merged weights
    again = MaskedDiffusionSFT(init_from=str(ckpt), vocab_size=loaded.config.vocab_size)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in loaded.model.state_dict().items())

    # the adapted structure resumes (a finished run: restored at step 60, nothing left to train; a longer
    # max_steps would be refused: the schedule ends at the run's own)
    cli = lightning_cli([*args, "--trainer.max_steps", "60", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 60 and load_model(ckpt).config.vocab_size == loaded.config.vocab_size


@pytest.mark.parametrize("value,error", [
    ({"r": 0}, r"lora.r=0: the rank must be a positive integer"),
    ({"r": 2.5}, r"lora.r=2.5"),
    ({"alpha": -1}, r"lora.alpha=-1: must be a positive number"),
    ({"dropout": 1.0}, r"lora.dropout=1.0: must be a probability in \[0, 1\)"),
    ({"target_modules": ["attn.q", "mlp.down"]}, (r"'attn.q', 'mlp.down' are not Linear layers of the blocks; their "
                                                   r"Linear layers are attn.qkv, attn.proj, mlp.gate_up, mlp.proj")),
    ({"target_modules": ["attn.qkv", "head"]}, (r"'head' \(the LM head\) cannot take an adapter: the training losses "
                                                r"read its weight directly")),
    ({"target_modules": "attn.qkv"}, r"give a non-empty list"),
    ({"target_modules": []}, r"give a non-empty list"),
    ({"rank": 8}, r"lora option 'rank' unknown; allowed: r, alpha, dropout, target_modules"),
])
def test_bad_options_are_refused_before_any_work(value, error):
    for module in (MaskedDiffusionSFT, AutoregressiveSFT, BlockDiffusionSFT):
        with pytest.raises(ValueError, match=error):  # before the (missing) checkpoint is even looked at
            module(init_from="missing.ckpt", vocab_size=259, lora=value)


def test_bad_options_on_the_command_line_stop_before_any_run_directory(reversal, tmp_path):
    with pytest.raises(ValueError, match="lora.target_modules: 'embed' is not a Linear layer"):
        lightning_cli(["fit", "--config", str(REPO / "configs" / "sft-mdm-tiny-lora.yaml"),
                       "--data.init_args.train_files", f"[{reversal / 'train.jsonl'}]",
                       "--data.init_args.tokenizer_path", str(reversal / "tokenizer.json"),
                       "--model.init_args.lora.target_modules", "[attn.qkv, embed]",
                       "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'lldiff\[lora\]'"):
        MaskedDiffusionSFT(init_from="missing.ckpt", vocab_size=259, lora={})
    MaskedDiffusionSFT(size="tiny-0.016M", vocab_size=259)  # full fine-tuning needs no peft


FSDP2_SCRIPT = """
import json, sys, warnings
import lightning as L, torch
from lldiff.callbacks import RunCheckpoint
from lldiff.finetune import MaskedDiffusionSFT
sys.path.insert(0, sys.argv[2])
from test_lora import reversal_data
warnings.filterwarnings("ignore")
out, root = sys.argv[1], __import__("pathlib").Path(sys.argv[3])
L.seed_everything(0, verbose=False)
model = MaskedDiffusionSFT(size="tiny-0.03M", vocab_size=259, lr=1e-2, warmup_steps=1, lora={"r": 4})
initial = {k: v.to(torch.bfloat16) for k, v in model.model.state_dict().items()}
fit = L.Trainer(accelerator="cpu", devices=2, strategy="fsdp2", precision="bf16-true", max_steps=4, logger=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                callbacks=[RunCheckpoint(dirpath=out, save_last=True, save_top_k=0)])
fit.fit(model, reversal_data(root, batch_size=8))
state = {k: v.full_tensor() for k, v in model.model.state_dict().items()}
probe = torch.arange(24).remainder(250).view(2, 12)
with torch.no_grad():
    logits = model.model.eval()(probe).float().tolist()
if fit.global_rank == 0:
    json.dump({"frozen_kept": all(torch.equal(state[k], v) for k, v in initial.items() if not "lora_" in k),
               "dtypes": sorted({str(v.dtype) + ("-lora" if "lora_" in k else "") for k, v in state.items()}),
               "logits": logits}, open(out + "/result.json", "w"))
"""


@pytest.mark.slow
def test_lora_under_fsdp2_bf16_true_two_processes(reversal, tmp_path):
    """FSDP2 (2 CPU processes, sharded checkpoint) with bf16-true: frozen bf16 shards and fp32
    adapters in one all-gather unit train, and load_model merges the sharded checkpoint."""
    script = tmp_path / "fsdp2_lora.py"
    script.write_text(FSDP2_SCRIPT)
    out = tmp_path / "ckpt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(out), str(REPO / "tests"), str(reversal)],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads((out / "result.json").read_text())
    assert found["frozen_kept"] and found["dtypes"] == ["torch.bfloat16", "torch.float32-lora"]
    loaded = load_model(out / "last.ckpt")
    with torch.no_grad():
        logits = loaded.model(torch.arange(24).remainder(250).view(2, 12)).float()
    assert torch.allclose(logits, torch.tensor(found["logits"]), atol=0.05)  # bf16 weights, merged in fp32
