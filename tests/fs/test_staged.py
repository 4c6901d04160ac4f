"""Staged blocks and `ldirty` (docs/design/LEASES.md §5, §6.3, §9) below FUSE: the data
of files closed under a lease goes to the cache dir and up in the background; flushes,
fsync, a crash and gc respect it. In-process mounts of a format-3 filesystem on a
memory store behind a gate that can hold every data PUT (the fixtures of
test_leases.py)."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
import trio

from efsish.errors import FsError
from efsish.filesystem import Filesystem
from efsish.fsck import run_fsck
from efsish.gc import collect as gc_collect
from efsish.meta import heartbeat
from efsish.meta.ops import LDirty
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.faulty import FaultyStore
from efsish.store.memory import MemoryStore
from tests.fs import test_leases
from tests.fs.test_leases import ROOT, Make, entries, mkdir, read_file, write_file

# The fixtures of test_leases.py (`store` is this module's own, below).
leases, lease_time, sb, make = (
    test_leases.leases,
    test_leases.lease_time,
    test_leases.sb,
    test_leases.make,
)

SIZE = 64 * 1024  # one block (the fixtures format with 64 KiB blocks), not inline


class GatedStore(FaultyStore):
    """A store whose data PUTs wait while the gate is shut (a slow or unreachable
    store for uploads only); counts the data PUTs that completed."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.gate = trio.Event()
        self.gate.set()
        self.data_puts_done = 0

    def shut(self) -> None:
        self.gate = trio.Event()

    async def put(self, key: str, data: bytes) -> None:
        if key.startswith("data/"):
            await self.gate.wait()
        await super().put(key, data)
        if key.startswith("data/"):
            self.data_puts_done += 1


@pytest.fixture
async def store() -> GatedStore:
    return GatedStore(MemoryStore(f"staged-{uuid.uuid4().hex}"))


async def data_keys(store: ObjectStore) -> set[str]:
    return {i.key async for i in store.list("data/")}


def staged_files(fs: Filesystem) -> list[str]:
    assert fs.staged is not None
    return sorted(os.listdir(fs.staged.root))


async def holder(make: Make, **opts: object) -> tuple[Filesystem, int]:
    """A mount that holds the domain of /home (its first file acquired it)."""
    a = (await make(**opts)).fs
    home = await mkdir(a, ROOT_INO, b"home")
    await write_file(a, home, b"first", b"")
    assert a.leases is not None and a.leases.state.held
    return a, home


async def test_closing_a_file_under_a_lease_waits_for_no_data_put(
    make: Make, store: GatedStore
) -> None:
    a, home = await holder(make, commit_interval=3600)
    store.shut()  # no data PUT can complete from here on
    data = os.urandom(SIZE)
    with trio.fail_after(5):
        await write_file(a, home, b"f", data)  # returns: staged, journaled
    assert store.data_puts_done == 0 and not await data_keys(store)
    assert a.meta.journal_rows > 0
    assert len(staged_files(a)) == 1
    # Reads of the staged block come from its file while it is not uploaded.
    a.blocks._mem.clear()
    assert await read_file(a, home, b"f") == data
    # A flush of the journal waits for the upload: nothing in the log names a block
    # that is not in the bucket.
    assert a.leases is not None
    async with trio.open_nursery() as n:
        n.start_soon(a.leases.sync)
        await trio.sleep(0.3)
        assert a.meta.journal_rows > 0
        assert not [e for e in await entries(store) if any(op.wire()["o"] == "w" for op in e.ops)]
        store.gate.set()
    assert a.meta.journal_rows == 0 and await data_keys(store)
    assert staged_files(a) == []  # its batch landed: the staged file is gone


async def test_fsync_waits_for_the_upload_and_the_entry(
    make: Make, store: GatedStore, tmp_path: Path
) -> None:
    a, home = await holder(make, commit_interval=3600)
    store.shut()
    data = os.urandom(SIZE)
    fh, _ = await a.create(home, b"f", 0o644, os.O_WRONLY, ROOT)
    await a.write(fh, 0, data)
    with trio.fail_after(5):
        await a.flush(fh)  # close(2)'s flush: staged, no upload waited for
    assert not await data_keys(store)
    with trio.move_on_after(0.3) as waited:
        await a.fsync(fh)
    assert waited.cancelled_caught  # fsync waits for the upload...
    store.gate.set()
    with trio.fail_after(5):
        await a.fsync(fh)
    await a.release(fh)
    # ...and the entry that names the block is in the log.
    (key,) = await data_keys(store)
    assert a.meta.journal_rows == 0
    logged = [
        e.key
        for en in await entries(store)
        for op in en.ops
        if op.wire()["o"] == "w"
        for e in getattr(op, "extents", ())
    ]
    assert key in logged


async def test_a_write_waits_when_the_staged_bytes_are_over_the_budget(
    make: Make, store: GatedStore
) -> None:
    a, home = await holder(make, commit_interval=3600, max_dirty_bytes=SIZE + SIZE // 2)
    store.shut()
    with trio.fail_after(5):
        await write_file(a, home, b"f1", os.urandom(SIZE))
        await write_file(a, home, b"f2", os.urandom(SIZE))  # room was left before it
    with trio.move_on_after(0.5) as waited:
        await write_file(a, home, b"f3", os.urandom(SIZE))
    assert waited.cancelled_caught
    assert a.budget.held >= 2 * SIZE
    store.gate.set()
    with trio.fail_after(5):
        await write_file(a, home, b"f4", os.urandom(SIZE))
        assert a.leases is not None
        await a.leases.sync()
    assert a.budget.held == 0


async def crash_with_staged_blocks(make: Make, store: GatedStore) -> tuple[int, dict[bytes, bytes]]:
    """A mount on cache dir "keep" writes files whose blocks are staged and never
    uploaded, then dies (kill -9: its tasks are cancelled, its cache dir stays)."""
    m = await make(cache="keep", commit_interval=3600)
    home = await mkdir(m.fs, ROOT_INO, b"home")
    await write_file(m.fs, home, b"first", b"")
    store.shut()
    files = {b"f0": os.urandom(SIZE - 1000), b"f1": os.urandom(SIZE + 1), b"f2": b"2" * SIZE}
    with trio.fail_after(5):
        for name, data in files.items():
            await write_file(m.fs, home, name, data)
    assert m.fs.meta.journal_rows > 0 and not await data_keys(store)
    assert len(staged_files(m.fs)) == 4  # (f1 is two blocks)
    m.scope.cancel()
    await trio.sleep(0.01)
    store.gate.set()
    return home, files


async def test_kill_9_with_staged_blocks_then_remount_keeps_the_bytes(
    make: Make, store: GatedStore
) -> None:
    home, files = await crash_with_staged_blocks(make, store)
    a2 = (await make(cache="keep")).fs  # checks and uploads them, then flushes
    assert a2.meta.journal_rows == 0 and a2.leases is not None and not a2.leases.recovered
    assert staged_files(a2) == []
    b = (await make()).fs
    for name, data in files.items():
        assert await read_file(b, home, name) == data
    assert await run_fsck(store, verify_data=True) == 0


async def test_a_corrupt_staged_block_sends_the_journal_to_recovery(
    make: Make, store: GatedStore, tmp_path: Path
) -> None:
    home, files = await crash_with_staged_blocks(make, store)
    staged = tmp_path / "keep"
    (victim,) = [p for p in staged.rglob("staged/data_*") if p.stat().st_size == SIZE - 1000]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF  # a power cut's torn write
    victim.write_bytes(bytes(raw))
    bad_key = victim.name.replace("data_", "data/", 1)
    a2 = (await make(cache="keep")).fs
    assert a2.leases is not None
    (path,) = a2.leases.recovered
    assert bad_key not in await data_keys(store)  # never bad data in the bucket
    assert list(victim.parent.glob("*.corrupt"))  # kept aside, not deleted
    with pytest.raises(FsError) as e:
        await a2.lookup(home, b"f0")  # nothing of that journal applied to the tree
    assert e.value.errno == errno.ENOENT
    rdir = ROOT_INO
    for part in path.strip("/").split("/"):
        rdir = (await a2.lookup(rdir, part.encode())).ino
    rhome = (await a2.lookup(rdir, b"home")).ino
    assert await read_file(a2, rhome, b"f1") == files[b"f1"]  # its other files whole
    assert bad_key.encode() in await read_file(a2, rdir, b"JOURNAL.txt")
    assert await run_fsck(store, verify_data=True) == 0


async def test_gc_spares_the_blocks_of_a_client_with_a_journal(
    make: Make, store: GatedStore
) -> None:
    m = await make(cache="keep", commit_interval=3600)
    home = await mkdir(m.fs, ROOT_INO, b"home")
    await write_file(m.fs, home, b"first", b"")
    data = os.urandom(SIZE)
    await write_file(m.fs, home, b"f", data)
    assert m.fs.staged is not None
    await m.fs.staged.wait_all()  # uploaded; only the journal names it
    (key,) = await data_keys(store)
    assert m.fs.meta.client_id in key
    assert m.fs.meta.journal_rows > 0
    m.scope.cancel()  # kill -9, and it stays away longer than any orphan age
    await trio.sleep(0.01)
    await heartbeat.delete(store, m.fs.meta.client_id)
    stray = "data/1-" + "0" * 16 + "-1-" + "f" * 16  # an orphan of a clean client
    await store.put(stray, b"x")
    g = (await make()).fs
    await gc_collect(g.store, g.meta, grace=0, orphan_age=0)
    assert await data_keys(store) == {key}  # the sweep ran, and spared the dirty one
    a2 = (await make(cache="keep")).fs
    assert a2.meta.journal_rows == 0
    b = (await make()).fs
    with trio.fail_after(10):
        assert await read_file(b, home, b"f") == data


async def test_a_clean_unmount_clears_the_dirty_mark(make: Make, store: GatedStore) -> None:
    m = await make(commit_interval=3600)
    home = await mkdir(m.fs, ROOT_INO, b"home")
    await write_file(m.fs, home, b"f", os.urandom(SIZE))
    me = m.fs.meta.client_id
    session = await m.fs.meta.read(lambda v: v.session(me))
    assert session is not None and session[2] is not None  # ldirty at its start
    await m.fs.shutdown()
    m.scope.cancel()
    g = (await make()).fs
    await g.meta.catch_up()
    session = await g.meta.read(lambda v: v.session(me))
    assert session is not None and session[2] is None
    held = await g.meta.read(lambda v: v.lease(home))
    assert held[0] is None  # released as well


async def away_for_days(make: Make, store: GatedStore, heartbeat_left: str, **opts: object) -> int:
    """A mount that changed /home/f, published its heartbeat at position p and was then
    killed and stayed away for days: its heartbeat is `heartbeat_left` ("old": written
    three days ago, or "gone"). Returns p."""
    m = await make(cache="keep", **opts)
    home = await mkdir(m.fs, ROOT_INO, b"home")
    await write_file(m.fs, home, b"first", b"")
    await write_file(m.fs, home, b"f", b"answered, not yet in the log")
    await m.fs.write_heartbeat()
    me = m.fs.meta.client_id
    hb = await heartbeat.read(store, me)
    assert hb is not None
    m.scope.cancel()  # kill -9 (a laptop suspended over a weekend)
    await trio.sleep(0.01)
    if heartbeat_left == "gone":
        await heartbeat.delete(store, me)
    else:
        hb.t -= 3 * 86400 * 10**9
        await heartbeat.write(store, hb)
    return hb.applied_seq


async def trim_after_others_moved_on(make: Make, store: GatedStore) -> list[int]:
    """Another mount commits changes, checkpoints, and gc trims: the log positions left."""
    g = (await make()).fs
    for i in range(10):
        await mkdir(g, ROOT_INO, b"d%d" % i)  # the top: one sync entry each
    assert await g.meta.write_checkpoint() > 0
    await mkdir(g, ROOT_INO, b"tail")
    await gc_collect(g.store, g.meta, grace=0)
    return sorted([int(i.key.split("/")[1]) async for i in store.list("log/")])


@pytest.mark.parametrize("heartbeat_left", ["old", "gone"])
async def test_trimming_stops_at_the_position_of_a_client_with_a_journal(
    make: Make, store: GatedStore, heartbeat_left: str
) -> None:
    published = await away_for_days(make, store, heartbeat_left, commit_interval=3600)
    log = await entries(store)
    (dirty_at,) = [i + 1 for i, e in enumerate(log) if any(isinstance(o, LDirty) for o in e.ops)]
    left = await trim_after_others_moved_on(make, store)
    floor = published if heartbeat_left == "old" else dirty_at - 1
    assert left[0] == floor + 1  # trimmed up to the floor, and no further
    a2 = (await make(cache="keep")).fs  # back: catches up from its cache, lands its journal
    assert a2.meta.journal_rows == 0 and a2.leases is not None and not a2.leases.recovered
    b = (await make()).fs
    home = (await b.lookup(ROOT_INO, b"home")).ino
    with trio.fail_after(10):
        assert await read_file(b, home, b"f") == b"answered, not yet in the log"


async def test_trimming_passes_a_client_without_a_journal(make: Make, store: GatedStore) -> None:
    published = await away_for_days(make, store, "old", sync=True)  # journals nothing
    left = await trim_after_others_moved_on(make, store)
    assert left[0] > published + 1


async def test_a_flush_meeting_a_block_staged_after_its_wait_uploads_it_first(
    make: Make, store: GatedStore
) -> None:
    a, home = await holder(make, commit_interval=3600)
    store.shut()
    data = os.urandom(SIZE)
    await write_file(a, home, b"f", data)  # staged after any wait a flush began with
    flushed = trio.Event()

    async def flush() -> None:
        await a.meta._flush_open()  # the flush, past its wait for the uploads
        flushed.set()

    async with trio.open_nursery() as n:
        n.start_soon(flush)
        await trio.sleep(0.2)
        # It waits for the upload without the writer lock: changes go on meanwhile.
        with trio.fail_after(5):
            await write_file(a, home, b"g", b"small")
        assert not flushed.is_set()
        assert not [e for e in await entries(store) if any(op.wire()["o"] == "w" for op in e.ops)]
        store.gate.set()
    assert await data_keys(store)
    b = (await make()).fs
    assert await read_file(b, home, b"f") == data
    assert await read_file(b, home, b"g") == b"small"
