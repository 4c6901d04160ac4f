"""Garbage collection and log trimming never delete what a mount may still read."""

from __future__ import annotations

import io
import os
import time

from efsish import codec
from efsish.filesystem import Ctx, Filesystem
from efsish.gc import collect, run_status
from efsish.meta.log import LOG_PREFIX
from efsish.meta.view import ROOT_INO, View
from tests.fs.test_log import fsck
from tests.fs.test_posix import read_file, write_file

ROOT = Ctx(0, 0)


async def data_keys(store) -> set[str]:
    return {i.key async for i in store.list("data/")}


async def overwrite(fs: Filesystem, ino: int, data: bytes) -> None:
    fh, _ = await fs.open(ino, os.O_RDWR)
    await fs.write(fh, 0, data)
    await fs.release(fh)


async def test_gc_deletes_garbage_after_every_mount_moved_past(make_fs, store) -> None:
    a = await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", os.urandom(4 * a.block_size))
    old = await data_keys(store)
    await overwrite(a, ino, os.urandom(4 * a.block_size))
    assert len(await data_keys(store)) == 8
    assert {k for k, _, _ in await a.meta.read(View.garbage)} == old
    # A lagging live mount (applied position 1) defers everything.
    await store.put(
        "clients/lagging",
        codec.encode_json(b"H", {"client": "lagging", "applied_seq": 1, "t": time.time_ns()}),
    )
    r = await collect(store, a.meta, grace=0)
    assert r.deleted_blocks == 0 and r.deferred == 4
    await store.delete("clients/lagging")
    r = await collect(store, a.meta, grace=0)
    assert r.deleted_blocks == 4
    assert await data_keys(store) == {e.key for e in await a.meta.read(View.extents, ino)}
    assert await a.meta.read(View.garbage) == []
    assert len(await read_file(a, ino)) == 4 * a.block_size
    code, out = await fsck(store)
    assert code == 0 and "unreferenced" not in out, out


async def test_an_unreadable_heartbeat_stops_gc(make_fs, store) -> None:
    """A heartbeat that cannot be read may be a live mount's: gc deletes nothing and says
    what to do, while `status` still shows the rest."""
    import pytest

    from efsish.errors import CorruptObject

    a = await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", os.urandom(2 * a.block_size))
    await overwrite(a, ino, os.urandom(2 * a.block_size))
    before = await data_keys(store)
    await store.put("clients/garbled", b"EFSISH\x01H" + b"\x00" * 40)
    with pytest.raises(CorruptObject, match="delete that object and run gc again"):
        await collect(store, a.meta, grace=0)
    assert await data_keys(store) == before
    out = io.StringIO()
    assert await run_status(store, out) == 0
    await store.delete("clients/garbled")
    assert (await collect(store, a.meta, grace=0)).deleted_blocks == 2


async def test_gc_spares_blocks_of_unlinked_open_files(make_fs, store) -> None:
    a, b = await make_fs(), await make_fs()
    data = os.urandom(3 * a.block_size)
    ino = await write_file(a, ROOT_INO, b"f", data)
    fh, _ = await a.open(ino, os.O_RDONLY)
    await b.unlink(ROOT_INO, b"f")
    await a.meta.catch_up()
    await a.write_heartbeat()
    await b.write_heartbeat()
    r = await collect(store, b.meta, grace=0)
    assert r.deleted_blocks == 0 and r.deferred == 3
    fresh = await make_fs()  # a's blocks must still be in the store: read from a
    assert fresh is not None
    a.cache.root  # noqa: B018 - cache is irrelevant: blocks must exist in the store
    assert await a.read(fh, 0, len(data)) == data
    await a.release(fh)
    await a.write_heartbeat()
    r = await collect(store, b.meta, grace=0)
    assert r.deleted_blocks == 3
    assert await data_keys(store) == set()


async def test_grace_period_and_dry_run(make_fs, store) -> None:
    a = await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", os.urandom(2 * a.block_size))
    await overwrite(a, ino, os.urandom(2 * a.block_size))
    r = await collect(store, a.meta, grace=3600)
    assert r.deleted_blocks == 0 and r.deferred == 2
    r = await collect(store, a.meta, grace=0, dry_run=True)
    assert r.deleted_blocks == 2 and len(await data_keys(store)) == 4


async def test_trim_keeps_what_a_new_mount_needs(make_fs, store) -> None:
    a = await make_fs()
    for i in range(20):
        await write_file(a, ROOT_INO, b"f%d" % i, b"%d" % i)
    ckpt = await a.meta.write_checkpoint()
    await write_file(a, ROOT_INO, b"tail", b"t")
    r = await collect(store, a.meta, grace=0)
    assert r.trimmed_entries == ckpt
    remaining = [i.key async for i in store.list(LOG_PREFIX)]
    assert remaining and all(int(k.split("/")[1]) > ckpt for k in remaining)
    b = await make_fs()
    assert await read_file(b, (await b.lookup(ROOT_INO, b"f3")).ino) == b"3"
    assert await read_file(b, (await b.lookup(ROOT_INO, b"tail")).ino) == b"t"
    out = io.StringIO()
    await run_status(store, out=out)
    assert "newest checkpoint" in out.getvalue() and "live mounts" in out.getvalue()
