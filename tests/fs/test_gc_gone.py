"""gc and a client gone for good (docs/design/LEASES.md §9, last case) below FUSE: a
mount killed with a journal, a lease and staged blocks, whose heartbeat is days old, is
taken over by `efsish gc` (run_gc, with an injected lease clock), which then trims the
log past it and sweeps its blocks; when it comes back it finds itself fenced and writes
its recovery directory. In-process mounts of a format-3 filesystem on a memory store
(the fixtures of test_leases.py)."""

from __future__ import annotations

import errno
import io
import os
import time

import pytest
import trio

from efsish.errors import FsError, UsageError
from efsish.filesystem import Filesystem
from efsish.fsck import run_fsck
from efsish.gc import parse_duration, run_gc
from efsish.meta import heartbeat
from efsish.meta.ops import LDirty, LRec, LTko
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from tests.fs import test_leases
from tests.fs.test_leases import Make, entries, mkdir, read_file, write_file

# The fixtures of test_leases.py.
store, leases, lease_time, sb, make = (
    test_leases.store,
    test_leases.leases,
    test_leases.lease_time,
    test_leases.sb,
    test_leases.make,
)

SIZE = 64 * 1024  # one block (the fixtures format with 64 KiB blocks), not inline
DAYS = 86400 * 10**9


class Jumps:
    """gc's lease clock: each reading is 2 x lease_time after the one before, so the
    takeover wait passes without real waiting."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def data_keys(store: ObjectStore) -> set[str]:
    return {i.key async for i in store.list("data/")}


async def log_seqs(store: ObjectStore) -> list[int]:
    return sorted([int(i.key.split("/")[1]) async for i in store.list("log/")])


async def gone_for_days(make: Make, store: ObjectStore) -> tuple[str, int, int, str, bytes]:
    """A mount on cache dir "keep" holds /home, has answered /home/f (one staged block,
    uploaded, named only by its journal), publishes its heartbeat and is killed. gc
    runs three days later (`gc`'s wall clock; the heartbeat is aged as well, since the
    other mounts and gc's trimming judge heartbeats by the real clock). Returns
    (client, /home's inode, the position its heartbeat published, the block's key,
    f's data)."""
    m = await make(cache="keep", commit_interval=3600)
    home = await mkdir(m.fs, ROOT_INO, b"home")
    await write_file(m.fs, home, b"first", b"")
    data = os.urandom(SIZE)
    await write_file(m.fs, home, b"f", data)
    assert m.fs.staged is not None and m.fs.leases is not None
    await m.fs.staged.wait_all()
    (key,) = await data_keys(store)
    assert m.fs.meta.journal_rows > 0 and m.fs.leases.state.held
    await m.fs.write_heartbeat()
    me = m.fs.meta.client_id
    hb = await heartbeat.read(store, me)
    assert hb is not None
    m.scope.cancel()  # kill -9, and the machine never comes back
    await trio.sleep(0.01)
    hb.t -= 3 * DAYS
    await heartbeat.write(store, hb)
    return me, home, hb.applied_seq, key, data


async def others_move_on(make: Make, checkpoint: bool) -> Filesystem:
    """Another mount commits changes in the top (and checkpoints, so gc may trim)."""
    g = (await make()).fs
    for i in range(5):
        await mkdir(g, ROOT_INO, b"d%d" % i)
    if checkpoint:
        assert await g.meta.write_checkpoint() > 0
    await mkdir(g, ROOT_INO, b"tail")
    return g


async def gc(store: ObjectStore, **opts: object) -> list[str]:
    """`efsish gc` three days from now (its wall clock), its lease clock `Jumps`."""
    out = io.StringIO()
    opts.setdefault("wall", lambda: time.time_ns() + 3 * DAYS)
    opts.setdefault("dry_run", False)
    opts.setdefault("clock", Jumps(2 * test_leases.LEASE_TIME))
    code = await run_gc(
        store,
        grace=0,
        progress=False,
        out=out,
        orphan_age=0,
        **opts,  # type: ignore[arg-type]
    )
    assert code == 0
    return out.getvalue().splitlines()


async def read_path(fs: Filesystem, path: str) -> int:
    ino = ROOT_INO
    for part in path.strip("/").split("/"):
        ino = (await fs.lookup(ino, part.encode())).ino
    return ino


@pytest.mark.parametrize("trimmed", [True, False], ids=["log-trimmed", "log-kept"])
async def test_gc_takes_over_a_gone_client_and_it_recovers_when_back(
    make: Make, store: ObjectStore, trimmed: bool
) -> None:
    me, home, published, key, data = await gone_for_days(make, store)
    g = await others_move_on(make, checkpoint=trimmed)
    lines = await gc(store)
    took = [x for x in lines if "took over lease domain /home" in x]
    assert len(took) == 1 and me in took[0] and "3.0 days old" in took[0], lines
    assert any("cleared the journal mark" in x and me in x for x in lines), lines
    log = await entries(store) if not trimmed else []
    # The takeover and the cleared mark are in the log, written by gc; every mount
    # applies them: /home is FREE, and the gone client is no longer dirty.
    await g.meta.catch_up()
    assert (await g.meta.read(lambda v: v.lease(home)))[0] is None
    session = await g.meta.read(lambda v: v.session(me))
    assert session is not None and session[2] is None
    if trimmed:
        assert (await log_seqs(store))[0] > published + 1  # trimming passed it
    else:
        kinds = [type(op) for e in log if e.client == "gc" for op in e.ops]
        assert LRec in kinds and LTko in kinds and LDirty in kinds
    assert key not in await data_keys(store)  # its block is an ordinary orphan now

    # It comes back with its cache dir: fenced, its journal goes to recovery.
    a2 = (await make(cache="keep")).fs
    assert a2.leases is not None
    (path,) = a2.leases.recovered
    with pytest.raises(FsError) as e:
        await g.lookup(home, b"f")  # nothing of that journal applied to the tree
    assert e.value.errno == errno.ENOENT
    b = (await make()).fs
    rdir = await read_path(b, path)
    rhome = (await b.lookup(rdir, b"home")).ino
    with trio.fail_after(10):
        assert await read_file(b, rhome, b"f") == data  # the staged block went up again
        assert b"f" in await read_file(b, rdir, b"JOURNAL.txt")
    assert await run_fsck(store, verify_data=True) == 0


async def test_gc_leaves_a_holder_that_answers_alone(make: Make, store: ObjectStore) -> None:
    """A heartbeat days old but a holder that still runs: it answers gc's recall within
    the takeover wait, so gc takes nothing over and keeps its journal mark."""
    m = await make(commit_interval=3600)
    home = await mkdir(m.fs, ROOT_INO, b"home")
    await write_file(m.fs, home, b"f", b"answered")
    me = m.fs.meta.client_id
    await m.fs.write_heartbeat()  # then none for three days (gc's wall clock)
    with trio.fail_after(20):
        lines = await gc(store, clock=test_leases.Clock())  # really waits (2 x 0.5 s)
    assert any("alone" in x and me in x for x in lines), lines
    assert not any("took over" in x or "cleared" in x for x in lines), lines
    assert not [op for e in await entries(store) for op in e.ops if isinstance(op, LTko)]
    session = await m.fs.meta.read(lambda v: v.session(me))
    assert session is not None and session[2] is not None  # still dirty: it runs
    b = (await make()).fs
    with trio.fail_after(10):
        assert await read_file(b, home, b"f") == b"answered"


async def test_gc_waits_for_the_takeover_time_on_its_own_clock(
    make: Make, store: ObjectStore
) -> None:
    """With gc's lease clock standing still, no takeover comes however long it runs;
    once the clock shows 2 x lease_time since its recall landed, it takes over."""
    await gone_for_days(make, store)
    now = [0.0]
    done = trio.Event()

    async def run() -> None:
        await gc(store, clock=lambda: now[0])
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(run)
        await trio.sleep(4 * test_leases.LEASE_TIME + 1.0)  # real time: twice the wait
        logged = await entries(store)
        assert any(isinstance(op, LRec) for e in logged for op in e.ops)
        assert not any(isinstance(op, LTko) for e in logged for op in e.ops)
        now[0] = 2 * test_leases.LEASE_TIME
        with trio.fail_after(10):
            await done.wait()
    assert any(isinstance(op, LTko) for e in await entries(store) for op in e.ops)


async def test_dry_run_only_reports(make: Make, store: ObjectStore) -> None:
    me, home, _, key, _ = await gone_for_days(make, store)
    before = len(await entries(store))
    lines = await gc(store, dry_run=True)
    assert any("would take over lease domain /home" in x and me in x for x in lines), lines
    assert any("would clear the journal mark" in x for x in lines), lines
    assert len(await entries(store)) == before  # nothing committed
    assert key in await data_keys(store)
    g = (await make()).fs
    assert (await g.meta.read(lambda v: v.lease(home)))[0] is not None


async def test_a_recent_heartbeat_is_not_gone(make: Make, store: ObjectStore) -> None:
    me, *_ = await gone_for_days(make, store)
    lines = await gc(store, gone_after=4 * 86400.0)  # its heartbeat is 3 days old
    assert not any(me in x for x in lines), lines


def test_gone_after_takes_durations_and_refuses_nonsense() -> None:
    assert parse_duration("1d") == 86400.0
    assert parse_duration("12h") == 12 * 3600.0
    assert parse_duration("30m") == 1800.0
    assert parse_duration(" 7200 ") == 7200.0
    for bad in ("", "x", "1w", "-1d", "nan", "inf", "60", "1m"):
        with pytest.raises(UsageError) as e:
            parse_duration(bad)
        assert "--gone-after" in str(e.value) and "\n" not in str(e.value)


async def test_without_a_heartbeat_its_newest_log_entry_tells_its_age(
    make: Make, store: ObjectStore
) -> None:
    me, home, *_ = await gone_for_days(make, store)
    await heartbeat.delete(store, me)
    assert not any(me in x for x in await gc(store, wall=time.time_ns))  # seconds old
    lines = await gc(store)  # three days later
    assert any("took over" in x and "no heartbeat" in x and me in x for x in lines), lines
    g = (await make()).fs
    assert (await g.meta.read(lambda v: v.lease(home)))[0] is None
