"""The range of inode numbers this mount claimed through the log and has not handed out.

A create needs no coordination with other mounts: its planner takes the next number
from a range that an `ino` op (ClaimInodes) in one of this mount's own log entries
reserved. A claim is not a change of one domain, so a create that makes it is committed
on its own (on a lease filesystem, after the journal is flushed): at a 20 ms store it
waited 200-400 ms (docs/BENCHMARKS.md). Two things keep creates from waiting for one:
- each claim of a mount is twice its previous one, from INO_RANGE up to INO_RANGE_MAX:
  a mount that creates 50,000 files claims 6 times rather than 49 (with the range
  claimed ahead, a mount leaves unused at most about twice as many numbers as it used,
  plus 2.5 INO_RANGE: inode numbers are 64-bit);
- on a lease filesystem the next range is claimed ahead, once half of the current one
  is used (`wants_spare`), by an entry of its own that waits for no journal flush and
  holds the writer lock only to plan and record it (efsish.meta.log); once it landed
  (`add_spare`), `take` moves on to it when the current one ends.

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
    start: int
    spare: tuple[int, int] | None


class InodeRange:
    """The unused rest of this mount's claimed inode range, [next, end) of [start, end),
    and the range claimed ahead to follow it (`spare`)."""

    def __init__(self) -> None:
        self._start = self._next = self._end = 0
        self._size = INO_RANGE  # of the next claim
        self._spare: tuple[int, int] | None = None

    def _claim(self, view: View) -> ClaimInodes:
        """Claim the next range in `view` (applied there)."""
        claim = ClaimInodes(int(view.get_meta("next_ino")), self._size)
        view.apply_op(claim, ApplyResult())
        self._size = min(2 * self._size, INO_RANGE_MAX)
        return claim

    def take(self, view: View) -> tuple[int, ClaimInodes | None]:
        """The next inode number, and the claim of a new range if this one was used up
        and none was claimed ahead (already applied to `view`; it must go into the same
        log entry, before the op that uses the number)."""
        claim: ClaimInodes | None = None
        if self._next >= self._end:
            if self._spare is not None:
                (self._start, self._end), self._spare = self._spare, None
            else:
                claim = self._claim(view)
                self._start, self._end = claim.start, claim.start + claim.n
            self._next = self._start
        ino = self._next
        self._next += 1
        return ino, claim

    def wants_spare(self) -> bool:
        """Half the current range is used and the next is not claimed yet."""
        return self._spare is None and self._end > 0 and 2 * self._next >= self._start + self._end

    def spare_size(self) -> int:
        """How many numbers the range claimed ahead is to hold."""
        return self._size

    def add_spare(self, claim: ClaimInodes) -> None:
        """`claim`, a range this mount claimed ahead, is in the log and applied: it follows
        the current range (and later claims are twice its size)."""
        self._spare = (claim.start, claim.start + claim.n)
        self._size = max(self._size, min(2 * claim.n, INO_RANGE_MAX))

    def save(self) -> SavedRange:
        return SavedRange(self._next, self._end, self._size, self._start, self._spare)

    def restore(self, saved: SavedRange) -> None:
        """Back to `saved`: what was taken since (and any range claimed since) was never
        committed, so those numbers are free to hand out again."""
        self._next, self._end, self._size = saved.next, saved.end, saved.size
        self._start, self._spare = saved.start, saved.spare

    def abandon(self) -> None:
        """Never hand out the rest of this range: an entry that used it may be in the log
        although its PUT reported no success. The range claimed ahead goes too (it is in
        the log: only numbers left unused). The next `take` claims a new range."""
        self._next = self._end
        self._spare = None
