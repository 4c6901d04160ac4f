"""Lease domains (docs/design/LEASES.md §3): which part of the tree a lease covers.

A directory at depth `lease_depth` (the root is depth 0) is a *domain root*; its domain,
named by the root's inode number, is its subtree: every dentry in a directory of the
subtree and every directory inode of it (the root's own attributes included). Every
directory shallower than that, and its dentries, is the *top* (None here), which is
never leased. A non-directory inode belongs to the domains of every directory it is
linked in (two or more: a multi-domain inode).

Everything here is computed from the view alone, by walking directory parents, so every
replayer computes the same domains at the same log position. This module reads the view
and never changes it; View.apply_entry uses it to check an entry's claims.
"""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from efsish.meta.view import Attr, View

DEFAULT_LEASE_DEPTH = 1
TOP = None  # the domain of everything above the domain roots: never leased
MAX_DEPTH = 100_000  # a longer parent chain means a cycle: the view is damaged

Domain = int | None  # a domain root's inode number, or TOP


def _chain(view: View, d: int) -> list[int]:
    """Directory `d` and its ancestors, up to and including the root (the one directory
    that is its own parent)."""
    chain = [d]
    cur = d
    while True:
        parent = view.parent_of(cur)
        if parent is None:
            raise ValueError(f"directory {cur} has no parent")
        if parent == cur:
            break
        chain.append(parent)
        cur = parent
        if len(chain) > MAX_DEPTH:
            raise ValueError(f"directory {d} has no way up to the root")
    return chain


def depth(view: View, d: int) -> int:
    """The depth of directory `d` (the root is 0)."""
    return len(_chain(view, d)) - 1


def domain_of_dir(view: View, d: int) -> Domain:
    """The domain directory `d` (and every dentry in it) belongs to."""
    chain = _chain(view, d)
    dep = len(chain) - 1
    if dep < view.lease_depth:
        return TOP
    return chain[dep - view.lease_depth]


def domains_of_inode(view: View, ino: int) -> set[Domain]:
    """The domains an inode's own rows (attributes, layout, xattrs) belong to: a
    directory's domain, or the domains of every directory a file is linked in. Empty
    for an inode the view does not hold."""
    parent = view.born_parent(ino)
    if parent is not None:
        return {domain_of_dir(view, parent)}
    attr = view.getattr(ino)
    if attr is None:
        return set()
    return domains_of_attr(view, attr)


def domains_of_attr(view: View, attr: Attr, known: dict[int, Domain] | None = None) -> set[Domain]:
    """`domains_of_inode` of an inode the view holds, its attributes already read;
    `known`: directories whose domain the caller has just computed."""
    if stat.S_ISDIR(attr.mode):
        return {domain_of_dir(view, attr.ino)}
    parents = [
        int(r[0])
        for r in view.db.execute("SELECT DISTINCT parent FROM dentries WHERE ino = ?", (attr.ino,))
    ]
    known = known or {}
    return {known[p] if p in known else domain_of_dir(view, p) for p in parents}


def is_domain_root(view: View, ino: int) -> bool:
    attr = view.getattr(ino)
    return attr is not None and stat.S_ISDIR(attr.mode) and domain_of_dir(view, ino) == ino


def roots_in(view: View, d: int, at_depth: int | None = None) -> set[int]:
    """The domain roots in the subtree of directory `d` (`d` included), taking `d` to
    be at depth `at_depth` (default: where it is now)."""
    dep = depth(view, d) if at_depth is None else at_depth
    want = view.lease_depth - dep
    if want < 0:
        return set()
    level = {d}
    for _ in range(want):
        if not level:
            break
        marks = ",".join("?" * len(level))
        level = {
            int(r[0])
            for r in view.db.execute(
                f"SELECT d.ino FROM dentries d JOIN inodes i ON i.ino = d.ino "
                f"WHERE d.parent IN ({marks}) AND (i.mode & ?) = ?",
                (*sorted(level), 0o170000, stat.S_IFDIR),
            )
        }
    return level


def subtree_domains(view: View, d: int) -> set[Domain]:
    """The domains the subtree of directory `d` lies in: its own domain if it is in
    one, else (`d` in the top) the domains rooted below it."""
    own = domain_of_dir(view, d)
    if own is not TOP:
        return {own}
    return {TOP, *roots_in(view, d)}
