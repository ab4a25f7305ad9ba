"""Wiring, start-up and ordered shutdown; `main` is the `lambda-server` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server import logs
from lambda_server.api.interceptors import CallInterceptor, inflight_budget
from lambda_server.api.servicer import LambdaServicer, add_to_server
from lambda_server.auth import Authenticator
from lambda_server.builds import RustBuilds
from lambda_server.config import ConfigError, GrpcSettings, Settings
from lambda_server.domain import Limits
from lambda_server.errors import LambdaError
from lambda_server.limits import RateLimiter
from lambda_server.metrics import Metrics
from lambda_server.result_cache import ResultCache
from lambda_server.runtimes.pool import EnvironmentPool
from lambda_server.runtimes.registry import RuntimeRegistry
from lambda_server.runtimes.rust import RustCompiler, RustToolchain
from lambda_server.sandbox import Sandbox
from lambda_server.sandbox.memory import memory_budget_mb
from lambda_server.service import LambdaService
from lambda_server.store import migrations
from lambda_server.store.artifacts import ArtifactStore
from lambda_server.store.catalog import FunctionCatalog
from lambda_server.store.cleanup import SessionCleanup
from lambda_server.store.database import Database
from lambda_server.store.embedded import start_embedded
from lambda_server.store.request_log import RequestLogWriter
from lambda_server.store.sessions import OwnerQuota, SessionStore

log = logging.getLogger("lambda_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LambdaService"].full_name
LIVENESS = "liveness"


class DatabaseMonitor:
    """Pings PostgreSQL, applies migrations once it answers, and drives the health status."""

    def __init__(
        self,
        db: Database,
        health_servicer: HealthServicer,
        interval: float,
        schema: list[migrations.Migration],
    ) -> None:
        self._db = db
        self._schema = schema
        self._health = health_servicer
        self._interval = interval
        self._migrated = False
        self._ready = False
        self._description = "starting"
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def description(self) -> str:
        return self._description

    async def check_once(self) -> None:
        try:
            if not self._migrated:
                await migrations.apply(self._db, self._schema)
                self._migrated = True
            await self._db.ping(timeout=max(self._interval, 1.0))
        except LambdaError as exc:
            await self._set(False, f"unavailable: {exc.message}")
        else:
            await self._set(True, "ok")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._set(False, "shutting down")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_once()

    async def _set(self, ready: bool, description: str) -> None:
        if ready != self._ready:
            log.log(logging.INFO if ready else logging.WARNING, "postgres: %s", description)
        self._ready, self._description = ready, description
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)


class StartupError(Exception):
    """The server cannot start; the message names the cause and the setting that governs it."""


class Server:
    """The running service: the gRPC server and everything it owns, stopped in order."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: grpc.aio.Server,
        db: Database,
        sessions: SessionStore,
        pool: EnvironmentPool,
        sandbox: Sandbox,
        monitor: DatabaseMonitor,
        health_servicer: HealthServicer,
        cleanup: SessionCleanup,
        *,
        metrics: Metrics,
        request_log: RequestLogWriter,
        builds: RustBuilds | None,
    ) -> None:
        self.settings = settings
        self.cleanup = cleanup
        self.metrics = metrics
        self._request_log = request_log
        self._grpc = grpc_server
        self._db = db
        self._sessions = sessions
        self._pool = pool
        self._sandbox = sandbox
        self._monitor = monitor
        self._health = health_servicer
        self._builds = builds
        self._serving = False

    async def start(self) -> None:
        """Serve; when any step fails, what the steps before it started is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0.0)
            raise

    async def _start(self) -> None:
        _set_priority(self.settings.server_nice)
        if self._builds is not None:
            self._builds.start()  # the one-time dependency build, in the background from now
        if self.settings.metrics_addr is not None:
            port = await self.metrics.serve(self.settings.metrics_addr)  # ConfigError when it cannot bind
            # not "serving ... on": scripts read the gRPC address from that line
            log.info("metrics at http://%s:%d/metrics", self.settings.metrics_addr.rpartition(":")[0], port)
        self._request_log.start()
        await self._grpc.start()
        await self._wait_for_database()
        await self._pool.start()
        self._monitor.start()
        self.cleanup.start()
        self._serving = True

    async def _wait_for_database(self) -> None:
        """PostgreSQL's first answer (and the migrations), for DATABASE_STARTUP_TIMEOUT_SECONDS
        at most; with 0, one try, and the monitor goes on trying while health is NOT_SERVING."""
        limit = self.settings.database.startup_timeout
        until = time.monotonic() + limit
        await self._monitor.check_once()
        if not self._monitor.ready and limit:
            log.info("waiting up to %g s for PostgreSQL: %s", limit, self._monitor.description)
        while not self._monitor.ready and limit:
            if time.monotonic() >= until:
                raise StartupError(
                    f"PostgreSQL did not answer within {limit:g} s of start-up (DATABASE_URL, "
                    f"DATABASE_STARTUP_TIMEOUT_SECONDS): {self._monitor.description}"
                )
            await asyncio.sleep(min(0.5, max(0.0, until - time.monotonic())))
            await self._monitor.check_once()

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, in-flight calls get `grace` seconds, then all is closed.
        Safe after a start that failed at any step."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self._monitor.stop()
        await self.cleanup.stop()
        await self._health.enter_graceful_shutdown()
        if self._serving and self.settings.shutdown_drain_seconds:
            # still serving, while load balancers see NOT_SERVING and stop sending calls here
            await asyncio.sleep(self.settings.shutdown_drain_seconds)
        self._serving = False
        await self._grpc.stop(grace)
        # /metrics stops in a thread (up to 0.5 s) while the rest closes
        metrics_stopped = asyncio.create_task(self.metrics.stop_serving())
        if self._builds is not None:
            await self._builds.close()
        # after the calls ended, so that their logs are in; before the pool it writes with closes
        await self._request_log.close()
        await self._pool.close()
        self._sandbox.close()
        await metrics_stopped
        await self._sessions.close()
        await self._db.close()

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()


def grpc_options(grpc_settings: GrpcSettings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments, from GRPC_* settings."""
    g = grpc_settings
    options = [
        ("grpc.so_reuseport", 0),  # a port in use is an error, never shared by accident
        ("grpc.max_receive_message_length", g.max_receive_message_bytes),
        ("grpc.max_send_message_length", g.max_send_message_bytes),
        # calls not yet taken by a handler: past gRPC's defaults (1,000, then 3,000) it
        # cancels new ones before we see them, so a burst of 2,000 lost a tenth
        ("grpc.server.max_pending_requests", g.max_pending_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", g.max_pending_rpcs),
        ("grpc.keepalive_time_ms", int(g.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(g.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(g.min_client_ping_interval_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if g.max_connection_idle_seconds:
        options.append(("grpc.max_connection_idle_ms", int(g.max_connection_idle_seconds * 1000)))
    if g.max_connection_age_seconds:
        options.append(("grpc.max_connection_age_ms", int(g.max_connection_age_seconds * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(g.max_connection_age_grace_seconds * 1000)))
    return options


async def build_server(settings: Settings, database_url: str | None = None) -> tuple[Server, int]:
    """Wire the service and bind its port (0 picks a free one); call `start()` to serve.

    When a step fails, what the steps before it made (the sandbox's cgroups, the
    pool) is released before the error goes on."""
    url = database_url or settings.database.url
    if url is None:
        raise ConfigError("DATABASE_URL is unset (main() starts an embedded PostgreSQL for it)")
    # read once at start: a broken migrations directory stops start-up, not every health probe
    schema = migrations.load(migrations.default_directory())
    toolchain = await RustToolchain.detect(settings.runtime.rustc)
    registry = RuntimeRegistry.load(
        settings.runtime.mappings_file, settings.runtime.node_binary, toolchain.spec
    )
    async with contextlib.AsyncExitStack() as undo:
        server, port = await _wire(settings, url, schema, registry, toolchain, undo)
        undo.pop_all()  # from here the server owns it all, and stops it in order
    return server, port


async def _wire(
    settings: Settings,
    url: str,
    schema: list[migrations.Migration],
    registry: RuntimeRegistry,
    toolchain: RustToolchain,
    undo: contextlib.AsyncExitStack,
) -> tuple[Server, int]:
    """Every part of the server, each registered in `undo` as it is made."""
    sandbox = await Sandbox.start(settings.sandbox)
    undo.callback(sandbox.close)
    db = Database(settings.database, url)
    await db.open()
    undo.push_async_callback(db.close)
    limits = Limits(settings.sandbox.memory_mb, settings.sandbox.max_processes)
    total_memory_mb = await memory_budget_mb(settings.sandbox)
    pool = EnvironmentPool(settings.runtime, registry.specs, sandbox, limits, total_memory_mb)
    undo.push_async_callback(pool.close)
    health_servicer = HealthServicer()
    monitor = DatabaseMonitor(db, health_servicer, settings.health_interval_seconds, schema)
    metrics = Metrics()
    cache = ResultCache(settings.result_cache_bytes, metrics)
    quota = OwnerQuota(settings.auth.max_sessions_per_owner, settings.auth.max_script_bytes_per_owner)
    sessions = SessionStore(
        db,
        observe_claim_batch=metrics.claim_batch_size.observe,
        quota=quota,
        observe_create_batch=metrics.create_batch_size.observe,
    )
    undo.push_async_callback(sessions.close)
    builds = None
    if not toolchain.missing:
        compiler = RustCompiler(toolchain, sandbox, settings.runtime)
        builds = RustBuilds(  # records compile outcomes on sessions: closed before them (Server.stop)
            compiler,
            ArtifactStore(db),
            sessions,
            settings.runtime.rust_cache_dir,
            settings.runtime.artifact_retention_seconds,
            settings.cleanup_interval_seconds,
        )
    service = LambdaService(
        settings,
        sessions,
        pool,
        registry,
        monitor,
        sandbox.describe(),
        cache,
        FunctionCatalog(db),
        metrics=metrics,
        builds=builds,
    )
    request_log = RequestLogWriter(db, settings.request_log, metrics)
    metrics.on_scrape(_scrape_gauges(metrics, pool, db, request_log))

    grpc_server = grpc.aio.server(
        interceptors=[
            CallInterceptor(
                metrics,
                request_log if settings.request_log.enabled else None,
                inflight_budget(settings.grpc),
            )
        ],
        options=grpc_options(settings.grpc),
        maximum_concurrent_rpcs=settings.grpc.max_concurrent_rpcs or None,
    )
    limiter = RateLimiter(settings.auth, metrics)
    json_bounds = (settings.runtime.max_json_nodes, settings.runtime.max_json_depth)
    add_to_server(LambdaServicer(service, Authenticator(settings.auth), limiter, json_bounds), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # for liveness probes: SERVING while the process lives, whatever PostgreSQL does
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    port = await _listen(grpc_server, settings.listen_addr)
    cleanup = SessionCleanup(
        db,
        settings.cleanup_interval_seconds,
        settings.session_retention_seconds,
        metrics,
        settings.runtime.artifact_retention_seconds,
    )
    server = Server(
        settings,
        grpc_server,
        db,
        sessions,
        pool,
        sandbox,
        monitor,
        health_servicer,
        cleanup,
        metrics=metrics,
        request_log=request_log,
        builds=builds,
    )
    undo.pop_all()  # from here the server owns it all, and stops it in order
    return server, port
    raise AssertionError("unreachable")  # mypy: the block above returns or raises


def _set_priority(nice: int) -> None:
    """Give every thread of this process (and those it starts from now) the nice value
    SERVER_NICE. Scripts run at 0 in their own cpu groups (the jail resets it), whose
    weight against the server's threads is the default: at -5 a server thread weighs
    three times a group, so a call to answer preempts any script. Lowering the scripts'
    group instead starved them behind the host's other processes."""
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        threads = [str(threading.get_native_id())]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError as exc:  # not root: the scheduler's defaults
            log.info("could not set the server's nice value to %d (SERVER_NICE): %s", nice, exc.strerror)
            return


async def _listen(grpc_server: grpc.aio.Server, address: str) -> int:
    """Bind the gRPC port; ConfigError naming LISTEN_ADDR and the reason when it cannot."""
    try:
        return grpc_server.add_insecure_port(address)
    except RuntimeError:  # grpcio says only "Failed to bind"; ask the kernel why
        why = await asyncio.to_thread(_bind_error, address)
        raise ConfigError(f"LISTEN_ADDR={address!r}: cannot listen there: {why}") from None


def _bind_error(address: str) -> str:
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(where)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "gRPC could not bind it"


def _scrape_gauges(
    metrics: Metrics, pool: EnvironmentPool, db: Database, request_log: RequestLogWriter
) -> Callable[[], None]:
    """Sets the gauges of the service's state, run before each scrape."""

    def refresh() -> None:
        for runtime, counts in pool.counts().items():
            for state, count in counts.items():
                metrics.environments.labels(runtime, state).set(count)
        in_use, idle = db.connections()
        metrics.db_connections.labels("in_use").set(in_use)
        metrics.db_connections.labels("idle").set(idle)
        metrics.log_queue_depth.set(request_log.depth)

    return refresh


async def serve(settings: Settings, database_url: str) -> None:
    server, port = await build_server(settings, database_url)
    await server.start()
    # What start-up made (modules, the wiring) lives as long as the server: out of the
    # collector's sight, a full collection walks only what calls make, not all of it.
    gc.collect()
    gc.freeze()
    host = settings.listen_addr.rpartition(":")[0]
    log.info("serving lambda_microservice.v1.LambdaService on %s:%d", host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info(
        "stopping: health NOT_SERVING, %.1f s drain, %.1f s grace",
        settings.shutdown_drain_seconds,
        settings.shutdown_grace_seconds,
    )
    await server.stop()
    log.info("stopped")


async def migrate(settings: Settings, database_url: str) -> None:
    db = Database(settings.database, database_url)
    await db.open()
    try:
        applied = await migrations.apply(db, migrations.load(migrations.default_directory()))
        print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> None:
    """Serve (or migrate). A start-up failure prints one line naming its cause and setting,
    releases what was started, and exits 2."""
    parser = argparse.ArgumentParser(prog="lambda-server", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("serve", "migrate"), default="serve")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"lambda-server: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, settings.log_format)
    try:
        url = settings.database.url or start_embedded(settings.database.embedded_dir)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve(settings, url) if args.command == "serve" else migrate(settings, url))
    except (ConfigError, StartupError, LambdaError) as exc:
        why = exc.message if isinstance(exc, LambdaError) else str(exc)
        _fatal(settings, f"configuration error: {why}" if isinstance(exc, ConfigError) else why)
        raise SystemExit(2) from None


def _fatal(settings: Settings, message: str) -> None:
    """Why the server stops: a log record when logs are JSON (every stderr line one object)."""
    if settings.log_format == "json":
        log.critical("%s", message)
    else:
        print(f"lambda-server: {message}", file=sys.stderr)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
