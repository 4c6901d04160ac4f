"""Attribute planners: chmod/chown/utimens/truncate (setattr), the batched access
times, and the layout a flush commits (a file's new extents and size with the
attribute changes deferred until then).

This module owns the POSIX rules of attribute changes (chown clears set-user-ID, a
truncate is of regular files only). It must not do I/O, touch trio, or change
open-file state (a flush's planner only reads its pending uploads): the facade
(efsish.filesystem) decides whether a change is deferred to the file's next flush or
made to the snapshot of a file unlinked while open.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from efsish.data.openfile import Pending
from efsish.errors import FsError
from efsish.meta.ops import Op, SetAttr, Write
from efsish.meta.planning import PlanContext, Planner
from efsish.meta.view import Attr, View
from efsish.posix.rules import need


@dataclass(frozen=True)
class Change:
    """What a setattr asks for; None leaves that attribute as it is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | None = None
    mtime: int | None = None


def attr_changes(a: Attr, ch: Change) -> dict[str, int]:
    """The attribute values the chmod/chown/utimens part of `ch` sets on `a` (POSIX
    rules; the size is the caller's)."""
    mode, uid, gid = ch.mode, ch.uid, ch.gid
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
    if ch.atime is not None:
        out["atime"] = ch.atime
    if ch.mtime is not None:
        out["mtime"] = ch.mtime
    return out


def setattr_plan(ino: int, ch: Change) -> Planner[None]:
    """setattr of `ino` committed on its own; the result (`pc.after`) is its new
    attributes."""

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        a = need(view, ino)
        changes: dict[str, int] = {"ctime": pc.now_ns}
        if ch.size is not None:
            if a.is_dir:
                raise FsError("is a directory", errno.EISDIR)
            if not a.is_reg:
                raise FsError("not a regular file", errno.EINVAL)
            changes["size"] = ch.size
            changes["mtime"] = pc.now_ns
        changes.update(attr_changes(a, ch))
        pc.after = lambda v: v.getattr(ino)
        return [SetAttr(ino, **changes)], None

    return plan


def atimes(due: Mapping[int, int]) -> Planner[None]:
    """The access times reads made due (inode -> time), each only if it moves the
    inode's atime forward; inodes gone meanwhile are skipped."""

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        ops: list[Op] = []
        for ino, t in due.items():
            a = view.getattr(ino)
            if a is not None and a.atime < t:
                ops.append(SetAttr(ino, atime=t))
        return ops, None

    return plan


def layout(
    ino: int, pend: Sequence[Pending], size: int, mtime: int, deferred: Mapping[str, int]
) -> Planner[None]:
    """A flush: the extents of the file's uploads `pend` (read when planned), its new
    size, and the attribute changes deferred until it; nothing if the file is gone."""

    def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        if view.getattr(ino) is None:
            return [], None
        ext = tuple(p.ext for p in pend)
        ops: list[Op] = [Write(ino, ext, size, mtime)]
        if deferred:
            ops.append(SetAttr(ino, **deferred))
        return ops, None

    return plan
