"""Helpers for driving View.apply_entry with hand-built lease-era log entries."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from efsish.meta.domains import DEFAULT_LEASE_DEPTH
from efsish.meta.ops import JOURNALED, SYNC, Fmt, LogEntry, Mk, Op, Sess
from efsish.meta.view import ApplyResult, View

T0 = 1_700_000_000_000_000_000
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def new_view(path: Path, lease_depth: int = DEFAULT_LEASE_DEPTH) -> View:
    v = View(path, lease_depth=lease_depth)
    v.begin()
    v.init_root("uuid", T0)
    v.commit()
    return v


def entry(
    client: str,
    inc: int | None,
    *ops: Op,
    kind: str | None = SYNC,
    claims: dict[int, int] | None = None,
    batch: tuple[int, int] | None = None,
) -> LogEntry:
    """An entry of (client, inc); kind None: one without a lease header."""
    e = LogEntry(f"{client}-tx", client, T0, list(ops))
    if kind is not None:
        e.inc, e.kind, e.claims, e.batch = inc, kind, claims, batch
    return e


def sync(client: str, inc: int, *ops: Op, claims: dict[int, int] | None = None) -> LogEntry:
    return entry(client, inc, *ops, kind=SYNC, claims=claims)


def jour(client: str, inc: int, *ops: Op, claims: dict[int, int] | None = None) -> LogEntry:
    return entry(client, inc, *ops, kind=JOURNALED, claims=claims, batch=(1, len(ops)))


def put(view: View, e: LogEntry) -> tuple[int, ApplyResult]:
    """Apply `e` at the next position, as a catch-up does: (position, result)."""
    seq = view.applied_seq + 1
    res = ApplyResult()
    view.begin()
    try:
        view.apply_entry(seq, e, res)
        view.commit()
    except BaseException:
        view.rollback()
        raise
    return seq, res


REPLICATED = {
    "inodes": "SELECT * FROM inodes ORDER BY ino",
    "dentries": "SELECT parent, name, ino FROM dentries ORDER BY parent, name",
    "extents": "SELECT * FROM extents ORDER BY ino, off",
    "xattrs": "SELECT * FROM xattrs ORDER BY ino, name",
    "garbage": "SELECT * FROM garbage ORDER BY key",
    "meta": "SELECT * FROM meta ORDER BY key",
    "sessions": "SELECT * FROM sessions ORDER BY client",
    "leases": "SELECT * FROM leases ORDER BY domain",
    "recalls": "SELECT * FROM recalls ORDER BY domain, rid",
    "fenced": "SELECT * FROM fenced ORDER BY client, inc, first_seq",
    "shares": "SELECT * FROM shares ORDER BY client",
}


def dump(view: View) -> dict[str, list[tuple[Any, ...]]]:
    """Every replicated table (dentries without the local readdir cursor id)."""
    return {t: [tuple(r) for r in view.db.execute(q)] for t, q in REPLICATED.items()}


def start(view: View, *clients: str, homes: dict[str, int] | None = None) -> None:
    """fmt(3), a sess for each client, and the home directories `homes` (name: ino)."""
    put(view, sync("admin", 1, Fmt(3)))
    for c in clients:
        put(view, sync(c, 1, Sess(c, 1)))
    for name, ino in (homes or {}).items():
        put(view, sync("admin", 1, Mk(ino, 1, name.encode(), DIR, 0, 0, T0)))
