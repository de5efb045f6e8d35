"""Option values are used exactly as given or refused (issue 12, item 4): nothing is
silently replaced by a default, rounded, or ignored.

CLI refusals come before any model is loaded (a nonexistent --ckpt proves it) with exit
code 2 and one line naming the flag, the value and what is allowed; the library raises
ValueError naming the value.
"""

import math

import pytest
import torch

from lldiff import chat, generate
from lldiff.objectives.ar.decoding import ar_generate
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import complete
from lldiff.config import ModelConfig
from lldiff.model import Transformer
from lldiff.objectives.mdm.decoding import generate as mdm_generate
from lldiff.objectives.mdm.decoding import generate_threshold

NO_CKPT = "/nonexistent/never-loaded.ckpt"


def refused(capsys, main, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(["--ckpt", NO_CKPT, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "never-loaded" not in err  # refused before the checkpoint is looked at
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no usage block
    return lines[0]


GENERATE_REFUSALS = [
    # silently replaced by a default before: 0 was "unset"
    (("--remasking", "threshold", "--threshold", "0"), "--threshold must be in (0, 1], got 0.0"),
    (("--gen-length", "0"), "--gen-length must be >= 1, got 0"),
    (("--steps", "0"), "--steps must be >= 1, got 0"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1, got 0"),
    (("--block-length", "0"), "--block-length must be >= 1, got 0"),
    # ignored in the chosen mode
    (("--threshold", "0.5"), "--threshold 0.5 needs --remasking threshold"),
    (("--threshold", "0.5", "--remasking", "random"), "--threshold 0.5 needs --remasking threshold"),
    (("--top-p", "0.9"), "--top-p 0.9 needs --temperature > 0"),
    (("--top-k", "5"), "--top-k 5 needs --temperature > 0"),
    (("--remasking", "threshold", "--steps", "8"), "--steps 8 has no effect with --remasking threshold"),
    (("--seed", "3"), "--seed 3 needs --temperature > 0 or --remasking random"),
    # block layout: refused with the allowed values, never rounded
    (("--gen-length", "40"),
     ("--gen-length 40 is not a multiple of the default --block-length 32; use --gen-length 32 or 64, "
     "or a --block-length that divides 40")),
    (("--gen-length", "20", "--block-length", "8"), ("--gen-length 20 is not a multiple of --block-length 8; "
     "use --gen-length 16 or 24")),
    (("--gen-length", "16", "--block-length", "32"), ("--gen-length 16 is not a multiple of --block-length 32; "
     "use --gen-length 32,")),
    (("--steps", "3"), ("--steps 3 is not a multiple of the number of blocks 2 (--gen-length 64 / --block-length 32); "
     "use --steps 2 or 4")),
    # the dual cache keeps what follows the block: one block has nothing there
    (("--gen-length", "32", "--cache", "dual"), ("--cache dual keeps the keys/values after the current block, so it "
     "needs more than one block, but --block-length 32 covers --gen-length 32; use a --block-length below 32 that "
     "divides it (1, 2, 4, 8, 16), or --cache prefix")),
    (("--gen-length", "16", "--block-length", "16", "--cache", "dual"), "--block-length 16 covers --gen-length 16"),
    # out of range
    (("--temperature", "-1"), "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (("--temperature", "nan"), "--temperature must be >= 0 (0 = greedy), got nan"),
    (("--cfg-scale", "-1"), "--cfg-scale must be >= 0 (0 = off), got -1.0"),
    (("--temperature", "1", "--top-p", "1.5"), "--top-p must be in (0, 1], got 1.5"),
    (("--temperature", "1", "--top-p", "0"), "--top-p must be in (0, 1], got 0.0"),
    (("--temperature", "1", "--top-k", "0"), "--top-k must be >= 1, got 0"),
]


@pytest.mark.parametrize("argv,message", GENERATE_REFUSALS)
def test_generate_refuses_before_loading(capsys, argv, message):
    line = refused(capsys, generate.main, "--prompt", "x", *argv)
    assert line.startswith("lldiff generate: error: ")
    assert message in line


CHAT_REFUSALS = [
    (("--length", "0"), "--length must be >= 1, got 0"),
    (("--steps", "0"), "--steps must be >= 1, got 0"),
    (("--block-length", "0"), "--block-length must be >= 1, got 0"),
    (("--length", "40", "--block-length", "32"), ("--length 40 is not a multiple of --block-length 32; "
     "use --length 32 or 64")),
    (("--length", "16", "--block-length", "32"), ("--length 16 is not a multiple of --block-length 32; "
     "use --length 32,")),
    (("--length", "64", "--steps", "3"), "--steps 3 is not a multiple of the number of blocks 2"),
    (("--threshold", "0.5"), "--threshold 0.5 needs --remasking threshold"),
    (("--remasking", "threshold", "--threshold", "0"), "--threshold must be in (0, 1], got 0.0"),
    (("--remasking", "threshold", "--steps", "4"), "--steps 4 has no effect with --remasking threshold"),
    (("--seed", "1"), "--seed 1 needs --temperature > 0 or --remasking random"),
    (("--temperature", "-0.5"), "--temperature must be >= 0 (0 = greedy), got -0.5"),
    (("--cfg-scale", "-2"), "--cfg-scale must be >= 0 (0 = off), got -2.0"),
    (("--length", "16", "--cache", "dual"), ("--cache dual keeps the keys/values after the current block, so it needs "
     "more than one block, but --block-length 16 covers --length 16; use a --block-length below 16 that divides it "
     "(1, 2, 4, 8), or --cache prefix")),
]


@pytest.mark.parametrize("argv,message", CHAT_REFUSALS)
def test_chat_refuses_before_loading(capsys, argv, message):
    line = refused(capsys, chat.main, "--message", "hi", *argv)
    assert line.startswith("lldiff chat: error: ")
    assert message in line


def test_valid_values_reach_the_checkpoint_check(capsys):
    """Good values (README examples, 0 where 0 is meaningful) pass validation: the error is the missing file."""
    for main, argv in [
        (generate.main, ["--gen-length", "64", "--steps", "64", "--block-length", "32"]),
        (generate.main, ["--remasking", "threshold", "--threshold", "1"]),
        (generate.main, ["--max-new-tokens", "64", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]),
        (generate.main, ["--cfg-scale", "0", "--remasking", "random", "--seed", "2", "--steps", "2"]),
        (chat.main, ["--length", "16"]),
        (chat.main, ["--length", "48", "--block-length", "16", "--steps", "6"]),
        (generate.main, ["--cache", "dual"]),  # default: 64 tokens in blocks of 32
        (generate.main, ["--gen-length", "32", "--cache", "prefix", "--remasking", "threshold"]),
        (chat.main, ["--length", "48", "--block-length", "16", "--cache", "dual"]),
    ]:
        with pytest.raises((SystemExit, FileNotFoundError)) as info:  # generate: cli.main makes it one line, exit 2
            main(["--ckpt", NO_CKPT, "--prompt" if main is generate.main else "--message", "x", *argv])
        assert "never-loaded.ckpt' does not exist" in capsys.readouterr().err + str(info.value)


# --- on real (tiny) checkpoints: what only the checkpoint decides --------------------------------


def test_chat_mdm_length_is_not_rounded_up_to_the_default_block(tiny_runs, capsys):
    with pytest.raises(SystemExit) as info:  # gave a 64-token canvas before
        chat.main(["--ckpt", str(tiny_runs["mdm"]), "--message", "hi", "--length", "40"])
    assert info.value.code == 2
    assert ("--length 40 is not a multiple of the default --block-length 32; use --length 32 or 64, "
            "or a --block-length that divides 40") in capsys.readouterr().err


@pytest.mark.parametrize("argv", [("--block-length", "4"), ("--steps", "64"), ("--remasking", "random"),
                                  ("--cfg-scale", "1"), ("--remasking", "threshold", "--threshold", "0.5")])
def test_chat_refuses_mdm_options_for_an_ar_checkpoint(tiny_runs, capsys, argv):
    with pytest.raises(SystemExit) as info:  # ignored before
        chat.main(["--ckpt", str(tiny_runs["ar"]), "--message", "hi", *argv])
    assert info.value.code == 2
    named = ", ".join(a for a in argv if a.startswith("--"))
    assert capsys.readouterr().err.strip() == f"lldiff chat: error: {named} do(es) not apply to an AR checkpoint " \
        f"({tiny_runs['ar']})"


@pytest.mark.parametrize("main,argv", [(generate.main, ("--prompt", "hi", "--cache", "prefix")),
                                       (chat.main, ("--message", "hi", "--cache", "dual"))])
def test_a_cache_option_for_an_ar_checkpoint_names_its_own_cache(tiny_runs, capsys, main, argv):
    with pytest.raises(SystemExit) as info:
        main(["--ckpt", str(tiny_runs["ar"]), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--cache do(es) not apply to an AR checkpoint ({tiny_runs['ar']}); an AR decodes with its "
                        "exact KV cache, on by default (--no-cache turns it off)")


def test_no_cache_for_an_mdm_checkpoint_names_its_caches(tiny_runs, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", str(tiny_runs["mdm"]), "--prompt", "hi", "--no-cache"])
    assert capsys.readouterr().err.strip().endswith(
        "--no-cache do(es) not apply to an MDM checkpoint " f"({tiny_runs['mdm']}); an MDM decodes exactly by "
        "default; its approximate caches are --cache prefix and --cache dual")


def test_values_are_used_exactly_as_given(tiny_runs, capsys, monkeypatch):
    seen = []

    def spy(real):
        def wrapper(model, prompts, options, **kwargs):
            seen.append(options)
            return real(model, prompts, options, **kwargs)
        return wrapper

    monkeypatch.setattr(generate, "complete", spy(generate.complete))
    monkeypatch.setattr(chat, "complete", spy(chat.complete))
    generate.main(["--ckpt", str(tiny_runs["mdm"]), "--prompt", "red", "--gen-length", "8", "--remasking",
                   "threshold", "--threshold", "1", "--cfg-scale", "0"])
    assert (seen[-1].length, seen[-1].threshold, seen[-1].cfg_scale, seen[-1].block) == (8, 1.0, 0.0, 8)
    generate.main(["--ckpt", str(tiny_runs["ar"]), "--prompt", "red", "--max-new-tokens", "3"])
    assert seen[-1].length == 3
    chat.main(["--ckpt", str(tiny_runs["mdm"]), "--message", "hi", "--length", "48", "--block-length", "16",
               "--steps", "6"])
    assert (seen[-1].length, seen[-1].block, seen[-1].steps) == (48, 16, 6)
    chat.main(["--ckpt", str(tiny_runs["mdm"]), "--message", "hi", "--length", "16"])  # default block: min(32, 16)
    assert (seen[-1].length, seen[-1].block) == (16, 16)
    generate.main(["--ckpt", str(tiny_runs["mdm"]), "--prompt", "red", "--gen-length", "8", "--block-length", "4",
                   "--cache", "dual"])
    assert (seen[-1].cache, seen[-1].block) == ("dual", 4)
    chat.main(["--ckpt", str(tiny_runs["mdm"]), "--message", "hi", "--length", "16", "--cache", "prefix"])
    assert (seen[-1].cache, seen[-1].block) == ("prefix", 16)
    chat.main(["--ckpt", str(tiny_runs["ar"]), "--message", "hi", "--length", "40"])  # AR: no blocks
    assert seen[-1].length == 40
    capsys.readouterr()


# --- the library ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"length": 8, "steps": 0}, "steps must be >= 1, got 0"),  # was: steps = length
    ({"length": 8, "block_length": 0}, "block_length must be >= 1, got 0"),  # was: block = min(32, length)
    ({"length": 8, "threshold": 0.5}, "threshold=0.5 needs remasking='threshold'"),  # was: ignored
    ({"length": 8, "remasking": "threshold", "threshold": 0.0}, r"threshold must be in \(0, 1\], got 0.0"),
    ({"length": 8, "remasking": "threshold", "steps": 4}, "steps=4 has no effect with remasking='threshold'"),
    ({"length": 8, "top_p": 0.9}, "top_p=0.9 needs temperature > 0"),  # was: ignored (greedy)
    ({"length": 8, "top_k": 3}, "top_k=3 needs temperature > 0"),
    ({"length": 8, "temperature": 1.0, "top_k": 0}, "top_k must be >= 1, got 0"),
    ({"length": 8, "temperature": 1.0, "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"length": 8, "temperature": -1.0}, "temperature must be >= 0"),
    ({"length": 8, "temperature": math.nan}, "temperature must be >= 0"),
    ({"length": 8, "cfg_scale": -1.0}, "cfg_scale must be >= 0"),
    ({"length": 8, "cache": "dual"}, r"cache='dual' .*needs more than one block \(block_length < length\)"),
    ({"length": 8, "block_length": 8, "cache": "dual"}, "got block_length=8 with length=8"),
    ({"length": 8, "cache": "full"}, "cache='full'; allowed: none, prefix, dual"),
])
def test_decode_options_refuse_values_they_would_replace_or_ignore(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**kwargs)


def test_decode_options_defaults_are_unchanged():
    options = DecodeOptions(length=16)
    assert (options.block, options.steps, options.threshold, options.remasking) == (16, None, None, "low_confidence")
    assert DecodeOptions(length=64).block == 32
    assert DecodeOptions(length=8, remasking="threshold").threshold is None  # complete() uses 0.9
    assert DecodeOptions(length=8).cache == "none"  # the MDM decodes exactly unless a cache is asked for


def tiny(causal: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=1, d_model=16, n_heads=2, d_ff=32, vocab_size=23, max_seq_len=64,
                                   attention="causal" if causal else "bidirectional")).eval()


def test_ar_generate_refuses_sampling_filters_at_temperature_zero():
    prompt = torch.zeros(1, 3, dtype=torch.long)
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))}=.* needs temperature > 0"):
            ar_generate(tiny(True), prompt, max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        ar_generate(tiny(True), prompt, max_new_tokens=2, temperature=math.nan)


def test_complete_refuses_ar_options_for_an_mdm():
    with pytest.raises(ValueError, match="top_k=5 applies to AR models only"):
        complete(tiny(False), [[1, 2]], DecodeOptions(length=4, temperature=1.0, top_k=5), eos_id=1, pad_id=0)


def test_mdm_samplers_refuse_nan():
    model, prompt = tiny(False), torch.zeros(1, 3, dtype=torch.long)
    common = {"gen_length": 4, "block_length": 4, "mask_id": model.cfg.mask_id}
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        mdm_generate(model, prompt, steps=4, temperature=math.nan, **common)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        generate_threshold(model, prompt, cfg_scale=math.nan, **common)
