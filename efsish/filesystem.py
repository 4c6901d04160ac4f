"""The POSIX facade: what the FUSE adapter calls.

Every method takes plain values (inode numbers, bytes names, a Ctx with the caller's
uid/gid) and returns plain values or raises FsError with an errno. A change is a
planner from efsish.posix (namespace, attrs, xattrs: validated against the view,
returned as log ops) that this module meters and submits through the lease policy
(`_commit`: journaled under a lease, or committed to the log); a read that
close-to-open covers goes through `_read_in` (answered from the view under a valid
lease, else after catch-up and recalls). File data goes through efsish/data/: this
module keeps the table of open files and hands writes to Writeback (buffers, uploads,
the write budget) and reads to Reader; a flush waits for the file's uploads, then
commits the layout posix.attrs plans. The background loops are efsish.housekeeping.

This module must not import pyfuse3 (tests drive it directly) or validate a change
itself (its planner does).

It is longer than the ~600 lines the project aims for: it is the one place where each
of some forty POSIX calls is routed, and most of them read the state it keeps (open
files and handles, snapshots of inodes freed while open or known to the kernel,
attribute changes deferred to a flush, access times due); each method is a few lines
that hand over to posix/, data/ or meta/.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from efsish.data.blocks import BlockIO
from efsish.data.budget import WriteBudget
from efsish.data.cache import BlockCache
from efsish.data.openfile import OpenFile, Snapshot
from efsish.data.reader import Reader
from efsish.data.staged import StagedBlocks
from efsish.data.writeback import Writeback
from efsish.errors import EfsishError, FsError, StoreError, to_errno
from efsish.housekeeping import Housekeeping
from efsish.meta import heartbeat
from efsish.meta.leases import LeaseConfig, Leases
from efsish.meta.log import MetaLog
from efsish.meta.ops import Op
from efsish.meta.planning import PlanContext
from efsish.meta.recovery import load_client_id
from efsish.meta.roreads import RoReads
from efsish.meta.superblock import Superblock
from efsish.meta.view import ROOT_INO, ApplyResult, Attr, View
from efsish.metering import Metering
from efsish.posix import attrs, namespace, xattrs
from efsish.posix.rules import (
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Ctx,
    check_name_len,
)
from efsish.store import ObjectStore

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Ctx",
    "Filesystem",
    "Options",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

VIRTUAL_SIZE = 1 << 50  # statfs: 1 PiB of capacity, like EFS "unlimited"
ATIME_REFRESH_NS = 24 * 3600 * 10**9
ATIME_BATCH = 1.0  # seconds: relatime updates are collected and committed together
METADATA_OP_BYTES = 4096  # EFS meters every metadata operation as 4 KiB


@dataclass
class Options:
    cache_dir: Path
    cache_bytes: int = 10 * 1024**3
    poll_interval: float = 1.0
    heartbeat_interval: float = 2.0
    max_dirty_bytes: int = 256 * 1024**2
    readahead_blocks: int = 2  # initial readahead window of a sequential reader
    readahead_max_bytes: int = 64 * 1024**2  # the window doubles up to this
    atime: bool = True  # relatime (batched); False = noatime
    writeback_interval: float = 5.0  # commit a file's writes at most this long after them
    checkpoint_every: int = 1000
    gc_interval: float = 3600.0
    stats_file: Path | None = None
    prometheus_port: int | None = None
    gc_grace: float = 3600.0
    mountpoint: str = ""
    read_only: bool = False  # writes nothing to the bucket; changes fail with EROFS
    # Lease mode (format-3 filesystems, docs/design/LEASES.md): how late a journaled
    # change reaches the log; `sync`: take no leases (respect others'); whether the
    # daemon holds the cache dir's lock (mount.py), which lets a restart adopt at once;
    # the lease clock (tests inject one; default CLOCK_BOOTTIME).
    commit_interval: float = 1.0
    sync: bool = False
    cache_locked: bool = False
    lease_clock: Callable[[], float] | None = None
    nudge: str = "auto"  # -o nudge= (lease mode): where other mounts nudge this one


class Filesystem:
    """One mount's view of an efsish filesystem. See the module docstring."""

    def __init__(self, store: ObjectStore, sb: Superblock, options: Options) -> None:
        self.store = store
        self.sb = sb
        self.opts = options
        self.block_size = sb.block_size
        cache_dir = Path(options.cache_dir) / sb.fs_uuid
        self.meta = MetaLog(
            store,
            sb,
            cache_dir / "meta.db",
            client_id=load_client_id(cache_dir) if sb.leases else None,
            on_apply=self._on_apply,
            checkpoint_every=options.checkpoint_every,
            read_only=options.read_only,
        )
        self.leases: Leases | None = None
        if sb.leases and not options.read_only:
            cfg = LeaseConfig(
                lease_time=sb.lease_time,
                commit_interval=options.commit_interval,
                acquire=not options.sync,
                nudge=options.nudge,
            )
            if options.lease_clock is not None:
                cfg.clock = options.lease_clock
            self.leases = Leases(self.meta, cfg, cache_dir)
        # -o ro on a lease filesystem: asks holders to flush before reads (LEASES.md §6.4).
        self.roreads: RoReads | None = None
        if sb.leases and options.read_only:
            self.roreads = RoReads(self.meta, options.nudge)
        self.cache = BlockCache(cache_dir / "blocks", options.cache_bytes)
        self.metering = Metering(
            store,
            sb,
            self.meta.client_id,
            options.stats_file,
            options.prometheus_port,
            read_only=options.read_only,
        )
        self.blocks = BlockIO(
            store,
            self.cache,
            checksum=sb.block_checksum,
            client=self.meta.client_id if sb.leases else None,
        )
        self.files: dict[int, OpenFile] = {}
        self.handles: dict[int, int] = {}  # fh -> ino
        self._next_fh = 1
        self._kcache_ok: set[int] = set()
        # Inodes the kernel still knows (lookup counts) and snapshots of those that the
        # log has freed meanwhile ("ghosts"): fstat() on an fd of a removed file, a path
        # resolved before a rename replaced it, still work, as on a local filesystem.
        self.kernel_refs: dict[int, int] = {}
        self._remote_changed: set[int] = set()
        self.ghosts: dict[int, Snapshot] = {}
        # Set by the FUSE adapter: drop the kernel's cached attributes of an inode now
        # (attribute-only, takes no page locks; used by open() for close-to-open).
        self.invalidate_attr: Callable[[int], Awaitable[None]] | None = None
        self.budget = WriteBudget(options.max_dirty_bytes)
        # Blocks of files closed under a lease: staged here, uploaded in the background
        # (LEASES.md §5); counted in the write budget until uploaded.
        self.staged: StagedBlocks | None = None
        if self.leases is not None and not options.sync:
            self.staged = StagedBlocks(cache_dir / "staged", self.blocks, self.budget)
            self.leases.staging = self.staged
        self.writeback = Writeback(
            self.blocks, self.budget, self.files, self.block_size, options.writeback_interval
        )
        self.reader = Reader(
            self.blocks,
            self.meta.extents,
            self.block_size,
            options.readahead_blocks,
            options.readahead_max_bytes,
        )
        self._atime_due: dict[int, int] = {}  # ino -> atime to commit (relatime, batched)
        send, recv = trio.open_memory_channel[tuple[str, int, bytes]](math.inf)
        self._inval_send = send
        self.invalidations = recv  # consumed by the FUSE adapter
        self.housekeeping = Housekeeping(
            store, sb, options, self.meta, self.leases, self.metering, self.held_blocks
        )
        if self.leases is not None:
            self.metering.extra.append(self.housekeeping.lease_metrics)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, nursery: trio.Nursery) -> None:
        self.writeback.start(nursery)
        self.reader.start(nursery)
        if self.staged is not None:
            self.staged.start(nursery)
        await self.meta.open()
        await self.metering.start(nursery, (await self.meta.read(View.stats))[1])
        await nursery.start(self.meta.run)
        nursery.start_soon(self.meta.keep_wal)
        if self.roreads is not None:
            self.roreads.nursery = nursery
        if self.leases is not None:
            await self.leases.start(nursery, self.opts.cache_locked)
            nursery.start_soon(self.meta.run_claims)
        await nursery.start(self.cache.run)
        nursery.start_soon(self.housekeeping.poller)
        nursery.start_soon(self.housekeeping.heartbeat)
        nursery.start_soon(self._atime_committer)
        nursery.start_soon(self.writeback.run, self._flush_file)

    async def shutdown(self) -> None:
        """Flush every open file; the caller cancels the nursery afterwards."""
        for of in list(self.files.values()):
            try:
                await self._flush_file(of)
            except EfsishError as e:
                log.error("could not flush inode %d at shutdown: %s", of.ino, e)
        await self._commit_atimes()
        if self.leases is not None:
            try:
                await self.leases.release_all()
            except EfsishError as e:
                log.error("could not commit the journal at shutdown: %s", e)
        with trio.move_on_after(10):
            await self.cache.drain()  # so that the next mount starts with a warm cache
        try:
            await self.metering.save()
            if not self.opts.read_only:
                await heartbeat.delete(self.store, self.meta.client_id)
        except StoreError:
            pass

    async def write_heartbeat(self) -> None:
        """Publish where this mount is now (see Housekeeping.write_heartbeat)."""
        await self.housekeeping.write_heartbeat()

    def held_blocks(self, limit: int = 10000) -> list[str]:
        """Blocks this mount may still read that the log no longer references: those of
        unlinked-but-open files and uploaded-but-uncommitted writes. gc spares them."""
        keys: set[str] = set()
        for snap in self.ghosts.values():
            keys.update(e.key for e in snap.extents if e.key is not None)
        for of in self.files.values():
            keys |= of.held_keys()
        return sorted(keys)[:limit]

    def remember(self, ino: int, n: int = 1) -> None:
        """The kernel learned about inode `ino` (lookup count + n)."""
        self.kernel_refs[ino] = self.kernel_refs.get(ino, 0) + n

    def kernel_knows(self, ino: int) -> bool:
        """Whether the kernel may hold inode `ino` (and cache its attributes, pages or
        names): the root, or an inode it was told of (`remember`, called before the
        reply is sent) and has not forgotten. An invalidation of any other is a no-op."""
        return ino == ROOT_INO or ino in self.kernel_refs

    def forget(self, ino: int, n: int) -> None:
        """The kernel forgot `ino` n times; drop its ghost once nothing refers to it."""
        left = self.kernel_refs.get(ino, 0) - n
        if left > 0:
            self.kernel_refs[ino] = left
            return
        self.kernel_refs.pop(ino, None)
        # The kernel dropped the inode and its page cache: nothing of it to keep or
        # invalidate (these sets would otherwise grow with every file ever seen).
        self._kcache_ok.discard(ino)
        self._remote_changed.discard(ino)
        if ino not in self.files:
            self.ghosts.pop(ino, None)

    def _on_apply(self, res: ApplyResult, remote: bool) -> None:
        for ino, (attr, extents) in res.freed.items():
            snap = Snapshot(attr, extents)
            of = self.files.get(ino)
            if of is not None and of.orphan is None:
                of.orphan = snap
            if of is not None or self.kernel_refs.get(ino, 0) > 0:
                snap.attr.nlink = 0
                self.ghosts[ino] = snap
        for ino in res.data:
            of = self.files.get(ino)
            if of is not None:
                of.ext_cache.invalidate()
        if not remote:
            return
        for ino in res.data:
            self._kcache_ok.discard(ino)
        self._remote_changed.update(i for i in res.inodes if i in self.kernel_refs)
        for ino in res.inodes:
            of = self.files.get(ino)
            if of is not None:
                of.stale = True
        for ino in res.inodes:
            # An inode this entry created cannot be in the kernel's cache from before.
            if ino not in res.freed and ino not in res.created:
                self._inval_send.send_nowait(("inode", ino, b""))
        for parent, name in res.entries:
            # A directory the kernel does not know has no names cached under it (and
            # another mount's second of creates is ~1,600 names: each queued one costs
            # the adapter's worker a trip through trio's scheduler).
            if self.kernel_knows(parent):
                self._inval_send.send_nowait(("entry", parent, name))

    # ------------------------------------------------------------------- helpers

    def _now(self) -> int:
        return time.time_ns()

    async def _attr(self, ino: int) -> Attr:
        of = self.files.get(ino)
        attr = await self.meta.getattr(ino)
        if attr is None:
            if of is not None and of.orphan is not None:
                attr = replace(of.orphan.attr, nlink=0)
            elif ino in self.ghosts:
                attr = replace(self.ghosts[ino].attr, nlink=0)
            else:
                raise FsError("no such inode", errno.ENOENT)
        return self._overlay(attr)

    def _overlay(self, attr: Attr) -> Attr:
        """`attr` as this mount sees it: with its own unflushed size, mtime and deferred
        attribute changes, and access times not yet committed."""
        of = self.files.get(attr.ino)
        if of is not None:
            if of.modified:
                attr.size = of.size
                attr.mtime = attr.ctime = max(attr.mtime, of.mtime)
            for k, v in of.deferred.items():
                setattr(attr, k, v)
        attr.atime = max(attr.atime, self._atime_due.get(attr.ino, 0))
        return attr

    def _writable(self) -> None:
        """Refuse a change on a read-only mount (the kernel refuses most of them first;
        the metadata log refuses to commit anything as well)."""
        if self.opts.read_only:
            raise FsError("read-only mount", errno.EROFS)

    async def _submit(
        self, planner: Callable[[View, PlanContext], tuple[list[Op], Any]], heavy: bool = False
    ) -> Any:
        await self.metering.acquire("metadata", METADATA_OP_BYTES)
        try:
            return await self._commit(planner, heavy)
        except FsError:
            raise
        except EfsishError as e:
            log.error("metadata commit failed: %s", e)
            raise FsError(str(e), to_errno(e)) from e

    # ------------------------------------------------ lease routing (LEASES.md §6)

    async def _commit(
        self, planner: Callable[[View, PlanContext], tuple[list[Op], Any]], heavy: bool = False
    ) -> Any:
        """A change: through the lease policy on a format-3 filesystem (journaled under
        a lease, or a sync entry, recalling a domain held elsewhere first). `heavy`: its
        transaction may be long (MetaLog.heavy)."""
        if self.leases is not None:
            return await self.leases.submit(planner, heavy)
        return await self.meta.submit(planner)

    async def _read_barrier(self, ino: int, catch_up: bool = True) -> None:
        """Before a read of `ino` (a directory's entries, or an inode): catch up with
        the log, and recall the inode's domains from another mount that holds them.

        When the view says another mount holds one of them, the recall comes first and
        the catch-up only if still needed: the recall's conditional PUT proves the head
        (it lands only on the position after it, and on a conflict the committer reads
        to the head and plans again), and its wait applies the holder's answer. What
        was committed before the read began is then applied, and the domains are read
        again from that view (the inode may have moved). A read that proved nothing
        after it began (it joined a recall already under way, or the holder was gone
        by the time the recall was planned) catches up as usual."""
        lz = self.leases
        if lz is None:
            if self.roreads is not None:
                await self.roreads.barrier(ino, self._catch_up if catch_up else None)
            elif catch_up:
                await self._catch_up()
            return
        begun = self.meta.sends
        recalled: set[int | None] = set()
        caught = not catch_up
        while True:
            held: set[int | None] = set()
            if lz.state.others:
                doms = await self.meta.domains(ino)
                held = {d for d in doms if d is not None and d in lz.state.others}
                held -= recalled
            if held:
                recalled |= held
                await lz.before_read(held)
                continue
            if not caught and self.meta.head_proven <= begun:
                caught = True
                # A share of the top (LEASES.md §17), when this mount may take one, is
                # taken instead: its PUT proves the head as the catch-up's GET would.
                if not await lz.take_share() or self.meta.head_proven <= begun:
                    await self._catch_up()
                continue
            return

    async def _read_in(
        self,
        ino: int,
        answer: Callable[[], Awaitable[T]],
        also: Callable[[T], Awaitable[set[int | None]]] | None = None,
    ) -> T:
        """A read of `ino` (a directory's entries, or an inode) that close-to-open
        covers. When every domain of `ino` is held here with a valid lease, the view is
        the truth (another mount must recall the domain first, which the poll sees): it
        is answered with no request (LEASES.md §6.2), the validity checked after the
        view was read, immediately before the reply. Otherwise, and whenever that check
        fails, it is answered after the read barrier (catch-up, recall) as elsewhere.
        `also(answer)`: further domains the answer depends on (see `lookup`)."""
        lz = self.leases
        if lz is not None and (lz.state.held or lz.share.held) and lz.cfg.acquire:
            doms = await self.meta.domains(ino)  # from memory once the tree was walked
            err: FsError | None = None
            try:
                out = await answer()
                if also is not None:
                    doms = doms | await also(out)
            except FsError as e:  # ENOENT, ENOTDIR...: answers too
                err = e
            if lz.may_read_locally(doms):  # no await between this and the reply
                if err is not None:
                    raise err
                return out
        await self._read_barrier(ino)
        return await answer()

    async def fsyncdir(self) -> None:
        """fsync of a directory: under leases, wait until the journal is in the log."""
        if self.leases is not None:
            await self.leases.sync()

    # -------------------------------------------------------------------- lookups

    async def lookup(self, parent: int, name: bytes) -> Attr:
        check_name_len(name)
        await self.metering.acquire("metadata", METADATA_OP_BYTES)
        if name == b"..":
            # A read of the directory that holds `parent`'s name (for a domain root, the
            # top): who that is can change only by a change there.
            async def up() -> Attr:
                p = await self.meta.read(View.parent_of, parent)
                return await self._attr(p or ROOT_INO)

            p0 = await self.meta.read(View.parent_of, parent)
            return await self._read_in(p0 or ROOT_INO, up)

        async def answer() -> Attr:
            if name == b".":
                return await self._attr(parent)
            attr = await self.meta.lookup(parent, name)
            if attr is None:
                raise FsError("no such entry", errno.ENOENT)
            return self._overlay(attr)

        return await self._read_in(parent, answer, self._free_root)

    async def _free_root(self, attr: Attr) -> set[int | None]:
        """{the domain} when `attr` is the root of a domain nobody holds: a lookup of it
        in the top answered under a share (LEASES.md §17) would show attributes (nlink,
        mtime) that a sync change of another mount may have changed; it catches up. A
        domain held here is read locally; one held elsewhere shows them as §3 allows."""
        lz = self.leases
        if lz is None or not attr.is_dir:
            return set()
        d = attr.ino
        if d in lz.state.held or d in lz.state.others:
            return set()
        return {d} if await self.meta.domains(d) == {d} else set()

    async def dotdot(self, ino: int) -> Attr:
        """The ".." entry of a listing of directory `ino`: its parent, from the view with
        no read barrier. The listing's opendir was the barrier, and the kernel keeps only
        the inode number of a listing's ".." (READDIRPLUS ignores the attributes of "."
        and ".."). A lookup of ".." still catches up: the parent of a domain root is in
        the top."""
        p = await self.meta.read(View.parent_of, ino)
        return await self._attr(p or ROOT_INO)

    async def _catch_up(self) -> None:
        try:
            await self.meta.catch_up()
        except EfsishError as e:
            # Serve from the view we have; the poller keeps trying.
            log.warning("catch-up failed, serving possibly stale metadata: %s", e)

    async def getattr(self, ino: int) -> Attr:
        # A stat of a domain root nobody holds catches up: under a share of the top
        # (LEASES.md §17) the path walk to it no longer did.
        catch = False
        lz = self.leases
        if lz is not None and lz.share.held:
            attr = await self._attr(ino)
            catch = bool(await self._free_root(attr))
            if not catch and not lz.state.others:
                return attr  # no barrier to pass: the attributes just read are the answer
        await self._read_barrier(ino, catch_up=catch)
        return await self._attr(ino)

    async def readlink(self, ino: int) -> bytes:
        attr = await self._attr(ino)
        if not stat.S_ISLNK(attr.mode) or attr.target is None:
            raise FsError("not a symlink", errno.EINVAL)
        return bytes(attr.target)

    # --------------------------------------------------------------- create/remove

    async def mknod(
        self,
        parent: int,
        name: bytes,
        mode: int,
        ctx: Ctx,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Attr:
        attr: Attr = await self._submit(namespace.mknod(parent, name, mode, ctx, rdev, target))
        return self._overlay(attr)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return await self.mknod(parent, name, stat.S_IFDIR | (mode & 0o7777), ctx)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        return await self.mknod(parent, name, stat.S_IFLNK | 0o777, ctx, target=target)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        attr: Attr = await self._submit(namespace.link(ino, parent, name))
        return self._overlay(attr)

    async def unlink(self, parent: int, name: bytes) -> None:
        heavy = self.meta.heavy(entry=(parent, name))
        await self._submit(namespace.remove(parent, name, want_dir=False), heavy)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._submit(namespace.remove(parent, name, want_dir=True))

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int = 0) -> None:
        heavy = self.meta.heavy(entry=(dp, dn))  # a replaced file
        await self._submit(namespace.rename(sp, sn, dp, dn, flags), heavy)

    # ------------------------------------------------------------------- setattr

    async def setattr(
        self,
        ino: int,
        ctx: Ctx,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime: int | None = None,
        mtime: int | None = None,
        fh: int | None = None,
    ) -> Attr:
        self._writable()
        ch = attrs.Change(mode, uid, gid, size, atime, mtime)
        of = self.files.get(ino)
        if size is not None:
            if size < 0:
                raise FsError("negative size", errno.EINVAL)
            if of is not None:
                await self._flush_file(of)
        if of is not None and of.orphan is not None:
            return await self._orphan_setattr(of, ch)

        if size is None and of is not None and of.modified and of.orphan is None:
            current = await self._attr(ino)
            if of.modified and of.orphan is None and not of.flush_lock.locked():
                # The file has unflushed writes here: commit this change with them (one
                # log entry instead of one per call: tar, cp -p and rsync set owner,
                # mode and times on every file they write). Other mounts see it at
                # close, like the data; a crash loses it only together with the data.
                changes = attrs.attr_changes(current, ch)
                changes["ctime"] = self._now()
                of.deferred.update(changes)
                if mtime is not None:
                    of.mtime = mtime
                return self._overlay(current)

        try:
            heavy = size is not None and self.meta.heavy(size, ino=ino)
            attr: Attr = await self._submit(attrs.setattr_plan(ino, ch), heavy)
        except FsError as e:
            if e.errno == errno.ENOENT and of is not None and of.orphan is not None:
                # Another mount unlinked the open file while this change was on its way
                # (the log position it planned for held the unlink): it now lives here.
                return await self._orphan_setattr(of, ch)
            raise
        if size is not None and of is not None:
            self.budget.truncate(of.dirty, size)
            of.size = size
        if mtime is not None and of is not None:
            of.mtime = mtime
        return self._overlay(attr)

    async def _orphan_setattr(self, of: OpenFile, ch: attrs.Change) -> Attr:
        """setattr of a file unlinked while open: it lives only on this mount until its
        last close, so the change is made to its snapshot here (ftruncate, fchmod,
        futimens on such a descriptor work, as on a local filesystem)."""
        assert of.orphan is not None
        a = of.orphan.attr
        now = self._now()
        if ch.size is not None:
            await of.truncate_unlinked(ch.size, self.budget)
            if of.ino in self.ghosts:
                self.ghosts[of.ino] = of.orphan
            of.size = a.size = ch.size
            a.mtime = of.mtime = now
        for k, v in attrs.attr_changes(a, ch).items():
            setattr(a, k, v)
        if ch.mtime is not None:
            of.mtime = ch.mtime
        a.ctime = now
        return await self._attr(of.ino)

    # ------------------------------------------------------------------ directory

    async def opendir(self, ino: int) -> None:
        a = await self._read_in(ino, lambda: self._attr(ino))
        if not a.is_dir:
            raise FsError("not a directory", errno.ENOTDIR)

    async def readdir(
        self, ino: int, after: int, limit: int = 1000
    ) -> list[tuple[int, bytes, Attr]]:
        """Up to `limit` entries of directory `ino` after cursor `after`, with their
        attributes (one query; the memo keeps them for the lookups and getattrs that
        follow a listing)."""
        overlay = self._overlay
        return [
            (c, name, overlay(a)) for c, name, a, _ in await self.meta.readdir(ino, after, limit)
        ]

    # ------------------------------------------------------------------ xattrs

    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Ctx, flags: int = 0) -> None:
        await self._submit(xattrs.setxattr(ino, name, value, flags))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        await self._attr(ino)
        v = await self.meta.getxattr(ino, name)
        if v is None:
            raise FsError("no such xattr", errno.ENODATA)
        return v

    async def listxattr(self, ino: int, ctx: Ctx) -> list[bytes]:
        await self._attr(ino)
        names: list[bytes] = await self.meta.read(View.listxattr, ino)
        return xattrs.listed(names, ctx)

    async def removexattr(self, ino: int, name: bytes, ctx: Ctx) -> None:
        await self._submit(xattrs.removexattr(ino, name, ctx))

    # -------------------------------------------------------------------- statfs

    async def statfs(self) -> dict[str, int]:
        ninodes, used = await self.meta.read(View.stats)
        bsize = 4096
        total = VIRTUAL_SIZE // bsize
        files = 1 << 40
        return {
            "bsize": bsize,
            "frsize": bsize,
            "blocks": total,
            "bfree": max(0, total - (used + bsize - 1) // bsize),
            "files": files,
            "ffree": files - ninodes,
            "namemax": NAME_MAX,
        }

    # ------------------------------------------------------------------ open files

    async def open(self, ino: int, flags: int, ctx: Ctx | None = None) -> tuple[int, bool]:
        """Open a file; return (fh, keep_cache)."""
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        attr = await self._read_in(ino, lambda: self._attr(ino))
        if attr.is_dir:
            raise FsError("is a directory", errno.EISDIR)
        keep = ino in self._kcache_ok
        if ino in self._remote_changed and self.invalidate_attr is not None:
            self._remote_changed.discard(ino)
            # Another mount changed the file since the kernel cached it: make the kernel
            # ask for the new size before it reads (close-to-open).
            await self.invalidate_attr(ino)
        if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY and attr.size:
            attr = await self.setattr(ino, ctx or Ctx(), size=0)
            keep = False
        of = self.files.get(ino)
        if of is None:
            of = self.files[ino] = OpenFile(ino, attr.size, attr.mtime)
            if ino in self.ghosts:
                of.orphan = self.ghosts[ino]
        elif not of.modified and of.orphan is None:
            of.size, of.mtime, of.stale = attr.size, attr.mtime, False
        of.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = ino
        self._kcache_ok.add(ino)
        if (
            self.opts.atime
            and not self.opts.read_only
            and (flags & os.O_ACCMODE) == os.O_RDONLY
            and (attr.atime <= attr.mtime or attr.atime < time.time_ns() - ATIME_REFRESH_NS)
        ):
            self._atime_due[ino] = time.time_ns()
        return fh, keep

    async def _atime_committer(self) -> None:
        while True:
            await trio.sleep(ATIME_BATCH)
            await self._commit_atimes()

    async def _commit_atimes(self) -> None:
        """Commit the access times that reads made due (relatime) as one log entry. They
        are advisory: batching them keeps reads from costing a commit each, and a crash
        loses at most the last second of them."""
        if not self._atime_due:
            return
        due, self._atime_due = self._atime_due, {}
        lz = self.leases
        if lz is not None:
            # On a lease filesystem only where this mount holds the domain (or in the
            # top): an access time alone must not take a subtree from the mount that
            # writes it, nor recall it (LEASES.md §16).
            held = lz.state.held
            for ino in list(due):
                try:
                    doms = await self.meta.domains(ino)
                except EfsishError:
                    doms = {-1}  # gone or unreadable: no update
                if not all(d is None or d in held for d in doms):
                    del due[ino]
            if not due:
                return
        try:
            await self._commit(attrs.atimes(due), self.meta.heavy(ops=len(due)))
        except EfsishError as e:
            log.debug("atime update of %d files failed: %s", len(due), e)
        except Exception:
            log.exception("atime update of %d files crashed", len(due))

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[int, Attr]:
        attr = await self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), ctx)
        of = self.files.get(attr.ino)
        if of is None:
            of = self.files[attr.ino] = OpenFile(attr.ino, 0, attr.mtime)
        of.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = attr.ino
        self._kcache_ok.add(attr.ino)
        return fh, attr

    def _file(self, fh: int) -> OpenFile:
        ino = self.handles.get(fh)
        if ino is None or ino not in self.files:
            raise FsError("bad file handle", errno.EBADF)
        return self.files[ino]

    async def write(self, fh: int, off: int, data: bytes) -> int:
        of = self._file(fh)
        self._writable()
        await self.metering.acquire("write", len(data))
        await self.writeback.write(of, off, data)
        return len(data)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        try:
            return await self._read(fh, off, size)
        except FsError as e:
            if not self.opts.read_only or e.errno != errno.EIO:
                raise
            # gc does not wait for a read-only mount (it publishes no heartbeat): a view
            # that fell behind by more than gc's grace period may name blocks that are
            # gone. Catch up and read once more from the file's current layout.
            seq = self.meta.applied_seq
            await self._catch_up()
            if self.meta.applied_seq == seq:
                raise
            ino = self._file(fh).ino
            log.warning("read of inode %d failed (%s); reading again after catch-up", ino, e)
            return await self._read(fh, off, size)

    async def _read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        of = self._file(fh)
        await self.metering.acquire("read", size)
        if of.stale and not of.modified and of.orphan is None:
            fresh = await self.meta.read(View.getattr, of.ino)
            if fresh is not None:
                of.size, of.mtime = fresh.size, fresh.mtime
            of.stale = False
        return await self.reader.read(of, off, size)

    async def flush(self, fh: int) -> None:
        await self._flush_file(self._file(fh))

    async def fsync(self, fh: int) -> None:
        await self._flush_file(self._file(fh))
        if self.leases is not None:
            await self.leases.sync()

    async def _flush_file(self, of: OpenFile) -> None:
        """Upload dirty data and commit the new layout; return when durable."""
        async with of.flush_lock:
            if of.orphan is not None:
                return  # unlinked while open: data lives here until the last close
            await self.writeback.upload_all(of, await self._staging_for(of))
            if not of.modified:
                return
            pend = list(of.pending)
            size, mtime = of.size, of.mtime
            deferred = dict(of.deferred)
            heavy = self.meta.heavy(size, len(pend))
            await self._submit(attrs.layout(of.ino, pend, size, mtime, deferred), heavy)
            if of.orphan is not None:
                # Another mount unlinked the file while this commit was on its way: it
                # committed nothing, and the file now lives here, its snapshot from
                # before these extents. Keep them as layers over it, or reads would
                # return the snapshot's old bytes.
                return
            of.committed(pend, deferred)

    async def _staging_for(self, of: OpenFile) -> StagedBlocks | None:
        """Where a flush of `of` puts what it has not uploaded: staged (uploaded in the
        background) when its change will be journaled, i.e. every domain of the file
        is held here with a valid lease (LEASES.md §5); None: upload it now."""
        lz, st = self.leases, self.staged
        if lz is None or st is None or not of.dirty or not lz.state.held:
            return None
        return st if lz.may_journal(await self.meta.domains(of.ino)) else None

    async def release(self, fh: int) -> None:
        ino = self.handles.pop(fh, None)
        if ino is None:
            return
        of = self.files.get(ino)
        if of is None:
            return
        of.opens -= 1
        if of.opens > 0:
            return
        try:
            if of.modified and of.orphan is None:
                await self._flush_file(of)
        finally:
            if of.opens == 0:
                self.budget.drop(of.dirty)
                del self.files[ino]
                if self.kernel_refs.get(ino, 0) <= 0:
                    self.ghosts.pop(ino, None)
