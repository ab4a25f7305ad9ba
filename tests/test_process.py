"""The worker process wrapper on the server's own event loop: who closes the pipes."""

from __future__ import annotations

import contextlib
import os
import sys

from lambda_server.app import new_event_loop
from lambda_server.runtimes.process import WorkerError, WorkerProcess

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


def test_the_stderr_tail_keeps_a_fatal_message_written_before_many_small_lines() -> None:
    """V8 prints `heap out of memory`, then a native stack a line at a time: the tail must
    still hold the message, or MEMORY_LIMIT is reported as a crash."""
    chatty = READY_WORKER.replace(
        "sys.stdin.buffer.read()",
        "import time\nos.write(2, b'FATAL ERROR: heap out of memory\\n')\n"
        "for i in range(40):\n    os.write(2, b'%d: frame\\n' % i)\n    time.sleep(0.002)\n",
    )

    async def scenario() -> None:
        worker = await WorkerProcess.spawn(
            [sys.executable, "-c", chatty], {"PATH": os.environ["PATH"]}, timeout=10, max_frame=4096
        )
        with contextlib.suppress(WorkerError):
            await worker.request({"op": "run"}, timeout=10)  # the worker has exited
        assert "heap out of memory" in worker.stderr_tail()
        assert "39: frame" in worker.stderr_tail()
        await worker.kill()

    loop = new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
