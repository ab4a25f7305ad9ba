"""Configuration: read once from the environment; an invalid value stops start-up naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lambda_server.config import ConfigError, Settings
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
