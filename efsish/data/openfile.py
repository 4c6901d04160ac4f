"""The state this mount keeps for a file while it is open, and nothing that acts on it.

OpenFile holds one inode's write-back state (the write buffer, uploads waiting for
commit, attribute changes deferred to that commit, the first error of a background
upload), its read state (readahead, the cached committed layout) and, once the log has
freed the inode while it is still open here, the snapshot it lives on until its last
close. The read path (reader.py), uploads (writeback.py) and the POSIX facade
(filesystem.py) act on this state; this module does no I/O and must not import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from efsish.data.budget import WriteBudget
from efsish.data.dirty import DirtyBuffer
from efsish.meta.view import Attr, Extent


@dataclass
class Pending:
    """An extent waiting for commit: uploading (data held), or uploaded (key set)."""

    ext: Extent
    done: trio.Event = field(default_factory=trio.Event)
    failed: bool = False  # the upload failed: the next flush uploads it again


@dataclass
class Snapshot:
    """The attributes and layout of an inode the log has freed (unlinked, renamed over)
    while this mount still uses it: an open file lives on it until its last close, an
    inode the kernel still knows until it forgets it (a "ghost")."""

    attr: Attr
    extents: list[Extent]

    def overlapping(self, off: int, end: int) -> list[Extent]:
        return [e for e in self.extents if e.off < end and e.end > off]

    def truncate(self, size: int) -> None:
        """Drop the layout past `size` (the attributes are the caller's to change)."""
        self.extents = [e.slice(e.off, min(e.end, size)) for e in self.extents if e.off < size]


@dataclass
class ExtentCache:
    """The committed layout of [start, end) of a file as last read from the view, so that
    a sequential reader does not query SQLite (a worker-thread hop) for every FUSE read.
    Dropped whenever a log entry changes the file's data; `gen` counts those changes, so
    that an answer that a change overtook is not stored."""

    span: tuple[int, int, list[Extent]] | None = None
    gen: int = 0

    def invalidate(self) -> None:
        self.span = None
        self.gen += 1

    def get(self, off: int, end: int) -> list[Extent] | None:
        """The cached extents overlapping [off, end), or None if the cache does not
        cover all of it."""
        c = self.span
        if c is None or off < c[0] or end > c[1]:
            return None
        return [e for e in c[2] if e.off < end and e.end > off]


@dataclass
class Readahead:
    """A reader's position and its readahead window."""

    last_read_end: int = -1
    window: int = 0  # current window (bytes), 0 = not sequential
    end: int = 0  # prefetches were started up to this offset


@dataclass
class OpenFile:
    """Per-inode state while this mount has the file open."""

    ino: int
    size: int
    mtime: int
    opens: int = 0
    # write-back: bytes not uploaded, extents not committed, and the commit's lock
    dirty: DirtyBuffer = field(default_factory=DirtyBuffer)
    pending: list[Pending] = field(default_factory=list)
    modified: bool = False
    flush_lock: trio.Lock = field(default_factory=trio.Lock)
    error: BaseException | None = None  # reported at the next write/fsync/close
    dirty_since: float = 0.0  # monotonic time of the oldest change not yet committed
    # chmod/chown/utimens made while this mount holds unflushed writes to the file: they
    # are committed in the same log entry as those writes (at close/fsync), like the data.
    deferred: dict[str, int] = field(default_factory=dict)
    # the inode was freed while open here: it lives on this snapshot until the last close
    orphan: Snapshot | None = None
    # reading
    ra: Readahead = field(default_factory=Readahead)
    ext_cache: ExtentCache = field(default_factory=ExtentCache)
    stale: bool = False  # another mount changed the file: re-read its size

    def held_keys(self) -> set[str]:
        """Blocks this file may still read that the log may no longer reference."""
        keys = {p.ext.key for p in self.pending if p.ext.key is not None}
        if self.orphan is not None:
            keys.update(e.key for e in self.orphan.extents if e.key is not None)
        return keys

    def committed(self, pend: list[Pending], deferred: dict[str, int]) -> None:
        """A commit of `pend` (the oldest pending extents) and `deferred` succeeded."""
        for k, v in deferred.items():
            if self.deferred.get(k) == v:
                del self.deferred[k]
        del self.pending[: len(pend)]
        if not self.pending and not self.dirty:
            self.modified = False

    async def truncate_unlinked(self, size: int, budget: WriteBudget) -> None:
        """Drop everything past `size` of a file that lives on its snapshot, from every
        layer a read looks at: the snapshot's extents, uploads not committed (waited for,
        so that none puts its whole extent back afterwards), the write buffer. Extending
        later must read zeros there, not the old bytes."""
        assert self.orphan is not None
        for p in list(self.pending):
            await p.done.wait()
        self.orphan.truncate(size)
        for p in self.pending:
            if p.ext.off < size < p.ext.end:
                p.ext = p.ext.slice(p.ext.off, size)
        self.pending = [p for p in self.pending if p.ext.off < size]
        budget.truncate(self.dirty, size)
