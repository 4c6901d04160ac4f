"""The metadata log between several in-process mounts: conflicts, group commit,
checkpoints, corrupt or missing objects, and store faults."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat

import pytest
import trio

from efsish import codec
from efsish.errors import FsError
from efsish.filesystem import Ctx, Filesystem
from efsish.housekeeping import Housekeeping
from efsish.meta.keys import CKPT_PREFIX, LOG_PREFIX, log_key
from efsish.meta.ops import Extent, Mk, Op, Write
from efsish.meta.planning import PlanContext
from efsish.meta.superblock import AlreadyFormatted, NotFormatted, format_fs, load_superblock
from efsish.meta.view import ROOT_INO, View
from efsish.store import ObjectStore
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.memory import MemoryStore
from tests.fs.helpers import ROOT, fsck, read_file, write_file


def _plan_create_x(view: View, ctx: PlanContext) -> tuple[list[Op], int]:
    """A planner that creates the regular file "x" in the root (for MetaLog alone)."""
    ino = ctx.alloc_ino(view)
    return [Mk(ino, ROOT_INO, b"x", stat.S_IFREG | 0o644, 0, 0, 1)], ino


async def test_same_name_on_two_mounts_exactly_one_wins(make_fs, store) -> None:
    a: Filesystem = await make_fs()
    b: Filesystem = await make_fs()
    results: dict[str, object] = {}

    async def create(name: str, fs: Filesystem) -> None:
        try:
            results[name] = await fs.mknod(ROOT_INO, b"same", stat.S_IFREG | 0o644, ROOT)
        except FsError as e:
            results[name] = e.errno

    async with trio.open_nursery() as n:
        n.start_soon(create, "a", a)
        n.start_soon(create, "b", b)
    errs = [v for v in results.values() if isinstance(v, int)]
    assert errs == [errno.EEXIST], results
    assert (await fsck(store))[0] == 0


async def test_concurrent_creates_from_three_mounts(make_fs, store) -> None:
    mounts = [await make_fs() for _ in range(3)]

    async def create(i: int, j: int, fs: Filesystem) -> None:
        await fs.mknod(ROOT_INO, f"m{i}-{j}".encode(), stat.S_IFREG | 0o644, ROOT)

    async with trio.open_nursery() as n:
        for j in range(40):
            for i, fs in enumerate(mounts):
                n.start_soon(create, i, j, fs)
    for fs in mounts:
        await fs.meta.catch_up()
        names = {name for _, name, _ in await fs.readdir(ROOT_INO, 0, 1000)}
        assert len(names) == 120
    # Group commit: 120 creates need fewer log entries than operations per mount.
    assert sum(fs.meta.entries_written for fs in mounts) < 120
    code, out = await fsck(store)
    assert code == 0, out


async def test_inode_numbers_unique_across_mounts(make_fs) -> None:
    a, b = await make_fs(), await make_fs()
    inos = set()
    for i in range(20):
        inos.add((await a.mknod(ROOT_INO, b"a%d" % i, stat.S_IFREG | 0o644, ROOT)).ino)
        inos.add((await b.mknod(ROOT_INO, b"b%d" % i, stat.S_IFREG | 0o644, ROOT)).ino)
    assert len(inos) == 40


async def test_close_to_open_between_mounts(make_fs) -> None:
    a, b = await make_fs(), await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", b"v1" * 50_000)
    assert await read_file(b, (await b.lookup(ROOT_INO, b"f")).ino) == b"v1" * 50_000
    fh, _ = await a.open(ino, os.O_RDWR)
    await a.write(fh, 0, b"v2" * 60_000)
    await a.release(fh)  # close: flush + commit
    assert await read_file(b, ino) == b"v2" * 60_000


@pytest.mark.parametrize("leases", [True, False])
async def test_a_layout_remembered_here_follows_changes_on_another_mount(make_fs) -> None:
    """The memo keeps small files' layouts (a read after an open costs no hop): another
    mount's truncate, rewrite or rename-over is what the next open here reads."""
    a, b = await make_fs(poll_interval=0.05), await make_fs(poll_interval=0.05)
    d = (await a.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    ino = await write_file(a, d, b"f", b"abcdef")
    hits = a.meta.memo_hits
    assert await read_file(a, ino) == b"abcdef"
    assert a.meta.memo_hits > hits  # the layout came from memory

    async def on_a() -> bytes:
        return await read_file(a, (await a.lookup(d, b"f")).ino)

    fb = (await b.lookup(d, b"f")).ino
    await b.setattr(fb, ROOT, size=2)  # truncate, then the same size again
    fh, _ = await b.open(fb, os.O_WRONLY)
    await b.write(fh, 4, b"XY")
    await b.release(fh)
    assert await on_a() == b"ab\0\0XY"
    fh, _ = await b.open(fb, os.O_WRONLY)
    await b.write(fh, 0, b"ABCDEF")  # a rewrite in place
    await b.release(fh)
    assert await on_a() == b"ABCDEF"
    await write_file(b, d, b"g", b"ghijkl")
    await b.rename(d, b"g", d, b"f")  # renamed over
    assert await on_a() == b"ghijkl"


async def test_new_mount_starts_from_checkpoint(make_fs, store) -> None:
    a = await make_fs()
    for i in range(30):
        await write_file(a, ROOT_INO, b"f%d" % i, b"x%d" % i)
    seq = await a.meta.write_checkpoint()
    # Trim the log below the checkpoint: a new mount must not need it.
    for s in range(1, seq + 1):
        await store.delete(log_key(s))
    await write_file(a, ROOT_INO, b"after", b"tail")
    b = await make_fs()
    assert b.meta.last_checkpoint == seq
    assert await read_file(b, (await b.lookup(ROOT_INO, b"f7")).ino) == b"x7"
    assert await read_file(b, (await b.lookup(ROOT_INO, b"after")).ino) == b"tail"
    code, out = await fsck(store)
    assert code == 0, out


async def test_corrupt_log_entry_is_a_clear_error(make_fs, store) -> None:
    a = await make_fs()
    await write_file(a, ROOT_INO, b"ok", b"fine")
    seq = a.meta.applied_seq + 1
    await store.put(log_key(seq), b"EFSISH\x01L" + b"\0" * 10)  # truncated entry
    with pytest.raises(FsError) as e:
        await a.mknod(ROOT_INO, b"new", stat.S_IFREG | 0o644, ROOT)
    assert e.value.errno == errno.EIO
    assert a.meta.broken is not None and "truncated" in a.meta.broken
    # What was committed before is still readable.
    assert await read_file(a, (await a.lookup(ROOT_INO, b"ok")).ino) == b"fine"
    code, out = await fsck(store)
    assert code == 1 and "cannot be replayed" in out


async def test_missing_and_corrupt_blocks_give_eio(make_fs, store) -> None:
    a = await make_fs()
    data = os.urandom(3 * a.block_size)
    ino = await write_file(a, ROOT_INO, b"f", data)
    keys = [i.key async for i in store.list("data/")]
    assert len(keys) == 3
    await store.delete(keys[0])
    await store.put(keys[1], os.urandom(a.block_size))  # same size, wrong content
    code, out = await fsck(store)
    assert code == 1 and "missing" in out
    b = await make_fs()  # fresh cache: must go to the store
    fh, _ = await b.open(ino, os.O_RDONLY)
    for off in (keys_off := [0, a.block_size, 2 * a.block_size]):
        extents = await b.meta.read(lambda v: v.extents(ino))
        block_key_at = next(e.key for e in extents if e.off == off)
        if block_key_at in keys[:2]:
            with pytest.raises(FsError) as e:
                await b.read(fh, off, 100)
            assert e.value.errno == errno.EIO
        else:
            assert await b.read(fh, off, 100) == data[off : off + 100]
    assert len(keys_off) == 3
    await b.release(fh)


async def test_store_faults_become_eio_not_hangs(sb, store, make_fs) -> None:
    faulty = FaultyStore(store)
    a = await make_fs(on=faulty)  # (on a lease filesystem its start commits an entry)
    faulty.plan = FaultPlan(fail_after=0, ops=frozenset({"put_if_absent"}))
    with trio.fail_after(30):
        with pytest.raises(FsError) as e:
            await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)
    assert e.value.errno == errno.EIO
    faulty.plan = FaultPlan()  # the store recovers: so does the mount
    await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)


async def test_a_commit_whose_answers_were_lost_costs_no_inode_numbers(sb, store, make_fs) -> None:
    """Every PUT of one log entry reaches the store but no answer comes back: the caller
    gets EIO, yet the entry may be in the log (here it is), holding the inode number it
    took. That number must never be handed out again: the mount's next creates used to
    reuse it and fail (UNIQUE constraint) until it was remounted."""
    faulty = FaultyStore(store)
    a = await make_fs(on=faulty)
    await a.mknod(ROOT_INO, b"first", stat.S_IFREG | 0o644, ROOT)
    faulty.plan = FaultPlan(fail_after=0, lost_answer=True, ops=frozenset({"put_if_absent"}))
    with trio.fail_after(60):
        with pytest.raises(FsError) as e:
            await a.mknod(ROOT_INO, b"lost", stat.S_IFREG | 0o644, ROOT)
    assert e.value.errno == errno.EIO
    faulty.plan = FaultPlan()  # the store recovers
    made = [await a.mknod(ROOT_INO, n, stat.S_IFREG | 0o644, ROOT) for n in (b"y", b"z")]
    b = await make_fs()
    names = (b"first", b"lost", b"y", b"z")
    for fs in (a, b):
        inos = [(await fs.lookup(ROOT_INO, n)).ino for n in names]
        assert len(set(inos)) == 4  # "lost" did happen: the answer was lost, not the change
        assert inos[2:] == [m.ino for m in made]
    assert (await fsck(store))[0] == 0


async def test_foreign_and_unformatted_prefixes() -> None:
    empty = MemoryStore("foreign-empty")
    with pytest.raises(NotFormatted, match="efsish format"):
        await load_superblock(empty)
    foreign = MemoryStore("foreign-junk")
    await foreign.put("superblock", b"{not efsish}")
    with pytest.raises(NotFormatted, match="not an efsish superblock"):
        await load_superblock(foreign)
    other = MemoryStore("foreign-other")
    await other.put("photos/cat.jpg", b"...")
    with pytest.raises(AlreadyFormatted, match="not empty"):
        await format_fs(other)
    ok = MemoryStore("foreign-ok")
    await format_fs(ok)
    with pytest.raises(AlreadyFormatted, match="already holds"):
        await format_fs(ok)


async def test_log_entries_are_checksummed() -> None:
    blob = codec.encode_json(b"L", {"ops": []})
    bad = blob[:-3] + bytes(3)
    with pytest.raises(Exception, match=r"corrupt|damaged"):
        codec.decode_json(b"L", bad)
    assert LOG_PREFIX == "log/" and CKPT_PREFIX == "checkpoints/"


async def test_two_busy_mounts_share_the_log_fairly(store: ObjectStore, make_fs) -> None:
    """Two mounts creating files as fast as they can, each with 4 creators: neither may
    starve. (Before the winner paused for a starving loser, one mount made thousands of
    creates while the other made none at all in 6 s.)"""
    counts = [0, 0]
    fss = []
    for i in range(2):
        slow = FaultyStore(
            store,
            FaultPlan(
                latency=0.002, jitter=0.001, ops=frozenset({"put_if_absent", "get", "head"}), seed=i
            ),
        )
        fss.append(await make_fs(on=slow, poll_interval=0.5, heartbeat_interval=0.2))
    dirs = [(await fs.mkdir(ROOT_INO, b"d%d" % i, 0o755, Ctx())).ino for i, fs in enumerate(fss)]

    async def creator(i: int, t: int) -> None:
        k = 0
        while True:
            await fss[i].mknod(dirs[i], b"f%d-%d" % (t, k), stat.S_IFREG | 0o644, Ctx())
            k += 1
            counts[i] += 1

    with trio.move_on_after(5):
        async with trio.open_nursery() as n:
            for i in range(2):
                for t in range(4):
                    n.start_soon(creator, i, t)
    assert min(counts) >= 0.25 * sum(counts), counts


async def test_remembered_lookups_follow_every_change(make_fs) -> None:
    """Lookups and getattrs answered from memory equal what the view holds after every
    kind of change, made on this mount or on another one (seeded random sequence)."""
    # Polling often: on a lease filesystem a holder sees a recall at its next poll.
    a, b = await make_fs(poll_interval=0.05), await make_fs(poll_interval=0.05)
    d = (await a.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    names = [b"n%d" % i for i in range(6)]
    rnd = random.Random(7)
    hits_before = b.meta.memo_hits

    burst: list[bytes] = []

    async def check(fs: Filesystem) -> None:
        for name in names + burst:
            try:
                got = await fs.lookup(d, name)
            except FsError as e:
                assert e.errno == errno.ENOENT
                got = None
            truth_ino = await fs.meta.read(View.lookup, d, name)
            assert (got.ino if got else None) == truth_ino, name
            if got is not None:
                for xname in (b"user.k", b"security.capability"):
                    truth_x = await fs.meta.read(View.getxattr, got.ino, xname)
                    try:
                        x: bytes | None = await fs.getxattr(got.ino, xname)
                    except FsError as e:
                        assert e.errno == errno.ENODATA
                        x = None
                    assert x == truth_x, (name, xname)
                truth = await fs.meta.read(View.getattr, got.ino)
                again = await fs.getattr(got.ino)
                for f in ("mode", "uid", "gid", "nlink", "size", "mtime", "ctime"):
                    assert getattr(got, f) == getattr(truth, f), (name, f)
                    assert getattr(again, f) == getattr(truth, f), (name, f)

    for _ in range(120):
        fs = rnd.choice([a, b])
        other = b if fs is a else a
        name, name2 = rnd.choice(names), rnd.choice(names)
        await check(other)  # the other mount remembers the old state
        kind = rnd.choice(
            ["create", "write", "chmod", "rename", "unlink", "link", "xattr", "burst"]
        )
        try:
            attr = await fs.lookup(d, name)
        except FsError:
            attr = None
        try:
            if kind == "create" or attr is None:
                await write_file(fs, d, name, b"x" * rnd.randrange(0, 20_000))
            elif kind == "write":
                fh, _ = await fs.open(attr.ino, os.O_WRONLY)
                await fs.write(fh, rnd.randrange(0, 5000), b"y" * rnd.randrange(1, 9000))
                await fs.release(fh)
            elif kind == "chmod":
                await fs.setattr(attr.ino, ROOT, mode=rnd.choice([0o600, 0o644, 0o755]))
            elif kind == "rename":
                await fs.rename(d, name, d, name2)
            elif kind == "unlink":
                await fs.unlink(d, name)
            elif kind == "link":
                await fs.link(attr.ino, d, name2)
            elif kind == "xattr":
                await fs.setxattr(attr.ino, b"user.k", rnd.choice([b"v", b"w"]), ROOT)
            else:
                # Many changes at once: batched into entries too big to be re-read after
                # the commit, so the memo must forget (the directory included).
                async def one(fs: Filesystem, n: bytes, remove: bool) -> None:
                    with contextlib.suppress(FsError):
                        a = await fs.mknod(d, n, stat.S_IFREG | 0o644, ROOT)
                        if remove:
                            await fs.unlink(d, n)
                        else:
                            await fs.setxattr(a.ino, b"user.k", b"new", ROOT)

                new = [b"b%d" % rnd.randrange(10_000) for _ in range(70)]
                burst[:] = new[:4]  # checked from now on, with `names`
                async with trio.open_nursery() as nursery:
                    for n in names + new:
                        nursery.start_soon(one, fs, n, rnd.random() < 0.5)
        except FsError as e:
            assert e.errno in (errno.EEXIST, errno.ENOENT), e
        await check(fs)
        await check(other)
    assert b.meta.memo_hits > hits_before  # answers really came from memory


async def test_a_failed_memo_refill_costs_only_the_refill(make_fs, monkeypatch) -> None:
    """The refill after a commit reads SQLite once more; if that read fails, the entry
    is still committed and reported so, and the mount goes on (the memo only forgets)."""
    import sqlite3

    a = await make_fs()
    await write_file(a, ROOT_INO, b"before", b"x")
    assert (await a.lookup(ROOT_INO, b"before")).size == 1  # now remembered

    def fail(*_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(a.meta.memo, "_read_fresh", fail)
    seq = a.meta.applied_seq
    ino = await write_file(a, ROOT_INO, b"during", b"yy")  # create + data commit
    await a.unlink(ROOT_INO, b"before")
    assert a.meta.applied_seq > seq and not a.meta.broken
    assert (await a.lookup(ROOT_INO, b"during")).ino == ino
    with pytest.raises(FsError) as e:
        await a.lookup(ROOT_INO, b"before")  # not a stale remembered answer
    assert e.value.errno == errno.ENOENT
    monkeypatch.undo()
    await write_file(a, ROOT_INO, b"after", b"zzz")
    b = await make_fs()  # another mount replays the same log: nothing was lost
    await b.meta.catch_up()
    assert await read_file(b, ino) == b"yy"
    assert (await b.lookup(ROOT_INO, b"after")).size == 3


async def test_answers_before_the_local_commit_are_never_ahead_of_reads(
    make_fs, monkeypatch
) -> None:
    """A change is answered once its entry is in the log, before SQLite has it: a read
    right after the answer (here while SQLite is slow to commit) still sees the change,
    from memory or from the view."""
    import time

    a = await make_fs()
    d = (await a.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    assert (await a.lookup(ROOT_INO, b"d")).ino == d
    real_commit = a.meta.writer.commit

    def slow_commit() -> None:
        time.sleep(0.05)
        real_commit()

    monkeypatch.setattr(a.meta.writer, "commit", slow_commit)
    for i in range(5):
        name = b"f%d" % i
        made = await a.mknod(d, name, stat.S_IFREG | 0o644, ROOT)
        assert (await a.lookup(d, name)).ino == made.ino
        assert (await a.getattr(d)).mtime == made.ctime
        await a.setxattr(made.ino, b"user.k", b"v%d" % i, ROOT)
        assert await a.getxattr(made.ino, b"user.k") == b"v%d" % i
        await a.unlink(d, name)
        with pytest.raises(FsError) as e:
            await a.lookup(d, name)
        assert e.value.errno == errno.ENOENT


async def test_a_failed_local_commit_reapplies_the_entry_from_the_log(make_fs, monkeypatch) -> None:
    """If SQLite fails to record an entry that is already in the log (and answered), the
    mount applies that entry again from the log; if it cannot, it refuses to serve a
    view that is behind what it acknowledged."""
    import sqlite3

    a = await make_fs()
    real_commit = a.meta.writer.commit
    fails = [1]

    def commit() -> None:
        if fails[0] > 0:
            fails[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        real_commit()

    monkeypatch.setattr(a.meta.writer, "commit", commit)
    ino = await write_file(a, ROOT_INO, b"kept", b"abc")  # the create's local commit fails
    assert fails == [0] and not a.meta.broken
    assert (await a.lookup(ROOT_INO, b"kept")).ino == ino
    assert await read_file(a, ino) == b"abc"
    assert await a.meta.read(View.lookup, ROOT_INO, b"kept") == ino  # in SQLite too

    fails[0] = 10**6  # now every local commit fails
    await a.mknod(ROOT_INO, b"lost-locally", stat.S_IFREG | 0o644, ROOT)
    with pytest.raises(FsError) as e:  # answered, and then not in this mount's view
        await a.meta.read(View.lookup, ROOT_INO, b"lost-locally")
    assert e.value.errno == errno.EIO
    with pytest.raises(FsError) as e:  # nor answered from memory any more
        await a.lookup(ROOT_INO, b"lost-locally")
    assert e.value.errno == errno.EIO
    with pytest.raises(FsError):
        await a.mknod(ROOT_INO, b"refused", stat.S_IFREG | 0o644, ROOT)
    b = await make_fs()  # the log has everything that was answered
    await b.meta.catch_up()
    assert (await b.lookup(ROOT_INO, b"lost-locally")).nlink == 1
    assert await read_file(b, ino) == b"abc"

    fails[0] = 0  # the disk works again: the next catch-up (the poller's) heals the view
    await a.meta.catch_up()
    assert await a.meta.read(View.lookup, ROOT_INO, b"lost-locally") is not None
    assert (await a.mknod(ROOT_INO, b"later", stat.S_IFREG | 0o644, ROOT)).nlink == 1
    with pytest.raises(FsError) as e:
        await a.lookup(ROOT_INO, b"refused")
    assert e.value.errno == errno.ENOENT


async def test_a_store_fault_while_reapplying_our_entry_heals_on_the_next_catch_up(
    make_fs, monkeypatch
) -> None:
    """A failed local commit, and then a transient error while reading our own entry
    back from the log: reads are refused (EIO) only until a later catch-up has it."""
    import sqlite3

    from efsish.errors import TransientStoreError

    # No share of the top (nudge=off): the read below is what meets the failed commit.
    a = await make_fs(nudge="off")
    real_commit, real_get = a.meta.writer.commit, a.meta.store.get
    fails = {"commit": 1, "get": 1}

    def commit() -> None:
        if fails["commit"]:
            fails["commit"] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        real_commit()

    async def get(key: str, *args: object) -> bytes:
        if key.startswith(LOG_PREFIX) and fails["get"]:
            fails["get"] -= 1
            raise TransientStoreError("503 SlowDown")
        blob: bytes = await real_get(key, *args)
        return blob

    monkeypatch.setattr(a.meta.writer, "commit", commit)
    monkeypatch.setattr(a.meta.store, "get", get)
    made = await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)
    with pytest.raises(FsError) as e:  # waits for the local commit (after the answer)
        await a.meta.read(View.lookup, ROOT_INO, b"x")
    assert e.value.errno == errno.EIO
    assert fails == {"commit": 0, "get": 0}
    await a.meta.catch_up()  # e.g. the poller's
    assert await a.meta.read(View.lookup, ROOT_INO, b"x") == made.ino
    assert not a.meta.broken
    assert (await a.mknod(ROOT_INO, b"y", stat.S_IFREG | 0o644, ROOT)).nlink == 1


@pytest.mark.parametrize("what", ["read", "stat"])
async def test_a_read_racing_a_flush_sees_every_write_that_returned(
    make_fs, monkeypatch, what: str
) -> None:
    """A read of the view queued behind another one while a flush of the same file is
    answered must not read SQLite before that flush's local commit: by then the file's
    pending writes (and unflushed size) are gone from memory. (Review of 015978e.)"""
    import time

    a = await make_fs()
    ino = await write_file(a, ROOT_INO, b"f", b"A" * 10)
    fh, _ = await a.open(ino, os.O_RDWR)
    await a.write(fh, 0, b"B" * 100)  # returned: every later read sees it
    assert (await a.getattr(ino)).size == 100
    await a.meta.read(lambda v: None)  # the create's local commit is done
    real_put, real_commit = a.meta.store.put_if_absent, a.meta.writer.commit

    async def slow_put(key: str, data: bytes) -> None:
        if key.startswith(LOG_PREFIX):
            await trio.sleep(0.05)
        await real_put(key, data)

    def slow_commit() -> None:
        time.sleep(0.5)
        real_commit()

    monkeypatch.setattr(a.meta.store, "put_if_absent", slow_put)
    monkeypatch.setattr(a.meta.writer, "commit", slow_commit)
    a.meta.memo.forget_all()  # as after a memo overflow: the read goes to the view
    got: list[object] = []

    async def reader() -> None:
        if what == "read":
            got.append(bytes(await a.read(fh, 0, 100)))
        else:
            got.append((await a.getattr(ino)).size)

    async with trio.open_nursery() as n:
        n.start_soon(a.meta.read, lambda v: time.sleep(0.2))  # holds the reader a while
        await trio.sleep(0.01)
        n.start_soon(a.fsync, fh)  # e.g. the background writeback
        await trio.sleep(0.02)  # its PUT is in flight, nothing is settling yet
        n.start_soon(reader)
    assert got == ([b"B" * 100] if what == "read" else [100])


@pytest.mark.parametrize("leases", [False])  # a bare MetaLog: format 2
async def test_an_unmount_between_the_put_and_the_local_commit_still_commits(
    store, sb, tmp_path
) -> None:
    """Cancelled (unmount) while the entry's PUT runs in a thread that cannot be
    cancelled (as boto3's do): the entry lands and is answered, and SQLite has it."""
    from efsish.meta.log import MetaLog

    meta = MetaLog(store, sb, tmp_path / "m.db")
    await meta.open()
    real_put = store.put_if_absent

    async def put(key: str, data: bytes) -> None:
        with trio.CancelScope(shield=True):  # like trio.to_thread.run_sync(a boto3 call)
            await trio.sleep(0.05)
            await real_put(key, data)

    store.put_if_absent = put

    async with trio.open_nursery() as n:
        await n.start(meta.run)
        n.start_soon(meta.submit, _plan_create_x)
        await trio.sleep(0.02)
        n.cancel_scope.cancel()
    await store.head(log_key(1))  # the entry landed (its caller was cancelled too)
    assert await meta.read(View.lookup, ROOT_INO, b"x") is not None
    on_disk = await trio.to_thread.run_sync(lambda: View(tmp_path / "m.db").applied_seq)
    assert on_disk == meta.applied_seq == 1
    await meta.aclose()


async def test_a_log_entry_damaged_on_the_way_is_read_again(make_fs, monkeypatch) -> None:
    """A GET carries no checksum: a log entry that arrives damaged is read once more
    before the mount calls the log corrupt (which would stop it for good)."""
    # No shares of the top (nudge=off): B's lookup is the read that fetches A's entry.
    a = await make_fs(nudge="off")
    b = await make_fs(nudge="off")
    await a.mknod(ROOT_INO, b"from-a", stat.S_IFREG | 0o644, ROOT)
    real_get = b.meta.store.get
    damaged: list[str] = []

    async def get(key: str, *args: object) -> bytes:
        blob: bytes = await real_get(key, *args)
        if key.startswith(LOG_PREFIX) and not damaged:
            damaged.append(key)
            blob = blob[:-5] + bytes([blob[-5] ^ 0xFF]) + blob[-4:]
        return blob

    monkeypatch.setattr(b.meta.store, "get", get)
    assert (await b.lookup(ROOT_INO, b"from-a")).nlink == 1
    assert damaged and not b.meta.broken


async def test_a_read_while_the_file_is_renamed_over_returns_its_data(make_fs, monkeypatch) -> None:
    """A reader has the old file open and its read is waiting for the view when a rename
    replaces (and frees) the file: the read returns the old file's bytes, not a hole.
    (`tests/fuse/test_posix.py::test_rename_replaces_file_atomically` saw zeros.)"""
    import time

    a = await make_fs()
    old = await write_file(a, ROOT_INO, b"f", b"old" * 1000)
    new = await write_file(a, ROOT_INO, b"tmp", b"new" * 1000)
    await a.meta.read(lambda v: None)  # both files' local commits are done
    fh, _ = await a.open(old, os.O_RDONLY)
    got: list[bytes] = []

    async def reader() -> None:
        got.append(bytes(await a.read(fh, 0, 3000)))

    async with trio.open_nursery() as n:
        n.start_soon(a.meta.read, lambda v: time.sleep(0.2))  # holds the reader a while
        await trio.sleep(0.01)
        n.start_soon(reader)  # waits for the view behind it
        await trio.sleep(0.01)
        await a.rename(ROOT_INO, b"tmp", ROOT_INO, b"f")  # frees `old`
    assert got == [b"old" * 1000]
    await a.release(fh)
    assert (await a.lookup(ROOT_INO, b"f")).ino == new


# ------------------------------------------------- local commit in the next planning hop


async def _no_heartbeat(self: Housekeeping) -> None:
    """Replaces `Housekeeping.heartbeat` in tests that need the committer to themselves:
    the heartbeat's first round reads the view (the stored size), and a read of the view
    hurries an answered entry into a local commit of its own, so the next planning hop
    would no longer carry it."""
    await trio.sleep_forever()


def _on_disk_seq(fs: Filesystem) -> int:
    """applied_seq as committed to SQLite (read through a connection of our own)."""
    v = View(fs.meta.db_path)
    try:
        return v.applied_seq
    finally:
        v.close()


async def test_a_serial_callers_next_change_commits_the_previous_one_locally(
    make_fs, monkeypatch
) -> None:
    """Each change of a serial caller (rm -rf, tar) costs one writer hop, not two: the
    answered entry's local commit rides in the hop that plans the next one."""
    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)  # only the next change settles it
    monkeypatch.setattr(Housekeeping, "heartbeat", _no_heartbeat)
    a = await make_fs()
    await a.meta.read(lambda v: None)  # nothing unsettled from the start-up
    hops: list[object] = []
    in_thread = mlog.in_thread  # every hop of the writer (MetaLog._in_writer)

    async def counting(fn, *args):
        hops.append(getattr(fn, "__name__", fn))
        return await in_thread(fn, *args)

    monkeypatch.setattr(mlog, "in_thread", counting)
    start = a.meta.applied_seq
    for i in range(3):
        await a.mknod(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, ROOT)
    assert hops == ["_plan"] * 3
    assert a.meta.applied_seq == start + 3
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == start + 2  # the last waits
    assert await a.meta.read(View.lookup, ROOT_INO, b"f2") is not None  # has it done now
    assert hops == ["_plan"] * 3 + ["finish"]
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == start + 3


async def test_nothing_waits_for_an_answered_entry_to_be_committed_locally(
    make_fs, monkeypatch
) -> None:
    """Readers of the view and takers of the writer lock have the answered entry
    committed at once instead of waiting for a next change (here: an hour)."""
    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    # No shares of the top (nudge=off): B's change does not nudge A to apply it.
    a = await make_fs(nudge="off")
    b = await make_fs(nudge="off")
    with trio.fail_after(20):
        await a.mknod(ROOT_INO, b"r", stat.S_IFREG | 0o644, ROOT)
        assert await a.meta.read(View.lookup, ROOT_INO, b"r") is not None
        await a.mknod(ROOT_INO, b"c", stat.S_IFREG | 0o644, ROOT)
        await b.mknod(ROOT_INO, b"remote", stat.S_IFREG | 0o644, ROOT)
        assert await a.meta.catch_up() == 1  # applying b's entry needs the writer lock
        await a.mknod(ROOT_INO, b"k", stat.S_IFREG | 0o644, ROOT)
        seq = await a.meta.write_checkpoint()
        assert seq == a.meta.applied_seq
        await a.mknod(ROOT_INO, b"s", stat.S_IFREG | 0o644, ROOT)
        st = await a.statfs()  # a read of the view
        assert st["files"] - st["ffree"] >= 5
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == a.meta.applied_seq


async def test_a_failed_local_commit_in_the_next_planning_hop_reapplies_the_entry(
    make_fs, monkeypatch
) -> None:
    """The answered entry's local commit fails in the hop that plans the next change:
    the entry is applied again from the log, and the next change still commits."""
    import sqlite3

    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    # The heartbeat's first read could hurry the entry and send it down the other path.
    monkeypatch.setattr(Housekeeping, "heartbeat", _no_heartbeat)
    a = await make_fs()
    await a.meta.read(lambda v: None)
    x = await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)  # answered, not settled
    real_commit = a.meta.writer.commit
    fails = [1]

    def commit() -> None:
        if fails[0]:
            fails[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        real_commit()

    monkeypatch.setattr(a.meta.writer, "commit", commit)
    y = await a.mknod(ROOT_INO, b"y", stat.S_IFREG | 0o644, ROOT)  # its hop commits x
    assert fails == [0] and not a.meta.broken
    assert await a.meta.read(View.lookup, ROOT_INO, b"x") == x.ino
    assert await a.meta.read(View.lookup, ROOT_INO, b"y") == y.ino
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == a.meta.applied_seq


@pytest.mark.parametrize("leases", [False])  # a bare MetaLog: format 2
async def test_an_unmount_while_an_answered_entry_waits_commits_it_locally(
    store, sb, tmp_path, monkeypatch
) -> None:
    """Cancelled (unmount) while the answered entry waits for a next change: it is
    committed to SQLite before the committer stops."""
    import efsish.meta.log as mlog
    from efsish.meta.log import MetaLog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    meta = MetaLog(store, sb, tmp_path / "m.db")
    await meta.open()

    async with trio.open_nursery() as n:
        await n.start(meta.run)
        await meta.submit(_plan_create_x)
        assert meta._unsettled == 1
        n.cancel_scope.cancel()
    on_disk = await trio.to_thread.run_sync(lambda: View(tmp_path / "m.db").applied_seq)
    assert on_disk == meta.applied_seq == 1
    with trio.fail_after(20):
        await meta.aclose()


@pytest.mark.parametrize("error", ["bug", "disk"])
async def test_a_planner_failing_right_after_the_previous_entrys_local_commit(
    make_fs, monkeypatch, error: str
) -> None:
    """A planner raises something other than FsError (a bug, a disk error) in the hop
    that first commits the previous, answered entry: only that caller fails; the mount
    goes on. (Review of ad06ee8: the entry was committed a second time, the view
    re-applied it out of order and the mount refused everything until remounted.)"""
    import sqlite3

    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    # The heartbeat's first read could hurry the entry and send it down the other path.
    monkeypatch.setattr(Housekeeping, "heartbeat", _no_heartbeat)
    a = await make_fs()
    await a.meta.read(lambda v: None)
    await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)
    assert a.meta._unsettled is not None
    exc = RuntimeError("planner bug") if error == "bug" else sqlite3.OperationalError("disk")

    def bad(view: View, ctx: object) -> tuple[list[dict[str, object]], None]:
        raise exc

    with pytest.raises(type(exc)):
        await a.meta.submit(bad)
    assert a.meta.broken is None and a.meta._behind is None
    with trio.fail_after(20):
        await a.mknod(ROOT_INO, b"y", stat.S_IFREG | 0o644, ROOT)
        assert await a.meta.read(View.lookup, ROOT_INO, b"x") is not None
        assert await a.meta.read(View.lookup, ROOT_INO, b"y") is not None
        assert await a.meta.catch_up() == 0
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == a.meta.applied_seq


async def test_an_entry_that_cannot_be_encoded_leaves_nothing_in_the_view(
    make_fs, monkeypatch
) -> None:
    """Encoding the planned entry fails (after the planners changed the view): the
    transaction is rolled back, never committed under the previous entry's position.
    (Review of ad06ee8: 'phantom' was in SQLite and in no log entry.)"""
    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    a = await make_fs()
    await a.meta.read(lambda v: None)
    await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)
    head = a.meta.applied_seq

    def bad(view: View, ctx: PlanContext) -> tuple[list[Op], int]:
        ino = ctx.alloc_ino(view)
        mk = Mk(ino, ROOT_INO, b"phantom", stat.S_IFREG | 0o644, 0, 0, 1)
        # A planner's bug: a checksum as bytes. SQLite stores it; JSON cannot encode it.
        bad = Extent(0, 1, "data/x", 0, 1, b"k0000")  # type: ignore[arg-type]
        return [mk, Write(ino, (bad,), 1, 1)], ino

    with pytest.raises(TypeError):  # bytes are not JSON
        await a.meta.submit(bad)
    assert await a.meta.read(View.lookup, ROOT_INO, b"phantom") is None
    assert await a.meta.read(View.lookup, ROOT_INO, b"x") is not None
    assert a.meta.applied_seq == head == await trio.to_thread.run_sync(_on_disk_seq, a)
    await a.mknod(ROOT_INO, b"after", stat.S_IFREG | 0o644, ROOT)
    assert await a.meta.read(View.lookup, ROOT_INO, b"after") is not None


async def test_a_read_woken_by_a_local_commit_sees_what_was_answered_before_it_resumed(
    make_fs, monkeypatch
) -> None:
    """A read waits for entry N's local commit, which the hop planning N+1 does; on a
    store whose PUT does not yield, N+1 is answered before the read resumes. The read
    must see N+1 (it is repeated). The heartbeat is off: its first read of the view,
    landing between N's answer and N+1's hop, commits N in a hop of its own, and the
    hop this test waits for never comes."""
    import time

    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    monkeypatch.setattr(Housekeeping, "heartbeat", _no_heartbeat)
    a = await make_fs()
    m = a.meta
    await m.read(lambda v: None)
    await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)  # entry N, not settled
    assert m._unsettled == m.applied_seq
    real_plan = m._plan
    in_hop = trio.Event()
    token = trio.lowlevel.current_trio_token()  # (the writer's hops are not to_thread's)

    def slow_plan(batch, settle=None):
        if settle is not None:  # the hop that commits N and plans N+1
            trio.from_thread.run_sync(in_hop.set, trio_token=token)
            time.sleep(0.05)
        return real_plan(batch, settle)

    monkeypatch.setattr(m, "_plan", slow_plan)
    seen: list[object] = []

    async def reader() -> None:
        await in_hop.wait()
        seen.append(await m.read(View.lookup, ROOT_INO, b"y"))

    with trio.fail_after(10):  # a missing hop fails here, not at pytest's timeout
        async with trio.open_nursery() as n:
            n.start_soon(a.mknod, ROOT_INO, b"y", stat.S_IFREG | 0o644, ROOT)
            n.start_soon(reader)
    assert seen and seen[0] is not None


async def test_the_heartbeats_read_between_an_answer_and_the_next_change(
    make_fs, monkeypatch
) -> None:
    """The heartbeat's first read of the view runs while entry N is answered (ordered
    here; by chance in about 1 run in 30 of the test above before it turned the
    heartbeat off): the read is repeated under the writer lock, which hurries N into a
    local commit of its own at once, although the committer's settle wait is an hour.
    The next change's hop then has no entry to commit."""
    import efsish.meta.log as mlog

    monkeypatch.setattr(mlog, "SETTLE_WAIT", 3600.0)
    in_read, x_answered, read_again = trio.Event(), trio.Event(), trio.Event()
    stats_calls = [0]
    real_stats = View.stats

    def stats(view: View) -> tuple[int, int]:
        stats_calls[0] += 1
        if stats_calls[0] == 2:  # the heartbeat's first read (the first: the mount's)
            trio.from_thread.run_sync(in_read.set)
            trio.from_thread.run(x_answered.wait)
        elif stats_calls[0] == 3:  # its repetition, under the writer lock
            trio.from_thread.run_sync(read_again.set)
        return real_stats(view)

    monkeypatch.setattr(View, "stats", stats)
    a = await make_fs()
    m = a.meta
    hops: list[object] = []
    in_thread = mlog.in_thread  # every hop of the writer (MetaLog._in_writer)

    async def counting(fn, *args):
        settle = args[1] if fn == m._plan else None
        hops.append((getattr(fn, "__name__", fn), settle))
        return await in_thread(fn, *args)

    with trio.fail_after(10):
        await in_read.wait()
        monkeypatch.setattr(mlog, "in_thread", counting)
        x = await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)  # entry N
        assert m._unsettled == m.applied_seq  # the committer is in its settle wait
        x_answered.set()
        await read_again.wait()
        assert m._unsettled is None and m.reads_repeated == 1
        assert hops == [("_plan", None), ("finish", None)]  # N committed on its own
        y = await a.mknod(ROOT_INO, b"y", stat.S_IFREG | 0o644, ROOT)
        assert hops[2:] == [("_plan", None)]  # nothing left for this hop to commit
        assert await m.read(View.lookup, ROOT_INO, b"x") == x.ino
        assert await m.read(View.lookup, ROOT_INO, b"y") == y.ino
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == m.applied_seq


async def test_a_local_commit_that_fails_after_it_went_through_keeps_the_mount_going(
    make_fs, monkeypatch
) -> None:
    """The local COMMIT of an answered entry reports an error but had gone through:
    the view is not rolled back to before it (re-applying the entry would be out of
    order and stop the mount), and reads go on. (Review of dfa1965.)"""
    import sqlite3

    a = await make_fs()
    await a.meta.read(lambda v: None)
    real_commit = a.meta.writer.commit
    fails = [1]

    def commit() -> None:
        real_commit()
        if fails[0]:
            fails[0] -= 1
            raise sqlite3.OperationalError("disk I/O error, reported late")

    monkeypatch.setattr(a.meta.writer, "commit", commit)
    x = await a.mknod(ROOT_INO, b"x", stat.S_IFREG | 0o644, ROOT)
    assert await a.meta.read(View.lookup, ROOT_INO, b"x") == x.ino  # hurries the commit
    assert fails == [0] and a.meta.broken is None and a.meta._behind is None
    await a.mknod(ROOT_INO, b"y", stat.S_IFREG | 0o644, ROOT)
    assert await a.meta.read(View.lookup, ROOT_INO, b"y") is not None
    assert await trio.to_thread.run_sync(_on_disk_seq, a) == a.meta.applied_seq


async def test_a_backlog_is_read_in_doubling_windows_of_gets(make_fs, store) -> None:
    # B, 50 ms from the store, is 7 entries behind: it reads them 1, 2, 4 (and the 404
    # after them in a window of 8) at a time, not one round trip per entry.
    a: Filesystem = await make_fs()
    slow = FaultyStore(store, FaultPlan(latency=0.05))
    b: Filesystem = await make_fs(on=slow)
    for i in range(7):
        await a.mknod(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, ROOT)
    slow.requests.clear()
    t0 = trio.current_time()
    assert await b.meta.catch_up() == 7
    took = trio.current_time() - t0
    gets = [k for op, k in slow.requests if op == "get" and k.startswith(LOG_PREFIX)]
    assert len(gets) == 1 + 2 + 4 + 8, gets
    assert took < 6 * 0.05, took  # 4 round trips; one per entry would be 8
    names = {name for _, name, _ in await b.readdir(ROOT_INO, 0, 100)}
    assert {b"f%d" % i for i in range(7)} <= names
    # Nothing new: one GET, as before.
    slow.requests.clear()
    assert await b.meta.catch_up() == 0
    assert [op for op, k in slow.requests if k.startswith(LOG_PREFIX)] == ["get"]


async def test_closing_the_view_waits_for_a_read_running_in_a_thread(make_fs, nursery) -> None:
    """Shutdown closes the SQLite connections: never under a read another thread is
    running on them (a background task's statfs: that crashed the test process once)."""
    import time

    a = await make_fs()
    started = trio.Event()
    out: list[object] = []

    def slow_stats(view: View) -> tuple[int, int]:
        trio.from_thread.run_sync(started.set, trio_token=token)
        time.sleep(0.3)  # the query below runs after aclose() was called
        return view.stats()

    token = trio.lowlevel.current_trio_token()

    async def read() -> None:
        out.append(await a.meta.read(slow_stats))

    nursery.start_soon(read)
    await started.wait()
    await a.meta.aclose()
    with trio.fail_after(5):
        while not out:  # noqa: ASYNC110 (set by the reading task)
            await trio.sleep(0.01)
    assert isinstance(out[0], tuple) and out[0][0] >= 1
