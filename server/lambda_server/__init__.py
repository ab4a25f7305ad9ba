"""lambda-microservice server: runs user scripts in sessions stored in PostgreSQL."""

from __future__ import annotations

import os

# The server starts worker processes (fork + exec) while gRPC's threads run.
# gRPC's fork handlers exist for fork without exec and only log noise here.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
