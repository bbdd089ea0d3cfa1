# The two entry points (see README.md):
#   make up     install what is missing, run the whole system locally until Ctrl-C
#   make test   install what is missing, lint, run unit + integration tests against real servers
SHELL := /bin/bash
.DEFAULT_GOAL := help

# the interpreter infra/install.sh chose (written by it; read when a recipe runs, after `install`)
PY = $(shell cat .state/python 2>/dev/null || command -v python3)
TEST_DIRS := $(wildcard tests/unit tests/integration tests/security)
PYTEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

.PHONY: help install up test lint unit integration stop bench chaos

help:
	@echo "make up      # install what is missing, start broker + ClickHouse (embedded) + all services + SMTP sink"
	@echo "make test    # the whole test suite: unit + integration against a real Kafka broker, SMTP and HTTP servers"
	@echo "make lint | unit | integration | stop"
	@echo "make bench   # end-to-end benchmark, CPU per process (bench/README.md); BENCH_ARGS=\"--sink smtp-sink ...\""
	@echo "make chaos   # SIGKILL every process in turn under 20,000 messages: nothing lost, exact counts (CHAOS_ARGS=\"-n 5000\")"

install:
	@bash infra/install.sh

up: install
	$(PY) -m infra.up

lint: install
	$(PY) -m ruff check .

# pytest's exit code 5 (no tests collected) fails the target like any other failure
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest $(TEST_DIRS) -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) --durations=15 $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) --durations=15 $(PYTEST_ARGS)

integration: install
	$(PY) -m pytest tests/integration -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) --durations=15 $(PYTEST_ARGS)

# the end-to-end benchmark (bench/README.md): installs smtp-sink (postfix, no mail system) and py-spy if
# missing; options through BENCH_ARGS (default: the closed loop against smtp-sink), e.g.
# make bench BENCH_ARGS="--sink smtp-sink --rate 1000 --duration 20"
BENCH_ARGS ?= --sink smtp-sink
bench: install
	@bash bench/install.sh
	$(PY) bench/e2e.py $(BENCH_ARGS)

# the chaos bench (bench/README.md "Chaos"): SIGKILLs api, sender, reporter, metrics, inbound, the broker,
# then all at once while messages flow; exit 1 unless nothing is lost and the counts are exact
CHAOS_ARGS ?=
chaos: install
	$(PY) bench/chaos.py $(CHAOS_ARGS)

# stops a broker left running by an interrupted `make up` (services stop with their supervisor)
stop:
	@bash infra/kafka/kafka.sh stop
