"""Whole conversions between lldiff checkpoints and Hugging Face directories, and the
``lldiff import`` / ``lldiff export`` commands (the entry points of :mod:`lldiff.interop`).

``lldiff export CKPT --to hf OUT_DIR`` asks the registry what the checkpoint's objective is: a
model without a mask token (AR) becomes a Llama directory (:func:`lldiff.interop.hf.export_llama`),
one with a mask token (MDM, BD3) a LLaDA directory (:func:`lldiff.interop.llada.export_llada`).
``lldiff import llada HF_DIR --out RUN_DIR`` writes an lldiff run directory (:func:`import_llada`);
``load_model`` (hence ``generate``, ``chat``, ``eval``) also reads a LLaDA directory directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from lldiff.atomic import write_text
from lldiff.checkpoint import TOKENIZER_KEY, load_model
from lldiff.checkpoint_io import write_file_atomically
from lldiff.data.chat import SAVED_TEMPLATE_FILE
from lldiff.interop.common import DTYPES
from lldiff.interop.hf import export_llama
from lldiff.interop.llada import chat_template, export_llada, load_llada


# -- import: a run directory -------------------------------------------------------------------
IMPORTED_CKPT = "checkpoints/imported.ckpt"


def import_llada(hf_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``out`` as an lldiff run directory (``checkpoints/imported.ckpt``, ``tokenizer.json``,
    ``special_ids.json``, ``chat_template.json``) that ``load_model``, ``lldiff generate``,
    ``chat`` and ``eval`` read; returns the checkpoint path."""
    out = Path(out)
    target = out / IMPORTED_CKPT
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never over another run's tokenizer.json
        raise FileExistsError(f"--out {out} exists and is not an empty directory; choose a new run directory")
    model, tokenizer, directory = load_llada(hf_dir, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")  # with special_ids.json for LLaDA's own tokenizer
    template = chat_template(directory.path)
    if template is not None:
        write_text(out / SAVED_TEMPLATE_FILE, json.dumps(template, indent=2) + "\n")
    state = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "lldiff": {"model_config": dataclasses.asdict(model.cfg), TOKENIZER_KEY: tokenizer.fingerprint,
                   "imported_from": str(Path(hf_dir).resolve())},
    }
    return write_file_atomically(target, lambda handle: torch.save(state, handle))


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str | None = None, max_shard_bytes: int | None = None,
              tokenizer: str | Path | None = None) -> tuple[Path, str]:
    """Export an lldiff checkpoint as a Hugging Face directory; returns ``(out, format)``,
    format ``llama`` (objectives without a mask token) or ``llada`` (with one)."""

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another OUT_DIR")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    loaded = load_model(ckpt, tokenizer=tokenizer)
    model = loaded.model if dtype is None else loaded.model.to(DTYPES[dtype])
    if loaded.objective.mask_token:
        written, kind = export_llada(model, loaded.tokenizer, out, max_shard_bytes=max_shard_bytes), "llada"
    else:
        written, kind = export_llama(model, loaded.tokenizer, out, max_shard_bytes=max_shard_bytes), "llama"
    jinja = _jinja_template(Path(ckpt))
    if jinja is not None and (written / "tokenizer_config.json").is_file():  # what apply_chat_template reads
        config = json.loads((written / "tokenizer_config.json").read_text())
        write_text(written / "tokenizer_config.json", json.dumps({**config, "chat_template": jinja}, indent=2) + "\n")
    return written, kind


def _jinja_template(ckpt: Path) -> str | None:
    """The Jinja chat template an imported LLaDA came with (its run's ``chat_template.json``, or
    the LLaDA directory's own ``tokenizer_config.json``), so an export keeps it; None otherwise."""
    if ckpt.is_dir() and (ckpt / "tokenizer_config.json").is_file():
        return (chat_template(ckpt) or {}).get("jinja")
    for directory in (ckpt.parent.parent, ckpt.parent):
        saved = directory / SAVED_TEMPLATE_FILE
        if saved.is_file():
            return json.loads(saved.read_text()).get("jinja")
    return None


# -- commands ----------------------------------------------------------------------------------
IMPORT_FORMATS = ("llada",)
EXPORT_FORMATS = ("hf",)


def import_main(argv: list[str]) -> None:

    parser = argparse.ArgumentParser(prog="lldiff import", description=(
        "Import a Hugging Face checkpoint directory as an lldiff run directory (checkpoints/imported.ckpt, "
        "tokenizer.json). lldiff generate/chat/eval --ckpt also accept the LLaDA directory itself."))
    parser.add_argument("format", choices=IMPORT_FORMATS, help="the directory's model family")
    parser.add_argument("hf_dir", help="directory with config.json, model.safetensors[.index.json], tokenizer.json")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights' dtype (default: as stored, bfloat16 for LLaDA-8B)")
    args = parser.parse_args(argv)
    ckpt = import_llada(args.hf_dir, args.out, dtype=None if args.dtype is None else DTYPES[args.dtype])
    print(ckpt)


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lldiff export", description=(
        "Export an lldiff checkpoint: AR -> Llama directory (transformers.LlamaForCausalLM), "
        "MDM/BD3 -> LLaDA directory (config.json with auto_map; add LLaDA's modeling_llada.py and "
        "configuration_llada.py from the Hub to load it with trust_remote_code)."))
    parser.add_argument("ckpt", help="lldiff checkpoint (.ckpt file or sharded directory)")
    parser.add_argument("--to", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("out_dir", help="directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights' dtype (default: as stored)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's run directory)")
    parser.add_argument("--max-shard-gb", type=float, default=None, help="split the weights into shards of this size")
    args = parser.parse_args(argv)
    from lldiff.inputs import check_positive

    check_positive(args.max_shard_gb, "--max-shard-gb", " (GB per weight file)")
    shard = None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
    out, kind = export_hf(args.ckpt, args.out_dir, dtype=args.dtype, max_shard_bytes=shard, tokenizer=args.tokenizer)
    print(f"{out} ({kind} format)")
