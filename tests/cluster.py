"""A PostgreSQL cluster of a test's own (initdb, pg_ctl), so that the test can stop and start it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
# what the postmaster logs when its port is taken
BIND_FAILURES = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")


def available() -> str | None:
    """Why a cluster cannot be made here, or None when it can."""
    if not (BIN / "initdb").exists():
        return f"PostgreSQL's server programs are not in {BIN}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "as root, initdb must run as another user, and runuser is missing"
    return None


class Cluster:
    """A throwaway PostgreSQL on 127.0.0.1:<port>, trust authentication, data in a temp dir."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="lambda-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.started_at = 0.0
        self._started = False  # once started, the port is known to others: it stays
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self, timeout: float = 30.0) -> None:
        """pg_ctl start. The port was free when picked, but another process may have bound it
        since: at the first start the cluster moves to a new port (nothing knows this one
        yet); a restart keeps its port (the server under test holds the URL) and tries again
        until it is free, for `timeout` seconds. `started_at`: when the start that worked began."""
        log = self.directory / "log"
        deadline = time.monotonic() + timeout
        while True:
            seen = log.stat().st_size if log.exists() else 0
            self.started_at = time.monotonic()
            options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
            command = ["-D", str(self.data), "-o", options, "-l", str(log), "-w", "start"]
            try:
                self._run(str(BIN / "pg_ctl"), *command)
            except subprocess.CalledProcessError as exc:
                written = log.read_bytes()[seen:].decode(errors="replace") if log.exists() else ""
                if not any(sign in written for sign in BIND_FAILURES) or time.monotonic() > deadline:
                    raise AssertionError(
                        f"pg_ctl start on port {self.port} failed: {exc.stderr!r}; its log, {log}:\n{written}"
                    ) from exc
                if not self._started:
                    self.port = free_port()
                    self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
                else:
                    time.sleep(0.5)
                continue
            self._started = True
            return

    def stop(self, mode: str = "fast") -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)
