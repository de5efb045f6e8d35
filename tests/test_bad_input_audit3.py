"""Issue 24 section C (the third audit's bad inputs): each case, run as a user runs it (a
subprocess of ``lldiff``), exits 2 with ONE line on stderr that names the bad value, and no
traceback. The cases share one tiny MDM and one tiny AR run (``tiny_runs``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lldiff(args, stdin=b"", cwd=None, closed_stdin=False):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RUST_BACKTRACE", None)
    code = "import sys; from lldiff.cli import main; main(sys.argv[1:])"
    command = [sys.executable, "-c", code, *args]
    if closed_stdin:  # as a shell's `<&-`: no file descriptor 0 at all
        command = ["sh", "-c", 'exec "$0" "$@" <&-', *command]
    return subprocess.run(command, input=None if closed_stdin else stdin, capture_output=True, env=env, cwd=cwd,
                          timeout=300)


def assert_one_line(result, *named):
    err = result.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.returncode == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for value in named:
        assert value in lines[0], (value, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_runs):
    d = tmp_path_factory.mktemp("bad")
    (d / "bin.txt").write_bytes(bytes(range(128, 256)) * 2)
    (d / "bad.yaml").write_text("user: [unclosed\n")
    (d / "notjson.json").write_text("not json {")
    (d / "empty.json").write_text("{}")
    (d / "task.jsonl").write_text(json.dumps({"context": "a", "choices": [" b", " c"], "label": 0}) + "\n")
    (d / "bin.jsonl").write_bytes(bytes(range(128, 256)))
    return {"dir": d, "mdm": str(tiny_runs["mdm"]), "ar": str(tiny_runs["ar"]),
            "config": str(tiny_runs["mdm"].parent.parent / "config.yaml")}


CASES = {  # name: (argv with {placeholders}, stdin bytes or None for a closed stdin, values the line names)
    "generate --tokenizer config.yaml": (["generate", "--ckpt", "{mdm}", "--tokenizer", "{config}", "--prompt", "x"],
                                         b"", ["config.yaml"]),
    "generate --tokenizer not json": (["generate", "--ckpt", "{mdm}", "--tokenizer", "{dir}/notjson.json",
                                       "--prompt", "x"], b"", ["notjson.json"]),
    "generate --tokenizer {}": (["generate", "--ckpt", "{mdm}", "--tokenizer", "{dir}/empty.json", "--prompt", "x"],
                                b"", ["empty.json"]),
    "generate --device cuda:7": (["generate", "--ckpt", "{mdm}", "--device", "cuda:7", "--prompt", "x"], b"",
                                 ["cuda:7"]),
    "generate --device banana": (["generate", "--ckpt", "{mdm}", "--device", "banana", "--prompt", "x"], b"",
                                 ["banana", "cpu"]),
    "generate binary stdin": (["generate", "--ckpt", "{mdm}"], bytes(range(128, 256)) + b"\n", ["UTF-8", "0x80"]),
    "generate non-UTF-8 stdin": (["generate", "--ckpt", "{mdm}"], b"ab\xff\xfecd\n", ["UTF-8", "0xff"]),
    "generate closed stdin": (["generate", "--ckpt", "{mdm}"], None, ["stdin"]),
    "generate --prompt \\xff": (["generate", "--ckpt", "{mdm}", "--prompt", b"\xff"], b"", ["--prompt", "0xff"]),
    "generate foreign option after loading": (["generate", "--ckpt", "{mdm}", "--prompt", "x", "--max-new-tokens",
                                               "8"], b"", ["--max-new-tokens"]),
    "chat --device banana": (["chat", "--ckpt", "{mdm}", "--device", "banana", "--message", "x"], b"", ["banana"]),
    "chat non-UTF-8 stdin": (["chat", "--ckpt", "{mdm}"], b"ab\xff\xfecd\n", ["UTF-8", "0xff"]),
    "chat closed stdin": (["chat", "--ckpt", "{mdm}"], None, ["stdin"]),
    "chat --message \\xff": (["chat", "--ckpt", "{mdm}", "--message", b"\xff"], b"", ["--message", "0xff"]),
    "chat --template broken YAML": (["chat", "--ckpt", "{mdm}", "--template", "{dir}/bad.yaml", "--message", "x"],
                                    b"", ["bad.yaml", "line"]),
    "eval --n-mc on an AR": (["eval", "--ckpt", "{ar}", "--task", "{dir}/task.jsonl", "--n-mc", "8"], b"",
                             ["--n-mc", "AR"]),
    "eval --out a directory": (["eval", "--ckpt", "{ar}", "--task", "{dir}/task.jsonl", "--out", "{dir}"], b"",
                               ["--out", "directory"]),
    "eval --out unwritable": (["eval", "--ckpt", "{ar}", "--task", "{dir}/task.jsonl", "--out", "/proc/x.json"],
                              b"", ["/proc/x.json"]),
    "eval --limit 0 (no usage block)": (["eval", "--ckpt", "{ar}", "--task", "{dir}/task.jsonl", "--limit", "0"],
                                        b"", ["--limit", "0"]),
    "eval binary task": (["eval", "--ckpt", "{ar}", "--task", "{dir}/bin.jsonl"], b"", ["bin.jsonl", "UTF-8"]),
    "eval --device banana": (["eval", "--ckpt", "{ar}", "--task", "{dir}/task.jsonl", "--device", "banana"], b"",
                             ["banana"]),
    "eval --ckpt a run directory": (["eval", "--ckpt", "{rundir}", "--task", "{dir}/task.jsonl"], b"",
                                    ["checkpoints"]),
    "export --max-shard-gb 0": (["export", "{ar}", "--to", "hf", "{dir}/exp", "--max-shard-gb", "0"], b"",
                                ["--max-shard-gb", "0"]),
    "export --max-shard-gb -1": (["export", "{ar}", "--to", "hf", "{dir}/exp", "--max-shard-gb", "-1"], b"",
                                 ["--max-shard-gb", "-1"]),
    "export --max-shard-gb nan": (["export", "{ar}", "--to", "hf", "{dir}/exp", "--max-shard-gb", "nan"], b"",
                                  ["--max-shard-gb", "nan"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, files):
    argv, stdin, named = CASES[name]
    places = {**files, "rundir": str(Path(files["ar"]).parent.parent)}
    args = [a if isinstance(a, bytes) else a.format(**places) for a in argv]
    args = [os.fsdecode(a) if isinstance(a, bytes) else a for a in args]  # argv bytes as a shell passes them
    result = lldiff(args, stdin=stdin or b"", closed_stdin=stdin is None)
    assert_one_line(result, *named)
    assert not (files["dir"] / "exp").exists()  # export wrote nothing


def test_imported_config_with_nan_eps_is_refused(tmp_path):
    from lldiff.interop.llada import _REQUIRED_VALUES, model_config

    raw = {key: accepted[0] for key, accepted, _ in _REQUIRED_VALUES}
    raw |= {"model_type": "llada", "d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 128,
           "vocab_size": 100, "embedding_size": 100, "mask_token_id": 99, "rms_norm_eps": float("nan")}
    with pytest.raises(ValueError, match="rms_norm_eps=nan must be a finite number > 0"):
        model_config(raw, tmp_path / "config.json")
