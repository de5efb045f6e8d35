"""Thin LightningModules over the pure objectives: one shared base, two objectives.

Both log the same metric names so TensorBoard overlays them:
``train/loss``, ``train/lr``, ``val/nll_per_token`` (AR: exact NLL; MDM: Monte-Carlo negative ELBO,
an upper bound on the NLL), ``val/bpb``, ``trainer/tokens``, ``trainer/flops``
(SMDM's 6 N D), ``perf/tokens_per_s``, ``perf/flops_per_s`` and ``perf/mfu`` (see
:meth:`LMBase._log_progress`).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.tensorboard.summary import hparams as tb_hparams
from torchmetrics import SumMetric

from lldiff import block_diffusion, objectives, registry
from lldiff.checkpoint import TOKENIZER_KEY, check_tokenizer
from lldiff.config import ModelConfig
from lldiff.data.eval_batches import eval_batch_index, eval_weights
from lldiff.flops import ThroughputWindow, device_peak_flops, mfu, scaling_flops
from lldiff.losses import DEFAULT_CHUNK_TOKENS, check_chunk_tokens
from lldiff.model import Transformer
from lldiff.optim import build_optimizer
from lldiff.registry import Objective
from lldiff.strategies import shard_transformer  # also registers the fsdp2 strategy names


def register_hparams_metrics(logger: TensorBoardLogger, params: dict[str, Any], metrics: list[str]) -> None:
    """Fill TensorBoard's HParams table: hyperparameters plus the metric columns to show.

    Unlike ``TensorBoardLogger.log_hyperparams(params, metrics)`` this writes no fake
    scalar at step 0; the columns pick up the real ``val/*`` scalars as they are logged.
    """
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    writer = logger.experiment._get_file_writer()
    for summary in tb_hparams(flat, {name: 0.0 for name in metrics}):
        writer.add_summary(summary)


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
        compile: regional ``torch.compile``: each transformer block compiled in place (one
            block's code, reused by every block; embedding, head and loss stay eager;
            state-dict keys unchanged, so checkpoints of compiled and plain runs
            interchange). None (default): on when the run trains on a CUDA device, off on a
            CPU (compiling costs tens of seconds there and gains little). Decided in
            ``configure_model``, when the trainer's device is known; a module used without
            a trainer is not compiled unless ``compile`` is true.
        loss_chunk_tokens: rows per LM-head chunk of the training and validation losses
            (:mod:`lldiff.losses`): the head runs on the scored rows only (the MDM's and
            BD3's masked positions, the AR's every position), at most this many at a time,
            each chunk but the last recomputed in the backward, so the ``B x T x V`` fp32
            logits never exist at once. Losses and gradients are those of the plain head up
            to float rounding. Steps scoring fewer rows (the CPU tiny runs) run in one chunk,
            nothing recomputed. Counting the masked rows reads one number back from the
            device per MDM / BD3 step. None: the plain loss, full logits of every position
            (no chunks, no read-back; the most memory).
        peak_tflops: peak dense TFLOP/s of one device for ``perf/mfu``; None looks the GPU
            up in ``lldiff.flops.PEAK_TFLOPS`` (by name and the run's matmul precision) or,
            on a CPU, measures an fp32 matmul once per process.
    """

    objective_name: str  # the registry name (lldiff.registry); BlockDiffusionLM sets it from block_size

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
        check_chunk_tokens(loss_chunk_tokens)
        if compile is not None and not isinstance(compile, bool):
            raise ValueError(f"compile must be true, false or null (on for a CUDA run), got {compile!r}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (TFLOP/s per device) or null, got {peak_tflops}")
        if vocab_size is None:
            raise ValueError(
                "vocab_size is not set: give model.vocab_size, or let `lldiff fit` link it from the data"
            )
        if not 0.0 <= random_length_prob <= 1.0:
            raise ValueError(f"random_length_prob must be in [0, 1], got {random_length_prob}")
        if lr <= 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got lr={lr}, min_lr_ratio={min_lr_ratio}")
        self.config = ModelConfig.from_name(
            size, **{**(model_overrides or {}), "vocab_size": vocab_size,
                     **self.objective.model_fields(vocab_size, (model_overrides or {}).get("mask_id")),
                     "attn_backend": attn_backend}
        )
        # a subclass about to assign stored weights (finetune's init_from) builds the backbone on
        # the meta device: no random initialisation, no full-size copy before the real tensors
        with torch.device("meta") if getattr(self, "_backbone_on_meta", False) else contextlib.nullcontext():
            self.model = Transformer(self.config)
        if compile:
            self.model.compile_blocks()  # in place: state-dict keys stay model.*
        self.tokens_seen = 0
        self.matmul_flops_seen = 0.0
        self._window: ThroughputWindow | None = None
        self._peak_flops: float | None = None
        self.val_nats, self.val_tokens, self.val_bytes = SumMetric(), SumMetric(), SumMetric()
        self.register_buffer("token_bytes", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def objective(self) -> Objective:
        """This module's entry in the objective registry."""
        return registry.get(self.objective_name)

    @property
    def loss_chunk_tokens(self) -> int | None:
        """Rows per LM-head chunk of the losses (:mod:`lldiff.losses` reads it)."""
        return self.hparams.get("loss_chunk_tokens", DEFAULT_CHUNK_TOKENS)

    # -- objective hooks -----------------------------------------------------------------
    def loss(self, rows: Tensor) -> Tensor:
        """Training loss on packed rows (B, L+1)."""
        raise NotImplementedError

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """(per-sequence nats (B,), scored token ids (B, L)) on packed rows (B, L+1)."""
        raise NotImplementedError

    # -- Lightning ------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The backbone's logits; ``kwargs`` (``positions``, ``attn_mask``, ``readout``) go to it
        unchanged."""
        return self.model(input_ids, attention_mask, **kwargs)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and self.trainer.global_rank > 0:
            # Lightning seeds every process alike; the MDM's masking draws must differ across
            # ranks. A restored checkpoint overrides this with each rank's saved state.
            torch.manual_seed(_rank_seed(torch.initial_seed(), self.trainer.global_rank))
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            return
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds the model's max_seq_len={self.config.max_seq_len}; "
                "lower data.seq_len or set model.model_overrides.max_seq_len"
            )
        data_vocab = getattr(datamodule, "vocab_size_real", None)
        if data_vocab is not None and data_vocab != self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {data_vocab} real tokens but the model was built for "
                f"vocab_size={self.config.vocab_size}"
            )
        token_bytes = getattr(datamodule, "token_bytes", None)
        if token_bytes is not None:
            self.token_bytes = token_bytes.to(self.device, torch.long)

    def on_fit_start(self) -> None:
        hparams = {**self.hparams, "n_nonemb": self.config.non_embedding_params()}
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            hparams.update({f"data.{k}": v for k, v in datamodule.hparams.items()})
        for logger in self.loggers if self.trainer.is_global_zero else ():  # other ranks have no writer
            if isinstance(logger, TensorBoardLogger):
                register_hparams_metrics(logger, hparams, ["val/nll_per_token", "val/bpb"])

    def on_validation_start(self) -> None:
        self._window = None  # validation time is not training throughput

    def configure_model(self) -> None:
        """Regional compile of the blocks when :func:`compile_on` says so (``compile`` and the
        trainer's device), then, under ``ModelParallelStrategy`` (``trainer.strategy:
        fsdp2``): shard the backbone with FSDP2, per block then the root, over the
        data-parallel mesh, with the strategy's activation-checkpointing and resharding
        options (compile first, then shard, as torchtitan does)."""
        if self._trainer is not None and compile_on(self.hparams.get("compile"), self.trainer.strategy.root_device):
            self.model.compile_blocks()
        mesh = self.device_mesh
        if mesh is None:
            return
        strategy = self.trainer.strategy
        shard_transformer(
            self.model, mesh["data_parallel"],
            activation_checkpointing=getattr(strategy, "activation_checkpointing", False),
            reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
        )

    def on_train_start(self) -> None:
        self._peak_flops, source = device_peak_flops(
            self.device, str(self.trainer.precision), self.hparams.get("peak_tflops")
        )
        if self._peak_flops is None:
            rank_zero_info(f"lldiff perf: perf/mfu not logged: {source}")
        else:
            rank_zero_info(f"lldiff perf: perf/mfu against {source} per device x {self.trainer.world_size} device(s)")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        rows = batch["input_ids"]
        length = objectives.draw_random_length(
            rows.shape[1] - 1, self.hparams.random_length_prob, generator=self._length_generator()
        )
        rows = rows[:, : length + 1]
        loss = self.loss(rows)
        tokens = rows.shape[0] * length * self.trainer.world_size
        self.tokens_seen += tokens
        self._log_progress(loss, tokens, tokens * self.objective.matmul_flops_per_token(self.config, length))
        return loss

    def _length_generator(self) -> torch.Generator:
        """Random lengths are a fixed function of (data seed, step): MDM and AR runs truncate
        the same steps to the same lengths, so they train on the same tokens and compute."""
        datamodule = getattr(self.trainer, "datamodule", None)
        seed = int(getattr(datamodule, "seed", 0) or 0)
        return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + self.global_step) % 2**63)

    def _log_progress(self, loss: Tensor, tokens: int, flops: float | None = None) -> None:
        """Per-step metrics; ``tokens`` and ``flops`` are this step's, summed over devices
        (``flops=None``: no ``perf/flops_per_s`` nor ``perf/mfu``).

        Metrics are handed to Lightning only on the steps it writes them (every
        ``trainer.log_every_n_steps``): each ``self.log`` call costs about a millisecond of
        bookkeeping, more than a tiny model's whole forward pass, and on the other steps
        Lightning would discard the values anyway. The event files are the same.

        ``train/loss`` is this process's batch loss (rank 0's is the one logged);
        ``trainer/tokens`` and ``trainer/flops`` (SMDM's 6 N D) and ``trainer/flops_matmul``
        (the real forward + backward matmul FLOPs, LM head and attention included) are
        cumulative. The perf metrics are rates over the whole steps of each logging interval
        (restarted after validation): ``perf/tokens_per_s`` (all devices),
        ``perf/flops_per_s`` (their matmul FLOP/s, ``lldiff.flops.step_flops_per_token``)
        and ``perf/mfu`` = FLOP/s / (peak FLOP/s per device x devices). Host clock only: no
        device synchronisation is added.
        """
        self.matmul_flops_seen += flops or 0.0
        now = time.perf_counter()
        rates = None
        if self._window is None:
            self._window = ThroughputWindow(now, tokens, flops or 0.0)
        else:
            rates = self._window.step(now, tokens, flops or 0.0)
        if self._trainer is not None and (self.global_step + 1) % self.trainer.log_every_n_steps:
            return  # Lightning writes step metrics at the end of each interval only
        self.log("train/loss", loss, prog_bar=True)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("trainer/tokens", float(self.tokens_seen))
        self.log("trainer/flops", scaling_flops(self.config, self.tokens_seen))
        self.log("trainer/flops_matmul", float(self.matmul_flops_seen))
        if rates is None:
            return
        tokens_per_s, flops_per_s = rates
        self.log("perf/tokens_per_s", tokens_per_s)
        if flops is not None:
            self.log("perf/flops_per_s", flops_per_s)
            if self._peak_flops is not None:
                self.log("perf/mfu", mfu(flops_per_s, self._peak_flops, self.trainer.world_size))
        self._window = ThroughputWindow(now, tokens, flops or 0.0)  # the next interval starts here

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # rows weighted 0 pad a rank's share (lldiff.data.eval_batches); draws seeded by the one-process batch
        nats, scored = self.validation_nats(batch["input_ids"], eval_batch_index(batch, batch_idx))
        weight = eval_weights(batch, nats.shape[0], nats.device)
        self.val_nats.update((nats * weight).sum())
        self.val_tokens.update(weight.sum() * scored.shape[1])
        if self.token_bytes.numel():
            self.val_bytes.update((self.token_bytes[scored].sum(dim=1) * weight).sum())

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")
        # already global on every rank (like the epoch metrics below): the mean over ranks is the
        # same value, and saying so keeps Lightning from recommending sync_dist on every validation
        self.log("trainer/tokens", float(self.tokens_seen), sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def _log_eval_metrics(self, prefix: str) -> None:
        """``{prefix}/nll_per_token`` and ``{prefix}/bpb`` over the epoch (summed across devices by
        the SumMetrics, so every rank holds the same value)."""
        nats, tokens = self.val_nats.compute(), self.val_tokens.compute()
        self.log(f"{prefix}/nll_per_token", nats / tokens, prog_bar=prefix == "val", sync_dist=True)
        if self.token_bytes.numel():
            self.log(f"{prefix}/bpb", nats / (math.log(2) * self.val_bytes.compute()), sync_dist=True)
        for metric in (self.val_nats, self.val_tokens, self.val_bytes):
            metric.reset()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer, schedule = build_optimizer(
            self.model, max_steps=self.trainer.max_steps, lr=hp.lr, min_lr_ratio=hp.min_lr_ratio,
            weight_decay=hp.weight_decay, betas=hp.betas, warmup_steps=hp.warmup_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = {
            # masking draws use the global RNG: a resumed run continues
            # the exact random stream of an uninterrupted one
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["lldiff"] = {"tokens_seen": self.tokens_seen, "matmul_flops_seen": self.matmul_flops_seen,
                                "model_config": dict(self.config.__dict__), **rng}
        tokenizer = self._data_tokenizer()
        if tokenizer is not None:  # which tokenizer the weights belong to (refused elsewhere)
            checkpoint["lldiff"][TOKENIZER_KEY] = tokenizer.fingerprint
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank calls this hook (and only rank 0's dict is written): gather each rank's stream
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rng)
            checkpoint["lldiff"]["rng_by_rank"] = gathered

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lldiff", {})
        saved = state.get("model_config")
        if saved is not None:  # a clear message before load_state_dict reports shape mismatches
            saved = dict(ModelConfig.from_dict(saved).__dict__)  # checkpoints from before the attention kind
            theirs = registry.of_config(ModelConfig.from_dict(saved))
            if theirs != self.objective:
                raise ValueError(
                    f"the checkpoint holds {registry.article(theirs.label)} {theirs.label} model ({theirs.attention} "
                    f"attention) but {type(self).__name__} is {registry.article(self.objective.label)} "
                    f"{self.objective.label} model; use the matching model.class_path"
                )
            mine = dict(self.config.__dict__)
            differs = [k for k in saved if k not in SETTINGS_NOT_SHAPE and k in mine and saved[k] != mine[k]]
            if differs:
                pairs = ", ".join(f"{k}={mine[k]!r} (checkpoint: {saved[k]!r})" for k in differs)
                raise ValueError(f"the checkpoint's model differs from this one: {pairs}; "
                                 "resume with the run's own model settings (its config.yaml)")
        check_tokenizer(state.get(TOKENIZER_KEY), self._data_tokenizer(), "the checkpoint")
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.matmul_flops_seen = float(state.get("matmul_flops_seen", 0.0))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        by_rank = state.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == world:
            state = {**state, **by_rank[rank]}  # this rank's own stream
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available() and len(state["rng_cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if world > 1 and rank > 0 and (by_rank is None or len(by_rank) != world):
            # a checkpoint of another world size: keep the ranks' draws apart
            torch.manual_seed(_rank_seed(int(torch.randint(0, 2**62, (1,))), rank))

    def _data_tokenizer(self) -> Any:
        """The tokenizer of the trainer's datamodule, if there is one."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "tokenizer", None) if datamodule is not None else None


SETTINGS_NOT_SHAPE = ("name", "attn_backend", "max_seq_len", "rope_base", "norm_eps")
"""ModelConfig fields a resumed run may differ in without a word: the name and what fine-tuning may override
(lldiff.finetune.ADJUSTABLE_FIELDS); every other field is the weights' shape or meaning."""


def compile_on(compile: bool | None, device: torch.device) -> bool:
    """Whether a run compiles its blocks: as ``compile`` says, or (None) on a CUDA device only."""
    return bool(compile) if compile is not None else torch.device(device).type == "cuda"


def _rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from a shared one (rank 0 keeps ``seed``)."""
    return (seed + 0x9E3779B97F4A7C15 * rank) % 2**63


class MaskedDiffusionLM(LMBase):
    """Masked diffusion LM (LLaDA / SMDM): bidirectional backbone, mask token ``M = V``.

    Args (beyond LMBase):
        mask_eps: lower end of the masking ratio t ~ U[mask_eps, 1] (LLaDA 1e-3).
        stratified_t: spread t evenly over the batch (unbiased, lower variance).
        val_mc_samples: Monte-Carlo draws of (t, mask) per validation sequence for the
            ELBO during training (cheap curves; same expectation, more noise).
        eval_mc_samples: the same for a standalone ``lldiff validate`` / ``test`` and a
            sweep's final evaluation (SMDM: 128).
        val_seed: seed of the validation draws, so every evaluation of every checkpoint
            uses the same (t, mask) draws (common random numbers).
    """

    objective_name = "mdm"

    def __init__(
        self,
        *args: Any,
        mask_eps: float = 1e-3,
        stratified_t: bool = False,
        val_mc_samples: int = 8,
        eval_mc_samples: int = 128,
        val_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if val_mc_samples < 1 or eval_mc_samples < 1:
            raise ValueError(f"val_mc_samples and eval_mc_samples must be >= 1, got {val_mc_samples}, {eval_mc_samples}")
        if not 0.0 <= mask_eps < 1.0:
            raise ValueError(f"mask_eps must be in [0, 1), got {mask_eps}")

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def loss(self, rows: Tensor) -> Tensor:
        return objectives.mdm_loss(
            self, rows[:, 1:], self.mask_id, eps=self.hparams.mask_eps, stratified=self.hparams.stratified_t
        )

    def validation_draws(self, device: torch.device, batch_idx: int) -> tuple[torch.Generator, int]:
        """(a generator seeded by ``val_seed`` and the batch, the number of Monte-Carlo draws):
        ``val_mc_samples`` while fitting, ``eval_mc_samples`` for ``lldiff validate`` / ``test``,
        so every evaluation of every checkpoint sees the same draws."""
        generator = torch.Generator(device=device).manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return generator, self.hparams.val_mc_samples if fitting else self.hparams.eval_mc_samples

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        x0 = rows[:, 1:]
        generator, draws = self.validation_draws(x0.device, batch_idx)
        nats = objectives.mdm_elbo_nats(
            self, x0, self.mask_id, num_samples=draws, eps=self.hparams.mask_eps,
            generator=generator,
        )
        return nats, x0


class AutoregressiveLM(LMBase):
    """Autoregressive baseline: the same backbone, causal, next-token cross-entropy."""

    objective_name = "ar"

    def loss(self, rows: Tensor) -> Tensor:
        return objectives.ar_loss(self, rows)

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        return objectives.ar_nll(self, rows).sum(dim=1), rows[:, 1:]


class BlockDiffusionLM(MaskedDiffusionLM):
    """BD3-LM block diffusion (SPEC §9): blocks of ``block_size`` tokens left to right, masked
    diffusion inside each block; ``block_size = L`` is the MDM, ``1`` next-token prediction.

    Training runs the backbone once on ``[x_t ⊕ x_0]`` (2L tokens) with the three-part mask,
    one masking ratio per block; validation reports the NELBO per token on the same tokens
    and under the same metric names as the AR and the MDM (a bound, like the MDM's).

    Args (beyond MaskedDiffusionLM's, whose masking and validation options apply per block):
        block_size: tokens per block (``bd3-B`` in sweep specs).
    """

    def __init__(self, *args: Any, block_size: int = 16, **kwargs: Any) -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.objective_name = f"bd3-{block_size}"  # before LMBase builds the backbone from it
        super().__init__(*args, **kwargs)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        seq_len = getattr(getattr(self.trainer, "datamodule", None), "seq_len", None) if self._trainer else None
        if stage == "fit" and isinstance(seq_len, int):  # whole blocks, before any step
            self.objective.check_seq_len(seq_len)

    def loss(self, rows: Tensor) -> Tensor:
        return block_diffusion.bd3_loss(self, rows[:, 1:], self.mask_id, self.config.block_size,
                                        eps=self.hparams.mask_eps, stratified=self.hparams.stratified_t)

    def validation_nats(self, rows: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        x0 = rows[:, 1:]
        generator, draws = self.validation_draws(x0.device, batch_idx)
        nats = block_diffusion.bd3_nelbo_nats(self, x0, self.mask_id, self.config.block_size, num_samples=draws,
                                              eps=self.hparams.mask_eps, generator=generator)
        return nats, x0
