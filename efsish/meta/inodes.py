"""The range of inode numbers this mount claimed through the log and has not handed out.

A create needs no coordination with other mounts: its planner takes the next number
from a range of INO_RANGE numbers that an `ino` op (ClaimInodes) in one of this mount's
own log entries reserved. The committer saves the range before planning and restores
it when the planned entry does not reach the log (rolled back, lost a race, a planner
failed), so that numbers of a discarded plan are handed out again; when a PUT fails
without an answer the entry may be in the log all the same, so the rest of the range is
abandoned and the next create claims a fresh one.

This module owns that bookkeeping. It must not do I/O beyond applying its own claim to
the view it is given (in the writer's worker thread, inside the planning transaction),
and it must not know about the commit protocol: when to save, restore or abandon is the
committer's decision (efsish.meta.log).
"""

from __future__ import annotations

from dataclasses import dataclass

from efsish.meta.ops import ClaimInodes
from efsish.meta.view import ApplyResult, View

INO_RANGE = 1024


@dataclass(frozen=True)
class SavedRange:
    """What `InodeRange.save` returns: the range as it was, for `restore`."""

    next: int
    end: int


class InodeRange:
    """The unused rest of this mount's claimed inode range: [next, end)."""

    def __init__(self) -> None:
        self._next = 0
        self._end = 0

    def take(self, view: View) -> tuple[int, ClaimInodes | None]:
        """The next inode number, and the claim of a new range if this one was used up
        (already applied to `view`; it must go into the same log entry, before the op
        that uses the number)."""
        claim: ClaimInodes | None = None
        if self._next >= self._end:
            start = int(view.get_meta("next_ino"))
            claim = ClaimInodes(start, INO_RANGE)
            view.apply_op(claim, ApplyResult())
            self._next, self._end = start, start + INO_RANGE
        ino = self._next
        self._next += 1
        return ino, claim

    def save(self) -> SavedRange:
        return SavedRange(self._next, self._end)

    def restore(self, saved: SavedRange) -> None:
        """Back to `saved`: what was taken since (and any range claimed since) was never
        committed, so those numbers are free to hand out again."""
        self._next, self._end = saved.next, saved.end

    def abandon(self) -> None:
        """Never hand out the rest of this range: an entry that used it may be in the log
        although its PUT reported no success. The next `take` claims a new range."""
        self._next = self._end
