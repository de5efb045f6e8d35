"""LLaDA checkpoints (Hugging Face format, SPEC §13) into lldiff's backbone, and back out.

Reading (:func:`load_llada`; ``lldiff import llada HF_DIR --out RUN_DIR`` is
:func:`lldiff.convert.import_llada`):

* ``config.json`` is checked first (``model_type`` llada, no biases, untied head, RoPE,
  RMSNorm, SwiGLU, no q/k norm, no logit scaling), then every tensor's name and shape from
  the safetensors headers (one file or shards named by the index): a mismatch names the
  tensor and both shapes. Only then are weights read.
* The backbone is built on the meta device and the weights are read by safetensors straight
  onto their device in their final dtype and assigned (``load_state_dict(assign=True)``):
  no random initialisation and no fp32 copy of an 8B model on the CPU first.
* Names: ``model.transformer.wte`` -> ``embed``; per block ``q_proj, k_proj, v_proj`` are
  concatenated along the output dim into ``attn.qkv`` in that order (lldiff splits the fused
  output as ``[q (H*hd) | k (Hkv*hd) | v (Hkv*hd)]``), ``attn_out`` -> ``attn.proj``,
  ``ff_proj, up_proj`` are concatenated into ``mlp.gate_up`` in that order (lldiff chunks it
  as ``(gate, up)`` and computes ``proj(silu(gate) * up)``, LLaDA ``ff_out(silu(ff_proj x) *
  up_proj x)``), ``ff_out`` -> ``mlp.proj``, ``attn_norm``/``ff_norm`` -> ``attn_norm``/
  ``mlp_norm``, ``ln_f`` -> ``norm``, ``model.transformer.ff_out`` -> ``head``. We keep
  lldiff's fused layout (one matmul each for q/k/v and gate/up: the layout training,
  FSDP2 wrapping and every checkpoint already use); the concatenation costs one layer's
  projection copy at load time.
* RoPE: lldiff's :func:`lldiff.model.apply_rope` rotates pairs ``(i, i + hd/2)`` with
  ``inv_freq_i = base^(-2i/hd)`` tables repeated over both halves: the rotate-half layout
  LLaDA (and Llama in transformers) use, so q/k rows are NOT permuted.
* The mask id lies inside the vocabulary (``mask_token_id`` 126336 of 126464): the
  ``ModelConfig`` has ``mask_id < vocab_size``, no extra embedding row, and the head has a
  logit for it, which the samplers suppress (they drop ``mask_id``'s logit whenever it is
  below the head's width). Attention is bidirectional.
* The tokenizer is the directory's ``tokenizer.json`` with the ids of ``config.json``
  (EOS ``eos_token_id``, pad ``pad_token_id``), BOS from ``tokenizer_config.json`` and the
  end-of-turn ``<|eot_id|>``; they are written beside it as ``special_ids.json``.

Writing (:func:`export_llada`): the inverse map, with a ``config.json`` carrying LLaDA's own
fields and an ``auto_map`` naming ``configuration_llada.LLaDAConfig`` /
``modeling_llada.LLaDAModelLM`` (copy those two files from GSAI-ML/LLaDA-8B-Base next to it;
lldiff ships no copy). An lldiff MDM's mask token is an extra embedding row with no logit;
in LLaDA's layout it becomes the last vocabulary id with a zero head row, and
``config.json["lldiff"]`` records that (and a BD3 model's block attention, which LLaDA's
code would run as full attention), so that importing the export gives back the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from lldiff import registry as objectives
from lldiff.config import ModelConfig
from lldiff.interop.common import unfused_block, write_tokenizer_files
from lldiff.interop.safetensors_io import TensorReader, all_shapes, describe, weight_files, write_safetensors
from lldiff.model import Transformer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PREFIX = "model.transformer."
EOT_TOKEN = "<|eot_id|>"
MODEL_TYPE = "llada"
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}
MARKER = "lldiff"  # config.json key of what an lldiff export adds (mask row, attention kind)

# config.json fields whose value lldiff's backbone cannot represent: (field, value accepted, why)
_REQUIRED_VALUES = (
    ("include_bias", (False, None), "linear layers with biases"),
    ("include_qkv_bias", (False, None), "q/k/v biases"),
    ("bias_for_layer_norm", (False, None), "norm biases"),
    # upstream's defaults for these are not LLaDA-8B's (tied head, no RoPE, a fused "sequential"
    # block, mean-centred LayerNorm, the halving "swiglu" activation): they must be stated
    ("weight_tying", (False,), "an LM head tied to the embedding (upstream's default when absent)"),
    ("rope", (True,), "no RoPE (upstream's default when absent)"),
    ("alibi", (False, None), "ALiBi position biases"),
    ("block_type", ("llama",), "a block type other than llama (upstream's default when absent: sequential)"),
    ("layer_norm_type", ("rms",), "a norm other than RMSNorm (upstream's default when absent: LayerNorm)"),
    ("layer_norm_with_affine", (True, None), "norms without weights"),
    ("activation_type", ("silu",), "an activation other than SiLU (upstream's default when absent: swiglu, "
     "which halves ff_proj's output)"),
    ("attention_layer_norm", (False, None), "q/k layer norms"),
    ("input_emb_norm", (False, None), "a norm on the input embedding"),
    ("scale_logits", (False, None), "scaled logits"),
    ("clip_qkv", (None,), "clipped q/k/v"),
)


@dataclasses.dataclass
class LLaDADirectory:
    """A checked LLaDA directory: its model shape, weight files and tokenizer ids (no weights read)."""

    path: Path
    raw: dict[str, Any]
    config: ModelConfig
    files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]
    head_rows: int  # rows of wte/ff_out on disk (config.vocab_size, plus 1 for an lldiff export's mask row)


# -- config ------------------------------------------------------------------------------------
def _int(raw: dict[str, Any], key: str, where: Path, default: Any = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def model_config(raw: dict[str, Any], where: Path) -> tuple[ModelConfig, int]:
    """The ``ModelConfig`` of a LLaDA ``config.json`` and the rows of its embedding/head."""
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{where}: model_type={model_type!r} is not a LLaDA config (expected {MODEL_TYPE!r}); "
                         "lldiff import llada reads LLaDA checkpoints only")
    for key, accepted, what in _REQUIRED_VALUES:
        if raw.get(key) not in accepted:
            allowed = " or ".join(repr(a) for a in accepted if a is not None) or "null"
            raise ValueError(f"{where}: {key}={raw.get(key)!r} means {what}, which lldiff's backbone (no biases, "
                             f"untied head, RoPE, RMSNorm, SwiGLU) cannot map; expected {allowed}")
    d_model = _int(raw, "d_model", where)
    n_heads = _int(raw, "n_heads", where)
    n_kv_heads = 1 if raw.get("multi_query_attention") else _int(raw, "n_kv_heads", where, n_heads)
    d_ff = raw.get("mlp_hidden_size") or _int(raw, "mlp_ratio", where, 4) * d_model
    rows = _int(raw, "embedding_size", where, raw.get("vocab_size"))
    vocab = _int(raw, "vocab_size", where, rows)
    if vocab > rows:
        raise ValueError(f"{where}: vocab_size={vocab} exceeds embedding_size={rows}")
    mask_id = raw.get("mask_token_id")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < rows:
        raise ValueError(f"{where}: mask_token_id={mask_id!r} must be an id in [0, {rows}) (LLaDA-8B: 126336)")
    for key in ("rope_theta", "rms_norm_eps"):  # NaN or 0 here gives empty generations, not an error
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{where}: {key}={value!r} must be a finite number > 0")
    marker = raw.get(MARKER) or {}
    fields: dict[str, Any] = dict(
        name=str(raw.get("name_or_path") or raw.get("_name_or_path") or "llada-import"),
        n_layer=_int(raw, "n_layers", where), d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_ff=_int({"d_ff": d_ff}, "d_ff", where), vocab_size=rows,
        max_seq_len=_int(raw, "max_sequence_length", where, 4096),
        rope_base=float(raw.get("rope_theta", 10_000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        attention="bidirectional", mask_id=mask_id,
    )
    if marker.get("mask_row") == "extra":  # an lldiff export: the last row is lldiff's mask token, no logit
        if mask_id != rows - 1:
            raise ValueError(f"{where}: {MARKER}.mask_row='extra' needs mask_token_id={rows - 1}, got {mask_id}")
        fields.update(vocab_size=rows - 1, mask_id=None)
    if marker.get("attention") not in (None, "bidirectional"):
        fields.update(attention=marker["attention"], block_size=marker.get("block_size"))
    if "name" in marker:
        fields["name"] = marker["name"]
    try:
        return ModelConfig(**fields), rows
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def expected_shapes(cfg: ModelConfig, rows: int) -> dict[str, tuple[int, ...]]:
    """LLaDA tensor names and shapes for a backbone of shape ``cfg`` (``rows`` embedding/head rows)."""
    d, hd, kv = cfg.d_model, cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {f"{PREFIX}wte.weight": (rows, d), f"{PREFIX}ln_f.weight": (d,), f"{PREFIX}ff_out.weight": (rows, d)}
    for i in range(cfg.n_layer):
        b = f"{PREFIX}blocks.{i}."
        shapes.update({
            f"{b}q_proj.weight": (cfg.n_heads * hd, d), f"{b}k_proj.weight": (kv, d), f"{b}v_proj.weight": (kv, d),
            f"{b}attn_out.weight": (d, cfg.n_heads * hd), f"{b}ff_proj.weight": (cfg.d_ff, d),
            f"{b}up_proj.weight": (cfg.d_ff, d), f"{b}ff_out.weight": (d, cfg.d_ff),
            f"{b}attn_norm.weight": (d,), f"{b}ff_norm.weight": (d,),
        })
    return shapes


def check_directory(hf_dir: str | Path) -> LLaDADirectory:
    """Check a LLaDA directory completely (config, tensor names and shapes, tokenizer file)
    without reading any weight; every refusal names the file, field or tensor."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"LLaDA checkpoint directory {str(path)!r} does not exist or is not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; a LLaDA checkpoint directory holds {CONFIG_FILE}, "
                                "model.safetensors (or shards + model.safetensors.index.json) and tokenizer.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    cfg, rows = model_config(raw, config_path)
    files = weight_files(path)
    shapes = all_shapes(files)
    expected = expected_shapes(cfg, rows)
    missing, unexpected = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing:
        raise ValueError(f"{path}: weights lack {len(missing)} tensor(s) a {cfg.n_layer}-layer LLaDA needs: "
                         f"{describe(missing)}")
    if unexpected:
        raise ValueError(f"{path}: weights hold {len(unexpected)} tensor(s) lldiff cannot map (biases? more "
                         f"layers than n_layers={cfg.n_layer}?): {describe(unexpected)}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(f"{path}: tensor {name} has shape {list(shapes[name])} but config.json implies "
                             f"{list(shape)} (d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
                             f"n_kv_heads={cfg.kv_heads}, mlp_hidden_size={cfg.d_ff}, embedding_size={rows})")
    return LLaDADirectory(path, raw, cfg, files, shapes, rows)


# -- weights -----------------------------------------------------------------------------------
def llada_to_lldiff(get: Any, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lldiff state dict from a getter of LLaDA tensors (fusing q/k/v and gate/up)."""
    state = {"embed.weight": get(f"{PREFIX}wte.weight"), "norm.weight": get(f"{PREFIX}ln_f.weight")}
    head = get(f"{PREFIX}ff_out.weight")
    state["head.weight"] = head[: cfg.vocab_size].clone() if head.shape[0] != cfg.vocab_size else head
    if cfg.embedding_rows != state["embed.weight"].shape[0]:
        raise ValueError(f"embedding has {state['embed.weight'].shape[0]} rows, the model {cfg.embedding_rows}")
    for i in range(cfg.n_layer):
        b, o = f"{PREFIX}blocks.{i}.", f"blocks.{i}."
        state[f"{o}attn.qkv.weight"] = torch.cat([get(f"{b}q_proj.weight"), get(f"{b}k_proj.weight"),
                                                  get(f"{b}v_proj.weight")], dim=0)
        state[f"{o}attn.proj.weight"] = get(f"{b}attn_out.weight")
        state[f"{o}mlp.gate_up.weight"] = torch.cat([get(f"{b}ff_proj.weight"), get(f"{b}up_proj.weight")], dim=0)
        state[f"{o}mlp.proj.weight"] = get(f"{b}ff_out.weight")
        state[f"{o}attn_norm.weight"] = get(f"{b}attn_norm.weight")
        state[f"{o}mlp_norm.weight"] = get(f"{b}ff_norm.weight")
    return state


def lldiff_to_llada(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LLaDA tensors from an lldiff state dict (splitting the fused projections; an extra-row
    mask token gets a zero head row so the head covers every embedding row)."""
    head = state["head.weight"]
    if cfg.embedding_rows > cfg.vocab_size:
        head = torch.cat([head, head.new_zeros(cfg.embedding_rows - cfg.vocab_size, cfg.d_model)], dim=0)
    out = {f"{PREFIX}wte.weight": state["embed.weight"], f"{PREFIX}ln_f.weight": state["norm.weight"],
           f"{PREFIX}ff_out.weight": head}
    for i in range(cfg.n_layer):
        out.update({f"{PREFIX}blocks.{i}.{LLADA_BLOCK_NAMES[piece]}.weight": tensor
                    for piece, tensor in unfused_block(state, cfg, i).items()})
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


LLADA_BLOCK_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj",
                     "down": "ff_out", "attn_norm": "attn_norm", "mlp_norm": "ff_norm"}


def build_on_meta(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """The backbone with ``state`` assigned as its parameters (built on the meta device: no
    allocation or initialisation of its own), RoPE tables computed on the weights' device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope(state["embed.weight"].device)
    return model


def load_llada(hf_dir: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Any, LLaDADirectory]:
    """``(model in eval mode, tokenizer, directory)`` of a LLaDA directory; weights keep their
    stored dtype unless ``dtype`` is given. Everything is checked before any weight is read."""
    directory = check_directory(hf_dir)
    tokenizer = read_tokenizer(directory)
    with TensorReader(directory.files, device=device, dtype=dtype) as reader:
        state = llada_to_lldiff(reader.get, directory.config)
    model = build_on_meta(directory.config, state)
    model.objective = objectives.get("mdm")  # LLaDA: masked diffusion, whatever its attention flag
    return model.eval(), tokenizer, directory


# -- tokenizer ---------------------------------------------------------------------------------
def read_tokenizer(directory: LLaDADirectory) -> Any:
    """The directory's ``tokenizer.json`` with LLaDA's special ids (lldiff's own convention
    when it is an lldiff export)."""
    from tokenizers import Tokenizer as Backend

    from lldiff.data.tokenizer import Tokenizer

    path = directory.path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory.path} has no {TOKENIZER_FILE} (the tokenizer the weights were trained "
                                "with); lldiff reads only the fast-tokenizer JSON")
    origin = f"tokenizer {str(path)!r}"
    backend = Backend.from_file(str(path))
    cfg, raw = directory.config, directory.raw
    if (raw.get(MARKER) or {}).get("mask_row") == "extra":
        tokenizer = Tokenizer(backend, origin=origin)
    else:
        extra = {}
        config_file = directory.path / "tokenizer_config.json"
        if config_file.is_file():
            extra = json.loads(config_file.read_text())

        def token_id(key: str) -> int | None:
            token = extra.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(token) if isinstance(token, str) else None

        eos = raw.get("eos_token_id")
        eos = eos if isinstance(eos, int) else token_id("eos_token")
        if eos is None:
            raise ValueError(f"{directory.path}: no eos_token_id in config.json and no eos_token in "
                             "tokenizer_config.json; lldiff needs the EOS id")
        bos = raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else token_id("bos_token")
        pad = raw.get("pad_token_id") if isinstance(raw.get("pad_token_id"), int) else eos
        ids = {"vocab_size": cfg.vocab_size, "mask_id": cfg.mask_id, "eos_id": eos, "bos_id": bos, "pad_id": pad,
               "eot_id": backend.token_to_id(EOT_TOKEN)}
        tokenizer = Tokenizer(backend, origin=origin, special_ids=ids)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{origin} has {tokenizer.vocab_size} real tokens but the model has "
                         f"vocab_size={cfg.vocab_size}")
    return tokenizer


def chat_template(directory: Path) -> dict[str, Any] | None:
    """LLaDA-Instruct's chat template: the Jinja text of ``tokenizer_config.json`` and, when it
    is the Llama-3-style header template, lldiff's :class:`~lldiff.data.chat.ChatTemplate` for it
    (``template``: per-role patterns, the BOS token first, each response closed by ``<|eot_id|>``)."""
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    jinja = config.get("chat_template")
    if not isinstance(jinja, str):
        return None
    out: dict[str, Any] = {"jinja": jinja}
    if "<|start_header_id|>" in jinja and EOT_TOKEN in jinja:
        template: dict[str, Any] = {role: f"<|start_header_id|>{role}<|end_header_id|>\n\n{{content}}{EOT_TOKEN}"
                                    for role in ("system", "user", "assistant")}
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        if "bos_token" in jinja and isinstance(bos, str):
            template["begin"] = bos
        template["close_response"] = True
        out["template"] = template
    return out


# -- export ------------------------------------------------------------------------------------
def llada_config(cfg: ModelConfig, tokenizer: Any, dtype: torch.dtype) -> dict[str, Any]:
    """LLaDA's ``config.json`` for a backbone of shape ``cfg``."""
    rows = cfg.embedding_rows
    eos = tokenizer.eos_id if tokenizer is not None else None
    raw: dict[str, Any] = {
        "architectures": ["LLaDAModelLM"], "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
        "block_group_size": 1, "block_type": "llama", "d_model": cfg.d_model, "embedding_dropout": 0.0,
        "embedding_size": rows, "eos_token_id": eos, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
        "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": cfg.mask_id, "max_sequence_length": cfg.max_seq_len, "mlp_hidden_size": cfg.d_ff,
        "mlp_ratio": max(1, cfg.d_ff // cfg.d_model), "multi_query_attention": None, "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.kv_heads, "n_layers": cfg.n_layer,
        "pad_token_id": tokenizer.pad_id if tokenizer is not None else eos,
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": cfg.norm_eps, "rope": True,
        "rope_full_precision": True, "rope_theta": cfg.rope_base, "scale_logits": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": False, "vocab_size": rows,
        "weight_tying": False, "tie_word_embeddings": False,
    }
    if tokenizer is not None and tokenizer.bos_id is not None:
        raw["bos_token_id"] = tokenizer.bos_id
    marker: dict[str, Any] = {"name": cfg.name}
    if cfg.embedding_rows > cfg.vocab_size:
        marker["mask_row"] = "extra"
    if not cfg.full_attention:
        marker.update(attention=cfg.attention, block_size=cfg.block_size)
    raw[MARKER] = marker
    return raw


def export_llada(model: Transformer, tokenizer: Any, out: str | Path, *, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` (a mask-token backbone: MDM or BD3) as a LLaDA-format directory."""
    out = Path(out)
    cfg = model.cfg
    if cfg.mask_id is None:
        raise ValueError("a LLaDA-format export needs a model with a mask token (MDM, BD3); export an AR model "
                         "as Llama (lldiff export CKPT --to hf chooses by objective)")
    state = {k: v for k, v in model.state_dict().items()}
    tensors = lldiff_to_llada(state, cfg)
    dtype = state["embed.weight"].dtype
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, max_shard_bytes=max_shard_bytes)
    (out / CONFIG_FILE).write_text(json.dumps(llada_config(cfg, tokenizer, dtype), indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, max_len=cfg.max_seq_len)
    return out
