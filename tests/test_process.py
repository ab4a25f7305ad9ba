"""The worker process wrapper on the server's own event loop: who closes the pipes."""

from __future__ import annotations

import os
import sys

from lambda_server.app import new_event_loop
from lambda_server.runtimes.process import WorkerProcess

# A worker that says ready on its answer pipe, then waits for its stdin to close.
READY_WORKER = """
import os, sys
fd = int(os.environ["LAMBDA_RESPONSE_FD"])
body = b'{"op": "ready"}'
os.write(fd, len(body).to_bytes(4, "big") + body)
sys.stdin.buffer.read()
"""


def test_a_workers_pipes_are_closed_once_so_no_reused_number_is_closed_under_its_new_owner() -> None:
    """uvloop closes a pipe's descriptor in libuv and also calls close() on the object it
    was handed. When a collected transport's file object was finalized first, the number
    was free for a moment, and libuv's later close hit whatever file had taken it."""

    async def scenario() -> None:
        worker = await WorkerProcess.spawn(
            [sys.executable, "-c", READY_WORKER], {"PATH": os.environ["PATH"]}, timeout=10, max_frame=4096
        )
        for transport in worker._transports:
            transport.get_extra_info("pipe").close()  # what a finalizer does before the transport goes
        taken = [os.pipe() for _ in range(3)]  # the lowest free numbers: the pipes' if they were freed
        await worker.kill()  # the transports close their descriptors
        for pipe in taken:
            for fd in pipe:
                os.fstat(fd)  # OSError (EBADF) if it was closed under us
                os.close(fd)

    loop = new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
