"""A TCP proxy in front of PostgreSQL that a test can cut: the network is the seam we fake."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from urllib.parse import parse_qs, urlsplit, urlunsplit


class DatabaseProxy:
    """Forwards 127.0.0.1:<port> to the real PostgreSQL of `url`.

    Modes: `up` forwards; `reset` closes every connection and refuses new ones at
    once (a stopped server); `blackhole` accepts and holds connections but
    forwards nothing (a frozen server or a dropped network: the case that hangs).
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
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.mode != "up":
                    return  # blackhole: swallow and stop forwarding
                writer.write(data)
                await writer.drain()
        if self.mode == "up":
            writer.transport.abort()
