"""The range of inode numbers this mount claimed through the log and has not handed out.

A create needs no coordination with other mounts: its planner takes the next number
from a range that an `ino` op (ClaimInodes) in one of this mount's own log entries
reserved. A claim is not a change of one domain, so the create that makes it is
committed on its own (on a lease filesystem, after the journal is flushed): at a 20 ms
store it waited 200-250 ms, once every INO_RANGE creates (docs/BENCHMARKS.md). So each
claim of a mount is twice its previous one, from INO_RANGE up to INO_RANGE_MAX: a mount
that creates 50,000 files claims 6 times rather than 49, and the numbers a mount leaves
unused are at most INO_RANGE or as many as it used (inode numbers grow at most about
twice as fast as files are created).

The committer saves the range before planning and restores it when the planned entry
does not reach the log (rolled back, lost a race, a planner failed), so that numbers of
a discarded plan are handed out again; when a PUT fails without an answer the entry may
be in the log all the same, so the rest of the range is abandoned and the next create
claims a fresh one.

This module owns that bookkeeping. It must not do I/O beyond applying its own claim to
the view it is given (in the writer's worker thread, inside the planning transaction),
and it must not know about the commit protocol: when to save, restore or abandon is the
committer's decision (efsish.meta.log).
"""

from __future__ import annotations

from dataclasses import dataclass

from efsish.meta.ops import ClaimInodes
from efsish.meta.view import ApplyResult, View

INO_RANGE = 1024  # a mount's first claim
INO_RANGE_MAX = 65536  # claims double up to this


@dataclass(frozen=True)
class SavedRange:
    """What `InodeRange.save` returns: the range as it was, for `restore`."""

    next: int
    end: int
    size: int


class InodeRange:
    """The unused rest of this mount's claimed inode range: [next, end)."""

    def __init__(self) -> None:
        self._next = 0
        self._end = 0
        self._size = INO_RANGE  # of the next claim

    def take(self, view: View) -> tuple[int, ClaimInodes | None]:
        """The next inode number, and the claim of a new range if this one was used up
        (already applied to `view`; it must go into the same log entry, before the op
        that uses the number)."""
        claim: ClaimInodes | None = None
        if self._next >= self._end:
            start = int(view.get_meta("next_ino"))
            claim = ClaimInodes(start, self._size)
            view.apply_op(claim, ApplyResult())
            self._next, self._end = start, start + self._size
            self._size = min(2 * self._size, INO_RANGE_MAX)
        ino = self._next
        self._next += 1
        return ino, claim

    def save(self) -> SavedRange:
        return SavedRange(self._next, self._end, self._size)

    def restore(self, saved: SavedRange) -> None:
        """Back to `saved`: what was taken since (and any range claimed since) was never
        committed, so those numbers are free to hand out again."""
        self._next, self._end, self._size = saved.next, saved.end, saved.size

    def abandon(self) -> None:
        """Never hand out the rest of this range: an entry that used it may be in the log
        although its PUT reported no success. The next `take` claims a new range."""
        self._next = self._end
