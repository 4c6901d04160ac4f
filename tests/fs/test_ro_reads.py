"""Close-to-open for read-only mounts in a domain another mount holds (docs/design/
LEASES.md §6.4, reads) below FUSE: in-process mounts of a format-3 filesystem on one
memory store (the fixtures of test_leases.py), nudges over real UDP on 127.0.0.1. The
read-only mount asks the holder to flush its journal before it reads there, and reads
the log as before when no answer comes in time."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from efsish.errors import FsError
from efsish.meta import nudge, roreads
from efsish.meta.roreads import RoReads
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.faulty import FaultPlan
from tests.fs import test_leases
from tests.fs.test_leases import Make, Mount, mkdir, read_file, write_file

# The fixtures of test_leases.py.
leases, sb, make, store = test_leases.leases, test_leases.sb, test_leases.make, test_leases.store
lease_time = test_leases.lease_time

HOUR = 3600.0


async def holder_with_journal(make: Make) -> tuple[Mount, int]:
    """Mount A holding domain /alice, with a change still in its journal (its commit
    interval is an hour)."""
    a = await make(commit_interval=HOUR)
    alice = await mkdir(a.fs, ROOT_INO, b"alice")
    await write_file(a.fs, alice, b"first", b"acquires the domain")
    await write_file(a.fs, alice, b"f", b"closed on A")
    assert a.fs.leases is not None and alice in a.fs.leases.state.held
    assert a.fs.meta.journal_rows > 0  # f is not in the bucket
    return a, alice


async def read_only(make: Make) -> Mount:
    return await make(read_only=True, poll_interval=HOUR)


def asker(b: Mount) -> RoReads:
    assert b.fs.roreads is not None
    return b.fs.roreads


def writes(m: Mount) -> list[tuple[str, str]]:
    return [r for r in m.store.requests if r[0] in ("put", "put_if_absent", "delete")]


def flush_asks(m: Mount) -> int:
    assert m.fs.leases is not None and m.fs.leases.nudges.nudger is not None
    return m.fs.leases.nudges.nudger.stats.flush_asks


async def test_a_read_only_mount_reads_a_file_closed_on_the_holder_at_once(make: Make) -> None:
    a, alice = await holder_with_journal(make)
    b = await read_only(make)
    puts = a.log_puts()
    t0 = trio.current_time()
    assert await read_file(b.fs, alice, b"f") == b"closed on A"
    assert trio.current_time() - t0 < roreads.ASK_WAIT
    assert a.log_puts() == puts + 1  # one flush of the journal...
    assert a.fs.leases is not None and alice in a.fs.leases.state.held  # ... no release
    assert a.fs.meta.journal_rows == 0
    assert asker(b).requests >= 1 and writes(b) == []
    # A change on A after that answer: the next read asks again and sees it.
    await write_file(a.fs, alice, b"g", b"later")
    assert await read_file(b.fs, alice, b"g") == b"later"


async def test_a_holder_with_an_empty_journal_answers_without_a_put(make: Make) -> None:
    a, alice = await holder_with_journal(make)
    await a.fs.fsyncdir()  # the journal is in the log
    b = await read_only(make)
    puts = a.log_puts()
    assert await read_file(b.fs, alice, b"f") == b"closed on A"
    assert asker(b).requests >= 1 and flush_asks(a) == asker(b).requests
    assert a.log_puts() == puts  # answered at once, from the applied position


async def test_without_answers_the_read_only_mount_reads_the_log_after_the_wait(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, alice = await holder_with_journal(make)
    assert a.fs.leases is not None and a.fs.leases.nudges.nudger is not None
    a.fs.leases.nudges.nudger._on_flush = None  # drops the requests (as a firewall would)
    b = await read_only(make)
    await b.fs.lookup(ROOT_INO, b"alice")  # learns who holds /alice
    caplog.set_level(logging.WARNING, logger="efsish.meta.roreads")
    t0 = trio.current_time()
    with pytest.raises(FsError) as e:
        await b.fs.lookup(alice, b"f")  # the log has no f yet
    took = trio.current_time() - t0
    assert e.value.errno == errno.ENOENT
    assert roreads.ASK_WAIT - 0.05 <= took < roreads.ASK_WAIT + 0.5, took
    # The next reads of that holder do not wait again for a while.
    t0 = trio.current_time()
    with pytest.raises(FsError):
        await b.fs.lookup(alice, b"f")
    assert trio.current_time() - t0 < 0.2
    warned = [r.getMessage() for r in caplog.records if r.name == "efsish.meta.roreads"]
    assert len(warned) == 1 and "firewall" in warned[0], warned
    assert asker(b).requests == 1 and flush_asks(a) == 2  # one request, sent twice
    await a.fs.fsyncdir()  # once in the log, it reads it as before
    assert await read_file(b.fs, alice, b"f") == b"closed on A"


async def test_concurrent_reads_share_one_request_sent_after_they_began(make: Make) -> None:
    a, alice = await holder_with_journal(make)
    b = await read_only(make)
    assert await read_file(b.fs, alice, b"f") == b"closed on A"
    first = asker(b).requests
    # A's flushes now take 0.3 s: the request of read X stays outstanding meanwhile.
    await write_file(a.fs, alice, b"g", b"before X")
    a.store.plan = FaultPlan(latency=0.3, ops=frozenset({"put_if_absent"}))
    seen: dict[str, int] = {}

    async def lookup(key: str, name: bytes) -> None:  # one read barrier each
        seen[key] = (await b.fs.lookup(alice, name)).ino

    async with trio.open_nursery() as n:
        n.start_soon(lookup, "x", b"g")
        await trio.sleep(0.1)  # X's request is out; A flushes what it had then
        assert asker(b).requests == first + 1
        # A change answered after X's request reached A, before the reads Y began: it
        # is not in A's flush for X, and the Ys must see it, so they cannot use X's
        # answer. They wait for it, then share one new request.
        h = await write_file(a.fs, alice, b"h", b"before Y")
        for i in range(8):
            n.start_soon(lookup, f"y{i}", b"h")
    assert seen.keys() == {"x", *(f"y{i}" for i in range(8))}
    assert {seen[f"y{i}"] for i in range(8)} == {h}
    assert asker(b).requests == first + 2
    assert await read_file(b.fs, alice, b"g") == b"before X"
    assert await read_file(b.fs, alice, b"h") == b"before Y"
    assert writes(b) == []


@pytest.mark.parametrize("key", [True, False], ids=["key", "no-key"])
async def test_a_holder_that_takes_no_nudges_is_not_asked_and_named_once(
    make: Make, store: ObjectStore, caplog: pytest.LogCaptureFixture, key: bool
) -> None:
    if key:
        await nudge.load_key(store)  # other mounts take nudges; A does not
    a = await make(commit_interval=HOUR, nudge="off")
    alice = await mkdir(a.fs, ROOT_INO, b"alice")
    await write_file(a.fs, alice, b"first", b"acquires the domain")
    await write_file(a.fs, alice, b"f", b"closed on A")
    b = await read_only(make)
    caplog.set_level(logging.WARNING, logger="efsish.meta.roreads")
    await b.fs.lookup(ROOT_INO, b"alice")
    for _ in range(3):
        t0 = trio.current_time()
        with pytest.raises(FsError):
            await b.fs.lookup(alice, b"f")  # the log has no f: read without waiting
        assert trio.current_time() - t0 < 0.2
    warned = [r.getMessage() for r in caplog.records if r.name == "efsish.meta.roreads"]
    why = "takes no nudges" if key else "no nudge key in the bucket"
    assert len(warned) == 1 and why in warned[0], warned
    assert asker(b).requests == 0
