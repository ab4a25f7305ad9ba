"""A TCP proxy in front of PostgreSQL that a test can cut: the network is the seam we fake."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit


class DatabaseProxy:
    """Forwards 127.0.0.1:<port> to the real PostgreSQL of `url`.

    Modes: `up` forwards; `reset` closes every connection and refuses new ones at
    once (a stopped server); `blackhole` accepts and holds connections but
    forwards nothing (a frozen server or a dropped network: the case that hangs).

    `lose_answers_to(text)`: on a connection that runs a statement whose SQL holds
    `text`, everything the server sends back from then on is dropped (a reply cut on
    its way back: the statement ran, and committed, and its client never hears of it).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        if socket_dir.startswith("/"):
            self._unix_path: str | None = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}"
        else:
            self._unix_path = None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5432
        self._url = parts
        self.mode = "up"
        self._lose: bytes | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="db-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The database URL, through the proxy."""
        user = self._url.username or "postgres"
        auth = f"{user}:{self._url.password}@" if self._url.password else f"{user}@"
        return urlunsplit(("postgresql", f"{auth}127.0.0.1:{self.port}", self._url.path, "", ""))

    def set_mode(self, mode: str) -> None:
        assert mode in ("up", "reset", "blackhole")
        asyncio.run_coroutine_threadsafe(self._set_mode(mode), self._loop).result(10)

    def lose_answers_to(self, text: bytes | None) -> None:
        """From now on, a connection that runs a statement holding `text` hears nothing
        more (None: no new connection is cut; one cut already stays cut)."""
        self._lose = text

    async def _set_mode(self, mode: str) -> None:
        if mode != "blackhole" or self.mode == "blackhole":
            for writer in list(self._connections):
                writer.transport.abort()
            self._connections.clear()
        self.mode = mode

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            await self._set_mode("reset")

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.transport.abort()
            return
        self._connections.add(writer)
        if self.mode == "blackhole":
            return  # held open, never answered
        try:
            if self._unix_path:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.transport.abort()
            return
        self._connections.add(up_writer)
        frontend = _Frontend(lambda: self._lose)
        await asyncio.gather(
            self._pump(reader, up_writer, frontend.read), self._pump(up_reader, writer, frontend.cut)
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Callable[[bytes], bool]
    ) -> None:
        """Forward; `seen(data)` is told what goes by, and True drops it (an answer lost)."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.mode != "up":
                    return  # blackhole: swallow and stop forwarding
                if seen(data):
                    continue
                writer.write(data)
                await writer.drain()
        if self.mode == "up":
            writer.transport.abort()


class _Frontend:
    """What a client sends on one connection, read as PostgreSQL's protocol messages just
    enough to tell when it runs a statement whose SQL holds the text to lose answers to:
    a simple query (Q) holding it, or a Bind (B) of a statement whose Parse (P) held it."""

    def __init__(self, lose: Callable[[], bytes | None]) -> None:
        self._lose = lose
        self._buffer = b""
        self._typed = False  # after the StartupMessage, every message has a type byte
        self._statements: set[bytes] = set()  # prepared statements holding the text
        self.cutting = False

    def cut(self, _answer: bytes) -> bool:
        return self.cutting

    def read(self, data: bytes) -> bool:
        self._buffer += data
        while True:
            head = 5 if self._typed else 4
            if len(self._buffer) < head:
                return False
            size = int.from_bytes(self._buffer[head - 4 : head], "big")
            end = head - 4 + size
            if len(self._buffer) < end:
                return False
            kind, body = self._buffer[:1], self._buffer[head:end]
            self._buffer = self._buffer[end:]
            if not self._typed:
                self._typed = body[:4] == b"\x00\x03\x00\x00"  # the StartupMessage (protocol 3.0)
                continue
            self._message(kind, body)

    def _message(self, kind: bytes, body: bytes) -> None:
        text = self._lose()
        if text is None:
            return
        if kind == b"Q" and text in body:
            self.cutting = True
        elif kind == b"P":
            name, _, rest = body.partition(b"\0")
            if text in rest.partition(b"\0")[0]:
                self._statements.add(name)
        elif kind == b"B":
            statement = body.partition(b"\0")[2].partition(b"\0")[0]
            if statement in self._statements:
                self.cutting = True
