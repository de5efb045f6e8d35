"""GPU training efficiency, the parts a CPU can check (issue 16): regional compile (decision,
state-dict keys, equal losses and gradients), fused AdamW's choice, no host-device sync in the
training step, pinned batches on CUDA."""

import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import lldiff
from lldiff.config import ModelConfig
from lldiff.loading import loader_options
from lldiff.model import Transformer
from lldiff.objectives.ar.modules import AutoregressiveLM
from lldiff.objectives.mdm.modules import MaskedDiffusionLM
from lldiff.strategies import compile_on
from lldiff.optim import build_optimizer, fused_adamw_supported

from test_training import make_dm, make_module, trainer
from lldiff.objectives.ar.loss import ar_loss
from lldiff.objectives.mdm.loss import mdm_loss

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# -- regional compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("compile,device,expected", [
    (None, CPU, False), (None, CUDA, True), (True, CPU, True), (False, CUDA, False), (True, CUDA, True)])
def test_compile_is_on_by_default_on_cuda_only(compile, device, expected):
    assert compile_on(compile, device) is expected


def test_a_cpu_fit_does_not_compile_by_default_and_an_explicit_one_compiles_each_block(toy_corpus, cache_dir):
    dm = make_dm(toy_corpus, cache_dir)
    module = make_module("ar", dm, warmup_steps=1)
    assert module.hparams.compile is None
    trainer(1).fit(module, dm)
    assert not module.model.blocks_compiled
    compiled = make_module("ar", dm, compile=True)  # compiled in place; nothing traced until called
    assert compiled.model.blocks_compiled
    assert not hasattr(compiled.model, "_orig_mod") and getattr(compiled.model, "_compiled_call_impl", None) is None


def test_compiled_blocks_keep_the_state_dict_keys(toy_corpus, cache_dir):
    """Checkpoints of compiled and plain runs interchange: the same keys, loadable both ways."""
    dm = make_dm(toy_corpus, cache_dir)
    plain, compiled = make_module("mdm", dm), make_module("mdm", dm, compile=True)
    assert list(plain.state_dict()) == list(compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_compiled_blocks_give_the_plain_loss_and_gradients(attention):
    """A 1-layer backbone (compiling takes ~20 s on 2 cores): loss and every weight's gradient
    of the compiled blocks equal the plain model's to 1e-5 (MDM's masked loss / AR's loss, both
    read out in chunks)."""
    vocab = 61
    fields = {"attention": attention, "block_size": None, "mask_id": vocab if attention == "bidirectional" else None}
    cfg = ModelConfig.from_name("tiny-0.1M", vocab_size=vocab, n_layer=1, **fields)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    compiled = Transformer(cfg)
    compiled.load_state_dict(plain.state_dict())
    compiled.compile_blocks()
    plain.loss_chunk_tokens = compiled.loss_chunk_tokens = 48  # the chunked LM-head readout, several chunks
    x = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(1))

    def loss_of(model):
        if attention == "causal":
            return ar_loss(model, x)
        return mdm_loss(model, x[:, 1:], vocab, generator=torch.Generator().manual_seed(2))

    results = []
    for model in (plain, compiled):
        loss = loss_of(model)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert compiled.blocks_compiled and list(plain.state_dict()) == list(compiled.state_dict())
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


# -- fused AdamW ---------------------------------------------------------------------------------
def test_fused_adamw_is_chosen_for_cuda_parameters():
    """The choice, on (fake) CUDA parameters: fused. On the CPU too (one pass per tensor; a
    tiny model's optimizer step measured ~10x faster than the default for-each loop); not for
    parameters the fused kernel cannot take (integer, meta)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cuda = [torch.nn.Parameter(torch.empty(4, 4, device="cuda")), torch.nn.Parameter(torch.empty(4, device="cuda"))]
    assert all(p.device.type == "cuda" for p in on_cuda) and fused_adamw_supported(on_cuda)
    assert fused_adamw_supported([torch.nn.Parameter(torch.empty(2, 2))])
    assert not fused_adamw_supported([torch.nn.Parameter(torch.empty(2, 2, device="meta"))])
    assert not fused_adamw_supported([torch.empty(2, dtype=torch.long)])
    assert not fused_adamw_supported([])


def test_the_built_optimizer_follows_the_choice():
    model = Transformer(ModelConfig.from_name("tiny-0.002M", vocab_size=32, attention="causal", mask_id=None))
    optimizer, _ = build_optimizer(model, max_steps=10, lr=1e-3, min_lr_ratio=0.1, weight_decay=0.1,
                                   betas=(0.9, 0.95))
    assert optimizer.defaults["fused"] is fused_adamw_supported(list(model.parameters())) is True


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_trains_with_gradient_clipping_under_mixed_precision(precision, toy_corpus, cache_dir):
    """Lightning refuses to clip gradients for an optimizer that says it unscales them itself
    (the fused kernel does), under every mixed precision: every bf16-mixed GPU fit, all of
    which clip, stopped at its first step. The optimizer declines, and the fit clips and trains
    (bf16 autocast runs on the CPU too)."""
    dm = make_dm(toy_corpus, cache_dir, batch_size=4, seq_len=16)
    module = make_module("mdm", dm, size="tiny-0.002M")
    fit = trainer(2, precision=precision, gradient_clip_val=1.0)
    fit.fit(module, dm)
    assert fit.global_step == 2 and fit.optimizers[0].defaults["fused"]


# -- no host-device sync in the training step ----------------------------------------------------
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
            "aten::equal", "aten::item", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
            "aten::repeat_interleave"}
"""Ops whose output needs a value read back from the device: ``.item()``, ``float(t)``,
``int(t)``, ``bool(t)`` go through ``_local_scalar_dense``."""
BOOL_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
"""Indexing by a boolean mask (``x[mask]``) counts the mask's True entries on the host."""
PACKAGE = Path(lldiff.__file__).parent


def lldiff_caller() -> str:
    """``module.function`` of the innermost lldiff frame on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if PACKAGE in path.parents:
            return f"{path.stem}.{frame.name}"
    return "(outside lldiff)"


class SyncWatch(TorchDispatchMode):
    """Records every op that reads device memory back to the host, and every ``tolist``,
    ``numpy`` and ``cpu`` call (no-ops on a CPU tensor, copies from a GPU), with its lldiff
    caller."""

    def __init__(self):
        super().__init__()
        self.seen = set()
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func._schema.name  # e.g. aten::index (the overload, .Tensor, left out)
        if op in SYNC_OPS:
            self.seen.add((op.split("::")[1], lldiff_caller()))
        elif op in BOOL_INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            self.seen.add(("boolean index", lldiff_caller()))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy", "cpu"):
            original = self._saved[name] = getattr(torch.Tensor, name)

            def watched(tensor, *args, _name=name, _original=original, **kwargs):
                self.seen.add((_name, lldiff_caller()))
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


HOST_ONLY = {("tolist", "masking.draw_random_length")}
"""The random length is drawn from a CPU generator (a host tensor: no device involved)."""
EXPECTED = {
    "ar": HOST_ONLY,
    # the one deliberate read-back: how many positions are masked, so the LM head runs on those
    # rows alone (half the head's work on average); AR's step reads nothing back
    "mdm": HOST_ONLY | {("nonzero", "losses.selected_ce")},
    # plus the readable RoPE-position check, on a CPU only (a CUDA step uses an async device assert)
    "bd3-8": HOST_ONLY | {("nonzero", "losses.selected_ce"), ("_local_scalar_dense", "model.forward")},
    # without chunks (the full-logits loss) the MDM's step reads nothing back either
    "mdm/loss_chunk_tokens=None": HOST_ONLY,
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_the_training_step_reads_nothing_back_from_the_device(case, toy_corpus, cache_dir):
    """Three Lightning steps (metrics handed to Lightning every step, gradient clipping), each
    whole optimizer step watched: training_step (random length, masking, forward, loss,
    _log_progress's self.log calls), backward, clipping and AdamW. What it covers: the ops
    lldiff and Lightning run inside ``optimizer_step``. Not covered: Lightning's own writing of
    the logged values to the logger after the step (a ``.item()`` per logging interval,
    ``log_every_n_steps``), validation and checkpointing."""
    dm = make_dm(toy_corpus, cache_dir)
    name, _, option = case.partition("/")
    module = make_module(name, dm, **({"loss_chunk_tokens": None} if option else {}))
    watch = SyncWatch()
    step = module.optimizer_step

    def watched_step(*args, **kwargs):
        with watch:
            return step(*args, **kwargs)

    module.optimizer_step = watched_step
    trainer(3, log_every_n_steps=1, gradient_clip_val=1.0).fit(module, dm)
    assert module.global_step == 3
    assert watch.seen == EXPECTED[case]


# -- data loading --------------------------------------------------------------------------------
def test_batches_are_pinned_on_cuda_only(toy_corpus, cache_dir):
    on_cuda = SimpleNamespace(strategy=SimpleNamespace(root_device=CUDA))
    on_cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=CPU))
    assert loader_options(on_cuda, 2) == {"num_workers": 2, "persistent_workers": True, "pin_memory": True}
    assert loader_options(on_cpu, 0) == {"num_workers": 0, "persistent_workers": False, "pin_memory": False}
    assert loader_options(None, 0)["pin_memory"] is False
    dm = make_dm(toy_corpus, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    assert not dm.train_dataloader().pin_memory and not dm.val_dataloader().pin_memory
    dm.trainer = on_cuda
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory


def test_module_options_are_checked():
    with pytest.raises(ValueError, match="loss_chunk_tokens must be a positive integer"):
        AutoregressiveLM(vocab_size=32, size="tiny-0.002M", loss_chunk_tokens=0)
    with pytest.raises(ValueError, match="compile must be true, false or null"):
        MaskedDiffusionLM(vocab_size=32, size="tiny-0.002M", compile="yes")
    assert MaskedDiffusionLM(vocab_size=32, size="tiny-0.002M").loss_chunk_tokens == 4096
    assert AutoregressiveLM(vocab_size=32, size="tiny-0.002M", loss_chunk_tokens=None).loss_chunk_tokens is None
