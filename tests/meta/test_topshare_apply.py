"""Shares of the top (docs/design/LEASES.md §17) as every replayer applies them:
`lshr` adds the writer's incarnation, `lshr(off)` removes it, `sess` ends a client's
older incarnation's share, and a change of the top ends every share but its writer's,
inside the entry (a fenced entry ends none). Driven with hand-built entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from efsish.meta.ops import LAcq, LShr, Mk, Mv, Rm, Sess, SetAttr, SetXattr
from efsish.meta.view import ROOT_INO, View
from tests.meta.leaselog import DIR, REG, T0, jour, new_view, put, start, sync

ALICE = 10


@pytest.fixture
def view(tmp_path: Path) -> View:
    v = new_view(tmp_path / "view.db")
    start(v, "A", "B", "C", homes={"alice": ALICE})
    for c in "ABC":
        _, res = put(v, sync(c, 1, LShr()))
        assert res.fenced is None and res.shares == {(c, 1)} and not res.revoked
    assert v.shares() == {("A", 1), ("B", 1), ("C", 1)}
    return v


def test_a_change_of_the_top_ends_every_share_but_its_writers(view: View) -> None:
    seq, res = put(view, sync("A", 1, Mk(20, ROOT_INO, b"bob", DIR, 0, 0, T0)))
    assert res.fenced is None
    assert view.shares() == {("A", 1)}
    assert res.revoked == {("B", 1), ("C", 1)} and res.revoker == ("A", seq)
    # Nobody else shares now: the next change of the top ends nothing.
    _, res = put(view, sync("B", 1, Rm(ROOT_INO, b"bob", T0)))
    assert view.shares() == set() and res.revoked == {("A", 1)}


@pytest.mark.parametrize(
    "op",
    [
        Mv(ROOT_INO, b"alice", ROOT_INO, b"alice2", T0),  # a domain root renamed in the top
        SetAttr(ROOT_INO, mode=DIR | 0o700, ctime=T0),  # the root's attributes
        SetAttr(ROOT_INO, mtime=T0, ctime=T0),
        SetXattr(ROOT_INO, b"user.x", b"1", T0),
        Mk(21, ROOT_INO, b"file", REG, 0, 0, T0),  # a file linked in the top
    ],
    ids=["rename-root", "chmod-root", "utimes-root", "xattr-root", "file-in-top"],
)
def test_what_changes_the_top(view: View, op: object) -> None:
    _, res = put(view, sync("C", 1, op))  # type: ignore[arg-type]
    assert res.fenced is None and view.shares() == {("C", 1)}


def test_changes_that_do_not_end_shares(view: View) -> None:
    # An access time of the top (relatime), a change inside a domain, lease ops.
    _, res = put(view, sync("A", 1, SetAttr(ROOT_INO, atime=T0)))
    assert res.fenced is None and not res.revoked
    _, res = put(view, sync("A", 1, Mk(22, ALICE, b"f", REG, 0, 0, T0)))
    assert res.fenced is None and not res.revoked
    p, res = put(view, sync("B", 1, LAcq(ALICE)))
    _, res = put(view, jour("B", 1, Mk(23, ALICE, b"g", REG, 0, 0, T0), claims={ALICE: p}))
    assert res.fenced is None and not res.revoked
    assert view.shares() == {("A", 1), ("B", 1), ("C", 1)}


def test_a_fenced_entry_ends_no_share(view: View) -> None:
    # A journaled entry may not change the top: fenced, and it changed nothing.
    _, res = put(view, jour("A", 1, Mk(24, ROOT_INO, b"x", REG, 0, 0, T0)))
    assert res.fenced is not None and not res.revoked
    assert view.shares() == {("A", 1), ("B", 1), ("C", 1)}


def test_an_old_incarnations_share_lasts_until_revoked_or_ended_by_proof(view: View) -> None:
    # A new incarnation does not end the old one's share: its daemon may still run (a
    # copied cache dir) and answer from it. A change of the top revokes it...
    _, res = put(view, sync("B", 2, Sess("B", 2), LShr()))
    assert res.fenced is None and view.shares() == {("A", 1), ("B", 1), ("B", 2), ("C", 1)}
    _, res = put(view, sync("A", 1, Mk(30, ROOT_INO, b"n", DIR, 0, 0, T0)))
    assert res.revoked == {("B", 1), ("B", 2), ("C", 1)}
    # ... or the new incarnation ends it when the old daemon is proven dead.
    _, res = put(view, sync("C", 2, Sess("C", 2), LShr(on=False, inc=1)))
    assert res.fenced is None and not res.revoked
    _, res = put(view, sync("A", 2, Sess("A", 2), LShr(on=False, inc=1)))
    assert res.fenced is None and view.shares() == set() and res.shares == {("A", 1)}
    # Nobody ends a newer incarnation's share, nor takes one for another.
    put(view, sync("C", 2, LShr()))
    _, res = put(view, sync("C", 1, LShr(on=False, inc=2)))
    assert res.fenced is not None and view.shares() == {("C", 2)}
    _, res = put(view, sync("C", 2, LShr(on=True, inc=1)))
    assert res.fenced is not None


def test_lshr_off_ends_a_share_and_is_a_no_op_without_one(view: View) -> None:
    _, res = put(view, jour("C", 1, LShr(on=False)))  # rides in a journaled flush too
    assert res.fenced is None and view.shares() == {("A", 1), ("B", 1)}
    _, res = put(view, sync("C", 1, LShr(on=False)))  # an acknowledgement in the log
    assert res.fenced is None and res.shares == {("C", 1)}
    assert view.shares() == {("A", 1), ("B", 1)}


def test_a_share_needs_the_lease_format(tmp_path: Path) -> None:
    v = new_view(tmp_path / "old.db")
    _, res = put(v, sync("A", 1, LShr()))
    assert res.fenced is not None and v.shares() == set()
