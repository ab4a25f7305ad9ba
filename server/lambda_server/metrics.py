"""Prometheus metrics: one registry per server, its metrics named here, served on METRICS_ADDR.

A registry per server (not prometheus-client's global one) keeps two servers in
one process, as in the tests, from adding into each other's counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Execution latencies reach from a millisecond (warm) to the maximum timeout.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the service exports, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "lambda_rpc_requests",
            "RPCs answered, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "lambda_rpc_duration_seconds", "RPC latency, by method", ["method"], buckets=_SECONDS, registry=r
        )
        self.executions = Counter(
            "lambda_executions",
            "Executions, by runtime and outcome (ok, cached, or the ExecutionError code)",
            ["runtime", "outcome"],
            registry=r,
        )
        self.execution_seconds = Histogram(
            "lambda_execution_duration_seconds",
            "Time an execution took in its environment, by runtime",
            ["runtime"],
            buckets=_SECONDS,
            registry=r,
        )
        self.environment_starts = Counter(
            "lambda_environment_binds",
            "Executions that bound a script to a process: prewarmed (a pre-started one) or cold (a new one)",
            ["runtime", "state"],
            registry=r,
        )
        self.environments = Gauge(
            "lambda_environments",
            "Runtime processes by state: warm (pre-started, unbound), busy, idle (bound)",
            ["runtime", "state"],
            registry=r,
        )
        self.cache_requests = Counter(
            "lambda_result_cache_requests",
            "Result cache lookups, by result (hit, miss)",
            ["result"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "lambda_result_cache_bytes", "Bytes of results held by the cache", registry=r
        )
        self.rate_limited = Counter(
            "lambda_rate_limited",
            "Executions refused by the rate limit, by caller kind",
            ["caller"],
            registry=r,
        )
        self.db_connections = Gauge(
            "lambda_db_pool_connections",
            "Database pool connections, by state (in_use, idle)",
            ["state"],
            registry=r,
        )
        self.log_queue_depth = Gauge(
            "lambda_request_log_queue_depth", "Request log records waiting to be written", registry=r
        )
        self.log_dropped = Counter(
            "lambda_request_log_dropped", "Request log records dropped because the queue was full", registry=r
        )
        self.log_written = Counter(
            "lambda_request_log_written", "Request log records written to PostgreSQL", registry=r
        )
        self.active_sessions = Gauge(
            "lambda_sessions_active", "Active, unexpired sessions (as of the last cleanup pass)", registry=r
        )
        self.sessions_cleaned = Counter(
            "lambda_sessions_cleaned",
            "Sessions marked expired or deleted by the cleanup",
            ["action"],
            registry=r,
        )
