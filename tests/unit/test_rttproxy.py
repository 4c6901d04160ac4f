"""The latency-injecting proxy (efsish.devtools.rttproxy) on loopback: each exchange
takes the configured round trip longer, bulk data is not capped at window/rtt, memory
per connection is bounded, a close on one side reaches the other, many connections run
at once, and leaving the proxy closes every socket."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
import trio

from efsish.devtools.rttproxy import CHUNK, rtt_proxy

MiB = 1024 * 1024


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def _sink(stream: trio.SocketStream) -> None:
    """Reads everything, then answers with the byte count."""
    async with stream:
        n = 0
        while data := await stream.receive_some(CHUNK):
            n += len(data)
        await stream.send_all(str(n).encode())


async def _source(stream: trio.SocketStream) -> None:
    """Sends the number of MiB asked for in the first 8 bytes, then closes."""
    async with stream:
        want = int((await stream.receive_some(8)).decode())
        block = os.urandom(MiB)
        for _ in range(want):
            await stream.send_all(block)


class _Server:
    def __init__(self, port: int) -> None:
        self.port = port


async def _start(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> _Server:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return _Server(listeners[0].socket.getsockname()[1])


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, _Server]]:
    async with trio.open_nursery() as n:
        yield {
            "echo": await _start(n, _echo),
            "sink": await _start(n, _sink),
            "source": await _start(n, _source),
        }
        n.cancel_scope.cancel()


async def _exchange_times(port: int, n: int) -> list[float]:
    out = []
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        for i in range(n):
            msg = f"ping {i:04d}".encode()
            t0 = time.perf_counter()
            await s.send_all(msg)
            got = b""
            while len(got) < len(msg):
                got += await s.receive_some(100)
            out.append(time.perf_counter() - t0)
            assert got == msg
    return out


async def test_small_exchange_takes_the_round_trip(servers: dict[str, _Server]) -> None:
    direct = await _exchange_times(servers["echo"].port, 20)
    for rtt in (0.005, 0.020):
        async with rtt_proxy("127.0.0.1", servers["echo"].port, rtt) as p:
            times = await _exchange_times(p.port, 30)
        # the first exchange on a new connection also pays the handshake's round trip
        assert 2 * rtt <= times[0] <= 2 * rtt + 0.010, (rtt, times)
        times = times[1:]
        assert min(times) >= rtt, (rtt, times)
        # the median exchange: the round trip plus a few ms (this machine is shared)
        assert statistics.median(times) <= rtt + statistics.median(direct) + 0.004, (rtt, times)


async def _upload(port: int, nbytes: int) -> float:
    block = os.urandom(MiB)
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        t0 = time.perf_counter()
        for _ in range(nbytes // MiB):
            await s.send_all(block)
        await s.send_eof()
        answer = b""
        while data := await s.receive_some(100):
            answer += data
        dt = time.perf_counter() - t0
    assert int(answer) == nbytes
    return dt


async def _download(port: int, mib: int) -> float:
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        t0 = time.perf_counter()
        await s.send_all(f"{mib:08d}".encode())
        n = 0
        while data := await s.receive_some(CHUNK):
            n += len(data)
        dt = time.perf_counter() - t0
    assert n == mib * MiB
    return dt


async def test_bulk_transfer_is_not_capped_by_the_round_trip(
    servers: dict[str, _Server],
) -> None:
    size = 64 * MiB
    direct_up = size / await _upload(servers["sink"].port, size) / 1e6
    direct_down = size / await _download(servers["source"].port, 64) / 1e6
    async with rtt_proxy("127.0.0.1", servers["sink"].port, 0.020) as p:
        up = size / await _upload(p.port, size) / 1e6
        peak_up = p.stats.peak_queued
    async with rtt_proxy("127.0.0.1", servers["source"].port, 0.020) as p:
        down = size / await _download(p.port, 64) / 1e6
    print(f"MB/s direct up {direct_up:.0f} down {direct_down:.0f}; at 20 ms {up:.0f} / {down:.0f}")
    # Sleep-then-copy per 256 KiB read would give at most 256 KiB / 20 ms = 13 MB/s.
    assert up > 100 and down > 100, (up, down, direct_up, direct_down)
    assert peak_up <= 8 * MiB + CHUNK


async def test_memory_is_bounded_when_the_receiver_stalls() -> None:
    """The upstream never reads: the proxy queues at most max_queued (+ one chunk) per
    direction and the sender is held back by TCP instead."""
    accepted: list[trio.SocketStream] = []

    async def stall(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        srv = await _start(n, stall)
        async with rtt_proxy("127.0.0.1", srv.port, 0.002, max_queued=MiB) as p:
            sent = 0
            block = b"x" * MiB
            async with await trio.open_tcp_stream("127.0.0.1", p.port) as s:
                with trio.move_on_after(1.5):
                    for _ in range(256):
                        await s.send_all(block)
                        sent += len(block)
            assert sent < 64 * MiB, sent  # held back (socket buffers hold the rest)
            assert p.stats.peak_queued <= MiB + CHUNK, p.stats.peak_queued
        n.cancel_scope.cancel()


async def test_a_close_on_either_side_reaches_the_other() -> None:
    events: list[str] = []
    upstream_closes = trio.Event()
    got_eof = trio.Event()
    second = trio.Event()
    conns: list[trio.SocketStream] = []

    async def handler(stream: trio.SocketStream) -> None:
        conns.append(stream)
        async with stream:
            if len(conns) == 1:  # first connection: the client closes
                data = await stream.receive_some(100)
                events.append(f"got {data!r}")
                eof = await stream.receive_some(100)
                events.append(f"eof {eof!r}")
                got_eof.set()
            else:  # second connection: the server closes
                second.set()
                await upstream_closes.wait()

    async with trio.open_nursery() as n:
        srv = await _start(n, handler)
        async with rtt_proxy("127.0.0.1", srv.port, 0.010) as p:
            s = await trio.open_tcp_stream("127.0.0.1", p.port)
            await s.send_all(b"hello")
            await s.aclose()
            with trio.fail_after(2):
                await got_eof.wait()
            assert events == ["got b'hello'", "eof b''"]

            s = await trio.open_tcp_stream("127.0.0.1", p.port)
            with trio.fail_after(2):
                await second.wait()
            upstream_closes.set()
            with trio.fail_after(2):
                assert await s.receive_some(100) == b""
            await s.aclose()
            with trio.fail_after(2):
                while p.stats.open_connections:  # noqa: ASYNC110 (a counter, no event)
                    await trio.sleep(0.005)
        n.cancel_scope.cancel()


async def test_many_concurrent_connections_and_clean_shutdown(
    servers: dict[str, _Server],
) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    results: list[list[float]] = []

    async def client(p_port: int) -> None:
        results.append(await _exchange_times(p_port, 5))

    held: list[trio.SocketStream] = []
    async with rtt_proxy("127.0.0.1", servers["echo"].port, 0.020) as p:
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for _ in range(100):
                n.start_soon(client, p.port)
        took = time.perf_counter() - t0
        assert len(results) == 100 and p.stats.connections == 100
        assert all(min(r) >= 0.020 for r in results)
        # 100 clients x 5 exchanges of 20 ms each, concurrently: ~0.1 s, not 10 s
        assert took < 2.0, took
        # connections still open when the proxy stops are closed by it
        for _ in range(3):
            s = await trio.open_tcp_stream("127.0.0.1", p.port)
            held.append(s)
            await s.send_all(b"x")
            assert await s.receive_some(10) == b"x"
    for s in held:
        with trio.fail_after(2):
            try:
                assert await s.receive_some(10) == b""
            except trio.BrokenResourceError:
                pass
        await s.aclose()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_rejects_a_bad_round_trip() -> None:
    with pytest.raises(ValueError, match="rtt"):
        async with rtt_proxy("127.0.0.1", 1, float("nan")):
            pass
