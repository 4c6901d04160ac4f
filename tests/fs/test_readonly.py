"""A read-only mount writes nothing to the bucket, so it works with read-only credentials.

The read-only mount's store refuses every write (with a permanent error, as S3 does for
credentials without write permission) and counts it: reads, listings, the background
tasks (polling, checkpoints, gc, heartbeats, access times, the credit ledger) over many
poll intervals, and the unmount must attempt none. Every change fails with EROFS, in the
filesystem facade and in the metadata log below it."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio
import trio.testing

from efsish import metering
from efsish.errors import FsError, PermanentStoreError
from efsish.filesystem import Ctx, Filesystem
from efsish.gc import collect
from efsish.meta import heartbeat
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.faulty import FaultPlan, FaultyStore
from tests.fs.conftest import FsFactory

WRITES = frozenset({"put", "put_if_absent", "delete"})
POLL = 0.5


def refusing_writes(store: ObjectStore) -> FaultyStore:
    """`store`, with every write refused (and counted in `.requests`)."""
    return FaultyStore(store, FaultPlan(ops=WRITES, fail_after=0, error=PermanentStoreError))


def writes(store: FaultyStore) -> list[tuple[str, str]]:
    return [r for r in store.requests if r[0] in WRITES]


async def write_file(fs: Filesystem, parent: int, name: bytes, data: bytes) -> int:
    fh, attr = await fs.create(parent, name, 0o644, os.O_WRONLY, Ctx())
    await fs.write(fh, 0, data)
    await fs.release(fh)
    return attr.ino


async def read_file(fs: Filesystem, ino: int) -> bytes:
    fh, _ = await fs.open(ino, os.O_RDONLY)
    try:
        return bytes(await fs.read(fh, 0, 1 << 30))
    finally:
        await fs.release(fh)


async def expect_erofs(what: str, call: object) -> None:
    with pytest.raises(FsError) as e:
        await call  # type: ignore[misc]
    assert e.value.errno == errno.EROFS, f"{what}: {e.value!r}"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.002)


async def test_a_read_only_mount_writes_nothing_to_the_store(
    clock: trio.testing.MockClock,
    store: ObjectStore,
    make_fs: FsFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metering, "LEDGER_EVERY", 0.0)  # a rw mount saves it every second
    # On a lease filesystem A journals its changes and commits them within
    # commit_interval (on trio's clock here); a read-only mount cannot recall a lease,
    # so it reads what the log has (LEASES.md §16): A's fsync puts them there first.
    a = await make_fs(lease_clock=trio.current_time)
    d = (await a.mkdir(ROOT_INO, b"d", 0o755, Ctx())).ino
    small = await write_file(a, d, b"small", b"hello")
    big_data = os.urandom(300 * 1024)  # several 64 KiB blocks
    big = await write_file(a, d, b"big", big_data)
    await a.symlink(d, b"link", b"big", Ctx())
    await a.setxattr(small, b"user.k", b"v", Ctx())
    await a.fsyncdir()

    ro = refusing_writes(store)
    b = await make_fs(
        on=ro,
        read_only=True,
        poll_interval=POLL,
        heartbeat_interval=POLL,
        gc_interval=0.0,  # a rw mount would run gc on every poll
        gc_grace=0.0,
        checkpoint_every=1,  # ... and checkpoint on every poll
    )
    # Reads of every kind work.
    attr = await b.lookup(ROOT_INO, b"d")
    assert stat.S_ISDIR(attr.mode)
    names = {n for _, n, _ in await b.readdir(d, 0)}
    assert names == {b"small", b"big", b"link"}
    assert await read_file(b, small) == b"hello"
    assert await read_file(b, big) == big_data
    assert await b.readlink((await b.lookup(d, b"link")).ino) == b"big"
    assert await b.getxattr(small, b"user.k") == b"v"
    assert await b.listxattr(small, Ctx()) == [b"user.k"]
    assert (await b.statfs())["namemax"] == 255

    # Every change is refused with EROFS.
    ctx = Ctx()
    await expect_erofs("mkdir", b.mkdir(d, b"new", 0o755, ctx))
    await expect_erofs("create", b.create(d, b"new", 0o644, os.O_WRONLY, ctx))
    await expect_erofs("symlink", b.symlink(d, b"new", b"x", ctx))
    await expect_erofs("link", b.link(small, d, b"new"))
    await expect_erofs("unlink", b.unlink(d, b"small"))
    await expect_erofs("rmdir", b.rmdir(ROOT_INO, b"d"))
    await expect_erofs("rename", b.rename(d, b"small", d, b"other"))
    await expect_erofs("chmod", b.setattr(small, ctx, mode=0o600))
    await expect_erofs("truncate", b.setattr(big, ctx, size=0))
    await expect_erofs("utimens", b.setattr(small, ctx, atime=1, mtime=1))
    await expect_erofs("setxattr", b.setxattr(small, b"user.k", b"w", Ctx()))
    await expect_erofs("removexattr", b.removexattr(small, b"user.k", Ctx()))
    await expect_erofs("open for writing", b.open(small, os.O_WRONLY))
    await expect_erofs("open for reading and writing", b.open(small, os.O_RDWR))
    await expect_erofs("open with O_TRUNC", b.open(small, os.O_RDONLY | os.O_TRUNC))
    # ... and below the facade: the log commits nothing, writes no checkpoint, no gc.
    await expect_erofs("log commit", b.meta.submit(lambda view, pc: ([], None)))
    await expect_erofs("checkpoint", b.meta.write_checkpoint())
    await expect_erofs("gc", collect(ro, b.meta, grace=0.0))

    # Many poll intervals of the background tasks (simulated time), while the other
    # mount changes things: the read-only mount follows the log.
    await trio.sleep(20 * POLL)
    await write_file(a, d, b"later", b"from a")
    await trio.sleep(20 * POLL)
    assert await read_file(b, (await b.lookup(d, b"later")).ino) == b"from a"
    fh, _ = await b.open(small, os.O_RDONLY)  # access times are not committed either
    await b.read(fh, 0, 10)
    await b.release(fh)
    await trio.sleep(20 * POLL)
    assert b.meta.applied_seq == a.meta.applied_seq

    # The unmount: flush, access times, the credit ledger, the heartbeat's removal.
    await b.shutdown()
    assert writes(ro) == []
    assert ro.calls["get"] > 0 and ro.calls["list"] > 0  # it did talk to the store
    # It published no heartbeat: gc and status do not count it (docs/ARCHITECTURE.md).
    assert b.meta.client_id not in {c.client for c in await heartbeat.read_all(store)}


async def test_a_read_only_mount_reads_again_after_gc_deleted_a_block_it_lagged_on(
    store: ObjectStore, make_fs: FsFactory
) -> None:
    """gc does not wait for a read-only mount (it publishes no heartbeat). A read whose
    view is behind (here: no polling) and names a block gc has deleted catches up and
    reads the file's current layout, instead of failing."""
    a = await make_fs()
    old, new = os.urandom(200 * 1024), os.urandom(150 * 1024)
    ino = await write_file(a, ROOT_INO, b"f", old)
    b = await make_fs(on=refusing_writes(store), read_only=True)  # polls once an hour
    fh, _ = await b.open(ino, os.O_RDONLY)
    fa, _ = await a.open(ino, os.O_WRONLY | os.O_TRUNC)  # the old blocks become garbage
    await a.write(fa, 0, new)
    await a.release(fa)
    r = await collect(store, a.meta, grace=0.0)
    assert r.deleted_blocks > 0  # b's view still names these blocks
    assert bytes(await b.read(fh, 0, 1 << 20)) == new
    await b.release(fh)
