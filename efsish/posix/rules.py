"""The limits of names, links and xattrs, the caller's identity (Ctx), and the checks
every planner shares.

This module owns those POSIX rules. It must not do I/O or import above efsish.meta.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from efsish.errors import FsError
from efsish.meta.view import Attr, View

NAME_MAX = 255
SYMLINK_MAX = 4095  # PATH_MAX - 1, as Linux filesystems (the kernel refuses longer ones)
LINK_MAX = 177  # EFS's limit on hard links to one file
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_CREATE = 1
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Ctx:
    """Who is asking: the caller's uid/gid, and for a create the caller's umask when
    efsish applies it (FUSE_DONT_MASK in effect), None when the kernel already has."""

    uid: int = 0
    gid: int = 0
    umask: int | None = None


def check_name_len(name: bytes) -> None:
    """ENAMETOOLONG for a name longer than NAME_MAX (names looked up or removed)."""
    if len(name) > NAME_MAX:
        raise FsError("name too long", errno.ENAMETOOLONG)


def check_name(name: bytes) -> None:
    """A name a new entry may have."""
    check_name_len(name)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError("invalid name", errno.EINVAL)


def need(view: View, ino: int) -> Attr:
    """The attributes of `ino`; ENOENT if the view has no such inode."""
    a = view.getattr(ino)
    if a is None:
        raise FsError("no such inode", errno.ENOENT)
    return a


def need_dir(view: View, ino: int) -> Attr:
    """The attributes of directory `ino`; ENOENT, or ENOTDIR if it is something else."""
    a = need(view, ino)
    if not a.is_dir:
        raise FsError("not a directory", errno.ENOTDIR)
    return a
