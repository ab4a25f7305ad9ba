"""One worker process and the framed protocol spoken with it over pipes.

A frame is a 4-byte big-endian length and a UTF-8 JSON body. Requests go to the
worker's stdin; answers come on a pipe of their own (LAMBDA_RESPONSE_FD), so
nothing the script prints can be mistaken for an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import orjson


class WorkerError(Exception):
    """The worker cannot be used any more; it has been killed."""


class WorkerTimeout(WorkerError):
    """The worker did not answer in time."""


class WorkerCrashed(WorkerError):
    """The worker exited or broke the protocol."""


class FrameTooLarge(WorkerError):
    """The worker's answer was larger than allowed."""


class WorkerProcess:
    """A started worker; one request at a time."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        responses: asyncio.StreamReader,
        max_frame: int,
    ) -> None:
        self._process = process
        self._responses = responses
        self._max_frame = max_frame
        self._stderr: deque[bytes] = deque(maxlen=16)
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self.started_at = time.monotonic()
        self.last_used = self.started_at

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    async def spawn(
        cls,
        command: Sequence[str],
        env: Mapping[str, str],
        timeout: float,
        max_frame: int,
        cwd: str | None = None,
    ) -> WorkerProcess:
        """Start the worker and wait for its `ready` frame."""
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**env, "LAMBDA_RESPONSE_FD": str(write_fd)},
                pass_fds=(write_fd,),
                start_new_session=True,  # its own process group, killed as one
                close_fds=True,
                cwd=cwd,
            )
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        os.close(write_fd)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=max_frame + 4)
        try:
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
            )
        except BaseException:
            os.close(read_fd)
            _kill_group(process)
            raise
        worker = cls(process, reader, max_frame)
        try:
            ready = await worker._receive(timeout)
        except BaseException:
            await worker.kill()
            raise
        if ready.get("op") != "ready":
            await worker.kill()
            raise WorkerCrashed(f"worker said {ready!r} instead of ready")
        return worker

    async def request(self, message: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait for its answer; on any failure the worker is killed."""
        try:
            assert self._process.stdin is not None
            body = orjson.dumps(message)
            self._process.stdin.write(len(body).to_bytes(4, "big") + body)
            async with asyncio.timeout(timeout):
                await self._process.stdin.drain()
                answer = await self._receive(None)
        except TimeoutError:
            await self.kill()
            raise WorkerTimeout(f"no answer within {timeout:.3f} s") from None
        except (ConnectionError, BrokenPipeError) as exc:
            await self.kill()
            raise WorkerCrashed(self._describe_exit(str(exc))) from None
        except BaseException:
            await self.kill()
            raise
        self.last_used = time.monotonic()
        return answer

    async def _receive(self, timeout: float | None) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                header = await self._responses.readexactly(4)
                size = int.from_bytes(header, "big")
                if size > self._max_frame:
                    raise FrameTooLarge(f"answer of {size} bytes is over {self._max_frame}")
                body = await self._responses.readexactly(size)
        except asyncio.IncompleteReadError:
            await self._wait_exit()
            raise WorkerCrashed(self._describe_exit("worker closed its pipe")) from None
        message = orjson.loads(body)
        if not isinstance(message, dict):
            raise WorkerCrashed("worker sent a frame that is not an object")
        return message

    async def _wait_exit(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await self._process.wait()

    def _describe_exit(self, what: str) -> str:
        code = self._process.returncode
        if code is not None and code < 0:
            what = f"{what}; killed by signal {signal.Signals(-code).name}"
        elif code is not None:
            what = f"{what}; exit status {code}"
        tail = b"".join(self._stderr).decode("utf-8", "replace").strip()
        return f"{what}: {tail[-2000:]}" if tail else what

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    async def _drain_stderr(self) -> None:
        stream = self._process.stderr
        assert stream is not None
        with contextlib.suppress(Exception):
            while chunk := await stream.read(4096):
                self._stderr.append(chunk)

    def alive(self) -> bool:
        return self._process.returncode is None

    async def kill(self) -> None:
        """Kill the worker's whole process group and reap it."""
        _kill_group(self._process)
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._stderr_task.cancel()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(2.0):
                await self._process.wait()


def _kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return  # reaped: its pid may belong to someone else now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
