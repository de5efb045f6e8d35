"""Hugging Face interop: LLaDA checkpoints in (:mod:`lldiff.interop.llada`), Llama and LLaDA
directories out (:mod:`lldiff.interop.hf`). Safetensors only: nothing here unpickles."""
