"""The memo: committed attributes, name lookups and xattrs kept in memory, so that a
lookup, getattr or getxattr of something already read costs no worker-thread hop.

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
- Each table holds at most MEMO_LIMIT items; past that it is cleared.

This module owns that state and those rules. It must not read the view on its own: the
reads it stores run through the `read` its caller passes (committed state, as
`MetaLog.read` gives), and `fresh` runs in the writer's worker thread that applied the
entry. It must not decide when an entry counts as applied (efsish.meta.log does), and
everything but `fresh` runs on the trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol, TypeVar

from efsish.meta.view import ApplyResult, Attr, View

log = logging.getLogger(__name__)

T = TypeVar("T")

MEMO_LIMIT = 200_000  # inodes and names remembered in memory (cleared when exceeded)
FRESH_LIMIT = 64  # entries changing more inodes + names than this only clear the memo
# What `Memo.fresh` read after a commit: new attributes, and the names' new inodes.
Fresh = tuple[dict[int, Attr | None], dict[tuple[int, bytes], int | None]]


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
        return replace(a)

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
                return replace(a)

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
        return None if a is None else replace(a)

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
            return self._read_fresh(view, changed, res.entries)
        except Exception as e:  # e.g. sqlite3.OperationalError: disk I/O error
            log.warning("could not re-read what an entry changed (%s); forgetting it", e)
            return None

    @staticmethod
    def _read_fresh(view: View, inodes: set[int], entries: set[tuple[int, bytes]]) -> Fresh:
        attrs = {ino: view.getattr(ino) for ino in inodes}
        names = {(p, n): view.lookup(p, n) for p, n in entries}
        return attrs, names

    def applied(self, res: ApplyResult, fresh: Fresh | None = None) -> None:
        """An entry was applied: drop what it changed and put in what `fresh` read.
        The caller runs this on the trio thread with nothing applied in between."""
        self._forget(res)
        self._refill(res, fresh)

    def _forget(self, res: ApplyResult) -> None:
        """Drop what an entry changed (and bump the generation: a read that began
        before must not store what it saw)."""
        self._gen += 1
        attrs, names, xattrs = self._attrs, self._names, self._xattrs
        for ino in res.inodes:
            attrs.pop(ino, None)
        for ino in res.data:
            attrs.pop(ino, None)
        for ino in res.xattrs:
            xattrs.pop(ino, None)
        for ino in res.freed:
            attrs.pop(ino, None)
            xattrs.pop(ino, None)
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
            new_attrs, new_names = fresh
            for ino, a in new_attrs.items():
                if a is not None:
                    self._remember(ino, a)
            if len(names) + len(new_names) >= MEMO_LIMIT:
                self._forget_names()
            else:
                names.update(new_names)
                self._complete |= res.created_dirs - res.freed.keys()
        else:
            # The new state of these names is unknown here: their directories are no
            # longer complete in memory.
            self._complete.difference_update(p for p, _ in res.entries)

    def _forget_names(self) -> None:
        self._names.clear()
        self._complete.clear()

    def forget_all(self) -> None:
        """Forget everything (the view was replaced or rolled back)."""
        self._gen += 1
        self._attrs.clear()
        self._forget_names()
        self._xattrs.clear()
