"""The worker process wrapper on the server's own event loop: who closes the pipes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable

import pytest

from lambda_server.app import new_event_loop
from lambda_server.runtimes.process import (
    OUTPUT_FREE_FRAMES,
    OUTPUT_INTERVAL,
    WorkerCrashed,
    WorkerError,
    WorkerProcess,
    WorkerTimeout,
    output_frame_cap,
)

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


# A worker that says ready, reads one request, answers it with the frames of argv[1] (a JSON
# list of objects, "ID" standing for the request's id), then waits for its stdin to close.
SCRIPTED_WORKER = """
import json, os, sys
fd = int(os.environ["LAMBDA_RESPONSE_FD"])
def send(body):
    os.write(fd, len(body).to_bytes(4, "big") + body)
send(b'{"op": "ready"}')
size = int.from_bytes(sys.stdin.buffer.read(4), "big")
request = json.loads(sys.stdin.buffer.read(size))
for frame in json.loads(sys.argv[1]):
    send(json.dumps(frame).replace('"ID"', str(request["id"])).encode())
sys.stdin.buffer.read()
"""


def scripted(frames: list[dict[str, object]], scenario: Callable[[WorkerProcess], Awaitable[None]]) -> None:
    async def run() -> None:
        worker = await WorkerProcess.spawn(
            [sys.executable, "-c", SCRIPTED_WORKER, json.dumps(frames)],
            {"PATH": os.environ["PATH"]},
            timeout=10,
            max_frame=1 << 20,
            max_output=10,
        )
        try:
            await scenario(worker)
        finally:
            await worker.kill()

    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def output(*parts: tuple[str, str], cut: bool = False) -> dict[str, object]:
    frame: dict[str, object] = {"id": "ID", "op": "output", "parts": [list(part) for part in parts]}
    if cut:
        frame["cut"] = True
    return frame


def test_a_streamed_request_that_times_out_carries_the_output_handed_on() -> None:
    frames = [output(("stdout", "a\n"), ("stderr", "é\n")), output(("stdout", "123456789"), cut=True)]

    async def scenario(worker: WorkerProcess) -> None:
        got: list[tuple[str, str, int]] = []
        with pytest.raises(WorkerTimeout) as timed_out:
            await worker.request({"op": "run"}, 1.0, lambda *chunk: got.append(chunk))
        # MAX_LOG_BYTES (max_output) of 10: the third part is trimmed to what fits
        assert got == [("stdout", "a\n", 0), ("stderr", "é\n", 2), ("stdout", "12345", 5)]
        assert timed_out.value.logs == "a\né\n12345\n[logs truncated]\n"
        assert timed_out.value.logs_truncated

    scripted(frames, scenario)


def test_a_request_not_streamed_drops_output_frames_and_keeps_no_logs() -> None:
    frames = [output(("stdout", "x\n")), {"id": "ID", "ok": True, "logs": ""}]

    async def scenario(worker: WorkerProcess) -> None:
        answer = await worker.request({"op": "run"}, 5.0)
        assert answer["ok"] is True

    scripted(frames, scenario)


@pytest.mark.parametrize(
    "frame",
    [
        output(),  # no part, no cut: nothing new
        output(("stdout", "")),  # an empty text
        output(("stdin", "x")),  # no such stream
        {"id": "ID", "op": "output", "stream": "stdout", "text": "x"},  # not the protocol's shape
    ],
)
def test_an_output_frame_without_new_text_is_a_protocol_violation(frame: dict[str, object]) -> None:
    async def scenario(worker: WorkerProcess) -> None:
        with pytest.raises(WorkerCrashed, match="not one"):
            await worker.request({"op": "run"}, 5.0, lambda *chunk: None)

    scripted([frame], scenario)


def test_output_frames_past_the_cap_of_the_requests_timeout_kill_the_worker() -> None:
    timeout = 1.0
    frames = [output(("stdout", "x"))] * (output_frame_cap(timeout) + 1)

    async def scenario(worker: WorkerProcess) -> None:
        with pytest.raises(WorkerCrashed, match=f"more than {output_frame_cap(timeout)} output frames"):
            await worker.request({"op": "run"}, timeout, lambda *chunk: None)

    scripted(frames, scenario)
    # a legitimate worker's frames over that time (256 free, then one each 100 ms) fit
    assert output_frame_cap(timeout) >= OUTPUT_FREE_FRAMES + timeout / OUTPUT_INTERVAL + 2
    assert output_frame_cap(300.0) >= OUTPUT_FREE_FRAMES + 300.0 / OUTPUT_INTERVAL + 2


def test_a_many_drops_output_frames_between_its_items_answers() -> None:
    item = {"id": "ID", "ok": True, "logs": "", "cpu": 0, "peak": 0}
    frames = [
        output(("stdout", "stray\n")),
        {**item, "item": 0},
        output(("stderr", "s\n")),
        {**item, "item": 1},
    ]

    async def scenario(worker: WorkerProcess) -> None:
        answered: list[int] = []
        count = await worker.request_many([b"{}", b"{}"], 5.0, None, lambda i, _: answered.append(i) or True)
        assert count == 2 and answered == [0, 1]

    scripted(frames, scenario)
