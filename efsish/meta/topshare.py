"""This mount's share of the top (docs/design/LEASES.md §17): whether it may answer a read
of the top (the root and the directories above the domain roots) from its view with no
request, when to take a share again after a change of the top ended it, and, when a
change of ours ended other mounts' shares, the wait for their acknowledgements before
that change is answered.

The replicated part (the `shares` table, `lshr`, revocation at apply) is
efsish.meta.leasing's; nudges travel through efsish.meta.leasenudges. This module keeps
only local state, on the trio thread; every validity comparison and wait uses the lease
clock. It must not know POSIX rules or import pyfuse3.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from efsish.meta.view import ApplyResult, Holder, View

log = logging.getLogger(__name__)

RESHARE_AFTER = 2.0  # after a revocation, no new share for this long (lease clock)
CONTENDED_WINDOW = 60.0  # a second revocation within this starts a cool-down
COOL_DOWN_FIRST = 10.0
COOL_DOWN_MAX = 300.0


def share_time(lease_time: float) -> float:
    """S: how long a proof keeps a share valid (L / 3: 5 s for the default L)."""
    return lease_time / 3


@dataclass
class _Revocation:
    """A change of ours at `seq` ended these incarnations' shares at lease-clock `at`."""

    seq: int
    holders: set[Holder]
    at: float


@dataclass
class TopShare:
    """One mount's share of the top. See the module docstring."""

    me: Callable[[], Holder]
    clock: Callable[[], float]
    lease_time: float
    held: bool = False
    valid_until: float = -1.0
    revocations: int = 0  # times a change of another mount ended our share
    ack_timeouts: int = 0  # revoked mounts that did not acknowledge within 2 x S
    lapses: int = 0
    _cool_until: float = 0.0
    _cool_len: float = 0.0
    _revoked_at: list[float] = field(default_factory=list)
    _pending: list[_Revocation] = field(default_factory=list)
    _acked: dict[Holder, int] = field(default_factory=dict)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def s(self) -> float:
        return share_time(self.lease_time)

    # ------------------------------------------------------------------ reading

    def valid(self) -> bool:
        """Whether a read of the top may be answered from the view now. Call it after
        the view was read, immediately before the reply, with no await in between."""
        return self.held and self.valid_until > self.clock()

    def renewed(self, sent: float) -> None:
        """A proof sent at lease-clock `sent` with every earlier entry applied (§7)."""
        if self.held:
            self.valid_until = max(self.valid_until, sent + self.s)

    def lapse(self) -> None:
        """Leases lapsed (fenced, rebuilt, the store `Date` guard): until the next proof."""
        self.valid_until = -1.0
        self.lapses += 1

    def may_take(self) -> bool:
        """Whether a read of the top that would catch up should take a share instead."""
        return not self.held and self.clock() >= self._cool_until

    # ------------------------------------------------------------ the view changed

    def refresh(self, view: View) -> None:
        """Re-read our row after an entry changed shares (trio thread, no hop running)."""
        held = self.me() in view.shares()
        if self.held and not held:
            self.valid_until = -1.0
        self.held = held

    def revoked(self) -> None:
        """A change of the top by another mount ended our share: a pause before the
        next one, and a cool-down when it keeps happening (§17, as §8)."""
        self.revocations += 1
        now = self.clock()
        times = [t for t in self._revoked_at if now - t < CONTENDED_WINDOW]
        times.append(now)
        self._revoked_at = times
        wait = RESHARE_AFTER
        if len(times) >= 2:
            self._cool_len = min(COOL_DOWN_MAX, 2 * self._cool_len or COOL_DOWN_FIRST)
            wait = self._cool_len
        elif self._cool_until + CONTENDED_WINDOW < now:
            self._cool_len = 0.0
        self._cool_until = now + wait

    # ------------------------------------------------------------ our changes

    def changed_top(self, res: ApplyResult) -> set[Holder]:
        """An entry just applied (ours or another's) ended these shares of other mounts:
        until each acknowledges it or 2 x S has passed, this mount answers no change."""
        assert res.revoker is not None
        gone = res.revoked - {self.me()}
        if gone:
            self._pending.append(_Revocation(res.revoker[1], set(gone), self.clock()))
        return gone

    def acked(self, who: Holder, seq: int) -> None:
        """`who` says (a nudge) it has applied the log up to `seq`."""
        if self._acked.get(who, -1) < seq:
            self._acked[who] = seq
            self._changed.set()
            self._changed = trio.Event()

    def _open(self) -> list[_Revocation]:
        """Revocations still waiting for an ack or for 2 x S (dropped once settled)."""
        now = self.clock()
        left = []
        for r in self._pending:
            r.holders = {h for h in r.holders if self._acked.get(h, -1) < r.seq}
            if not r.holders:
                continue
            if now - r.at >= 2 * self.s:
                self.ack_timeouts += len(r.holders)
                log.warning(
                    "%s did not acknowledge the change of the top at log entry %d within "
                    "%.0fs (nudges not arriving? check that UDP reaches the address in its "
                    "heartbeat); answered after the wait",
                    ", ".join(f"{c}/{i}" for c, i in sorted(r.holders)),
                    r.seq,
                    2 * self.s,
                )
                continue
            left.append(r)
        self._pending = left
        return left

    def waiting_for(self) -> list[tuple[Holder, int]]:
        """(incarnation, position) of every acknowledgement still awaited."""
        return [(h, r.seq) for r in self._pending for h in r.holders]

    async def settle(self, poll: Callable[[], Awaitable[None]] | None = None) -> None:
        """Return once every share our changes ended is acknowledged or has lapsed (at
        most 2 x S after the change landed): only then is such a change answered.
        `poll`, if given, reads the log between checks (acknowledgements there)."""
        while True:
            left = self._open()
            if not left:
                return
            wait = min(r.at + 2 * self.s for r in left) - self.clock()
            changed = self._changed
            with trio.move_on_after(max(0.0, min(wait, 0.05)) + 0.001):
                await changed.wait()
            if poll is not None:
                await poll()
