# lambda-microservice: every set-up step lives here; `make run` and `make test` need nothing else.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_VERSION := 1.75.0
PROTO_OUT ?= client
PROTOS := $(wildcard protos/lambda_microservice/v1/*.proto)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run test lint proto migrate bench flame venv buf tools clean runtime-packages test-packages

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): client/pyproject.toml server/pyproject.toml requirements-dev.txt
	@echo "make: installing the Python packages into $(VENV) (the server, the client, Node.js, an embedded PostgreSQL; the first time about 1-2 minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e ./client -e './server[embedded,node]'
	@touch $@
	@echo "make: $(VENV) is ready ($(BIN)/lambda-cli and $(BIN)/lambda-server are in it)"

venv: $(STAMP) ## create .venv and install the client, the server and the tools

$(BUF):
	@echo "make: installing buf $(BUF_VERSION) into $(TOOLS) (npm; about 10 s)"
	@npm install --silent --no-save --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

tools: $(BUF) ## install buf into .tools/ (for `buf curl` and `make lint`)

buf: $(BUF)

run: $(STAMP) runtime-packages ## serve on LISTEN_ADDR (127.0.0.1:50051); embedded PostgreSQL when DATABASE_URL is unset
	@echo "make: starting the server (the first time: the embedded PostgreSQL is created, and Rust's serde_json is built in the background, under 10 s)"
	$(PY) -m lambda_server

test: lint test-packages ## lint, then the whole suite against a real PostgreSQL
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) $(BUF) ## ruff, mypy, buf lint and buf breaking (against protos/baseline.binpb)
	$(BIN)/ruff check server client tests bench
	$(BIN)/ruff format --check server client tests bench
	$(BIN)/mypy
	$(BUF) lint protos
	$(BUF) breaking protos --against protos/baseline.binpb

proto: $(STAMP) ## regenerate the client's gRPC code from protos/
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTOS)

migrate: $(STAMP) ## apply the migrations to DATABASE_URL (or the embedded database)
	$(PY) -m lambda_server migrate

bench: $(STAMP) test-packages ## latency and throughput against the floor (bench/README.md); BENCH_ARGS=--quick
	$(PY) -m bench $(BENCH_ARGS)

flame: $(STAMP) test-packages ## py-spy flame graph of warm Executes at saturation: bench/flame-execute.svg
	$(PY) -m bench.flame

# Debian packages, each with the command or file that shows it is there.
# Every runtime's: Rust scripts compile with rustc and cargo (Debian's where none is
# installed) against the crates they may use (server/lambda_server/runtimes/rust_crates.py),
# built from Debian's packaged sources; one missing is left out, the others still work.
CRATES := /usr/share/cargo/registry
RUST_CRATE_PACKAGES := librust-serde-dev:$(CRATES)/serde-1.* \
	librust-serde-derive-dev:$(CRATES)/serde_derive-1.* librust-serde-json-dev:$(CRATES)/serde_json-1.* \
	librust-regex-dev:$(CRATES)/regex-1.* librust-chrono-dev:$(CRATES)/chrono-0.4.* \
	librust-rand-dev:$(CRATES)/rand-0.8.* librust-itertools-dev:$(CRATES)/itertools-0.10.* \
	librust-once-cell-dev:$(CRATES)/once_cell-1.* librust-lazy-static-dev:$(CRATES)/lazy_static-1.* \
	librust-base64-dev:$(CRATES)/base64-0.13.* librust-hex-dev:$(CRATES)/hex-0.4.* \
	librust-sha2-dev:$(CRATES)/sha2-0.10.* librust-uuid-dev:$(CRATES)/uuid-1.*
RUNTIME_PACKAGES := rustc:rustc cargo:cargo $(RUST_CRATE_PACKAGES)
# The tests' and the benchmark's: h2load (nghttp2-client) drives the throughput
# benchmark, pgbouncer stands in front of PostgreSQL in a test.
TEST_PACKAGES := nghttp2-client:h2load pgbouncer:pgbouncer

# $(call debian-packages,ENTRIES,REQUIRED): install the missing ones with apt-get as root;
# elsewhere name them in one line, and fail only when REQUIRED is yes (without Rust's,
# `make run` still serves Python and Node.js, and Health says why Rust is missing).
define debian-packages
	@missing=""; for entry in $(1); do check="$${entry#*:}"; \
	  if [ "$${check:0:1}" = / ]; then compgen -G "$$check" >/dev/null || missing="$$missing $${entry%%:*}"; \
	  else command -v $$check >/dev/null || [ -x /usr/sbin/$$check ] || missing="$$missing $${entry%%:*}"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian packages:$$missing (apt-get; the first time about 1 minute)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; } || \
	    { echo "make: apt-get could not install$$missing" >&2; [ "$(2)" != yes ]; }; \
	  else echo "make: missing Debian packages:$$missing (as root: apt-get install$$missing)" >&2; [ "$(2)" != yes ]; fi; fi
endef

runtime-packages:
	$(call debian-packages,$(RUNTIME_PACKAGES),no)

test-packages:
	$(call debian-packages,$(TEST_PACKAGES) $(RUNTIME_PACKAGES),yes)

clean: ## remove the venv, the tools and the embedded database
	rm -rf $(VENV) $(TOOLS) .data
