"""A seeded model test of the lease protocol's replicated core: random sequences of
lease ops and namespace ops from three writers, applied to two fresh views.

After every entry both views hold identical tables, a fenced entry changed nothing but
the fencing record, and invariant 2 of LEASES.md §14 holds: an unfenced entry changes
rows of a domain only if its writer held the domain (before the entry, after it, or
took it within it: lacq or a takeover first, an lrel last) or the domain was FREE and
the entry sync.
The rows and their domains are found by comparing table dumps, not by apply's own
bookkeeping.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from efsish.errors import CorruptObject
from efsish.meta import domains
from efsish.meta.ops import (
    JOURNALED,
    SYNC,
    LAcq,
    LAdopt,
    LFlush,
    Ln,
    LogEntry,
    LRcv,
    LRec,
    LRel,
    LTko,
    Mk,
    Mv,
    Op,
    Rm,
    Sess,
    SetAttr,
    SetXattr,
)
from efsish.meta.view import ROOT_INO, ApplyResult, View
from tests.meta.leaselog import DIR, REG, T0, dump, new_view, put, start

CLIENTS = ("A", "B", "C")
STEPS = 300

Holder = tuple[str, int] | None


class Model:
    def __init__(self, rng: random.Random, v: View) -> None:
        self.rng = rng
        self.v = v
        self.inc = dict.fromkeys(CLIENTS, 1)
        self.next_ino = 100
        self.rids = 0

    # --------------------------------------------------------------- the view's state

    def dirs(self) -> list[int]:
        rows = self.v.db.execute("SELECT ino FROM inodes WHERE (mode & 61440) = 16384")
        return sorted(int(r[0]) for r in rows)

    def dentries(self) -> list[tuple[int, bytes, int]]:
        rows = self.v.db.execute("SELECT parent, name, ino FROM dentries ORDER BY parent, name")
        return [(int(p), bytes(n), int(i)) for p, n, i in rows]

    def files(self) -> list[int]:
        rows = self.v.db.execute("SELECT ino FROM inodes WHERE (mode & 61440) = 32768")
        return sorted(int(r[0]) for r in rows)

    def roots(self) -> list[int]:
        return sorted(domains.roots_in(self.v, ROOT_INO))

    def held(self) -> dict[int, Holder]:
        return {d: self.v.lease(d)[0] for d in self.roots()}

    def recalls(self) -> list[tuple[int, str, str, int, str]]:
        rows = self.v.db.execute("SELECT domain, rid, by_client, by_inc, want FROM recalls")
        return [(int(d), str(r), str(c), int(i), str(w)) for d, r, c, i, w in rows]

    # ----------------------------------------------------------------- random entries

    def name(self) -> bytes:
        return self.rng.choice([b"a", b"b", b"c", b"d", b"e"])

    def namespace_op(self, client: str) -> Op | None:
        rng, t = self.rng, T0 + self.v.applied_seq
        dirs, dents = self.dirs(), self.dentries()
        all_dirs = set(dirs)
        if rng.random() < 0.8:
            # Mostly where this writer may change things (as a planner would recall
            # first), so that most entries apply.
            me = (client, self.inc[client])
            ok = {d for d, h in self.held().items() if h in (None, me)}
            mine = [d for d in dirs if domains.domain_of_dir(self.v, d) in ok | {None}]
            dirs = mine or dirs
            dents = [x for x in dents if x[0] in mine] or dents
        kind = rng.choice(["mk", "mkdir", "rm", "mv", "ln", "attr", "xattr"])
        if kind in ("mk", "mkdir"):
            self.next_ino += 1
            mode = DIR if kind == "mkdir" else REG
            return Mk(self.next_ino, rng.choice(dirs), self.name(), mode, 0, 0, t)
        if not dents:
            return None
        p, n, ino = rng.choice(dents)
        # The POSIX rules a planner checks (apply does not).
        is_dir = ino in all_dirs
        if kind == "rm":
            return Rm(p, n, t) if not is_dir or self.v.is_empty_dir(ino) else None
        if kind == "mv":
            to, name = rng.choice(dirs), self.name()
            dst = self.v.lookup(to, name)
            if self.v.is_ancestor(ino, to) or dst == ino:
                return None  # a directory into itself; a rename onto itself
            if rng.random() < 0.1:
                if dst is None or (dst in all_dirs and self.v.is_ancestor(dst, p)):
                    return None
                return Mv(p, n, to, name, t, exchange=True)
            if dst is not None and (is_dir != (dst in all_dirs) or not self.v.is_empty_dir(dst)):
                return None
            return Mv(p, n, to, name, t)
        files = self.files()
        if kind == "ln" and files:
            return Ln(rng.choice(files), rng.choice(dirs), self.name(), t)
        if kind == "attr":
            kind_bits = DIR if is_dir else REG
            return SetAttr(ino, mode=(kind_bits & ~0o777) | rng.choice([0o700, 0o755]), ctime=t)
        return SetXattr(ino, b"user.k", bytes([rng.randrange(256)]), t)

    def lease_op(self, client: str) -> Op | None:
        rng = self.rng
        me = (client, self.inc[client])
        held = self.held()
        free = [d for d, h in held.items() if h is None]
        mine = [d for d, h in held.items() if h == me]
        others = [d for d, h in held.items() if h is not None and h != me]
        recalls = self.recalls()
        choice = rng.choice(["lacq", "lacq", "lrec", "answer", "lrel", "ltko", "any"])
        if choice == "lacq" and free:
            return LAcq(rng.choice(free))
        if choice == "lrec" and others:
            self.rids += 1
            return LRec(rng.choice(others), f"r{self.rids}", rng.choice("rw"))
        if choice == "answer":
            to_me = [r for r in recalls if held.get(r[0]) == me]
            if to_me:
                d, rid, by, _, want = rng.choice(to_me)
                if want == "r":
                    return LFlush(d, rid)
                return LRel(d, rid, to=by) if rng.random() < 0.7 else LRel(d, rid)
        if choice == "lrel" and mine:
            return LRel(rng.choice(mine))
        if choice == "ltko":
            by_me = [r for r in recalls if (r[2], r[3]) == me]
            if by_me:
                return LTko(by_me[0][0], by_me[0][1])
        if choice == "any" and held:  # a lease op that may well be invalid here
            d = rng.choice(sorted(held))
            wild: list[Op] = [LAcq(d), LRel(d), LFlush(d, "nope"), LTko(d, "nope")]
            return rng.choice(wild)
        return None

    def entry(self) -> LogEntry:
        rng = self.rng
        client = rng.choice(CLIENTS)
        seq = self.v.applied_seq + 1
        ops: list[Op] = []
        if rng.random() < 0.04:  # a restart: a new incarnation adopts what it held
            old = (client, self.inc[client])
            self.inc[client] += 1
            ops.append(Sess(client, self.inc[client]))
            ops += [LAdopt(d) for d, h in self.held().items() if h == old]
        inc = self.inc[client]
        if inc > 1 and rng.random() < 0.04:
            inc -= 1  # a stale incarnation wakes up
        # Plan as a planner does: each namespace op against the state the ones before
        # it leave (tried in a savepoint that is rolled back).
        self.v.savepoint("gen")
        try:
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.4:
                    op = self.lease_op(client)
                else:
                    op = self.namespace_op(client)
                    if op is not None:
                        self.v.savepoint("gen_op")
                        try:
                            self.v.apply_op(op, ApplyResult())
                            self.v.release("gen_op")
                        except (CorruptObject, sqlite3.IntegrityError):
                            self.v.rollback_to("gen_op")
                            op = None
                if op is not None:
                    ops.append(op)
        finally:
            self.v.rollback_to("gen")
        if self.v.open_fencing(client, inc) is not None and rng.random() < 0.5:
            # A fenced incarnation writes its recovery directory (in a sync entry).
            e = LogEntry(f"{client}-{seq}", client, T0 + seq, [LRcv(client, inc, f"/r/{seq}")])
            e.inc, e.kind = inc, SYNC
            return e
        # Claims as a planner makes them: every domain it holds, at its epoch (or at
        # this position once this entry acquires it); sometimes wrong.
        claims: dict[int, int] = {}
        for d in self.roots():
            h, epoch = self.v.lease(d)
            if h == (client, inc):
                claims[d] = epoch
        for op in ops:
            if isinstance(op, (LAcq, LTko, LAdopt)):
                claims[op.domain] = seq
            if isinstance(op, LAdopt):
                claims[op.domain] = self.v.lease(op.domain)[1]
        if claims and rng.random() < 0.1:
            d = rng.choice(sorted(claims))
            claims[d] -= 1
        kind = JOURNALED if rng.random() < 0.5 else SYNC
        e = LogEntry(f"{client}-{seq}", client, T0 + seq, ops)
        e.inc, e.kind, e.claims = inc, kind, claims
        if kind == JOURNALED:
            e.batch = (seq, seq)
        return e


def domain_map(v: View) -> tuple[dict[int, domains.Domain], dict[int, set[domains.Domain]]]:
    dirs = {int(r[0]) for r in v.db.execute("SELECT ino FROM inodes WHERE (mode & 61440) = 16384")}
    inos = [int(r[0]) for r in v.db.execute("SELECT ino FROM inodes")]
    return (
        {d: domains.domain_of_dir(v, d) for d in dirs},
        {i: domains.domains_of_inode(v, i) for i in inos},
    )


def changed_rows(
    before: dict[str, list[Any]], after: dict[str, list[Any]]
) -> tuple[set[int], set[int]]:
    """(inodes whose own rows changed, directories whose dentries changed)."""
    inos: set[int] = set()
    for t in ("inodes", "extents", "xattrs"):
        for row in set(before[t]) ^ set(after[t]):
            inos.add(int(row[0]))
    parents = {int(row[0]) for row in set(before["dentries"]) ^ set(after["dentries"])}
    return inos, parents


@pytest.mark.parametrize("seed,depth", [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_random_lease_histories_replay_identically_and_keep_writers_exclusive(
    tmp_path: Path, seed: int, depth: int
) -> None:
    rng = random.Random(seed)
    v1 = new_view(tmp_path / "v1.db", lease_depth=depth)
    v2 = new_view(tmp_path / "v2.db", lease_depth=depth)
    for v in (v1, v2):
        start(v, *CLIENTS)
    model = Model(rng, v1)
    # A few directories to lease, at the top and below.
    for i in range(4):
        model.next_ino += 1
        e = LogEntry("setup", "A", T0, [Mk(model.next_ino, ROOT_INO, b"h%d" % i, DIR, 0, 0, T0)])
        e.inc, e.kind = 1, SYNC
        for v in (v1, v2):
            put(v, e)
    rules: dict[str, int] = {}
    applied = 0
    for _ in range(STEPS):
        e = model.entry()
        before = dump(v1)
        roots_before = set(model.roots())
        lease_before = {d: v1.lease(d)[0] for d in roots_before}
        dirs_before, inos_before = domain_map(v1)
        _, r1 = put(v1, e)
        _, r2 = put(v2, e)
        after = dump(v1)
        assert after == dump(v2), f"views differ after {e.wire()}"
        assert (r1.fenced is None) == (r2.fenced is None)
        if r1.fenced is not None:
            rules[r1.fenced.rule] = rules.get(r1.fenced.rule, 0) + 1
            for t in ("inodes", "dentries", "extents", "xattrs", "sessions", "leases", "recalls"):
                assert after[t] == before[t], f"fenced entry changed {t}: {e.wire()}"
            continue
        applied += 1
        # Invariant 2, from the rows that changed.
        dirs_after, inos_after = domain_map(v1)
        inos, parents = changed_rows(before, after)
        touched: set[domains.Domain] = set()
        for p in parents:
            touched.add(dirs_before[p] if p in dirs_before else dirs_after[p])
        for i in inos:
            touched |= inos_before.get(i, set()) | inos_after.get(i, set())
        me = (e.client, e.inc)
        # Domains the entry itself takes (and may give up or remove again later in it).
        taken = {op.domain for op in e.ops if isinstance(op, (LAcq, LTko, LAdopt))}
        for d in touched:
            if d is None or d not in roots_before:
                continue  # the top, or a domain this entry made
            pre, post = lease_before[d], v1.lease(d)[0]
            ok = pre == me or post == me or d in taken or (pre is None and e.kind == SYNC)
            assert ok, f"entry {e.wire()} changed domain {d} held by {pre} (now {post})"
    # The run exercised both outcomes and the fencing rules.
    assert applied > STEPS // 4, rules
    assert {"not-held", "held-elsewhere", "epoch", "op-failed"} <= set(rules), rules
