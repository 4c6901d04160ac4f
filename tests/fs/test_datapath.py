"""The data path, in process: the on-disk block cache (survives a restart, serves reads
without the network, bounded, checksummed) and readahead (grows for sequential readers,
nothing extra for random ones). Requests are counted by a FaultyStore wrapper."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from efsish.codec import CRC_CHUNK
from efsish.data.blocks import BlockIO
from efsish.data.cache import BlockCache
from efsish.errors import FsError
from efsish.meta.superblock import Superblock, format_fs
from efsish.meta.view import ROOT_INO, Extent, View
from efsish.store import ObjectStore
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.memory import MemoryStore
from tests.fs.conftest import FsFactory
from tests.fs.helpers import BS, ROOT, mounted, read_file, read_sequentially, write_file


def data_gets(store: FaultyStore) -> list[str]:
    return [k for op, k in store.requests if op == "get" and k.startswith("data/")]


async def test_cache_survives_restart_and_serves_reads_without_network(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    data = os.urandom(5 * BS + 123)
    writer = await make_fs()
    ino = await write_file(writer, ROOT_INO, b"f", data)
    counted = FaultyStore(store)
    cache = tmp_path / "reader-cache"
    async with mounted(counted, sb, cache) as fs:
        assert await read_sequentially(fs, ino) == data
        assert len(data_gets(counted)) == 6  # every block fetched once, and only once
    counted.requests.clear()
    async with mounted(counted, sb, cache) as fs:  # restarted: same cache dir
        assert await read_sequentially(fs, ino) == data
        assert data_gets(counted) == []  # all from the disk cache
        assert fs.cache.hits >= 6


async def test_corrupt_cached_block_is_dropped_and_refetched(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    data = os.urandom(2 * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", data)
    counted = FaultyStore(store)
    cache = tmp_path / "c"
    async with mounted(counted, sb, cache) as fs:
        assert await read_sequentially(fs, ino) == data
    files = sorted((cache / sb.fs_uuid / "blocks").iterdir())
    assert len(files) == 2
    raw = bytearray(files[0].read_bytes())
    raw[100] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    counted.requests.clear()
    async with mounted(counted, sb, cache) as fs:
        assert await read_sequentially(fs, ino) == data  # never the corrupt bytes
        assert len(data_gets(counted)) == 1  # only the damaged block came from the store


async def test_a_block_damaged_on_the_way_is_read_again(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    """A data block that fails its checksum is fetched once more before the read fails:
    damage in transit costs a second GET, damage in the store is EIO."""
    data = os.urandom(2 * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", data)
    damage = {"times": 1}

    class Damaging(FaultyStore):
        async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
            blob = await super().get(key, start, end)
            if key.startswith("data/") and damage["times"] > 0:
                damage["times"] -= 1
                blob = bytes([blob[0] ^ 0xFF]) + blob[1:]
            return blob

    counted = Damaging(store)
    async with mounted(counted, sb, tmp_path / "c1") as fs:
        assert await read_sequentially(fs, ino) == data
        assert len(data_gets(counted)) == 3  # the damaged block twice, the other once
    damage["times"] = 10**6  # now every copy that arrives is damaged
    async with mounted(counted, sb, tmp_path / "c2") as fs:
        fh, _ = await fs.open(ino, os.O_RDONLY)
        with pytest.raises(FsError) as e:
            await fs.read(fh, 0, 1024)
        assert e.value.errno == errno.EIO
        await fs.release(fh)


async def test_cache_stays_within_its_size(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    data = os.urandom(12 * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", data)
    cache = tmp_path / "small"
    async with mounted(store, sb, cache, cache_bytes=3 * BS) as fs:
        assert await read_sequentially(fs, ino) == data
        await fs.cache.drain()
        assert fs.cache.used_bytes <= 3 * BS
    on_disk = list((cache / sb.fs_uuid / "blocks").iterdir())
    assert 1 <= len(on_disk) <= 3
    assert sum(p.stat().st_size for p in on_disk) <= 3 * BS


async def test_cache_fill_is_bounded_and_never_blocks(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", max_bytes=1 << 30, queue_bytes=3 * BS)
    for i in range(5):  # not running yet: the queue fills, then blocks are skipped
        cache.offer(f"data/k{i}", bytes([i]) * BS)
    assert cache.dropped == 2
    async with trio.open_nursery() as n:
        await n.start(cache.run)
        await cache.drain()
        for i in range(3):
            assert await cache.get(f"data/k{i}", None) == bytes([i]) * BS
        assert await cache.get("data/k3", None) is None
        # A block larger than the queue's bound (64 MiB blocks, 8 MiB queue) is taken
        # when the queue is empty; it used to be refused always.
        cache.offer("data/big", b"b" * (4 * BS))
        await cache.drain()
        assert await cache.get("data/big", None) == b"b" * (4 * BS)
        n.cancel_scope.cancel()


async def test_concurrent_readers_of_a_large_block_share_one_get(tmp_path: Path) -> None:
    """Blocks too large for the memory LRU (64 MiB blocks): three readers asking at once
    get the one download's bytes; each used to GET the block again."""
    slow = FaultyStore(MemoryStore("share"), FaultPlan(latency=0.05, ops=frozenset({"get"})))
    io = BlockIO(slow, BlockCache(tmp_path / "c", max_bytes=1 << 30), memory_bytes=BS)
    data = os.urandom(2 * BS)
    key, h, _ = await io.upload(7, data)
    got: list[bytes] = []

    async def read() -> None:
        got.append(await io.fetch(key, h, len(data)))

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(read)
    assert got == [data] * 3
    assert data_gets(slow) == [key]


async def test_a_block_the_cache_does_not_hold_costs_no_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "c"
    BlockCache(root, max_bytes=1 << 30)._put("data/k1", b"x" * 10)  # on disk before start
    cache = BlockCache(root, max_bytes=1 << 30)  # its index is rebuilt from the directory
    hops: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kw: Any) -> Any:
        hops.append(fn)
        return await run_sync(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    assert await cache.get("data/k0", None) is None
    assert hops == [] and cache.misses == 1
    assert await cache.get("data/k1", None) == b"x" * 10  # a hit still reads the disk
    assert len(hops) == 1 and cache.hits == 1


async def test_sequential_read_prefetches_a_growing_window(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    nblocks = 40
    data = os.urandom(nblocks * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", data)
    counted = FaultyStore(store, FaultPlan(latency=0.002, ops=frozenset({"get"})))
    async with mounted(
        counted, sb, tmp_path / "c", readahead_blocks=2, readahead_max_bytes=16 * BS
    ) as fs:
        fh, _ = await fs.open(ino, os.O_RDONLY)
        got = bytearray()
        ahead: list[int] = []
        for _ in range(12):  # read block by block, recording how far the fetches got
            for _ in range(4):
                got += await fs.read(fh, len(got), BS // 4)
            await trio.sleep(0.05)
            ahead.append(len(set(data_gets(counted))) - len(got) // BS)
        await fs.release(fh)
        assert got == data[: len(got)]
    # ahead[i] = blocks fetched beyond the i+1 blocks read. The window starts at 2 blocks,
    # doubles as the reader advances, and never exceeds its limit (16 blocks).
    assert ahead[0] >= 2
    assert max(ahead) >= 8
    assert max(ahead) <= 16
    assert all(a >= 1 for a in ahead)


async def test_random_reads_fetch_only_what_they_need(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    data = os.urandom(30 * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", data)
    counted = FaultyStore(store)
    async with mounted(counted, sb, tmp_path / "c") as fs:
        fh, _ = await fs.open(ino, os.O_RDONLY)
        for blk in (17, 3, 25, 9):
            off = blk * BS + 1000
            assert await fs.read(fh, off, 4096) == data[off : off + 4096]
        await trio.sleep(0.05)
        await fs.release(fh)
    assert len(data_gets(counted)) == 4


async def test_page_cache_kept_until_another_mount_changes_the_file(
    make_fs: FsFactory,
) -> None:
    """keep_cache: a reopen of an unchanged file keeps the kernel's pages; after another
    mount rewrote it the pages go and the kernel's attributes are dropped first
    (close-to-open). What the kernel forgot leaves no trace in either set."""
    a, b = await make_fs(), await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", b"one")
    other = await write_file(a, ROOT_INO, b"g", b"two")
    dropped: list[int] = []

    async def invalidate(i: int) -> None:
        dropped.append(i)

    b.invalidate_attr = invalidate
    b.remember((await b.lookup(ROOT_INO, b"f")).ino)  # as the FUSE adapter does
    keeps = []
    for _ in range(2):
        fh, keep = await b.open(ino, os.O_RDONLY)
        keeps.append(keep)
        await b.release(fh)
    assert keeps == [False, True]
    fh, _ = await a.open(ino, os.O_WRONLY)
    await a.write(fh, 0, b"ONE")
    await a.release(fh)
    await write_file(a, ROOT_INO, b"h", b"x")
    fh2, _ = await a.open(other, os.O_WRONLY)  # a file b's kernel never looked up
    await a.write(fh2, 0, b"TWO")
    await a.release(fh2)
    fh, keep = await b.open(ino, os.O_RDONLY)
    assert (keep, dropped) == (False, [ino])
    assert await b.read(fh, 0, 10) == b"ONE"
    await b.release(fh)
    assert other not in b._remote_changed
    b.forget(ino, 1)
    assert ino not in b._kcache_ok and ino not in b._remote_changed


async def test_small_files_live_in_the_log_without_a_data_object(
    store: ObjectStore, make_fs: FsFactory
) -> None:
    """A file of up to 16 KiB is committed inline with its layout: no data/ PUT, one log
    entry for the data; one byte more and it gets a block."""
    counted = FaultyStore(store)
    fs = await make_fs(on=counted)
    other = await make_fs()
    # At the log head first: on a lease filesystem the other mount's start committed an
    # entry (its incarnation), and losing the race for that position is another PUT.
    await fs.meta.catch_up()
    for name, size in ((b"a", 4096), (b"b", 16 * 1024)):
        await fs.meta.catch_up()  # the other mount's reads may take a share (an entry)
        counted.requests.clear()
        data = os.urandom(size)
        ino = await write_file(fs, ROOT_INO, name, data)
        puts = [k for op, k in counted.requests if op.startswith("put")]
        assert not [k for k in puts if k.startswith("data/")], puts
        assert len([k for k in puts if k.startswith("log/")]) == 2  # the create, the data
        assert await read_file(other, ino) == data  # another mount reads it
    counted.requests.clear()
    await write_file(fs, ROOT_INO, b"c", os.urandom(16 * 1024 + 1))
    assert len([k for op, k in counted.requests if op == "put" and k.startswith("data/")]) == 1


class InFlight(FaultyStore):
    """Counts data PUTs in flight at once (each takes `plan.latency`)."""

    def __init__(self, inner: ObjectStore, latency: float) -> None:
        super().__init__(inner, FaultPlan(latency=latency, ops=frozenset({"put"})))
        self.now = self.peak = 0
        self.done = 0

    async def put(self, key: str, data: bytes) -> None:
        if not key.startswith("data/"):
            return await super().put(key, data)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await super().put(key, data)
        finally:
            self.now -= 1
            self.done += 1


async def test_a_large_write_uploads_blocks_in_parallel_while_it_goes_on(
    store: ObjectStore, make_fs: FsFactory
) -> None:
    """Blocks upload while the writer fills the next ones (nothing waits for close), many
    at once, never more than the limit (16)."""
    slow = InFlight(store, latency=0.2)
    fs = await make_fs(on=slow)
    fh, _ = await fs.create(ROOT_INO, b"big", 0o644, os.O_WRONLY, ROOT)
    data = os.urandom(40 * BS)
    for off in range(0, len(data), BS // 2):
        await fs.write(fh, off, data[off : off + BS // 2])
    assert slow.now >= 8 and slow.done == 0  # uploading already, before any flush
    await fs.flush(fh)
    await fs.release(fh)
    assert 8 <= slow.peak <= 16
    assert await read_file(await make_fs(), (await fs.lookup(ROOT_INO, b"big")).ino) == data


class Ranges(FaultyStore):
    """Records the byte range of every data GET (None, None for a whole block)."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.ranges: list[tuple[str, int | None, int | None]] = []

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if key.startswith("data/"):
            self.ranges.append((key, start, end))
        return await super().get(key, start, end)


async def test_random_reads_get_only_the_chunks_they_need(tmp_path: Path) -> None:
    """With 1 MiB blocks, a 4 KiB read at a random place GETs the one or two 128 KiB
    chunks that hold it (each checked against its own CRC-32C), not the whole block, the
    first two times for each block; a sequential read still fetches whole blocks (for the
    cache and readahead); a damaged chunk fails only the reads that need it."""
    store = MemoryStore("ranged")
    sb = await format_fs(store, block_size=1024 * 1024)
    data = os.urandom(4 * 1024 * 1024)
    async with mounted(store, sb, tmp_path / "w") as w:
        ino = await write_file(w, ROOT_INO, b"f", data)
    counted = Ranges(store)
    async with mounted(counted, sb, tmp_path / "r") as fs:
        fh, _ = await fs.open(ino, os.O_RDONLY)
        for off in (2 * 1024 * 1024 + 1000, 700_000, 3 * 1024 * 1024 + 131_000):
            assert await fs.read(fh, off, 4096) == data[off : off + 4096]
        await fs.release(fh)
        assert len(counted.ranges) == 3
        for key, start, end in counted.ranges:
            assert start is not None and end is not None, key
            assert start % CRC_CHUNK == 0 and end - start <= 2 * CRC_CHUNK
        assert fs.blocks.bytes_down <= 4 * CRC_CHUNK
        # Read at random again and again, a block is fetched whole (and cached) instead.
        fh, _ = await fs.open(ino, os.O_RDONLY)
        for off in (2 * 1024 * 1024 + 500_000, 2 * 1024 * 1024 + 900_000):
            assert await fs.read(fh, off, 4096) == data[off : off + 4096]
        await fs.release(fh)
        assert [s is None for _, s, _ in counted.ranges[3:]] == [False, True]
        counted.ranges.clear()
        fh, _ = await fs.open(ino, os.O_RDONLY)
        step = 128 * 1024
        got = b"".join([bytes(await fs.read(fh, o, step)) for o in range(0, len(data), step)])
        await fs.release(fh)
        assert got == data
        assert counted.ranges and all(s is None for _, s, _ in counted.ranges)
    # Damage chunk 3 of the first block: a read there fails (EIO), one in chunk 1 does not.
    first = (await _extents_of(store, sb, tmp_path / "x", ino))[0]
    assert first.key is not None and first.crcs is not None
    blob = bytearray(await store.get(first.key))
    blob[3 * CRC_CHUNK + 5] ^= 0xFF
    await store.put(first.key, bytes(blob))
    base = first.off - first.koff
    async with mounted(store, sb, tmp_path / "d") as fs:
        fh, _ = await fs.open(ino, os.O_RDONLY)
        off = base + CRC_CHUNK + 10
        assert await fs.read(fh, off, 4096) == data[off : off + 4096]
        with pytest.raises(FsError) as e:
            await fs.read(fh, base + 3 * CRC_CHUNK, 4096)
        assert e.value.errno == errno.EIO
        await fs.release(fh)


async def _extents_of(store: ObjectStore, sb: Superblock, cache: Path, ino: int) -> list[Any]:
    async with mounted(store, sb, cache) as fs:
        return list(await fs.meta.read(View.extents, ino))


async def test_a_view_from_before_chunk_checksums_gains_their_column(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE extents (ino INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT "
        "NULL, key TEXT, koff INTEGER NOT NULL DEFAULT 0, bsize INTEGER NOT NULL DEFAULT 0, "
        "hash TEXT, data BLOB, PRIMARY KEY (ino, off));"
        "INSERT INTO extents VALUES (5, 0, 10, 'data/k', 0, 10, 'k00000000', NULL);"
    )
    old.commit()
    old.close()
    v = View(db)
    try:
        (e,) = v.extents(5)
        assert (e.key, e.len, e.crcs) == ("data/k", 10, None)
        v.begin()
        v._insert_extent(6, Extent(0, 4, "data/j", 0, 4, "k1", crcs="0badf00d"))
        v.commit()
        assert v.extents(6)[0].crcs == "0badf00d"
    finally:
        v.close()


async def test_attribute_changes_ride_with_the_data_commit(
    store: ObjectStore, make_fs: FsFactory
) -> None:
    """tar, cp -p and rsync write a file, then set its times, owner and mode before
    closing it: with writes still unflushed those changes are committed in the same log
    entry as the data, while this mount shows them at once and others see them at close."""
    counted = FaultyStore(store)
    a = await make_fs(on=counted)
    b = await make_fs()
    await a.meta.catch_up()  # past b's start (an entry on a lease filesystem)
    counted.requests.clear()
    fh, attr = await a.create(ROOT_INO, b"f", 0o600, os.O_WRONLY, ROOT)
    await a.write(fh, 0, b"data")
    t = 1_000_000_000 * 10**9
    await a.setattr(attr.ino, ROOT, atime=t, mtime=t + 5)
    await a.setattr(attr.ino, ROOT, uid=1000, gid=1000)
    now = await a.setattr(attr.ino, ROOT, mode=0o4755)
    assert (now.mode & 0o7777, now.uid, now.gid, now.mtime, now.size) == (
        0o4755,
        1000,
        1000,
        t + 5,
        4,
    )
    assert (await a.getattr(attr.ino)).mtime == t + 5
    await a.flush(fh)
    await a.release(fh)
    log_puts = [k for op, k in counted.requests if op == "put_if_absent" and k.startswith("log/")]
    assert len(log_puts) == 2  # the create, then data + attributes together
    await b.meta.catch_up()
    seen = await b.getattr(attr.ino)
    assert (seen.mode & 0o7777, seen.uid, seen.gid, seen.atime, seen.mtime, seen.size) == (
        0o4755,
        1000,
        1000,
        t,
        t + 5,
        4,
    )
    # A write after utimens: the write's time wins, as on a local disk.
    fh, _ = await a.open(attr.ino, os.O_WRONLY)
    await a.write(fh, 0, b"more")
    await a.setattr(attr.ino, ROOT, mtime=t)
    before = time.time_ns()
    await a.write(fh, 4, b"!")
    await a.release(fh)
    await b.meta.catch_up()
    seen = await b.getattr(attr.ino)
    assert seen.mtime >= before and seen.size == 5
    # chown of a setuid file clears set-user-ID, deferred or not.
    fh, _ = await a.open(attr.ino, os.O_WRONLY)
    await a.write(fh, 0, b"x")
    await a.setattr(attr.ino, ROOT, mode=0o4755)
    cleared = await a.setattr(attr.ino, ROOT, uid=0)
    assert cleared.mode & 0o7777 == 0o755
    await a.release(fh)
    await b.meta.catch_up()
    assert (await b.getattr(attr.ino)).mode & 0o7777 == 0o755


async def test_writes_to_a_file_held_open_are_committed_in_the_background(
    make_fs: FsFactory,
) -> None:
    """Like the kernel's dirty-page writeback: a file that stays open (a log, a database)
    has its writes committed, visible to other mounts, within the writeback interval."""
    a = await make_fs(writeback_interval=0.2)
    b = await make_fs()
    fh, attr = await a.create(ROOT_INO, b"log", 0o644, os.O_WRONLY, ROOT)
    await a.write(fh, 0, b"first line\n")
    await a.setattr(attr.ino, ROOT, mode=0o640)  # deferred with the data
    with trio.fail_after(5):
        while True:
            await trio.sleep(0.05)
            await b.meta.catch_up()
            seen = await b.getattr(attr.ino)
            if seen.size == 11:
                break
    assert seen.mode & 0o777 == 0o640
    fh2, _ = await b.open(attr.ino, os.O_RDONLY)
    assert await b.read(fh2, 0, 100) == b"first line\n"
    await b.release(fh2)
    await a.write(fh, 11, b"second\n")  # still open: the next change goes the same way
    with trio.fail_after(5):
        while (await b.getattr(attr.ino)).size != 18:
            await trio.sleep(0.05)
            await b.meta.catch_up()
    await a.release(fh)


async def test_failed_upload_is_retried_by_the_next_flush(
    store: ObjectStore, make_fs: FsFactory
) -> None:
    """A failed block upload makes fsync fail with EIO, loses nothing, and the next fsync
    uploads the block again (it is never committed inline in the log instead)."""
    faulty = FaultyStore(store, FaultPlan(fail_after=0, ops=frozenset({"put"})))
    a = await make_fs(on=faulty)
    data = os.urandom(5 * BS + 10)
    fh, attr = await a.create(ROOT_INO, b"f", 0o644, os.O_WRONLY, ROOT)
    await a.write(fh, 0, data)
    with pytest.raises(FsError) as e:
        await a.fsync(fh)
    assert e.value.errno == errno.EIO
    faulty.plan = FaultPlan()  # the store recovers
    await a.fsync(fh)
    await a.release(fh)
    exts = await a.meta.read(View.extents, attr.ino, 0, len(data))
    assert all(x.key is not None for x in exts if x.len > 16 * 1024)
    b = await make_fs()
    await b.meta.catch_up()
    fh, _ = await b.open(attr.ino, os.O_RDONLY)
    assert await b.read(fh, 0, len(data) + 1) == data
    await b.release(fh)


async def test_a_read_that_waits_for_a_block_while_a_flush_runs_sees_every_write(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    """A read covering a block it must fetch and bytes still in the write buffer: an
    fsync while the read waits for the block takes those bytes out of the buffer and
    commits them. The read must still return them (it used to return the old bytes)."""
    old = os.urandom(2 * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", old)
    slow = FaultyStore(store, FaultPlan(latency=0.1, ops=frozenset({"get"})))
    async with mounted(slow, sb, tmp_path / "cold") as fs:
        fh, _ = await fs.open(ino, os.O_RDWR)
        new = os.urandom(100)
        await fs.write(fh, BS + 10, new)  # dirty, inside the second block
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await fs.read(fh, 0, 2 * BS)))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.03)  # the reader waits for its blocks now
            await fs.fsync(fh)
        assert got[0] == old[: BS + 10] + new + old[BS + 110 :]
        await fs.release(fh)


async def test_a_read_whose_extents_a_commit_overtook_asks_again(
    store: ObjectStore, sb: Superblock, make_fs: FsFactory, tmp_path: Path
) -> None:
    """The read asks the view for the committed extents; an fsync of the same file
    commits while it waits for the answer (held here until the fsync is done), so the
    answer predates the commit and the pending extents it moved into the view are gone
    from the file by then: the read must ask again, not return the old bytes."""
    old = os.urandom(2 * BS)
    ino = await write_file(await make_fs(), ROOT_INO, b"f", old)
    async with mounted(store, sb, tmp_path / "c") as fs:
        fh, _ = await fs.open(ino, os.O_RDWR)
        new = os.urandom(100)
        await fs.write(fh, BS + 10, new)
        extents = fs.reader.extents
        asked, go = trio.Event(), trio.Event()

        async def held(of: Any, off: int, end: int) -> Any:
            answer = await extents(of, off, end)
            if not asked.is_set():
                asked.set()
                await go.wait()
            return answer

        fs.reader.extents = held  # type: ignore[method-assign]
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await fs.read(fh, 0, 2 * BS)))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await asked.wait()
            await fs.fsync(fh)
            go.set()
        assert got[0] == old[: BS + 10] + new + old[BS + 110 :]
        await fs.release(fh)


async def test_truncating_unwritten_bytes_gives_them_back_to_the_write_budget(
    make_fs: FsFactory,
) -> None:
    """ftruncate cuts bytes out of a file's write buffer; they must leave the mount's
    count of unwritten bytes too. They did not: the count only grew, and once it passed
    max_dirty_bytes every writer on the mount waited for ever. Both places that cut a
    buffer: a file that lives in the log, and one another mount unlinked (it lives here)."""
    a, b = await make_fs(), await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", b"x" * 10)
    fh, _ = await a.open(ino, os.O_RDWR)
    await a.write(fh, 0, b"y" * 1000)
    assert a.budget.held == 1000
    await a.setattr(ino, ROOT, size=0, fh=fh)
    assert a.budget.held == 0
    await a.write(fh, 0, b"z" * 500)
    await b.unlink(ROOT_INO, b"f")
    await a.flush(fh)  # finds the file gone: it now lives on A's snapshot
    await a.write(fh, 0, b"w" * 700)
    assert a.budget.held == 700
    await a.setattr(ino, ROOT, size=0, fh=fh)
    assert a.budget.held == 0
    await a.release(fh)
    assert a.budget.held == 0
