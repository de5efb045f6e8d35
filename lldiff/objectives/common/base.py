"""The thin Lightning base every objective's LightningModule derives from
(``lldiff/objectives/<family>/modules.py``).

``LMBase`` builds the backbone its objective asks for, runs the training and validation steps
(the objective supplies ``loss`` and ``validation_nats``), and hands the rest to parts that read
alone: throughput and MFU (:class:`lldiff.throughput.ThroughputMonitor`, a callback), the
checkpoint's ``lldiff`` state and the data checks (:mod:`lldiff.run_state`), the HParams table
(:mod:`lldiff.hparams`), the optimizer (:mod:`lldiff.optim`) and FSDP2 (:mod:`lldiff.strategies`).

Every objective logs the same metric names so TensorBoard overlays them: ``train/loss``,
``train/lr``, ``val/nll_per_token`` (AR: exact NLL; MDM, BD3: Monte-Carlo negative ELBO, an upper
bound on the NLL), ``val/bpb``, ``trainer/tokens``, ``trainer/flops`` (SMDM's 6 N D),
``trainer/flops_matmul``, ``perf/tokens_per_s``, ``perf/flops_per_s`` and ``perf/mfu``.

"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lldiff import registry
from lldiff.config import ModelConfig
from lldiff.data.eval_batches import eval_batch_index, eval_weights
from lldiff.flops import scaling_flops
from lldiff.hparams import log_hparams_table
from lldiff.losses import DEFAULT_CHUNK_TOKENS, check_chunk_tokens
from lldiff.metrics import NatsPerToken
from lldiff.model import Transformer
from lldiff.registry import Family, Objective
from lldiff.objectives.common.masking import draw_random_length, random_length_generator
from lldiff.optim import build_optimizer
from lldiff.run_state import check_data, restore_run_state, save_run_state, seed_this_rank
from lldiff.strategies import prepare_backbone  # also registers the fsdp2 strategy names
from lldiff.throughput import ThroughputMonitor


class LMBase(L.LightningModule):
    """Shared optimisation, accounting and validation plumbing.

    Args:
        size: a registered model size (``lldiff.config.SIZES``), e.g. ``tiny-1M``, ``smdm-113M``.
        vocab_size: real vocabulary size V; the CLI links it from the data's tokenizer.
        model_overrides: ModelConfig fields to override (e.g. ``{n_layer: 2, rope_base: 5e5}``).
        attn_backend: ``sdpa`` (default), ``xformers`` (CUDA + installed) or ``reference``.
        lr: peak learning rate (SMDM 2e-4).
        min_lr_ratio: cosine floor as a fraction of ``lr`` (SMDM 2e-5 / 2e-4 = 0.1).
        weight_decay: AdamW weight decay on matrices (SMDM 0.1); norms are not decayed.
        betas: AdamW betas (SMDM 0.9, 0.95).
        warmup_steps: linear warmup steps; None uses SMDM's ``max(1% of max_steps, 100)``.
        random_length_prob: probability that a step's batch is cut to a length uniform on
            {1..L} (LLaDA/SMDM 0.01). Applied identically to MDM and AR so both see the
            same tokens and compute.
        compile: regional ``torch.compile`` of each transformer block in place (state-dict keys
            unchanged). None (default): on when the run trains on a CUDA device, off on a CPU.
        loss_chunk_tokens: rows per LM-head chunk of the losses (:mod:`lldiff.losses`): the head
            runs on the scored rows only, this many at a time, so the ``B x T x V`` logits never
            exist at once (same loss and gradients up to rounding). None: the plain full head.
        peak_tflops: peak dense TFLOP/s of one device for ``perf/mfu``; None looks the GPU
            up in ``lldiff.flops.PEAK_TFLOPS`` (by name and the run's matmul precision) or,
            on a CPU, measures an fp32 matmul once per process.
    """

    family: Family  # the objective family this class trains (set by each objective's module)
    objective_params: dict[str, Any] = {}  # its parameters (BD3 sets block_size before LMBase.__init__)

    def __init__(
        self,
        size: str = "tiny-1M",
        vocab_size: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        attn_backend: str = "sdpa",
        lr: float = 2e-4,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int | None = None,
        random_length_prob: float = 0.01,
        compile: bool | None = None,
        peak_tflops: float | None = None,
        loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_base_options(vocab_size, lr, min_lr_ratio, random_length_prob, compile, peak_tflops, loss_chunk_tokens)
        self.objective: Objective = registry.with_params(self.family, self.objective_params)
        overrides = model_overrides or {}
        self.config = ModelConfig.from_name(size, **{**overrides, "vocab_size": vocab_size, "attn_backend": attn_backend,
                                                     **self.objective.model_fields(vocab_size, overrides.get("mask_id"))})
        # SFT's init_from assigns stored weights: built on the meta device, nothing initialised twice
        with torch.device("meta") if getattr(self, "_backbone_on_meta", False) else contextlib.nullcontext():
            self.model = Transformer(self.config)
        self.model.objective = self.objective  # read by objectives.of_model (decoding, scoring)
        if compile:
            self.model.compile_blocks()  # in place: state-dict keys stay model.*
        self.tokens_seen, self.matmul_flops_seen = 0, 0.0
        self.step_work: tuple[int, float | None] | None = None  # (tokens, FLOPs) of the last step: ThroughputMonitor
        self.val_metric = NatsPerToken()
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)
        self.loss_chunk_tokens = loss_chunk_tokens  # rows per LM-head chunk: lldiff.losses reads it

    def loss(self, rows: Tensor) -> Tensor:  # training loss on packed rows (B, L+1)
        raise NotImplementedError

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """(per-sequence nats (B,), scored token ids (B, L)) on packed rows (B, L+1)."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.model(input_ids, attention_mask, **kwargs)  # kwargs (positions, attn_mask, readout) unchanged

    def configure_callbacks(self) -> list[L.Callback]:
        return [ThroughputMonitor()]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            seed_this_rank(self)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None:
            check_data(self, datamodule, stage)

    def on_fit_start(self) -> None:
        log_hparams_table(self)

    def configure_model(self) -> None:
        """Compile and shard the backbone as the trainer asks (:func:`lldiff.strategies.prepare_backbone`)."""
        prepare_backbone(self.model, self._trainer, self.hparams.get("compile"), self.device_mesh)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        rows = batch["input_ids"]
        seed = int(getattr(getattr(self.trainer, "datamodule", None), "seed", 0) or 0)
        length = draw_random_length(rows.shape[1] - 1, self.hparams.random_length_prob,
                                    generator=random_length_generator(seed, self.global_step))
        rows = rows[:, : length + 1]
        loss = self.loss(rows)
        tokens = rows.shape[0] * length * self.trainer.world_size
        self.log_step(loss, tokens, tokens * self.objective.matmul_flops_per_token(self.config, length))
        return loss

    def log_step(self, loss: Tensor, tokens: int, flops: float | None = None) -> None:
        """Count this step's ``tokens`` and ``flops`` (all devices); log ``train/*`` and the cumulative
        ``trainer/*`` only on the steps Lightning writes (each ``self.log`` costs about a millisecond)."""
        self.tokens_seen += tokens
        self.matmul_flops_seen += flops or 0.0
        self.step_work = (tokens, flops)
        if self._trainer is not None and (self.global_step + 1) % self.trainer.log_every_n_steps:
            return
        self.log("train/loss", loss, prog_bar=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("trainer/tokens", float(self.tokens_seen))
        self.log("trainer/flops", scaling_flops(self.config, self.tokens_seen))
        self.log("trainer/flops_matmul", float(self.matmul_flops_seen))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # rows weighted 0 pad a rank's share (lldiff.data.eval_batches); draws seeded by the one-process batch
        nats, scored = self.validation_nats(batch["input_ids"], eval_batch_index(batch, batch_idx))
        weight = eval_weights(batch, nats.shape[0], nats.device)
        scored_bytes = (self.token_bytes[scored].sum(dim=1) * weight) if self.token_bytes.numel() else None
        self.val_metric.update(nats * weight, weight.sum() * scored.shape[1], scored_bytes)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        log_eval_metrics(self, "val")
        # already global on every rank: saying so keeps Lightning from recommending sync_dist
        self.log("trainer/tokens", float(self.tokens_seen), sync_dist=True)

    def on_test_epoch_end(self) -> None:  # test/nll_per_token, test/bpb
        log_eval_metrics(self, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer, schedule = build_optimizer(
            self.model, max_steps=self.trainer.max_steps, lr=hp.lr, min_lr_ratio=hp.min_lr_ratio,
            weight_decay=hp.weight_decay, betas=hp.betas, warmup_steps=hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_run_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_run_state(self, checkpoint)


def log_eval_metrics(module: LMBase, prefix: str) -> None:
    """``{prefix}/nll_per_token`` and ``{prefix}/bpb`` over the epoch (global on every rank)."""
    for name, value in module.val_metric.compute().items():
        module.log(f"{prefix}/{name}", value, prog_bar=prefix == "val" and name == "nll_per_token", sync_dist=True)
    module.val_metric.reset()


def check_base_options(vocab_size: Any, lr: float, min_lr_ratio: float, random_length_prob: float, compile: Any,
                       peak_tflops: Any, loss_chunk_tokens: Any) -> None:
    """Refuse LMBase options no run can use, naming the value and what is allowed."""
    check_chunk_tokens(loss_chunk_tokens)
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile must be true, false or null (on for a CUDA run), got {compile!r}")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0 (TFLOP/s per device) or null, got {peak_tflops}")
    if vocab_size is None:
        raise ValueError("vocab_size is not set: give model.vocab_size, or let `lldiff fit` link it from the data")
    if not 0.0 <= random_length_prob <= 1.0:
        raise ValueError(f"random_length_prob must be in [0, 1], got {random_length_prob}")
    if lr <= 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got lr={lr}, min_lr_ratio={min_lr_ratio}")

