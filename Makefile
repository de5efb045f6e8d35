# Entry points from a fresh clone; each creates .venv on first use.
#   make demo      the CPU iso-FLOP sweep, MDM vs AR, 3 budgets, optima bracketed (~7 min on 2 cores)
#   make demo-long the same with 5 budgets and 2 seeds (~35 min): exponents with intervals
#   make demo-bd3  AR, BD3-4, BD3-16 and MDM side by side, 3 budgets (~9 min)
#   make data-constrained  AR vs MDM repeated over 1..128 epochs of the same tokens (~10 min)
#   make demo-fit  train the tiny MDM and AR on the offline corpus, print their comparison table
#   make demo-sft  then fine-tune both on next/previous-line instructions and chat with them
#   make reversal  the reversal study on synthetic facts (LLaDA Table 3 shape), CPU preset (~20 min)
#   make gpu-check  everything only a GPU measures (<= 8 min on an H100): benchmarks/results/gpu-check-<gpu>.json
#                   and .md; without a GPU, a dry run of the same script on tiny shapes (gpu-check-cpu.json)
#   make test   run the default (fast) test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo demo-long demo-bd3 data-constrained demo-fit demo-sft reversal gpu-check test test-slow clean-env

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the CPU wheel on this machine; a bare `torch` would resolve a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Re-running resumes: finished runs are skipped, an interrupted one continues from its checkpoint.
demo: $(BIN)/.installed
	$(BIN)/lldiff sweep run --preset demo --out runs/sweep-demo
	$(BIN)/lldiff sweep analyze runs/sweep-demo
	@echo "Curves: $(BIN)/tensorboard --logdir runs/sweep-demo/tb"

demo-long: $(BIN)/.installed
	$(BIN)/lldiff sweep run --preset demo-long --out runs/sweep-demo-long
	$(BIN)/lldiff sweep analyze runs/sweep-demo-long

demo-bd3: $(BIN)/.installed
	$(BIN)/lldiff sweep run --preset demo-bd3 --out runs/sweep-demo-bd3
	$(BIN)/lldiff sweep analyze runs/sweep-demo-bd3

data-constrained: $(BIN)/.installed
	$(BIN)/python studies/data_constrained.py --preset cpu --out runs/data-constrained

# `--ckpt_path last`: an interrupted demo resumes where it stopped, a finished one is kept
# (without a checkpoint Lightning warns and starts fresh). `rm -rf runs` to start over.
demo-fit: $(BIN)/.installed
	$(BIN)/lldiff fit --config configs/mdm-tiny.yaml --ckpt_path last
	$(BIN)/lldiff fit --config configs/ar-tiny.yaml --ckpt_path last
	$(BIN)/python studies/compare_runs.py runs/mdm-tiny runs/ar-tiny --out runs/comparison.md
	@echo "Curves: $(BIN)/tensorboard --logdir runs   (runs/mdm-tiny and runs/ar-tiny overlay)"

# SFT from the demo-fit checkpoints (resumable like demo-fit), then one chat turn per model.
demo-sft: demo-fit
	$(BIN)/python -m lldiff.data.line_tasks --out data/sft/stdlib-lines
	$(BIN)/lldiff fit --config configs/sft-mdm-tiny.yaml --ckpt_path last
	$(BIN)/lldiff fit --config configs/sft-ar-tiny.yaml --ckpt_path last
	$(BIN)/lldiff chat --ckpt runs/sft-mdm-tiny/checkpoints/last.ckpt --message "next line after: import os"
	$(BIN)/lldiff chat --ckpt runs/sft-ar-tiny/checkpoints/last.ckpt --message "next line after: import os"

reversal: $(BIN)/.installed
	$(BIN)/python studies/reversal.py --task facts --preset cpu --out runs/reversal-facts

gpu-check: $(BIN)/.installed
	$(BIN)/python benchmarks/gpu_check.py

test: $(BIN)/.installed
	$(BIN)/pytest -m "not slow" -q

test-slow: $(BIN)/.installed
	$(BIN)/pytest -m slow -q || [ $$? -eq 5 ]  # 5: no slow tests selected

clean-env:
	rm -rf $(VENV)
