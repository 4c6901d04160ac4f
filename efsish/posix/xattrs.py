"""Extended attribute planners: setxattr and removexattr with their flags and limits,
POSIX ACLs (an access ACL equivalent to a mode is stored as the mode), the refusal of
other system.* names, and which names a listing shows.

This module owns the xattr rules the kernel leaves to the filesystem. It must not do
I/O, touch trio or import anything above efsish.meta (see efsish.posix).
"""

from __future__ import annotations

import errno

from efsish import acl
from efsish.acl import ACL_ACCESS, ACL_DEFAULT
from efsish.errors import FsError
from efsish.meta.ops import Op, RemoveXattr, SetAttr, SetXattr
from efsish.meta.planning import PlanContext, Planner
from efsish.meta.view import View
from efsish.posix.rules import (
    XATTR_CREATE,
    XATTR_NAME_MAX,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    Ctx,
    need,
)


def other_system_xattr(name: bytes) -> bool:
    """A system.* name other than the POSIX ACLs. The kernel checks no permission for
    system.* names (it leaves them to the filesystem), and ext4 knows no others: they are
    refused (EOPNOTSUPP), or any user could attach data to any file they can see."""
    return name.startswith(b"system.") and name not in (ACL_ACCESS, ACL_DEFAULT)


def setxattr(ino: int, name: bytes, value: bytes, flags: int = 0) -> Planner[None]:
    """Set xattr `name` of `ino` (XATTR_CREATE, XATTR_REPLACE)."""
    if len(name) > XATTR_NAME_MAX or not name:
        raise FsError("xattr name too long", errno.ERANGE)
    if len(value) > XATTR_SIZE_MAX:
        raise FsError("xattr value too large", errno.E2BIG)
    if other_system_xattr(name):
        raise FsError("unsupported system.* xattr", errno.EOPNOTSUPP)

    access = acl.parse_acl(value) if name == ACL_ACCESS else None
    if name in (ACL_ACCESS, ACL_DEFAULT) and (
        (access is None and name == ACL_ACCESS) or not acl.valid(value)
    ):
        raise FsError("invalid ACL", errno.EINVAL)

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        a = need(view, ino)
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

    return plan


def removexattr(ino: int, name: bytes, ctx: Ctx) -> Planner[None]:
    """Remove xattr `name` of `ino`."""

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        a = need(view, ino)
        if view.getxattr(ino, name) is None:
            if other_system_xattr(name):
                raise FsError("unsupported system.* xattr", errno.EOPNOTSUPP)
            raise FsError("no such xattr", errno.ENODATA)
        if other_system_xattr(name) and ctx.uid not in (0, a.uid):
            # One stored before system.* names were refused: its owner (or root)
            # may remove it, nobody else.
            raise FsError("not the owner", errno.EPERM)
        return [RemoveXattr(ino, name, pc.now_ns)], None

    return plan


def listed(names: list[bytes], ctx: Ctx) -> list[bytes]:
    """The xattr names a listing by `ctx` shows. The kernel keeps trusted.* from
    everyone but root, except in listings, which it leaves to the filesystem (ext4
    hides them too)."""
    if ctx.uid != 0:
        return [n for n in names if not n.startswith(b"trusted.")]
    return names
