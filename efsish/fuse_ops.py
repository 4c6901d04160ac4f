"""The FUSE adapter: the only module that speaks pyfuse3's Operations interface.

It converts pyfuse3 requests into Filesystem calls, Attr into EntryAttributes, and every
error into a FUSEError through efsish.errors.to_errno (one rule). Kernel cache
invalidations for changes made by other mounts are sent from a dedicated worker task,
never inline in a request handler (the kernel may hold locks the request needs).
This module must not contain filesystem logic.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from efsish.access import AccessPointFs
from efsish.errors import EfsishError, FsError, to_errno
from efsish.filesystem import Ctx, Filesystem
from efsish.meta.view import Attr

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Entries read per readdir request: the first, the fewest and the most (see `readdir`).
READDIR_FIRST = 128
READDIR_MIN = 32
READDIR_MAX = 4096


def _errors(fn: F) -> F:
    """Map every exception to a FUSEError; unexpected ones are logged, not fatal."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except EfsishError as e:
            log.error("%s failed: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(to_errno(e)) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def busy_poll(us: int) -> bool:
    """Have pyfuse3's loop poll the FUSE fd for `us` microseconds after each reply before
    it waits through trio (0: never), so a process sending request after request finds the
    daemon awake. Call before pyfuse3.main. False if this pyfuse3 cannot (only the build of
    scripts/bootstrap, with patches/pyfuse3-fd-polling.patch, polls)."""
    if not hasattr(pyfuse3, "spin_counts"):
        return us == 0
    setattr(pyfuse3, "spin_ns", int(us) * 1000)  # noqa: B010 - not in pyfuse3's stubs
    return True


def poll_metrics() -> dict[str, float]:
    """FUSE_METRICS: requests found by polling after a reply, polls that found none, the
    time those took, and the poll window now."""
    found, idle, idle_ns = getattr(pyfuse3, "spin_counts", (0, 0, 0))
    return {
        "FuseRequestsPolled": float(found),
        "FusePollsIdle": float(idle),
        "FusePollIdleSeconds": idle_ns / 1e9,
        "FusePollWindowMicroseconds": getattr(pyfuse3, "spin_ns", 0) / 1000,
    }


# The poll window follows the machine's spare CPU, -o busy_poll being the longest. A
# polling thread occupies a CPU that the scheduler then does not see as idle, so on a
# machine with no CPU to spare a woken client can queue behind another process while
# the poll runs out. With fewer than SPARE_LOW idle CPUs (this daemon's polls that found
# nothing counted as idle; a running average over about a second) the window is
# SHORT_POLL_US, above SPARE_HIGH busy_poll again. Measured at a 20 ms store
# (docs/BENCHMARKS.md): a 50 us window gives one client its fastest stats, a 20 us one
# lets two mounts on 2 busy CPUs keep more of their solo rate. /proc/stat is the whole
# machine's (a CPU-limited container sees its host's): there the window stays longer.
SHORT_POLL_US = 20
SPARE_LOW = 0.5
SPARE_HIGH = 0.8
ADAPT_EVERY = 0.25  # seconds between looks at the machine
SPARE_WEIGHT = 0.25  # of each look in the running average of the spare CPUs


def poll_window(full_us: int, now_us: int, spare_cpus: float) -> int:
    """The window to poll for, given the idle CPUs over the last look (hysteresis
    between SPARE_LOW and SPARE_HIGH keeps it from flapping)."""
    if spare_cpus < SPARE_LOW:
        return min(full_us, SHORT_POLL_US)
    if spare_cpus > SPARE_HIGH:
        return full_us
    return now_us


def _idle_seconds() -> float | None:
    """CPU seconds the machine's CPUs have spent idle or waiting for I/O (/proc/stat),
    or None where there is no such file. (A read of procfs: it does not block.)"""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def adapt_busy_poll(full_us: int) -> None:
    """Keep the poll window at `full_us` while the machine has a CPU to spare and at
    SHORT_POLL_US while it has not (see above), looking every ADAPT_EVERY seconds. Runs
    in the mount's nursery; returns at once if there is nothing to adapt."""
    if full_us <= SHORT_POLL_US or not hasattr(pyfuse3, "spin_counts"):
        return
    idle0 = _idle_seconds()
    if idle0 is None:
        return
    window = full_us
    spin0, t0 = poll_metrics()["FusePollIdleSeconds"], trio.current_time()
    spare: float | None = None
    while True:
        await trio.sleep(ADAPT_EVERY)
        idle1 = _idle_seconds()
        if idle1 is None:
            busy_poll(full_us)
            return
        spin1, t1 = poll_metrics()["FusePollIdleSeconds"], trio.current_time()
        now = ((idle1 - idle0) + (spin1 - spin0)) / max(t1 - t0, 1e-3)
        # Averaged over about a second: a single look swings from 0 to 1 idle CPU as
        # the window itself changes how much the polls occupy.
        spare = now if spare is None else spare + SPARE_WEIGHT * (now - spare)
        new = poll_window(full_us, window, spare)
        if new != window:
            window = new
            busy_poll(window)
        idle0, spin0, t0 = idle1, spin1, t1


class FuseOps(pyfuse3.Operations):
    """pyfuse3 Operations backed by a Filesystem."""

    enable_writeback_cache = False
    enable_acl = True  # the kernel enforces POSIX ACLs and maps minimal ACLs to modes
    # Create modes arrive unmasked with the umask beside them (FUSE_DONT_MASK), so a
    # default ACL can replace the umask as on ext4. Only the patched pyfuse3 that
    # scripts/bootstrap builds asks for it; pyfuse3.dont_mask tells what INIT agreed.
    enable_dont_mask = True

    def __init__(
        self,
        fs: Filesystem | AccessPointFs,
        *,
        attr_timeout: float = 1.0,
        entry_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.fs = fs
        if isinstance(fs, AccessPointFs):
            # Permissions are checked with the access point's identity (efsish.access),
            # so the kernel must not check the caller's: FUSE_POSIX_ACL would turn
            # default_permissions on.
            self.enable_acl = False
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self._dirs: dict[int, int] = {}
        self._dir_batch: dict[int, int] = {}  # entries to read per readdir request
        self._next_dh = 1
        # Set once the kernel's INIT has been answered: settings the kernel derives
        # from that answer (its readahead) can only be changed afterwards.
        self.initialized = trio.Event()
        fs.invalidate_attr = self._invalidate_attr_now
        # The largest read and write requests the kernel sent: libfuse offers the largest
        # it can (max_write, max_pages) at INIT, and these show what was agreed (1 MiB
        # with libfuse 3.14). Logged at unmount.
        self.largest_read = 0
        self.largest_write = 0
        # Whether efsish applies the umask itself (set at INIT).
        self.dont_mask = False

    def init(self) -> None:
        agreed = getattr(pyfuse3, "dont_mask", None)
        self.dont_mask = agreed is True
        if self.dont_mask:
            log.info("umask: applied by efsish; a default ACL replaces it, as on ext4")
        else:
            log.warning(
                "umask: applied by the kernel, so a default ACL is combined with it "
                "(ext4 ignores the umask under a default ACL): %s",
                "the kernel does not offer FUSE_DONT_MASK"
                if agreed is False
                else "this pyfuse3 cannot ask for FUSE_DONT_MASK; efsish's "
                "scripts/bootstrap installs a patched one",
            )
        self.initialized.set()

    async def _invalidate_attr_now(self, ino: int) -> None:
        """Attribute-only invalidation (no page locks), used by open() for close-to-open."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, True)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTCONN):
                log.debug("attr invalidation of %d failed: %s", ino, e)

    def _known(self, a: Attr) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel's lookup count of the inode goes up by one."""
        self.fs.remember(a.ino)
        return self._entry(a)

    # ------------------------------------------------------------------ helpers

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 128 * 1024
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = a.atime
        e.st_mtime_ns = a.mtime
        e.st_ctime_ns = a.ctime
        return e

    @staticmethod
    def _ctx(ctx: Any) -> Ctx:
        return Ctx(uid=ctx.uid, gid=ctx.gid)

    def _create_ctx(self, ctx: Any) -> Ctx:
        """The context of a create, mkdir or mknod: with the umask if efsish applies it."""
        return Ctx(uid=ctx.uid, gid=ctx.gid, umask=ctx.umask if self.dont_mask else None)

    async def invalidation_worker(self) -> None:
        """Send kernel cache invalidations for remote changes, off the request path.
        Only of inodes (for an entry: directories) the kernel knows when it is sent:
        it caches nothing of others, and an inode invalidation costs a thread hop."""
        async for kind, ino, name in self.fs.invalidations:
            if not self.fs.kernel_knows(ino):
                continue
            try:
                if kind == "inode":
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
                else:
                    pyfuse3.invalidate_entry_async(ino, name, ignore_enoent=True)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTCONN):
                    log.debug("invalidate %s %d failed: %s", kind, ino, e)

    # --------------------------------------------------------------- operations

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        return self._known(await self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.fs.forget(ino, n)

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(await self.fs.getattr(inode))

    @_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        a = await self.fs.setattr(
            inode,
            self._ctx(ctx),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime=attr.st_atime_ns if fields.update_atime else None,
            mtime=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
        )
        return self._entry(a)

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        c = self._create_ctx(ctx)
        return self._known(await self.fs.mknod(parent_inode, name, mode, c, rdev))

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._known(await self.fs.mkdir(parent_inode, name, mode, self._create_ctx(ctx)))

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return self._known(await self.fs.symlink(parent_inode, name, target, self._ctx(ctx)))

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return self._known(await self.fs.link(inode, new_parent_inode, new_name))

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fh, keep = await self.fs.open(inode, flags, self._ctx(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, self._create_ctx(ctx))
        return pyfuse3.FileInfo(fh=fh), self._known(attr)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies from any buffer (PyObject_GetBuffer), though its stub says bytes.
        if size > self.largest_read:
            self.largest_read = size
        return await self.fs.read(fh, off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if len(buf) > self.largest_write:
            self.largest_write = len(buf)
        return await self.fs.write(fh, off, buf)

    @_errors
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_errors
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        await self.fs.opendir(inode)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = inode
        return dh

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # Cursors: 1 after ".", 2 after "..", then dentry id + 2 (stable under changes).
        # Each request reads about as many entries as the kernel took the last time (its
        # buffer: 4 KiB, or up to the getdents buffer on newer kernels), so a listing
        # reads each entry about once whatever the kernel's buffer size.
        ino = self._dirs[fh]
        if start_id == 0:
            dot = self._entry(await self.fs.getattr(ino))
            if not pyfuse3.readdir_reply(token, b".", dot, 1):
                return
        if start_id <= 1:
            parent = await self.fs.dotdot(ino)  # no round trip: opendir caught up
            if not pyfuse3.readdir_reply(token, b"..", self._entry(parent), 2):
                return
        after = max(0, start_id - 2)
        batch = self._dir_batch.get(fh, READDIR_FIRST)
        taken = 0
        reply, entry, remember = pyfuse3.readdir_reply, self._entry, self.fs.remember
        try:
            while True:
                entries = await self.fs.readdir(ino, after, batch)
                if not entries:
                    return
                for cursor, name, attr in entries:
                    if not reply(token, name, entry(attr), cursor + 2):
                        return
                    remember(attr.ino)
                    taken += 1
                after = entries[-1][0]
                batch = min(READDIR_MAX, batch * 2)
        finally:
            if fh in self._dirs:
                self._dir_batch[fh] = min(READDIR_MAX, max(READDIR_MIN, taken + taken // 8 + 1))

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_batch.pop(fh, None)

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Without leases metadata is durable when each operation returns; with them,
        # this waits for the journal to reach the log.
        await self.fs.fsyncdir()

    @_errors
    async def statfs(self, ctx: Any) -> Any:
        s = await self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = s["bsize"]
        st.f_frsize = s["frsize"]
        st.f_blocks = s["blocks"]
        st.f_bfree = s["bfree"]
        st.f_bavail = s["bfree"]
        st.f_files = s["files"]
        st.f_ffree = s["ffree"]
        st.f_favail = s["ffree"]
        st.f_namemax = s["namemax"]
        return st

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.fs.setxattr(inode, name, value, self._ctx(ctx))

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.fs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.fs.listxattr(inode, self._ctx(ctx))

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(inode, name, self._ctx(ctx))

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        # Only reached without default_permissions: on access point mounts.
        if isinstance(self.fs, AccessPointFs):
            return await self.fs.access(inode, mode)
        await self.fs.getattr(inode)
        return True


def fuse_options(
    *, allow_other: bool, fsname: str, ro: bool = False, kernel_permissions: bool = True
) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: kernel checks modes
    if not kernel_permissions:  # an access point mount checks them itself
        opts.discard("default_permissions")
    opts.add(f"fsname={fsname}")
    opts.add("subtype=efsish")
    if allow_other:
        opts.add("allow_other")
    if ro:
        opts.add("ro")
    return opts


def running_as_root() -> bool:
    return os.geteuid() == 0
