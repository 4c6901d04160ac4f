"""What a change costs the daemon under a held lease (issue 20: metadata at local speed):
worker-thread hops per change, counted in process, and the SQLite statements of one. A
hop (trio.to_thread) costs a journaled change as much as its own work, so a journaled
change makes none and the counts are pinned here."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import trio

from efsish.filesystem import Filesystem
from efsish.meta import log
from efsish.meta.view import ROOT_INO
from tests.fs.conftest import FsFactory
from tests.fs.helpers import ROOT


class Hops:
    """Counts the worker-thread hops (trio.to_thread.run_sync, and the writer's own,
    efsish.meta.log.in_thread) by the function run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by: Counter[str] = Counter()
        for owner, name in ((trio.to_thread, "run_sync"), (log, "in_thread")):
            monkeypatch.setattr(owner, name, self._counted(getattr(owner, name)))

    def _counted(self, real: Any) -> Any:
        async def counted(fn: Any, *args: Any, **kw: Any) -> Any:
            self.by[getattr(fn, "__qualname__", repr(fn))] += 1
            return await real(fn, *args, **kw)

        return counted

    def take(self) -> Counter[str]:
        out, self.by = self.by, Counter()
        return out


async def create(fs: Filesystem, d: int, name: bytes) -> int:
    fh, attr = await fs.create(d, name, 0o644, os.O_WRONLY, ROOT)
    await fs.write(fh, 0, b"x" * 100)
    await fs.release(fh)
    return attr.ino


async def test_a_journaled_create_or_unlink_costs_no_hop(
    make_fs: FsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a held lease, the kernel's lookup before an unlink and the lease domains
    of the directory and of a new file come from memory, and a journaled commit runs
    its transaction on the trio thread: a create+write+close (the create, the layout
    at close) and an unlink make no worker-thread hop."""
    fs = await make_fs(commit_interval=3600)
    d = (await fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    for i in range(3):  # takes the lease, walks the tree
        await create(fs, d, b"w%d" % i)
    assert fs.leases is not None and d in fs.leases.state.held
    hops = Hops(monkeypatch)
    for i in range(10):
        await create(fs, d, b"f%d" % i)
    assert hops.take() == {}
    for i in range(10):
        await fs.lookup(d, b"f%d" % i)
        await fs.unlink(d, b"f%d" % i)
    assert hops.take() == {}
    assert fs.meta.journal_rows > 0  # all of it journaled, none of it committed yet


async def test_a_journaled_unlink_reads_what_it_needs_once(make_fs: FsFactory) -> None:
    """The planning of a journaled unlink runs each SQLite statement it needs: the
    domains the op touches and the directories that may gain or lose domain roots are
    read once, for the claim and for the fencing check at apply (a file's removal
    moves no subtree), not once more at apply. The statements are pinned here: each
    costs the change a few microseconds of CPU."""
    fs = await make_fs(commit_interval=3600)
    d = (await fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    for i in range(13):
        await create(fs, d, b"f%d" % i)
    assert fs.leases is not None and d in fs.leases.state.held
    await fs.unlink(d, b"f12")  # the first unlink in the directory, not counted
    seen: Counter[str] = Counter()
    fs.meta.writer.db.set_trace_callback(lambda sql: seen.update([sql.split(" WHERE")[0]]))
    try:
        for i in range(10):
            await fs.lookup(d, b"f%d" % i)
            await fs.unlink(d, b"f%d" % i)
    finally:
        fs.meta.writer.db.set_trace_callback(None)
    assert fs.meta.journal_rows > 0  # journaled, none of it committed yet
    assert seen["SELECT DISTINCT parent FROM dentries"] == 10
    assert seen["SELECT ino FROM dentries"] == 4 * 10  # plan, touches, apply, memo
    # The directory's parents, its domain's lease and the journal counter are kept in
    # memory by the writer (View.keep_rows), not read again for every change.
    for kept in (
        "SELECT parent FROM dentries",
        "SELECT holder_client, holder_inc, epoch FROM leases",
        "SELECT value FROM meta",
    ):
        assert seen[kept] == 0, kept
    assert seen.total() == 22 * 10, seen


def queued(fs: Filesystem) -> list[tuple[str, int, bytes]]:
    """The kernel invalidations `fs` has queued for the FUSE adapter (taken)."""
    out = []
    while True:
        try:
            out.append(fs.invalidations.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_a_remote_batch_invalidates_no_inode_it_created(make_fs: FsFactory) -> None:
    """Applying another mount's batch of creates queues kernel invalidations of the
    directory and of the new names (a negative entry may be cached), but none of the
    new inodes: the kernel cannot hold one from before it existed, and each inode
    invalidation is a worker-thread hop in the adapter. Nor names in a directory the
    kernel does not know: it has none of them cached."""
    a = await make_fs(commit_interval=3600)
    b = await make_fs()
    d = (await a.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    await create(a, d, b"first")  # a sync entry: takes the lease
    assert a.leases is not None
    await a.leases.sync()
    await b.meta.catch_up()
    queued(b)
    new = [await create(a, d, b"f%d" % i) for i in range(5)]
    await a.leases.sync()  # one journaled batch
    await b.meta.catch_up()
    assert not [x for x in queued(b) if x[0] == "entry"]  # B's kernel never saw d
    b.remember(d)
    new += [await create(a, d, b"g%d" % i) for i in range(5)]
    await a.leases.sync()
    await b.meta.catch_up()
    got = queued(b)
    assert ("inode", d, b"") in got
    assert {("entry", d, b"g%d" % i) for i in range(5)} <= set(got)
    assert not [x for x in got if x[0] == "inode" and x[1] in new]
    # Once the kernel knows one, a remote change of it is invalidated.
    b.remember(new[0])
    assert b.kernel_knows(new[0]) and not b.kernel_knows(new[1])
    await a.setattr(new[0], ROOT, mode=0o600)
    await a.leases.sync()
    await b.meta.catch_up()
    assert ("inode", new[0], b"") in queued(b)
    b.forget(new[0], 1)
    assert not b.kernel_knows(new[0]) and b.kernel_knows(ROOT_INO)


async def test_the_adapter_sends_invalidations_only_for_what_the_kernel_knows(
    make_fs: FsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FUSE adapter's invalidation worker skips inodes (and, for a name, the
    directories) the kernel does not know when it comes to them. There is no kernel in
    process: pyfuse3's two notification calls are replaced by recorders."""
    import pyfuse3

    from efsish.fuse_ops import FuseOps

    fs = await make_fs()
    sent: list[tuple[str, int]] = []
    four = trio.Event()

    def record(kind: str, ino: int) -> None:
        sent.append((kind, ino))
        if len(sent) == 4 and kind == "e":
            four.set()  # entries are sent from the trio thread, inodes from a worker

    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only: record("i", ino))
    monkeypatch.setattr(
        pyfuse3,
        "invalidate_entry_async",
        lambda parent, name, ignore_enoent=False: record("e", parent),
    )
    ops = FuseOps(fs)
    fs.remember(7)
    for item in (("inode", 7, b""), ("inode", 8, b""), ("inode", ROOT_INO, b"")):
        fs._inval_send.send_nowait(item)
    for item in (("entry", 7, b"x"), ("entry", 8, b"y"), ("entry", ROOT_INO, b"z")):
        fs._inval_send.send_nowait(item)
    async with trio.open_nursery() as n:
        n.start_soon(ops.invalidation_worker)
        with trio.fail_after(5):
            await four.wait()  # the last item queued is the fourth to be sent
        n.cancel_scope.cancel()
    assert sent == [("i", 7), ("i", ROOT_INO), ("e", 7), ("e", ROOT_INO)]


async def test_a_journaled_change_of_a_huge_file_keeps_its_hop(
    make_fs: FsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction of a change whose rows scale with a file's size (its layout, its
    removal, its truncation, for a file of HEAVY_BYTES or more) runs in a worker thread,
    not on the trio thread where it would hold up every request and the lease renewals;
    a small file's do not (previous test)."""
    fs = await make_fs(commit_interval=3600)
    d = (await fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    await create(fs, d, b"w")  # takes the lease
    assert fs.leases is not None and d in fs.leases.state.held
    hops = Hops(monkeypatch)
    fh, attr = await fs.create(d, b"big", 0o644, os.O_WRONLY, ROOT)
    await fs.write(fh, log.HEAVY_BYTES, b"x")  # sparse: one block, a huge size
    await fs.release(fh)
    assert hops.take()["MetaLog._plan_local"] == 1  # the layout; the create inline
    await fs.setattr(attr.ino, ROOT, size=2 * log.HEAVY_BYTES)
    assert hops.take()["MetaLog._plan_local"] == 1
    await fs.lookup(d, b"big")
    await fs.unlink(d, b"big")
    assert hops.take()["MetaLog._plan_local"] == 1
    assert fs.meta.journal_rows > 0  # journaled, as the small ones
