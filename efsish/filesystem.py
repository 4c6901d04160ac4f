"""POSIX semantics over the metadata log and immutable data blocks.

Filesystem is what the FUSE adapter calls: every method takes plain values (inode numbers,
bytes names, a Ctx with the caller's uid/gid) and returns plain values or raises FsError
with an errno. Metadata changes are planners submitted to the MetaLog (validated against
the view, committed as log ops). File data goes through efsish/data/: this module keeps
the table of open files and hands writes to Writeback (buffers, uploads, the write
budget) and reads to Reader; a flush waits for the file's uploads, then commits its new
layout here, planned like any other change.

This module must not import pyfuse3; tests drive it directly.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from efsish import __version__, acl
from efsish.acl import ACL_ACCESS, ACL_DEFAULT
from efsish.data.blocks import BlockIO
from efsish.data.budget import WriteBudget
from efsish.data.cache import BlockCache
from efsish.data.openfile import OpenFile, Snapshot
from efsish.data.reader import Reader
from efsish.data.staged import StagedBlocks
from efsish.data.writeback import Writeback
from efsish.errors import EfsishError, FsError, StoreError, to_errno
from efsish.gc import collect as gc_collect
from efsish.meta import heartbeat
from efsish.meta.leases import LeaseConfig, Leases, domain_paths, load_client_id
from efsish.meta.log import MetaLog
from efsish.meta.ops import Ln, Mk, Mv, Op, RemoveXattr, Rm, SetAttr, SetXattr, Write
from efsish.meta.planning import PlanContext
from efsish.meta.superblock import NEWEST_FORMAT, Superblock
from efsish.meta.view import ROOT_INO, ApplyResult, Attr, View
from efsish.metering import Metering
from efsish.store import ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")

NAME_MAX = 255
SYMLINK_MAX = 4095  # PATH_MAX - 1, as Linux filesystems (the kernel refuses longer ones)
LINK_MAX = 177  # EFS's limit on hard links to one file
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
VIRTUAL_SIZE = 1 << 50  # statfs: 1 PiB of capacity, like EFS "unlimited"
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
ATIME_REFRESH_NS = 24 * 3600 * 10**9
ATIME_BATCH = 1.0  # seconds: relatime updates are collected and committed together
STORED_REMEASURE = 60.0  # seconds between measurements of the stored size (EFS: ~hourly)
TRIM_CHECK_INTERVAL = 30.0  # seconds between checks that the log was not trimmed past us
METADATA_OP_BYTES = 4096  # EFS meters every metadata operation as 4 KiB


@dataclass(frozen=True)
class Ctx:
    """Who is asking: the caller's uid/gid, and for a create the caller's umask when
    efsish applies it (FUSE_DONT_MASK in effect), None when the kernel already has."""

    uid: int = 0
    gid: int = 0
    umask: int | None = None


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


def _other_system_xattr(name: bytes) -> bool:
    """A system.* name other than the POSIX ACLs. The kernel checks no permission for
    system.* names (it leaves them to the filesystem), and ext4 knows no others: they are
    refused (EOPNOTSUPP), or any user could attach data to any file they can see."""
    return name.startswith(b"system.") and name not in (ACL_ACCESS, ACL_DEFAULT)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError("name too long", errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError("invalid name", errno.EINVAL)


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
        self.cache = BlockCache(cache_dir / "blocks", options.cache_bytes)
        self.metering = Metering(
            store,
            sb,
            self.meta.client_id,
            options.stats_file,
            options.prometheus_port,
            read_only=options.read_only,
        )
        if self.leases is not None:
            self.metering.extra = self._lease_metrics
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
            lambda ino, off, end: self.meta.read(View.extents, ino, off, end),
            self.block_size,
            options.readahead_blocks,
            options.readahead_max_bytes,
        )
        self._atime_due: dict[int, int] = {}  # ino -> atime to commit (relatime, batched)
        send, recv = trio.open_memory_channel[tuple[str, int, bytes]](math.inf)
        self._inval_send = send
        self.invalidations = recv  # consumed by the FUSE adapter
        self.started = time.time()

    # ----------------------------------------------------------------- lifecycle

    async def start(self, nursery: trio.Nursery) -> None:
        self.writeback.start(nursery)
        self.reader.start(nursery)
        if self.staged is not None:
            self.staged.start(nursery)
        await self.meta.open()
        await self.metering.start(nursery, (await self.meta.read(View.stats))[1])
        await nursery.start(self.meta.run)
        if self.leases is not None:
            await self.leases.start(nursery, self.opts.cache_locked)
        await nursery.start(self.cache.run)
        nursery.start_soon(self._poller)
        nursery.start_soon(self._heartbeat)
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

    async def _poller(self) -> None:
        last_gc = last_trim_check = time.monotonic()
        while True:
            await trio.sleep(self.opts.poll_interval)
            try:
                check = time.monotonic() - last_trim_check > TRIM_CHECK_INTERVAL
                if check:
                    last_trim_check = time.monotonic()
                await self.meta.catch_up(check_trimmed=check)
                await self.meta.maybe_checkpoint()
                if not self.opts.read_only and time.monotonic() - last_gc > self.opts.gc_interval:
                    last_gc = time.monotonic()
                    r = await gc_collect(self.store, self.meta, grace=self.opts.gc_grace)
                    log.info(
                        "gc: %d blocks deleted, %d log entries trimmed",
                        r.deleted_blocks + r.swept_orphans,
                        r.trimmed_entries,
                    )
            except EfsishError as e:
                log.warning("background catch-up failed: %s", e)
            except Exception:
                # A bug here must not take the mount (and everyone's unflushed writes)
                # down with it: say so loudly and keep serving.
                log.exception("background catch-up crashed; the mount keeps running")

    async def _heartbeat(self) -> None:
        stored: int | None = None
        last_measure = 0.0
        while True:
            try:
                # First the heartbeat itself: without it, other mounts' gc would take
                # this mount for crashed and stop sparing the blocks it holds.
                await self.write_heartbeat()
                if stored is None or time.monotonic() - last_measure > STORED_REMEASURE:
                    stored = (await self.meta.read(View.stats))[1]
                    last_measure = time.monotonic()
                others = await heartbeat.read_all(self.store, exclude=self.meta.client_id)
                if self.leases is not None:
                    self.leases.peers_seen(others)
                recent = 5 * self.opts.heartbeat_interval
                if any(hb.starving and hb.age() < recent for hb in others):
                    self.meta.make_room(2 * self.opts.heartbeat_interval)
                await self.metering.sync(others, stored)
            except (StoreError, FsError) as e:  # FsError: the view is unusable for now
                log.warning("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat crashed; the mount keeps running")
            await trio.sleep(self.opts.heartbeat_interval)

    async def write_heartbeat(self) -> None:
        """Publish where this mount is (clients/<id>): read by status and gc. A
        read-only mount publishes nothing (see docs/ARCHITECTURE.md, read-only mounts)."""
        if self.opts.read_only:
            return
        domains: list[str] = []
        rows = oldest = 0
        if self.leases is not None:
            held = sorted(self.leases.state.held)
            if held:
                domains = [f"#{d}" for d in held]
                with trio.move_on_after(1.0):  # never hold the heartbeat up for names
                    try:
                        domains = await self.meta.read(domain_paths, held)
                    except FsError:
                        pass
            rows = self.meta.journal_rows
            if rows:
                oldest = time.time_ns() - int(self.leases.journal_age() * 1e9)
        hb = heartbeat.Heartbeat(
            client=self.meta.client_id,
            t=time.time_ns(),
            host=socket.gethostname(),
            mountpoint=self.opts.mountpoint,
            version=__version__,
            pid=os.getpid(),
            applied_seq=self.meta.applied_seq,
            starving=self.meta.starving,
            held=self.held_blocks(),
            metered_total=self.metering.drain_metered(),
            started=int(self.started * 1e9),
            nudge=self.leases.nudge_address if self.leases is not None else None,
            format=self.sb.format_version,
            newest_format=NEWEST_FORMAT,
            domains=domains,
            journal_rows=rows,
            journal_oldest=oldest,
        )
        await heartbeat.write(self.store, hb)

    def _lease_metrics(self) -> dict[str, float]:
        """The lease state for the metrics (stats file, Prometheus): domains held, the
        journal's rows and the age of the oldest one."""
        assert self.leases is not None
        return {
            "LeasesHeld": float(len(self.leases.state.held)),
            "JournalRows": float(self.meta.journal_rows),
            "JournalOldestAgeSeconds": self.leases.journal_age(),
        }

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
            if ino not in res.freed:
                self._inval_send.send_nowait(("inode", ino, b""))
        for parent, name in res.entries:
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

    async def _submit(self, planner: Callable[[View, PlanContext], tuple[list[Op], Any]]) -> Any:
        await self.metering.acquire("metadata", METADATA_OP_BYTES)
        try:
            return await self._commit(planner)
        except FsError:
            raise
        except EfsishError as e:
            log.error("metadata commit failed: %s", e)
            raise FsError(str(e), to_errno(e)) from e

    # ------------------------------------------------ lease routing (LEASES.md §6)

    async def _commit(self, planner: Callable[[View, PlanContext], tuple[list[Op], Any]]) -> Any:
        """A change: through the lease policy on a format-3 filesystem (journaled under
        a lease, or a sync entry, recalling a domain held elsewhere first)."""
        if self.leases is not None:
            return await self.leases.submit(planner)
        return await self.meta.submit(planner)

    async def _read_barrier(self, ino: int, catch_up: bool = True) -> None:
        """Before a read of `ino` (a directory's entries, or an inode): catch up with
        the log, and recall the inode's domains from another mount that holds them."""
        if catch_up:
            await self._catch_up()
        lz = self.leases
        if lz is None or not lz.state.others:
            return

        await lz.before_read(await self.meta.domains(ino))

    async def _read_in(self, ino: int, answer: Callable[[], Awaitable[T]]) -> T:
        """A read of `ino` (a directory's entries, or an inode) that close-to-open
        covers. When every domain of `ino` is held here with a valid lease, the view is
        the truth (another mount must recall the domain first, which the poll sees): it
        is answered with no request (LEASES.md §6.2), the validity checked after the
        view was read, immediately before the reply. Otherwise, and whenever that check
        fails, it is answered after the read barrier (catch-up, recall) as elsewhere."""
        lz = self.leases
        if lz is not None and lz.state.held and lz.cfg.acquire:
            doms = await self.meta.domains(ino)  # from memory once the tree was walked
            err: FsError | None = None
            try:
                out = await answer()
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

    @staticmethod
    def _need(view: View, ino: int) -> Attr:
        a = view.getattr(ino)
        if a is None:
            raise FsError("no such inode", errno.ENOENT)
        return a

    @staticmethod
    def _need_dir(view: View, ino: int) -> Attr:
        a = Filesystem._need(view, ino)
        if not a.is_dir:
            raise FsError("not a directory", errno.ENOTDIR)
        return a

    # -------------------------------------------------------------------- lookups

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > NAME_MAX:
            raise FsError("name too long", errno.ENAMETOOLONG)
        await self.metering.acquire("metadata", METADATA_OP_BYTES)
        if name == b"..":
            # The parent of a domain root is in the top: always the read barrier.
            await self._read_barrier(parent)
            p = await self.meta.read(View.parent_of, parent)
            return await self._attr(p or ROOT_INO)

        async def answer() -> Attr:
            if name == b".":
                return await self._attr(parent)
            attr = await self.meta.lookup(parent, name)
            if attr is None:
                raise FsError("no such entry", errno.ENOENT)
            return self._overlay(attr)

        return await self._read_in(parent, answer)

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
        await self._read_barrier(ino, catch_up=False)
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
        _check_name(name)
        if target is not None and len(target) > SYMLINK_MAX:
            raise FsError("symlink target too long", errno.ENAMETOOLONG)
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            p = self._need_dir(view, parent)
            if p.nlink == 0:
                raise FsError("directory was removed", errno.ENOENT)
            if view.lookup(parent, name) is not None:
                raise FsError("exists", errno.EEXIST)
            gid, m = ctx.gid, mode
            if p.mode & stat.S_ISGID:
                gid = p.gid
                if stat.S_ISDIR(mode):
                    m |= stat.S_ISGID
            # POSIX.1e, as ext4: the directory's default ACL, limited by the create
            # mode, becomes the new inode's access ACL and mode (a symlink's is always
            # 0777); a new directory also inherits the default ACL itself. Without a
            # default ACL the umask applies; with one it does not.
            inherited: list[tuple[bytes, bytes]] = []
            default = None if stat.S_ISLNK(mode) else view.getxattr(parent, ACL_DEFAULT)
            if default is None and ctx.umask is not None and not stat.S_ISLNK(mode):
                m &= ~(ctx.umask & 0o777)
            if default is not None:
                m, access = acl.inherit(default, m)
                if access is not None:
                    inherited.append((ACL_ACCESS, access))
                if stat.S_ISDIR(mode):
                    inherited.append((ACL_DEFAULT, default))
            ino = pc.alloc_ino(view)
            pc.after = lambda v: v.getattr(ino)
            op = Mk(ino, parent, name, m, ctx.uid, gid, pc.now_ns, rdev=rdev, target=target)
            return [op, *(SetXattr(ino, n, v, pc.now_ns) for n, v in inherited)], None

        attr: Attr = await self._submit(plan)
        return self._overlay(attr)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return await self.mknod(parent, name, stat.S_IFDIR | (mode & 0o7777), ctx)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        return await self.mknod(parent, name, stat.S_IFLNK | 0o777, ctx, target=target)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        _check_name(name)

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            a = self._need(view, ino)
            if a.is_dir:
                raise FsError("hard link to directory", errno.EPERM)
            if a.nlink >= LINK_MAX:
                raise FsError("too many links", errno.EMLINK)
            self._need_dir(view, parent)
            if view.lookup(parent, name) is not None:
                raise FsError("exists", errno.EEXIST)
            pc.after = lambda v: v.getattr(ino)
            return [Ln(ino, parent, name, pc.now_ns)], None

        attr: Attr = await self._submit(plan)
        return self._overlay(attr)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self._remove(parent, name, want_dir=False)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._remove(parent, name, want_dir=True)

    async def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        if len(name) > NAME_MAX:
            raise FsError("name too long", errno.ENAMETOOLONG)

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            self._need_dir(view, parent)
            ino = view.lookup(parent, name)
            if ino is None:
                raise FsError("no such entry", errno.ENOENT)
            a = self._need(view, ino)
            if want_dir and not a.is_dir:
                raise FsError("not a directory", errno.ENOTDIR)
            if not want_dir and a.is_dir:
                raise FsError("is a directory", errno.EISDIR)
            if a.is_dir and not view.is_empty_dir(ino):
                raise FsError("directory not empty", errno.ENOTEMPTY)
            return [Rm(parent, name, pc.now_ns)], None

        await self._submit(plan)

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int = 0) -> None:
        _check_name(dn)
        if len(sn) > NAME_MAX:
            raise FsError("name too long", errno.ENAMETOOLONG)
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise FsError("bad flags", errno.EINVAL)

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            self._need_dir(view, sp)
            self._need_dir(view, dp)
            src = view.lookup(sp, sn)
            if src is None:
                raise FsError("no such entry", errno.ENOENT)
            sa = self._need(view, src)
            dst = view.lookup(dp, dn)
            if dst is not None and flags & RENAME_NOREPLACE:
                raise FsError("exists", errno.EEXIST)  # even the same file (renameat2)
            if dst == src:
                return [], None  # same file: POSIX says do nothing
            if sa.is_dir and view.is_ancestor(src, dp):
                raise FsError("cannot move a directory into itself", errno.EINVAL)
            op = Mv(sp, sn, dp, dn, pc.now_ns)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError("no such entry", errno.ENOENT)
                da = self._need(view, dst)
                if da.is_dir and view.is_ancestor(dst, sp):
                    raise FsError("cannot move a directory into itself", errno.EINVAL)
                return [replace(op, exchange=True)], None
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError("exists", errno.EEXIST)
                da = self._need(view, dst)
                if sa.is_dir and not da.is_dir:
                    raise FsError("not a directory", errno.ENOTDIR)
                if not sa.is_dir and da.is_dir:
                    raise FsError("is a directory", errno.EISDIR)
                if da.is_dir and not view.is_empty_dir(dst):
                    raise FsError("directory not empty", errno.ENOTEMPTY)
            return [op], None

        await self._submit(plan)

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
        of = self.files.get(ino)
        if size is not None:
            if size < 0:
                raise FsError("negative size", errno.EINVAL)
            if of is not None:
                await self._flush_file(of)
        if of is not None and of.orphan is not None:
            return await self._orphan_setattr(of, mode, uid, gid, size, atime, mtime)

        if size is None and of is not None and of.modified and of.orphan is None:
            current = await self._attr(ino)
            if of.modified and of.orphan is None and not of.flush_lock.locked():
                # The file has unflushed writes here: commit this change with them (one
                # log entry instead of one per call: tar, cp -p and rsync set owner,
                # mode and times on every file they write). Other mounts see it at
                # close, like the data; a crash loses it only together with the data.
                changes = self._attr_changes(current, mode, uid, gid, atime, mtime)
                changes["ctime"] = self._now()
                of.deferred.update(changes)
                if mtime is not None:
                    of.mtime = mtime
                return self._overlay(current)

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            a = self._need(view, ino)
            changes: dict[str, int] = {"ctime": pc.now_ns}
            if size is not None:
                if a.is_dir:
                    raise FsError("is a directory", errno.EISDIR)
                if not a.is_reg:
                    raise FsError("not a regular file", errno.EINVAL)
                changes["size"] = size
                changes["mtime"] = pc.now_ns
            changes.update(self._attr_changes(a, mode, uid, gid, atime, mtime))
            pc.after = lambda v: v.getattr(ino)
            return [SetAttr(ino, **changes)], None

        try:
            attr: Attr = await self._submit(plan)
        except FsError as e:
            if e.errno == errno.ENOENT and of is not None and of.orphan is not None:
                # Another mount unlinked the open file while this change was on its way
                # (the log position it planned for held the unlink): it now lives here.
                return await self._orphan_setattr(of, mode, uid, gid, size, atime, mtime)
            raise
        if size is not None and of is not None:
            self.budget.truncate(of.dirty, size)
            of.size = size
        if mtime is not None and of is not None:
            of.mtime = mtime
        return self._overlay(attr)

    async def _orphan_setattr(
        self,
        of: OpenFile,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        size: int | None,
        atime: int | None,
        mtime: int | None,
    ) -> Attr:
        """setattr of a file unlinked while open: it lives only on this mount until its
        last close, so the change is made to its snapshot here (ftruncate, fchmod,
        futimens on such a descriptor work, as on a local filesystem)."""
        assert of.orphan is not None
        a = of.orphan.attr
        now = self._now()
        if size is not None:
            await of.truncate_unlinked(size, self.budget)
            if of.ino in self.ghosts:
                self.ghosts[of.ino] = of.orphan
            of.size = a.size = size
            a.mtime = of.mtime = now
        for k, v in self._attr_changes(a, mode, uid, gid, atime, mtime).items():
            setattr(a, k, v)
        if mtime is not None:
            of.mtime = mtime
        a.ctime = now
        return await self._attr(of.ino)

    @staticmethod
    def _attr_changes(
        a: Attr,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        atime: int | None,
        mtime: int | None,
    ) -> dict[str, int]:
        """The attribute values a chmod/chown/utimens of `a` sets (POSIX rules)."""
        out: dict[str, int] = {}
        new_mode = a.mode
        if mode is not None:
            new_mode = stat.S_IFMT(a.mode) | (mode & 0o7777)
        owner_changes = (uid is not None and uid != a.uid) or (gid is not None and gid != a.gid)
        if owner_changes and a.is_reg and mode is None:
            # chown clears set-user-ID, and set-group-ID when group-executable.
            new_mode &= ~stat.S_ISUID
            if new_mode & stat.S_IXGRP:
                new_mode &= ~stat.S_ISGID
        if new_mode != a.mode:
            out["mode"] = new_mode
        if uid is not None:
            out["uid"] = uid
        if gid is not None:
            out["gid"] = gid
        if atime is not None:
            out["atime"] = atime
        if mtime is not None:
            out["mtime"] = mtime
        return out

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
        if len(name) > XATTR_NAME_MAX or not name:
            raise FsError("xattr name too long", errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError("xattr value too large", errno.E2BIG)
        if _other_system_xattr(name):
            raise FsError("unsupported system.* xattr", errno.EOPNOTSUPP)

        access = acl.parse_acl(value) if name == ACL_ACCESS else None
        if name in (ACL_ACCESS, ACL_DEFAULT) and (
            (access is None and name == ACL_ACCESS) or not acl.valid(value)
        ):
            raise FsError("invalid ACL", errno.EINVAL)

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            a = self._need(view, ino)
            old = view.getxattr(ino, name)
            if flags & XATTR_CREATE and old is not None:
                raise FsError("xattr exists", errno.EEXIST)
            if flags & XATTR_REPLACE and old is None:
                raise FsError("no such xattr", errno.ENODATA)
            ops: list[Op] = []
            if access is not None:
                # As local filesystems do: the ACL's owner/group(mask)/other entries are
                # the mode bits; an ACL with nothing more is just a mode, not stored.
                mode, minimal = access
                new_mode = (a.mode & ~0o777) | mode
                if new_mode != a.mode:
                    ops.append(SetAttr(ino, mode=new_mode, ctime=pc.now_ns))
                if minimal:
                    if old is not None:
                        ops.append(RemoveXattr(ino, name, pc.now_ns))
                    return ops, None
            ops.append(SetXattr(ino, name, value, pc.now_ns))
            return ops, None

        await self._submit(plan)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        await self._attr(ino)
        v = await self.meta.getxattr(ino, name)
        if v is None:
            raise FsError("no such xattr", errno.ENODATA)
        return v

    async def listxattr(self, ino: int, ctx: Ctx) -> list[bytes]:
        await self._attr(ino)
        names: list[bytes] = await self.meta.read(View.listxattr, ino)
        if ctx.uid != 0:
            # The kernel keeps trusted.* from everyone but root, except in listings,
            # which it leaves to the filesystem (ext4 hides them too).
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    async def removexattr(self, ino: int, name: bytes, ctx: Ctx) -> None:
        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            a = self._need(view, ino)
            if view.getxattr(ino, name) is None:
                if _other_system_xattr(name):
                    raise FsError("unsupported system.* xattr", errno.EOPNOTSUPP)
                raise FsError("no such xattr", errno.ENODATA)
            if _other_system_xattr(name) and ctx.uid not in (0, a.uid):
                # One stored before system.* names were refused: its owner (or root)
                # may remove it, nobody else.
                raise FsError("not the owner", errno.EPERM)
            return [RemoveXattr(ino, name, pc.now_ns)], None

        await self._submit(plan)

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

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            ops: list[Op] = []
            for ino, t in due.items():
                a = view.getattr(ino)
                if a is not None and a.atime < t:
                    ops.append(SetAttr(ino, atime=t))
            return ops, None

        try:
            await self._commit(plan)
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

            def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
                if view.getattr(of.ino) is None:
                    return [], None
                ext = tuple(p.ext for p in pend)
                ops: list[Op] = [Write(of.ino, ext, size, mtime)]
                if deferred:
                    ops.append(SetAttr(of.ino, **deferred))
                return ops, None

            await self._submit(plan)
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
