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
.PHONY: help run test lint proto migrate bench venv buf clean system-packages

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): client/pyproject.toml server/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e ./client -e './server[embedded,node]'
	touch $@

venv: $(STAMP) ## create .venv and install the client, the server and the tools

$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

buf: $(BUF)

run: $(STAMP) ## serve on LISTEN_ADDR (127.0.0.1:50051); embedded PostgreSQL when DATABASE_URL is unset
	$(PY) -m lambda_server

test: lint system-packages ## lint, then the whole suite against a real PostgreSQL
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) $(BUF) ## ruff, mypy and buf lint
	$(BIN)/ruff check server client tests bench
	$(BIN)/ruff format --check server client tests bench
	$(BIN)/mypy
	$(BUF) lint protos

proto: $(STAMP) ## regenerate the client's gRPC code from protos/
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTOS)

migrate: $(STAMP) ## apply the migrations to DATABASE_URL (or the embedded database)
	$(PY) -m lambda_server migrate

bench: $(STAMP) system-packages ## latency and throughput against the floor (bench/README.md); BENCH_ARGS=--quick
	$(PY) -m bench $(BENCH_ARGS)

# Debian packages the tests and the benchmark run, each with the command or file that
# shows it is there: h2load (nghttp2-client) drives the throughput benchmark, pgbouncer
# stands in front of PostgreSQL in a test, and librust-serde-json-dev holds the sources of
# the one crate Rust scripts may use (with rustc and cargo, Debian's where none is installed).
DEBIAN_PACKAGES := nghttp2-client:h2load pgbouncer:pgbouncer rustc:rustc cargo:cargo \
	librust-serde-json-dev:/usr/share/cargo/registry/serde_json-1.*
system-packages:
	@missing=""; for entry in $(DEBIAN_PACKAGES); do check="$${entry#*:}"; \
	  if [ "$${check:0:1}" = / ]; then compgen -G "$$check" >/dev/null || missing="$$missing $${entry%%:*}"; \
	  else command -v $$check >/dev/null || [ -x /usr/sbin/$$check ] || missing="$$missing $${entry%%:*}"; fi; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  else echo "missing:$$missing (Debian/Ubuntu packages)" >&2; exit 1; fi; fi

clean: ## remove the venv, the tools and the embedded database
	rm -rf $(VENV) $(TOOLS) .data
