"""The lease state machine of one mount (docs/design/LEASES.md §2, §6-§9): who this
mount is (client and incarnation), which domains it holds and until when it may answer
in them, which recalls it must answer, and the policy around the commit state machine
(efsish.meta.log): a change is journaled locally when every domain it touches is held
and valid, else committed as a sync entry (acquiring a FREE domain, or recalling one
another mount holds first); reads of a domain another mount holds recall it first.

Time: every validity comparison and wait uses the *lease clock* (`clock`, by default
CLOCK_BOOTTIME, which counts while the machine is suspended); wall clocks are never
used here. A domain is valid until `s + lease_time`, `s` the lease-clock time at which
the newest GET of the log that returned 404 (or PUT that landed) was sent with every
earlier entry applied, and no open recall of the domain was in the view (§7).

Nudges (§11, efsish.meta.leasenudges): a recall that lands nudges the holder, an
answer that lands nudges the recaller, so the receiver catches up at once instead of at
its next poll. They only shorten waits: every one of them also ends by polling the log.
What survives a restart and the recovery of a fenced journal (the client id, the proof
the old daemon is gone, the salvage and the recovery directory) are efsish.meta.recovery;
this module decides when they are used.

The parts that run in the writer's worker thread (`apply_remote`, `apply_own`,
`flush_entries`, `journaled_entry`) read and change only the view they are given; the
rest runs on the trio thread. This module must not know POSIX rules or import pyfuse3.

It is longer than the ~600 lines the project aims for: the journal-or-sync routing,
recalls and takeover, answering recalls, cool-downs, fencing and the flusher all read
and change one state (`state`, `valid_until`, `_oldest`, `_cool_until`, `fenced`, `inc`)
under one rule (no await between a validity check and the reply); spread over modules,
who may change that state when could no longer be read in one place.
"""

from __future__ import annotations

import errno
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from efsish.errors import EfsishError, FsError, to_errno
from efsish.meta import heartbeat, journal, leasing, recovery
from efsish.meta.leasenudges import Nudges
from efsish.meta.leasing import LeaseLost
from efsish.meta.log import MetaLog
from efsish.meta.nudge import ACK
from efsish.meta.ops import (
    JOURNALED,
    SYNC,
    LAdopt,
    LDirty,
    LFlush,
    LogEntry,
    LRec,
    LRel,
    LShr,
    LTko,
    Op,
    Sess,
    Write,
)
from efsish.meta.planning import LeaseHeader, NeedDomain, PlanContext, Planner
from efsish.meta.topshare import TopShare
from efsish.meta.view import ApplyResult, Holder, View

log = logging.getLogger(__name__)

T = TypeVar("T")

RECALL_POLL = 0.050  # seconds between polls of the log while a recall of ours is open
# ... while the holder nudges us its answer (a poll then only covers a lost datagram).
RECALL_POLL_NUDGED = 0.5
READ_GRACE = 2.0  # after releasing a domain to a read recall, no re-acquire for this (§6.4)
CONTENDED_WINDOW = 30.0  # two releases to recalls within this start a cool-down (§8)
COOL_DOWN_FIRST = 10.0
COOL_DOWN_MAX = 300.0
DATE_RESOLUTION = 1.0  # the store's Date header counts whole seconds
# While waiting for acknowledgements of a change of the top (§17), read the waited-for
# mounts' heartbeats this often (seconds).
HEARTBEAT_ACK_EVERY = 0.5


def boottime() -> float:
    """The lease clock: CLOCK_BOOTTIME (counts while suspended; LEASES.md §7 (1))."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class LeaseConfig:
    lease_time: float = 15.0  # L, from the superblock
    commit_interval: float = 1.0  # a journaled change is flushed at most this late
    lease_wait: float = 30.0  # how long a request waits for a valid lease or a recall
    lease_idle: float = 60.0  # a held domain unused this long is released
    acquire: bool = True  # False: -o sync (respects others' leases, takes none)
    nudge: str = "off"  # -o nudge=auto|off|HOST:PORT (§11)
    clock: Callable[[], float] = boottime


class Staging(Protocol):
    """The staged blocks of this mount (efsish.data.staged.StagedBlocks): data of files
    closed under a lease, uploaded in the background (LEASES.md §5)."""

    async def wait_all(self) -> None: ...

    def uploaded(self) -> set[str]: ...

    def not_uploaded(self, keys: Iterable[str]) -> list[str]: ...

    async def landed(self, keys: set[str]) -> None: ...

    async def recover(self, refs: Iterable[tuple[str, str | None]]) -> set[str]: ...


def _block_refs(rows: list[journal.Row]) -> list[tuple[str, str | None]]:
    """(key, hash) of every block the journal rows' writes reference."""
    return [
        (e.key, e.hash)
        for r in rows
        if isinstance(r.op, Write)
        for e in r.op.extents
        if e.key is not None
    ]


@dataclass
class _Recall:
    domain: int
    rid: str
    by: Holder
    want: str


@dataclass
class _State:
    """The lease rows of the view that concern this mount (refreshed after applies)."""

    held: dict[int, int] = field(default_factory=dict)  # domain -> epoch
    others: dict[int, Holder] = field(default_factory=dict)
    recalls: list[_Recall] = field(default_factory=list)  # open recalls of held domains


class Leases:
    """One mount's lease state and policy. See the module docstring."""

    def __init__(self, meta: MetaLog, cfg: LeaseConfig, cache_dir: Path) -> None:
        self.meta = meta
        self.cfg = cfg
        self.clock = cfg.clock
        self.client = meta.client_id
        self.cache_dir = cache_dir
        self.inc = 0
        self.state = _State()
        self.valid_until: dict[int, float] = {}
        self.fenced: str | None = None
        self._recall_wake = trio.Event()
        self._recalling: dict[int, trio.Event] = {}
        self._releases: dict[int, list[float]] = {}
        self._cool_until: dict[int, float] = {}
        self._cool_len: dict[int, float] = {}
        self._used: dict[int, float] = {}  # domain -> last local change (lease clock)
        self._oldest: float | None = None  # lease clock of the oldest journal row
        self.recalls_sent = 0
        self.takeovers = 0
        # (lease clock, store Date) at the last renewal that had a Date (§7 (4)).
        self._store_seen: tuple[float, float] | None = None
        self.date_lapses = 0
        self.recovered: list[str] = []  # recovery directories this mount wrote
        self._nursery: trio.Nursery | None = None
        self.nudges = Nudges(meta, cfg.nudge)
        self.recovering = False
        self._last_inc = 0  # the newest incarnation of this client when we started
        # False until this incarnation holds what its journal needs (sess, adoption):
        # until then a sync entry does not flush the journal first.
        self.ready = False
        # Staged blocks (set by the filesystem): uploaded before any entry that may
        # reference them is PUT.
        self.staging: Staging | None = None
        self._bad_blocks: set[str] = set()  # staged blocks that failed their checksum
        # The share of the top (§17): reads there without a catch-up.
        self.share = TopShare(lambda: self.me, self.clock, cfg.lease_time)
        self.nudges.on_ack = self.share.acked
        self.nudges.flush_journal = self._flush_for_reader
        meta.leases = self

    # ------------------------------------------------------------- worker thread

    def header(self) -> LeaseHeader:
        """(trio thread) How the next sync entry is written; the acquire decision is
        taken with the lease clock read now (the planning hop runs in a thread)."""
        now = self.clock()
        return LeaseHeader(self.client, self.inc, lambda d: self.can_acquire(d, now))

    def journaled_entry(self, view: View) -> LogEntry:
        """A provisional journaled entry: local changes are applied as a replayer would
        judge them in it, once `claim` has added the domains each op touches."""
        return LogEntry("", self.client, 0, [], inc=self.inc, kind=JOURNALED, claims={})

    def claim(self, view: View, entry: LogEntry, domains: Iterable[int]) -> None:
        """Claim in provisional `entry` those of `domains` this incarnation holds, at
        their epochs in the view (one held elsewhere or FREE stays unclaimed: applying
        the op then fences it, as a replayer would)."""
        claims = entry.claims if entry.claims is not None else {}
        entry.claims = claims
        me = self.me
        for d in domains:
            if d not in claims:
                holder, epoch = view.lease(d)
                if holder == me:
                    claims[d] = epoch

    def apply_remote(self, view: View, seq: int, entry: LogEntry, res: ApplyResult) -> None:
        """Apply log entry `seq` met in a catch-up (in the writer's transaction). Our
        own journaled entry whose rows are still in the journal is judged, not applied
        again, and its rows dropped; any entry that leaves journal rows in a domain we
        no longer hold raises LeaseLost (the caller rolls back: we stop before it)."""
        batch = entry.batch
        if (
            entry.client == self.client
            and entry.journaled
            and batch is not None
            and journal.covers(view, *batch)
        ):
            self.apply_own(view, seq, entry, res)
            if res.fenced is not None:
                raise LeaseLost(f"our journaled entry {seq} was fenced: {res.fenced}")
            return
        view.apply_entry(seq, entry, res)
        if res.leases or entry.client == self.client:
            lost = self._lost(view)
            if lost:
                raise LeaseLost(f"log entry {seq} {lost}")

    def apply_own(self, view: View, seq: int, entry: LogEntry, res: ApplyResult) -> None:
        """Record our own entry `seq`, just landed, whose namespace ops the view holds."""
        if entry.journaled:
            assert entry.batch is not None
            doms = journal.op_domains(view, *entry.batch)
            leasing.judge_own_journaled(view, seq, entry, doms, res)
            if res.fenced is None:
                journal.landed(view, *entry.batch, seq)
                journal.drop_through(view, entry.batch[1])
            view.set_meta("applied_seq", seq)
        else:
            view.apply_entry(seq, entry, res)

    def _lost(self, view: View) -> str:
        """Why journal rows are in a domain this incarnation does not hold, or ""."""
        doms: set[int] = set()
        for (raw,) in view.db.execute("SELECT DISTINCT domains FROM journal"):
            doms.update(json.loads(raw))
        if not doms:
            return ""
        newest = view.session(self.client)
        if self.inc and newest is not None and newest[0] > self.inc:
            return f"started incarnation {newest[0]} of this client (a copy of the cache dir?)"
        for d in sorted(doms):
            holder, _ = view.lease(d)
            if (
                holder is not None
                and holder[0] == self.client
                and holder[1] < (self.inc or 1 << 62)
            ):
                # Before our sess the journal is our last incarnation's; after it, an
                # earlier incarnation's lease is ours to adopt.
                continue
            if holder != self.me:
                who = "FREE" if holder is None else f"{holder[0]}/{holder[1]}"
                return f"left domain {d}, which has journaled changes of ours, {who}"
        return ""

    def flush_entries(
        self, view: View, extra: list[Op] | None, strict: bool, upto: int | None = None
    ) -> tuple[LogEntry | None, bool] | None:
        """The next entry that commits the journal (its rows up to jseq `upto`),
        computed from the oldest rows and the lease rows now, and whether it is the
        last (then `extra` lease ops ride in it). (None, True): nothing to flush. None
        if a row references a staged block not uploaded yet (`strict`: the caller
        waited for every upload under the writer lock, so that is a bug)."""
        rows, last = journal.first_rows(view, upto)
        if self.staging is not None:
            late = self.staging.not_uploaded(k for k, _ in _block_refs(rows))
            if late and not strict:
                return None
            if late:
                raise EfsishError(f"journal references staged blocks not uploaded: {late[:3]}")
        # An answer to a recall that is no longer open (answered already, or closed by a
        # change of holder) would fence the whole entry: drop it.
        extra = [op for op in extra or [] if last and _still_valid(view, op)]
        doms: set[int] = set().union(*(r.domains for r in rows)) if rows else set()
        extra_doms = {op.domain for op in extra if isinstance(op, (LFlush, LRel))}
        epochs: dict[int, int] = {}
        for d in sorted(doms | extra_doms):
            holder, epoch = view.lease(d)
            if holder != self.me:
                if d in doms:
                    raise LeaseLost(f"domain {d} has journaled changes but is not held")
                extra = [op for op in extra if getattr(op, "domain", None) != d]
                continue
            epochs[d] = epoch
        now = time.time_ns()
        out = journal.entries(rows, self.client, self.inc, now, epochs)
        assert len(out) <= 1  # first_rows took one entry's worth
        if extra:
            if not out:
                e = LogEntry(uuid.uuid4().hex, self.client, now, [], inc=self.inc, kind=SYNC)
                e.claims = {}
                out = [e]
            e = out[-1]
            claims = dict(e.claims or {})
            for op in extra:
                if isinstance(op, (LFlush, LRel)):
                    claims[op.domain] = epochs[op.domain]
            e.ops = [*e.ops, *extra]
            e.claims = claims or None
        return (out[0] if out else None), last

    # ---------------------------------------------------------------- trio thread

    @property
    def me(self) -> Holder:
        return (self.client, self.inc)

    def refresh(self, view: View) -> None:
        """Re-read the lease rows after an entry changed some (trio thread, under the
        write lock, no hop running)."""
        me = self.me
        st = _State()
        for d, c, i, e in view.db.execute(
            "SELECT domain, holder_client, holder_inc, epoch FROM leases "
            "WHERE holder_client IS NOT NULL"
        ):
            if (c, i) == me:
                st.held[int(d)] = int(e)
            else:
                st.others[int(d)] = (str(c), int(i))
        if st.held:
            marks = ",".join("?" * len(st.held))
            for d, rid, bc, bi, want in view.db.execute(
                f"SELECT domain, rid, by_client, by_inc, want FROM recalls "
                f"WHERE domain IN ({marks}) ORDER BY seq",
                tuple(st.held),
            ):
                st.recalls.append(_Recall(int(d), str(rid), (str(bc), int(bi)), str(want)))
        for d in list(self.valid_until):
            if st.held.get(d) != self.state.held.get(d):
                del self.valid_until[d]  # lost, or a new epoch: valid from the next proof
        self.state = st
        self.share.refresh(view)
        if st.recalls:
            self._recall_wake.set()

    def renewed(self, sent: float, store_date: float | None = None) -> None:
        """A proof sent at lease-clock time `sent` that no recall had landed (§7): held
        domains not recalled are valid until `sent + L`, unless the store's clock says
        the lease clock missed time (`store_date`, its `Date` header; None: no guard)."""
        lapsed = self.share.lapses
        if store_date is not None and self._store_clock_jumped(store_date):
            return
        if self.share.lapses == lapsed:  # the guard lapsed the share: the next proof
            self.share.renewed(sent)
        recalled = {r.domain for r in self.state.recalls}
        until = sent + self.cfg.lease_time
        for d in self.state.held:
            if d not in recalled and self.valid_until.get(d, -1.0) < until:
                self.valid_until[d] = until

    def _store_clock_jumped(self, store_date: float) -> bool:
        """The store `Date` guard (§7 (4)): True, and every lease lapsed, when the store's
        clock advanced by more than the lease clock plus L/4 (plus the header's 1 s
        resolution) since the previous answer that renewed: a VM whose clock stood still
        while paused. The next proof renews from the new pair."""
        now = self.clock()
        prev, self._store_seen = self._store_seen, (now, store_date)
        if prev is None:
            return False
        missed = (store_date - prev[1]) - (now - prev[0])
        if missed > self.share.s / 4 + DATE_RESOLUTION:
            self.share.lapse()  # S is shorter than L: its own margin (§17)
        if missed <= self.cfg.lease_time / 4 + DATE_RESOLUTION:
            return False
        self.date_lapses += 1
        self.share.lapse()
        if self.valid_until:
            log.warning(
                "the store's clock moved %.0f s more than this machine's lease clock (a "
                "paused VM?): leases treated as lapsed until the next poll renews them",
                missed,
            )
        self.valid_until.clear()
        return True

    def journal_age(self) -> float:
        """Seconds (lease clock) since the oldest change in the journal (0: empty)."""
        if not self.meta.journal_rows or self._oldest is None:
            return 0.0
        return max(0.0, self.clock() - self._oldest)

    def valid(self, domains: frozenset[int]) -> bool:
        now = self.clock()
        return all(self.valid_until.get(d, -1.0) > now for d in domains)

    def may_read_locally(self, domains: set[int | None]) -> bool:
        """Whether a read of these domains may be answered from the view with no request
        (§6.2): every one is held by this incarnation with a valid lease (no other mount
        can change it without recalling it first, which the poll sees), and the top
        (None) under a valid share (§17). Never for `-o sync` or a fenced mount. Call it
        after reading the answer, immediately before replying, with no await in between."""
        if not domains or not self.cfg.acquire or self.fenced is not None:
            return False
        if None in domains and not self.share.valid():
            return False
        now = self.clock()
        return all(
            d in self.state.held and self.valid_until.get(d, -1.0) > now
            for d in domains
            if d is not None
        )

    def may_journal(self, domains: set[int | None]) -> bool:
        """Whether a change in these domains would be journaled now (held, valid, not
        recalled): the filesystem stages a closed file's blocks only then (§5)."""
        return (
            bool(domains)
            and None not in domains
            and {d for d in domains if d is not None} <= self._ok_domains()
        )

    def _ok_domains(self) -> frozenset[int]:
        """Domains a change may be journaled in now: held, valid, not recalled (none
        for `-o sync`, which journals nothing)."""
        if self.fenced is not None or not self.cfg.acquire:
            return frozenset()
        now = self.clock()
        recalled = {r.domain for r in self.state.recalls}
        return frozenset(
            d for d in self.state.held if d not in recalled and self.valid_until.get(d, -1.0) > now
        )

    def can_acquire(self, d: int, now: float) -> bool:
        return (
            self.cfg.acquire
            and self.ready
            and self.fenced is None
            and self.inc > 0
            and self._cool_until.get(d, 0.0) <= now
        )

    # ------------------------------------------------------------------ requests

    async def submit(self, planner: Planner[T], heavy: bool = False) -> T:
        """A change: journaled locally if it can be (§6.2), else a sync entry; recalls
        a domain another mount holds first (§6.4). `heavy`: see MetaLog.submit_local."""
        start = self.clock()
        while True:
            ok = self._ok_domains()
            if ok:
                if (
                    self._oldest is not None
                    and self.clock() - self._oldest > 2 * self.cfg.commit_interval
                ):
                    await self._flush()  # backpressure by age (§6.3)
                    continue
                out = await self.meta.submit_local(planner, ok, heavy)
                if out is not None:
                    result, doms = out
                    now = self.clock()
                    if self._oldest is None:
                        self._oldest = now
                    for d in doms:
                        self._used[d] = now
                    # A change of the top another mount made may still be unseen by a
                    # mount that shares it: no change is answered before (§17).
                    await self._settle_shares()
                    # Validity, after the journal commit, with no await before the answer.
                    if not self.valid(doms):
                        await self._wait_valid(doms)
                    return result
            if self.staging is not None:
                # A sync entry may reference blocks staged for a change that was to be
                # journaled (the lease lapsed meanwhile): they go up first.
                await self.staging.wait_all()
            try:
                result2: T = await self.meta.submit(planner)
                # Not before every share a change of the top ended is acknowledged or
                # has lapsed (ours, or one we applied: §17).
                await self._settle_shares()
                if not self.meta.journal_rows:
                    self._oldest = None
                if not self.cfg.acquire and self.state.held:
                    # -o sync: a write recall handed the domain over for this change;
                    # give it back at once (this mount takes no leases).
                    await self._flush([LRel(d) for d in sorted(self.state.held)])
                return result2
            except NeedDomain as e:
                if self.clock() - start > self.cfg.lease_wait + 2 * self.cfg.lease_time:
                    raise FsError(f"gave up waiting for domain {e.domain}", errno.EIO) from e
                await self.recall(e.domain, "w")

    async def _wait_valid(self, doms: frozenset[int]) -> None:
        """A journaled change was answered while its lease was not known valid: wait
        for a proof (a catch-up's 404), at most lease_wait, else EIO."""
        deadline = self.clock() + self.cfg.lease_wait
        while not self.valid(doms):
            if self.clock() > deadline or self.fenced is not None:
                log.error(
                    "lease on %s not renewed for %.0fs (the store does not answer?): "
                    "the change is journaled but cannot be confirmed",
                    sorted(doms),
                    self.cfg.lease_wait,
                )
                raise FsError("lease could not be renewed", errno.EIO)
            try:
                await self.meta.catch_up()
            except EfsishError as e:
                log.debug("catch-up while waiting for a lease: %s", e)
            await trio.sleep(RECALL_POLL)

    async def before_read(self, domains: set[int | None]) -> None:
        """A read of these domains: recall any another mount holds (want r), so the
        view, caught up past the answer, holds everything it answered (§6.4)."""
        for d in domains:
            if d is not None and d in self.state.others:
                await self.recall(d, "r")

    async def recall(self, d: int, want: str) -> None:
        """Recall domain `d` and wait until the holder answers (or, after 2 x lease_time
        without an answer, take it over: §7). Concurrent recalls of `d` share one."""
        ev = self._recalling.get(d)
        if ev is not None:
            await ev.wait()
            return
        ev = self._recalling[d] = trio.Event()
        try:
            await self._recall(d, want)
        except FsError:
            raise
        except EfsishError as e:  # the store failed: the caller gets one errno
            raise FsError(f"recall of domain {d} failed: {e}", to_errno(e)) from e
        finally:
            del self._recalling[d]
            ev.set()

    async def _recall(self, d: int, want: str) -> None:
        rid = uuid.uuid4().hex[:12]
        me = self.me

        recalled: list[Holder] = []

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], str | None]:
            holder, _ = view.lease(d)
            if holder is None or holder == me:
                return [], None
            recalled[:] = [holder]
            return [LRec(d, rid, want)], holder[0]

        holder = await self.meta.submit(plan)
        if holder is None:
            return
        self.recalls_sent += 1
        # The recall has landed (at or below the applied position): nudge the holder.
        # While it can nudge back, polls only cover a lost datagram: they are rare.
        nudging = self.nudges.send(holder, self.meta.applied_seq, rid)
        poll = RECALL_POLL_NUDGED if nudging else RECALL_POLL
        seen = self.clock()  # we received the answer that showed us our recall
        deadline = seen + self.cfg.lease_wait + 2 * self.cfg.lease_time
        nudged = self.nudges.woken
        while True:
            # The next poll, or at once when a nudge (the holder's answer) comes.
            woken = False
            with trio.move_on_after(poll):
                await nudged.wait()
                woken = True
            nudged = self.nudges.woken  # a nudge during this catch-up ends the next wait
            try:
                # A nudge names the position of the answer: every change the holder
                # answered before it saw our recall is at or below it, so that is as
                # far as this read needs (no GET of the position after it).
                await self.meta.catch_up(upto=self.nudges.seq if woken else None)
            except EfsishError as e:
                log.debug("catch-up while waiting for recall %s: %s", rid, e)
            rec = await self.meta.read(lambda v: v.recall(d, rid))
            if rec is None:
                return  # answered, or the domain changed hands (which closes recalls)
            now = self.clock()
            if now - seen >= 2 * self.cfg.lease_time:

                def tko(view: View, pc: PlanContext) -> tuple[list[Op], None]:
                    if view.recall(d, rid) is None:
                        return [], None
                    return [LTko(d, rid)], None

                log.warning(
                    "domain %d: recall %s unanswered for %.0fs; taking it over",
                    d,
                    rid,
                    now - seen,
                )
                await self.meta.submit(tko)
                self.takeovers += 1
                self._recall_the_rest(recalled[0])
                return
            if now > deadline:
                log.error("domain %d: recall %s not answered in time", d, rid)
                raise FsError(f"domain {d}: its holder does not answer", errno.EIO)

    def shares_changed(self, res: ApplyResult, remote: bool) -> None:
        """An applied entry began or ended shares of the top (§17; trio thread, after
        `refresh`). Ours ended others': nudge them to see it (their acks end our wait).
        Another's ended ours: acknowledge it, so that its writer answers at once: a
        nudge, or, to a writer that takes no nudges, an `lshr(off)` in the log. An
        entry of another mount's `lshr` is such an acknowledgement: it landed after
        everything before it."""
        if res.revoker is None:
            if remote:  # an lshr: it landed after everything before it
                for who in res.shares:
                    self.share.acked(who, self.meta.applied_seq)
            return
        writer, seq = res.revoker
        # Every mount that applied the change waits for the revoked mounts before it
        # answers any change of its own: one could depend on it (a file made under a
        # new name in the top), and a revoked mount may still answer from before it.
        # Not for the entries a start or a rebuild replays (not `ready`): nothing of
        # ours is answered meanwhile, and most are old (§17).
        gone = self.share.changed_top(res) if self.ready else set()
        if writer == self.client:  # ours (also one met in a catch-up: a lost answer)
            for client, _ in gone:
                self.nudges.send(client, seq, "")
        if self.me in res.revoked:
            self.share.revoked()
            # Acknowledge to every mount we know of (each may be waiting), and through
            # the log when the writer takes no nudges.
            for client in {writer, *self.nudges.peers()}:
                self.nudges.send(client, seq, f"{ACK}{self.inc}")
            if self._nursery is not None:
                self._nursery.start_soon(self._ack_in_log, writer)

    async def _ack_in_log(self, writer: str) -> None:
        """Acknowledge a revocation through the log when its writer takes no nudges."""
        try:
            hb = await self.nudges.peer(writer)
            if hb is not None and hb.nudge is not None:
                return

            def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
                return ([] if self.me in view.shares() else [LShr(on=False)]), None

            await self.meta.submit(plan)
        except EfsishError as e:
            log.debug("acknowledging a change of the top in the log failed: %s", e)

    async def _settle_shares(self) -> None:
        """`TopShare.settle`, reading meanwhile the log (when this mount takes no nudges)
        and, every HEARTBEAT_ACK_EVERY, the heartbeats of the mounts it waits for: one
        written by the revoked incarnation after it applied the change acknowledges it
        when no nudge comes through (a firewall, `nudge=off` here)."""
        if not self.share.waiting_for():
            return
        last = [self.clock()]

        async def poll() -> None:
            try:
                if self.nudges.nudger is None:
                    await self.meta.catch_up()
                if self.clock() - last[0] >= HEARTBEAT_ACK_EVERY:
                    last[0] = self.clock()
                    for (client, inc), seq in self.share.waiting_for():
                        hb = await heartbeat.read(self.meta.store, client)
                        if hb is not None and hb.inc == inc and hb.applied_seq >= seq:
                            self.share.acked((client, inc), hb.applied_seq)
            except EfsishError as e:
                log.debug("reading acknowledgements: %s", e)

        await self.share.settle(poll)

    async def take_share(self) -> bool:
        """A read is about to catch up: take a share of the top instead, when this
        mount may (§17). The `lshr` entry's conditional PUT proves the head as the
        catch-up would. False if no share was taken (the caller catches up)."""
        if not (
            self.cfg.acquire
            and self.ready
            and self.inc > 0
            and self.fenced is None
            and not self.recovering
            and self.nudges.address is not None
            and self.nudges.nursery is not None  # acknowledgements can be sent
            and self.share.may_take()
        ):
            return False

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            return ([] if self.me in view.shares() else [LShr()]), None

        try:
            await self.meta.submit(plan)
        except EfsishError as e:
            log.debug("taking a share of the top failed (catching up instead): %s", e)
            return False
        return self.share.held

    def _recall_the_rest(self, holder: Holder) -> None:
        """`holder` left a recall unanswered for 2 x lease_time (it is dead or cut off):
        recall every other domain it holds now, in the background, so that their waits
        for a takeover overlap instead of each reader meeting them one after another
        (a crashed holder of N domains cost N x 2L)."""
        if self._nursery is None:
            return
        for d, h in list(self.state.others.items()):
            if h == holder and d not in self._recalling:
                self._nursery.start_soon(self._recall_quietly, d)

    async def _recall_quietly(self, d: int) -> None:
        try:
            await self.recall(d, "r")
        except EfsishError as e:
            log.warning("background recall of domain %d: %s", d, e)

    async def sync(self) -> None:
        """fsync/fdatasync/fsyncdir: return once every change answered before is in
        the log and applied unfenced (§6.3); fenced: EIO."""
        if self.fenced is not None:
            raise FsError(f"this mount was fenced: {self.fenced}", errno.EIO)
        try:
            await self._flush()
        except FsError:
            raise
        except EfsishError as e:
            raise FsError(f"commit of the journal failed: {e}", to_errno(e)) from e
        if self.fenced is not None:
            raise FsError(f"this mount was fenced: {self.fenced}", errno.EIO)

    async def _flush(self, extra: list[Op] | None = None) -> None:
        st = self.staging
        up: set[str] = set()
        if st is not None:
            await st.wait_all()  # outside the writer lock: changes go on meanwhile
            up = st.uploaded()
        began = self.clock()
        await self.meta.flush(extra)
        # Rows left were journaled during the flush's PUT: none is older than its start.
        self._oldest = began if self.meta.journal_rows else None
        if st is not None:
            await st.landed(up)

    async def _flush_for_reader(self) -> None:
        """A read-only mount asked for every change answered so far (§6.4, reads): the
        journal goes to the log now, with no lease op (the domains stay held)."""
        if self.fenced is not None or not self.ready:
            raise EfsishError(self.fenced or "the lease mount is starting")
        await self._flush()

    async def before_flush(self) -> None:
        """(Under the writer lock, before journaled entries are computed and PUT.)
        Every staged block a journal row references is uploaded first (§6.3)."""
        if self.staging is not None:
            await self.staging.wait_all()

    def fenced_at(self, seq: int, reason: str) -> None:
        """Our journal can no longer land (§10): stop changing anything, and recover
        (at once if running; at start otherwise)."""
        if self.fenced is None:
            log.error("fenced at log entry %d: %s", seq, reason)
        self.fenced = reason
        self.valid_until.clear()
        self.share.lapse()
        self.meta.broken = f"this mount was fenced ({reason}); recovering"
        if self._nursery is not None and not self.recovering:
            self.recovering = True
            self._nursery.start_soon(self._recover_now)

    async def _recover_now(self) -> None:
        try:
            fenced_inc, self.ready = self.inc, False
            salvage = await self._salvage_and_rebuild(fenced_inc)
            # The fenced incarnation is this daemon: its share of the top ends with it.
            await self._new_incarnation(proven=False, ended=fenced_inc)
            self.ready = True
            await self._write_recovery(salvage)
        except Exception:
            log.exception("recovery of the fenced journal failed; remount to retry")
        finally:
            self.recovering = False

    async def _salvage_and_rebuild(self, fenced_inc: int) -> recovery.Salvage:
        """`fenced_inc`: the incarnation that wrote the journal."""
        bad = self._bad_blocks
        salvage = await self.meta.rebuild(lambda v: recovery.salvage(v, fenced_inc, bad))
        self.fenced = None
        self.valid_until.clear()
        self.share.lapse()
        self._oldest = None
        return salvage

    async def _write_recovery(self, salvage: recovery.Salvage) -> None:
        """Write the recovery directory (efsish.meta.recovery), then commit it."""
        path = await recovery.write_recovery(self.submit, self.client, salvage)
        await self._flush()
        log.warning(
            "changes this mount answered were fenced (another mount took its lease over): "
            "they are in %s (%d files); nothing of them was applied to the tree",
            path,
            len(salvage.files),
        )
        self.recovered.append(path)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, nursery: trio.Nursery, cache_locked: bool) -> None:
        """Start a new incarnation (sess), adopt the old one's leases (§9), flush its
        journal (or recover it, if it was fenced meanwhile: §10), and start the
        background tasks."""
        await self.nudges.start(nursery)
        prev = await self.meta.read(lambda v: v.session(self.client))
        self._last_inc = prev[0] if prev is not None else 0
        proven = cache_locked and recovery.old_daemon_dead(self.cache_dir)
        recovery.record_daemon(self.cache_dir)
        await self._recover_staged()
        salvage = None
        if self.fenced is not None:
            salvage = await self._salvage_and_rebuild(self._last_inc)
        try:
            await self._new_incarnation(proven)
        except LeaseLost:
            # Another mount took a domain of the journal over while we waited to adopt
            # it (the old daemon could not be proven dead): recover, then start again.
            salvage = await self._salvage_and_rebuild(self._last_inc)
            await self._new_incarnation(proven=False)
        self.ready = True
        if salvage is not None:
            await self._write_recovery(salvage)
        await self.meta.catch_up()
        if self.meta.journal_rows:
            await self._flush()
        self._nursery = self.nudges.nursery = nursery
        nursery.start_soon(self._reactor)
        nursery.start_soon(self._flusher)
        # A share of the top now that acknowledgements can be sent (§17), rather than
        # at the first read there: the first cold path walk costs no request either.
        await self.take_share()

    async def _recover_staged(self) -> None:
        """After a crash, before anything is committed: the staged blocks the journal
        references are checked and uploaded (§5, §13). One that fails its checksum (or is
        gone) must not reach the bucket, nor a change that references it: the journal
        goes to the recovery directory, without that block's bytes."""
        if self.staging is None:
            return
        rows = await self.meta.read(journal.rows)
        bad = await self.staging.recover(_block_refs(rows))
        if bad:
            self._bad_blocks = bad
            self.fenced = f"{len(bad)} staged block(s) failed their checksum: {sorted(bad)[0]}"
            log.error(
                "staged data of this mount's journal is damaged (%s): its changes go to "
                "the recovery directory",
                ", ".join(sorted(bad)),
            )

    async def _new_incarnation(self, proven: bool, ended: int | None = None) -> None:
        """Commit sess(client, inc + 1); adopt the older incarnations' leases in the
        same entry if `proven` (the old daemon is dead), else after the takeover wait.
        `ended`: an older incarnation known to answer nothing any more (this daemon's,
        fenced): its share of the top ends in the same entry."""
        prev = await self.meta.read(lambda v: v.session(self.client))
        self.inc = (prev[0] if prev is not None else 0) + 1
        client, inc = self.client, self.inc

        def old_held(view: View) -> list[int]:
            return [
                int(r[0])
                for r in view.db.execute(
                    "SELECT domain FROM leases WHERE holder_client = ? AND holder_inc < ?",
                    (client, inc),
                )
            ]

        def sess(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            ops: list[Op] = [Sess(client, inc)]
            if self.cfg.acquire:
                # This incarnation may journal (and stage blocks): gc spares the blocks
                # named by this client until a clean unmount clears the mark (§9).
                ops.append(LDirty(client, inc))
            if proven or ended is not None:
                # The old daemon is dead (or is us): its share of the top ends here, not
                # at the next change of the top after a wait for its acknowledgement.
                ops += [
                    LShr(on=False, inc=i)
                    for c, i in view.shares()
                    if c == client and (proven or i == ended)
                ]
            if proven:
                ops += [LAdopt(d) for d in old_held(view)]
            return ops, None

        await self.meta.submit(sess)
        waiting: list[int] = [] if proven else await self.meta.read(old_held)
        if waiting:
            log.info(
                "leases of an earlier incarnation: adopting them after %.0fs",
                2 * self.cfg.lease_time,
            )
            t0 = self.clock()
            while self.clock() - t0 < 2 * self.cfg.lease_time:  # noqa: ASYNC110 (lease clock)
                await trio.sleep(RECALL_POLL)

            def adopt(view: View, pc: PlanContext) -> tuple[list[Op], None]:
                return [LAdopt(d) for d in old_held(view)], None

            await self.meta.submit(adopt)

    async def release_all(self) -> None:
        """Clean unmount: flush, then release every held domain (§6.5)."""
        if self.fenced is not None or self.inc == 0:
            return
        clean: list[Op] = [LDirty(self.client, self.inc, dirty=False)] if self.cfg.acquire else []
        if self.share.held:
            clean.append(LShr(on=False))
        await self._flush([*(LRel(d) for d in sorted(self.state.held)), *clean])

    async def _reactor(self) -> None:
        """Answer recalls of held domains: flush, then lrel (handed over to a write
        recall's writer; to FREE for a read recall)."""
        while True:
            await self._recall_wake.wait()
            self._recall_wake = trio.Event()
            try:
                await self._answer()
            except EfsishError as e:
                log.warning("answering a recall failed: %s", e)
                await trio.sleep(RECALL_POLL)
                self._recall_wake.set()
            except Exception:
                log.exception("answering a recall crashed")
                await trio.sleep(1.0)

    async def _answer(self) -> None:
        recalls = list(self.state.recalls)
        if not recalls or self.fenced is not None:
            return
        now = self.clock()
        answers: list[Op] = []
        for d in dict.fromkeys(r.domain for r in recalls):
            mine = [r for r in recalls if r.domain == d]
            w = next((r for r in mine if r.want == "w"), None)
            self._released(d, now)
            if w is not None:
                answers.append(LRel(d, w.rid, to=w.by[0]))
            else:
                # A read recall releases D (closing every open recall of it): the
                # reader's next lookup, open or getattr in D catches up with the log
                # instead of recalling again, and READ_GRACE keeps us from taking D
                # back in the middle of its read (§6.4).
                answers.append(LRel(d, mine[0].rid))
                self._cool_until[d] = max(self._cool_until.get(d, 0.0), now + READ_GRACE)
        await self._flush(answers)
        # The answer has landed (at or below the applied position): nudge the recallers.
        seq = self.meta.applied_seq
        for client, rid in {r.by[0]: r.rid for r in recalls}.items():
            self.nudges.send(client, seq, rid)

    def _released(self, d: int, now: float) -> None:
        """Released `d` to a recall: twice within CONTENDED_WINDOW starts a cool-down
        (§8) during which this mount commits its changes in `d` one by one."""
        times = [t for t in self._releases.get(d, []) if now - t < CONTENDED_WINDOW]
        times.append(now)
        self._releases[d] = times
        if len(times) >= 2:
            if self._cool_until.get(d, 0.0) + CONTENDED_WINDOW < now:
                self._cool_len[d] = COOL_DOWN_FIRST
            else:
                self._cool_len[d] = min(COOL_DOWN_MAX, 2 * self._cool_len.get(d, 5.0))
            self._cool_until[d] = now + self._cool_len[d]

    async def _flusher(self) -> None:
        """Flush the journal commit_interval after its oldest change (§6.3), and
        release domains unused for lease_idle (§6.5)."""
        tick = max(0.01, self.cfg.commit_interval / 4)
        while True:
            await trio.sleep(tick)
            try:
                now = self.clock()
                if self._oldest is not None and now - self._oldest >= self.cfg.commit_interval:
                    await self._flush()
                elif self._oldest is None and self.meta.journal_rows:
                    self._oldest = now
                idle = [
                    d
                    for d in self.state.held
                    if now - self._used.setdefault(d, now) > self.cfg.lease_idle
                ]
                if idle and not self.meta.journal_rows:
                    await self._flush([LRel(d) for d in idle])
            except EfsishError as e:
                log.warning("journal flush failed: %s", e)
            except Exception:
                log.exception("journal flush crashed; the mount keeps running")


def _still_valid(view: View, op: Op) -> bool:
    """Whether lease op `op` (an answer or a release) still applies at the view's head."""
    if isinstance(op, (LFlush, LRel)) and op.rid is not None:
        rec = view.recall(op.domain, op.rid)
        if rec is None:
            return False
        if isinstance(op, LFlush):
            return rec[2] == "r"
        if op.to is not None:
            return rec[2] == "w" and rec[0] == op.to
    return True


def domain_paths(view: View, domains: list[int]) -> list[str]:
    """The paths of these domains' roots, for status (`#ino` for one not found)."""
    out = []
    for d in domains:
        parts = recovery.path_of(view, d)
        name = b"/" + b"/".join(parts) if parts is not None else f"#{d}".encode()
        out.append(name.decode(errors="replace"))  # shown to people, sent as JSON
    return out
