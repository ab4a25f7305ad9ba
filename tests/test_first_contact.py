"""A newcomer's first hour: `make run`'s defaults never throttle them, lambda-cli reports a
mistake in one line with a documented exit status, and a server that cannot start says why
in one line, exits 2 and leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lambda_microservice import LambdaClient, to_python
from lambda_server.config import Settings
from tests.support import (
    ROOT,
    ServerThread,
    env_without_database,
    eventually,
    free_port,
    server_settings,
    serving_before_the_database,
)

# --- defaults ---------------------------------------------------------------------------


def test_make_runs_defaults_admit_a_thousand_executions_a_minute_from_one_address(database_url: str) -> None:
    defaults = Settings.from_env({})  # what `make run` serves with, but for the ports
    assert defaults.auth.mode == "none" and defaults.auth.anonymous_rate_limit_per_minute == 0
    settings = replace(defaults, listen_addr="127.0.0.1:0", metrics_addr=None, http_addr=None)
    running = ServerThread(settings, database_url)
    try:
        with LambdaClient(running.target, timeout=30) as client:
            session = client.initialize("python-first_contact", "result = params['n'] * 2")
            started = time.monotonic()
            results = [to_python(client.execute(session.request_id, {"n": n}).result) for n in range(1000)]
            assert results == [n * 2 for n in range(1000)]
            # all within the minute a limit would count them in (a loaded machine takes ~10 s)
            assert time.monotonic() - started < 60
            assert client.get_session(session.request_id).execution_count == 1000
    finally:
        running.stop()


def test_with_jwt_the_per_user_limit_is_on_by_default() -> None:
    settings = Settings.from_env({"AUTH_MODE": "jwt", "JWT_SECRET": "s"})
    assert settings.auth.rate_limit_per_minute == 100


# --- lambda-cli ---------------------------------------------------------------------------


def lambda_cli(
    *args: str, target: str | None = None, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """lambda-cli run as a user would, with `input` on its stdin (none: no stdin)."""
    command = [sys.executable, "-m", "lambda_microservice.cli"]
    if target is not None:
        command += ["--target", target]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
    )


def test_lambda_cli_reports_a_users_mistake_in_one_line_with_exit_2(
    server: ServerThread, tmp_path: Path
) -> None:
    mistakes = [
        ("init", "--language-title", "python-x", "--script", str(tmp_path / "missing.py")),
        ("init", "--language-title", "python-x", "--script", "-", "--context", "{nope"),
        ("exec", "00000000-0000-4000-8000-000000000001", "--params", "[1, 2]"),
        ("exec",),  # argparse: the request_id is missing
    ]
    for args in mistakes:
        result = lambda_cli(*args, target=server.target)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("lambda-cli"), result.stderr
    missing = lambda_cli(*mistakes[0], target=server.target)
    assert "missing.py" in missing.stderr and "No such file" in missing.stderr


def test_lambda_cli_into_a_reader_that_stops_early_ends_quietly(server: ServerThread) -> None:
    """`lambda-cli health | head -1`: the reader closes the pipe after one line; lambda-cli
    ends with 0 and no traceback rather than a BrokenPipeError."""
    command = [sys.executable, "-m", "lambda_microservice.cli", "--target", server.target, "health"]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert cli.stdout is not None and cli.stderr is not None
    cli.stdout.close()  # the reader is gone before lambda-cli prints
    with cli.stderr:
        assert cli.wait(120) == 0
        assert cli.stderr.read() == b""


def test_lambda_cli_exits_1_when_the_script_fails_and_3_when_the_call_fails(server: ServerThread) -> None:
    with LambdaClient(server.target) as client:
        failing = client.initialize("python-cli_fails", "raise ValueError('no')").request_id
    failed = lambda_cli("exec", failing, target=server.target)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert '"RUNTIME_ERROR"' in failed.stdout or "EXECUTION_ERROR_CODE_RUNTIME_ERROR" in failed.stdout
    down = lambda_cli("--timeout", "5", "health", target=f"127.0.0.1:{free_port()}")
    assert down.returncode == 3, down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and '"UNAVAILABLE"' in down.stderr
    unknown = lambda_cli("session", "00000000-0000-4000-8000-00000000dead", target=server.target)
    assert unknown.returncode == 3 and '"NOT_FOUND"' in unknown.stderr


def test_lambda_cli_exec_prints_integers_as_integers(server: ServerThread) -> None:
    """A newcomer's report: every integer came back as a float (400000.0)."""
    with LambdaClient(server.target) as client:
        script = "result = {'n': params['n'] * 1000, 'half': 0.5, 'list': [1, 2]}"
        session = client.initialize("python-cli_ints", script).request_id
    executed = lambda_cli("exec", session, "--params", '{"n": 400}', target=server.target)
    assert executed.returncode == 0, executed.stderr
    answer = json.loads(executed.stdout)
    assert answer["result"] == {"n": 400000, "half": 0.5, "list": [1, 2]}
    assert type(answer["result"]["n"]) is int and "400000.0" not in executed.stdout
    assert "result_json" not in answer  # the result is shown once, exactly


def test_lambda_cli_health_exits_1_unless_serving(database_url: str) -> None:
    # a server whose database is away serves NOT_SERVING
    settings = serving_before_the_database(server_settings())
    running = ServerThread(settings, f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    try:
        result = lambda_cli("health", target=running.target)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "HEALTH_STATUS_NOT_SERVING" in result.stdout
    finally:
        running.stop()


def test_lambda_cli_help_shows_the_built_in_default_target_and_the_exit_codes() -> None:
    result = lambda_cli("--help", LAMBDA_TARGET="10.9.8.7:1234")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "127.0.0.1:50051" in text and "10.9.8.7" not in text
    for status in ("0 success", "1 the script failed", "2 bad usage", "3 the service refused"):
        assert status in text, text


# --- start-up failures ----------------------------------------------------------------------


class Start:
    """`python -m lambda_server` that is expected to fail, with what it leaves behind."""

    def __init__(self, tmp: Path, database_url: str, **env: str) -> None:
        # a temporary folder of its own: every worker it starts has its cwd there
        self.tmp = tmp
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lambda_server"],
            cwd=ROOT,
            env={
                **env_without_database(),
                "DATABASE_URL": database_url,
                "LISTEN_ADDR": "127.0.0.1:0",
                "LOG_LEVEL": "INFO",
                "TMPDIR": str(tmp),
                "HOME": str(tmp),  # RUST_CACHE_DIR: the one-time build is under way at start
                **env,
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=120)
        return self.process.returncode, err

    def cgroups(self) -> list[Path]:
        """The sandbox's cgroup folders of this server (`lambda-<pid>-…`, v1 or v2)."""
        root = Path("/sys/fs/cgroup")
        pattern = f"lambda-{self.process.pid}-*"
        return [*root.glob(pattern), *root.glob(f"*/{pattern}"), *root.glob(f"*/*/{pattern}")]

    def processes(self) -> list[int]:
        """Live processes whose working folder is under this server's temporary folder."""
        found = []
        for cwd in Path("/proc").glob("[0-9]*/cwd"):
            try:
                if str(cwd.readlink()).startswith(str(self.tmp)):
                    found.append(int(cwd.parent.name))
            except OSError:
                continue
        return found


def assert_failed_cleanly(start: Start, *names: str) -> str:
    code, err = start.result()
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lambda-server: "), err
    for name in names:
        assert name in last, last
    eventually(lambda: not start.cgroups() and not start.processes(), timeout=30)
    return last


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize("setting", ["LISTEN_ADDR", "METRICS_ADDR", "HTTP_ADDR"])
def test_a_port_in_use_is_one_line_exit_2_and_nothing_left(
    database_url: str, tmp_path: Path, listening: int, setting: str
) -> None:
    start = Start(tmp_path, database_url, **{setting: f"127.0.0.1:{listening}"})
    last = assert_failed_cleanly(start, setting, str(listening))
    assert "in use" in last


def test_an_invalid_setting_is_one_line_exit_2(database_url: str, tmp_path: Path) -> None:
    start = Start(tmp_path, database_url, RUNTIME_START_TIMEOUT_SECONDS="soon")
    assert_failed_cleanly(start, "RUNTIME_START_TIMEOUT_SECONDS", "soon")


def test_a_database_unreachable_past_its_timeout_is_one_line_exit_2_and_nothing_left(
    tmp_path: Path,
) -> None:
    start = Start(
        tmp_path,
        f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        DATABASE_STARTUP_TIMEOUT_SECONDS="3",
    )
    # while it waits, its sandbox exists (so the checks below can fail)
    eventually(lambda: start.cgroups() or start.process.poll() is not None, timeout=60)
    assert start.cgroups(), start.result()
    assert_failed_cleanly(start, "DATABASE_URL", "DATABASE_STARTUP_TIMEOUT_SECONDS", "3 s")
