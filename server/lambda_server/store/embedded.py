"""An embedded PostgreSQL (pgserver) for `make run` when DATABASE_URL is unset."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from lambda_server.config import ConfigError

log = logging.getLogger(__name__)


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the PostgreSQL kept in `data_dir` and return its URL.

    Blocking: called once before the event loop starts. The data survives
    restarts; the server stops when the last process using it exits.
    """
    with warnings.catch_warnings():  # platformdirs' "XDG_RUNTIME_DIR is not set": harmless here
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        return _start(data_dir)


def _start(data_dir: Path) -> str:
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
        "starting the embedded PostgreSQL in %s%s", data_dir, " (creating it: a few seconds)" if first else ""
    )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        url = str(get_server(str(data_dir.resolve()), cleanup_mode="stop").get_uri())
    except Exception as exc:  # pgserver's own errors, or the folder's: one line for the operator
        why = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise ConfigError(
            f"the embedded PostgreSQL in {data_dir} (EMBEDDED_DATA_DIR) did not start: {why}; "
            "or set DATABASE_URL"
        ) from None
    log.info("embedded PostgreSQL ready in %s", data_dir)
    return url
