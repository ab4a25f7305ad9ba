"""Prometheus metrics: one registry per server, its metrics named here, served on METRICS_ADDR.

A registry per server (not prometheus-client's global one) keeps two servers in
one process, as in the tests, from adding into each other's counters.

/metrics is served by prometheus-client's own HTTP server, in a thread. Gauges
that describe a state (environments, database connections, the log queue) are
set just before each scrape by callbacks (`on_scrape`), run on the server's
event loop so that they read its state between two steps, never during one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from lambda_server.config import ConfigError
from lambda_server.domain import EnvironmentState, ExecutionOutcome

log = logging.getLogger(__name__)

# How long a scrape waits for the event loop to run the callbacks; past it the
# gauges keep their last values (a loop that busy has other problems to show).
REFRESH_TIMEOUT = 1.0

# Execution latencies reach from a millisecond (warm) to the maximum timeout.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the service exports, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Registered first: a registry collects in the order of registration, so the
        # gauges the callbacks set are read after they ran.
        self._before_scrape = _BeforeScrape()
        self.registry.register(self._before_scrape)
        self._http: tuple[WSGIServer, threading.Thread] | None = None
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
        # the HTTP/JSON API's requests: `route` is the route's pattern (or "unmatched"), so
        # that request ids and unknown paths never become labels
        self.http_requests = Counter(
            "lambda_http_requests",
            "HTTP/JSON API requests answered, by method, route and HTTP status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "lambda_http_request_duration_seconds",
            "HTTP/JSON API request latency, by route",
            ["route"],
            buckets=_SECONDS,
            registry=r,
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
            "Calls refused by a rate limit, by caller kind and call (execute, initialize)",
            ["caller", "call"],
            registry=r,
        )
        self.db_connections = Gauge(
            "lambda_db_pool_connections",
            "Database pool connections, by state (in_use, idle)",
            ["state"],
            registry=r,
        )
        self.layer_installs = Counter(
            "lambda_layer_installs",
            "Layers (sessions' dependencies) this server installed, by runtime (one found is not counted)",
            ["runtime"],
            registry=r,
        )
        self.script_checks = Counter(
            "lambda_script_checks",
            "Scripts checked at Initialize, by runtime and how: compiled, or known (compiled before)",
            ["runtime", "how"],
            registry=r,
        )
        self.claim_batch_size = Histogram(
            "lambda_session_claim_batch_size",
            "Session claims (one an Execute) sent to PostgreSQL in one statement",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.create_batch_size = Histogram(
            "lambda_session_create_batch_size",
            "Initializes (of one owner or several) stored by PostgreSQL in one statement",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "lambda_inflight_request_bytes",
            "Request bytes held by calls received and not yet answered",
            registry=r,
        )
        self.inflight_refused = Counter(
            "lambda_inflight_refused",
            "Calls refused because their bytes would go past MAX_INFLIGHT_REQUEST_BYTES, by method",
            ["method"],
            registry=r,
        )
        self.log_queue_depth = Gauge(
            "lambda_request_log_queue_depth", "Request log records waiting to be written", registry=r
        )
        self.log_dropped = Counter(
            "lambda_request_log_dropped", "Request log records dropped because the queue was full", registry=r
        )
        self.log_unloggable = Counter(
            "lambda_request_log_unloggable",
            "Request log records whose params or result could not be converted (past "
            "MAX_JSON_NODES or MAX_JSON_DEPTH, or not JSON): logged as a marker, by payload",
            ["payload"],
            registry=r,
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

    def executed(self, runtime: str, outcome: ExecutionOutcome) -> None:
        """One execution that ran in an environment (a cache hit is counted by the cache)."""
        label = "ok" if outcome.failure is None else outcome.failure.code.value
        self.executions.labels(runtime, label).inc()
        self.execution_seconds.labels(runtime).observe(outcome.duration)
        state = outcome.environment
        if state is not None and state is not EnvironmentState.WARM:  # prewarmed or cold
            self.environment_starts.labels(runtime, state.value).inc()

    def cached(self, runtime: str) -> None:
        """One execution answered from the result cache."""
        self.executions.labels(runtime, "cached").inc()

    def count_at_scrape(
        self, name: str, documentation: str, label: str, counts: Callable[[], dict[str, int]]
    ) -> None:
        """A counter, by `label`, whose totals a part keeps itself (plain integers, no cost on
        its hot path) and `counts` reads at each scrape (`<name>_total`)."""
        self.registry.register(_Totals(name, documentation, label, counts))

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Call `refresh` (on the event loop that serves) before each scrape, to set gauges."""
        self._before_scrape.callbacks.append(refresh)

    @property
    def port(self) -> int | None:
        """The port /metrics is served on, once `serve` has bound it."""
        return None if self._http is None else int(self._http[0].server_port)

    async def serve(self, address: str) -> int:
        """Serve /metrics on `address` (HOST:PORT, port 0 picks one); return the port bound."""
        host, _, port = address.rpartition(":")
        self._before_scrape.loop = asyncio.get_running_loop()
        try:
            # resolving and binding are blocking calls: off the event loop
            self._http = await asyncio.to_thread(
                start_http_server, int(port), host.strip("[]"), self.registry
            )
        except OSError as exc:
            raise ConfigError(f"METRICS_ADDR={address!r}: cannot listen there: {exc}") from None
        return int(self._http[0].server_port)

    async def stop_serving(self) -> None:
        if self._http is None:
            return
        (server, thread), self._http = self._http, None
        await asyncio.to_thread(server.shutdown)  # waits for the serving loop to notice (< 0.5 s)
        server.server_close()
        await asyncio.to_thread(thread.join, 5.0)


class _BeforeScrape(Collector):
    """Runs the `on_scrape` callbacks before the registry's metrics are read; yields none itself."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterable[Metric]:
        loop = self.loop
        if loop is None or _running_loop() is loop:
            self._refresh()
            return []
        try:
            future = asyncio.run_coroutine_threadsafe(self._refresh_on_loop(), loop)
        except RuntimeError:  # the loop is closed: the server is gone
            return []
        try:
            future.result(REFRESH_TIMEOUT)
        except TimeoutError:
            future.cancel()
            log.warning("metrics: the event loop did not refresh the gauges within %.1f s", REFRESH_TIMEOUT)
        return []

    async def _refresh_on_loop(self) -> None:
        self._refresh()

    def _refresh(self) -> None:
        for refresh in self.callbacks:
            try:
                refresh()
            except Exception:  # a broken gauge must not cost the whole scrape
                log.exception("metrics: a scrape-time refresh failed")


class _Totals(Collector):
    """Totals a part of the server counts itself, read as a counter at each scrape."""

    def __init__(
        self, name: str, documentation: str, label: str, counts: Callable[[], dict[str, int]]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in dict(self._counts()).items():  # a copy: the loop counts on meanwhile
            family.add_metric([value], count)
        yield family


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
