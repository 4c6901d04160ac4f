"""Namespace planners: mknod (files, directories, symlinks), link, unlink/rmdir and
rename, with the rules a name change keeps (EEXIST, ENOTEMPTY, a directory moved into
itself, link limits, setgid directories, default-ACL inheritance, the umask).

This module owns where a create, a removal and a rename are validated. It must not do
I/O, touch trio or import anything above efsish.meta (see efsish.posix).
"""

from __future__ import annotations

import errno
import stat
from dataclasses import replace

from efsish import acl
from efsish.acl import ACL_ACCESS, ACL_DEFAULT
from efsish.errors import FsError
from efsish.meta.ops import Ln, Mk, Mv, Op, Rm, SetXattr
from efsish.meta.planning import PlanContext, Planner
from efsish.meta.view import View
from efsish.posix.rules import (
    LINK_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SYMLINK_MAX,
    Ctx,
    check_name,
    check_name_len,
    need,
    need_dir,
)


def mknod(
    parent: int,
    name: bytes,
    mode: int,
    ctx: Ctx,
    rdev: int = 0,
    target: bytes | None = None,
) -> Planner[None]:
    """Create `name` in `parent` (a regular file when `mode` has no type). The
    planner's result (`pc.after`) is the new inode's attributes."""
    check_name(name)
    if target is not None and len(target) > SYMLINK_MAX:
        raise FsError("symlink target too long", errno.ENAMETOOLONG)
    if stat.S_IFMT(mode) == 0:
        mode |= stat.S_IFREG

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        p = need_dir(view, parent)
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

    return plan


def link(ino: int, parent: int, name: bytes) -> Planner[None]:
    """A hard link `name` in `parent` to `ino`; the result (`pc.after`) is its
    attributes."""
    check_name(name)

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        a = need(view, ino)
        if a.is_dir:
            raise FsError("hard link to directory", errno.EPERM)
        if a.nlink >= LINK_MAX:
            raise FsError("too many links", errno.EMLINK)
        need_dir(view, parent)
        if view.lookup(parent, name) is not None:
            raise FsError("exists", errno.EEXIST)
        pc.after = lambda v: v.getattr(ino)
        return [Ln(ino, parent, name, pc.now_ns)], None

    return plan


def remove(parent: int, name: bytes, want_dir: bool) -> Planner[None]:
    """unlink (`want_dir` False) or rmdir of `name` in `parent`."""
    check_name_len(name)

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        need_dir(view, parent)
        ino = view.lookup(parent, name)
        if ino is None:
            raise FsError("no such entry", errno.ENOENT)
        a = need(view, ino)
        if want_dir and not a.is_dir:
            raise FsError("not a directory", errno.ENOTDIR)
        if not want_dir and a.is_dir:
            raise FsError("is a directory", errno.EISDIR)
        if a.is_dir and not view.is_empty_dir(ino):
            raise FsError("directory not empty", errno.ENOTEMPTY)
        return [Rm(parent, name, pc.now_ns)], None

    return plan


def rename(sp: int, sn: bytes, dp: int, dn: bytes, flags: int = 0) -> Planner[None]:
    """rename(2)/renameat2(2) of `sn` in `sp` to `dn` in `dp` (RENAME_NOREPLACE,
    RENAME_EXCHANGE)."""
    check_name(dn)
    check_name_len(sn)
    if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
        raise FsError("bad flags", errno.EINVAL)

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        need_dir(view, sp)
        need_dir(view, dp)
        src = view.lookup(sp, sn)
        if src is None:
            raise FsError("no such entry", errno.ENOENT)
        sa = need(view, src)
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
            da = need(view, dst)
            if da.is_dir and view.is_ancestor(dst, sp):
                raise FsError("cannot move a directory into itself", errno.EINVAL)
            return [replace(op, exchange=True)], None
        if dst is not None:
            da = need(view, dst)
            if sa.is_dir and not da.is_dir:
                raise FsError("not a directory", errno.ENOTDIR)
            if not sa.is_dir and da.is_dir:
                raise FsError("is a directory", errno.EISDIR)
            if da.is_dir and not view.is_empty_dir(dst):
                raise FsError("directory not empty", errno.ENOTEMPTY)
        return [op], None

    return plan
