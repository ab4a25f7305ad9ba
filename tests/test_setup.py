"""The README's promises: `make run` serves on a fresh data folder, and the client installs alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    ServerThread,
    create_database,
    drop_database,
    env_without_database,
    eventually,
    run_sync,
    with_database,
)

pytestmark = pytest.mark.slow


def cli(binary: Path, target: str, *args: str, stdin: str | None = None) -> dict[str, object]:
    result = subprocess.run(
        [str(binary), "--target", target, *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


@pytest.fixture(scope="module")
def client_only_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with nothing but `pip install ./client`."""
    home = tmp_path_factory.mktemp("client-venv")
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT / "client")],
        check=True,
        timeout=600,
    )
    return home


def test_the_client_installs_alone_and_lambda_cli_round_trips(
    client_only_venv: Path, server: ServerThread
) -> None:
    python = client_only_venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    names = {entry["name"].lower() for entry in json.loads(installed)}
    assert "lambda-microservice-client" in names
    assert "asyncpg" not in names and "lambda-microservice-server" not in names
    lambda_cli = client_only_venv / "bin" / "lambda-cli"
    session = cli(
        lambda_cli,
        server.target,
        "init",
        "--language-title",
        "nodejs-cli",
        "--script",
        "-",
        stdin="return event.params.n + 1;",
    )
    executed = cli(lambda_cli, server.target, "exec", str(session["request_id"]), "--params", '{"n": 41}')
    assert executed["result"] == 42
    stored = cli(lambda_cli, server.target, "session", str(session["request_id"]))
    assert stored["execution_count"] == "1"  # int64 is a string in proto JSON
    assert cli(lambda_cli, server.target, "health")["status"] == "HEALTH_STATUS_SERVING"


def test_lambda_cli_reports_errors_as_json_with_a_nonzero_exit(
    client_only_venv: Path, server: ServerThread
) -> None:
    result = subprocess.run(
        [str(client_only_venv / "bin" / "lambda-cli"), "--target", server.target, "exec", "not-a-uuid"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3  # the service refused the call
    assert len(result.stderr.splitlines()) == 1, result.stderr
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["reason"] == "INVALID_REQUEST"


class MakeRun:
    """`make run` in the background, with the address it reports."""

    def __init__(self, data_dir: Path) -> None:
        env = env_without_database()
        env.update(EMBEDDED_DATA_DIR=str(data_dir), LISTEN_ADDR="127.0.0.1:0", LOG_LEVEL="INFO")
        self.process = subprocess.Popen(
            ["make", "-s", "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        self.target = self._wait_for_address()

    def _wait_for_address(self) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            match = re.search(r"serving \S+ on (\S+:\d+)", line)
            if match:
                return match.group(1)
        raise AssertionError("make run exited without serving:\n" + "".join(self.output))

    def stop(self) -> None:
        """SIGTERM to the group, as a terminal or an orchestrator sends: the server stops cleanly."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        finally:
            if self.process.stdout is not None:
                self.output.extend(self.process.stdout.readlines())
                self.process.stdout.close()
        log = "".join(self.output)
        # make itself dies of the signal; the server under it exits cleanly
        assert code in (0, -signal.SIGTERM), log
        assert "lambda_server: stopped" in log, log
        assert "Traceback" not in log, log


@pytest.fixture
def make_run_data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "pgdata"


def test_make_run_serves_with_an_embedded_postgres_that_keeps_sessions(make_run_data: Path) -> None:
    lambda_cli = Path(sys.executable).parent / "lambda-cli"
    first = MakeRun(make_run_data)
    try:
        eventually(
            lambda: cli(lambda_cli, first.target, "health")["status"] == "HEALTH_STATUS_SERVING", timeout=30
        )
        session = cli(
            lambda_cli,
            first.target,
            "init",
            "--language-title",
            "python-kept",
            "--script",
            "-",
            stdin="result = 'kept'",
        )
    finally:
        first.stop()
    second = MakeRun(make_run_data)
    try:
        eventually(
            lambda: cli(lambda_cli, second.target, "health")["status"] == "HEALTH_STATUS_SERVING", timeout=30
        )
        executed = cli(lambda_cli, second.target, "exec", str(session["request_id"]))
        assert executed["result"] == "kept"
    finally:
        second.stop()


def test_the_server_wheel_the_image_installs_carries_migrations_and_workers(
    tmp_path: Path, admin_url: str
) -> None:
    """What the Dockerfile does, short of Docker: build both wheels, install them, migrate."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), "./client", "./server"],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    home = tmp_path / "venv"
    venv.create(home, with_pip=True)
    pip = [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *map(str, wheels.glob("*.whl"))], check=True, timeout=600)
    package = subprocess.run(
        [
            str(home / "bin" / "python"),
            "-c",
            "import lambda_server, os; print(os.path.dirname(lambda_server.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for name in ("migrations/0001_sessions.sql", "runtimes/node_worker.js", "runtimes/runtime_mappings.json"):
        assert (Path(package) / name).is_file(), name
    name = run_sync(create_database(admin_url))
    try:
        env = {**env_without_database(), "DATABASE_URL": with_database(admin_url, name)}
        result = subprocess.run(
            [str(home / "bin" / "lambda-server"), "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        shipped = sorted(path.name for path in (ROOT / "migrations").glob("*.sql"))
        assert f"applied {len(shipped)} migration(s): {', '.join(shipped)}" in result.stdout
    finally:
        run_sync(drop_database(admin_url, name))
