"""The journal flush and catch-ups below FUSE (docs/design/LEASES.md §6.3): while a
flush's PUT, or a catch-up's GET of the next position, is on the way, the mount goes on
answering local changes; a flushed entry is recorded once, by the flush or by a
catch-up that meets it first; a takeover that lands first fails the flush and the
journal goes to the recovery directory. In-process mounts of a format-3 filesystem on
one memory store (the fixtures of test_leases.py)."""

from __future__ import annotations

import os

import pytest
import trio

from efsish.errors import FsError
from efsish.meta import journal
from efsish.meta.keys import LOG_PREFIX, seq_of
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.faulty import FaultyStore
from tests.fs import test_leases
from tests.fs.test_leases import Make, Mount, entries, mkdir, read_file, write_file

leases, sb, make, store = test_leases.leases, test_leases.sb, test_leases.make, test_leases.store
lease_time = test_leases.lease_time


class GatedLog(FaultyStore):
    """Holds every log PUT at the gate: before it reaches the store (`land_first`
    False) or after it landed, its answer held back (True)."""

    def __init__(self, inner: ObjectStore, land_first: bool) -> None:
        super().__init__(inner)
        self.land_first = land_first
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def put_if_absent(self, key: str, data: bytes) -> None:
        if not key.startswith(LOG_PREFIX):
            return await super().put_if_absent(key, data)
        if self.land_first:
            await super().put_if_absent(key, data)
        self.waiting.set()
        await self.gate.wait()
        if not self.land_first:
            await super().put_if_absent(key, data)


async def journaled(make: Make, **opts: object) -> tuple[Mount, int]:
    """Mount A holding /home, with one change journaled and not in the log."""
    a = await make(commit_interval=3600, **opts)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"")  # acquires home (a sync entry)
    await write_file(a.fs, home, b"f1", b"one")
    assert a.fs.meta.journal_rows > 0
    return a, home


def gate(a: Mount, land_first: bool) -> GatedLog:
    gated = GatedLog(a.store, land_first)
    a.fs.meta.store = gated
    return gated


async def names_in_log(store: ObjectStore, name: bytes) -> int:
    return sum(
        1 for e in await entries(store) for op in e.ops if op.wire().get("name") == name.decode()
    )


async def test_local_changes_are_answered_while_a_flush_is_put(
    make: Make, store: ObjectStore
) -> None:
    a, home = await journaled(make)
    assert a.fs.leases is not None
    gated = gate(a, land_first=False)
    flushed = trio.Event()

    async def sync() -> None:
        assert a.fs.leases is not None
        await a.fs.leases.sync()
        flushed.set()

    async with trio.open_nursery() as n:
        n.start_soon(sync)
        await gated.waiting.wait()
        # The flush's PUT is on the way (a round trip to a distant store): a change in
        # the held domain does not wait for it.
        with trio.fail_after(5):
            await write_file(a.fs, home, b"f2", b"two")
            await mkdir(a.fs, home, b"d")
        assert not flushed.is_set()
        gated.gate.set()
    # The flushed entry carries f1; f2 and d stay journaled for the next flush.
    assert await names_in_log(store, b"f1") == 1
    assert await names_in_log(store, b"f2") == 0
    assert a.fs.meta.journal_rows > 0
    await a.fs.leases.sync()
    assert a.fs.meta.journal_rows == 0
    assert await names_in_log(store, b"f2") == 1
    b = await make()
    assert await read_file(b.fs, home, b"f1") == b"one"
    assert await read_file(b.fs, home, b"f2") == b"two"
    assert (await b.fs.lookup(home, b"d")).ino > 0


async def test_a_catch_up_that_meets_the_flushed_entry_records_it_once(
    make: Make, store: ObjectStore
) -> None:
    a, home = await journaled(make)
    assert a.fs.leases is not None
    gated = gate(a, land_first=True)
    before = a.fs.meta.applied_seq

    async with trio.open_nursery() as n:
        n.start_soon(a.fs.leases.sync)
        await gated.waiting.wait()
        with trio.fail_after(5):
            await write_file(a.fs, home, b"f2", b"two")  # journaled during the PUT
            # The entry is in the log, its answer not back yet: a catch-up meets it
            # and records it as ours (its rows dropped, not applied a second time).
            await a.fs.meta.catch_up()
        assert a.fs.meta.applied_seq == before + 1
        gated.gate.set()
    assert a.fs.meta.applied_seq == before + 1
    assert a.fs.meta.journal_rows > 0  # f2's rows
    await a.fs.leases.sync()
    assert a.fs.meta.journal_rows == 0
    assert await names_in_log(store, b"f1") == 1
    assert await names_in_log(store, b"f2") == 1
    b = await make()
    assert await read_file(b.fs, home, b"f1") == b"one"
    assert await read_file(b.fs, home, b"f2") == b"two"


async def test_a_takeover_landing_before_the_flush_fails_it_and_recovers(
    make: Make, store: ObjectStore
) -> None:
    a, home = await journaled(make)
    b = await make()
    assert a.fs.leases is not None and b.fs.leases is not None
    gated = gate(a, land_first=False)
    failed: list[BaseException] = []

    async def sync() -> None:
        assert a.fs.leases is not None
        try:
            await a.fs.leases.sync()
        except FsError as e:
            failed.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(sync)
        await gated.waiting.wait()
        # A cannot answer B's recall while its flush is held (one flush at a time):
        # B waits out the takeover time and takes /home over.
        with trio.fail_after(10):
            await write_file(b.fs, home, b"theirs", b"b")
        assert b.fs.leases.takeovers == 1
        gated.gate.set()
    # A's PUT lost the position to the takeover: its catch-up meets it, fenced, and
    # the fsync that asked for the flush fails.
    assert len(failed) == 1
    with trio.fail_after(10):
        while not a.fs.leases.recovered:  # noqa: ASYNC110 (set by a background task)
            await trio.sleep(0.05)
    with pytest.raises(FsError):  # never applied to the tree
        await b.fs.lookup(home, b"f1")
    (path,) = a.fs.leases.recovered
    rdir = ROOT_INO
    for part in path.strip("/").split("/"):
        rdir = (await b.fs.lookup(rdir, part.encode())).ino
    assert await read_file(b.fs, (await b.fs.lookup(rdir, b"home")).ino, b"f1") == b"one"


class GatedGets(FaultyStore):
    """Holds GETs of log positions from `hold_from` on at the gate."""

    def __init__(self, inner: ObjectStore, hold_from: int) -> None:
        super().__init__(inner)
        self.hold_from = hold_from
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if key.startswith(LOG_PREFIX) and seq_of(key) >= self.hold_from:
            self.waiting.set()
            await self.gate.wait()
        return await super().get(key, start, end)


async def test_local_changes_are_answered_while_a_catch_up_reads_the_next_position(
    make: Make,
) -> None:
    a, home = await journaled(make, poll_interval=3600)
    b = await make()
    other = await mkdir(b.fs, ROOT_INO, b"other")
    await write_file(b.fs, other, b"g", b"")
    assert b.fs.leases is not None
    await b.fs.leases.sync()  # entries A has not applied (it does not poll)
    head = b.fs.meta.applied_seq
    assert a.fs.meta.applied_seq < head
    gated = GatedGets(a.store, hold_from=head + 1)
    a.fs.meta.store = gated
    async with trio.open_nursery() as n:
        n.start_soon(a.fs.meta.catch_up)
        await gated.waiting.wait()
        # The catch-up GETs the position after B's last entry (with it): still on the way.
        assert a.fs.meta.applied_seq < head
        with trio.fail_after(5):
            await write_file(a.fs, home, b"f2", b"two")
        gated.gate.set()
    assert a.fs.meta.applied_seq == head
    assert a.fs.leases is not None
    await a.fs.leases.sync()
    c = await make()
    assert await read_file(c.fs, home, b"f2") == b"two"


async def test_concurrent_catch_ups_apply_each_entry_once(make: Make) -> None:
    a, _ = await journaled(make, poll_interval=3600)
    b = await make()
    other = await mkdir(b.fs, ROOT_INO, b"other")
    assert b.fs.leases is not None
    await b.fs.leases.sync()
    start = a.fs.meta.applied_seq
    for i in range(4):  # one entry each
        await write_file(b.fs, other, b"g%d" % i, b"")
        await b.fs.leases.sync()
    head = b.fs.meta.applied_seq
    assert head - start >= 4
    gated = GatedGets(a.store, hold_from=start + 2)
    a.fs.meta.store = gated
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(a.fs.meta.catch_up)
        await gated.waiting.wait()
        await trio.sleep(0.05)  # every catch-up reaches the gate
        gated.gate.set()
    assert a.fs.meta.applied_seq == head
    for i in range(4):
        assert (await a.fs.lookup(other, b"g%d" % i)).ino > 0
    c = await make()
    for i in range(4):
        assert (await c.fs.lookup(other, b"g%d" % i)).ino == (
            await a.fs.lookup(other, b"g%d" % i)
        ).ino


async def test_a_flush_takes_the_rows_answered_before_it_one_entry_at_a_time(
    make: Make, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "MAX_ENTRY", 24 * 1024)  # a few inline files per entry
    a, home = await journaled(make)
    assert a.fs.leases is not None
    for i in range(12):
        await write_file(a.fs, home, b"g%d" % i, os.urandom(4096))
    gated = gate(a, land_first=False)

    async with trio.open_nursery() as n:
        n.start_soon(a.fs.leases.sync)
        await gated.waiting.wait()
        # Answered while the flush's first entry is on the way: not part of it.
        await write_file(a.fs, home, b"late", b"after the fsync began")
        gated.gate.set()
    log = await entries(store)
    flushed = [e for e in log if e.journaled]
    assert len(flushed) >= 3  # one entry's worth of rows at a time
    assert all(len(journal.encode(e)) <= 24 * 1024 for e in flushed)
    assert await names_in_log(store, b"g11") == 1
    assert await names_in_log(store, b"late") == 0  # waits for the next flush
    assert a.fs.meta.journal_rows > 0
    await a.fs.leases.sync()
    assert await names_in_log(store, b"late") == 1
    b = await make()
    assert await read_file(b.fs, home, b"late") == b"after the fsync began"
