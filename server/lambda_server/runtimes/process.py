"""One worker process and the framed protocol spoken with it over pipes.

A frame is a 4-byte big-endian length and a UTF-8 body. Requests go to the
worker's stdin; answers come on a pipe of their own (LAMBDA_RESPONSE_FD), so
nothing the script prints can be mistaken for an answer. A request's body, and
an answer's, is a JSON object; an answer that carries a result is that object,
a newline (which no compact JSON text holds) and the result's JSON text, so
that the text reaches the caller as the worker wrote it (ExecuteResponse's
result_json: integers of any size, `1` apart from `1.0`) and is read once. A
result JSON cannot carry (json_text.Refused) makes the answer an INVALID_RESULT
failure; the worker is fine, and kept.

Requests are `{"op": "load"|"run"|"check", "id": N, ...}`, each answered by ONE
frame `{"id": N, "ok": ..., "logs": ..., "cpu", "peak", "error"?}` (plus the result's
text). A batch's items go to a bound worker (after a `load`) several at once:
`{"op": "many", "id": N, "events": [e0, e1, ...]}` runs the script once per event, in
order, and answers each item with a frame of its own, `{"id": N, "item": i, ...the
fields of a run's answer...}`, sent as soon as item i is done (request_many). Each
item's answer is awaited within the item's timeout (capped by the batch's deadline),
counted from the answer before it: on a timeout or a crash the worker is killed and
ManyInterrupted says how many items were answered; the next one was running (its
TIMEOUT or crash is its outcome) and those after it never started.

Workers are started with subprocess.Popen (fork + exec of async-signal-safe code
only) in a thread, and their exit is watched through a pidfd. The event loop's
own subprocess support is not used: uvloop's crashed (SIGSEGV in the child)
when it forked while gRPC's threads ran.

The pipes are made here, and the loop is handed bare descriptors (PipeEnd), not
file objects: uvloop closes a pipe's descriptor in libuv and then again through
the file object it was given (uvloop issue 763), and that second close hit
whatever file had reused the number meanwhile, in the suite another worker's
answer pipe.

Streaming: a `load` or `run` request may carry `"stream": true`. While the script
runs, the worker then sends output frames `{"id": N, "op": "output", "parts":
[["stdout"|"stderr", "text"], ...], "cut"?: true}` (each part a line, or what a flush
wrote, never empty; never a character split in two; `cut` once the console output
went past the limit), then the request's answer as usual. The texts of one
execution's parts, in order, are exactly the answer's `logs` (without the
truncation marker). request(on_output=...) hands each part to the callback with
its offset, counted here: its byte offset (UTF-8) within the execution's console
output. Output past MAX_LOG_BYTES is never handed on (the worker cuts there; a
part that would go past it is trimmed here, and those after it dropped). Every
answer, streamed or not, of every runtime, carries `"cut": true` when the console
output went past the limit (ExecuteResponse.logs_truncated). When a streamed request
ends without its answer (a timeout, a crash, an answer too large), the WorkerError
raised carries the output handed on (`logs`, with the truncation marker when it was
cut, and `logs_truncated`): the chunks the caller got.

The flood bound: a worker sends an execution's first OUTPUT_FREE_FRAMES (256) output
frames as they come, then at most one every OUTPUT_INTERVAL (100 ms; what is written
meanwhile is held, and goes with one frame: Node's and Rust's by a timer, Python's with
the first write after the interval), and one at the end. However a script mixes its
streams, a request of timeout T gets at most 256 + 10 T frames and a few more: past
output_frame_cap(T), which allows a tenth more, or on a frame without new text (a
script that forges frames on the answer pipe), the worker is killed (WorkerCrashed),
and what it cost the event loop is bounded by the cap. Output frames of a request
that did not ask for them (a `many` included) count too, and are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from lambda_server import json_text
from lambda_server.domain import OutputSink

STDERR_TAIL_BYTES = 16 * 1024
# What the server reads of a worker's stderr per request: past it, reading stops until
# the next request, the pipe fills and the writer blocks (its script then runs into its
# timeout). A flood costs the event loop this much a request, not as much as it can write.
STDERR_BYTES_PER_REQUEST = 256 * 1024
# The workers' frame rate (see the module's docstring): their first frames, then one an interval.
OUTPUT_FREE_FRAMES = 256
OUTPUT_INTERVAL = 0.1  # seconds
STREAMS = frozenset(("stdout", "stderr"))
LOGS_TRUNCATED = "\n[logs truncated]\n"  # what the workers append to logs they cut


def output_frame_cap(timeout: float) -> int:
    """The output frames a request of `timeout` seconds may receive: the worker's free ones
    and one an interval, a tenth more for timers that fire early, and the frames that go
    at the end; past it, the worker is killed."""
    return OUTPUT_FREE_FRAMES + int(max(0.0, timeout) / OUTPUT_INTERVAL * 1.1) + 16


def answer_int(value: object, limit: int = 2**31) -> int:
    """A non-negative integer field of a worker's answer; 0 when absent or out of range."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit else 0


class WorkerError(Exception):
    """The worker cannot be used any more; it has been killed. `logs`: the console output a
    streamed request handed on before it (see request), `logs_truncated`: it was cut."""

    logs = ""
    logs_truncated = False


class WorkerTimeout(WorkerError):
    """The worker did not answer in time."""


class WorkerCrashed(WorkerError):
    """The worker exited or broke the protocol."""


class FrameTooLarge(WorkerError):
    """The worker's answer was larger than allowed."""


class ManyInterrupted(Exception):
    """A `many` stopped by a worker failure (`cause`, the worker killed): items before
    `answered` were answered, item `answered` was running, those after it never started.
    `capped`: the running item's wait was cut short by the batch's deadline, not its timeout."""

    def __init__(self, cause: WorkerError, answered: int, capped: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.answered = answered
        self.capped = capped


class WorkerProcess:
    """A started worker; one request at a time."""

    def __init__(self, popen: subprocess.Popen[bytes], max_frame: int, max_output: int = 65536) -> None:
        self._popen = popen
        self._max_frame = max_frame
        self._max_output = max_output  # MAX_LOG_BYTES: output handed on per request
        self._transports: list[asyncio.BaseTransport] = []
        # our ends of the worker's pipes that no transport owns yet: kill() closes these itself
        self._unowned: list[PipeEnd] = []
        self._requests: asyncio.StreamWriter | None = None
        self._responses = asyncio.StreamReader()
        # the last of the worker's stderr, by bytes: a runtime's fatal message comes in
        # many small writes (V8 prints its out-of-memory line, then a native stack)
        self._stderr = bytearray()
        self._exited = asyncio.get_running_loop().create_future()
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr_budget = STDERR_BYTES_PER_REQUEST
        self._stderr_refilled = asyncio.Event()
        self.last_used = time.monotonic()
        self._next_id = 0

    @classmethod
    async def spawn(
        cls,
        command: Sequence[str],
        env: Mapping[str, str],
        timeout: float,
        max_frame: int,
        cwd: str | None = None,
        max_output: int = 65536,
    ) -> WorkerProcess:
        """Start the worker and wait for its `ready` frame; nothing is left behind on failure."""
        loop = asyncio.get_running_loop()
        pipes = _Pipes()
        try:
            started = loop.run_in_executor(
                None,
                lambda: subprocess.Popen(
                    list(command),
                    stdin=pipes.requests[0],
                    stdout=subprocess.DEVNULL,
                    stderr=pipes.stderr[1],
                    env={**env, "LAMBDA_RESPONSE_FD": str(pipes.responses[1])},
                    pass_fds=(pipes.responses[1],),
                    start_new_session=True,  # its own process group, killed as one
                    cwd=cwd,
                ),
            )
            try:
                popen = await asyncio.shield(started)
            except asyncio.CancelledError:
                await _reap_cancelled_start(started)
                raise
        except BaseException:
            pipes.close_ours()
            raise
        finally:
            pipes.close_workers()
        worker = cls(popen, max_frame, max_output)
        worker._unowned = pipes.ours(closes=not _loop_closes_twice(loop))
        try:
            await worker._connect()
            try:
                async with asyncio.timeout(timeout):
                    ready = await worker._receive()
            except TimeoutError:  # its text is empty: say what timed out, after how long
                raise WorkerTimeout(f"no ready message within {timeout:g} s of its start") from None
            if ready.get("op") != "ready":
                raise WorkerCrashed(f"worker said {ready!r} instead of ready")
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        requests, responses, stderr_pipe = self._unowned
        self._give(responses)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self._responses), responses
        )
        self._transports.append(transport)
        stderr = asyncio.StreamReader()
        self._give(stderr_pipe)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stderr), stderr_pipe)
        self._transports.append(transport)
        self._stderr_task = asyncio.create_task(self._drain(stderr))
        self._give(requests)
        write_transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), requests
        )
        self._transports.append(write_transport)
        self._requests = asyncio.StreamWriter(write_transport, protocol, None, loop)
        pidfd = os.pidfd_open(self._popen.pid)
        loop.add_reader(pidfd, self._on_exit, pidfd)

    def _give(self, pipe: PipeEnd) -> None:
        """Hand a pipe to the loop: from here its transport closes it, even when connecting
        fails or is cancelled, so kill() must not close it too (a second close of a
        number may close whatever file reused it)."""
        if pipe in self._unowned:
            self._unowned.remove(pipe)

    def _on_exit(self, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        self._popen.poll()  # reap it
        if not self._exited.done():
            self._exited.set_result(self._popen.returncode)

    async def request(
        self, message: Mapping[str, Any], timeout: float, on_output: OutputSink | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its answer; on any failure the worker is killed.

        With `on_output`, the request asks for output frames, handed to it as they come."""
        self._next_id += 1
        request_id = self._next_id
        self._refill_stderr()
        output = _Output(self._max_output, on_output, output_frame_cap(timeout))
        try:
            assert self._requests is not None
            if on_output is not None:
                message = {**message, "stream": True}
            body = json_text.dumps({**message, "id": request_id})  # params may hold integers past 64 bits
            async with asyncio.timeout(timeout):
                self._requests.write(len(body).to_bytes(4, "big") + body)
                if self._requests.transport.get_write_buffer_size():  # the pipe is full: wait for room
                    await self._requests.drain()
                answer = await self._receive()
                if answer.get("op") == "output":
                    answer = await self._stream(answer, request_id, output)
            if answer.get("id") != request_id:
                raise WorkerCrashed(f"the worker answered request {answer.get('id')!r}, not {request_id}")
        except TimeoutError:
            await self.kill()
            raise output.carried_by(WorkerTimeout(f"no answer within {timeout:g} s")) from None
        except ConnectionError as exc:
            await self.kill()
            crashed = WorkerCrashed(self._describe_exit(str(exc) or type(exc).__name__))
            raise output.carried_by(crashed) from None
        except WorkerError as exc:
            await self.kill()
            output.carried_by(exc)
            raise
        except BaseException:
            await self.kill()
            raise
        self.last_used = time.monotonic()
        return answer

    async def request_many(
        self,
        events: Sequence[bytes],
        item_timeout: float,
        until: float | None,
        on_answer: Callable[[int, dict[str, Any]], bool],
    ) -> int:
        """Send a `many` of `events` (each an event's JSON text) and hand each item's answer
        to `on_answer(item, answer)` as it arrives (parsed as a run's, result_json kept).
        Each wait is bounded by `item_timeout`, and by `until` (a time.monotonic() value).
        Returns how many items were answered: all, or fewer when `on_answer` returned False
        (the worker is then killed: the items after it never ran). On a timeout or a crash
        the worker is killed and ManyInterrupted says where it stopped; on cancellation the
        worker is killed too."""
        self._next_id += 1
        request_id = self._next_id
        self._refill_stderr()
        answered = 0
        wait, capped = item_timeout, False
        try:
            assert self._requests is not None
            body = b'{"op":"many","id":%d,"events":[' % request_id + b",".join(events) + b"]}"
            self._requests.write(len(body).to_bytes(4, "big") + body)
            while answered < len(events):
                wait, capped = item_timeout, False
                if until is not None and until - time.monotonic() < wait:
                    wait, capped = max(0.0, until - time.monotonic()), True
                async with asyncio.timeout(wait):
                    if answered == 0 and self._requests.transport.get_write_buffer_size():
                        await self._requests.drain()  # the pipe is full: wait for room
                    answer = await self._receive()
                    if answer.get("op") == "output":  # not asked for: dropped, counted
                        dropped = _Output(0, None, output_frame_cap(item_timeout))
                        answer = await self._stream(answer, request_id, dropped)
                if answer.get("id") != request_id or answer.get("item") != answered:
                    raise WorkerCrashed(
                        f"the worker answered request {answer.get('id')!r} item {answer.get('item')!r}, "
                        f"not {request_id} item {answered}"
                    )
                answered += 1
                self.last_used = time.monotonic()
                self._refill_stderr()
                if not on_answer(answered - 1, answer) and answered < len(events):
                    await self.kill()
                    return answered
        except TimeoutError:
            await self.kill()
            raise ManyInterrupted(WorkerTimeout(f"no answer within {wait:g} s"), answered, capped) from None
        except ConnectionError as exc:
            await self.kill()
            crashed = WorkerCrashed(self._describe_exit(str(exc) or type(exc).__name__))
            raise ManyInterrupted(crashed, answered, False) from None
        except WorkerError as exc:
            await self.kill()
            raise ManyInterrupted(exc, answered, False) from None
        except BaseException:
            await self.kill()
            raise
        return answered

    def _refill_stderr(self) -> None:
        """A new execution may have the runtime's stderr read again (STDERR_BYTES_PER_REQUEST)."""
        if self._stderr_budget < STDERR_BYTES_PER_REQUEST:
            self._stderr_budget = STDERR_BYTES_PER_REQUEST
            self._stderr_refilled.set()

    async def _stream(self, frame: dict[str, Any], request_id: int, output: _Output) -> dict[str, Any]:
        """Take the request's output frames, from `frame`, until its answer comes."""
        while frame.get("op") == "output":
            output.take(frame, request_id)
            frame = await self._receive()
        return frame

    async def _receive(self) -> dict[str, Any]:
        """The next answer; the caller bounds the wait."""
        try:
            header = await self._responses.readexactly(4)
            size = int.from_bytes(header, "big")
            if size > self._max_frame:
                raise FrameTooLarge(f"answer of {size} bytes is over {self._max_frame}")
            body = await self._responses.readexactly(size)
        except asyncio.IncompleteReadError:
            # let the exit and the last of stderr (a runtime's fatal message) arrive
            pending: list[asyncio.Future[Any]] = [self._exited]
            if self._stderr_task is not None:
                pending.append(self._stderr_task)
            await asyncio.wait(pending, timeout=0.5)
            raise WorkerCrashed(self._describe_exit("the worker closed its pipe")) from None
        newline = body.find(b"\n")
        try:
            message = orjson.loads(body if newline < 0 else memoryview(body)[:newline])
        except orjson.JSONDecodeError as exc:
            raise WorkerCrashed(f"the worker sent a frame that is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise WorkerCrashed("the worker sent a frame that is not an object")
        if newline >= 0:  # an answer with a result: its JSON text follows, read exactly
            _read_result(message, body[newline + 1 :])
        return message

    def _describe_exit(self, what: str) -> str:
        code = self._popen.returncode
        if code is not None and code < 0:
            what = f"{what}; killed by signal {signal.Signals(-code).name}"
        elif code is not None:
            what = f"{what}; exit status {code}"
        tail = self.stderr_tail().strip()
        return f"{what}: {tail[-2000:]}" if tail else what

    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while chunk := await stream.read(STDERR_TAIL_BYTES):
                self._stderr += chunk
                if len(self._stderr) > STDERR_TAIL_BYTES:
                    del self._stderr[: len(self._stderr) - STDERR_TAIL_BYTES]
                self._stderr_budget -= len(chunk)
                if self._stderr_budget <= 0:  # the stream pauses its pipe once its buffer is full
                    self._stderr_refilled.clear()
                    await self._stderr_refilled.wait()

    def alive(self) -> bool:
        return not self._exited.done()

    async def kill(self) -> None:
        """Kill the worker's whole process group, reap it and close its pipes."""
        kill_group(self._popen)
        for transport in self._transports:
            transport.close()
        if self._stderr_task is not None:
            self._stderr_task.cancel()
        for pipe in self._unowned:
            pipe.close_now()
        self._unowned.clear()
        if self._transports:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._exited)  # the pidfd watch reports the exit
        if self._popen.returncode is None:  # no watch, or a slow exit: reap it in a thread
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.get_running_loop().run_in_executor(None, self._popen.wait, 10)


class _Output:
    """A request's output frames: counted (at most `cap`), checked, and with a `sink` (a
    streamed request) their parts handed on, within `limit` bytes, and kept."""

    def __init__(self, limit: int, sink: OutputSink | None, cap: int) -> None:
        self._limit = limit
        self._sink = sink
        self._cap = cap
        self._frames = 0
        self._offset = 0
        self._texts: list[str] = []
        self._cut = False

    def take(self, frame: dict[str, Any], request_id: int) -> None:
        self._frames += 1
        if self._frames > self._cap:
            raise WorkerCrashed(f"the worker sent more than {self._cap} output frames")
        parts, cut = frame.get("parts"), frame.get("cut", False)
        if (
            frame.get("id") != request_id
            or not isinstance(parts, list)
            or not isinstance(cut, bool)
            or not all(_is_part(part) for part in parts)
            or not (parts or cut)
        ):
            raise WorkerCrashed(f"the worker sent an output frame that is not one: {str(frame)[:200]}")
        self._cut = self._cut or cut
        if self._sink is None:
            return
        for stream, text in parts:
            room = self._limit - self._offset
            if room <= 0:
                self._cut = True
                return
            data = text.encode()
            trimmed = len(data) > room
            if trimmed:
                text = data[:room].decode("utf-8", "ignore")
                self._cut = True
            if text:
                self._sink(stream, text, self._offset)
                self._texts.append(text)
            self._offset = self._limit if trimmed else self._offset + len(data)

    def carried_by(self, error: WorkerError) -> WorkerError:
        """`error`, carrying the output handed on (none when the request was not streamed)."""
        if self._sink is not None:
            error.logs = "".join(self._texts) + (LOGS_TRUNCATED if self._cut else "")
            error.logs_truncated = self._cut
        return error


def _is_part(part: object) -> bool:
    """An output frame's part: [stream, text], its text not empty."""
    return (
        isinstance(part, list)
        and len(part) == 2
        and part[0] in STREAMS
        and isinstance(part[1], str)
        and part[1] != ""
    )


def _read_result(answer: dict[str, Any], text: bytes) -> None:
    """Read an answer's result from its JSON text, and keep the text as `result_json`; a
    result JSON cannot carry makes the answer an INVALID_RESULT failure instead."""
    try:
        answer["result"] = json_text.loads(text)
    except json_text.Refused as exc:
        answer.pop("result", None)
        answer["ok"] = False
        message = f"the result cannot be carried as JSON: {exc}"
        answer["error"] = {"code": "INVALID_RESULT", "message": message}
        return
    answer["result_json"] = text.decode()  # UTF-8: json_text read it


async def run_command(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    timeout: float | None,
    started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> tuple[int, bytes, bytes]:
    """Run a one-shot command (a compiler, a package installer) to its end: exit status,
    stdout, stderr.

    Its whole process group is killed when it runs past `timeout` (WorkerTimeout; None: no
    bound but the caller's) or the caller is cancelled. Popen and the wait run in threads, as for workers.
    `started` is given the process once it runs (a watchdog may kill it: kill_group).
    """
    loop = asyncio.get_running_loop()
    popen = await loop.run_in_executor(
        None,
        lambda: subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        ),
    )
    try:
        if started is not None:
            started(popen)
        out, err = await loop.run_in_executor(None, lambda: popen.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        kill_group(popen)
        await loop.run_in_executor(None, popen.communicate)
        raise WorkerTimeout(f"the command ran past {timeout:g} s") from None
    except BaseException:
        kill_group(popen)
        raise
    return popen.returncode, out, err


class PipeEnd:
    """Our end of a pipe to a worker, as handed to the event loop's pipe transports.

    The transport calls close() when it is done. Under uvloop, libuv has closed
    the descriptor already, so close() must not (closes=False); under asyncio's
    own loop, close() is the only close.
    """

    def __init__(self, fd: int, closes: bool) -> None:
        self._fd = fd
        self._closes = closes

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._closes:
            self.close_now()

    def close_now(self) -> None:
        """Close the descriptor: only for an end no transport was given."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _Pipes:
    """The three pipes of a worker: requests (its stdin), answers, and stderr."""

    def __init__(self) -> None:
        self.requests = os.pipe()  # (worker's, ours)
        self.responses = os.pipe()  # (ours, worker's)
        self.stderr = os.pipe()  # (ours, worker's)
        self._theirs = [self.requests[0], self.responses[1], self.stderr[1]]
        self._ours = [self.requests[1], self.responses[0], self.stderr[0]]

    def close_workers(self) -> None:
        """Close our copies of the worker's ends: the worker has its own after the start."""
        for fd in self._theirs:
            os.close(fd)
        self._theirs = []

    def close_ours(self) -> None:
        for fd in self._ours:
            os.close(fd)
        self._ours = []

    def ours(self, closes: bool) -> list[PipeEnd]:
        """Our ends (requests, responses, stderr) as PipeEnds; from here they own the descriptors."""
        ends = [PipeEnd(fd, closes) for fd in self._ours]
        self._ours = []
        return ends


def _loop_closes_twice(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop closes a pipe's descriptor itself before calling close() on the pipe."""
    return type(loop).__module__.startswith("uvloop")


def kill_group(popen: subprocess.Popen[bytes]) -> None:
    """A one-shot command and whatever it started, as one process group (once reaped: nothing)."""
    if popen.returncode is not None:
        return  # reaped: its pid may belong to someone else now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        popen.kill()


async def _reap_cancelled_start(started: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """A spawn cancelled while Popen ran: let Popen finish (milliseconds), then kill and reap."""
    try:
        popen = await started
    except Exception:
        return  # it did not start
    kill_group(popen)
    await asyncio.get_running_loop().run_in_executor(None, popen.wait)
