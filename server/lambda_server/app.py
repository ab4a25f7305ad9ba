"""Wiring: every part of the server made and handed to lifecycle.Server; `main` is the
`lambda-server` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import logging
import signal
import socket
import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lambda_server import logs
from lambda_server.api.convert import ExecutePayloads
from lambda_server.api.gate import Gate
from lambda_server.api.http import HttpApi
from lambda_server.api.interceptors import CallInterceptor, inflight_budget
from lambda_server.api.servicer import LambdaServicer, add_to_server
from lambda_server.auth import Authenticator
from lambda_server.config import ConfigError, GrpcSettings, Settings, settings_table
from lambda_server.domain import Limits
from lambda_server.errors import LambdaError
from lambda_server.lifecycle import LIVENESS, SERVICE_NAME, DatabaseMonitor, Server, StartupError, Steps
from lambda_server.limits import RateLimiter
from lambda_server.metrics import Metrics
from lambda_server.result_cache import ResultCache
from lambda_server.runtimes.batch import BatchRunner
from lambda_server.runtimes.layers import LayerStore, Resolver
from lambda_server.runtimes.npm import NpmResolver, find_npm, npm_version
from lambda_server.runtimes.pool import EnvironmentPool
from lambda_server.runtimes.registry import RuntimeRegistry
from lambda_server.runtimes.rust import RustCompiler, RustToolchain
from lambda_server.runtimes.uv import UvResolver, find_uv
from lambda_server.sandbox import Sandbox
from lambda_server.sandbox.memory import memory_budget_mb
from lambda_server.store import migrations
from lambda_server.store.artifacts import ArtifactStore
from lambda_server.store.catalog import FunctionCatalog
from lambda_server.store.cleanup import SessionCleanup
from lambda_server.store.database import Database
from lambda_server.store.embedded import EmbeddedPostgres, EmbeddedSupervisor
from lambda_server.store.layers import LayerRecords
from lambda_server.store.request_log import RequestLogWriter
from lambda_server.store.sessions import OwnerQuota, SessionStore
from lambda_server.usecases import Catalog, Execute, ExecuteBatch, GetSession, Health, Initialize, UseCases
from lambda_server.usecases.builds import RustBuilds
from lambda_server.usecases.dependencies import Dependencies
from lambda_server.usecases.options import SessionOptionsPolicy
from lambda_server.usecases.runs import SessionRuns
from lambda_server.validation import ParamsValidator

log = logging.getLogger("lambda_server")


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


async def build_server(
    settings: Settings, database_url: str | None = None, *, embedded: EmbeddedPostgres | None = None
) -> tuple[Server, int]:
    """Wire the service and bind its port (0 picks a free one); call `start()` to serve.

    `embedded`: the embedded PostgreSQL at `database_url`, which the server then supervises.
    When a step fails, what the steps before it made (the sandbox's cgroups, the pool) is
    released before the error goes on."""
    url = database_url or settings.database.url
    if url is None:
        raise ConfigError("DATABASE_URL is unset (main() starts an embedded PostgreSQL for it)")
    # read once at start: a broken migrations directory stops start-up, not every health probe
    schema = migrations.load(migrations.default_directory())
    toolchain = await RustToolchain.detect(settings.runtime.rustc, settings.runtime.rust_crate_registry)
    registry = RuntimeRegistry.load(
        settings.runtime.mappings_file, settings.runtime.node_binary, toolchain.spec
    )
    steps = Steps()
    try:
        return await _wire(settings, url, schema, registry, toolchain, steps, embedded)
    except BaseException:
        await steps.close()
        raise


async def _wire(
    settings: Settings,
    url: str,
    schema: list[migrations.Migration],
    registry: RuntimeRegistry,
    toolchain: RustToolchain,
    steps: Steps,
    embedded: EmbeddedPostgres | None,
) -> tuple[Server, int]:
    """Every part of the server, each that holds something registered in `steps` as it is made."""
    sandbox = await Sandbox.start(settings.sandbox)
    steps.push("the sandbox", sandbox.close)
    db = Database(settings.database, url)
    await db.open()
    steps.push("the database pool", db.close)
    migrator = migrations.Migrator(db, schema)
    limits = Limits(settings.sandbox.memory_mb, settings.sandbox.max_processes)
    total_memory_mb = await memory_budget_mb(settings.sandbox)
    metrics = Metrics()
    layer_records = LayerRecords(db)
    layers = _layer_store(settings, registry, layer_records, metrics)
    steps.push("the layer store", layers.close)
    pool = EnvironmentPool(settings.runtime, registry.specs, sandbox, limits, total_memory_mb)
    steps.push("the environment pool", pool.close)
    health_servicer = HealthServicer()
    supervisor = None
    if embedded is not None:

        async def liveness(failed: bool) -> None:
            status = health_pb2.HealthCheckResponse
            await health_servicer.set(LIVENESS, status.NOT_SERVING if failed else status.SERVING)

        supervisor = EmbeddedSupervisor(
            embedded,
            settings.health_interval_seconds,
            settings.database.embedded_restart_attempts,
            settings.database.embedded_start_timeout,
            on_failed=liveness,
        )
    monitor = DatabaseMonitor(
        db,
        health_servicer,
        settings.health_interval_seconds,
        migrator,
        outage=(lambda: supervisor.status) if supervisor is not None else (lambda: None),
    )
    cache = ResultCache(settings.result_cache_bytes, metrics)
    quota = OwnerQuota(
        settings.auth.max_sessions_per_owner,
        settings.auth.max_script_bytes_per_owner,
        settings.dependencies.max_layer_bytes_per_owner,
    )
    sessions = SessionStore(
        db,
        observe_claim_batch=metrics.claim_batch_size.observe,
        quota=quota,
        observe_create_batch=metrics.create_batch_size.observe,
        cache_seconds=settings.database.session_cache_seconds,
        count_flush_ms=settings.database.session_count_flush_ms,
    )
    steps.push("the session store", sessions.close)
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
    dependencies = Dependencies(settings.dependencies, layers, layer_records)
    usecases = _usecases(
        settings, sessions, pool, registry, monitor, sandbox, cache, db, metrics, builds, dependencies
    )
    request_log = RequestLogWriter(db, settings.request_log, metrics)
    metrics.on_scrape(_scrape_gauges(metrics, pool, db, request_log))
    metrics.count_at_scrape(
        "lambda_sandbox_freezer_writes",
        "Writes to idle environments' freezer cgroups, by the state written (frozen, thawed)",
        "state",
        lambda: sandbox.freezer_writes,
    )
    metrics.count_at_scrape(
        "lambda_sandbox_owner_moves",
        "Moves of environments into their owners' cpu groups that failed (the environment stays "
        "outside its owner's share) or outlived a release's wait (slow)",
        "outcome",
        lambda: sandbox.owner_moves,
    )

    logged = request_log if settings.request_log.enabled else None
    inflight = inflight_budget(settings.grpc)  # one budget for both front doors
    grpc_server = grpc.aio.server(
        interceptors=[CallInterceptor(metrics, logged, inflight)],
        options=grpc_options(settings.grpc),
        maximum_concurrent_rpcs=settings.grpc.max_concurrent_rpcs or None,
    )
    # what both front doors share: the callers' authentication and buckets, and the payloads'
    # bounds (and the large conversions' pacing, per owner)
    gate = Gate(Authenticator(settings.auth), RateLimiter(settings.auth, metrics))
    payloads = ExecutePayloads(
        settings.runtime.max_json_nodes, settings.runtime.max_json_depth, settings.grpc.max_send_message_bytes
    )
    add_to_server(LambdaServicer(usecases, gate, payloads), grpc_server)
    http_api = HttpApi(
        usecases,
        gate,
        payloads,
        metrics,
        logged,
        inflight,
        max_body_bytes=settings.grpc.max_receive_message_bytes,
        cors_origins=settings.cors_allowed_origins,
        grace=settings.shutdown_grace_seconds,
        max_request_timeout=settings.http_max_request_timeout_seconds,
        body_timeout=settings.http_body_timeout_seconds,
    )
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
    # for liveness probes: SERVING while the process lives, whatever PostgreSQL does, but
    # for an embedded PostgreSQL that cannot be restarted (a new process might fix that)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    port = await _listen(grpc_server, settings.listen_addr)
    # a server bound but never started: its port is released here (a started one is
    # stopped with its grace by a step of start())
    steps.push("the gRPC port", lambda: grpc_server.stop(0))
    cleanup = SessionCleanup(
        db,
        settings.cleanup_interval_seconds,
        settings.session_retention_seconds,
        metrics,
        settings.runtime.artifact_retention_seconds,
        settings.dependencies.layer_retention_seconds,
    )
    layers.start()
    server = Server(
        settings,
        steps,
        grpc_server,
        db,
        pool,
        monitor,
        health_servicer,
        cleanup,
        metrics=metrics,
        request_log=request_log,
        builds=builds,
        migrator=migrator,
        supervisor=supervisor,
        http_api=http_api,
    )
    return server, port


def _usecases(
    settings: Settings,
    sessions: SessionStore,
    pool: EnvironmentPool,
    registry: RuntimeRegistry,
    monitor: DatabaseMonitor,
    sandbox: Sandbox,
    cache: ResultCache,
    db: Database,
    metrics: Metrics,
    builds: RustBuilds | None,
    dependencies: Dependencies,
) -> UseCases:
    """Each use case with what it needs, and no more."""
    options = SessionOptionsPolicy(settings.runtime, settings.sandbox)
    params = ParamsValidator()  # one cache of compiled schemas, for Initialize and Execute
    catalog = Catalog(FunctionCatalog(db), registry, params)
    runs = SessionRuns(sessions, registry, cache, params, options, metrics, builds, dependencies)
    return UseCases(
        initialize=Initialize(
            registry,
            sessions,
            pool,
            catalog,
            options,
            metrics,
            builds,
            dependencies,
            max_script_size=settings.runtime.max_script_size,
            expiry_seconds=settings.session_expiry_seconds,
        ),
        execute=Execute(runs, pool),
        execute_batch=ExecuteBatch(
            runs,
            BatchRunner(pool, settings.runtime),
            settings.runtime.max_batch_size,
            answer_bytes=settings.grpc.max_send_message_bytes,
        ),
        get_session=GetSession(sessions, options),
        catalog=catalog,
        health=Health(monitor, pool, sandbox.health(), builds, (dependencies.health(_tools(registry)),)),
    )


def _tools(registry: RuntimeRegistry) -> dict[str, str]:
    """Each resolver's tool and its version, for Health."""
    try:
        uv = f"uv {importlib.metadata.version('uv')}"
    except importlib.metadata.PackageNotFoundError:
        uv = "uv"
    nodejs = registry.specs.get("nodejs")
    return {"python": uv, "nodejs": npm_version(find_npm(nodejs.interpreter if nodejs is not None else None))}


def _layer_store(
    settings: Settings, registry: RuntimeRegistry, records: LayerRecords, metrics: Metrics
) -> LayerStore:
    """The host's layers, with a resolver per runtime that has one; LAYER_DIR's layers are
    bound read-only into every environment of those runtimes (pre-started ones too, so that
    any of them can bind a script with dependencies)."""
    deps = settings.dependencies
    resolvers: dict[str, Resolver] = {}
    python = registry.specs.get("python")
    uv = find_uv()
    if python is not None and python.available and uv is not None:
        resolvers["python"] = UvResolver(
            uv,
            python.interpreter,
            deps.python_package_index,
            deps.layer_dir,
            index_timeout=deps.package_index_timeout_seconds,
        )
    elif uv is None:
        log.warning("no uv: Python sessions with dependencies are refused (DEPENDENCY_NOT_ALLOWED)")
    nodejs = registry.specs.get("nodejs")
    npm = find_npm(nodejs.interpreter if nodejs is not None else None)
    if nodejs is not None and nodejs.available and npm is not None:
        resolvers["nodejs"] = NpmResolver(
            npm,
            nodejs.interpreter,
            deps.npm_registry,
            deps.layer_dir,
            index_timeout=deps.package_index_timeout_seconds,
        )
    elif npm is None:
        log.warning("no npm: Node.js sessions with dependencies are refused (DEPENDENCY_NOT_ALLOWED)")
    layers = LayerStore(
        deps.layer_dir,
        resolvers,
        max_layer_bytes=deps.max_layer_bytes,
        install_timeout_seconds=deps.install_timeout_seconds,
        retention_seconds=deps.layer_retention_seconds,
        sweep_interval=settings.cleanup_interval_seconds,
        in_use=records.in_use,
        on_install=lambda runtime: metrics.layer_installs.labels(runtime).inc(),
        slots=deps.slots,
        slots_per_owner=deps.slots_per_owner,
    )
    folder = str(layers.folder)
    registry.bind(folder)
    return layers


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


async def serve(settings: Settings, database_url: str, embedded: EmbeddedPostgres | None = None) -> None:
    server, port = await build_server(settings, database_url, embedded=embedded)
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
        applied = await migrations.Migrator(db, migrations.load(migrations.default_directory())).run_once()
        print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> None:
    """Serve (or migrate). A start-up failure prints one line naming its cause and setting,
    releases what was started, and exits 2."""
    parser = argparse.ArgumentParser(prog="lambda-server", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("serve", "migrate", "settings"), default="serve")
    args = parser.parse_args(argv)
    if args.command == "settings":  # every variable, its default and meaning: needs no valid environment
        print(settings_table())
        return
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"lambda-server: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, settings.log_format)
    try:
        embedded = None
        url = settings.database.url
        if url is None:  # blocking (initdb the first time): before the event loop
            embedded = EmbeddedPostgres.start(settings.database.embedded_dir)
            url = embedded.url
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            if args.command == "serve":
                runner.run(serve(settings, url, embedded))
            else:
                runner.run(migrate(settings, url))
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
