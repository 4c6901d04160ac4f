"""The lease mode (docs/design/LEASES.md) below FUSE: in-process mounts of a format-3
filesystem on a shared memory store, each behind a FaultyStore that counts (and can
hang) its requests."""

from __future__ import annotations

import contextvars
import errno
import io
import os
import stat
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from efsish import codec
from efsish.errors import FsError, TransientStoreError
from efsish.filesystem import ATIME_BATCH, Ctx, Filesystem, Options
from efsish.fsck import run_fsck
from efsish.gc import collect as gc_collect
from efsish.gc import run_gc, run_status
from efsish.meta import heartbeat, inodes, journal, nudge
from efsish.meta.keys import LOG_PREFIX, log_key
from efsish.meta.ops import LFlush, LogEntry
from efsish.meta.superblock import Superblock, format_fs, load_superblock
from efsish.meta.view import ROOT_INO, View
from efsish.store import ObjectStore
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.memory import MemoryStore

ROOT = Ctx(0, 0)
LEASE_TIME = 0.5


class Clock:
    """A lease clock a test can move: the real monotonic clock plus an offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return trio.current_time() + self.offset


@pytest.fixture
async def store() -> ObjectStore:
    return MemoryStore(f"lease-{uuid.uuid4().hex}")


@pytest.fixture
def leases() -> bool:
    return True  # a test parametrizes it False for the same scenario on format 2


@pytest.fixture
def lease_time() -> float:
    return LEASE_TIME


@pytest.fixture
async def sb(store: ObjectStore, leases: bool, lease_time: float) -> Superblock:
    return await format_fs(store, block_size=64 * 1024, leases=leases, lease_time=lease_time)


class Mount:
    def __init__(self, fs: Filesystem, counted: FaultyStore, scope: trio.CancelScope) -> None:
        self.fs = fs
        self.store = counted
        self.scope = scope

    def log_puts(self) -> int:
        return sum(
            1
            for op, key in self.store.requests
            if op == "put_if_absent" and key.startswith(LOG_PREFIX)
        )

    def log_gets(self) -> int:
        return sum(
            1 for op, key in self.store.requests if op == "get" and key.startswith(LOG_PREFIX)
        )


Make = Callable[..., Awaitable[Mount]]


@pytest.fixture
def make(nursery: trio.Nursery, tmp_path: Path, store: ObjectStore, sb: Superblock) -> Make:
    counter = [0]

    async def make(cache: str | None = None, **opts: object) -> Mount:
        counter[0] += 1
        name = cache or f"cache{counter[0]}"
        opts.setdefault("cache_dir", tmp_path / name)
        opts.setdefault("poll_interval", 0.05)
        opts.setdefault("commit_interval", 0.3)
        opts.setdefault("cache_locked", True)
        opts.setdefault("heartbeat_interval", 3600)
        counted = FaultyStore(store)
        fs = Filesystem(counted, await load_superblock(store), Options(**opts))  # type: ignore[arg-type]
        scope = trio.CancelScope()
        started = trio.Event()

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as n:
                    await fs.start(n)
                    started.set()
                    await trio.sleep_forever()

        nursery.start_soon(run)
        await started.wait()
        return Mount(fs, counted, scope)

    return make


async def mkdir(fs: Filesystem, parent: int, name: bytes) -> int:
    return (await fs.mkdir(parent, name, 0o755, ROOT)).ino


async def write_file(fs: Filesystem, parent: int, name: bytes, data: bytes) -> int:
    fh, attr = await fs.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    await fs.write(fh, 0, data)
    await fs.release(fh)
    return attr.ino


async def read_file(fs: Filesystem, parent: int, name: bytes) -> bytes:
    attr = await fs.lookup(parent, name)
    fh, _ = await fs.open(attr.ino, os.O_RDONLY)
    try:
        return bytes(await fs.read(fh, 0, 1 << 20))
    finally:
        await fs.release(fh)


async def entries(store: ObjectStore) -> list[LogEntry]:
    out: list[LogEntry] = []
    seq = 1
    while True:
        try:
            blob = await store.get(log_key(seq))
        except Exception:
            return out
        out.append(LogEntry.unwire(codec.decode_json(b"L", blob, "log")))
        seq += 1


async def test_format_3_writes_the_superblock_and_fmt_entry(
    store: ObjectStore, sb: Superblock
) -> None:
    loaded = await load_superblock(store)
    assert loaded.leases and loaded.format_version == 3
    assert loaded.lease_depth == 1 and loaded.lease_time == LEASE_TIME
    (first,) = await entries(store)
    assert [op.wire()["o"] for op in first.ops] == ["fmt"]


async def test_a_serial_workload_costs_one_put_per_commit_interval(make: Make) -> None:
    a = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")  # the top: a sync change
    await write_file(a.fs, home, b"first", b"x")  # acquires the domain (lacq + create)
    before = a.log_puts()
    start = trio.current_time()
    for i in range(200):
        name = b"f%d" % i
        await write_file(a.fs, home, name, b"data %d" % i)
        if i % 2:
            await a.fs.unlink(home, name)
    elapsed = trio.current_time() - start
    puts = a.log_puts() - before
    # One PUT per commit_interval (0.3 s), not one per change (~500 changes here).
    assert puts <= elapsed / 0.3 + 2, (puts, elapsed)
    assert a.fs.meta.journal_rows > 0 or puts > 0
    await a.fs.leases.sync()  # type: ignore[union-attr]
    assert a.fs.meta.journal_rows == 0
    kinds = {e.kind for e in await entries(a.store)}
    assert "journaled" in kinds


async def test_close_to_open_and_lookup_across_mounts_while_held(make: Make) -> None:
    a = await make()
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"one", b"first")
    await write_file(a.fs, home, b"two", b"second version")  # journaled on A
    assert a.fs.meta.journal_rows > 0
    # B's lookup and open recall the domain: A flushes and answers.
    assert await read_file(b.fs, home, b"two") == b"second version"
    assert b.fs.leases is not None and b.fs.leases.recalls_sent >= 1
    # A keeps writing; B's next open sees it (a second read recall releases the domain).
    fh = (await a.fs.lookup(home, b"one")).ino
    h, _ = await a.fs.open(fh, os.O_WRONLY)
    await a.fs.write(h, 0, b"FIRST")
    await a.fs.release(h)
    assert await read_file(b.fs, home, b"one") == b"FIRST"


@pytest.mark.parametrize(("leases", "lease_time"), [(True, 30.0), (False, 30.0)])
async def test_the_holder_reads_its_domain_with_no_log_get(make: Make, leases: bool) -> None:
    # No poller (poll_interval): every log GET counted is one a request made.
    a = await make(poll_interval=3600, atime=False)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    sub = await mkdir(a.fs, home, b"sub")  # format 3: acquires the domain
    f = await write_file(a.fs, home, b"f", b"data")
    assert (a.fs.leases is not None and bool(a.fs.leases.state.held)) == leases
    n = 20
    before = a.log_gets()
    for _ in range(n):
        assert (await a.fs.lookup(home, b"f")).ino == f
        with pytest.raises(FsError) as e:
            await a.fs.lookup(sub, b"missing")
        assert e.value.errno == errno.ENOENT
        fh, _ = await a.fs.open(f, os.O_RDONLY)
        await a.fs.release(fh)
        await a.fs.opendir(sub)
    gets = a.log_gets() - before
    # In its held domain the holder's view is the truth (LEASES.md §6.2): no request.
    # Format 2 catches up with the log head (one GET of log/S+1) before each.
    assert gets == (0 if leases else 4 * n), gets
    # The top is shared for reading (LEASES.md §17): a lookup there is answered from
    # the view too. Format 2 catches up.
    before = a.log_gets()
    assert (await a.fs.lookup(ROOT_INO, b"home")).ino == home
    assert a.log_gets() - before == (0 if leases else 1)


def lrecs_by(log: list[LogEntry], m: Mount) -> int:
    return sum(
        1
        for e in log
        if e.client == m.fs.meta.client_id
        for op in e.ops
        if op.wire()["o"] == "lrec"
    )


async def test_one_read_across_mounts_costs_one_recall(make: Make) -> None:
    a = await make()
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"f", b"closed on A")  # journaled under A's lease
    await write_file(a.fs, home, b"g", b"also on A")
    assert a.fs.meta.journal_rows > 0
    before = lrecs_by(await entries(a.store), b)
    # One open+read (lookup, open, read), then stat and list the directory: the
    # lookup's read recall releases the domain, so the rest catch up with the log.
    assert await read_file(b.fs, home, b"f") == b"closed on A"
    assert (await b.fs.getattr(home)).is_dir
    await b.fs.opendir(home)
    assert await read_file(b.fs, home, b"g") == b"also on A"
    assert lrecs_by(await entries(a.store), b) - before == 1
    # A's next change, within the read's grace, commits on its own (no re-acquire in
    # the middle of B's read); B sees it at its next open with no recall either.
    h, _ = await a.fs.open((await a.fs.lookup(home, b"f")).ino, os.O_WRONLY)
    await a.fs.write(h, 0, b"CLOSED")
    await a.fs.release(h)
    assert a.fs.leases is not None and not a.fs.leases.state.held
    assert await read_file(b.fs, home, b"f") == b"CLOSED on A"
    assert lrecs_by(await entries(a.store), b) - before == 1


async def test_the_holder_sees_changes_outside_its_domain_at_once(make: Make) -> None:
    a = await make(poll_interval=3600)  # learns nothing from a poll
    s = await make(sync=True)  # takes no leases: its domain stays FREE
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"mine", b"a")  # A holds home
    other = await mkdir(s.fs, ROOT_INO, b"other")
    await write_file(s.fs, other, b"new", b"from s")
    await write_file(s.fs, ROOT_INO, b"top", b"at the top")
    assert a.fs.leases is not None and a.fs.leases.state.held
    # Close-to-open: A's lookups and opens of a domain nobody holds, and of the top,
    # catch up first.
    assert (await a.fs.lookup(ROOT_INO, b"other")).ino == other
    assert await read_file(a.fs, other, b"new") == b"from s"
    assert await read_file(a.fs, ROOT_INO, b"top") == b"at the top"
    # A change in A's domain goes through a recall; A's next read sees it.
    await write_file(s.fs, home, b"theirs", b"from s")
    assert await read_file(a.fs, home, b"theirs") == b"from s"


async def test_a_directory_moved_into_another_mounts_domain_is_read_through_it(
    make: Make,
) -> None:
    # A answers reads in its domain from memory (the domains of a directory are walked
    # once); once a directory moved out of it, its reads recall the new domain's holder.
    a = await make()
    b = await make()
    da = await mkdir(a.fs, ROOT_INO, b"a")
    x = await mkdir(a.fs, da, b"x")  # A holds domain a
    db = await mkdir(b.fs, ROOT_INO, b"b")
    await write_file(b.fs, db, b"g", b"b's")  # B holds domain b
    with pytest.raises(FsError):
        await a.fs.lookup(x, b"f")  # answered by A from its view
    await a.fs.rename(da, b"x", db, b"x")  # /a/x -> /b/x (recalls b)
    await write_file(a.fs, da, b"y", b"a's")  # A holds a
    await a.fs.fsyncdir()  # the rename in the bucket: B's view moves x too
    await b.fs.meta.catch_up()
    await write_file(b.fs, x, b"f", b"new in b")  # journaled on B (recalls b back)
    assert b.fs.leases is not None and set(b.fs.leases.state.held) == {db}
    assert a.fs.leases is not None and set(a.fs.leases.state.held) == {da}
    assert b.fs.meta.journal_rows > 0  # f is not in the bucket yet
    assert await read_file(a.fs, x, b"f") == b"new in b"


async def race(
    a: Filesystem, b: Filesystem, call: Callable[[Filesystem], Awaitable[object]]
) -> list[str]:
    """Run `call` on both mounts at once: what each got ("ok" or the errno)."""
    results: list[str] = []

    async def go(fs: Filesystem) -> None:
        try:
            await call(fs)
            results.append("ok")
        except FsError as e:
            results.append(errno.errorcode[e.errno])

    async with trio.open_nursery() as n:
        n.start_soon(go, a)
        n.start_soon(go, b)
    return sorted(results)


async def test_one_winner_for_one_name_from_two_mounts(make: Make) -> None:
    a = await make()
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    src = await write_file(a.fs, home, b"src", b"")  # A holds the domain
    calls: list[Callable[[Filesystem], Awaitable[object]]] = [
        lambda fs: fs.mknod(home, b"x", stat.S_IFREG | 0o644, ROOT),  # O_EXCL create
        lambda fs: fs.mkdir(home, b"d", 0o755, ROOT),
        lambda fs: fs.link(src, home, b"l"),
        lambda fs: fs.rename(home, b"src", home, b"r", flags=1),  # RENAME_NOREPLACE
    ]
    for i, call in enumerate(calls):
        # Whoever holds the domain now (it moves with write recalls), the other races it.
        got = await race(a.fs, b.fs, call)
        if i == 3:
            assert got == ["ENOENT", "ok"]  # the loser's source is gone
        else:
            assert got == ["EEXIST", "ok"], (i, got)
    await a.fs.leases.sync()  # type: ignore[union-attr]
    await b.fs.leases.sync()  # type: ignore[union-attr]
    names = sorted(n for _, n, _ in await b.fs.readdir(home, 0))
    assert names == [b"d", b"l", b"r", b"x"]


async def test_fsync_returns_only_once_the_change_is_in_the_log(
    make: Make, store: ObjectStore
) -> None:
    a = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    fh, _ = await a.fs.create(home, b"f", 0o644, os.O_WRONLY, ROOT)
    await a.fs.write(fh, 0, b"durable")
    await a.fs.fsync(fh)
    # Kill the holder and lose its cache dir: a new mount sees the file.
    a.scope.cancel()
    c = await make()
    assert await read_file(c.fs, home, b"f") == b"durable"


async def test_kill_9_and_remount_on_the_cache_dir_loses_nothing(make: Make) -> None:
    a = await make(cache="keep", commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    for i in range(20):
        await write_file(a.fs, home, b"f%d" % i, b"v%d" % i)
    assert a.fs.meta.journal_rows > 0  # answered, not in the log
    a.scope.cancel()
    await trio.sleep(0.01)
    a2 = await make(cache="keep")  # the same client, a new incarnation: adopts at once
    assert a2.fs.leases is not None and a2.fs.leases.inc == 2
    assert a2.fs.meta.journal_rows == 0
    b = await make()
    for i in range(20):
        assert await read_file(b.fs, home, b"f%d" % i) == b"v%d" % i


async def test_names_that_are_not_ascii_or_not_utf8_survive_the_journal(make: Make) -> None:
    """Journal rows and flushed entries are written by orjson, and where it refuses (a
    name that is not UTF-8) by the standard library: every such name, answered from the
    journal, replayed after a kill -9 and flushed, reads back byte for byte on another
    mount, with its inline data."""
    names = [b"plain", "\u00e9t\u00e9 \u65e5\u672c".encode(), b"raw-\xff\xfe", b"mix-\xc3\xa9\xff"]
    a = await make(cache="keep", commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    for i, name in enumerate(names):
        await write_file(a.fs, home, name, b"data %d " % i + name)
    assert a.fs.meta.journal_rows > 0  # answered from the journal, not in the log
    a.scope.cancel()  # kill -9: the remount replays the journal
    await trio.sleep(0.01)
    a2 = await make(cache="keep")
    await a2.fs.leases.sync()  # type: ignore[union-attr]
    b = await make()
    for i, name in enumerate(names):
        assert await read_file(b.fs, home, name) == b"data %d " % i + name
    listed = {n for _, n, _ in await b.fs.readdir(home, 0)}
    assert set(names) <= listed, listed


async def test_cache_dir_lost_loses_at_most_the_unflushed_changes(
    make: Make, store: ObjectStore
) -> None:
    a = await make(commit_interval=0.2)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    for i in range(10):
        await write_file(a.fs, home, b"f%d" % i, b"v%d" % i)
    await trio.sleep(0.6)  # more than commit_interval: flushed
    await write_file(a.fs, home, b"late", b"maybe")
    a.scope.cancel()
    b = await make()
    # B waits out the takeover (2 x lease_time) and sees every flushed change.
    for i in range(10):
        assert await read_file(b.fs, home, b"f%d" % i) == b"v%d" % i
    assert b.fs.leases is not None and b.fs.leases.takeovers == 1
    assert await run_fsck(store) == 0


async def test_a_paused_holder_is_taken_over_and_fenced(make: Make) -> None:
    a = await make(commit_interval=3600)
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"kept", b"1")
    await a.fs.leases.sync()  # type: ignore[union-attr]
    await write_file(a.fs, home, b"lost", b"2")  # journaled only
    # A's store hangs for longer than 2 x lease_time: it cannot answer B's recall.
    a.store.plan = FaultPlan(latency=4 * LEASE_TIME)
    with trio.fail_after(10):
        await b.fs.unlink(home, b"kept")  # write recall, unanswered: takeover
    assert b.fs.leases is not None and b.fs.leases.takeovers == 1
    a.store.plan = FaultPlan()
    # A, resumed, meets the takeover in its catch-up: fenced, it stops before it.
    with pytest.raises(FsError):
        await a.fs.meta.catch_up()
    assert a.fs.leases is not None and a.fs.leases.fenced is not None
    with pytest.raises(FsError):
        await b.fs.lookup(home, b"lost")  # never applied to the tree
    # A rebuilds its view and writes its fenced journal to a recovery directory,
    # named by an lrcv in the log; then it works again.
    with trio.fail_after(10):
        while not a.fs.leases.recovered:  # noqa: ASYNC110 (set by a background task)
            await trio.sleep(0.05)
    (path,) = a.fs.leases.recovered
    # The fenced incarnation was this daemon: its share of the top ended with its new
    # sess (LEASES.md §17), so the next change of the top waits for nobody gone.
    await b.fs.meta.catch_up()
    shares = await b.fs.meta.read(View.shares)
    assert not {(c, i) for c, i in shares if c == a.fs.meta.client_id and i < a.fs.leases.inc}
    # (Else the recovery directory's mkdir in the top waited for an ack from it.)
    assert a.fs.leases.share.ack_timeouts == 0
    rcv = [op for e in await entries(a.store) for op in e.ops if op.wire()["o"] == "lrcv"]
    assert [op.wire()["path"] for op in rcv] == [path]
    out = io.StringIO()
    await run_status(a.store, out)
    assert f"recovered: {path} (changes of mount {a.fs.meta.client_id}" in out.getvalue()
    top, name = path.strip("/").split("/")
    rdir = (await b.fs.lookup((await b.fs.lookup(ROOT_INO, top.encode())).ino, name.encode())).ino
    home_r = (await b.fs.lookup(rdir, b"home")).ino
    assert await read_file(b.fs, home_r, b"lost") == b"2"
    text = await read_file(b.fs, rdir, b"JOURNAL.txt")
    assert b'"name": "lost"' in text and b'"o": "mk"' in text
    await write_file(a.fs, home, b"after", b"3")
    assert await read_file(b.fs, home, b"after") == b"3"


async def test_remount_after_a_takeover_recovers_the_journal(make: Make) -> None:
    a = await make(cache="keep", commit_interval=3600)
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"")  # acquires (a sync entry)
    await write_file(a.fs, home, b"mine", b"journaled only")
    assert a.fs.meta.journal_rows > 0
    a.scope.cancel()  # kill -9: the journal stays in the cache dir
    with trio.fail_after(10):
        await write_file(b.fs, home, b"theirs", b"b")  # takes the domain over
    a2 = await make(cache="keep")
    assert a2.fs.leases is not None
    (path,) = a2.fs.leases.recovered
    assert a2.fs.meta.journal_rows == 0
    with pytest.raises(FsError):
        await a2.fs.lookup(home, b"mine")
    assert await read_file(a2.fs, home, b"theirs") == b"b"
    rdir = ROOT_INO
    for part in path.strip("/").split("/"):
        rdir = (await a2.fs.lookup(rdir, part.encode())).ino
    assert await read_file(b.fs, (await b.fs.lookup(rdir, b"home")).ino, b"mine") == (
        b"journaled only"
    )


SKEW: contextvars.ContextVar[int] = contextvars.ContextVar("skew", default=0)
DAY_NS = 86400 * 10**9


async def test_skewed_wall_clocks_change_nothing(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each mount's tasks (and the calls made on it) see their own wall clock, a day
    # apart; leases use only the lease clock, so recalls, validity and takeover behave
    # as with equal clocks.
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() + SKEW.get())
    monkeypatch.setattr(time, "time", lambda: (real() + SKEW.get()) / 1e9)
    monkeypatch.setattr("efsish.meta.leases.READ_GRACE", 0.0)
    SKEW.set(-DAY_NS)
    a = await make(commit_interval=3600)
    SKEW.set(DAY_NS)
    b = await make()
    SKEW.set(-DAY_NS)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"1")
    await write_file(a.fs, home, b"second", b"2")  # journaled under A's lease
    assert a.fs.meta.journal_rows > 0
    SKEW.set(DAY_NS)
    assert await read_file(b.fs, home, b"second") == b"2"  # recall answered at once
    assert b.fs.leases is not None and b.fs.leases.takeovers == 0
    SKEW.set(-DAY_NS)
    # The read released the domain; A takes it back with its next change (no grace
    # after a read here: see READ_GRACE below).
    await write_file(a.fs, home, b"third", b"3")
    assert a.fs.leases is not None and a.fs.leases.state.held
    a.store.plan = FaultPlan(latency=4 * LEASE_TIME)  # A stops answering
    SKEW.set(DAY_NS)
    start = trio.current_time()
    with trio.fail_after(10):
        await b.fs.unlink(home, b"first")  # taken over after 2 x lease_time, not sooner
    assert b.fs.leases.takeovers == 1
    assert trio.current_time() - start >= 2 * LEASE_TIME


async def test_an_answer_to_a_recall_already_closed_is_dropped(make: Make) -> None:
    a = await make()
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"f", b"1")  # A holds the domain
    await write_file(a.fs, home, b"g", b"2")  # journaled
    assert await read_file(b.fs, home, b"g") == b"2"  # B's read recall, answered
    rid = next(
        op.wire()["rid"] for e in await entries(a.store) for op in e.ops if op.wire()["o"] == "lrec"
    )
    # Answering it again (a second wake of the reactor) must not put an invalid answer in
    # an entry: apply would fence the whole entry, and this mount would go to recovery.
    await write_file(a.fs, home, b"h", b"3")
    assert a.fs.leases is not None
    await a.fs.leases._flush([LFlush(home, rid)])
    assert a.fs.leases.fenced is None and not a.fs.leases.recovered
    assert await read_file(b.fs, home, b"h") == b"3"


async def test_gc_keeps_a_block_a_journaled_change_dropped_until_it_lands(
    make: Make, store: ObjectStore
) -> None:
    a = await make(commit_interval=3600)
    b = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"")  # acquires
    await write_file(a.fs, home, b"f", os.urandom(100_000))  # a block, not inline
    assert a.fs.leases is not None
    await a.fs.leases.sync()
    blocks = {i.key async for i in store.list("data/")}
    assert blocks
    await a.fs.unlink(home, b"f")  # journaled: only A's view drops the block
    assert a.fs.meta.journal_rows > 0
    # The log moves on without A's journal (another mount's change in the top), and gc
    # runs on A with no grace: the block is still referenced by the log, so it stays.
    await mkdir(b.fs, ROOT_INO, b"other")
    await heartbeat.delete(store, b.fs.meta.client_id)  # B's stale heartbeat aside
    await a.fs.meta.catch_up()
    garbage = await a.fs.meta.read(View.garbage)
    assert garbage and all(seq >= journal.PENDING and t > 0 for _, seq, t in garbage)
    await gc_collect(a.store, a.fs.meta, grace=0)
    assert blocks <= {i.key async for i in store.list("data/")}
    # Once the batch has landed, the block is garbage at its position and gc deletes it.
    await a.fs.leases.sync()
    garbage = await a.fs.meta.read(View.garbage)
    assert garbage and all(seq < journal.PENDING for _, seq, _ in garbage)
    await a.fs.meta.catch_up()
    await gc_collect(a.store, a.fs.meta, grace=0)
    assert not blocks & {i.key async for i in store.list("data/")}


async def test_a_sync_mount_respects_leases_and_takes_none(make: Make) -> None:
    a = await make()
    s = await make(sync=True)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"a1", b"from a")  # A holds the domain
    await write_file(a.fs, home, b"a2", b"journaled")
    await write_file(s.fs, home, b"s1", b"from s")  # a write recall: handed over...
    assert s.fs.leases is not None and not s.fs.leases.state.held  # ...and given back
    assert s.fs.meta.journal_rows == 0
    assert await read_file(a.fs, home, b"s1") == b"from s"
    assert await read_file(s.fs, home, b"a2") == b"journaled"
    log = await entries(s.store)
    assert any(op.wire().get("to") == s.fs.meta.client_id for e in log for op in e.ops)
    mine = [e for e in log if e.client == s.fs.meta.client_id]
    assert mine and all(e.kind == "sync" for e in mine)
    assert not any(op.wire()["o"] == "lacq" for e in mine for op in e.ops)


class LoseAnswers(FaultyStore):
    """Does each log PUT, then loses its answer, `lose` times."""

    lose = 0

    async def put_if_absent(self, key: str, data: bytes) -> None:
        await super().put_if_absent(key, data)
        if self.lose and key.startswith(LOG_PREFIX):
            self.lose -= 1
            raise TransientStoreError(f"answer lost: {key}")


async def test_a_flush_whose_answer_was_lost_is_recognised(make: Make) -> None:
    a = await make(commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"")  # acquires
    await write_file(a.fs, home, b"f", b"journaled")
    assert a.fs.meta.journal_rows > 0 and a.fs.leases is not None
    lossy = LoseAnswers(a.store.inner)
    lossy.lose = 100  # every try of the flush's PUT lands, no answer comes back
    a.fs.meta.store = lossy
    with trio.fail_after(30):
        with pytest.raises(FsError):
            await a.fs.leases.sync()
        lossy.lose = 0
        # The next flush loses the race for that position to... our own entry: the
        # catch-up recognises it by its label and drops the rows, nothing is sent twice.
        await a.fs.leases.sync()
        assert a.fs.meta.journal_rows == 0
        await mkdir(a.fs, ROOT_INO, b"top")  # a sync change after it does not wait forever
    log = await entries(a.store)
    assert sum(1 for e in log for op in e.ops if op.wire().get("name") == "f") == 1


async def test_efsish_gc_writes_entries_a_lease_filesystem_accepts(
    make: Make, store: ObjectStore
) -> None:
    a = await make()
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"f", os.urandom(100_000))
    await a.fs.unlink(home, b"f")
    await a.fs.leases.sync()  # type: ignore[union-attr]
    await heartbeat.delete(store, a.fs.meta.client_id)
    assert await run_gc(store, dry_run=False, grace=0, progress=False, out=io.StringIO()) == 0
    gc_entries = [e for e in await entries(store) if e.client == "gc"]
    assert gc_entries and all(e.kind == "sync" for e in gc_entries)
    await a.fs.meta.catch_up()
    assert await a.fs.meta.read(View.garbage) == []  # applied, not fenced


# ------------------------------------------------------------------- nudges (§11)


async def held_file(make: Make, **opts: object) -> tuple[Mount, Mount, int]:
    """Mounts A and B; A holds /home, where it has just closed `f`."""
    a = await make(**opts)
    b = await make(**opts)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"f", b"closed on A")
    assert a.fs.leases is not None and a.fs.leases.state.held
    return a, b, home


async def wait_for(cond: Callable[[], bool]) -> None:
    """Until `cond()` (set by a background task or a datagram), at most 5 s."""
    with trio.fail_after(5):
        while not cond():  # noqa: ASYNC110 (set by a background task)
            await trio.sleep(0.01)


async def published(store: ObjectStore, m: Mount) -> heartbeat.Heartbeat:
    """Mount `m`'s heartbeat, once its heartbeat task has written it."""
    with trio.fail_after(5):
        while (hb := await heartbeat.read(store, m.fs.meta.client_id)) is None:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return hb


@pytest.mark.parametrize("lease_time", [120.0])
async def test_nudges_make_a_recall_quick_with_a_long_poll(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither mount polls the log for 30 s, and a recaller waits 30 s between its own
    # polls: only the nudges (recall -> holder, answer -> recaller) make this quick.
    a, b, home = await held_file(make, poll_interval=30)
    monkeypatch.setattr("efsish.meta.leases.RECALL_POLL", 30.0)
    t0 = trio.current_time()
    with trio.fail_after(10):
        assert await read_file(b.fs, home, b"f") == b"closed on A"
    took = trio.current_time() - t0
    assert took < 2.0, took
    assert a.fs.leases is not None and b.fs.leases is not None
    assert b.fs.leases.recalls_sent >= 1 and b.fs.leases.takeovers == 0
    na, nb = a.fs.leases.nudges.nudger, b.fs.leases.nudges.nudger
    assert na is not None and nb is not None
    assert na.stats.woken >= 1 and nb.stats.woken >= 1
    assert na.stats.dropped_invalid == nb.stats.dropped_invalid == 0


@pytest.mark.parametrize("lease_time", [120.0])
async def test_a_read_recall_puts_its_lrec_with_no_catch_up_before_it(make: Make) -> None:
    # B's view says A holds /home: the lrec's conditional PUT proves the head itself
    # (a GET of the head before it is one round trip more), and B waits for the answer.
    _a, b, home = await held_file(make, poll_interval=3600)
    await b.fs.meta.catch_up()
    assert b.fs.leases is not None and home in b.fs.leases.state.others
    before = len(b.store.requests)
    assert await read_file(b.fs, home, b"f") == b"closed on A"
    reqs = [(op, k) for op, k in b.store.requests[before:] if k.startswith(LOG_PREFIX)]
    assert reqs[0][0] == "put_if_absent", reqs  # the lrec first
    assert b.fs.leases.recalls_sent == 1


@pytest.mark.parametrize("lease_time", [120.0])
async def test_a_read_recall_on_a_stale_view_reads_the_head(make: Make) -> None:
    # B's view says A holds /home, but A released it to C's read and a -o sync mount
    # changed /home since: B's lrec conflicts, B reads to the head and plans again
    # (no holder: no recall), and answers from the head.
    _a, b, home = await held_file(make, poll_interval=3600)
    await b.fs.meta.catch_up()
    c = await make(poll_interval=3600)
    s = await make(sync=True, poll_interval=3600)
    assert await read_file(c.fs, home, b"f") == b"closed on A"  # A releases /home
    await write_file(s.fs, home, b"g", b"from s")  # a sync entry: /home stays FREE
    assert b.fs.leases is not None and home in b.fs.leases.state.others  # stale
    assert await read_file(b.fs, home, b"g") == b"from s"
    assert await read_file(b.fs, home, b"f") == b"closed on A"
    assert b.fs.leases.recalls_sent == 0


async def test_a_catch_up_to_a_nudged_position_gets_its_entries_at_once(make: Make) -> None:
    # A holder nudged to position N GETs every entry up to N in one round trip (they
    # exist: the nudge names a landed entry), not 1, 2, 4... of them in turn. (A takes
    # no share of the top without nudges: B's mkdirs do not make it catch up.)
    a = await make(poll_interval=3600, nudge="off")
    b = await make(poll_interval=3600)
    await a.fs.meta.catch_up()
    for i in range(4):
        await mkdir(b.fs, ROOT_INO, b"d%d" % i)  # entries in the top: one each
    head = b.fs.meta.applied_seq
    assert head - a.fs.meta.applied_seq >= 4
    a.store.plan = FaultPlan(latency=0.3, ops=frozenset({"get"}))
    t0 = trio.current_time()
    await a.fs.meta.catch_up(upto=head)
    took = trio.current_time() - t0
    assert a.fs.meta.applied_seq == head
    assert took < 0.5, took  # one round trip of 0.3 s (1, 2, then 1 of them: 0.9 s)


async def test_a_catch_up_behind_a_commit_that_proved_the_head_sends_no_get(
    make: Make, nursery: trio.Nursery
) -> None:
    # B's commit loses the next position to A, reads to the head and lands its entry;
    # a lookup's catch-up that waited for the writer lock meanwhile needs no GET more.
    # (No shares of the top, so no nudges: B must not learn of A's entry before.)
    a = await make(poll_interval=3600, nudge="off")
    b = await make(poll_interval=3600, nudge="off")
    await b.fs.meta.catch_up()
    s = b.fs.meta.applied_seq
    await mkdir(a.fs, ROOT_INO, b"by_a")  # position s + 1
    b.store.plan = FaultPlan(latency=0.2, ops=frozenset({"put_if_absent"}))
    before = len(b.store.requests)
    nursery.start_soon(mkdir, b.fs, ROOT_INO, b"by_b")  # PUT s + 1: conflict, then s + 2
    await trio.sleep(0.05)
    await b.fs.meta.catch_up()
    assert b.fs.meta.applied_seq == s + 2
    after = b.store.requests[before:]
    assert after.count(("get", log_key(s + 3))) == 1, after  # the commit's, not ours


@pytest.mark.parametrize("lease_time", [120.0])
async def test_without_nudges_a_recall_completes_at_the_poll(make: Make) -> None:
    a, b, home = await held_file(make, poll_interval=1.5, nudge="off")
    assert a.fs.leases is not None and a.fs.leases.nudges.nudger is None
    assert b.fs.leases is not None and b.fs.leases.nudges.nudger is None
    t0 = trio.current_time()
    with trio.fail_after(10):
        assert await read_file(b.fs, home, b"f") == b"closed on A"
    assert trio.current_time() - t0 < 1.5 + 1.0  # A's next poll sees the recall
    assert b.fs.leases.recalls_sent >= 1 and b.fs.leases.takeovers == 0


async def test_the_heartbeat_advertises_the_nudge_address(make: Make, store: ObjectStore) -> None:
    a = await make()
    off = await make(nudge="off")
    ro = await make(read_only=True)
    assert a.fs.leases is not None and a.fs.leases.nudges.nudger is not None
    hb = await published(store, a)
    assert hb.nudge == a.fs.leases.nudges.nudger.address
    assert nudge.parse_address(hb.nudge)[0] == "127.0.0.1"  # a memory:// store is local
    assert (await published(store, off)).nudge is None
    assert ro.fs.leases is None  # -o ro: no lease state, no socket, no heartbeat
    deaf = await make()
    assert deaf.fs.leases is not None and deaf.fs.leases.nudges.nudger is not None
    hb_deaf = await published(store, deaf)
    # It answers no probe, as behind a firewall.
    deaf.fs.leases.nudges.nudger._pong = lambda n, peer: None  # type: ignore[method-assign]
    out = io.StringIO()
    await run_status(store, out)  # `efsish status` shows and probes each address (§11)
    text = out.getvalue()
    assert f"    nudges: {hb.nudge}, advertised " in text
    assert "; answered a probe in " in text
    assert f"    nudges: {hb_deaf.nudge}, advertised " in text
    assert "; did not answer a probe from this machine within 1 s" in text
    assert "    nudges: none (nudge=off, or no socket" in text
    assert a.fs.leases.nudges.nudger.stats.pongs == 1


@pytest.mark.parametrize("leases", [False])
async def test_format_2_opens_no_nudge_socket(make: Make, store: ObjectStore) -> None:
    a = await make()
    assert a.fs.leases is None
    assert (await published(store, a)).nudge is None
    assert not [k for _, k in a.store.requests if k.startswith(nudge.PREFIX)]


@pytest.mark.parametrize("key", ["forged", "right"])
async def test_only_a_nudge_with_the_filesystem_key_wakes(
    make: Make, store: ObjectStore, key: str
) -> None:
    a = await make(poll_interval=3600)
    with pytest.raises(FsError):
        await a.fs.lookup(ROOT_INO, b"none")  # takes a share of the top (LEASES.md §17)
    b = await make(poll_interval=3600, sync=True)  # writes an entry A has not read
    home = await mkdir(b.fs, ROOT_INO, b"home")  # ends A's share of the top: A sees it
    await wait_for(lambda: a.fs.meta.applied_seq == b.fs.meta.applied_seq)
    await mkdir(b.fs, home, b"new")  # in a domain (B takes no lease): no nudge
    assert a.fs.leases is not None and a.fs.leases.nudges.nudger is not None
    target = a.fs.leases.nudges.nudger
    behind, received, woken = (
        a.fs.meta.applied_seq,
        target.stats.received,
        target.stats.woken,
    )
    k = await nudge.load_key(store) if key == "right" else os.urandom(nudge.KEY_BYTES)
    with nudge.Nudger(
        k, a.fs.sb.fs_uuid, "sender", ("127.0.0.1", 0), applied=lambda: 0, on_wake=print
    ) as sender:
        hb = heartbeat.Heartbeat(a.fs.meta.client_id, t=0, nudge=target.address)
        assert sender.nudge(hb, b.fs.meta.applied_seq)
        await wait_for(lambda: target.stats.received == received + 1)
    if key == "forged":
        assert target.stats.dropped_invalid == 1 and target.stats.woken == woken
        await trio.sleep(0.2)
        assert a.fs.meta.applied_seq == behind  # no catch-up
    else:
        assert target.stats.woken == woken + 1
        await wait_for(lambda: a.fs.meta.applied_seq == b.fs.meta.applied_seq)


async def test_an_idle_mount_with_nudges_sends_only_its_polls(make: Make) -> None:
    a = await make(poll_interval=0.05)
    b = await make(poll_interval=0.05)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"f", b"x")
    assert await read_file(b.fs, home, b"f") == b"x"  # a recall: nudges sent both ways
    await a.fs.leases.sync()  # type: ignore[union-attr]
    await trio.sleep(0.3)
    for m in (a, b):
        before = len(m.store.requests)
        await trio.sleep(1.0)
        idle = m.store.requests[before:]
        assert idle and all(op == "get" and k.startswith(LOG_PREFIX) for op, k in idle), idle


@pytest.mark.parametrize("leases", [True, False], ids=["format3", "format2"])
async def test_status_and_metrics_show_leases_and_uncommitted_changes(
    make: Make, leases: bool
) -> None:
    """`efsish status` shows, from each mount's heartbeat, the format it runs, the
    domains it holds and its changes not yet in the log (count, age of the oldest); the
    metrics (stats file, Prometheus) carry the same numbers."""
    a = await make(commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"alice")
    await write_file(a.fs, home, b"first", b"")  # acquires /alice (a sync entry)
    for i in range(3):
        await write_file(a.fs, home, b"f%d" % i, b"x")
    await trio.sleep(0.2)
    await a.fs.write_heartbeat()
    out = io.StringIO()
    await run_status(a.store, out)
    text = out.getvalue()
    m = a.fs.metering.metrics()
    if not leases:
        assert "format: 2\n" in text and "    format 2\n" in text, text
        assert "LeasesHeld" not in m
        return
    rows = a.fs.meta.journal_rows
    assert rows >= 3
    assert "format: 3 (leases)" in text, text
    line = next(ln for ln in text.splitlines() if ln.startswith("    format 3"))
    assert line.startswith(f"    format 3; leases: /alice; uncommitted changes: {rows}, oldest ")
    assert 0.1 <= float(line.split("oldest ")[1].split(" s")[0]) < 60, line
    assert (m["LeasesHeld"], m["JournalRows"]) == (1.0, float(rows))
    assert 0.1 <= m["JournalOldestAgeSeconds"] < 60
    # Committed: nothing uncommitted any more, the lease is still held.
    await a.fs.fsyncdir()
    await a.fs.write_heartbeat()
    out = io.StringIO()
    await run_status(a.store, out)
    assert "    format 3; leases: /alice; uncommitted changes: none\n" in out.getvalue()
    m = a.fs.metering.metrics()
    assert (m["LeasesHeld"], m["JournalRows"], m["JournalOldestAgeSeconds"]) == (1, 0, 0)


async def test_a_dead_holders_domains_are_taken_over_together(make: Make) -> None:
    """A holder of several domains dies: once one recall of it went unanswered for
    2 x L, its other domains are recalled at once, so a reader going through them one
    after another waits about 2 x L twice, not 2 x L per domain."""
    a = await make(commit_interval=3600)
    b = await make()
    n = 5
    homes = []
    for i in range(n):
        home = await mkdir(a.fs, ROOT_INO, b"u%d" % i)
        await write_file(a.fs, home, b"first", b"")  # acquires (a sync entry)
        await write_file(a.fs, home, b"f", b"%d" % i)
        homes.append(home)
    await a.fs.fsyncdir()
    assert a.fs.leases is not None and len(a.fs.leases.state.held) == n
    a.scope.cancel()  # kill -9: nobody answers recalls any more
    start = time.monotonic()
    with trio.fail_after(n * 2 * LEASE_TIME + 10):
        for i, home in enumerate(homes):
            assert await read_file(b.fs, home, b"f") == b"%d" % i
    took = time.monotonic() - start
    assert b.fs.leases is not None
    with trio.fail_after(5):  # a background takeover is counted once its submit returns
        while b.fs.leases.takeovers < n:  # noqa: ASYNC110 (a counter, no event)
            await trio.sleep(0.01)
    assert b.fs.leases.takeovers == n
    assert took < 3 * 2 * LEASE_TIME + 0.5, took


def pause_after_commit(fs: Filesystem) -> tuple[threading.Event, threading.Event]:
    """Make the next COMMIT of `fs`'s view writer stop in its worker thread, once it
    is in SQLite, until the test sets the second event (at most 2 s): the window in
    which the reader connection sees the change and the trio thread has not yet told
    the filesystem about it. The first event says the COMMIT is done."""
    committed, go_on = threading.Event(), threading.Event()
    writer = fs.meta.writer
    commit = writer.commit

    def paused() -> None:
        writer.commit = commit  # type: ignore[method-assign]
        commit()
        committed.set()
        go_on.wait(2.0)

    writer.commit = paused  # type: ignore[method-assign]
    return committed, go_on


async def read_while_paused(
    fs: Filesystem, fh: int, committed: threading.Event, go_on: threading.Event
) -> bytes:
    """Read all of `fh` once the paused COMMIT is in SQLite, then let the hop go on."""
    assert await trio.to_thread.run_sync(committed.wait, 10.0)
    try:
        return bytes(await fs.read(fh, 0, 1 << 20))
    finally:
        go_on.set()


async def test_a_file_renamed_over_while_read_is_read_whole(make: Make) -> None:
    """A journaled rename replaces a file open here while a read of it asks the view
    for its extents: the read sees the inode gone from SQLite before the filesystem
    has its snapshot, and must wait for it rather than read holes (zeros)."""
    a = await make(poll_interval=3600, commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    f = await write_file(a.fs, home, b"f", b"old" * 1000)
    await write_file(a.fs, home, b"tmp", b"new" * 1000)
    assert a.fs.leases is not None and a.fs.leases.state.held
    fh, _ = await a.fs.open(f, os.O_RDONLY)
    rows = a.fs.meta.journal_rows
    committed, go_on = pause_after_commit(a.fs)
    async with trio.open_nursery() as n:
        n.start_soon(a.fs.rename, home, b"tmp", home, b"f")
        data = await read_while_paused(a.fs, fh, committed, go_on)
    assert a.fs.meta.journal_rows > rows  # the rename was journaled
    assert data == b"old" * 1000
    assert await read_file(a.fs, home, b"f") == b"new" * 1000
    await a.fs.release(fh)


@pytest.mark.parametrize("leases", [True, False], ids=["format3", "format2"])
async def test_a_file_renamed_over_elsewhere_while_read_is_read_whole(make: Make) -> None:
    """The same with another mount's rename, applied here by a catch-up."""
    a = await make(poll_interval=3600)
    b = await make()
    home = await mkdir(b.fs, ROOT_INO, b"home")
    await write_file(b.fs, home, b"f", b"old" * 1000)
    await write_file(b.fs, home, b"tmp", b"new" * 1000)
    f = (await a.fs.lookup(home, b"f")).ino
    fh, _ = await a.fs.open(f, os.O_RDONLY)
    await b.fs.rename(home, b"tmp", home, b"f")
    committed, go_on = pause_after_commit(a.fs)
    async with trio.open_nursery() as n:
        n.start_soon(a.fs.meta.catch_up)
        data = await read_while_paused(a.fs, fh, committed, go_on)
    assert data == b"old" * 1000
    assert await read_file(a.fs, home, b"f") == b"new" * 1000
    await a.fs.release(fh)


async def test_a_read_from_another_mount_does_not_take_the_domain_for_its_atime(
    make: Make,
) -> None:
    # B reads A's file (relatime makes its access time due): the read recalls A's lease
    # once, and the access time B would commit a second later must not acquire /home
    # for B (A's next change would have to recall it) nor recall it again: on a lease
    # filesystem a mount records access times only where it holds the domain.
    a, b, home = await held_file(make)
    assert await read_file(b.fs, home, b"f") == b"closed on A"
    assert b.fs.leases is not None and b.fs.leases.recalls_sent == 1
    await trio.sleep(2 * ATIME_BATCH + 0.5)  # B's atime committer has run twice
    assert not b.fs.leases.state.held, b.fs.leases.state.held
    assert b.fs.leases.recalls_sent == 1
    # A's own reads still move access times in the domain it holds.
    await write_file(a.fs, home, b"g", b"written again")
    ino = (await a.fs.lookup(home, b"g")).ino
    before = (await a.fs.getattr(ino)).atime
    fh, _ = await a.fs.open(ino, os.O_RDONLY)
    await a.fs.release(fh)
    await trio.sleep(ATIME_BATCH + 0.5)
    assert (await a.fs.getattr(ino)).atime > before


async def test_inode_ranges_are_claimed_ahead_with_no_flush(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once half its inode range is used, a mount claims the next one in an entry of its
    own that waits for no journal flush; the create that uses the range up goes on, as
    a journaled change, with the next number (efsish.meta.inodes). Before, that create
    flushed the journal and committed the claim itself: 200-400 ms at 20 ms."""
    monkeypatch.setattr(inodes, "INO_RANGE", 32)
    a = await make(commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"x")  # claims the first range (a sync create)
    before = len(await entries(a.store))
    for i in range(300):
        await write_file(a.fs, home, b"f%d" % i, b"data")
    with trio.fail_after(5):
        while a.fs.meta._claiming:  # noqa: ASYNC110 (set by the committer task)
            await trio.sleep(0.01)
    new = await entries(a.store)
    ops = [[op.wire()["o"] for op in e.ops] for e in new[before:]]
    assert ops == [["ino"]] * 3, ops  # 32 + 64 + 128 + 256 numbers
    assert a.fs.meta.journal_rows >= 600  # every create and layout is still journaled
    await a.fs.leases.sync()  # type: ignore[union-attr]
    b = await make()
    got = {(await b.fs.lookup(home, b"f%d" % i)).ino for i in range(300)}
    assert len(got) == 300 and await read_file(b.fs, home, b"f299") == b"data"


async def test_a_long_catch_up_lets_local_changes_in_between_entries(
    make: Make, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up applies another mount's entries one by one, and a local change that
    waits for the writer lock meanwhile goes in between two of them, not after all:
    another mount's second of creates held a mount's own creates 40-150 ms."""
    a = await make(poll_interval=3600, nudge="off")
    b = await make(nudge="off")
    mine = await mkdir(a.fs, ROOT_INO, b"a")
    theirs = await mkdir(b.fs, ROOT_INO, b"b")
    await write_file(a.fs, mine, b"first", b"x")  # A takes its domain
    await a.fs.meta.catch_up()
    for i in range(5):  # five entries of B's for A to apply
        await write_file(b.fs, theirs, b"f%d" % i, b"y")
        await b.fs.leases.sync()  # type: ignore[union-attr]
    events: list[str] = []
    done = trio.Event()
    apply_remote = a.fs.meta._apply_remote

    async def create() -> None:
        await write_file(a.fs, mine, b"mine", b"z")  # journaled: needs the writer lock
        events.append("create")
        done.set()

    async def apply(seq: int, blob: bytes, again: bool = False) -> None:
        if not events:
            nursery.start_soon(create)
            await trio.testing.wait_all_tasks_blocked()  # it waits for the lock
        events.append("apply")
        await apply_remote(seq, blob, again)

    monkeypatch.setattr(a.fs.meta, "_apply_remote", apply)
    # As after a nudge naming the head: every entry is fetched at once.
    assert await a.fs.meta.catch_up(upto=len(await entries(a.store))) >= 5
    with trio.fail_after(5):
        await done.wait()
    assert events.count("apply") >= 5
    assert events.index("create") < len(events) - 2, events
    assert await read_file(a.fs, theirs, b"f4") == b"y"


async def test_creates_go_on_while_an_inode_range_is_claimed_ahead(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim ahead holds the writer lock only to plan and record its entry: while
    its PUT is out (a slow store here; at 20 ms with another mount writing, a sync
    commit held journaled creates 90-525 ms through its PUT and lost races), creates
    are journaled and answered."""
    monkeypatch.setattr(inodes, "INO_RANGE", 32)
    a = await make(commit_interval=3600)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"x")  # claims the first range (a sync create)
    a.store.plan = FaultPlan(latency=1.0, ops=frozenset({"put_if_absent"}))  # log PUTs
    n = 0
    while not a.fs.meta._claiming:  # journaled creates, until half the range is used
        await write_file(a.fs, home, b"f%d" % n, b"data")
        n += 1
    assert 10 <= n <= 16
    with trio.move_on_after(0.5) as slow:
        for i in range(n, 30):  # the rest of the range
            await write_file(a.fs, home, b"f%d" % i, b"data")
    if slow.cancelled_caught:
        a.store.plan = FaultPlan()  # (a quick teardown)
        pytest.fail("the creates waited for the claim's 1 s PUT")
    assert a.fs.meta._claiming
    with trio.fail_after(5):
        while a.fs.meta._claiming:  # noqa: ASYNC110 (cleared by the claims task)
            await trio.sleep(0.01)
    a.store.plan = FaultPlan()
    for i in range(30, 40):  # past the first range: the spare, no sync commit
        await write_file(a.fs, home, b"f%d" % i, b"data")
    new = await entries(a.store)
    assert [[op.wire()["o"] for op in e.ops] for e in new if e.kind == "sync"][-1] == ["ino"]
    assert a.fs.meta.journal_rows >= 2 * 40
