"""LLaDA import and Hugging Face export (issue 15, SPEC §13).

The tests write their own tiny LLaDA-format directory (random weights under LLaDA's names,
config.json, a tokenizer.json from lldiff's trainer with the mask INSIDE a padded vocabulary)
and compare lldiff's logits with a forward written here from SPEC §13's description, not
through lldiff's Transformer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lldiff.checkpoint import load_model
from lldiff.config import ModelConfig
from lldiff.data.tokenizer import train_tokenizer
from lldiff.convert import export_hf, import_llada
from lldiff.interop.llada import load_llada
from lldiff.model import Transformer

P = "model.transformer."
TEXTS = ["the quick brown fox jumps over the lazy dog.", "she sells sea shells on the sea shore.",
         "seven silver swans swam slowly south.", "a stitch in time saves nine stitches later."] * 20
SHAPE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=96)
ROWS = 320  # embedding_size: the tokenizer's 302 ids padded, as LLaDA pads 126349 to 126464


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)  # ids 0..299 real, 300 <|mask|>


def llada_config(**changes):
    raw = {"model_type": "llada", "architectures": ["LLaDAModelLM"], **SHAPE, "vocab_size": ROWS,
           "embedding_size": ROWS, "mask_token_id": 300, "eos_token_id": 0, "pad_token_id": 0,
           "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 64, "weight_tying": False,
           "include_bias": False, "rope": True, "alibi": False, "block_type": "llama", "layer_norm_type": "rms",
           "activation_type": "silu"}
    raw.update(changes)
    return raw


def llada_weights(raw, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, h, kv, ff = raw["d_model"], raw["n_heads"], raw["n_kv_heads"], raw["mlp_hidden_size"]
    hd, rows = d // h, raw["embedding_size"]

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    out = {f"{P}wte.weight": w(rows, d, scale=1.0), f"{P}ln_f.weight": 1 + w(d, scale=0.1),
           f"{P}ff_out.weight": w(rows, d)}
    for i in range(raw["n_layers"]):
        b = f"{P}blocks.{i}."
        out.update({f"{b}q_proj.weight": w(h * hd, d), f"{b}k_proj.weight": w(kv * hd, d),
                    f"{b}v_proj.weight": w(kv * hd, d), f"{b}attn_out.weight": w(d, h * hd),
                    f"{b}ff_proj.weight": w(ff, d), f"{b}up_proj.weight": w(ff, d), f"{b}ff_out.weight": w(d, ff),
                    f"{b}attn_norm.weight": 1 + w(d, scale=0.1), f"{b}ff_norm.weight": 1 + w(d, scale=0.1)})
    return out


def write_llada_dir(path: Path, tokenizer, raw=None, weights=None, shards=1) -> Path:
    """A LLaDA-format directory: config.json, safetensors (sharded with an index if shards > 1),
    tokenizer.json with an extra <|eot_id|>, tokenizer_config.json with a chat template."""
    raw = llada_config() if raw is None else raw
    weights = llada_weights(raw) if weights is None else weights
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    names = list(weights)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: weights[n] for n in part}, str(path / file))
            weight_map.update({n: file for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer.to_json())
    backend.add_special_tokens(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])  # ids 301, 302, 303
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": LLADA_JINJA}))
    return path


# LLaDA-8B-Instruct's tokenizer_config.json chat_template (the Llama-3 header template)
LLADA_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def reference_forward(w, raw, ids):
    """SPEC §13 from the description: RMSNorm, rotate-half RoPE (rope_theta), bidirectional
    attention (GQA: query head j reads key/value head j // (H / Hkv)), SwiGLU
    ff_out(silu(ff_proj x) * up_proj x), untied head ff_out."""
    d, h, kvh, eps = raw["d_model"], raw["n_heads"], raw["n_kv_heads"], raw["rms_norm_eps"]
    hd, (b, t) = d // h, ids.shape

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv = 1.0 / raw["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w[f"{P}wte.weight"][ids]
    for i in range(raw["n_layers"]):
        pre = f"{P}blocks.{i}."
        y = rms(x, w[pre + "attn_norm.weight"])
        q = (y @ w[pre + "q_proj.weight"].T).view(b, t, h, hd).transpose(1, 2)
        k = (y @ w[pre + "k_proj.weight"].T).view(b, t, kvh, hd).transpose(1, 2)
        v = (y @ w[pre + "v_proj.weight"].T).view(b, t, kvh, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        group = torch.arange(h) // (h // kvh)
        k, v = k[:, group], v[:, group]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # no mask: bidirectional
        x = x + (att @ v).transpose(1, 2).reshape(b, t, d) @ w[pre + "attn_out.weight"].T
        y = rms(x, w[pre + "ff_norm.weight"])
        x = x + (F.silu(y @ w[pre + "ff_proj.weight"].T) * (y @ w[pre + "up_proj.weight"].T)) @ w[pre + "ff_out.weight"].T
    return rms(x, w[f"{P}ln_f.weight"]) @ w[f"{P}ff_out.weight"].T


def ids_batch(seed=1, t=12):
    return torch.randint(0, ROWS, (2, t), generator=torch.Generator().manual_seed(seed))


# -- import ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 3])
def test_import_matches_reference_forward(tmp_path, tokenizer, shards):
    raw, weights = llada_config(), llada_weights(llada_config())
    hf = write_llada_dir(tmp_path / "hf", tokenizer, raw, weights, shards=shards)
    model, tok, _ = load_llada(hf)
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.mask_id, cfg.embedding_rows, cfg.attention, cfg.kv_heads) == (ROWS, 300, ROWS, "bidirectional", 2)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    ids = ids_batch()
    ids[0, 3] = 300  # the mask id is an ordinary (inside) row
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(weights, raw, ids), rtol=1e-5, atol=1e-5)
    assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.bos_id) == (ROWS, 300, 0, 0, 301, 1)
    assert tok.mask_inside and len(tok) == ROWS


def test_import_dtype_lands_directly(tmp_path, tokenizer):
    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    model, _, _ = load_llada(hf, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters()) and not model.rope_cos.is_meta


def test_import_command_writes_a_run_that_load_model_reads(tmp_path, tokenizer):
    from lldiff.cli import main

    raw, weights = llada_config(), llada_weights(llada_config())
    hf = write_llada_dir(tmp_path / "hf", tokenizer, raw, weights)
    main(["import", "llada", str(hf), "--out", str(tmp_path / "run")])
    ckpt = tmp_path / "run" / "checkpoints" / "imported.ckpt"
    loaded = load_model(ckpt)
    direct = load_model(hf)  # a LLaDA directory is accepted wherever a checkpoint is
    assert loaded.objective.name == direct.objective.name == "mdm"
    ids = ids_batch(2)
    with torch.no_grad():
        ref = reference_forward(weights, raw, ids)
        torch.testing.assert_close(loaded.model(ids), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(direct.model(ids), ref, rtol=1e-5, atol=1e-5)
    assert (loaded.tokenizer.mask_id, loaded.tokenizer.eot_id, loaded.tokenizer.vocab_size) == (300, 301, ROWS)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the lazy dog")) == "the lazy dog"
    template = json.loads((tmp_path / "run" / "chat_template.json").read_text())["template"]
    assert template["user"] == "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    assert (template["begin"], template["close_response"]) == ("<|bos|>", True)


def test_generation_suppresses_the_inside_mask_logit(tmp_path, tokenizer):
    """The head has a logit for the mask id (inside the vocabulary); a model that prefers it
    everywhere must still never write it."""
    from lldiff.objectives.mdm.decoding import generate

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    loaded = load_model(hf)
    mask_id = loaded.model.cfg.mask_id

    def mask_loving(ids, attention_mask=None, **kwargs):
        logits = loaded.model(ids, attention_mask=attention_mask, **kwargs)
        return logits.index_add(-1, torch.tensor([mask_id]), torch.full_like(logits[..., :1], 1e4))

    prompt = torch.tensor([loaded.tokenizer.encode("the quick brown")])
    with torch.no_grad():
        out = generate(mask_loving, prompt, gen_length=8, steps=8, block_length=8, mask_id=mask_id,
                       eos_id=loaded.tokenizer.eos_id)
    answer = out.canvas[:, prompt.shape[1]:]
    assert answer.shape == (1, 8) and not (answer == mask_id).any()


def test_gqa_and_other_shapes(tmp_path, tokenizer):
    raw = llada_config(n_layers=3, d_model=48, n_heads=6, n_kv_heads=1, mlp_hidden_size=80, rope_theta=10000.0)
    weights = llada_weights(raw, seed=3)
    model, _, _ = load_llada(write_llada_dir(tmp_path / "hf", tokenizer, raw, weights))
    ids = ids_batch(4, t=9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(weights, raw, ids), rtol=1e-5, atol=1e-5)


# -- export ------------------------------------------------------------------------------------
def write_lldiff_run(path: Path, cfg: ModelConfig, tokenizer, seed=0) -> Path:
    """An lldiff run directory (tokenizer.json + a full checkpoint) without training."""
    from lldiff.checkpoint import TOKENIZER_KEY

    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # norms away from one, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    path.mkdir(parents=True)
    tokenizer.save(path / "tokenizer.json")
    ckpt = path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "lldiff": {"model_config": dict(cfg.__dict__), TOKENIZER_KEY: tokenizer.fingerprint}}, ckpt)
    return ckpt


def tiny(attention, **kw):
    return ModelConfig(n_layer=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=300, max_seq_len=64,
                       rope_base=500000.0, attention=attention, **kw)


def test_ar_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    ckpt = write_lldiff_run(tmp_path / "run", tiny("causal"), tokenizer)
    out, kind = export_hf(ckpt, tmp_path / "hf")
    assert kind == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = load_model(ckpt).model
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto.encode("the lazy dog", add_special_tokens=False) == tokenizer.encode("the lazy dog")
    assert auto.eos_token_id == tokenizer.eos_id


@pytest.mark.parametrize("attention,extra", [("bidirectional", {}), ("block", {"block_size": 4})])
def test_mdm_and_bd3_export_import_round_trip_is_exact(tmp_path, tokenizer, attention, extra):
    cfg = tiny(attention, **extra)
    ckpt = write_lldiff_run(tmp_path / "run", cfg, tokenizer)
    out, kind = export_hf(ckpt, tmp_path / "hf")
    assert kind == "llada"
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert (raw["embedding_size"], raw["mask_token_id"], raw["n_kv_heads"]) == (301, 300, 2)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    original = load_model(ckpt).model
    back, tok, _ = load_llada(out)
    assert back.cfg == original.cfg
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tok.fingerprint == tokenizer.fingerprint and tok.mask_id == 300


def test_llada_import_export_round_trip_is_exact(tmp_path, tokenizer):
    """LLaDA directory -> lldiff -> LLaDA directory: the same tensors under the same names."""
    from safetensors.torch import load_file

    from lldiff.interop.llada import export_llada

    weights = llada_weights(llada_config())
    hf = write_llada_dir(tmp_path / "hf", tokenizer, weights=weights, shards=2)
    model, tok, _ = load_llada(hf)
    out = export_llada(model, tok, tmp_path / "again")
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    raw = json.loads((out / "config.json").read_text())
    assert (raw["embedding_size"], raw["mask_token_id"], raw["eos_token_id"]) == (ROWS, 300, 0)
    assert "mask_row" not in raw["lldiff"]


def test_export_command(tmp_path, tokenizer, capsys):
    from lldiff.cli import main

    ckpt = write_lldiff_run(tmp_path / "run", tiny("bidirectional"), tokenizer)
    main(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf"), "--max-shard-gb", "0.0001"])
    assert "llada format" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    with pytest.raises(SystemExit):  # not empty any more
        main(["export", str(ckpt), "--to", "hf", str(tmp_path / "hf")])
    assert "not empty" in capsys.readouterr().err


# -- bad input: a clear message before any weight is read ---------------------------------------
@pytest.fixture
def no_weight_reads(monkeypatch):
    from lldiff.interop import safetensors_io

    def refuse(self, name):
        raise AssertionError(f"read {name} before the directory was checked")

    monkeypatch.setattr(safetensors_io.TensorReader, "get", refuse)


BAD_CONFIGS = [
    ({"model_type": "llama"}, "model_type='llama' is not a LLaDA config"),
    ({"include_bias": True}, "include_bias=True means linear layers with biases"),
    ({"weight_tying": True}, "weight_tying=True means an LM head tied to the embedding"),
    ({"layer_norm_type": "default"}, "layer_norm_type='default'"),
    ({"layer_norm_type": None}, "layer_norm_type=None means a norm other than RMSNorm (upstream's default"),
    ({"activation_type": "swiglu"}, "activation_type='swiglu' means an activation other than SiLU"),
    ({"block_type": None}, "block_type=None means a block type other than llama"),
    ({"mask_token_id": ROWS}, "mask_token_id=320 must be an id in [0, 320)"),
    ({"n_heads": 5}, "d_model=64 is not divisible by n_heads=5"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_bad_configs_are_refused(tmp_path, tokenizer, no_weight_reads, change, message):
    hf = write_llada_dir(tmp_path / "hf", tokenizer, weights=llada_weights(llada_config()))
    (hf / "config.json").write_text(json.dumps(llada_config(**change)))
    with pytest.raises(ValueError) as error:
        load_llada(hf)
    assert message in str(error.value)


def test_missing_config_weights_and_shards(tmp_path, tokenizer, no_weight_reads):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_llada(empty)
    (empty / "config.json").write_text(json.dumps(llada_config()))
    with pytest.raises(FileNotFoundError, match="holds no weights: neither model.safetensors"):
        load_llada(empty)
    hf = write_llada_dir(tmp_path / "hf", tokenizer, shards=3)
    (hf / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing from .*: model-00002-of-00003.safetensors"):
        load_llada(hf)
    with pytest.raises(FileNotFoundError):
        load_llada(tmp_path / "nowhere")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, tokenizer, no_weight_reads):
    weights = llada_weights(llada_config())
    weights[f"{P}blocks.1.k_proj.weight"] = torch.zeros(64, 64)  # MHA-sized k in a GQA config
    hf = write_llada_dir(tmp_path / "hf", tokenizer, weights=weights)
    with pytest.raises(ValueError, match=r"tensor model\.transformer\.blocks\.1\.k_proj\.weight has shape "
                                         r"\[64, 64\] but config\.json implies \[32, 64\]"):
        load_llada(hf)


def test_biases_and_missing_tensors_are_named(tmp_path, tokenizer, no_weight_reads):
    weights = llada_weights(llada_config())
    weights[f"{P}blocks.0.q_proj.bias"] = torch.zeros(64)
    hf = write_llada_dir(tmp_path / "a", tokenizer, weights=weights)
    with pytest.raises(ValueError, match=r"cannot map .*blocks\.0\.q_proj\.bias"):
        load_llada(hf)
    weights = llada_weights(llada_config())
    del weights[f"{P}ln_f.weight"]
    hf = write_llada_dir(tmp_path / "b", tokenizer, weights=weights)
    with pytest.raises(ValueError, match=r"lack 1 tensor.*ln_f\.weight"):
        load_llada(hf)


def test_import_command_reports_one_line(tmp_path, capsys):
    from lldiff.cli import main

    (tmp_path / "hf").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["import", "llada", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- LLaDA-Instruct's chat template and fine-tuning an imported LLaDA ----------------------------
def hf_token_ids(backend_json: str, text: str) -> list[int]:
    """What ``transformers`` does with a rendered chat: special-token names in the text match."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(backend_json)
    backend.encode_special_tokens = False
    return backend.encode(text, add_special_tokens=False).ids


def test_llada_template_encodes_as_the_jinja_rendering(tmp_path, tokenizer):
    """Prompts rendered by lldiff's copy of LLaDA-Instruct's template are the ids of the Jinja
    template rendered and tokenised the way transformers does (an independent path)."""
    import jinja2

    from lldiff.data.chat import Message, saved_template
    from lldiff.data.sft import encode_prompt
    from lldiff.data.tokenizer import Tokenizer

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    import_llada(hf, tmp_path / "run")
    tok = Tokenizer.from_file(tmp_path / "run" / "tokenizer.json")
    template = saved_template(tmp_path / "run")
    history = [Message("system", "be brief."), Message("user", "the quick brown fox?"),
               Message("assistant", "jumps over."), Message("user", "and the lazy dog?")]
    rendered = jinja2.Template(LLADA_JINJA).render(messages=[m.__dict__ for m in history], bos_token="<|bos|>",
                                                   add_generation_prompt=True)
    ids = encode_prompt(tok, template, history)
    assert ids == hf_token_ids(tok.to_json(), rendered)
    assert ids[0] == tok.bos_id and ids.count(301) == 4 and ids.count(302) == 5  # BOS, 4 eot, 5 headers


def test_special_token_names_in_messages_stay_text(tmp_path, tokenizer):
    from lldiff.data.chat import LLADA, Message
    from lldiff.data.sft import encode_prompt

    loaded = load_model(write_llada_dir(tmp_path / "hf", tokenizer))
    template = LLADA.__class__(**{**LLADA.to_dict(), "begin": "<|bos|>"})
    ids = encode_prompt(loaded.tokenizer, template, [Message("user", "say <|eot_id|> now")])
    assert ids.count(301) == 1  # only the template's own end of turn, not the one the user typed
    with pytest.raises(ValueError, match=r"names \['<\|startoftext\|>'\], which the tokenizer does not have"):
        encode_prompt(loaded.tokenizer, LLADA, [Message("user", "hi")])  # LLaDA-8B's BOS name: not in this one


def test_sft_from_an_imported_llada_keeps_its_mask_and_template(tmp_path, tokenizer):
    """Fine-tune an imported LLaDA: the mask stays inside the vocabulary, rows follow LLaDA's
    SFT layout (BOS, header-wrapped prompt, response, <|eot_id|>, EOS padding), and the
    fine-tuned run chats with the same template."""
    import io

    from lldiff.chat import main as chat_main
    from lldiff.data.sft_datamodule import SFTDataModule
    from lldiff.launch import lightning_cli

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    import_llada(hf, tmp_path / "run")
    records = [{"prompt": t[:14], "response": t[14:30]} for t in TEXTS[:16]]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = SFTDataModule([str(data)], str(tmp_path / "run"), val_fraction=0.0, max_length=64, batch_size=4)
    dm.setup("fit")
    example = dm.train_examples[0]
    assert example.prompt[0] == 1 and example.prompt[1] == 302  # BOS, then <|start_header_id|>
    assert example.response[-2:] == (301, 0)  # ... <|eot_id|> EOS
    cli = lightning_cli([
        "fit", "--seed_everything", "1", "--model", "lldiff.objectives.mdm.modules.MaskedDiffusionSFT",
        "--model.init_args.init_from", str(tmp_path / "run" / "checkpoints" / "imported.ckpt"),
        "--model.init_args.warmup_steps", "1", "--model.init_args.val_mc_samples", "2",
        "--data", "lldiff.data.SFTDataModule", "--data.init_args.train_files", f"[{data}]",
        "--data.init_args.tokenizer_path", str(tmp_path / "run"), "--data.init_args.max_length", "64",
        "--data.init_args.batch_size", "4", "--data.init_args.val_fraction", "0.25",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "out"),
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "out"), "--trainer.logger.init_args.name", "sft",
        "--trainer.logger.init_args.version", "",
    ])
    assert cli.trainer.global_step == 3
    assert (cli.model.config.mask_id, cli.model.config.vocab_size) == (300, ROWS)
    ckpt = tmp_path / "out" / "sft" / "checkpoints" / "last.ckpt"
    loaded = load_model(ckpt)
    assert (loaded.config.mask_id, loaded.tokenizer.mask_id, loaded.tokenizer.eot_id) == (300, 300, 301)
    assert json.loads((ckpt.parent.parent / "chat_template.json").read_text())["template"]["close_response"]
    out = io.StringIO()
    chat_main(["--ckpt", str(ckpt), "--message", "the quick brown", "--length", "8"], stdin=io.StringIO(""),
              stdout=out)
    assert len(out.getvalue().splitlines()) == 1


def test_chat_on_a_llada_directory_uses_its_template(tmp_path, tokenizer):
    import io

    from lldiff.chat import main as chat_main, run_template

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    template = run_template(hf)
    assert template.begin == "<|bos|>" and template.close_response
    out = io.StringIO()
    chat_main(["--ckpt", str(hf), "--message", "the quick brown", "--length", "8"], stdin=io.StringIO(""), stdout=out)
    assert len(out.getvalue().splitlines()) == 1


def test_an_imported_llada_scores_through_the_lm_eval_adapter(tmp_path, tokenizer):
    """A one-token continuation's MDM lower bound is exact (its only masking is the whole answer):
    log softmax of the SPEC §13 reference forward over [BOS] + context + [mask], at the mask."""
    pytest.importorskip("lm_eval")
    from lldiff.evaluation.lm_eval_adapter import LLDiffLM

    raw, weights = llada_config(), llada_weights(llada_config())
    hf = write_llada_dir(tmp_path / "hf", tokenizer, raw, weights)
    lm = LLDiffLM(ckpt=str(hf), n_mc=4, batch_size=4)
    (answer_id,) = lm.tok.encode(" sea")

    class Request:
        args = ("she sells sea shells on the", " sea")

    (loglik, greedy), = lm.loglikelihood([Request()])
    ids = torch.tensor([[lm.tok.bos_id, *lm.tok.encode(Request.args[0]), raw["mask_token_id"]]])
    with torch.no_grad():
        expected = torch.log_softmax(reference_forward(weights, raw, ids)[0, -1], dim=-1)[answer_id]
    assert loglik == pytest.approx(float(expected), abs=1e-4)
    assert isinstance(greedy, bool)


def test_sft_from_a_bf16_import_assigns_the_stored_tensors_then_trains_in_float32(tmp_path, tokenizer, monkeypatch):
    """No random initialisation and no full-size float32 copy at construction: the backbone is
    built on the meta device and the (memory-mapped) bf16 tensors are assigned; the run's
    configure_model then gives them the training dtype (float32 master weights under 32-true /
    bf16-mixed)."""
    import lightning as L

    from lldiff.data.sft_datamodule import SFTDataModule
    from lldiff.objectives.mdm.modules import MaskedDiffusionSFT

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    ckpt = import_llada(hf, tmp_path / "run", dtype=torch.bfloat16)
    stored = {k[len("model."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    touched = []
    real_normal = torch.nn.init.normal_
    def recording_normal(tensor, *args, **kwargs):
        touched.append(tensor.device.type)
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording_normal)
    module = MaskedDiffusionSFT(init_from=str(ckpt), vocab_size=ROWS, warmup_steps=1)
    assert touched and set(touched) == {"meta"}  # the random initialisation ran on no real memory
    for name, value in module.model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, stored[name]), name
    records = [{"prompt": t[:14], "response": t[14:30]} for t in TEXTS[:8]]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    seen = {}

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[FirstWeights()],
              precision="32-true").fit(
        module, SFTDataModule([str(data)], str(tmp_path / "run"), val_fraction=0.0, max_length=48, batch_size=4))
    for name, value in seen.items():
        assert value.dtype == torch.float32 and torch.equal(value, stored[name].float()), name
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


FSDP2_LOAD_SCRIPT = """
import json, sys, warnings
import lightning as L, torch
from lldiff.data.sft_datamodule import SFTDataModule
from lldiff.finetune import MaskedDiffusionSFT
warnings.filterwarnings("ignore")
ckpt, run, data, out = sys.argv[1:5]
stored = {k[len("model."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
found = {}

class Shards(L.Callback):
    def on_train_start(self, trainer, pl_module):
        rank, world = trainer.global_rank, trainer.world_size
        for name, param in pl_module.model.named_parameters():
            clean = name.replace("_checkpoint_wrapped_module.", "")
            local = param.to_local()
            rows = stored[clean].chunk(world, dim=0)
            expected = rows[rank].float() if rank < len(rows) else stored[clean][:0].float()
            found[clean] = [str(local.dtype), bool(torch.equal(local[:expected.shape[0]], expected))]

model = MaskedDiffusionSFT(init_from=ckpt, vocab_size=int(sys.argv[5]), warmup_steps=1)
L.seed_everything(0, verbose=False)
fit = L.Trainer(accelerator="cpu", devices=2, strategy="fsdp2_ac", precision="bf16-mixed", max_steps=2, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                callbacks=[Shards()])
fit.fit(model, SFTDataModule([data], run, val_fraction=0.0, max_length=48, batch_size=4))
json.dump(found, open(out + f"/rank{fit.global_rank}.json", "w"))
"""


def test_fsdp2_fine_tuning_of_a_bf16_import_holds_float32_shards_of_the_stored_weights(tmp_path, tokenizer):
    """Two CPU processes, fsdp2_ac, bf16-mixed: each rank's shard of every parameter is float32
    and equals its rows of the stored bf16 weights when training starts."""
    import subprocess
    import sys

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    ckpt = import_llada(hf, tmp_path / "run", dtype=torch.bfloat16)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:14], "response": t[14:30]}) + "\n" for t in TEXTS[:16]))
    script = tmp_path / "fsdp2_load.py"
    script.write_text(FSDP2_LOAD_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(ckpt), str(tmp_path / "run"), str(data), str(tmp_path), str(ROWS)],
                            check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(found) == 3 + 6 * SHAPE["n_layers"]  # embed, norm, head; per block 2 norms and 4 (fused) matrices
        assert all(v == ["torch.float32", True] for v in found.values()), found


@pytest.mark.parametrize("config", ["sft-llada-8b.yaml", "sft-llada-8b-lora.yaml"])
def test_the_llada_8b_sft_configs_run_on_a_tiny_import(config, tmp_path, tokenizer):
    """The GPU-node configs as shipped (strategy fsdp2_ac, their precision, the saved LLaDA
    template), on one CPU process with the tiny import in place of LLaDA-8B."""
    from lldiff.launch import lightning_cli

    REPO = Path(__file__).parents[1]
    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    ckpt = import_llada(hf, tmp_path / "run", dtype=torch.bfloat16)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:14], "response": t[14:30]}) + "\n" for t in TEXTS[:24]))
    args = [
        "fit", "--config", str(REPO / "configs" / config), "--model.init_args.init_from", str(ckpt),
        "--data.init_args.tokenizer_path", str(tmp_path / "run"), "--data.init_args.train_files", f"[{data}]",
        "--data.init_args.max_length", "48", "--data.init_args.num_workers", "0", "--data.init_args.val_fraction", "0.2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval", "2",
        "--model.init_args.warmup_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "out"),
    ]
    try:
        cli = lightning_cli(args)
    finally:  # fsdp2_ac in this process: its process group must not outlive the test
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert cli.trainer.global_step == 2
    name = config.removesuffix(".yaml")
    loaded = load_model(tmp_path / "out" / name / "checkpoints" / "last.ckpt")
    assert (loaded.config.mask_id, loaded.config.vocab_size, loaded.tokenizer.bos_id) == (300, ROWS, 1)


def test_init_from_a_hugging_face_directory_says_to_import_it(tmp_path, tokenizer):
    from lldiff.objectives.mdm.modules import MaskedDiffusionSFT

    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    with pytest.raises(ValueError, match=r"is a Hugging Face directory; import it first: lldiff import llada"):
        MaskedDiffusionSFT(init_from=str(hf), vocab_size=ROWS)


def test_exporting_an_import_keeps_its_chat_template(tmp_path, tokenizer):
    """LLaDA-Instruct's Jinja template survives import -> export (from the run and from the
    directory itself), where transformers' apply_chat_template reads it."""
    hf = write_llada_dir(tmp_path / "hf", tokenizer)
    ckpt = import_llada(hf, tmp_path / "run")
    for source, out in ((ckpt, tmp_path / "from-run"), (hf, tmp_path / "from-dir")):
        export_hf(source, out)
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == LLADA_JINJA
