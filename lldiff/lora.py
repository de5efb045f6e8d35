"""LoRA adapters on the backbone's Linear layers, for fine-tuning a large model on one GPU.

:func:`apply_lora` puts low-rank adapters on a :class:`lldiff.model.Transformer` in place
through peft's low-level ``inject_adapter_in_model`` (no ``PeftModel`` wrapper, no
transformers model): each targeted ``nn.Linear`` becomes a peft ``lora.Linear`` whose output
is ``W x + (alpha / r) B A dropout(x)``, with ``A`` (r, in) random and ``B`` (out, r) zero,
so the adapted model starts out computing exactly the base model. Every other parameter is
frozen. State-dict keys become ``...qkv.base_layer.weight``, ``...qkv.lora_A.default.weight``
and ``...qkv.lora_B.default.weight``; :func:`merge_lora_state_dict` (plain torch, no peft)
folds them back into the plain backbone's ``...qkv.weight = W + (alpha / r) B @ A``, which
is how :func:`lldiff.checkpoint.load_model` reads a LoRA fine-tuning checkpoint.

The backbone's projections are fused: ``attn.qkv`` holds q, k and v and ``mlp.gate_up`` the
SwiGLU gate and up projections, so one adapter of rank r there is a rank-r update of all of
them together (HF LLaMA/LLaDA recipes put a rank-r adapter on each of q_proj, k_proj,
v_proj: rank up to 3r over the three, with 6 d r parameters instead of 4 d r).

Precision: the fine-tuning modules keep the adapters in float32 when Lightning converts the
module to 16 bits (``bf16-true``: :func:`fp32_snapshot` / :func:`fp32_restorer` in their
``_apply``), as peft's own ``PeftModel`` does; peft casts each adapter's input to float32 and
its output back to the base layer's dtype.

peft is an optional dependency (``pip install 'lldiff[lora]'``), imported only when
adapters are applied.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

ADAPTER = "default"  # peft's adapter name, part of the state-dict keys

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.proj")
"""The Linear layers of each transformer block (model.Block), by their names inside it: the
LoRA targets."""
LINEAR_NAMES = (*BLOCK_LINEARS, "head")
"""Every Linear layer of the backbone. The LM head is not a target: the training losses read
its weight directly (``Transformer.forward(readout=...)``, :mod:`lldiff.losses`), which would
bypass an adapter there."""
DEFAULT_TARGETS = BLOCK_LINEARS

INSTALL_HINT = "pip install 'lldiff[lora]'"


@dataclass(frozen=True)
class LoraOptions:
    """LoRA settings (``model.init_args.lora`` of the fine-tuning modules).

    The defaults are the usual LLaMA-family recipe (QLoRA, Alpaca-LoRA and most 7-8B
    instruction-tuning setups): adapters on every attention and MLP projection (QLoRA's
    finding: adapting all linear layers, not only q and v, is what matches full
    fine-tuning, and then the rank matters little), r=16, alpha=2r=32 (a scale
    alpha/r = 2 on the update) and dropout 0.05 on the adapters' input.

    Args:
        r: adapter rank (a positive integer).
        alpha: the update is scaled by ``alpha / r`` (a positive number).
        dropout: dropout probability on the adapters' input, in [0, 1).
        target_modules: which Linear layers of every block get adapters, by their names
            inside the block: ``attn.qkv``, ``attn.proj``, ``mlp.gate_up``, ``mlp.proj``.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r={self.r!r}: the rank must be a positive integer (e.g. 16)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r}: must be a positive number (the update is scaled by alpha / r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout!r}: must be a probability in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"lora.target_modules={targets!r}: give a non-empty list of the blocks' Linear "
                             f"layers among {', '.join(BLOCK_LINEARS)}")
        if "head" in targets:
            raise ValueError("lora.target_modules: 'head' (the LM head) cannot take an adapter: the training losses "
                             "read its weight directly (chunked readout, lldiff.losses), bypassing one; targets are "
                             f"{', '.join(BLOCK_LINEARS)}")
        unknown = [t for t in targets if t not in LINEAR_NAMES]
        if unknown:
            raise ValueError(f"lora.target_modules: {', '.join(map(repr, unknown))} "
                             f"{'is not a Linear layer' if len(unknown) == 1 else 'are not Linear layers'} of the "
                             f"blocks; their Linear layers are {', '.join(BLOCK_LINEARS)} (names inside a block)")
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora.target_modules={list(targets)!r} names a layer twice")
        object.__setattr__(self, "target_modules", tuple(targets))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        """The factor ``alpha / r`` of the low-rank update."""
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, options: dict[str, Any] | LoraOptions) -> LoraOptions:
        """Options from a YAML/CLI mapping (``{}``: every default); unknown keys are refused."""
        if isinstance(options, LoraOptions):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"lora={options!r}: give a mapping such as {{r: 16, alpha: 32}} ({{}} for the defaults) "
                             "or null for full fine-tuning")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"lora option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                             f"unknown; allowed: {', '.join(allowed)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for a checkpoint's ``lldiff`` extras, read with ``weights_only``)."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


def require_peft() -> Any:
    """The peft package, or an ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"LoRA fine-tuning needs the peft package: {INSTALL_HINT} "
                          f"(or pip install 'peft>=0.17'); {error}") from None
    return peft


def lora_options(lora: dict[str, Any] | LoraOptions | None) -> LoraOptions | None:
    """A fine-tuning module's ``lora`` argument checked (None: full fine-tuning), peft's
    presence included, before any weights are read."""
    if lora is None:
        return None
    options = LoraOptions.from_dict(lora)
    require_peft()
    return options


def backbone_linear_names(model: nn.Module) -> list[str]:
    """The Linear layers of a backbone, each block's under its name inside the block
    (``blocks.3.attn.qkv`` -> ``attn.qkv``), in module order, each once."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            short = re.sub(r"^blocks\.\d+\.", "", name)
            if short not in names:
                names.append(short)
    return names


def target_pattern(targets: tuple[str, ...] | list[str]) -> str:
    """peft ``target_modules`` as a regex matched in full against module names: exactly the
    named layers of every block (``attn.proj`` is not ``mlp.proj``, which a plain suffix
    ``proj`` would match too)."""
    return rf"blocks\.\d+\.(?:{'|'.join(re.escape(t) for t in targets)})"


def is_lora_key(name: str) -> bool:
    """A LoRA adapter parameter (``...lora_A.<adapter>.weight`` / ``...lora_B...``)."""
    return ".lora_A." in name or ".lora_B." in name


def is_adapted(model: nn.Module) -> bool:
    return any(is_lora_key(name) for name, _ in model.named_parameters())


def apply_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """Put LoRA adapters on ``model``'s target Linear layers in place (peft's
    ``inject_adapter_in_model``) and freeze every other parameter; returns ``model``.

    Apply it after the pre-trained weights are loaded: the base layers keep them, the
    adapters start at ``B = 0`` (the same function as before). peft creates the adapters in
    the base layers' dtype and device (float32 for a module not yet converted).
    """
    if is_adapted(model):
        raise ValueError("the model already has LoRA adapters")
    peft = require_peft()
    linears = backbone_linear_names(model)
    missing = [t for t in options.target_modules if t not in linears]
    if missing:  # LINEAR_NAMES out of step with model.py
        raise ValueError(f"lora.target_modules {missing} not found; the backbone's Linear layers are {linears}")
    config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                             target_modules=target_pattern(options.target_modules), bias="none",
                             init_lora_weights=True)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_key(name))
    expected = len(getattr(model, "blocks", ())) * len(options.target_modules)
    adapted = sum(1 for name, _ in model.named_parameters() if ".lora_A." in name)
    if adapted != expected:
        raise RuntimeError(f"peft adapted {adapted} layers, expected {expected} for {list(options.target_modules)}")
    return model


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' parameters (the trainable ones after :func:`apply_lora`)."""
    return [(name, p) for name, p in model.named_parameters() if is_lora_key(name)]


def has_lora_keys(state: dict[str, Any]) -> bool:
    return any(is_lora_key(k) for k in state)


def merge_lora_state_dict(state: dict[str, Tensor], *, r: int, alpha: float,
                          adapter: str = ADAPTER) -> dict[str, Tensor]:
    """A plain backbone state dict from a LoRA-adapted one: for each adapted layer ``L``,
    ``L.weight = L.base_layer.weight + (alpha / r) * L.lora_B.<adapter>.weight @
    L.lora_A.<adapter>.weight``, computed in float32 and stored in the base weight's dtype;
    other keys are kept as they are. Pure torch (no peft needed). A state dict without
    adapters is returned unchanged."""
    if not has_lora_keys(state):
        return dict(state)
    scaling = alpha / r
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, value in state.items():
        if is_lora_key(key):
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        plain = f"{prefix}.{leaf}"
        if leaf != "weight":  # a bias (bias="none": the base layer's own, unchanged)
            out[plain] = value
            continue
        a_key, b_key = f"{prefix}.lora_A.{adapter}.weight", f"{prefix}.lora_B.{adapter}.weight"
        if a_key not in state or b_key not in state:
            raise ValueError(f"{key} has no {adapter!r} adapter ({a_key} / {b_key} missing)")
        a, b = state[a_key], state[b_key]
        if a.shape != (r, value.shape[1]) or b.shape != (value.shape[0], r):
            raise ValueError(f"LoRA shapes of {prefix} do not fit r={r} and the weight {tuple(value.shape)}: "
                             f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}")
        merged = value.float() + scaling * (b.float() @ a.float())
        out[plain] = merged.to(value.dtype)
        used.update((a_key, b_key))
    stray = [k for k in state if is_lora_key(k) and k not in used]
    if stray:
        raise ValueError(f"LoRA weights without a base layer (or of another adapter than {adapter!r}): {stray[:3]}")
    return out


def fp32_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' float32 tensors (detached, no copy), taken before a dtype conversion."""
    return {name: p.detach() for name, p in lora_parameters(model) if p.dtype == torch.float32}


def fp32_restorer(model: nn.Module, snapshot: dict[str, Tensor]) -> Callable[[Tensor], Tensor] | None:
    """A function for ``Module._apply`` that gives the adapters a conversion made 16-bit their
    float32 values from ``snapshot`` (exact, not a round trip through 16 bits) and leaves every
    other tensor alone; None when there is nothing to give back."""
    back = {id(p): snapshot[name] for name, p in lora_parameters(model)
            if name in snapshot and p.dtype in (torch.bfloat16, torch.float16)}
    if not back:
        return None
    return lambda t: back[id(t)].to(t.device) if id(t) in back else t
