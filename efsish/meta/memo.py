"""The memo: committed attributes, name lookups, xattrs and layouts kept in memory, so
that a lookup, getattr, getxattr or read of something already read costs no
worker-thread hop.

Rules it keeps:
- Every applied entry, ours or another mount's, drops what it changed (`applied`) and
  bumps a generation; a read that began before an apply does not store what it saw (it
  may have read the view before that entry).
- The hop that applied an entry re-reads what it changed (`fresh`, at most FRESH_LIMIT
  items) and `applied` puts that in, so the kernel's next question (a new inode's
  attributes, its directory's) is answered from memory.
- A directory is *complete* while every name in it is remembered (absent names as
  absent): one this mount saw created, empty, and whose every change since was refilled.
  A lookup of a new name there is answered from memory; a change that is only forgotten
  takes the directory out of that set.
- The tree's shape: the parents of inodes (a directory's one parent, a file's parents
  when all are known), so the lease domains of an inode (efsish.meta.domains) are
  computed in memory. Parents change only with dentries, so an entry that changes no
  name (a write, a chmod, access times) keeps them; one that does drops the parents of
  each inode it changed: a rename, link or unlink changes the ctime or nlink of the
  inode it moves, so its inode is in `ApplyResult.inodes`, and a moved directory's
  subtree is re-walked through it. A directory has one dentry, so one whose parent
  holds no changed name keeps its parent (a create in it changes only its times). A new
  inode's one parent is put in from its name.
- Short layouts (at most EXTENT_MEMO_MAX extents, inline bytes included) of files read
  or written here, so that the first read after an open costs no hop. Only an
  entry that changes a file's data (`ApplyResult.data`: a write, a truncate) or frees
  it changes its extents; it drops them, and `fresh` re-reads a short layout.
- A directory listing (`readdir`) stores what it read: each entry's name, attributes,
  whether it has any xattr at all, and its parent. `ls -l` asks for every entry's
  attributes and two xattrs next, and is answered from memory.
- Each table holds at most MEMO_LIMIT items; past that it is cleared. Layouts are
  bounded by bytes instead (EXTENT_MEMO_BYTES), the oldest dropped first.

This module owns that state and those rules. It must not read the view on its own: the
reads it stores run through the `read` its caller passes (committed state, as
`MetaLog.read` gives), and `fresh` runs in the writer's worker thread that applied the
entry. It must not decide when an entry counts as applied (efsish.meta.log does), and
everything but `fresh` runs on the trio thread.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from efsish.meta.domains import MAX_DEPTH, TOP, Domain
from efsish.meta.view import ROOT_INO, ApplyResult, Attr, Extent, View

log = logging.getLogger(__name__)

T = TypeVar("T")

MEMO_LIMIT = 200_000  # inodes and names remembered in memory (cleared when exceeded)
FRESH_LIMIT = 64  # entries changing more inodes + names than this only clear the memo
# Layouts kept: at most this many extents each, this many bytes in all (inline data
# counted, and EXTENT_OVERHEAD per extent); the oldest go first.
EXTENT_MEMO_MAX = 16
EXTENT_MEMO_BYTES = 32 * 1024**2
EXTENT_OVERHEAD = 200
END = 1 << 63  # the end of a layout read whole
# A file's layout as read: the extents overlapping [start, end), all of them.
Span = tuple[int, int, list[Extent]]
# What `Memo.fresh` read after a commit: new attributes, the names' new inodes, and the
# new layouts of files whose data changed (None: too long to keep).
Fresh = tuple[
    dict[int, Attr | None], dict[tuple[int, bytes], int | None], dict[int, list[Extent] | None]
]
# Where an inode is linked: (is a directory, the directories holding its dentries).
Parents = tuple[bool, tuple[int, ...]]
# A listing's rows: (cursor, name, attributes, has at least one xattr).
Listed = list[tuple[int, bytes, Attr, bool]]


def read_parents(view: View, ino: int) -> dict[int, Parents]:
    """(In a worker thread) the parents of `ino` and of every directory above them up to
    the root, as `Memo.domains` walks them; an inode the view does not hold (or a
    directory with no dentry: a damaged chain) is left out."""
    out: dict[int, Parents] = {}
    todo = [ino]
    while todo and len(out) <= MAX_DEPTH:
        cur = todo.pop()
        if cur in out:
            continue
        if cur == ROOT_INO:
            out[cur] = (True, (ROOT_INO,))
            continue
        rows = view.db.execute(
            "SELECT i.mode, d.parent FROM inodes i LEFT JOIN dentries d ON d.ino = i.ino "
            "WHERE i.ino = ?",
            (cur,),
        ).fetchall()
        parents = tuple(sorted({int(p) for _, p in rows if p is not None}))
        if not rows or not parents:
            continue
        is_dir = stat.S_ISDIR(rows[0][0])
        out[cur] = (is_dir, parents[:1] if is_dir else parents)
        todo.extend(p for p in parents if p not in out)
    return out


def read_listing(view: View, ino: int, after: int, limit: int) -> Listed:
    """(In a worker thread) a directory's entries after cursor `after`, with their
    attributes and whether they have any xattr: one query."""
    return [
        (int(r[0]), bytes(r[1]), Attr(*r[2:14]), bool(r[14]))
        for r in view.db.execute(
            "SELECT d.id, d.name, i.ino, i.mode, i.uid, i.gid, i.nlink, i.size, i.rdev, "
            "i.atime, i.mtime, i.ctime, i.version, i.target, "
            "EXISTS (SELECT 1 FROM xattrs x WHERE x.ino = i.ino) "
            "FROM dentries d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? AND d.id > ? ORDER BY d.id LIMIT ?",
            (ino, after, limit),
        )
    ]


class ReadView(Protocol):
    """Runs `fn(view)` on committed state (in a worker thread) and returns its result."""

    def __call__(self, fn: Callable[[View], T], /) -> Awaitable[T]: ...


class _AllXattrs(dict[bytes, bytes | None]):
    """A remembered xattr set that is complete (a name not in it is absent), e.g. the
    empty set of an inode this mount saw created."""


class Memo:
    """What this mount remembers of the committed view. See the module docstring."""

    def __init__(self) -> None:
        self._attrs: dict[int, Attr] = {}
        self._names: dict[tuple[int, bytes], int | None] = {}
        self._xattrs: dict[int, dict[bytes, bytes | None]] = {}
        self._complete: set[int] = set()  # directories whose every name is in `_names`
        self._parents: dict[int, Parents] = {}  # see `domains`
        self._extents: dict[int, Span] = {}  # see `extents` (oldest first)
        self._extent_bytes = 0
        self._gen = 0  # bumped by every apply: see `applied`
        self.hits = 0  # answers given from memory

    # ------------------------------------------------------------------------ answers

    async def getattr(self, ino: int, read: ReadView) -> Attr | None:
        """The committed attributes of `ino` (a copy: callers may change it)."""
        a = self._attrs.get(ino)
        if a is not None:
            self.hits += 1
        else:
            gen = self._gen
            a = await read(lambda view: view.getattr(ino))
            if a is None:
                return None
            if gen == self._gen:
                self._remember(ino, a)
        return a.copy()

    def known_size(self, ino: int | None = None, entry: tuple[int, bytes] | None = None) -> int:
        """The size of inode `ino`, or of the inode `entry` (parent, name) names, if
        the memo holds it; 0 otherwise. No read: for deciding how to run a change."""
        if entry is not None:
            ino = self._names.get(entry)
        a = None if ino is None else self._attrs.get(ino)
        return 0 if a is None else a.size

    async def lookup(self, parent: int, name: bytes, read: ReadView) -> Attr | None:
        """The committed attributes of the entry `name` in `parent`, or None."""
        key = (parent, name)
        if key in self._names or parent in self._complete:
            ino = self._names.get(key)
            if ino is None:
                self.hits += 1
                return None
            a = self._attrs.get(ino)
            if a is not None:
                self.hits += 1
                return a.copy()

        def q(view: View) -> tuple[int | None, Attr | None]:
            ino = view.lookup(parent, name)
            return ino, None if ino is None else view.getattr(ino)

        gen = self._gen
        ino, a = await read(q)
        if gen == self._gen:
            if len(self._names) >= MEMO_LIMIT:
                self._forget_names()
            self._names[key] = ino
            if ino is not None and a is not None:
                self._remember(ino, a)
        return None if a is None else a.copy()

    async def getxattr(self, ino: int, name: bytes, read: ReadView) -> bytes | None:
        """The committed value of xattr `name` of `ino`, or None."""
        known = self._xattrs.get(ino)
        if known is not None and (name in known or type(known) is _AllXattrs):
            self.hits += 1
            return known.get(name)
        gen = self._gen
        value = await read(lambda view: view.getxattr(ino, name))
        if gen == self._gen:
            if len(self._xattrs) >= MEMO_LIMIT:
                self._xattrs.clear()
            self._xattrs.setdefault(ino, {})[name] = value
        return value

    async def domains(self, ino: int, lease_depth: int, read: ReadView) -> set[Domain]:
        """The lease domains of `ino` as efsish.meta.domains.domains_of_inode computes
        them from the committed view (empty for an inode the view does not hold or a
        damaged parent chain), from the parents in memory: a worker-thread hop only
        for a part of the tree not walked yet."""
        doms = _domains(self._parents, ino, lease_depth)
        if doms is not None:
            self.hits += 1
            return doms
        gen = self._gen
        found = await read(lambda view: read_parents(view, ino))
        if gen == self._gen:
            self._remember_parents(found)
        return _domains(found, ino, lease_depth) or set()

    async def extents(self, ino: int, start: int, end: int, read: ReadView) -> list[Extent]:
        """The committed extents of file `ino` overlapping [start, end), as
        `View.extents` reads them; a short layout read is remembered."""
        span = self._extents.get(ino)
        if span is not None and span[0] <= start and end <= span[1]:
            self.hits += 1
            return [e for e in span[2] if e.off < end and e.end > start]
        gen = self._gen
        exts = await read(lambda view: view.extents(ino, start, end))
        if gen == self._gen:
            self._remember_extents(ino, (start, end, exts))
        return list(exts)

    def _remember_extents(self, ino: int, span: Span) -> None:
        self._drop_extents(ino)
        exts = span[2]
        if len(exts) > EXTENT_MEMO_MAX:
            return
        size = EXTENT_OVERHEAD * (1 + len(exts)) + sum(len(e.data or b"") for e in exts)
        if size > EXTENT_MEMO_BYTES // 16:
            return
        kept = self._extents
        while kept and self._extent_bytes + size > EXTENT_MEMO_BYTES:
            self._drop_extents(next(iter(kept)))
        kept[ino] = span
        self._extent_bytes += size

    def _drop_extents(self, ino: int) -> None:
        span = self._extents.pop(ino, None)
        if span is not None:
            exts = span[2]
            self._extent_bytes -= EXTENT_OVERHEAD * (1 + len(exts)) + sum(
                len(e.data or b"") for e in exts
            )

    async def readdir(self, ino: int, after: int, limit: int, read: ReadView) -> Listed:
        """Directory `ino`'s entries after cursor `after` (at most `limit`), with copies
        of their attributes; what was read is remembered (see the module docstring)."""
        gen = self._gen
        rows = await read(lambda view: read_listing(view, ino, after, limit))
        if gen == self._gen and rows:
            if len(self._names) + len(rows) >= MEMO_LIMIT:
                self._forget_names()
            if len(self._xattrs) + len(rows) >= MEMO_LIMIT:
                self._xattrs.clear()
            if len(self._parents) + len(rows) >= MEMO_LIMIT:
                self._parents.clear()
            names, xattrs, parents = self._names, self._xattrs, self._parents
            for _, name, a, has_xattrs in rows:
                names[(ino, name)] = a.ino
                self._remember(a.ino, a)
                if not has_xattrs:
                    xattrs[a.ino] = _AllXattrs()
                if a.is_dir:
                    parents[a.ino] = (True, (ino,))
                elif a.nlink == 1:
                    parents[a.ino] = (False, (ino,))
            return [(c, n, a.copy(), x) for c, n, a, x in rows]
        return rows

    def _remember_parents(self, found: dict[int, Parents]) -> None:
        if len(self._parents) + len(found) >= MEMO_LIMIT:
            self._parents.clear()
        self._parents.update(found)

    def _remember(self, ino: int, a: Attr) -> None:
        if len(self._attrs) >= MEMO_LIMIT:
            self._attrs.clear()
        self._attrs[ino] = a

    # ------------------------------------------------------------------------ applies

    def fresh(self, view: View, res: ApplyResult) -> Fresh | None:
        """In the writer's worker thread, once an entry is applied to `view` (in the
        planning hop for our own entries, before the PUT): the new attributes of the
        inodes it changed and the new state of the names it changed, for `applied` to
        put in (a create changes its directory's attributes, and the kernel asks for
        them next: one worker-thread hop less per create, unlink, rename or chmod).
        Nothing for large entries (the memo then only forgets). Never raises: a failed
        refill must cost only the refill (a remote entry is committed by now). Touches
        no state of the memo."""
        changed = (res.inodes | res.data) - res.freed.keys()
        if len(changed) + len(res.entries) > FRESH_LIMIT:
            return None
        try:
            return self._read_fresh(view, changed, res.entries, res.data - res.freed.keys())
        except Exception as e:  # e.g. sqlite3.OperationalError: disk I/O error
            log.warning("could not re-read what an entry changed (%s); forgetting it", e)
            return None

    @staticmethod
    def _read_fresh(
        view: View, inodes: set[int], entries: set[tuple[int, bytes]], data: set[int]
    ) -> Fresh:
        attrs = {ino: view.getattr(ino) for ino in inodes}
        names = {(p, n): view.lookup(p, n) for p, n in entries}
        layouts: dict[int, list[Extent] | None] = {}
        for ino in data:
            exts = view.extents(ino, limit=EXTENT_MEMO_MAX + 1)
            layouts[ino] = exts if len(exts) <= EXTENT_MEMO_MAX else None
        return attrs, names, layouts

    def applied(self, res: ApplyResult, fresh: Fresh | None = None) -> None:
        """An entry was applied: drop what it changed and put in what `fresh` read.
        The caller runs this on the trio thread with nothing applied in between."""
        self._forget(res)
        self._refill(res, fresh)

    def _forget(self, res: ApplyResult) -> None:
        """Drop what an entry changed (and bump the generation: a read that began
        before must not store what it saw)."""
        self._gen += 1
        attrs, names, xattrs, parents = self._attrs, self._names, self._xattrs, self._parents
        for ino in res.inodes:
            attrs.pop(ino, None)
        if res.entries:  # parents change only with dentries (see the module docstring)
            in_dirs = {p for p, _ in res.entries}
            for ino in res.inodes:
                known = parents.get(ino)
                if known is not None and known[0] and known[1][0] not in in_dirs:
                    continue  # a directory whose one dentry is in a directory unchanged
                parents.pop(ino, None)
        for ino in res.data:
            attrs.pop(ino, None)
            self._drop_extents(ino)
        for ino in res.xattrs:
            xattrs.pop(ino, None)
        for ino in res.freed:
            attrs.pop(ino, None)
            xattrs.pop(ino, None)
            parents.pop(ino, None)
            self._drop_extents(ino)
            self._complete.discard(ino)
        for entry in res.entries:
            names.pop(entry, None)
        if len(xattrs) >= MEMO_LIMIT:
            xattrs.clear()
        for ino in res.created - res.xattrs - res.freed.keys():
            xattrs[ino] = _AllXattrs()

    def _refill(self, res: ApplyResult, fresh: Fresh | None) -> None:
        """After `_forget(res)`: put in what `fresh` read after the commit."""
        names = self._names
        if fresh is not None:
            new_attrs, new_names, layouts = fresh
            for ino, a in new_attrs.items():
                if a is not None:
                    self._remember(ino, a)
            for ino, exts in layouts.items():
                if exts is not None:
                    self._remember_extents(ino, (0, END, exts))
            if len(names) + len(new_names) >= MEMO_LIMIT:
                self._forget_names()
            else:
                names.update(new_names)
                self._complete |= res.created_dirs - res.freed.keys()
            self._new_parents(res, new_attrs, new_names)
        else:
            # The new state of these names is unknown here: their directories are no
            # longer complete in memory.
            self._complete.difference_update(p for p, _ in res.entries)

    def _new_parents(
        self,
        res: ApplyResult,
        new_attrs: dict[int, Attr | None],
        new_names: dict[tuple[int, bytes], int | None],
    ) -> None:
        """The parent of each inode the entry created with one name (a directory, or a
        file with one link), from the names re-read: its domains need no walk."""
        if not res.created:
            return
        where: dict[int, list[int]] = {}
        for (parent, _), ino in new_names.items():
            if ino is not None and ino in res.created:
                where.setdefault(ino, []).append(parent)
        if len(self._parents) + len(where) >= MEMO_LIMIT:
            self._parents.clear()
        for ino, ps in where.items():
            a = new_attrs.get(ino)
            if a is not None and len(ps) == 1 and (a.is_dir or a.nlink == 1):
                self._parents[ino] = (a.is_dir, (ps[0],))

    def _forget_names(self) -> None:
        self._names.clear()
        self._complete.clear()

    def forget_all(self) -> None:
        """Forget everything (the view was replaced or rolled back)."""
        self._gen += 1
        self._attrs.clear()
        self._forget_names()
        self._xattrs.clear()
        self._parents.clear()
        self._extents.clear()
        self._extent_bytes = 0


def _domains(parents: dict[int, Parents], ino: int, lease_depth: int) -> set[Domain] | None:
    """The domains of `ino` walked through `parents` (the rule of efsish.meta.domains),
    or None when a part of the walk is not in `parents`."""
    known = parents.get(ino)
    if known is None:
        return None
    is_dir, ps = known
    out: set[Domain] = set()
    for d in (ino,) if is_dir else ps:
        chain = [d]
        cur = d
        while True:
            up = parents.get(cur)
            if up is None:
                return None
            p = up[1][0]
            if p == cur:
                break
            chain.append(p)
            cur = p
            if len(chain) > MAX_DEPTH:
                return None
        dep = len(chain) - 1
        out.add(TOP if dep < lease_depth else chain[dep - lease_depth])
    return out
