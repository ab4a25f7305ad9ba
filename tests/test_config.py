"""Configuration: read once from the environment; an invalid value stops start-up naming the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lambda_server import config
from lambda_server.config import ConfigError, RuntimeSettings, Settings
from tests.support import ROOT


def test_defaults_are_those_of_the_service_we_replace() -> None:
    settings = Settings.from_env({})
    assert settings.listen_addr == "127.0.0.1:50051"
    assert settings.session_expiry_seconds == 3600
    assert settings.runtime.timeout_seconds == 30
    assert settings.runtime.max_script_size == 1024 * 1024
    assert settings.database.url is None


def test_the_grpc_server_settings_are_read_and_become_its_options() -> None:
    from lambda_server.app import grpc_options

    settings = Settings.from_env(
        {
            "GRPC_MAX_RECEIVE_MESSAGE_BYTES": "1000",
            "GRPC_MAX_CONCURRENT_RPCS": "7",
            "GRPC_KEEPALIVE_TIME_SECONDS": "30",
            "GRPC_MAX_CONNECTION_AGE_SECONDS": "300",
            "SHUTDOWN_DRAIN_SECONDS": "5",
        }
    )
    assert settings.grpc.max_concurrent_rpcs == 7
    assert settings.shutdown_drain_seconds == 5
    options = dict(grpc_options(settings.grpc))
    assert options["grpc.max_receive_message_length"] == 1000
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.so_reuseport"] == 0
    defaults = dict(grpc_options(Settings.from_env({}).grpc))
    assert defaults["grpc.max_send_message_length"] == 4 * 1024 * 1024
    assert "grpc.max_connection_age_ms" not in defaults  # off unless asked for


def test_values_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@db/x",
            "LISTEN_ADDR": "[::]:6000",
            "SESSION_EXPIRY_SECONDS": "60",
            "RUNTIME_TIMEOUT_SECONDS": "2.5",
            "MAX_SCRIPT_SIZE": "1000",
            "DATABASE_STATEMENT_CACHE": "off",
        }
    )
    assert settings.database.url == "postgresql://u@db/x"
    assert settings.listen_addr == "[::]:6000"
    assert settings.session_expiry_seconds == 60
    assert settings.runtime.timeout_seconds == 2.5
    assert settings.runtime.max_script_size == 1000
    assert settings.database.statement_cache is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SESSION_EXPIRY_SECONDS", "abc"),
        ("SESSION_EXPIRY_SECONDS", "-5"),
        ("RUNTIME_TIMEOUT_SECONDS", "0"),
        ("RUNTIME_TIMEOUT_SECONDS", "nan"),
        ("MAX_SCRIPT_SIZE", "1.5"),
        ("LISTEN_ADDR", "nowhere"),
        ("LISTEN_ADDR", "host:99999"),
        ("DATABASE_STATEMENT_CACHE", "maybe"),
        ("LOG_LEVEL", "LOUD"),
        ("AUTH_MODE", "basic"),
        ("AUTH_MODE", "jwt"),  # without a key
        ("GRPC_MAX_CONCURRENT_RPCS", "-1"),
        ("GRPC_KEEPALIVE_TIME_SECONDS", "0"),
        ("METRICS_ADDR", "9090"),
        ("SHUTDOWN_DRAIN_SECONDS", "-1"),
    ],
)
def test_an_invalid_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_the_server_refuses_to_start_on_an_invalid_value() -> None:
    env = {
        **os.environ,
        "SESSION_EXPIRY_SECONDS": "soon",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x",
    }
    result = subprocess.run(
        [sys.executable, "-m", "lambda_server"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "SESSION_EXPIRY_SECONDS" in result.stderr
    assert "Traceback" not in result.stderr


def test_each_default_is_declared_once_on_its_field() -> None:
    # from_env passes only the variables that are set: every default is the field's own
    assert Settings.from_env({}) == Settings()
    for cls in (Settings, *(f.metadata["group"] for f in fields(Settings) if "group" in f.metadata)):
        for f in fields(cls):
            kinds = {"setting", "group", "fixed"} & set(f.metadata)
            assert len(kinds) == 1, f"{cls.__name__}.{f.name}: declare it with setting, derived or fixed"
    names = config.variables()
    assert len(names) == len(set(names)), "a variable read by two fields"
    assert all(meta.doc for _, meta, _ in config.declared())


def test_a_derived_default_follows_the_setting_it_derives_from() -> None:
    settings = Settings.from_env({"MAX_ENVIRONMENTS": "6", "MAX_QUEUED_EXECUTIONS": "1"})
    assert settings.runtime.max_environments_per_owner == 3
    assert settings.runtime.max_queued_per_owner == 1  # at least one
    # the same rule when a test builds the dataclass itself
    assert RuntimeSettings(max_environments=6, max_queued=1) == settings.runtime
    explicit = Settings.from_env({"MAX_ENVIRONMENTS": "6", "MAX_ENVIRONMENTS_PER_OWNER": "6"})
    assert explicit.runtime.max_environments_per_owner == 6


def test_every_documented_default_reads_back_as_the_default() -> None:
    """The defaults as the table writes them are values the parsers take, and mean the default."""
    for _, meta, default in config.declared():
        shown = config.shown_default(meta, default)
        if meta.shown is not None or default is None:
            continue  # described in words: found at start, or derived
        assert Settings.from_env({meta.env: shown.strip("`").replace("~", str(Path.home()), 1)}) == Settings()


def readme_settings() -> dict[str, str]:
    """The README's configuration table: each variable's default cell."""
    section = (ROOT / "README.md").read_text().split("### Configuration", 1)[1].split("\n### ", 1)[0]
    documented: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        defaults = cells[1].split(" / ")
        defaults *= len(names) if len(defaults) == 1 else 1
        assert len(defaults) == len(names), f"one default per variable, or one for all: {line}"
        documented.update(zip(names, defaults, strict=True))
    return documented


def test_the_readme_lists_every_variable_at_its_default_and_no_other() -> None:
    documented = readme_settings()
    declared = {
        name: config.shown_default(meta, default)
        for _, meta, default in config.declared()
        for name in (meta.env, *(fallback for fallback, _ in meta.fallbacks))
    }
    assert not declared.keys() - documented.keys(), "add to README's configuration table"
    assert not documented.keys() - declared.keys(), "README documents a variable config.py does not read"
    wrong = {name: (documented[name], shown) for name, shown in declared.items() if documented[name] != shown}
    assert not wrong, f"README's default differs from config.py's (README, config): {wrong}"


def test_lambda_server_settings_prints_the_table_whatever_the_environment() -> None:
    env = {**os.environ, "SESSION_EXPIRY_SECONDS": "soon"}
    result = subprocess.run(
        [sys.executable, "-m", "lambda_server", "settings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("| `")]
    assert re.findall(r"`([A-Z][A-Z0-9_]+)`", " ".join(rows)) == config.variables()
    assert "| `SESSION_EXPIRY_SECONDS` | `3600` |" in result.stdout
