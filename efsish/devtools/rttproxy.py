"""A TCP proxy on 127.0.0.1 that puts a store at a distance: it adds a fixed round-trip
time to every exchange between its clients and one upstream server, without limiting
bulk throughput.

Each direction of each connection is a delay line: a reader task timestamps every chunk
as it arrives and queues it; a writer task sends each chunk at arrival + rtt/2, in
order, while the reader keeps accepting later chunks. A request/response exchange
therefore takes rtt longer, as over a long link, and a bulk transfer keeps flowing at
the speed of the two ends (not window/rtt, as "sleep, then copy" per read would give).
Memory is bounded: a direction whose queue holds more than `max_queued` bytes stops
reading until the writer has sent some, so TCP pushes back on the sender.

A new connection costs one more round trip, as TCP's handshake does over a long link:
the proxy connects upstream, and starts reading what the client sent, only `rtt` after
accepting it (TLS's own round trips are not modelled: the store is plain http here).

End of stream is delayed like data and passed on as a half-close; when both directions
have ended, or either fails (reset, broken pipe), both sockets are closed. Leaving
`rtt_proxy()` closes the listener and every connection.

Used by the tests and the benchmark (scripts/bench, `--store-rtt`); the daemon never
imports it. As a command:

    python -m efsish.devtools.rttproxy --listen 127.0.0.1:0 --upstream 127.0.0.1:8333 --rtt-ms 20

prints the bound port on the first line of stdout and runs until SIGTERM/SIGINT. With
`--stats FILE` it keeps FILE (JSON: connections, bytes and HTTP requests by method) up to
date, for counting the requests an idle mount sends.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

CHUNK = 256 * 1024
DEFAULT_MAX_QUEUED = 8 * 1024 * 1024  # bytes queued per direction before reading stops

# Request lines in the client's byte stream (HTTP/1.x), for the request count.
_REQ = re.compile(rb"(GET|PUT|HEAD|DELETE|POST) /[^ \r\n]{0,2048} HTTP/1\.[01]\r\n")
_TAIL = 2100


@dataclass
class ProxyStats:
    """What went through the proxy so far."""

    connections: int = 0
    open_connections: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    peak_queued: int = 0  # most bytes one direction of one connection held at once
    requests: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "open_connections": self.open_connections,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "peak_queued": self.peak_queued,
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
        }


@dataclass
class RttProxy:
    """A running proxy: where it listens and what passed through it."""

    host: str
    port: int
    rtt: float
    stats: ProxyStats

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"


class _DelayLine:
    """One direction of one connection: src -> dst, each chunk delayed by `delay`."""

    def __init__(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        delay: float,
        max_queued: int,
        stats: ProxyStats,
        on_bytes: Callable[[bytes], None],
    ) -> None:
        self.src, self.dst, self.delay, self.max_queued = src, dst, delay, max_queued
        self.stats, self.on_bytes = stats, on_bytes
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.item_ready = trio.Event()
        self.space_ready = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._read)
            await self._write()

    async def _read(self) -> None:
        while True:
            while self.queued >= self.max_queued:
                self.space_ready = trio.Event()
                await self.space_ready.wait()
            data = await self.src.receive_some(CHUNK)
            self.queue.append((trio.current_time() + self.delay, data))
            self.queued += len(data)
            self.stats.peak_queued = max(self.stats.peak_queued, self.queued)
            self.item_ready.set()
            if not data:  # end of stream, delayed like data
                return
            self.on_bytes(data)

    async def _write(self) -> None:
        while True:
            while not self.queue:
                self.item_ready = trio.Event()
                await self.item_ready.wait()
            due, data = self.queue[0]
            await trio.sleep_until(due)
            # Everything already due goes out in one send (fewer syscalls on bulk data).
            parts = []
            now = trio.current_time()
            while self.queue and self.queue[0][0] <= now and self.queue[0][1]:
                parts.append(self.queue.popleft()[1])
            if parts:
                out = b"".join(parts) if len(parts) > 1 else parts[0]
                await self.dst.send_all(out)
                self.queued -= len(out)
                self.space_ready.set()
                continue
            if not data:
                self.queue.popleft()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.dst.send_eof()
                return


async def _serve_one(
    client: trio.SocketStream,
    upstream: tuple[str, int],
    rtt: float,
    max_queued: int,
    stats: ProxyStats,
) -> None:
    stats.connections += 1
    stats.open_connections += 1
    try:
        async with client:
            await trio.sleep(rtt)  # the handshake's round trip
            try:
                up = await trio.open_tcp_stream(*upstream)
            except OSError:
                return
            async with up:
                tail = [b""]

                def count_up(data: bytes) -> None:
                    stats.bytes_up += len(data)
                    buf = tail[0] + data
                    for m in _REQ.finditer(buf):
                        if m.end() > len(tail[0]):
                            stats.requests[m.group(1).decode()] += 1
                    tail[0] = buf[-_TAIL:]

                def count_down(data: bytes) -> None:
                    stats.bytes_down += len(data)

                half = rtt / 2
                lines = (
                    _DelayLine(client, up, half, max_queued, stats, count_up),
                    _DelayLine(up, client, half, max_queued, stats, count_down),
                )
                try:
                    async with trio.open_nursery() as n:
                        for line in lines:
                            n.start_soon(line.run)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # a reset or a closed peer ends the connection: close both
    finally:
        stats.open_connections -= 1


@contextlib.asynccontextmanager
async def rtt_proxy(
    upstream_host: str,
    upstream_port: int,
    rtt: float,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_queued: int = DEFAULT_MAX_QUEUED,
) -> AsyncIterator[RttProxy]:
    """Run a proxy to upstream_host:upstream_port adding `rtt` seconds per round trip;
    yields it (its `port` is the bound one). Leaving closes every socket."""
    if not (rtt >= 0 and math.isfinite(rtt)):
        raise ValueError(f"rtt must be a finite number >= 0, not {rtt!r}")
    listeners = await trio.open_tcp_listeners(port, host=host)
    stats = ProxyStats()
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(stream, (upstream_host, upstream_port), rtt, max_queued, stats)

    async with trio.open_nursery() as n:
        try:
            n.start_soon(trio.serve_listeners, handler, listeners)
            yield RttProxy(host, bound, rtt, stats)
        finally:
            n.cancel_scope.cancel()
            for lst in listeners:
                await trio.aclose_forcefully(lst)


def _hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected HOST:PORT, e.g. 127.0.0.1:8333")
    return host or "127.0.0.1", int(port)


async def _main(a: argparse.Namespace) -> None:
    up_host, up_port = a.upstream
    host, port = a.listen
    async with rtt_proxy(
        up_host, up_port, a.rtt_ms / 1000, host=host, port=port, max_queued=a.max_queued_mib << 20
    ) as p:
        print(p.port, flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async with trio.open_nursery() as n:
                if a.stats:
                    n.start_soon(_write_stats, Path(a.stats), p.stats)
                async for _ in sigs:
                    n.cancel_scope.cancel()
                    break
    if a.stats:  # the final counts, every connection closed
        _dump(Path(a.stats), p.stats)


def _dump(path: Path, stats: ProxyStats) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats.as_dict()))
    os.replace(tmp, path)


async def _write_stats(path: Path, stats: ProxyStats, every: float = 0.2) -> None:
    while True:
        _dump(path, stats)
        await trio.sleep(every)


def command(upstream: str, rtt_ms: float, stats: Path, python: str = sys.executable) -> list[str]:
    """The command line that runs the proxy as a process: on a free port of 127.0.0.1,
    in front of the server at the URL `upstream`, keeping its counts in `stats`."""
    from urllib.parse import urlsplit

    u = urlsplit(upstream)
    return [
        python,
        "-m",
        "efsish.devtools.rttproxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"{u.hostname}:{u.port}",
        "--rtt-ms",
        str(rtt_ms),
        "--stats",
        str(stats),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m efsish.devtools.rttproxy",
        description="TCP proxy adding a fixed round-trip time (half each way) to every "
        "exchange with one upstream server, without limiting throughput.",
    )
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT")
    ap.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT")
    ap.add_argument("--rtt-ms", type=float, required=True, help="round trip added, ms")
    ap.add_argument(
        "--max-queued-mib", type=int, default=DEFAULT_MAX_QUEUED >> 20, help="per direction"
    )
    ap.add_argument("--stats", default=None, help="keep this JSON file of counts up to date")
    a = ap.parse_args(argv)
    if not (a.rtt_ms >= 0 and math.isfinite(a.rtt_ms)):
        ap.error("--rtt-ms must be a finite number >= 0")
    try:
        trio.run(_main, a)
    except OSError as e:
        print(f"rttproxy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
