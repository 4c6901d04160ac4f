"""Planning: turning a batch of planners into one log entry, in the writer's worker
thread, inside the transaction the committer opened on the view.

A planner (efsish.filesystem, efsish.gc) validates its request against the view and
returns ops; `plan_batch` runs each in a savepoint of its own, so a planner that fails
with an FsError affects only its caller (its ops and any inode numbers it took are
undone), applies the ops of the rest, and encodes them as one entry whose bytes are
checked to decode before anyone can PUT them.

This module owns that step. It must not do I/O beyond the view it is given, commit or
roll back the transaction (the committer, efsish.meta.log, does), touch trio, or know
POSIX rules.
"""

from __future__ import annotations

import errno
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from efsish import codec
from efsish.errors import FsError
from efsish.meta import leasing
from efsish.meta.domains import TOP, is_domain_root
from efsish.meta.inodes import InodeRange
from efsish.meta.ops import LEASE_OPS, SYNC, LAcq, LAdopt, LFlush, LogEntry, LRel, Op
from efsish.meta.view import ApplyResult, View

T = TypeVar("T")


class PlanContext:
    """Handed to planners: allocates inode numbers from ranges claimed through the log.

    A planner may set `after` to compute its result from the view once its ops are
    applied (e.g. the new inode's attributes), saving the caller a read afterwards."""

    def __init__(self, inodes: InodeRange) -> None:
        self._inodes = inodes
        self.extra: list[Op] = []
        self.now_ns = time.time_ns()
        self.after: Callable[[View], Any] | None = None

    def alloc_ino(self, view: View) -> int:
        ino, claim = self._inodes.take(view)
        if claim is not None:
            self.extra.append(claim)
        return ino


Planner = Callable[[View, PlanContext], tuple[list[Op], T]]
# Each planner's result, or the FsError it failed with.
Outcome = tuple[Any, BaseException | None]


class Plan(NamedTuple):
    seq: int  # the log position the entry is for
    blob: bytes | None  # the encoded entry; None if no planner produced ops
    res: ApplyResult  # what applying its ops changed
    outcomes: list[Outcome]  # one per planner, in order


class NeedDomain(FsError):
    """A change touches a lease domain another mount holds: recall it, then plan again
    (LEASES.md §6.4). Raised by a planner's ops in a lease-era sync entry."""

    def __init__(self, domain: int, holder: tuple[str, int]) -> None:
        super().__init__(f"domain {domain} is held by {holder[0]}/{holder[1]}", errno.EAGAIN)
        self.domain = domain
        self.holder = holder


@dataclass
class LeaseHeader:
    """How a lease-era mount writes a sync entry: its incarnation, and whether it may
    acquire a FREE domain its change touches (`acquire(domain)`: §6.1, §8)."""

    client: str
    inc: int
    acquire: Callable[[int], bool]


def plan_batch(
    view: View,
    planners: Sequence[Planner[Any]],
    inodes: InodeRange,
    client_id: str,
    lease: LeaseHeader | None = None,
) -> Plan:
    """Run `planners` against `view` (in an open transaction) and encode their ops as
    the entry for the next position. Raises what a planner raises other than FsError.

    With `lease`, the entry is a lease-era sync entry: each op is applied as every
    replayer will judge it (efsish.meta.leasing), claiming the domains this mount holds
    at their epochs, acquiring FREE ones where `lease.acquire` allows (`lacq` just
    before the op), and failing the planner with NeedDomain where another mount holds
    one; so the entry written is never fenced."""
    if lease is None and view.log_format >= leasing.LEASE_FORMAT:
        # `efsish upgrade` landed while this mount ran format 2: every entry it could
        # write would be fenced (LEASES.md §14). It stops changing the tree.
        raise FsError(
            "the filesystem was upgraded to format 3 (leases) while this mount ran format "
            "2: it makes no more changes; unmount and mount it again",
            errno.EROFS,
        )
    seq = view.applied_seq + 1
    t_entry = time.time_ns()
    view.cur_seq, view.cur_t = seq, t_entry
    res = ApplyResult()
    ops: list[Op] = []
    outcomes: list[Outcome] = []
    prov: LogEntry | None = None
    if lease is not None:
        prov = LogEntry("", lease.client, t_entry, [], inc=lease.inc, kind=SYNC, claims={})
    for planner in planners:
        ctx = PlanContext(inodes)
        saved = inodes.save()
        saved_claims = dict(prov.claims or {}) if prov is not None else {}
        view.savepoint("p")
        try:
            pops, result = planner(view, ctx)
            if lease is None or prov is None:
                for op in pops:
                    view.apply_op(op, res)
            else:
                pops = _apply_leased(view, pops, prov, lease, res)
            if ctx.after is not None:
                result = ctx.after(view)
        except FsError as e:
            view.rollback_to("p")
            inodes.restore(saved)
            if prov is not None:
                prov.claims = saved_claims
            outcomes.append((None, e))
            continue
        view.release("p")
        ops.extend(ctx.extra)
        ops.extend(pops)
        outcomes.append((result, None))
    if not ops:
        return Plan(seq, None, res, outcomes)
    entry = LogEntry(uuid.uuid4().hex, client_id, t_entry, ops)
    if lease is not None and prov is not None:
        entry.inc, entry.kind, entry.claims = lease.inc, SYNC, prov.claims or None
    blob = codec.encode_json(b"L", entry.wire())
    # A log entry is shared and permanent: one that does not decode would stop every
    # mount at this position. Check the bytes before they can be PUT.
    codec.decode(b"L", blob, "the log entry being written")
    return Plan(seq, blob, res, outcomes)


def _apply_leased(
    view: View, pops: list[Op], prov: LogEntry, lease: LeaseHeader, res: ApplyResult
) -> list[Op]:
    """Apply a planner's ops as a lease-era sync entry's (see `plan_batch`); return them
    with any `lacq` put in front of the op that needs it."""
    me = (lease.client, lease.inc)
    claims = prov.claims if prov.claims is not None else {}
    prov.claims = claims
    out: list[Op] = []
    for op in pops:
        domains = {d for d in leasing.touches(view, op) if d is not TOP}
        if isinstance(op, (LFlush, LRel, LAdopt)):
            domains.add(op.domain)
        for d in sorted(domains):
            holder, epoch = view.lease(d)
            if holder is None:
                if lease.acquire(d) and is_domain_root(view, d):
                    acq = LAcq(d)
                    leasing.apply_leased_op(view, acq, prov, res)
                    out.append(acq)
                    claims[d] = view.lease(d)[1]
            elif holder == me or isinstance(op, LAdopt):
                claims[d] = epoch
            elif not isinstance(op, LEASE_OPS):
                raise NeedDomain(d, holder)
        try:
            leasing.apply_leased_op(view, op, prov, res)
        except leasing.Fence as f:
            # Not a change this mount may make at this position (e.g. an older
            # incarnation's lease): never write an entry that would be fenced.
            raise FsError(f"cannot commit this change: {f.fencing}", errno.EAGAIN) from None
        out.append(op)
    return out
