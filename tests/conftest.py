"""Fixtures: a PostgreSQL database of this run's own, a real server on port 0, the real client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambda_microservice import LambdaClient
from tests.support import (
    ServerThread,
    create_database,
    drop_database,
    port_answers,
    run_sync,
    server_settings,
    with_database,
)


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """DATABASE_URL when set, else 127.0.0.1:5432 when it answers, else an embedded PostgreSQL."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    if port_answers("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    from lambda_server.store.embedded import start_embedded

    return start_embedded(Path(tmp_path_factory.mktemp("pg")) / "data")


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    """A database of this run's own, dropped at the end."""
    name = run_sync(create_database(admin_url))
    yield with_database(admin_url, name)
    run_sync(drop_database(admin_url, name))


@pytest.fixture
def fresh_database(admin_url: str) -> Iterator[str]:
    """A database of one test's own, dropped after it: for counts no other test may touch."""
    name = run_sync(create_database(admin_url))
    yield with_database(admin_url, name)
    run_sync(drop_database(admin_url, name))


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[ServerThread]:
    running = ServerThread(server_settings(), database_url)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: ServerThread) -> Iterator[LambdaClient]:
    with LambdaClient(server.target, timeout=20.0) as lambda_client:
        yield lambda_client
