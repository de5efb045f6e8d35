"""`lldiff generate` on real (tiny) checkpoints of both objectives."""

import re

import pytest

from lldiff.checkpoint import load_model
from lldiff.generate import main


def run(capsys, *argv):
    main([str(a) for a in argv])
    return capsys.readouterr().out


def test_ar_generate_prints_completions_calls_and_speed(tiny_runs, capsys):
    out = run(capsys, "--ckpt", tiny_runs["ar"], "--prompt", "the quick", "--prompt", "she sells sea",
              "--max-new-tokens", "8", "--temperature", "0.7", "--top-p", "0.9")
    assert out.startswith("the quick") and "she sells sea" in out
    assert re.search(r"AR tiny-0.1M: 2 prompt\(s\), [1-8] model calls, \d+ tokens/s", out)


@pytest.mark.parametrize("extra,calls", [((), 16), (("--steps", "8", "--block-length", "8"), 8),
                                         (("--cfg-scale", "1.0", "--steps", "4"), 4),
                                         (("--remasking", "random", "--temperature", "1.0"), 16)])
def test_mdm_generate_runs_every_sampler(tiny_runs, capsys, extra, calls):
    out = run(capsys, "--ckpt", tiny_runs["mdm"], "--prompt", "a stitch in", "--gen-length", "16", *extra)
    assert out.startswith("a stitch in")
    assert f"MDM tiny-0.1M: 1 prompt(s), {calls} model calls" in out


def processed(out: str) -> float:
    return float(re.search(r"([\d.]+) tokens processed per answer position", out).group(1))


def test_mdm_generate_with_a_cache_reports_calls_speed_and_tokens_processed(tiny_runs, capsys):
    argv = ("--ckpt", tiny_runs["mdm"], "--prompt", "a stitch in", "--gen-length", "16", "--block-length", "4")
    exact = run(capsys, *argv)
    prompt = len(load_model(tiny_runs["mdm"]).tokenizer.encode("a stitch in"))
    assert processed(exact) == pytest.approx(16 * (prompt + 16) / 16, abs=0.051)  # 16 whole-canvas calls
    for cache, fed in (("prefix", lambda k: 16 - 4 * k), ("dual", lambda k: 4)):
        out = run(capsys, *argv, "--cache", cache)
        assert re.search(rf"MDM tiny-0.1M: 1 prompt\(s\), 16 model calls, \d+ tokens/s \(\d+ answer tokens in [\d.]+ "
                         rf"s\), [\d.]+ tokens processed per answer position, {cache} cache", out)
        expected = sum(prompt + 16 + 3 * fed(k) for k in range(4)) / 16  # per block: whole canvas, then 3 calls
        assert processed(out) == pytest.approx(expected, abs=0.051) and processed(out) < processed(exact)
    out = run(capsys, *argv, "--cache", "dual", "--remasking", "threshold")
    assert 4 <= int(re.search(r"(\d+) model calls", out).group(1)) <= 16


def test_chat_prints_calls_and_speed_after_each_answer(tiny_runs, capsys):
    from lldiff import chat

    chat.main(["--ckpt", str(tiny_runs["mdm"]), "--message", "hi", "--message", "more", "--length", "8",
               "--block-length", "4", "--cache", "dual"])
    captured = capsys.readouterr()
    assert "model calls" not in captured.out  # stdout: the answers alone
    stats = captured.err.strip().splitlines()
    assert len(stats) == 2 and all(re.fullmatch(r"\[MDM: 8 model calls, \d+ tokens/s \(\d+ answer tokens in [\d.]+ s\), "
                                                r"[\d.]+ tokens processed per answer position, dual cache\]", line)
                                   for line in stats)


def test_mdm_threshold_decoding_reports_its_calls(tiny_runs, capsys):
    out = run(capsys, "--ckpt", tiny_runs["mdm"], "--prompt", "red lorry", "--gen-length", "16",
              "--remasking", "threshold", "--threshold", "0.5")
    calls = int(re.search(r"(\d+) model calls", out).group(1))
    assert 1 <= calls <= 16


@pytest.mark.parametrize(
    "objective,option,message",
    [("mdm", ("--top-k", "5", "--temperature", "1"), "--top-k do\\(es\\) not apply to an MDM checkpoint"),
     ("ar", ("--cfg-scale", "2"), "--cfg-scale do\\(es\\) not apply to an AR checkpoint"),
     ("ar", ("--max-new-tokens", "5000"), "exceeds the model's context max_seq_len=1024"),
     ("mdm", ("--gen-length", "20", "--block-length", "8"), "--gen-length 20 is not a multiple of --block-length 8")],
)
def test_bad_options_are_refused(tiny_runs, capsys, objective, option, message):
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["--ckpt", str(tiny_runs[objective]), "--prompt", "the", *option])
    assert re.search(message, capsys.readouterr().err + str(info.value))


def test_wrong_checkpoint_type_is_named(tiny_runs):
    with pytest.raises(ValueError, match="holds an AR model; this needs an MDM checkpoint"):
        load_model(tiny_runs["ar"], expect="mdm")
