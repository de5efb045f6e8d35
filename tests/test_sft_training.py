"""SFT end to end: tiny fits that learn a mapping, fine-tuning from checkpoints, chat."""

import io
import itertools
import json
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from lldiff.chat import ChatSession
from lldiff.chat import main as chat_main
from lldiff.checkpoint import LoadedModel, load_model
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import complete
from lldiff.config import ModelConfig
from lldiff.data.chat import ChatTemplate
from lldiff.data.tokenizer import train_tokenizer
from lldiff.objectives.ar.modules import AutoregressiveSFT
from lldiff.objectives.mdm.modules import MaskedDiffusionSFT
from lldiff.model import Transformer
from lldiff.sweep.figures import read_scalars
from lldiff.objectives import get

REPO = Path(__file__).resolve().parents[1]
TOY_TEMPLATE = {"system": "{content}", "user": "{content}=", "assistant": "{content}"}


@pytest.fixture(scope="module")
def reversal_data(tmp_path_factory):
    """Reverse a 4-letter string over 6 letters: 1096 training strings, 200 held out."""
    root = tmp_path_factory.mktemp("reverse")
    strings = ["".join(p) for p in itertools.product("abcdef", repeat=4)]
    random.Random(0).shuffle(strings)
    held_out, train = strings[:200], strings[200:]
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": s, "response": s[::-1]}) + "\n" for s in train))
    train_tokenizer(["abcdef="], 259).save(root / "tokenizer.json")  # bytes only: one token per letter
    return root, held_out


@pytest.mark.parametrize("module", [MaskedDiffusionSFT, AutoregressiveSFT])
def test_tiny_sft_learns_to_reverse_strings(module, reversal_data):
    from lldiff.data import SFTDataModule

    root, held_out = reversal_data
    data = SFTDataModule([str(root / "train.jsonl")], str(root / "tokenizer.json"), val_fraction=0.0,
                         template=TOY_TEMPLATE, max_length=16, batch_size=64, seed=0)
    L.seed_everything(0)
    model = module(size="tiny-0.1M", vocab_size=259, lr=3e-3, warmup_steps=20, weight_decay=0.0)
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, limit_val_batches=0)
    trainer.fit(model, data)
    tok = data.tokenizer
    prompts = [[tok.eos_id, *tok.encode(s + "=")] for s in held_out]  # strings never seen in training
    out = complete(model.model.eval(), prompts, DecodeOptions(length=6, block_length=6), eos_id=tok.eos_id,
                   pad_id=tok.pad_id)
    accuracy = sum(tok.decode(a) == s[::-1] for a, s in zip(out.answers, held_out)) / len(held_out)
    assert accuracy >= 0.9, f"{module.__name__}: exact match {accuracy:.2%} on held-out strings"


def _sft_file(path: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    records = [{"messages": [{"role": "user", "content": " ".join(rng.sample(words, 3))},
                             {"role": "assistant", "content": " ".join(rng.sample(words, 2))}]} for _ in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_finetune_from_a_pretrained_checkpoint_with_the_shipped_config(objective, tiny_runs, tmp_path):
    from lldiff.launch import lightning_cli

    pretrained = tiny_runs[objective]
    run_dir = pretrained.parent.parent
    module = MaskedDiffusionSFT if objective == "mdm" else AutoregressiveSFT
    fresh = module(init_from=str(pretrained), vocab_size=load_model(pretrained).config.vocab_size)
    assert fresh.config.name == "tiny-0.1M"  # the shape comes from the checkpoint
    weights = torch.load(pretrained, weights_only=True)["state_dict"]
    for name, value in fresh.state_dict().items():
        if name in weights:
            assert torch.equal(value, weights[name]), name  # the pre-trained weights are loaded
    cli = lightning_cli([
        "fit", "--config", str(REPO / "configs" / f"sft-{objective}-tiny.yaml"),
        "--model.init_args.init_from", str(pretrained),
        "--data.init_args.tokenizer_path", str(run_dir),
        "--data.init_args.train_files", f"[{_sft_file(tmp_path / 'sft.jsonl')}]",
        "--data.init_args.max_length", "32", "--data.init_args.batch_size", "8",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "6", "--model.init_args.warmup_steps", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    assert cli.trainer.global_step == 6
    ckpt = tmp_path / f"sft-{objective}-tiny" / "checkpoints" / "last.ckpt"
    assert load_model(ckpt).objective.name == objective  # generate / eval / chat read it directly
    scalars = read_scalars(ckpt.parent.parent)
    assert scalars["data/train_examples"][0] + scalars["data/val_examples"][0] == 64  # one turn per record
    assert scalars["data/train_truncated"][0] == 0 and "val/nll_per_token" in scalars
    last = max(scalars["val/nll_per_token"])
    nll, bpb = scalars["val/nll_per_token"][last], scalars["val/bpb"][last]  # SFT runs report bits per byte too
    assert 0 < bpb < float("inf") and 0 < nll / (bpb * math.log(2)) < 10  # bytes per response token
    out = io.StringIO()
    chat_main(["--ckpt", str(ckpt), "--message", "the quick fox", "--message", "again", "--length", "8"],
              stdin=io.StringIO(""), stdout=out)
    assert len(out.getvalue().splitlines()) == 2  # one answer per turn


def test_pretrained_mismatches_are_named(tiny_runs):
    mdm, ar = str(tiny_runs["mdm"]), str(tiny_runs["ar"])
    vocab = load_model(mdm).config.vocab_size
    with pytest.raises(ValueError, match="holds an AR .*needs an MDM"):
        MaskedDiffusionSFT(init_from=ar, vocab_size=vocab)
    with pytest.raises(ValueError, match=f"vocab_size={vocab} but the tokenizer has 999 real tokens"):
        AutoregressiveSFT(init_from=ar, vocab_size=999)
    with pytest.raises(ValueError, match="size='tiny-1M' does not match"):
        MaskedDiffusionSFT(init_from=mdm, vocab_size=vocab, size="tiny-1M")
    with pytest.raises(ValueError, match=r"model_overrides \['d_model'\] would change the pre-trained shape"):
        MaskedDiffusionSFT(init_from=mdm, vocab_size=vocab, model_overrides={"d_model": 8})
    with pytest.raises(FileNotFoundError, match="init_from checkpoint 'nope.ckpt' does not exist"):
        MaskedDiffusionSFT(init_from="nope.ckpt", vocab_size=vocab)


def test_chat_renders_the_conversation_and_keeps_it_in_context(tmp_path):
    tok = train_tokenizer(["User: hello\nAssistant: hi\n" * 10], 259)
    cfg = ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=tok.vocab_size, max_seq_len=192, attention="causal")
    session = ChatSession(LoadedModel(Transformer(cfg).eval(), get("ar"), tok, tmp_path), ChatTemplate(),
                          DecodeOptions(length=8), system="be kind")
    first = session.reply("hello")
    second = session.reply("again")
    text = tok.decode(session.prompt_ids()[1:])
    assert text == f"System: be kind\nUser: hello\nAssistant: {first}\nUser: again\nAssistant: {second}\nAssistant: "
    for _ in range(8):  # outgrow the 192-token context: the oldest exchanges are dropped, the system stays
        session.reply("a longer message that takes many byte tokens")
    ids = session.prompt_ids()
    assert len(ids) + 8 <= 192
    assert tok.decode(ids[1:]).startswith("System: be kind\n")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_chat_interactive_session_resets_and_quits(tiny_runs):
    out = io.StringIO()
    chat_main(["--ckpt", str(tiny_runs["ar"]), "--length", "4"], stdin=Terminal("hello\n/reset\nagain\n/quit\nnever\n"),
              stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and text.count("you> ") == 4  # stops at /quit


def test_chat_refuses_a_template_without_a_response_slot(tiny_runs, tmp_path):
    template = tmp_path / "t.yaml"
    template.write_text("assistant: 'A: '\n")
    with pytest.raises(SystemExit):
        chat_main(["--ckpt", str(tiny_runs["mdm"]), "--template", str(template), "--message", "hi"])


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 13:
            raise RuntimeError("simulated crash")


def test_interrupted_sft_resumes_exactly(reversal_data, tmp_path):
    """Crash after step 13, resume from the step-10 checkpoint (mid-epoch): the final weights equal an
    uninterrupted run's bit for bit (same batches, masks and prompt dropout)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lldiff.data import SFTDataModule

    root, _ = reversal_data

    def run(dirpath, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        data = SFTDataModule([str(root / "train.jsonl")], str(root / "tokenizer.json"), val_fraction=0.0,
                             template=TOY_TEMPLATE, max_length=16, batch_size=128, seed=3)  # 8 batches per epoch
        model = MaskedDiffusionSFT(size="tiny-0.016M", vocab_size=259, lr=3e-3, warmup_steps=2, prompt_dropout=0.3)
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=5, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_steps=16, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[ckpt, *callbacks])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    reference = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", callbacks=[Crash()])
    resumed = run(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
