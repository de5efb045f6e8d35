"""lm-eval-harness adapter (extra ``eval``): an lldiff checkpoint as a harness ``LM``.

    from lldiff.evaluation.lm_eval_adapter import LLDiffLM
    import lm_eval
    lm = LLDiffLM(ckpt="runs/mdm-tiny/checkpoints/last.ckpt", n_mc=128)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])          # where the task's data is available

or ``lldiff eval --ckpt PATH --harness-tasks hellaswag,arc_easy``. Registered as ``lldiff``
in the harness registry once this module is imported.

* ``loglikelihood``: the objective's multiple-choice scorer (registry): AR exact (chain rule); MDM
  the Alg. 3 lower bound and BD3 the block diffusion lower bound with ``n_mc`` draws, the same
  seed for every request (common random numbers across the choices of a question).
  ``is_greedy``: the registry's greedy check (AR: every continuation token is the argmax given
  its prefix; MDM: one forward over the fully masked continuation predicts it by argmax; BD3:
  the same per block, the earlier blocks clean).
* ``loglikelihood_rolling``: the same scorer on the text given the document-start boundary (EOS; LLaDA: BOS) (as the
  harness's own models condition on their prefix token): AR exact, MDM and BD3 lower bounds.
* ``generate_until``: the objective's decoder (AR with a KV cache; the MDM reverse process in
  blocks of ``block_length``; BD3 block by block); the text is cut at the first stop sequence.
The model sees ``EOS + context``, as documents start after an EOS in training.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lldiff.checkpoint import load_model
from lldiff.objectives.common.decoding import DecodeOptions
from lldiff.completion import article, complete, option_owners
from lldiff.evaluation.multiple_choice import make_scorer


@register_model("lldiff")
class LLDiffLM(LM):
    def __init__(
        self,
        ckpt: str,
        n_mc: int = 128,
        batch_size: int = 32,
        cfg_scale: float = 0.0,
        gen_length: int = 128,
        steps: int | None = None,
        block_length: int = 32,
        tokenizer: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        steps_per_block: int | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        self.loaded = load_model(ckpt, tokenizer=tokenizer, device=device)
        if self.loaded.tokenizer is None:
            raise ValueError(f"no tokenizer.json beside {ckpt}; pass tokenizer=PATH")
        self.objective = self.loaded.objective
        if cfg_scale and "cfg_scale" not in self.objective.score_options:
            raise ValueError(f"cfg_scale applies to {option_owners('cfg_scale', 'score_options')} checkpoints only "
                             f"(classifier-free guidance); this is {article(self.objective.label)} "
                             f"{self.objective.label} checkpoint")
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.n_mc, self.mc_batch, self.cfg_scale, self.seed = int(n_mc), int(batch_size), float(cfg_scale), int(seed)
        self.gen_length, self.steps, self.block_length = int(gen_length), steps, int(block_length)
        self.steps_per_block = steps_per_block
        self._device = torch.device(device)
        self.mask_id = self.model.cfg.mask_id
        self.scorer = make_scorer(self.objective, self.model, mask_id=self.mask_id, n_mc=self.n_mc,
                                  batch_size=self.mc_batch, cfg_scale=self.cfg_scale, seed=self.seed)
        self.rolling_scorer = make_scorer(self.objective, self.model, mask_id=self.mask_id, n_mc=self.n_mc,
                                          batch_size=self.mc_batch, seed=self.seed)  # no guidance: log p(text)
        self.greedy = self.objective.greedy()

    # -- helpers -----------------------------------------------------------------------------
    def _ids(self, text: str, boundary: bool = True) -> torch.Tensor:
        ids = ([self.tok.document_start_id] if boundary else []) + self.tok.encode(text)
        return torch.tensor(ids, dtype=torch.long, device=self._device)

    def _fit(self, context: torch.Tensor, answer_len: int) -> torch.Tensor:
        room = self.model.cfg.max_seq_len - answer_len
        if room < 1:
            raise ValueError(f"continuation of {answer_len} tokens exceeds max_seq_len={self.model.cfg.max_seq_len}")
        return context[-room:]

    @torch.no_grad()
    def _score(self, context: str, continuation: str) -> tuple[float, bool]:
        answer = self._ids(continuation, boundary=False)
        if answer.numel() == 0:
            return 0.0, True
        prompt = self._fit(self._ids(context), answer.numel())
        loglik = self.scorer(prompt, answer)
        greedy = self.greedy(self.model, prompt, answer, mask_id=self.mask_id, **self.objective.module_args())
        return float(loglik), bool(greedy)

    # -- harness API -----------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._score(*request.args) for request in requests]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            ids = self._ids(request.args[0])[: self.model.cfg.max_seq_len]
            results.append(float(self.rolling_scorer(ids[:1], ids[1:])) if ids.numel() > 1 else 0.0)
        return results

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            requested = new = int(kwargs.get("max_gen_toks", self.gen_length))
            block = min(self.block_length, new)
            if not self.objective.length_is_budget:
                # a fixed canvas of whole blocks; the answer is cut back to the harness's max_gen_toks below
                new = -(-new // block) * block
            prompt = self._fit(self._ids(context), new)
            options = DecodeOptions.for_objective(
                self.objective, length=new, steps=self.steps, block_length=block, cfg_scale=self.cfg_scale,
                steps_per_block=self.steps_per_block)
            answer = complete(self.model, [prompt.tolist()], options, eos_id=self.tok.eos_id,
                              pad_id=self.tok.pad_id).answers[0][:requested]
            text = self.tok.decode(answer)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            outputs.append(text)
        return outputs
