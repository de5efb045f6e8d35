"""lm-eval-harness adapter (extra ``eval``): an lldiff checkpoint as a harness ``LM``.

    from lldiff.evaluation.lm_eval_adapter import LLDiffLM
    import lm_eval
    lm = LLDiffLM(ckpt="runs/mdm-tiny/checkpoints/last.ckpt", n_mc=128)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])          # where the task's data is available

or ``lldiff eval --ckpt PATH --harness-tasks hellaswag,arc_easy``. Registered as ``lldiff``
in the harness registry once this module is imported.

* ``loglikelihood``: AR exact (chain rule); MDM the Alg. 3 lower bound with ``n_mc`` draws, the
  same seed for every request (common random numbers across the choices of a question).
  ``is_greedy``: AR: every continuation token is the argmax given its prefix; MDM: one
  forward over the fully masked continuation predicts it exactly by argmax.
* ``loglikelihood_rolling``: AR exact; MDM the unconditional ELBO (a lower bound).
* ``generate_until``: AR decoding with a KV cache, or the MDM reverse process (low-confidence,
  blocks); the text is cut at the first stop sequence.
The model sees ``EOS + context``, as documents start after an EOS in training.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lldiff.checkpoint import load_model
from lldiff.completion import DecodeOptions, complete
from lldiff.likelihood import ar_loglik, mdm_conditional_loglik, mdm_elbo


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
        **_: object,
    ) -> None:
        super().__init__()
        self.loaded = load_model(ckpt, tokenizer=tokenizer, device=device)
        if self.loaded.tokenizer is None:
            raise ValueError(f"no tokenizer.json beside {ckpt}; pass tokenizer=PATH")
        if cfg_scale and self.loaded.objective == "ar":
            raise ValueError("cfg_scale applies to MDM checkpoints only (classifier-free guidance)")
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.n_mc, self.mc_batch, self.cfg_scale, self.seed = int(n_mc), int(batch_size), float(cfg_scale), int(seed)
        self.gen_length, self.steps, self.block_length = int(gen_length), steps, int(block_length)
        self._device = torch.device(device)

    # -- helpers -----------------------------------------------------------------------------
    def _ids(self, text: str, boundary: bool = True) -> torch.Tensor:
        ids = ([self.tok.eos_id] if boundary else []) + self.tok.encode(text)
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
        if self.loaded.objective == "ar":
            loglik = ar_loglik(self.model, prompt[None], answer[None])
            logits = self.model(torch.cat([prompt, answer])[None])[0, prompt.numel() - 1 : -1]
        else:
            generator = torch.Generator(device=self._device).manual_seed(self.seed)
            loglik = mdm_conditional_loglik(self.model, prompt[None], answer[None], mask_id=self.model.cfg.mask_id,
                                            n_mc=self.n_mc, batch_size=self.mc_batch, cfg_scale=self.cfg_scale,
                                            generator=generator)
            masked = torch.cat([prompt, torch.full_like(answer, self.model.cfg.mask_id)])
            logits = self.model(masked[None])[0, prompt.numel():]
        return float(loglik[0]), bool((logits.argmax(-1) == answer).all())

    # -- harness API -----------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._score(*request.args) for request in requests]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            ids = self._ids(request.args[0])[: self.model.cfg.max_seq_len]
            if self.loaded.objective == "ar":
                results.append(float(ar_loglik(self.model, ids[None, :1], ids[None, 1:])[0]))
            else:
                generator = torch.Generator(device=self._device).manual_seed(self.seed)
                results.append(float(mdm_elbo(self.model, ids[None, 1:], mask_id=self.model.cfg.mask_id,
                                              n_mc=self.n_mc, batch_size=self.mc_batch, generator=generator)[0]))
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
            if self.loaded.objective == "mdm":
                # the canvas is whole blocks; the answer is cut back to the harness's max_gen_toks below
                new = -(-new // block) * block
            prompt = self._fit(self._ids(context), new)
            options = DecodeOptions(length=new, steps=self.steps, block_length=block, cfg_scale=self.cfg_scale)
            answer = complete(self.model, [prompt.tolist()], options, eos_id=self.tok.eos_id,
                              pad_id=self.tok.pad_id).answers[0][:requested]
            text = self.tok.decode(answer)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            outputs.append(text)
        return outputs
