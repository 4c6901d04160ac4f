"""The local journal (docs/design/LEASES.md §5, §6.3): the changes this mount answered
under a lease and has not yet committed to the log, in the order it answered them.

The journal is a table in the view's own SQLite database: applying a local change and
appending it are one transaction (the caller's), so the view and the journal never
disagree, and kill -9 loses nothing that was answered. A flush turns the rows into
journaled log entries (`entries`), each at most MAX_ENTRY bytes encoded and labelled
with its jseq range; once an entry has landed, `drop_through` deletes its rows in the
transaction that records the entry as applied.

Each row keeps the domains its ops touch; the entry's claims are those domains at
their epochs at flush time (an adoption changes the epoch, not the domain).

This module owns the table and the entry layout. It is synchronous and runs in the
writer's worker thread inside the caller's transaction; it must not commit, touch trio
or the store. The jseq counter lives in `meta` under the client's name, and never goes
back, so a label is never reused by the client.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from efsish import codec
from efsish.meta.ops import JOURNALED, LogEntry, Op, decode_op
from efsish.meta.view import View

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    jseq INTEGER PRIMARY KEY,
    op TEXT NOT NULL,          -- the op's wire form (JSON; UTF-8 in a BLOB, or TEXT)
    domains TEXT NOT NULL,     -- JSON list of the domains it touches
    t INTEGER NOT NULL,        -- the writer's wall clock, ns (for JOURNAL.txt)
    mono REAL NOT NULL         -- the lease clock when it was answered (flush age)
);
"""
MAX_ENTRY = 1024 * 1024  # bytes of one journaled log entry, encoded


@dataclass(frozen=True)
class Row:
    jseq: int
    op: Op
    domains: frozenset[int]
    t: int
    mono: float
    size: int = 0  # the length of the op's wire form as stored (0: not known)


def ensure(view: View) -> None:
    view.db.executescript(SCHEMA)


def _counter(client: str) -> str:
    return f"jseq_next:{client}"


# A garbage row (a block a journaled change stopped referencing) is recorded at
# PENDING + its jseq until its batch lands, then at the landing position: gc defers any
# row whose position is past what every mount applied, so it keeps the block meanwhile.
PENDING = 1 << 60


def next_jseq(view: View, client: str) -> int:
    return int(view.get_meta(_counter(client), 1))


def landed(view: View, first: int, last: int, seq: int) -> None:
    """Rows [first, last] are in the log at `seq`: their garbage rows are there too."""
    view.db.execute(
        "UPDATE garbage SET seq = ? WHERE seq BETWEEN ? AND ?",
        (seq, PENDING + first, PENDING + last),
    )


def append(
    view: View,
    client: str,
    ops: list[Op],
    domains: list[set[int]],
    t: int,
    mono: float,
    first: int | None = None,
) -> tuple[int, int]:
    """Append `ops` (one answered change) as rows, each with the domains it touches;
    return their jseq range. `first`: `next_jseq` as the caller read it in this
    transaction (saves reading it again)."""
    if first is None:
        first = next_jseq(view, client)
    last = max(first + len(ops) - 1, first)
    view.db.executemany(
        "INSERT INTO journal (jseq, op, domains, t, mono) VALUES (?, ?, ?, ?, ?)",
        [
            (first + i, codec.dumps(op.wire()), json.dumps(sorted(doms)), t, mono)
            for i, (op, doms) in enumerate(zip(ops, domains, strict=True))
        ],
    )
    view.set_meta(_counter(client), first + len(ops))
    return first, last


_ROW_COLS = "jseq, op, domains, t, mono"


def _row(jseq: int, op: bytes | str, doms: str, t: int, mono: float) -> Row:
    return Row(int(jseq), decode_op(codec.loads(op)), frozenset(json.loads(doms)), t, mono, len(op))


def _overflows(size: int, n: int, max_bytes: int) -> bool:
    """An entry holding `size` bytes of ops has no room for one more of `n` bytes (the
    rest of `max_bytes` is for the entry's header)."""
    return size + n > max_bytes - 4096


def rows(view: View, limit: int = 1_000_000) -> list[Row]:
    q = f"SELECT {_ROW_COLS} FROM journal ORDER BY jseq LIMIT ?"
    return [_row(*r) for r in view.db.execute(q, (limit,))]


def first_rows(
    view: View, upto: int | None = None, max_bytes: int | None = None
) -> tuple[list[Row], bool]:
    """The oldest rows (up to jseq `upto`), as many as `entries` puts in its first
    entry (so that a flush decodes one entry's worth per step, not the whole journal),
    and whether they are all the rows there are (up to `upto`)."""
    limit = MAX_ENTRY if max_bytes is None else max_bytes
    out: list[Row] = []
    size = 0
    q = f"SELECT {_ROW_COLS} FROM journal WHERE jseq <= ? ORDER BY jseq"
    for r in view.db.execute(q, (upto if upto is not None else 1 << 62,)):
        n = len(r[1]) + 2
        if out and _overflows(size, n, limit):
            return out, False
        out.append(_row(*r))
        size += n
    return out, True


def newest_jseq(view: View) -> int:
    """The jseq of the newest row (0 if the journal is empty)."""
    return int(view.db.execute("SELECT COALESCE(MAX(jseq), 0) FROM journal").fetchone()[0])


def count(view: View) -> int:
    """The number of rows. They are contiguous in jseq (`append` adds the next ones,
    `drop_through` removes the oldest), so two seeks of the primary key count them: a
    COUNT(*) would read the whole table, after every flushed entry."""
    lo, hi = view.db.execute("SELECT MIN(jseq), MAX(jseq) FROM journal").fetchone()
    return 0 if lo is None else int(hi) - int(lo) + 1


def op_domains(view: View, first: int, last: int) -> list[list[int]]:
    """The domains each row of [first, last] touches, in order (for the verdict on
    our own entry: efsish.meta.leasing.judge_own_journaled)."""
    return [
        list(json.loads(d))
        for (d,) in view.db.execute(
            "SELECT domains FROM journal WHERE jseq BETWEEN ? AND ? ORDER BY jseq", (first, last)
        )
    ]


def covers(view: View, first: int, last: int) -> bool:
    """True if the journal still holds rows [first, last] (an entry of ours that
    landed but whose rows were not dropped yet)."""
    row = view.db.execute(
        "SELECT COUNT(*) FROM journal WHERE jseq BETWEEN ? AND ?", (first, last)
    ).fetchone()
    return int(row[0]) > 0


def drop_through(view: View, last: int) -> None:
    view.db.execute("DELETE FROM journal WHERE jseq <= ?", (last,))


def entries(
    rows_: list[Row],
    client: str,
    inc: int,
    t: int,
    epochs: dict[int, int],
    max_bytes: int = MAX_ENTRY,
) -> list[LogEntry]:
    """The journaled log entries for `rows_`, in order, each at most `max_bytes`
    encoded (a single op larger than that goes alone). `epochs`: each domain's
    current epoch (the caller checked that this incarnation holds it)."""
    out: list[LogEntry] = []
    cur: list[Row] = []
    size = 0
    for r in rows_:
        # The stored wire form's length (what encoding it again would give).
        n = (r.size or len(codec.dumps(r.op.wire()))) + 2
        if cur and _overflows(size, n, max_bytes):
            out.append(_entry(cur, client, inc, t, epochs))
            cur, size = [], 0
        cur.append(r)
        size += n
    if cur:
        out.append(_entry(cur, client, inc, t, epochs))
    return out


def _entry(rs: list[Row], client: str, inc: int, t: int, epochs: dict[int, int]) -> LogEntry:
    doms: set[int] = set().union(*(r.domains for r in rs))
    e = LogEntry(uuid.uuid4().hex, client, t, [r.op for r in rs])
    e.inc, e.kind, e.batch = inc, JOURNALED, (rs[0].jseq, rs[-1].jseq)
    e.claims = {d: epochs[d] for d in sorted(doms)}
    return e


def encode(entry: LogEntry) -> bytes:
    blob = codec.encode_json(b"L", entry.wire())
    codec.decode(b"L", blob, "the log entry being written")
    return blob
