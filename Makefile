# make demo         : `make lora` on a small sample of IMDB, 1 short epoch (README, first screen)
# make lora | full  : a fresh .venv, the pinned install, then `mlflow run` (ARGS="-P epochs=1 ...")
# make compare      : results table and charts of tracked runs (ARGS="--experiment-name ...")
# make test         : the whole offline test suite (what CI runs)
# make test-fast    : the quick subset for iterating (pytest -m "not slow")
# make docs         : regenerate docs/options.md from src/base/config.py
# make install-services : Debian's postgresql (team tests) and chromium (UI checks), when missing; as root
# make ui-check     : the UI checks alone (tests/test_ui.py: real runs, headless chromium)
# make ui-screenshots : the same, rewriting the pictures in docs/ui/ that docs/ui.md shows
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
ARGS   ?=
# Where pip takes torch from: empty = the default index (on Linux PyPI's torch is the CUDA build, several
# GB with its nvidia-* packages); a CPU-only machine: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# `mlflow run` ignores the `experiment_name` parameter (it opens the run itself) but reads this, so
# runs land where `make compare` / `python -m src.compare` look; set it to use another experiment.
# Passed to `lora`/`full` only: the tests choose their own experiments.
MLFLOW_EXPERIMENT_NAME ?= imdb-sentiment
# `mlflow run --env-manager local` starts `python -m src.train` from PATH: make it the venv's.
RUN    := PATH="$(BIN):$$PATH" MLFLOW_DISABLE_TELEMETRY=true

.PHONY: install install-services demo lora full compare test test-fast ui-check ui-screenshots docs lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, at the tested release, so the requirements below find it and pull no other build.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# The tests start and stop their own throw-away cluster from these binaries (tests/postgres.py), and
# drive Debian's chromium headless through Playwright (tests/test_ui.py; in CI a missing one fails).
install-services:
	@missing=""; \
	if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then echo "postgresql: installed"; \
	else missing="postgresql"; fi; \
	if command -v chromium >/dev/null 2>&1; then echo "chromium: installed"; else missing="$$missing chromium"; fi; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y $$missing; \
	else echo "missing:$$missing: run 'sudo make install-services' (or sudo apt-get install -y$$missing);" \
	  "without postgresql the team tests are skipped, without chromium the UI checks"; fi

# IMDB_SENTIMENT_MAKE_TARGET: an offline error then names its fix in `make`'s spelling (ARGS="-P ...").
# The demo: a small sample of real IMDB; batches of 8 at a higher learning rate give LoRA 63 steps to learn from.
DEMO := -P max_train_samples=500 -P max_val_samples=200 -P max_test_samples=300 -P max_length=128 -P epochs=1 \
        -P batch_size=8 -P learning_rate=2e-3

demo: install
	$(RUN) MLFLOW_EXPERIMENT_NAME=$(MLFLOW_EXPERIMENT_NAME) IMDB_SENTIMENT_MAKE_TARGET=$@ $(BIN)/python -m src.launch . -e lora --env-manager local $(DEMO) $(ARGS)

lora: install
	$(RUN) MLFLOW_EXPERIMENT_NAME=$(MLFLOW_EXPERIMENT_NAME) IMDB_SENTIMENT_MAKE_TARGET=$@ $(BIN)/python -m src.launch . -e lora --env-manager local $(ARGS)

full: install
	$(RUN) MLFLOW_EXPERIMENT_NAME=$(MLFLOW_EXPERIMENT_NAME) IMDB_SENTIMENT_MAKE_TARGET=$@ $(BIN)/python -m src.launch . -e full --env-manager local $(ARGS)

compare: install
	$(RUN) $(BIN)/python -m src.compare $(ARGS)

test: install
	$(RUN) $(BIN)/python -m pytest -q tests

test-fast: install
	$(RUN) $(BIN)/python -m pytest -q -m "not slow" tests

ui-check: install
	$(RUN) $(BIN)/python -m pytest -q tests/test_ui.py

ui-screenshots: install
	$(RUN) UI_SCREENSHOTS=$(CURDIR)/docs/ui $(BIN)/python -m pytest -q tests/test_ui.py

docs: install
	$(BIN)/python -m src.options

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db optuna.db checkpoints compare .pytest_cache .ruff_cache
