"""The local journal's table and the layout of flushed entries (efsish.meta.journal)."""

from __future__ import annotations

import dataclasses
import stat

from efsish import codec
from efsish.meta import journal
from efsish.meta.ops import Extent, Mk, Op, Write
from efsish.meta.view import View
from tests.meta.views import T0


def test_flushed_entries_are_cut_by_the_encoded_size_of_their_ops(view: View) -> None:
    """A flush cuts the journal into entries of at most max_bytes: the size of a row
    is its op's wire form as stored, in bytes, the same as encoding the op again
    gives, and every entry's encoding stays within the bound, with names that are
    not ASCII (UTF-8 of 2-3 bytes a character) or not UTF-8 at all."""
    journal.ensure(view)
    view.begin()
    names = [b"f", "\u00e9t\u00e9-\u65e5\u672c-".encode(), b"raw-\xff\xfe-"]
    for i in range(60):
        ino = 100 + i
        data = bytes([i]) * (200 + 37 * i)  # inline data of growing size
        name = names[i % 3] * (1 + i % 7) + b"%d" % i
        ops: list[Op] = [
            Mk(ino, 1, name, stat.S_IFREG | 0o644, 0, 0, T0 + i),
            Write(ino, (Extent(0, len(data), data=data),), len(data), T0 + i),
        ]
        journal.append(view, "client", ops, [{1}, {1}], T0 + i, 1.0)
    view.commit()
    rows = journal.rows(view)
    assert len(rows) == 120 and all(r.size > 0 for r in rows)
    bound = 4096 + 8000
    cut = journal.entries(rows, "client", 1, T0, {1: 5}, max_bytes=bound)
    unsized = [dataclasses.replace(r, size=0) for r in rows]
    again = journal.entries(unsized, "client", 1, T0, {1: 5}, max_bytes=bound)
    assert len(cut) > 3
    assert [e.batch for e in cut] == [e.batch for e in again]
    covered = [j for e in cut if e.batch for j in range(e.batch[0], e.batch[1] + 1)]
    assert covered == [r.jseq for r in rows]  # every row once, in order
    for e in cut:  # (before compression)
        assert len(codec.dumps(e.wire())) <= bound
    assert [r.op for r in journal.rows(view)] == [r.op for r in rows]  # read back alike


def test_a_flush_step_reads_the_rows_of_one_entry_up_to_a_bound(view: View) -> None:
    """`first_rows` takes what `entries` puts in its first entry (a flush decodes one
    entry's worth of rows per step), and no row past `upto`."""
    journal.ensure(view)
    view.begin()
    for i in range(40):
        data = bytes([i]) * 3000
        ops: list[Op] = [Write(100 + i, (Extent(0, len(data), data=data),), len(data), T0 + i)]
        journal.append(view, "client", ops, [{1}], T0 + i, 1.0)
    view.commit()
    bound = 4096 + 20_000
    first = journal.entries(journal.rows(view), "client", 1, T0, {1: 5}, max_bytes=bound)[0]
    rows, last = journal.first_rows(view, max_bytes=bound)
    assert not last and (rows[0].jseq, rows[-1].jseq) == first.batch
    rows, last = journal.first_rows(view, upto=rows[0].jseq + 1, max_bytes=bound)
    assert last and [r.jseq for r in rows] == [rows[0].jseq, rows[0].jseq + 1]
    newest = journal.newest_jseq(view)
    rows, last = journal.first_rows(view, upto=newest)
    assert last and len(rows) == 40 and rows[-1].jseq == newest


def test_count_follows_appends_and_drops(view: View) -> None:
    """`count` (two seeks of the primary key) agrees with the rows there are, through
    appends of several ops at once and drops of the oldest."""
    journal.ensure(view)
    assert journal.count(view) == 0
    view.begin()
    for i in range(10):
        ops: list[Op] = [Mk(100 + i, 1, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0, T0 + i)] * (
            1 + i % 3
        )
        journal.append(view, "client", ops, [{1}] * len(ops), T0 + i, 1.0)
    view.commit()
    assert journal.count(view) == len(journal.rows(view)) == 19
    for upto in (3, 11, 19):
        journal.drop_through(view, upto)
        assert journal.count(view) == len(journal.rows(view)) == 19 - upto
    journal.append(
        view, "client", [Mk(200, 1, b"g", stat.S_IFREG | 0o644, 0, 0, T0)], [{1}], T0, 1.0
    )
    assert journal.count(view) == len(journal.rows(view)) == 1
