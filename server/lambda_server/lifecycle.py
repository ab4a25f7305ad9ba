"""The running server: start-up as one stack of named steps, ordered stop, the database
monitor that drives health. app.py wires the parts; this module runs them."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.api.http import HttpApi
from lambda_server.config import Settings
from lambda_server.errors import DatabaseUnavailable, LambdaError
from lambda_server.metrics import Metrics
from lambda_server.runtimes.pool import EnvironmentPool
from lambda_server.store import migrations
from lambda_server.store.cleanup import SessionCleanup
from lambda_server.store.database import Database
from lambda_server.store.embedded import EmbeddedSupervisor
from lambda_server.store.request_log import RequestLogWriter
from lambda_server.tasks import cancel_and_wait
from lambda_server.usecases.builds import RustBuilds

log = logging.getLogger("lambda_server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LambdaService"].full_name
LIVENESS = "liveness"


class DatabaseMonitor:
    """Pings PostgreSQL every HEALTH_INTERVAL_SECONDS and drives the health status.

    It runs the migrations step only when start-up went on without PostgreSQL
    (DATABASE_STARTUP_TIMEOUT_SECONDS=0): once the database answers, before SERVING.
    `outage` says what is being done about a database that does not answer (the
    embedded PostgreSQL's supervisor restarting it), when something is.
    """

    def __init__(
        self,
        db: Database,
        health_servicer: HealthServicer,
        interval: float,
        migrator: migrations.Migrator,
        outage: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._db = db
        self._migrator = migrator
        self._health = health_servicer
        self._interval = interval
        self._outage = outage
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
            await self._db.ping(timeout=max(self._interval, 1.0))
            await self._migrator.run_once()  # nothing to do once start-up did it
        except LambdaError as exc:
            await self._set(False, self._outage() or f"unavailable: {exc.message}")
        else:
            await self._set(True, "ok")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="database-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
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


class Steps:
    """What start-up started, as one AsyncExitStack of named stop steps.

    Each step of the wiring and of `Server.start` registers how to undo itself as soon as
    it has started something, so closing releases what was started, in reverse order,
    wherever start-up stopped. Closing runs every step even when one fails: the failure is
    logged with the step's name and the rest still run (the pool's close above all, or
    its workers and cgroups outlive the server).
    """

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()

    def push(self, name: str, stop: Callable[[], Awaitable[object] | object]) -> None:
        """Register `stop` (a function, sync or async) to run at close, before those pushed earlier."""

        async def step() -> None:
            try:
                result = stop()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("stopping: %s failed; stopping the rest", name)

        self._stack.push_async_callback(step)

    async def close(self) -> None:
        """Run every step, last pushed first; a second close finds none left."""
        await self._stack.aclose()


class Server:
    """The running service: the gRPC server and everything it owns, stopped in order."""

    def __init__(
        self,
        settings: Settings,
        steps: Steps,
        grpc_server: grpc.aio.Server,
        db: Database,
        pool: EnvironmentPool,
        monitor: DatabaseMonitor,
        health_servicer: HealthServicer,
        cleanup: SessionCleanup,
        *,
        metrics: Metrics,
        request_log: RequestLogWriter,
        builds: RustBuilds | None,
        migrator: migrations.Migrator,
        supervisor: EmbeddedSupervisor | None = None,
        http_api: HttpApi | None = None,
    ) -> None:
        self.settings = settings
        # the components start() starts, public as a seam: a test may swap one for one that fails
        self.cleanup = cleanup
        self.metrics = metrics
        self.pool = pool
        self.monitor = monitor
        self.request_log = request_log
        self.builds = builds
        self.supervisor = supervisor
        self.http_api = http_api
        self._steps = steps
        self._grpc = grpc_server
        self._db = db
        self._health = health_servicer
        self._migrator = migrator
        self._grace = settings.shutdown_grace_seconds

    async def start(self) -> None:
        """Serve; when any step fails, what the steps before it started is stopped again
        (in reverse order), and the error goes on."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0.0)
            raise

    async def _start(self) -> None:
        steps = self._steps
        _set_priority(self.settings.server_nice)
        if self.builds is not None:
            self.builds.start()  # the one-time dependency build, in the background from now
            steps.push("the Rust builds", self.builds.close)
        if self.settings.metrics_addr is not None:
            port = await self.metrics.serve(self.settings.metrics_addr)  # ConfigError when it cannot bind
            steps.push("the metrics endpoint", self.metrics.stop_serving)
            # not "serving ... on": scripts read the gRPC address from that line
            log.info("metrics at http://%s:%d/metrics", self.settings.metrics_addr.rpartition(":")[0], port)
        self.request_log.start()
        # closed after the gRPC server's calls ended, so that their logs are in
        steps.push("the request-log writer", self.request_log.close)
        await self._grpc.start()
        steps.push("the gRPC server", self._stop_grpc)
        if self.http_api is not None and self.settings.http_addr is not None:
            # on the same loop as gRPC; stopped with it, after the drain, their calls and
            # requests in flight given SHUTDOWN_GRACE_SECONDS at once (not one after the other)
            port = await self.http_api.start(self.settings.http_addr)  # ConfigError when it cannot bind
            steps.push("the HTTP/JSON API and the gRPC server", self._stop_front_doors)
            log.info("HTTP/JSON API at http://%s:%d/api/v1", self.settings.http_addr.rpartition(":")[0], port)
        if self.supervisor is not None:  # from here on: start-up's wait may need a restart too
            self.supervisor.start()
            steps.push("the embedded PostgreSQL's supervisor", self.supervisor.stop)
        await self._prepare_database()
        await self.pool.start()  # closed by a step of the wiring
        await self.monitor.check_once()  # health SERVING (or NOT_SERVING, with a reason)
        self.monitor.start()
        steps.push("the database monitor", self.monitor.stop)
        self.cleanup.start()
        steps.push("the session cleanup", self.cleanup.stop)
        steps.push("the drain", self._drain)  # the first step of a stop

    async def _prepare_database(self) -> None:
        """Wait for PostgreSQL's first answer (DATABASE_STARTUP_TIMEOUT_SECONDS at most), then
        apply the migrations once. With 0: one try; the monitor goes on trying (and migrates
        once the database answers) while health says NOT_SERVING."""
        limit = self.settings.database.startup_timeout
        until = time.monotonic() + limit
        ping = max(self.settings.health_interval_seconds, 1.0)
        waiting = False
        while True:
            try:
                await self._db.ping(timeout=ping)
            except LambdaError as exc:  # refused, unreachable, or not let in (yet): wait
                why = exc.message
            else:
                try:
                    applied = await self._migrator.run_once()
                except DatabaseUnavailable as exc:  # a failing migration (InternalError) ends start-up
                    why = exc.message
                else:
                    log.info("migrations: %s", ", ".join(applied) or "none needed")
                    return
            if not limit:
                log.warning("serving without PostgreSQL, NOT_SERVING until it answers: %s", why)
                return
            if time.monotonic() >= until:
                raise StartupError(
                    f"PostgreSQL did not answer within {limit:g} s of start-up (DATABASE_URL, "
                    f"DATABASE_STARTUP_TIMEOUT_SECONDS): {why}"
                )
            if not waiting:
                waiting = True
                log.info("waiting up to %g s for PostgreSQL: %s", limit, why)
            await asyncio.sleep(min(0.5, max(0.0, until - time.monotonic())))

    async def _drain(self) -> None:
        """Health NOT_SERVING while still serving: load balancers stop sending calls here.
        The monitor stops first, so that LambdaService.Health says so too ("shutting down")."""
        await self.monitor.stop()  # safe again as its own step later
        await self._health.enter_graceful_shutdown()
        if self.settings.shutdown_drain_seconds:
            await asyncio.sleep(self.settings.shutdown_drain_seconds)

    async def _stop_front_doors(self) -> None:
        """Both front doors at once: each one's calls in flight get the same grace. The gRPC
        server's own step finds it stopped already."""
        assert self.http_api is not None
        await asyncio.gather(self.http_api.stop(), self._stop_grpc())

    async def _stop_grpc(self) -> None:
        await self._health.enter_graceful_shutdown()
        await self._grpc.stop(self._grace)  # in-flight calls get the grace

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, in-flight calls get `grace` seconds, then all is closed,
        every step even when one fails (each failure is logged). Safe after a start that
        failed at any step, and a second time."""
        self._grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self._steps.close()

    @property
    def http_port(self) -> int | None:
        """The HTTP/JSON API's port, once started (None when HTTP_ADDR is off)."""
        return None if self.http_api is None else self.http_api.port

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()


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
