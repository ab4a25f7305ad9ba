"""The slow-client flood of issue 14 (finding 7): many concurrent Initialize calls with
large scripts, sent slowly, and the server's peak resident memory meanwhile.

    python -m bench.flood                       # 500 streams of 900 KB, the issue's attack
    python -m bench.flood --streams 100 --env MAX_INFLIGHT_REQUEST_BYTES=16777216

Every call goes through a proxy that forwards the client's bytes at `--rate` bytes a
second, so that the server holds every stream half-received at once, as a slow client
(or a slow network) makes it do. The server runs as its own process (bench.server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from bench.server import running_server
from lambda_microservice import LambdaClient, LambdaError
from lambda_microservice.v1 import lambda_service_pb2 as pb

INITIALIZE = "/lambda_microservice.v1.LambdaService/Initialize"


class SlowProxy:
    """127.0.0.1:<port> -> `target`, forwarding what clients send at `rate` bytes a second
    in all (answers go back at full speed). Its connections to `target` come from the
    address `source` (any 127.x.y.z is this machine's): the server sees one peer, the
    attacker, apart from a victim calling it from 127.0.0.1."""

    def __init__(self, target: str, rate: float, source: str = "127.0.0.2") -> None:
        self._host, _, port = target.rpartition(":")
        self._port = int(port)
        self._rate = rate
        self._source = source
        self._next_send = 0.0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            self._host, self._port, local_addr=(self._source, 0)
        )
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, slow=True)),
            asyncio.ensure_future(self._pump(up_reader, writer, slow=False)),
        ]
        self._pumps.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._pumps.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
        try:
            while chunk := await reader.read(16384):
                if slow:  # one budget for every connection: the link is slow, not a stream
                    now = time.monotonic()
                    self._next_send = max(self._next_send, now) + len(chunk) / self._rate
                    await asyncio.sleep(self._next_send - now)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@contextmanager
def sampling_rss(read: Any, interval: float = 0.05) -> Iterator[list[int]]:
    """Read the server's RSS every `interval` seconds meanwhile; the list of samples."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(read())
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(5)
        samples.append(read())


async def flood(
    target: str,
    streams: int,
    connections: int,
    size: int,
    rate: float,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] = (),
    errors: list[grpc.aio.AioRpcError] | None = None,
) -> Counter[str]:
    """`streams` concurrent Initialize calls of `size`-byte scripts, over `connections`
    connections, through a SlowProxy; how many ended with each status code."""
    proxy = SlowProxy(target, rate)
    await proxy.start()
    codes: Counter[str] = Counter()
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=options) for _ in range(connections)
    ]
    try:
        calls = [
            c.unary_unary(INITIALIZE, lambda raw: raw, pb.InitializeResponse.FromString) for c in channels
        ]

        async def one(n: int) -> None:
            # a script of its own each (a known script is not checked again): a comment
            script = f"result = {n}\n#" + "x" * (size - 16)
            body = pb.InitializeRequest(language_title="python-flood", script_content=script)
            try:
                await calls[n % connections](body.SerializeToString(), timeout=timeout, metadata=metadata)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
                if errors is not None:
                    errors.append(error)

        await asyncio.gather(*(one(n) for n in range(streams)))
    finally:
        for channel in channels:
            await channel.close()
        await proxy.close()
    return codes


@contextmanager
def victim_calling(target: str) -> Iterator[dict[str, Any]]:
    """Warm Executes of another caller (127.0.0.1, not through the proxy), one after
    another meanwhile: how many were served, how many failed, and the slowest."""
    found: dict[str, Any] = {"served": 0, "failed": Counter(), "slowest_ms": 0.0}
    done = threading.Event()
    with LambdaClient(target, timeout=30) as client:
        session = client.initialize("python-victim", "result = 1").request_id

        def call() -> None:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    client.execute(session)
                    found["served"] += 1
                except LambdaError as error:
                    found["failed"][type(error).__name__] += 1
                elapsed = (time.perf_counter() - started) * 1000
                found["slowest_ms"] = round(max(found["slowest_ms"], elapsed), 1)
                done.wait(0.05)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        try:
            yield found
        finally:
            done.set()
            thread.join(30)


def run(
    streams: int, connections: int, size: int, rate: float, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    with running_server(**env) as server:
        before = server.rss_bytes()
        started = time.monotonic()
        with victim_calling(server.target) as victim, sampling_rss(server.rss_bytes) as samples:
            codes = asyncio.run(flood(server.target, streams, connections, size, rate, timeout))
        refused = server.samples("lambda_inflight_refused_total")
        return {
            "streams": streams,
            "connections": connections,
            "script_bytes": size,
            "rate_bytes_per_second": rate,
            "env": env,
            "seconds": round(time.monotonic() - started, 1),
            "codes": dict(codes),
            "rss_before_mib": round(before / 2**20, 1),
            "rss_peak_mib": round(max(samples) / 2**20, 1),
            "rss_after_mib": round(samples[-1] / 2**20, 1),
            "refused_by_budget": int(sum(refused.values())),
            "victim": {**victim, "failed": dict(victim["failed"])},
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--connections", type=int, default=0, help="0: one a stream")
    parser.add_argument("--size", type=int, default=900_000, help="script bytes per call")
    parser.add_argument("--rate", type=float, default=40e6, help="bytes a second the proxy forwards")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    connections = args.connections or args.streams
    print(json.dumps(run(args.streams, connections, args.size, args.rate, args.timeout, env), indent=2))


if __name__ == "__main__":
    main()
