"""An embedded PostgreSQL (pgserver) for `make run` when DATABASE_URL is unset, and its supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from lambda_server.config import ConfigError
from lambda_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Between two restarts of a dead postmaster: the first at once, then 0.5 s, doubling to 10 s.
# Backends of the dead postmaster hold its shared memory for a moment (a start then fails
# "pre-existing shared memory block is still in use"): the next attempt is soon.
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0


class EmbeddedStartFailed(Exception):
    """pg_ctl could not start the embedded PostgreSQL again; the message says why in one line."""


class EmbeddedPostgres:
    """The PostgreSQL kept in one data folder: started by pgserver, restarted with its pg_ctl.

    The data survives restarts of the server; PostgreSQL stops when the last process
    using it exits (pgserver's exit handler).
    """

    def __init__(self, data_dir: Path, handle: Any, url: str) -> None:
        self.data_dir = data_dir
        self.url = url
        self._handle = handle  # pgserver's PostgresServer
        info = handle.get_postmaster_info()
        # where the first start put the socket: the URL names it, so every restart uses it too
        self._socket_dir: Path | None = info.socket_dir
        self._port: int | None = info.port
        self._host: str | None = info.hostname

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Start (or reuse) the PostgreSQL kept in `data_dir`; ConfigError when it cannot.

        Blocking: called once before the event loop starts (initdb, the first time).
        """
        with warnings.catch_warnings():  # platformdirs' "XDG_RUNTIME_DIR is not set": harmless here
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            return cls._start(data_dir)

    @classmethod
    def _start(cls, data_dir: Path) -> EmbeddedPostgres:
        try:
            import pgserver
        except ImportError as exc:
            raise ConfigError(
                "DATABASE_URL is unset and the embedded PostgreSQL is not installed: "
                "set DATABASE_URL or install lambda-microservice-server[embedded]"
            ) from exc
        # pgserver logs every command it runs, initdb's whole output included, at INFO
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        first = not (data_dir / "PG_VERSION").exists()
        log.info(
            "starting the embedded PostgreSQL in %s%s",
            data_dir,
            " (creating it: a few seconds)" if first else "",
        )
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            get_server = pgserver.get_server  # type: ignore[attr-defined]
            handle = get_server(str(data_dir.resolve()), cleanup_mode="stop")
            embedded = cls(data_dir.resolve(), handle, str(handle.get_uri()))
        except Exception as exc:  # pgserver's own errors, or the folder's: one line for the operator
            raise ConfigError(
                f"the embedded PostgreSQL in {data_dir} (EMBEDDED_DATA_DIR) did not start: "
                f"{_one_line(str(exc)) or type(exc).__name__}; or set DATABASE_URL"
            ) from None
        log.info("embedded PostgreSQL ready in %s", data_dir)
        return embedded

    def pid(self) -> int | None:
        """The postmaster's pid while it lives (a zombie does not), else None. Blocking (files)."""
        pid = _lock_pid(self.data_dir / "postmaster.pid")
        return pid if pid is not None and _alive(pid) else None

    def restart(self, timeout: float) -> None:
        """Start the postmaster again within `timeout` seconds (and a few for pg_ctl itself);
        EmbeddedStartFailed when it does not. Blocking: run it in a thread."""
        if self.pid() is not None:  # started meanwhile (another process using the folder)
            self._track(running=True)
            return
        # pgserver's exit handler would wait a minute for the dead postmaster to stop
        self._track(running=False)
        # PostgreSQL takes a lock file naming a zombie (nobody reaped the killed postmaster
        # yet) for a live server's and refuses to start; a dead pid's lock files are stale
        for lock in self._lock_files():
            owner = _lock_pid(lock)
            if owner is not None and not _alive(owner):
                with contextlib.suppress(OSError):
                    lock.unlink()
        import pgserver._commands as commands

        options = ["-o", '-h ""']
        if self._socket_dir is not None:
            options += ["-o", f"-k {self._socket_dir}"]
        elif self._host is not None and self._port is not None:
            options = ["-o", f'-h "{self._host}"', "-o", f"-p {self._port}"]
        command = [
            str(commands.POSTGRES_BIN_PATH / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            str(max(1, int(timeout))),
            "-l",
            str(self.data_dir / "log"),
            *options,
            "start",
        ]
        # its output to a file, not a pipe: the postmaster it starts may hold a pipe open
        with tempfile.TemporaryFile("w+") as output:
            try:
                subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=timeout + 5.0,
                    user=self._handle.system_user,  # PostgreSQL refuses to run as root
                    check=True,
                )
            except subprocess.CalledProcessError:
                output.seek(0)
                raise EmbeddedStartFailed(self._why(output.read())) from None
            except subprocess.TimeoutExpired:
                raise EmbeddedStartFailed(
                    f"pg_ctl did not start it within {timeout:g} s (EMBEDDED_START_TIMEOUT_SECONDS)"
                ) from None
            except OSError as exc:
                raise EmbeddedStartFailed(f"cannot run pg_ctl: {exc}") from None
        self._track(running=True)

    def _lock_files(self) -> list[Path]:
        files = [self.data_dir / "postmaster.pid"]
        if self._socket_dir is not None and self._port is not None:
            files.append(self._socket_dir / f".s.PGSQL.{self._port}.lock")
        return files

    def _why(self, output: str) -> str:
        """pg_ctl's complaint, with the last line of the server's own log where it has one."""
        why = _one_line(output)
        try:
            with (self.data_dir / "log").open("rb") as log_file:  # its tail: the log only grows
                log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - 4096))
                lines = log_file.read().decode(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        if lines:
            why += f"; its log: {_one_line(lines[-1])}"
        return why

    def _track(self, *, running: bool) -> None:
        """Keep pgserver's handle naming the live postmaster, or none: its exit handler stops
        the postmaster it names (the one restarted here, not the dead one)."""
        info = None
        if running:
            from pgserver.utils import PostmasterInfo

            with contextlib.suppress(Exception):  # unreadable: stop nothing rather than fail
                info = PostmasterInfo.read_from_pgdata(self.data_dir)
        self._handle._postmaster_info = info


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the PostgreSQL kept in `data_dir` and return its URL (unsupervised)."""
    return EmbeddedPostgres.start(data_dir).url


class EmbeddedSupervisor:
    """Looks for the embedded postmaster every `interval` seconds and restarts it when it is
    gone, with backoff. After `attempts` failed restarts it calls `on_failed(True)` (the
    server's liveness turns NOT_SERVING, so an orchestrator restarts the process), and it
    keeps trying at the longest backoff; `on_failed(False)` once a restart works."""

    def __init__(
        self,
        postgres: EmbeddedPostgres,
        interval: float,
        attempts: int,
        start_timeout: float,
        on_failed: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._postgres = postgres
        self._interval = interval
        self._attempts = attempts
        self._start_timeout = start_timeout
        self._on_failed = on_failed
        self._attempt = 0  # the restart under way (or the last that failed); 0: it runs
        self._failed = False
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def status(self) -> str | None:
        """None while the postmaster runs; else what the supervisor is doing about it."""
        if not self._attempt:
            return None
        why = f"; last failure: {self._last_error}" if self._last_error else ""
        if self._failed:
            return (
                f"down: not restarted in {self._attempt} attempts (EMBEDDED_RESTART_ATTEMPTS), "
                f"still trying{why}"
            )
        return f"restarting (attempt {self._attempt}){why}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="embedded-postgres-supervisor")

    async def stop(self) -> None:
        """Stop watching; a restart already under way in its thread ends within its bound."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await asyncio.to_thread(self._postgres.pid) is None:
                    await self._restart()
            except Exception:  # a bug here must not end the supervision for good
                log.exception("the embedded PostgreSQL's supervisor failed; it goes on")

    async def _restart(self) -> None:
        log.warning("the embedded PostgreSQL in %s is gone: restarting it", self._postgres.data_dir)
        backoff = FIRST_BACKOFF_SECONDS
        self._attempt, self._last_error = 0, ""
        while True:
            self._attempt += 1
            try:
                await asyncio.to_thread(self._postgres.restart, self._start_timeout)
            except EmbeddedStartFailed as exc:
                self._last_error = str(exc)
                log.warning("restarting the embedded PostgreSQL, attempt %d: %s", self._attempt, exc)
                if self._attempt >= self._attempts and not self._failed:
                    self._failed = True
                    log.error(
                        "the embedded PostgreSQL did not restart in %d attempts "
                        "(EMBEDDED_RESTART_ATTEMPTS): liveness NOT_SERVING",
                        self._attempt,
                    )
                    await self._on_failed(True)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_SECONDS)
                continue
            log.warning("the embedded PostgreSQL restarted (attempt %d)", self._attempt)
            self._attempt, self._last_error = 0, ""
            if self._failed:
                self._failed = False
                await self._on_failed(False)
            return


def _lock_pid(path: Path) -> int | None:
    """The pid on the first line of a PostgreSQL lock file, None when there is none."""
    try:
        with path.open() as lock:
            return int(lock.readline().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether PostgreSQL runs as `pid`: a zombie (dead, not reaped yet) does not, nor
    another program that got the pid since."""
    if not Path("/proc/self").exists():  # no /proc here: ask the kernel (a zombie counts)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return name.startswith("postgres") and rest.split()[0] not in ("Z", "X")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
