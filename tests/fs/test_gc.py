"""Garbage collection and log trimming never delete what a mount may still read, nor
anything that is not the filesystem's own."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict

import pytest

from efsish import codec
from efsish.filesystem import Ctx, Filesystem, Options
from efsish.gc import collect, run_status
from efsish.meta.keys import LOG_PREFIX
from efsish.meta.superblock import SUPERBLOCK_KEY, Superblock
from efsish.meta.view import ROOT_INO, View
from efsish.store import ObjectStore
from efsish.store.memory import MemoryStore
from tests.fs.helpers import fsck, read_file, write_file

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


async def all_keys(store: ObjectStore) -> AsyncIterator[str]:
    async for i in store.list(""):
        yield i.key


async def format_unchecked(store: ObjectStore) -> Superblock:
    """Format as an efsish that did not refuse to nest (it wrote only the superblock)."""
    sb = Superblock(
        fs_uuid=str(uuid.uuid4()),
        block_size=64 * 1024,
        created=time.time_ns(),
        extra={"block_checksum": "crc32c"},
    )
    await store.put_if_absent(SUPERBLOCK_KEY, codec.encode_json(b"S", asdict(sb)))
    return sb


# A user's objects under the filesystem's prefixes, in shapes the old parsers took for
# their own: "1-2-3" split into three dash-separated parts (a block made at time 2).
FOREIGN = {
    "data/1-2-3": b"a user's object",
    "data/notes.txt": b"notes",
    "log/README": b"read me",
    "checkpoints/0000000000000001.bak": b"a copy",
}


@pytest.mark.parametrize(
    "where", ["data/x", "data", "log/x", "checkpoints/x", "clients/x", "user objects"]
)
async def test_gc_deletes_nothing_of_a_filesystem_nested_in_its_prefix(
    where, make_fs, store, tmp_path, nursery
) -> None:
    a = await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", os.urandom(2 * a.block_size))
    await overwrite(a, ino, os.urandom(2 * a.block_size))  # two garbage blocks
    await a.meta.write_checkpoint()
    ours = {k async for k in all_keys(store)}
    if where == "user objects":
        for k, v in FOREIGN.items():
            await store.put(k, v)
    else:  # another filesystem, live, inside this one's prefix
        inner_store = MemoryStore(f"{store.url[len('memory://') :]}/{where}")
        isb = await format_unchecked(inner_store)
        opts = Options(cache_dir=tmp_path / "in1", poll_interval=3600)
        inner = Filesystem(inner_store, isb, opts)
        await inner.start(nursery)
        data = os.urandom(3 * isb.block_size)
        iino = await write_file(inner, ROOT_INO, b"g", data)
        await inner.meta.write_checkpoint()
        await write_file(inner, ROOT_INO, b"h", b"after the checkpoint")
    theirs = {k: await store.get(k) async for k in all_keys(store) if k not in ours}
    assert any("data/" in k for k in theirs)

    r = await collect(store, a.meta, grace=0, orphan_age=0)
    assert r.deleted_blocks == 2 and r.swept_orphans == 0
    for k, v in theirs.items():
        if "/clients/" in k:  # the inner mount's heartbeat: rewritten as it goes
            await store.head(k)
        else:
            assert await store.get(k) == v, k
    # Both filesystems are whole: fresh mounts read their files, fsck finds nothing wrong.
    if where != "user objects":
        opts = Options(cache_dir=tmp_path / "in2", poll_interval=3600)
        fresh = Filesystem(inner_store, isb, opts)
        await fresh.start(nursery)
        assert await read_file(fresh, iino) == data
        code, out = await fsck(inner_store)
        assert code == 0, out
    b = await make_fs()
    assert len(await read_file(b, (await b.lookup(ROOT_INO, b"f")).ino)) == 2 * a.block_size
