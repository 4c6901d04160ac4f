"""Lease-era log entries: how every replayer judges them (docs/design/LEASES.md §3-4).

An entry with a lease header is applied op by op, each op's domains checked against the
state just before it, inside a savepoint: all of it applies, or it is *fenced* — it
changes nothing but the fencing record, the same on every replayer — and the next entry
applies. This module owns that judgement and the lease ops' effects on the `sessions`,
`leases`, `recalls` and `fenced` tables; efsish.meta.view owns the schema, the queries
and the namespace ops. Like view.py it is synchronous and deterministic: it must not read
the clock, randomness or anything local, and must not import trio.
"""

from __future__ import annotations

import errno
import sqlite3
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from efsish.errors import CorruptObject, FsError
from efsish.meta import domains
from efsish.meta.domains import TOP, Domain
from efsish.meta.ops import (
    LEASE_OPS,
    ClaimInodes,
    Fmt,
    LAcq,
    LAdopt,
    LDirty,
    LeaseOp,
    LFlush,
    Ln,
    LogEntry,
    LRcv,
    LRec,
    LRel,
    LShr,
    LTko,
    Mk,
    Mv,
    Op,
    RemoveXattr,
    Rm,
    Sess,
    SetAttr,
    SetXattr,
    Write,
)

if TYPE_CHECKING:
    from efsish.meta.view import ApplyResult, View

# The log format from which entries carry a lease header (set by a fmt op).
LEASE_FORMAT = 3
PRE_LEASE_FORMAT = 2

Holder = tuple[str, int]  # (client, incarnation)


class NewerFormat(CorruptObject):
    """The log says the filesystem uses a format this efsish does not know: stop."""


@dataclass(frozen=True)
class Fencing:
    """Why apply refused a lease-era entry (it changed nothing but the fencing record).

    `rule` is one of the FENCE_* names (LEASES.md §4's conditions)."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


# Condition 1: the writer's incarnation is older than its client's newest `sess`.
FENCE_SUPERSEDED = "superseded"
# Condition 1 / per-incarnation fencing: a journaled entry of an incarnation that has a
# fenced journaled entry and no `lrcv` since.
FENCE_INCARNATION = "incarnation-fenced"
# Condition 2: journaled, and a domain an op touches is not held by the writer.
FENCE_NOT_HELD = "not-held"
# Condition 3: sync, and a domain an op touches is held by someone else.
FENCE_HELD_ELSEWHERE = "held-elsewhere"
# Conditions 2 and 3: a held domain the writer holds, claimed at another epoch (or not).
FENCE_EPOCH = "epoch"
# Condition 4: an op failed to apply (or broke the protocol: a lease op that is not
# valid where it stands).
FENCE_OP_FAILED = "op-failed"
# §14: an entry without a lease header after fmt(3).
FENCE_NO_HEADER = "no-header"


class _Fence(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.fencing = Fencing(rule, reason)


class LeaseLost(FsError):
    """The view holds journaled changes of a domain this incarnation no longer holds
    (a takeover, a newer incarnation of the client), or an entry of ours was fenced:
    the mount stops before applying that entry (recovery, LEASES.md §10)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, errno.EIO)


Fence = _Fence  # raised by apply_leased_op when the entry must be fenced


def apply_leased_entry(view: View, seq: int, entry: LogEntry, res: ApplyResult) -> None:
    """Apply a lease-era entry, in a savepoint: all of it, or (fenced) none of it."""
    r = type(res)()
    view.savepoint("lease_entry")
    try:
        _check_incarnation(view, entry)
        for op in entry.ops:
            apply_leased_op(view, op, entry, r)
    except NewerFormat:
        view.rollback_to("lease_entry")
        raise
    except _Fence as f:
        fencing = f.fencing
    except (CorruptObject, sqlite3.IntegrityError) as e:
        fencing = Fencing(FENCE_OP_FAILED, str(e))
    else:
        view.release("lease_entry")
        res.merge(r)
        return
    _fenced(view, seq, entry, fencing, res)


def _fenced(view: View, seq: int, entry: LogEntry, fencing: Fencing, res: ApplyResult) -> None:
    """Undo the entry's savepoint and record why it was fenced, the same on every
    replayer. What survives of an incarnation is a prefix of what it answered: every
    later journaled entry of it is fenced too, until its lrcv."""
    view.rollback_to("lease_entry")
    res.fenced = fencing
    if (
        entry.journaled
        and entry.inc is not None
        and view.open_fencing(entry.client, entry.inc) is None
    ):
        view.db.execute(
            "INSERT INTO fenced (client, inc, first_seq, reason) VALUES (?, ?, ?, ?)",
            (entry.client, entry.inc, seq, str(fencing)),
        )


def _check_incarnation(view: View, entry: LogEntry) -> None:
    """Fencing condition 1 (and per-incarnation fencing of journaled entries)."""
    if entry.inc is None:
        raise _Fence(FENCE_OP_FAILED, "a lease header without an incarnation")
    newest = view.session(entry.client)
    if newest is not None and entry.inc < newest[0]:
        raise _Fence(
            FENCE_SUPERSEDED,
            f"incarnation {entry.inc} of {entry.client} is older than its newest, {newest[0]}",
        )
    if entry.journaled:
        first = view.open_fencing(entry.client, entry.inc)
        if first is not None:
            raise _Fence(
                FENCE_INCARNATION,
                f"incarnation {entry.inc} of {entry.client} is fenced since entry {first}",
            )


def apply_leased_op(
    view: View,
    op: Op,
    entry: LogEntry,
    res: ApplyResult,
    known: tuple[set[Domain], list[int]] | None = None,
) -> None:
    """Apply one op of lease-era `entry`, first checking every domain it touches
    against the state just before it (LEASES.md §4). Raises _Fence or
    CorruptObject when the entry must be fenced. `known`: what `touches_movers`
    returned for `op` in this same state (a planner that just read it; the tree has
    not changed since), so that it is not read twice."""
    try:
        if isinstance(op, LEASE_OPS):
            _apply_lease_op(view, op, entry, res)
            return
        if isinstance(op, ClaimInodes) and entry.journaled:
            raise CorruptObject("an inode claim in a journaled entry")
        # Garbage rows take the op's own time, not the entry's: the holder recorded
        # them when it journaled the op, long before the entry (LEASES.md §5).
        view.cur_t = op_time(op, entry.t)
        touched, movers = known if known is not None else _touches(view, op)
        if entry.journaled and TOP in touched:
            # The top is never leased: a change there must be planned against the head.
            raise _Fence(FENCE_NOT_HELD, "a journaled entry changes the top")
        for d in sorted(x for x in touched if x is not TOP):
            _check_domain(view, d, entry)
        roots_before = _roots_in(view, movers)
        view.apply_op(op, res)
        if (TOP in touched or _root_access_change(view, op)) and not _atime_only(op):
            _revoke_shares(view, entry, res)
        roots_after = _roots_in(view, movers)
        # Domain roots that appear or go (mkdir, rmdir, a directory moved to another
        # depth): their rows become FREE at this position, so epochs only grow.
        for d in sorted(roots_before ^ roots_after):
            _set_holder(view, d, None, res)
    except (KeyError, TypeError, ValueError) as e:
        kind = op.wire()["o"]
        raise CorruptObject(f"{kind!r} operation does not apply to the view: {e}") from None


def _atime_only(op: Op) -> bool:
    """A relatime update: it changes no name and no attribute close-to-open covers, so
    it ends no share of the top (LEASES.md §17)."""
    return isinstance(op, SetAttr) and op.changes().keys() == {"atime"}


def _root_access_change(view: View, op: Op) -> bool:
    """A domain root's mode, owner or xattrs (ACLs) change: a lookup in the top returns
    them, and the kernel checks permissions with them (LEASES.md §17)."""
    if isinstance(op, SetAttr) and (op.mode, op.uid, op.gid) != (None, None, None):
        return domains.is_domain_root(view, op.ino)
    if isinstance(op, (SetXattr, RemoveXattr)):
        return domains.is_domain_root(view, op.ino)
    return False


def _revoke_shares(view: View, entry: LogEntry, res: ApplyResult) -> None:
    """A change of the top ends every share but its writer's own (LEASES.md §17)."""
    assert entry.inc is not None
    gone = view.shares() - {(entry.client, entry.inc)}
    if not gone:
        return
    for c, i in gone:
        view.db.execute("DELETE FROM shares WHERE client = ? AND inc = ?", (c, i))
    res.shares |= gone
    res.revoked |= gone
    res.revoker = (entry.client, view.cur_seq)


def op_time(op: Op, default: int) -> int:
    """The time an op carries (a create's, a write's; a setattr's ctime), else `default`."""
    if isinstance(op, SetAttr):
        return op.ctime or op.mtime or default
    t = getattr(op, "t", None)
    return t if isinstance(t, int) and t else default


def _roots_in(view: View, dirs: list[int]) -> set[int]:
    """The domain roots in the subtrees of those of `dirs` that are directories."""
    roots: set[int] = set()
    for d in dirs:
        attr = view.getattr(d)
        if attr is not None and attr.is_dir:
            roots |= domains.roots_in(view, d)
    return roots


def touches(view: View, op: Op) -> set[Domain]:
    """The domains (TOP included) a namespace op changes rows of, computed before it
    applies: what an entry holding it must claim (LEASES.md §4)."""
    return touches_movers(view, op)[0]


def touches_movers(view: View, op: Op) -> tuple[set[Domain], list[int]]:
    """`touches`, and the directories whose subtrees may gain or lose domain roots by
    `op`: pass both to `apply_leased_op` (`known`) when it applies `op` next in this
    same state of the tree."""
    if isinstance(op, LEASE_OPS):
        return set(), []
    return _touches(view, op)


def _touches(view: View, op: Op) -> tuple[set[Domain], list[int]]:
    """The domains `op` changes rows of (computed before it applies), and the
    directories whose subtrees may gain or lose domain roots by it."""
    dom = domains.domain_of_dir
    of = domains.domains_of_inode
    movers: list[int] = []
    match op:
        case Mk():
            return {dom(view, op.parent)}, [op.ino] if stat.S_ISDIR(op.mode) else []
        case Ln():
            return {dom(view, op.parent)} | of(view, op.ino), []
        case Rm():
            parent = dom(view, op.parent)
            target = view.lookup(op.parent, op.name)
            attr = None if target is None else view.getattr(target)
            if attr is None:
                return {parent}, []
            # Only a directory's subtree can hold domain roots.
            movers = [attr.ino] if attr.is_dir else []
            return {parent} | domains.domains_of_attr(view, attr, {op.parent: parent}), movers
        case Mv():
            touched = {dom(view, op.src_parent), dom(view, op.dst_parent)}
            src = view.lookup(op.src_parent, op.src_name)
            dst = view.lookup(op.dst_parent, op.dst_name)
            moves = [(src, op.dst_parent)]
            if op.exchange:
                moves.append((dst, op.src_parent))
            elif dst is not None:
                touched |= of(view, dst)  # a replaced target
                movers.append(dst)
            for ino, to_parent in moves:
                if ino is None:
                    continue
                touched |= of(view, ino)
                attr = view.getattr(ino)
                if attr is not None and attr.is_dir:
                    movers.append(ino)
                    old = domains.depth(view, ino)
                    if domains.depth(view, to_parent) + 1 != old:
                        # A directory moved to another depth: every domain root in
                        # its subtree stops being one (and others may start).
                        touched |= set(domains.roots_in(view, ino))
            return touched, movers
        case SetAttr() | Write() | SetXattr() | RemoveXattr():
            return of(view, op.ino), []
        case _:
            return set(), []


def _check_domain(view: View, d: int, entry: LogEntry) -> None:
    """Fencing conditions 2 and 3 for one domain an op of `entry` touches."""
    holder, epoch = view.lease(d)
    me = (entry.client, entry.inc)
    if holder is None:
        if entry.journaled:
            raise _Fence(FENCE_NOT_HELD, f"domain {d} is FREE: a journaled entry needs its lease")
        return
    if holder != me:
        rule = FENCE_NOT_HELD if entry.journaled else FENCE_HELD_ELSEWHERE
        raise _Fence(rule, f"domain {d} is held by {holder[0]}/{holder[1]}")
    claimed = (entry.claims or {}).get(d)
    if claimed != epoch:
        raise _Fence(FENCE_EPOCH, f"domain {d} is at epoch {epoch}; the entry claims {claimed}")


def _apply_lease_op(view: View, op: LeaseOp, entry: LogEntry, res: ApplyResult) -> None:
    assert entry.inc is not None
    me: Holder = (entry.client, entry.inc)
    kind = op.wire()["o"]

    def invalid(why: str) -> CorruptObject:
        return CorruptObject(f"{kind!r} is not valid here: {why}")

    def need_lease_format() -> None:
        if view.log_format < LEASE_FORMAT:
            raise invalid(f"the log is not at format {LEASE_FORMAT} yet (no fmt op)")

    match op:
        case Sess():
            if (op.client, op.inc) != me:
                raise invalid("an incarnation starts in an entry of its own")
            newest = view.session(op.client)
            if newest is not None and op.inc <= newest[0]:
                raise invalid(f"{op.client} is already at incarnation {newest[0]}")
            view.db.execute(
                "INSERT INTO sessions (client, inc, started_seq) VALUES (?, ?, ?) "
                "ON CONFLICT (client) DO UPDATE SET inc = excluded.inc, "
                "started_seq = excluded.started_seq",
                (op.client, op.inc, view.cur_seq),
            )
        case LAcq():
            need_lease_format()
            if not domains.is_domain_root(view, op.domain):
                raise invalid(f"{op.domain} is not a domain root")
            holder, _ = view.lease(op.domain)
            if holder is not None:
                raise invalid(f"domain {op.domain} is held by {holder[0]}/{holder[1]}")
            _set_holder(view, op.domain, me, res)
        case LRec():
            holder, _ = view.lease(op.domain)
            if holder is None or holder == me:
                raise invalid(f"domain {op.domain} is not held by another mount")
            if view.recall(op.domain, op.rid) is not None:
                raise invalid(f"recall {op.rid} of {op.domain} exists")
            view.db.execute(
                "INSERT INTO recalls (domain, rid, by_client, by_inc, want, seq) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (op.domain, op.rid, me[0], me[1], op.want, view.cur_seq),
            )
            res.leases.add(op.domain)
        case LFlush():
            _check_domain(view, op.domain, entry)
            rec = view.recall(op.domain, op.rid)
            if rec is None or rec[2] != "r":
                raise invalid(f"no open read recall {op.rid} of {op.domain}")
            view.db.execute("DELETE FROM recalls WHERE domain = ? AND rid = ?", (op.domain, op.rid))
            res.leases.add(op.domain)
        case LRel():
            _check_domain(view, op.domain, entry)
            new: Holder | None = None
            if op.rid is not None:
                rec = view.recall(op.domain, op.rid)
                if rec is None:
                    raise invalid(f"no open recall {op.rid} of {op.domain}")
                if op.to is not None:
                    if rec[2] != "w" or rec[0] != op.to:
                        raise invalid(f"recall {op.rid} is not a write recall by {op.to}")
                    need_lease_format()
                    new = (rec[0], rec[1])
            elif op.to is not None:
                raise invalid("a handover names the write recall it answers")
            _set_holder(view, op.domain, new, res)
        case LTko():
            need_lease_format()
            holder, _ = view.lease(op.domain)
            if holder is None or holder == me:
                raise invalid(f"domain {op.domain} is not held by another mount")
            rec = view.recall(op.domain, op.rid)
            if rec is None or (rec[0], rec[1]) != me:
                raise invalid(f"no open recall {op.rid} of {op.domain} by the writer")
            _set_holder(view, op.domain, me, res)
        case LAdopt():
            need_lease_format()
            holder, epoch = view.lease(op.domain)
            if holder is None or holder[0] != me[0] or holder[1] >= me[1]:
                raise invalid(f"domain {op.domain} is not held by an older incarnation")
            claimed = (entry.claims or {}).get(op.domain)
            if claimed != epoch:
                raise _Fence(
                    FENCE_EPOCH,
                    f"domain {op.domain} is at epoch {epoch}; the entry claims {claimed}",
                )
            _set_holder(view, op.domain, me, res)
        case LRcv():
            first = view.open_fencing(op.client, op.inc)
            if first is None:  # recovered from a takeover it met in its catch-up
                view.db.execute(
                    "INSERT INTO fenced (client, inc, first_seq, reason) VALUES (?,?,?,?)",
                    (op.client, op.inc, view.cur_seq, "recovered (no entry was fenced)"),
                )
                first = view.cur_seq
            view.db.execute(
                "UPDATE fenced SET rcv_seq = ?, path = ? "
                "WHERE client = ? AND inc = ? AND first_seq = ?",
                (view.cur_seq, op.path, op.client, op.inc, first),
            )
        case LDirty():
            newest = view.session(op.client)
            if newest is None or op.inc > newest[0]:
                raise invalid(f"{op.client} has no incarnation {op.inc}")
            view.db.execute(
                "UPDATE sessions SET dirty_seq = ? WHERE client = ?",
                (view.cur_seq if op.dirty else None, op.client),
            )
        case LShr():
            need_lease_format()
            if op.on:
                if op.inc is not None:
                    raise invalid("a share is taken by the writer's own incarnation")
                view.db.execute(
                    "INSERT OR REPLACE INTO shares (client, inc, seq) VALUES (?, ?, ?)",
                    (*me, view.cur_seq),
                )
                res.shares.add(me)
            else:
                who: Holder = me if op.inc is None else (me[0], op.inc)
                if who[1] > me[1]:
                    raise invalid("a newer incarnation's share")
                view.db.execute("DELETE FROM shares WHERE client = ? AND inc = ?", who)
                res.shares.add(who)
        case Fmt():
            if op.version > LEASE_FORMAT:
                raise NewerFormat(
                    f"the metadata log is at format {op.version}, newer than this "
                    "efsish knows; upgrade efsish"
                )
            if op.version != LEASE_FORMAT or view.log_format >= op.version:
                raise invalid(f"the log is at format {view.log_format}")
            view.set_meta("log_format", op.version)


def _set_holder(view: View, d: int, holder: Holder | None, res: ApplyResult) -> None:
    """Domain `d` changes hands (None: FREE) at this position: a new epoch, and its
    open recalls, made against the old holder, are closed."""
    view.set_lease(d, holder, view.cur_seq)
    view.db.execute("DELETE FROM recalls WHERE domain = ?", (d,))
    res.leases.add(d)


def judge_own_journaled(
    view: View, seq: int, entry: LogEntry, op_domains: list[list[int]], res: ApplyResult
) -> None:
    """Judge this mount's own journaled `entry` at `seq`, whose namespace ops the view
    already holds (applied when they were journaled): the same verdict, and the same
    fencing record, as `apply_leased_entry` gives on every other replayer, without
    applying those ops twice. `op_domains`: the domains each namespace op touched when
    it was journaled (computed with `touches`, as apply computes them; only the holder
    changes its domains, so a replayer computes the same). Each op's domains are checked
    in op order as apply checks them; its lease ops (an answer to a recall, a release)
    are applied as anywhere else."""
    r = type(res)()
    view.cur_seq, view.cur_t = seq, entry.t
    view.savepoint("lease_entry")
    try:
        _check_incarnation(view, entry)
        namespace = iter(op_domains)
        for op in entry.ops:
            if isinstance(op, LEASE_OPS):
                _apply_lease_op(view, op, entry, r)
                continue
            doms = next(namespace, None)
            if doms is None:
                raise CorruptObject("a journaled op without its journal row")
            for d in sorted(doms):
                _check_domain(view, d, entry)
    except _Fence as f:
        fencing = f.fencing
    except (CorruptObject, sqlite3.IntegrityError) as e:
        fencing = Fencing(FENCE_OP_FAILED, str(e))
    else:
        view.release("lease_entry")
        res.merge(r)
        return
    assert entry.journaled and entry.inc is not None
    _fenced(view, seq, entry, fencing, res)
