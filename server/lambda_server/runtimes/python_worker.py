"""The Python runtime's worker: runs one script, many times, for one environment.

Started by the parent as `python -I -S python_worker.py`; it imports nothing of the
server. Requests come as frames on stdin, answers go as frames on the file
descriptor named by LAMBDA_RESPONSE_FD; a frame is a 4-byte big-endian length and
a UTF-8 JSON body, and an answer with a result appends a newline and the result's
JSON text (see process.py). The script's own stdout and stderr are captured per
execution.

A result JSON cannot carry is an INVALID_RESULT answer, and the worker goes on:
NaN and infinities (json's allow_nan=False), an integer past a double's range
(10**400: no JSON reader but Python's holds it), a string that is not valid
Unicode (a lone surrogate, "\ud800"). An integer within a double's range is
written exactly, however large.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import linecache
import os
import sys
import time
import traceback
from typing import Any

SCRIPT_NAME = "script.py"
TRUNCATED = "\n[logs truncated]\n"
# An integer past a double's range has 309 digits or more: a result whose text has no such
# run of digits is not walked. Digits become "0", the rest " ", and find looks for the run
# (about 1 ms a MiB; a regular expression takes 10).
DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
DOUBLE_DIGITS = b"0" * 309
WARM_UP = ("def handler(event):\n    return event['params']['n'] + 1\n", "result = params['n'] + 1\n")


# Streaming (a request's "stream": true): an execution's first OUTPUT_FREE_FRAMES output
# frames go as their lines come; past them, a write goes at once when OUTPUT_INTERVAL seconds
# have passed since the last frame, else it is held, and goes with the first write after the
# interval, or at the end of the execution (no timer: a thread or a signal would be the
# script's to meet). One frame carries all that was held, both streams, as its `parts`: a
# million tiny lines cost the server a few hundred frames, not a million.
OUTPUT_FREE_FRAMES = 256
OUTPUT_INTERVAL = 0.1
PARTIAL_LINE = 8192  # characters of a line without its newline held before they go anyway


class LogBuffer:
    """An execution's console output: its two streams, each line-buffered, keep at most
    `limit` bytes between them (the logs) and note that they cut; with `send`, each chunk
    (a line, or what a flush wrote) also goes in an output frame."""

    def __init__(self, limit: int, send: Any = None) -> None:
        self.limit = limit
        self.parts: list[tuple[str, str]] = []  # (stream, text): the logs, chunk by chunk
        self.size = 0
        self.cut = False
        self.send = send
        self.frames = 0
        self.last = 0.0
        self.held: list[tuple[str, list[str]]] = []  # (stream, texts) kept back by the frame rate
        self.cut_sent = False  # a frame said that the output was cut
        self.stdout = ConsoleStream(self, "stdout")
        self.stderr = ConsoleStream(self, "stderr")

    def add(self, stream: str, text: str) -> None:
        room = self.limit - self.size
        if room <= 0:
            if not self.cut:
                self.cut = True
                if self.send is not None:
                    self.release(False)
            return
        data = text.encode("utf-8", "replace")
        if len(data) > room:
            data = data[:room]
            self.cut = True
        text = data.decode("utf-8", "ignore")  # a character cut in two is left out whole
        self.size = self.limit if self.cut else self.size + len(data)
        if text:
            self.parts.append((stream, text))
        if self.send is not None:
            if text and self.held and self.held[-1][0] == stream:
                self.held[-1][1].append(text)
            elif text:
                self.held.append((stream, [text]))
            self.release(False)

    def release(self, final: bool) -> None:
        """Send what is held, in one frame, unless the frame rate says to wait (not at the end)."""
        if not self.held and (self.cut_sent or not self.cut):
            return
        now = time.monotonic()
        if not final and self.frames >= OUTPUT_FREE_FRAMES and now - self.last < OUTPUT_INTERVAL:
            return
        held, self.held = self.held, []
        self.cut_sent = self.cut
        self.send([[stream, "".join(texts)] for stream, texts in held], self.cut)
        self.frames += 1
        self.last = now

    def finish(self) -> None:
        """The end of the execution: each stream's partial line goes, and what is held; no
        frame goes after it, whoever writes to this buffer."""
        self.stdout.flush()
        self.stderr.flush()
        if self.send is not None:
            self.release(True)
        self.send = None

    def replay(self, send: Any) -> None:
        """Send every chunk kept, in one output frame (a load that failed: its logs)."""
        if self.parts or self.cut:
            send([[stream, text] for stream, text in self.parts], self.cut)

    def text(self) -> str:
        return "".join(text for _, text in self.parts) + (TRUNCATED if self.cut else "")


class Console:
    """sys.stdout and sys.stderr for good: each write goes to the execution under way (its
    LogBuffer), and nowhere between executions. A handler that made a logging handler, or
    started a thread, which holds on to them, writes to the execution of the moment, never
    to one that has ended."""

    logs: LogBuffer | None = None

    def __init__(self) -> None:
        self.stdout = RoutedStream(self, "stdout")
        self.stderr = RoutedStream(self, "stderr")


class RoutedStream(io.TextIOBase):
    """sys.stdout or sys.stderr: writes to the stream of the same name of the current LogBuffer."""

    def __init__(self, console: Console, name: str) -> None:
        self.console = console
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        logs = self.console.logs
        if logs is None:
            if not isinstance(text, str):
                raise TypeError(f"write() argument must be str, not {type(text).__name__}")
            return len(text)
        stream: ConsoleStream = getattr(logs, self.name)
        return stream.write(text)

    def flush(self) -> None:
        logs = self.console.logs
        if logs is not None:
            stream: ConsoleStream = getattr(logs, self.name)
            stream.flush()


CONSOLE = Console()


class ConsoleStream(io.TextIOBase):
    """One stream of an execution's console (what sys.stdout or sys.stderr writes to while it
    runs): line-buffered into its LogBuffer."""

    def __init__(self, logs: LogBuffer, name: str) -> None:
        self.logs = logs
        self.name = name
        self.line: list[str] = []
        self.pending = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        end = text.rfind("\n")
        if end < 0:
            self.line.append(text)
            self.pending += len(text)
            if self.pending >= PARTIAL_LINE:
                self.flush()
        else:
            head = "".join(self.line) + text[: end + 1] if self.line else text[: end + 1]
            rest = text[end + 1 :]
            self.line, self.pending = ([rest], len(rest)) if rest else ([], 0)
            self.logs.add(self.name, head)
        return len(text)

    def flush(self) -> None:
        if self.line:
            text = "".join(self.line)
            self.line, self.pending = [], 0
            self.logs.add(self.name, text)


class Worker:
    def __init__(self, request_fd: int, response_fd: int) -> None:
        self.request = os.fdopen(request_fd, "rb", buffering=0)
        self.response_fd = response_fd
        self.max_logs = int(os.environ.get("LAMBDA_MAX_LOG_BYTES", "65536"))
        self.max_result = int(os.environ.get("LAMBDA_MAX_RESULT_BYTES", "1048576"))
        self.code: Any = None
        self.handler: Any = None
        self.handler_takes_params = False
        self.pid = os.getpid()
        self.request_id = 0
        self.streaming = False  # the request under way asked for output frames

    # framing

    def read_exactly(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.request.read(size)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> dict[str, Any]:
        size = int.from_bytes(self.read_exactly(4), "big")
        message: dict[str, Any] = json.loads(self.read_exactly(size))
        return message

    def send_raw(self, body: bytes) -> None:
        if os.getpid() != self.pid:
            os._exit(0)  # a process the script forked: it never answers for the worker
        data = len(body).to_bytes(4, "big") + body
        view = memoryview(data)
        while view:
            view = view[os.write(self.response_fd, view) :]

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(encode(message))

    def send_output(self, parts: list[list[str]], cut: bool) -> None:
        """An output frame of the request under way: its [stream, text] parts, in order, and
        whether the output was cut; none from a process the script forked."""
        if os.getpid() != self.pid:
            return
        frame: dict[str, Any] = {"id": self.request_id, "op": "output", "parts": parts}
        if cut:
            frame["cut"] = True
        self.send(frame)

    # operations

    def warm_up(self) -> None:
        """Bind and run scripts of its own in each style before saying ready, so that a first
        execution finds the paths it takes warm; nothing of them stays bound."""
        for script in WARM_UP:
            self.load(script)
            self.run({"params": {"n": 1}, "context": {}, "request_id": ""})
        self.code = self.handler = None
        linecache.cache.pop(SCRIPT_NAME, None)

    def serve(self) -> None:
        self.warm_up()
        self.send({"op": "ready"})
        while True:
            try:
                message = self.receive()
            except EOFError:
                return
            op, request_id = message.get("op"), int(message.get("id", 0))
            self.request_id, self.streaming = request_id, message.get("stream") is True
            if op == "check":
                answer = encode(self.check(message["script"]))
            elif op == "load":  # bind the script (and its layer), then run it with the event
                use_layer(message.get("layer"))
                loaded = self.load(message["script"])
                if loaded["ok"]:
                    answer = self.run(message["event"])
                else:
                    answer = encode({**loaded, "loaded": False})
            elif op == "run":
                answer = self.run(message["event"])
            elif op == "many":
                self.many(request_id, message["events"])
                continue
            else:
                answer = encode({"ok": False, "error": failure("RUNTIME_ERROR", f"unknown op {op!r}")})
            # every answer carries its request's id, so a frame the script forged is told apart
            self.send_raw(b'{"id":%d,' % request_id + answer[1:])

    def many(self, request_id: int, events: list[dict[str, Any]]) -> None:
        """Run the bound script once per event, in order, each answered as soon as it is done
        (its frame names the item)."""
        for item, event in enumerate(events):
            answer = self.run(event)
            self.send_raw(b'{"id":%d,"item":%d,' % (request_id, item) + answer[1:])

    def check(self, script: str) -> dict[str, Any]:
        try:
            compile(script, SCRIPT_NAME, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            return {"ok": False, "error": syntax_failure(exc)}
        except RecursionError as exc:  # nested too deep for the compiler
            return {"ok": False, "error": failure("RUNTIME_ERROR", f"{type(exc).__name__}: {exc}")}
        except MemoryError:  # past the checker's memory limit (RLIMIT_AS): the parent says which
            return {"ok": False, "limit": "memory"}
        return {"ok": True}

    def load(self, script: str) -> dict[str, Any]:
        """Compile the script; run its top level now when it defines a handler."""
        linecache.cache[SCRIPT_NAME] = (len(script), None, script.splitlines(True), SCRIPT_NAME)
        self.handler, self.handler_takes_params = None, False  # a top-level script has none
        logs = LogBuffer(self.max_logs)
        try:
            tree = ast.parse(script, SCRIPT_NAME)
            self.code = compile(tree, SCRIPT_NAME, "exec", dont_inherit=True)
            names = {
                node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
            if "handler" in names or "handle" in names:
                module: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
                with Captured(logs):
                    exec(self.code, module)
                name = "handler" if "handler" in names else "handle"
                self.handler = module[name]
                self.handler_takes_params = name == "handle"
        except (SyntaxError, ValueError) as exc:
            return self.load_failed(syntax_failure(exc), logs)
        except BaseException as exc:  # the script's top level failed
            return self.load_failed(runtime_failure(exc), logs)
        return {"ok": True, "logs": logs.text()}

    def load_failed(self, error: dict[str, Any], logs: LogBuffer) -> dict[str, Any]:
        """A load that failed answers with its top level's logs: streamed too, at the end."""
        if self.streaming:
            logs.replay(self.send_output)
        return {"ok": False, "error": error, "logs": logs.text(), **cut(logs)}

    def run(self, event: dict[str, Any]) -> bytes:
        logs = LogBuffer(self.max_logs, self.send_output if self.streaming else None)
        usage = Usage()
        try:
            with Captured(logs):
                result = self.call(event)
        except BaseException as exc:
            return self.failed(runtime_failure(exc), logs, usage)
        try:
            encoded = json.dumps(result, allow_nan=False, ensure_ascii=False)
            data = encoded.encode()
        except UnicodeEncodeError:
            message = "the result holds a string that is not valid Unicode (a lone surrogate)"
            return self.failed(failure("INVALID_RESULT", message), logs, usage)
        except (TypeError, ValueError, RecursionError) as exc:
            message = f"the result is not JSON-representable: {exc}"
            return self.failed(failure("INVALID_RESULT", message), logs, usage)
        if (
            len(data) >= len(DOUBLE_DIGITS)
            and DOUBLE_DIGITS in data.translate(DIGITS)
            and past_double(result)
        ):
            message = "the result holds an integer past a double's range, which JSON readers cannot carry"
            return self.failed(failure("INVALID_RESULT", message), logs, usage)
        if len(data) > self.max_result:
            message = f"the result is larger than {self.max_result} bytes"
            return self.failed(failure("OUTPUT_LIMIT", message), logs, usage)
        head = encode({"ok": True, "logs": logs.text(), **usage.measure(), **cut(logs)})
        return head + b"\n" + data

    def call(self, event: dict[str, Any]) -> Any:
        if self.handler is not None:
            value = self.handler(event["params"] if self.handler_takes_params else event)
        else:
            scope: dict[str, Any] = {
                "__name__": "__main__",
                "__builtins__": __builtins__,
                "params": event["params"],
                "context": event["context"],
                "event": event,
            }
            exec(self.code, scope)
            value = scope.get("result")
        if asyncio.iscoroutine(value):
            value = asyncio.run(value)
        return value

    def failed(self, error: dict[str, Any], logs: LogBuffer, usage: Usage) -> bytes:
        return encode({"ok": False, "error": error, "logs": logs.text(), **usage.measure(), **cut(logs)})


def cut(logs: LogBuffer) -> dict[str, Any]:
    """An answer's `cut`: present, and true, when the console output went past the limit."""
    return {"cut": True} if logs.cut else {}


def encode(message: dict[str, Any]) -> bytes:
    """A message's compact JSON text. A lone surrogate in it (an error's message may quote
    one) becomes "?": the parent refuses a frame that is not valid Unicode."""
    return json.dumps(message, ensure_ascii=False).encode("utf-8", "replace")


def past_double(value: Any) -> bool:
    """Whether `value` holds an integer that no double holds (float() overflows)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            try:
                float(item)
            except OverflowError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def _open_proc(name: str, flags: int) -> int:
    try:
        return os.open(f"/proc/self/{name}", flags)
    except OSError:
        return -1  # not permitted here: the peak is then the process's lifetime peak


# The /proc files read around every execution, opened once: a read at offset 0
# makes the kernel write the status anew (3 us a run, against 22 us opening them).
CLEAR_REFS = _open_proc("clear_refs", os.O_WRONLY)
STATUS = _open_proc("status", os.O_RDONLY)


class Usage:
    """CPU time and peak resident memory of this process over one execution."""

    def __init__(self) -> None:
        if CLEAR_REFS >= 0:
            try:  # "5" resets the peak RSS (VmHWM) that /proc/self/status reports
                os.write(CLEAR_REFS, b"5")
            except OSError:
                pass
        self.cpu = time.process_time()

    def measure(self) -> dict[str, Any]:
        peak = 0
        try:
            status = os.pread(STATUS, 8192, 0)
            start = status.index(b"VmHWM:") + 6
            peak = int(status[start : status.index(b"kB", start)]) * 1024
        except (OSError, ValueError):
            pass
        return {"cpu": time.process_time() - self.cpu, "peak": peak}


class Captured:
    """Make a LogBuffer the console's for the duration (sys.stdout and sys.stderr, put back
    if the script replaced them, write to it); at its end, what its streams hold goes to
    the logs, and the console writes nowhere until the next execution."""

    def __init__(self, logs: LogBuffer) -> None:
        self.logs = logs

    def __enter__(self) -> None:
        sys.stdout, sys.stderr = CONSOLE.stdout, CONSOLE.stderr
        CONSOLE.logs = self.logs

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = CONSOLE.stdout, CONSOLE.stderr
        CONSOLE.logs = None
        self.logs.finish()


def use_layer(layer: object) -> None:
    """Put a layer's packages (a session's dependencies, mounted read-only) on the path, for
    the one script this process will ever run: after the standard library, before any
    site-packages, as a site-packages folder sits (a package's `json.py` shadows no module of
    the standard library). sys.path.insert, not site.addsitedir: a `.pth` file of a package
    is never processed, so nothing of a package runs but what the script imports."""
    if isinstance(layer, str) and layer:
        packages = layer + "/site-packages"
        if packages not in sys.path:
            sys.path.insert(after_stdlib(sys.path), packages)


def after_stdlib(path: list[str]) -> int:
    """The position in `path` just after its last entry of the standard library (its
    folder, its zip, lib-dynload), 0 when it has none."""
    stdlib = os.path.dirname(os.__file__)
    position = 0
    for index, entry in enumerate(path):
        inside = entry == stdlib or (entry.startswith(stdlib + os.sep) and "-packages" not in entry)
        if inside or (entry.endswith(".zip") and os.path.basename(entry).startswith("python")):
            position = index + 1
    return position


def failure(code: str, message: str, line: int = 0, column: int = 0, stack: str = "") -> dict[str, Any]:
    return {"code": code, "message": message, "line": line, "column": column, "stack": stack}


def syntax_failure(exc: SyntaxError | ValueError) -> dict[str, Any]:
    if isinstance(exc, SyntaxError):
        message = f"{type(exc).__name__}: {exc.msg}"
        return failure("RUNTIME_ERROR", message, exc.lineno or 0, exc.offset or 0)
    return failure("RUNTIME_ERROR", f"{type(exc).__name__}: {exc}")


def runtime_failure(exc: BaseException) -> dict[str, Any]:
    """The error with its position and stack, trimmed to the user's script."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == SCRIPT_NAME]
    line = column = 0
    if frames:
        line = frames[-1].lineno or 0
        column = (frames[-1].colno or 0) + 1 if frames[-1].colno is not None else 0
    if isinstance(exc, MemoryError):
        code = "MEMORY_LIMIT"
    else:
        code = "RUNTIME_ERROR"
    stack = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
    stack += "".join(traceback.format_exception_only(type(exc), exc))
    message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return failure(code, message, line, column, stack)


def main() -> None:
    response_fd = int(os.environ["LAMBDA_RESPONSE_FD"])
    # Keep the protocol away from the script: requests move to a private
    # descriptor and the script's stdin, stdout and stderr point at /dev/null.
    request_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    sys.stdout, sys.stderr = CONSOLE.stdout, CONSOLE.stderr
    Worker(request_fd, response_fd).serve()


if __name__ == "__main__":
    main()
