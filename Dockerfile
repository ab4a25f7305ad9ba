# syntax=docker/dockerfile:1
# lambda-microservice: a two-stage image. Dependencies are built before the
# source is copied, so a source change rebuilds only the last layers.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Third-party dependencies first, at the versions the test suite runs with.
COPY requirements-dev.txt ./
RUN pip wheel --wheel-dir /wheels -c requirements-dev.txt \
        asyncpg grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf orjson uvloop
# Then our two distributions; the server's wheel carries migrations/.
COPY client client
COPY server server
COPY migrations migrations
RUN pip wheel --no-deps --wheel-dir /wheels ./client ./server

FROM python:3.11-slim-bookworm
# Node.js runs the JavaScript scripts; Python runs the server and the Python
# scripts; util-linux's unshare starts each environment in its namespaces.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
# The sandbox needs root in the container: it creates PID, network, mount, IPC
# and UTS namespaces, mounts a fresh root per environment (CAP_SYS_ADMIN, no
# AppArmor or seccomp profile that forbids mount/unshare/pivot_root) and writes
# the cgroup filesystem (memory and pids controllers). Scripts never run as root:
# each environment gets a uid of its own, no capabilities and no_new_privs.
# Run with `docker run --privileged`, or `securityContext.privileged: true`;
# SANDBOX_MODE=strict makes the server refuse to start when a layer is missing.
WORKDIR /var/lib/lambda
# Prometheus scrapes /metrics on 9090; logs are JSON lines for the log collector.
ENV LISTEN_ADDR=0.0.0.0:50051 \
    METRICS_ADDR=0.0.0.0:9090 \
    LOG_FORMAT=json \
    SANDBOX_MODE=strict \
    PYTHONUNBUFFERED=1
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["lambda-cli", "--target", "127.0.0.1:50051", "--timeout", "3", "health"]
# DATABASE_URL must be set: the image has no embedded PostgreSQL.
CMD ["lambda-server"]
