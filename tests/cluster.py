"""A PostgreSQL cluster of a test's own (initdb, pg_ctl), so that the test can stop and start it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


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
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)
