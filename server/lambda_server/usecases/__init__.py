"""The use cases, one module each: what the service does, free of gRPC, HTTP and SQL.

Arrows run one way: api -> usecases -> store and runtimes -> sandbox. A use case
takes domain values and returns them; the api translates the wire to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambda_server.usecases.batch import ExecuteBatch
from lambda_server.usecases.catalog import Catalog
from lambda_server.usecases.execute import Execute
from lambda_server.usecases.health import Health
from lambda_server.usecases.initialize import Initialize
from lambda_server.usecases.sessions import GetSession

__all__ = ["Catalog", "Execute", "ExecuteBatch", "GetSession", "Health", "Initialize", "UseCases"]


@dataclass(frozen=True)
class UseCases:
    """Every use case, as app.py wires them, for the front doors (gRPC, HTTP) to call."""

    initialize: Initialize
    execute: Execute
    execute_batch: ExecuteBatch
    get_session: GetSession
    catalog: Catalog
    health: Health
