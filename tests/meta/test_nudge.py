"""efsish.meta.nudge: the key in the bucket, the datagram, and two real UDP endpoints on
127.0.0.1 nudging each other."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.lowlevel

from efsish import codec
from efsish.errors import CorruptObject, NotFound, UsageError
from efsish.meta import nudge
from efsish.meta.heartbeat import Heartbeat
from efsish.meta.nudge import Nudge, Nudger
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.memory import MemoryStore

FS = str(uuid.uuid4())
KEY = bytes(range(32))
LOCAL = ("127.0.0.1", 0)


def _store() -> MemoryStore:
    return MemoryStore(f"nudge-{uuid.uuid4().hex}")


# ------------------------------------------------------------------------------- key


async def test_racing_creators_end_with_one_key_that_both_read() -> None:
    inner = _store()
    # Latency on every request: both GETs find no key before either create lands.
    store = FaultyStore(inner, FaultPlan(latency=0.02))
    keys: list[bytes] = []

    async def one() -> None:
        keys.append(await nudge.load_key(store))

    async with trio.open_nursery() as n:
        n.start_soon(one)
        n.start_soon(one)
    assert store.calls["put_if_absent"] == 2  # both tried to create it
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) == 32
    assert [i.key async for i in inner.list(nudge.PREFIX)] == [nudge.KEY]
    assert await nudge.load_key(inner, create=False) == keys[0]


async def test_a_missing_or_damaged_key_is_never_replaced() -> None:
    store = _store()
    with pytest.raises(NotFound):
        await nudge.load_key(store, create=False)  # a read-only mount does not make one
    for bad in (
        b"garbage",
        codec.encode_json(b"N", {"key": "ab" * 16}),  # 128 bits
        codec.encode_json(b"N", {"key": "not hex"}),
        codec.encode_json(b"H", {"key": "ab" * 32}),  # another kind of object
    ):
        await store.put(nudge.KEY, bad)
        with pytest.raises(CorruptObject, match=f"delete {nudge.KEY} and remount") as e:
            await nudge.load_key(store)
        assert "\n" not in str(e.value)
        assert await store.get(nudge.KEY) == bad  # untouched


# -------------------------------------------------------------------------- datagram


def test_a_datagram_round_trips_fits_in_512_bytes_and_detects_any_change() -> None:
    n = Nudge(FS, "a" * 16, "b" * 16, 2**62, uuid.uuid4().hex)
    data = nudge.encode(KEY, n)
    assert nudge.decode(KEY, data) == n
    assert len(data) < 200
    big = Nudge(FS, "a" * 160, "b" * 160, 1, "r" * 160)
    with pytest.raises(ValueError, match="over 512"):
        nudge.encode(KEY, big)
    for i in range(len(data)):
        changed = bytearray(data)
        changed[i] ^= 0x01
        with pytest.raises(nudge.InvalidNudge):
            nudge.decode(KEY, bytes(changed))
    with pytest.raises(nudge.InvalidNudge, match="MAC"):
        nudge.decode(bytes(32), data)


# -------------------------------------------------------------------------- endpoints


class Endpoint:
    """A Nudger with its wake-ups recorded and an applied position to move."""

    def __init__(self, client: str, *, key: bytes = KEY, fs: str = FS) -> None:
        self.applied = 0
        self.woken: list[tuple[float, Nudge]] = []
        self.event = trio.Event()
        self.n = Nudger(key, fs, client, LOCAL, applied=lambda: self.applied, on_wake=self._wake)

    def _wake(self, n: Nudge) -> None:
        self.woken.append((time.perf_counter(), n))
        self.event.set()
        self.event = trio.Event()

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.n.client, time.time_ns(), nudge=self.n.address)


@contextmanager
def raw_sender() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


async def until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(2):
        while not cond():  # noqa: ASYNC110 (counters, no event)
            await trio.sleep(0.001)


async def test_a_valid_nudge_wakes_the_receiver_within_milliseconds() -> None:
    a, b = Endpoint("a"), Endpoint("b")
    assert b.n.address.startswith("127.0.0.1:") and not b.n.address.endswith(":0")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.n.serve)
        await nursery.start(b.n.serve)
        latencies = []
        for seq in (1, 2, 3):
            waiting = b.event
            t0 = time.perf_counter()
            assert a.n.nudge(b.heartbeat(), seq, f"rid{seq}")
            with trio.fail_after(1):
                await waiting.wait()
            latencies.append(b.woken[-1][0] - t0)
            b.applied = seq  # it caught up
        nursery.cancel_scope.cancel()
    assert [w[1] for w in b.woken] == [Nudge(FS, "a", "b", s, f"rid{s}") for s in (1, 2, 3)]
    assert min(latencies) < 0.005, latencies  # loopback: well under a millisecond when idle
    assert max(latencies) < 0.1, latencies  # a loaded 2-core CI machine
    assert (a.n.stats.sent, b.n.stats.received, b.n.stats.woken) == (3, 3, 3)
    # No address advertised (nudge=off, or an older efsish): nothing sent.
    assert not a.n.nudge(Heartbeat("c", time.time_ns()), 9, "r")
    assert a.n.stats.send_failed == 1


async def test_invalid_stale_and_replayed_datagrams_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = Endpoint("b")
    b.applied = 10
    addr = nudge.parse_address(b.n.address)
    good = nudge.encode(KEY, Nudge(FS, "a", "b", 11, "r"))
    invalid = [
        nudge.encode(os.urandom(32), Nudge(FS, "a", "b", 11, "r")),  # another key
        nudge.encode(KEY, Nudge(str(uuid.uuid4()), "a", "b", 11, "r")),  # another fs
        nudge.encode(KEY, Nudge(FS, "a", "c", 11, "r")),  # to another client
        good[:-1],  # truncated
        good[:12],
        good + b"x",  # trailing byte
        b"",
        os.urandom(100),  # garbage
        good[:5] + os.urandom(300),  # garbage with the right magic
        b"\0" * 600,  # oversized
    ]
    stale = [
        nudge.encode(KEY, Nudge(FS, "a", "b", 10, "r")),  # at the applied position
        nudge.encode(KEY, Nudge(FS, "a", "b", 3, "r")),  # below it
    ]
    caplog.set_level(logging.DEBUG, logger="efsish.meta.nudge")
    async with trio.open_nursery() as nursery:
        await nursery.start(b.n.serve)
        with raw_sender() as s:
            for data in invalid + stale:
                s.sendto(data, addr)
            await until(lambda: b.n.stats.received == len(invalid) + len(stale))
            assert b.woken == []
            s.sendto(good, addr)
            await until(lambda: len(b.woken) == 1)
            b.applied = 11  # the catch-up it caused
            s.sendto(good, addr)  # the same datagram replayed
            await until(lambda: b.n.stats.received == len(invalid) + len(stale) + 2)
        nursery.cancel_scope.cancel()
    st = b.n.stats
    assert (st.dropped_invalid, st.dropped_stale, st.woken, st.dropped_rate) == (
        len(invalid),
        len(stale) + 1,
        1,
        0,
    )
    lines = [r for r in caplog.records if "invalid nudge" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG  # at most one a minute


async def test_wake_ups_are_limited_to_20_a_second() -> None:
    a, b = Endpoint("a"), Endpoint("b")
    hb = b.heartbeat()
    async with trio.open_nursery() as nursery:
        await nursery.start(b.n.serve)
        for seq in range(1, 201):  # a burst (letting the receiver drain its buffer)
            a.n.nudge(hb, seq, "r")
            if seq % 25 == 0:
                await trio.lowlevel.checkpoint()
        await until(lambda: b.n.stats.received == 200)
        assert (b.n.stats.woken, b.n.stats.dropped_rate) == (20, 180)
        # Keep nudging at ~200 a second for 1.5 s: still at most 20 in any second.
        end = time.monotonic() + 1.5
        seq = 200
        while time.monotonic() < end:
            seq += 1
            a.n.nudge(hb, seq, "r")
            await trio.sleep(0.005)
        await until(lambda: b.n.stats.received == seq)
        nursery.cancel_scope.cancel()
    times = [t for t, _ in b.woken]
    assert all(times[i + 20] - times[i] >= 1.0 for i in range(len(times) - 20))
    assert 40 <= len(times) <= 60, len(times)
    assert b.n.stats.woken + b.n.stats.dropped_rate == seq


async def test_the_listener_stops_cleanly_on_cancellation_and_survives_a_bad_callback() -> None:
    def boom_(n: Nudge) -> None:
        raise RuntimeError(f"a bug in the callback, woken by {n}")

    fds = len(os.listdir("/proc/self/fd"))
    boom = Nudger(KEY, FS, "b", LOCAL, applied=lambda: 0, on_wake=boom_)
    host, port = nudge.parse_address(boom.address)
    with raw_sender() as s:
        async with trio.open_nursery() as nursery:
            await nursery.start(boom.serve)
            s.sendto(nudge.encode(KEY, Nudge(FS, "a", "b", 1, "r")), (host, port))
            await until(lambda: boom.stats.woken == 1)  # the callback raised; serve did not
            s.sendto(nudge.encode(KEY, Nudge(FS, "a", "b", 2, "r")), (host, port))
            await until(lambda: boom.stats.woken == 2)
            nursery.cancel_scope.cancel()
    assert len(os.listdir("/proc/self/fd")) == fds
    # The port is free again: a new endpoint binds it.
    with Nudger(KEY, FS, "b", (host, port), applied=lambda: 0, on_wake=print) as again:
        assert again.address == f"{host}:{port}"
    assert len(os.listdir("/proc/self/fd")) == fds
    # A port in use is an OSError at construction, with nothing leaked.
    with (
        Nudger(KEY, FS, "b", LOCAL, applied=lambda: 0, on_wake=print) as taken,
        pytest.raises(OSError),
    ):
        Nudger(KEY, FS, "c", nudge.parse_address(taken.address), applied=int, on_wake=print)
    assert len(os.listdir("/proc/self/fd")) == fds


# ------------------------------------------------------------------------- addresses


async def test_the_bind_address_follows_the_option_and_the_store() -> None:
    mem = _store()
    assert await nudge.resolve_bind("auto", mem) == ("127.0.0.1", 0)
    assert await nudge.resolve_bind("off", mem) is None
    assert await nudge.resolve_bind("127.0.0.1:7100", mem) == ("127.0.0.1", 7100)
    assert await nudge.resolve_bind("[::1]:0", mem) == ("::1", 0)
    assert (await nudge.resolve_bind("localhost:7100", mem) or ("",))[0] in ("127.0.0.1", "::1")
    for bad in ("", "on", "7100", "127.0.0.1:", "127.0.0.1:70000", "0.0.0.0:7100", "::1:7"):
        with pytest.raises(UsageError, match="nudge"):
            await nudge.resolve_bind(bad, mem)
    # A store across the network: the local address of the route to its endpoint.
    from efsish.store.s3 import S3Store

    s3 = S3Store("s3://bucket/p", endpoint="http://127.0.0.1:9")
    try:
        assert s3.endpoint_host() == "127.0.0.1"
        assert await nudge.resolve_bind("auto", FaultyStore(s3)) == ("127.0.0.1", 0)
    finally:
        await s3.aclose()


def test_advertised_addresses_are_numeric() -> None:
    assert nudge.parse_address("192.0.2.1:5") == ("192.0.2.1", 5)
    assert nudge.parse_address(nudge.format_address("::1", 7)) == ("::1", 7)
    for bad in ("host.example:5", "192.0.2.1:0", "192.0.2.1", "[::1]:x"):
        with pytest.raises(ValueError):
            nudge.parse_address(bad)


async def test_fsck_knows_the_key_object() -> None:
    from efsish.meta.superblock import format_fs
    from tests.fs.helpers import fsck

    store = _store()
    await format_fs(store)
    await nudge.load_key(store)
    await store.put("secrets-not/x", b"?")
    code, out = await fsck(store)
    assert code == 0, out
    assert "secrets-not/x" in out and nudge.KEY not in out


async def test_a_probe_is_answered_only_with_the_filesystem_key() -> None:
    # `efsish status` pings each advertised address; a mount answers to where the ping
    # came from, with the same key (a pong carries no authority either).
    b = Endpoint("b")
    async with trio.open_nursery() as nursery:
        await nursery.start(b.n.serve)
        right = await nudge.probe(KEY, FS, [b.heartbeat()], wait=1.0)
        wrong = await nudge.probe(bytes(32), FS, [b.heartbeat()], wait=0.2)
        other_fs = await nudge.probe(KEY, "another-fs", [b.heartbeat()], wait=0.2)
        nursery.cancel_scope.cancel()
    assert right["b"] is not None and right["b"] < 0.5
    assert wrong == {"b": None} and other_fs == {"b": None}
    assert b.n.stats.pongs == 1 and b.n.stats.woken == 0  # a probe wakes nothing


async def test_a_request_to_flush_reaches_the_holder_whatever_its_seq_and_is_answered() -> None:
    # A read-only mount (LEASES.md §6.4, reads) sends `flush:<nonce>` with its own
    # position, usually below the holder's; the holder answers to the datagram's source.
    holder, reader = Endpoint("holder"), Endpoint("reader")
    holder.applied = 50
    asked: list[tuple[Nudge, object]] = []
    answers: list[Nudge] = []
    holder.n._on_flush = lambda n, peer: asked.append((n, peer))
    reader.n._on_flushed = answers.append
    async with trio.open_nursery() as nursery:
        await nursery.start(holder.n.serve)
        await nursery.start(reader.n.serve)
        for _ in range(2 * nudge.RATE):  # no rate limit: the holder coalesces them
            assert reader.n.nudge(holder.heartbeat(), 3, f"{nudge.FLUSH}n1")
        await until(lambda: len(asked) == 2 * nudge.RATE)
        n, peer = asked[0]
        assert n == Nudge(FS, "reader", "holder", 3, f"{nudge.FLUSH}n1")
        assert holder.n.answer(peer, n.sender, 42, f"{nudge.FLUSHED}n1")
        await until(lambda: bool(answers))
        nursery.cancel_scope.cancel()
    assert answers == [Nudge(FS, "holder", "reader", 42, f"{nudge.FLUSHED}n1")]
    assert holder.n.stats.woken == 0 and holder.n.stats.dropped_stale == 0
    assert (holder.n.stats.flush_asks, reader.n.stats.flush_answers) == (2 * nudge.RATE, 1)
