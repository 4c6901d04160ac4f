"""What a mount made with `-o access_point=ID` does: EFS access point semantics between
the FUSE adapter and the filesystem.

`AccessPointFs` wraps a Filesystem with the calls the FUSE adapter makes and

- maps inode numbers at the boundary: the kernel's root inode is the access point's
  root directory (and that directory's own number is never shown), so the mount sees
  only that subtree; `..` of the root is the root itself. The kernel only ever names
  inodes this layer handed out, so no path through the mount leads out of the subtree
  (a rename or link to another mount is EXDEV in the kernel);
- performs every request as the access point's uid, gid and secondary gids, whatever
  the caller's: new inodes are owned by it, and the permission checks the kernel makes
  on other mounts (`default_permissions`, POSIX ACLs) are made here with that identity
  (the mount runs without them, as the kernel would check the caller's own).

`open_root` finds the root directory, creating missing components with the access
point's creation owner and mode, as EFS does. This module must not import pyfuse3.

The kernel still applies two checks with the caller's own identity: the sticky bit of a
directory on unlink and rename, and the capability checks of `trusted.*` xattrs.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from efsish import acl
from efsish.errors import EfsishError, FsError
from efsish.filesystem import Ctx, Filesystem
from efsish.meta.accesspoints import AccessPoint, CreationInfo
from efsish.meta.view import ROOT_INO, Attr

log = logging.getLogger(__name__)

R, W, X = 4, 2, 1


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: frozenset[int]  # the gid and the secondary gids

    @classmethod
    def of(cls, ap: AccessPoint) -> Identity:
        return cls(ap.uid, ap.gid, frozenset((ap.gid, *ap.secondary_gids)))


def permitted(a: Attr, access_acl: bytes | None, who: Identity, want: int) -> bool:
    """Whether `who` may `want` (R|W|X bits) on `a`, as Linux decides it (the owner
    class, then named users, then every matching group entry, then other), with the
    access ACL `access_acl` if the inode has one."""
    if who.uid == 0:
        # Root reads and writes anything, and executes what anyone may execute.
        return not (want & X) or a.is_dir or bool(a.mode & 0o111)
    ents = acl.entries(access_acl) if access_acl is not None else None
    if who.uid == a.uid:
        return (a.mode >> 6) & want == want
    if ents is None:
        bits = (a.mode >> 3) & 7 if a.gid in who.groups else a.mode & 7
        return bits & want == want
    mask = next((p for t, p, _ in ents if t == acl.MASK), 7)
    for tag, perm, ident in ents:
        if tag == acl.USER and ident == who.uid:
            return perm & mask & want == want
    matched = False
    for tag, perm, ident in ents:
        if (tag == acl.GROUP_OBJ and a.gid in who.groups) or (
            tag == acl.GROUP and ident in who.groups
        ):
            matched = True
            if perm & mask & want == want:
                return True
    if matched:
        return False
    other = next(p for t, p, _ in ents if t == acl.OTHER)
    return other & want == want


async def open_root(fs: Filesystem, ap: AccessPoint, *, read_only: bool) -> int:
    """The inode of the access point's root directory. If it is missing it is created
    with the creation owner and mode (EfsishError if there are none, or on a read-only
    mount); missing directories above it are created as `mkdir -p` by root would
    (root's, 0755), so that a plain mount of /home stays usable. A component that is not
    a directory is an error."""
    ino = ROOT_INO
    path = ""
    names = ap.components
    created = False
    for i, name in enumerate(names):
        path += "/" + os.fsdecode(name)
        for _ in range(3):  # another mount may create it at the same time
            try:
                a = await fs.lookup(ino, name)
                break
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise EfsishError(f"access point {ap.id}: cannot look up {path}: {e}") from e
            c = ap.creation
            if c is None:
                raise EfsishError(
                    f"access point {ap.id}: its root {ap.root} does not exist ({path} is "
                    "missing) and it has no creation info: create the directory, or an "
                    "access point with --create-owner and --create-mode"
                )
            if read_only:
                raise EfsishError(
                    f"access point {ap.id}: its root {ap.root} does not exist; a read-only "
                    "mount creates nothing: mount it read-write once, or create it"
                )
            if i < len(names) - 1:
                c = CreationInfo(uid=0, gid=0, mode=0o755)
            owner = Ctx(uid=c.uid, gid=c.gid)
            try:
                made = await fs.mkdir(ino, name, c.mode, owner)
            except FsError as e:
                if e.errno == errno.EEXIST:
                    continue
                raise EfsishError(f"access point {ap.id}: cannot create {path}: {e}") from e
            # Exactly the creation owner and mode: not a setgid parent's group, nor
            # bits a default ACL removed.
            a = await fs.setattr(made.ino, owner, mode=c.mode, uid=c.uid, gid=c.gid)
            created = True
            log.info("access point %s: created %s (%d:%d %04o)", ap.id, path, c.uid, c.gid, c.mode)
            break
        else:
            raise EfsishError(f"access point {ap.id}: {path} keeps changing; mount again")
        if not a.is_dir:
            raise EfsishError(f"access point {ap.id}: its root {ap.root} is not a directory")
        ino = a.ino
    if created:
        await fs.fsyncdir()  # in the log before the mount is served (leases journal it)
    return ino


class AccessPointFs:
    """A Filesystem seen through an access point (the module docstring says how). Inode
    numbers in and out are the kernel's."""

    def __init__(self, fs: Filesystem, ap: AccessPoint, root: int) -> None:
        self.fs = fs
        self.ap = ap
        self.root = root
        self.who = Identity.of(ap)

    # ------------------------------------------------------------- inode mapping

    def _in(self, ino: int) -> int:
        """The filesystem's number of the kernel's inode `ino`."""
        if ino == ROOT_INO:
            return self.root
        if ino == self.root:
            raise FsError("inode outside the access point", errno.ESTALE)
        return ino

    def _kernel_ino(self, ino: int) -> int | None:
        """The kernel's number of the filesystem's inode `ino` (None: the kernel cannot
        know it, being the filesystem's root outside the access point)."""
        if ino == self.root:
            return ROOT_INO
        if ino == ROOT_INO:
            return None
        return ino

    def _out(self, a: Attr) -> Attr:
        k = self._kernel_ino(a.ino)
        if k is None:
            raise FsError("outside the access point", errno.EACCES)
        return a if k == a.ino else replace(a, ino=k)

    def remember(self, ino: int, n: int = 1) -> None:
        self.fs.remember(self._in(ino), n)

    def forget(self, ino: int, n: int) -> None:
        self.fs.forget(self._in(ino), n)

    def kernel_knows(self, ino: int) -> bool:
        """`Filesystem.kernel_knows` of the kernel's inode `ino` (its root is ours)."""
        return ino == ROOT_INO or self.fs.kernel_knows(ino)

    @property
    def invalidations(self) -> AsyncIterator[tuple[str, int, bytes]]:
        return self._invalidations()

    async def _invalidations(self) -> AsyncIterator[tuple[str, int, bytes]]:
        async for kind, ino, name in self.fs.invalidations:
            k = self._kernel_ino(ino)
            if k is not None:
                yield kind, k, name

    @property
    def invalidate_attr(self) -> Callable[[int], Awaitable[None]] | None:
        return self.fs.invalidate_attr

    @invalidate_attr.setter
    def invalidate_attr(self, send: Callable[[int], Awaitable[None]] | None) -> None:
        async def mapped(ino: int) -> None:
            k = self._kernel_ino(ino)
            if k is not None and send is not None:
                await send(k)

        self.fs.invalidate_attr = mapped if send is not None else None

    # --------------------------------------------------------------- identity

    def _ctx(self, umask: int | None = None) -> Ctx:
        return Ctx(uid=self.who.uid, gid=self.who.gid, umask=umask)

    async def _acl(self, ino: int) -> bytes | None:
        try:
            return await self.fs.getxattr(ino, acl.ACL_ACCESS)
        except FsError as e:
            if e.errno == errno.ENODATA:
                return None
            raise

    async def _may(self, ino: int, want: int, a: Attr | None = None) -> Attr:
        """`ino`'s attributes if the access point's identity may `want`; EACCES if not."""
        if a is None:
            a = await self.fs.getattr(ino)
        if not permitted(a, await self._acl(ino), self.who, want):
            raise FsError("permission denied", errno.EACCES)
        return a

    def _owner(self, a: Attr) -> bool:
        return self.who.uid in (0, a.uid)

    async def _sticky(self, parent: Attr, child: Attr) -> None:
        """A sticky directory's entries are removed or renamed by their owner, the
        directory's owner or root only."""
        if parent.mode & stat.S_ISVTX and self.who.uid not in (0, child.uid, parent.uid):
            raise FsError("sticky directory", errno.EPERM)

    async def _removable(self, parent: int, name: bytes) -> None:
        p = await self._may(parent, W | X)
        if p.mode & stat.S_ISVTX:
            await self._sticky(p, await self.fs.lookup(parent, name))

    # ---------------------------------------------------------------- requests

    async def access(self, ino: int, mode: int) -> bool:
        """access(2), chdir: whether the identity may (R_OK|W_OK|X_OK bits)."""
        fino = self._in(ino)
        a = await self.fs.getattr(fino)
        return permitted(a, await self._acl(fino), self.who, mode & 7)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        p = self._in(parent)
        if name == b".." and p == self.root:
            return self._out(await self.fs.getattr(p))
        if name not in (b".", b".."):  # those the kernel asks only of what it knows
            await self._may(p, X)
        return self._out(await self.fs.lookup(p, name))

    async def dotdot(self, ino: int) -> Attr:
        """A listing's "..": of the access point's root, the root itself."""
        p = self._in(ino)
        if p == self.root:
            return self._out(await self.fs.getattr(p))
        return self._out(await self.fs.dotdot(p))

    async def getattr(self, ino: int) -> Attr:
        return self._out(await self.fs.getattr(self._in(ino)))

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
        fino = self._in(ino)
        a = await self.fs.getattr(fino)
        owner = self._owner(a)
        if mode is not None:
            if not owner:
                raise FsError("not the owner", errno.EPERM)
            if self.who.uid != 0 and (gid if gid is not None else a.gid) not in self.who.groups:
                mode &= ~stat.S_ISGID  # as chmod by a non-member
        if uid is not None and uid != a.uid and self.who.uid != 0:
            raise FsError("only root gives files away", errno.EPERM)
        if (
            gid is not None
            and gid != a.gid
            and self.who.uid != 0
            and (not owner or gid not in self.who.groups)
        ):
            raise FsError("not the owner or not a member", errno.EPERM)
        if size is not None and fh is None:
            await self._may(fino, W, a)
        if (atime is not None or mtime is not None) and not owner:
            await self._may(fino, W, a)
        out = await self.fs.setattr(
            fino,
            self._ctx(),
            mode=mode,
            uid=uid,
            gid=gid,
            size=size,
            atime=atime,
            mtime=mtime,
            fh=fh,
        )
        return self._out(out)

    async def readlink(self, ino: int) -> bytes:
        return await self.fs.readlink(self._in(ino))

    async def mknod(self, parent: int, name: bytes, mode: int, ctx: Ctx, rdev: int = 0) -> Attr:
        p = self._in(parent)
        await self._may(p, W | X)
        return self._out(await self.fs.mknod(p, name, mode, self._ctx(ctx.umask), rdev))

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        p = self._in(parent)
        await self._may(p, W | X)
        return self._out(await self.fs.mkdir(p, name, mode, self._ctx(ctx.umask)))

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        p = self._in(parent)
        await self._may(p, W | X)
        return self._out(await self.fs.symlink(p, name, target, self._ctx()))

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        p = self._in(parent)
        await self._may(p, W | X)
        return self._out(await self.fs.link(self._in(ino), p, name))

    async def unlink(self, parent: int, name: bytes) -> None:
        p = self._in(parent)
        await self._removable(p, name)
        await self.fs.unlink(p, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        p = self._in(parent)
        await self._removable(p, name)
        await self.fs.rmdir(p, name)

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, flags: int = 0) -> None:
        src, dst = self._in(sp), self._in(dp)
        await self._removable(src, sn)
        await self._may(dst, W | X)
        moved = await self.fs.lookup(src, sn)
        if moved.is_dir and src != dst:
            await self._may(moved.ino, W, moved)  # its ".." changes
        try:
            target = await self.fs.lookup(dst, dn)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
        else:
            await self._sticky(await self.fs.getattr(dst), target)
        await self.fs.rename(src, sn, dst, dn, flags)

    async def open(self, ino: int, flags: int, ctx: Ctx | None = None) -> tuple[int, bool]:
        fino = self._in(ino)
        acc = flags & os.O_ACCMODE
        want = (R if acc in (os.O_RDONLY, os.O_RDWR) else 0) | (
            W if acc in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC else 0
        )
        await self._may(fino, want)
        return await self.fs.open(fino, flags, self._ctx())

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[int, Attr]:
        p = self._in(parent)
        await self._may(p, W | X)
        fh, a = await self.fs.create(p, name, mode, flags, self._ctx(ctx.umask))
        return fh, self._out(a)

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return await self.fs.read(fh, off, size)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.fs.write(fh, off, data)

    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    async def fsync(self, fh: int) -> None:
        await self.fs.fsync(fh)

    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    async def opendir(self, ino: int) -> None:
        fino = self._in(ino)
        await self.fs.opendir(fino)
        await self._may(fino, R)

    async def readdir(
        self, ino: int, after: int, limit: int = 1000
    ) -> list[tuple[int, bytes, Attr]]:
        entries = await self.fs.readdir(self._in(ino), after, limit)
        return [(c, n, self._out(a)) for c, n, a in entries]

    async def fsyncdir(self) -> None:
        await self.fs.fsyncdir()

    async def statfs(self) -> dict[str, int]:
        return await self.fs.statfs()

    async def _xattr_write(self, ino: int, name: bytes) -> None:
        a = await self.fs.getattr(ino)
        if name.startswith(b"trusted.") and self.who.uid != 0:
            raise FsError("trusted.* is root's", errno.EPERM)
        if name in (acl.ACL_ACCESS, acl.ACL_DEFAULT):
            if not self._owner(a):
                raise FsError("not the owner", errno.EPERM)
        elif name.startswith(b"user."):
            if not (a.is_reg or a.is_dir):
                raise FsError("user.* xattrs on files and directories only", errno.EPERM)
            await self._may(ino, W, a)
        elif name.startswith(b"security."):
            await self._may(ino, W, a)

    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Ctx, flags: int = 0) -> None:
        fino = self._in(ino)
        await self._xattr_write(fino, name)
        await self.fs.setxattr(fino, name, value, self._ctx(), flags)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        fino = self._in(ino)
        if name.startswith(b"trusted.") and self.who.uid != 0:
            raise FsError("no such xattr", errno.ENODATA)
        if name.startswith(b"user."):
            await self._may(fino, R)
        return await self.fs.getxattr(fino, name)

    async def listxattr(self, ino: int, ctx: Ctx) -> list[bytes]:
        return await self.fs.listxattr(self._in(ino), self._ctx())

    async def removexattr(self, ino: int, name: bytes, ctx: Ctx) -> None:
        fino = self._in(ino)
        await self._xattr_write(fino, name)
        await self.fs.removexattr(fino, name, self._ctx())
