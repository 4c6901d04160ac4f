"""The lease protocol's replicated core (docs/design/LEASES.md §2–§4): View.apply_entry
driven directly with hand-built log entries, as every replayer applies them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from efsish.errors import CorruptObject
from efsish.meta import checkpoints, leasing
from efsish.meta.leasing import (
    FENCE_EPOCH,
    FENCE_HELD_ELSEWHERE,
    FENCE_INCARNATION,
    FENCE_NO_HEADER,
    FENCE_NOT_HELD,
    FENCE_OP_FAILED,
    FENCE_SUPERSEDED,
    NewerFormat,
)
from efsish.meta.ops import (
    ClaimInodes,
    Fmt,
    LAcq,
    LAdopt,
    LDirty,
    LFlush,
    LRcv,
    LRec,
    LRel,
    LTko,
    Mk,
    Mv,
    Rm,
    Sess,
    SetAttr,
)
from efsish.meta.view import ROOT_INO, ApplyResult, View
from tests.meta.leaselog import DIR, REG, T0, dump, entry, jour, new_view, put, start, sync

ALICE, BOB = 10, 11


@pytest.fixture
def view(tmp_path: Path) -> View:
    v = new_view(tmp_path / "view.db")
    start(v, "A", "B", homes={"alice": ALICE, "bob": BOB})
    return v


def holder(view: View, d: int) -> tuple[str, int] | None:
    return view.lease(d)[0]


def acquire(view: View, client: str, d: int, inc: int = 1) -> int:
    seq, res = put(view, sync(client, inc, LAcq(d)))
    assert res.fenced is None and holder(view, d) == (client, inc)
    return seq


# ------------------------------------------------------------------ the life of a lease


def test_domain_roots_get_a_free_row_when_made(view: View) -> None:
    assert view.lease(ALICE) == (None, 4)  # entries: fmt, sess A, sess B, mk alice
    assert view.lease(BOB) == (None, 5)


def test_grant_journal_and_release(view: View) -> None:
    p, res = put(
        view, sync("A", 1, LAcq(ALICE), Mk(20, ALICE, b"f", REG, 0, 0, T0), claims={ALICE: 0})
    )
    # The claim names the epoch the op meets: lacq made it this entry's position.
    assert res.fenced is not None and res.fenced.rule == FENCE_EPOCH
    p, res = put(
        view,
        sync("A", 1, LAcq(ALICE), Mk(20, ALICE, b"f", REG, 0, 0, T0), claims={ALICE: p + 1}),
    )
    assert res.fenced is None and view.lease(ALICE) == (("A", 1), p)
    assert res.leases == {ALICE} and view.lookup(ALICE, b"f") == 20
    _, res = put(view, jour("A", 1, Mk(21, ALICE, b"g", REG, 0, 0, T0), claims={ALICE: p}))
    assert res.fenced is None and view.lookup(ALICE, b"g") == 21
    q, res = put(view, jour("A", 1, LRel(ALICE), claims={ALICE: p}))
    assert res.fenced is None and view.lease(ALICE) == (None, q)


def test_lacq_first_and_lrel_last_in_one_entry(view: View) -> None:
    """Review finding 3: an entry's ops run in order, each checked against the state
    just before it."""
    p = view.applied_seq + 1
    _, res = put(
        view,
        sync(
            "A",
            1,
            LAcq(ALICE),
            Mk(20, ALICE, b"f", REG, 0, 0, T0),
            SetAttr(20, mode=REG | 0o600),
            LRel(ALICE),
            claims={ALICE: p},
        ),
    )
    assert res.fenced is None
    assert view.lookup(ALICE, b"f") == 20 and view.lease(ALICE) == (None, p)
    # An op after the release in the same entry meets a FREE domain: a journaled entry
    # may not change it.
    q = view.applied_seq + 1
    _, res = put(
        view,
        jour(
            "A", 1, LAcq(ALICE), LRel(ALICE), Mk(21, ALICE, b"g", REG, 0, 0, T0), claims={ALICE: q}
        ),
    )
    assert res.fenced is not None and res.fenced.rule == FENCE_NOT_HELD
    assert view.lookup(ALICE, b"g") is None and view.lease(ALICE) == (None, p)


def test_read_recall_is_answered_by_a_flush_and_the_holder_keeps_the_lease(view: View) -> None:
    p = acquire(view, "A", ALICE)
    _, res = put(view, sync("B", 1, LRec(ALICE, "r1", "r")))
    assert res.fenced is None and view.recall(ALICE, "r1") == ("B", 1, "r", p + 1)
    assert view.lease(ALICE) == (("A", 1), p)  # a recall does not change the epoch
    _, res = put(
        view,
        jour("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), LFlush(ALICE, "r1"), claims={ALICE: p}),
    )
    assert res.fenced is None and view.recall(ALICE, "r1") is None
    assert view.lease(ALICE) == (("A", 1), p) and view.lookup(ALICE, b"f") == 20
    # A read recall is not answered by a flush twice, and a write recall not at all.
    _, res = put(view, jour("A", 1, LFlush(ALICE, "r1"), claims={ALICE: p}))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED


def test_write_recall_is_answered_by_a_handover(view: View) -> None:
    p = acquire(view, "A", ALICE)
    put(view, sync("B", 1, LRec(ALICE, "w1", "w")))
    q, res = put(
        view,
        jour(
            "A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), LRel(ALICE, "w1", to="B"), claims={ALICE: p}
        ),
    )
    assert res.fenced is None and view.lease(ALICE) == (("B", 1), q)
    assert view.recall(ALICE, "w1") is None
    # B journals under the handed-over lease without a PUT of its own.
    _, res = put(view, jour("B", 1, Rm(ALICE, b"f", T0), claims={ALICE: q}))
    assert res.fenced is None and view.lookup(ALICE, b"f") is None
    # A handover must answer a write recall by the one it names.
    put(view, sync("A", 1, LRec(ALICE, "r2", "r")))
    _, res = put(view, jour("B", 1, LRel(ALICE, "r2", to="A"), claims={ALICE: q}))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED


def test_takeover_fences_the_old_holder_until_its_recovery(view: View) -> None:
    p = acquire(view, "A", ALICE)
    pb = acquire(view, "A", BOB)
    put(view, sync("B", 1, LRec(ALICE, "r1", "w")))
    # Only the recall's writer may take over with it.
    _, res = put(view, sync("A", 1, LTko(ALICE, "r1")))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED
    t, res = put(view, sync("B", 1, LTko(ALICE, "r1")))
    assert res.fenced is None and view.lease(ALICE) == (("B", 1), t)
    assert view.recall(ALICE, "r1") is None
    # A wakes and flushes its journal: the first entry claims alice and is fenced...
    f, res = put(view, jour("A", 1, Mk(20, ALICE, b"x", REG, 0, 0, T0), claims={ALICE: p}))
    assert res.fenced is not None and res.fenced.rule == FENCE_NOT_HELD
    assert view.open_fencing("A", 1) == f
    # ...and so is every later journaled entry of that incarnation, even in bob, which
    # it still holds: what survives is a prefix of what A answered (finding 7).
    _, res = put(view, jour("A", 1, Mk(21, BOB, b"y", REG, 0, 0, T0), claims={BOB: pb}))
    assert res.fenced is not None and res.fenced.rule == FENCE_INCARNATION
    assert view.lookup(BOB, b"y") is None
    # A sync entry of it still applies: the recovery is written with one.
    _, res = put(view, sync("A", 1, LRcv("A", 1, "/.efsish-recovered/A-1")))
    assert res.fenced is None and view.open_fencing("A", 1) is None
    row = view.db.execute("SELECT first_seq, rcv_seq, path FROM fenced").fetchone()
    assert row == (f, view.applied_seq, "/.efsish-recovered/A-1")
    _, res = put(view, jour("A", 1, Mk(21, BOB, b"y", REG, 0, 0, T0), claims={BOB: pb}))
    assert res.fenced is None and view.lookup(BOB, b"y") == 21


def test_a_new_incarnation_adopts_the_old_ones_leases(view: View) -> None:
    p = acquire(view, "A", ALICE)
    # Adoption names the epoch it adopts; the adopted lease gets a new one.
    _, res = put(view, sync("A", 2, Sess("A", 2), LAdopt(ALICE), claims={ALICE: p - 1}))
    assert res.fenced is not None and res.fenced.rule == FENCE_EPOCH
    q, res = put(view, sync("A", 2, Sess("A", 2), LAdopt(ALICE), claims={ALICE: p}))
    assert res.fenced is None and view.lease(ALICE) == (("A", 2), q)
    assert view.session("A") == (2, q, None)
    _, res = put(view, jour("A", 2, Mk(20, ALICE, b"f", REG, 0, 0, T0), claims={ALICE: q}))
    assert res.fenced is None
    # Another client cannot adopt it; an incarnation cannot start twice.
    _, res = put(view, sync("B", 2, Sess("B", 2), LAdopt(ALICE), claims={ALICE: q}))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED
    _, res = put(view, sync("A", 2, Sess("A", 2)))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED


def test_ldirty_marks_and_clears_a_client(view: View) -> None:
    s, _ = put(view, sync("A", 1, LDirty("A", 1)))
    assert view.session("A") == (1, 2, s)
    put(view, sync("A", 1, LDirty("A", 1, dirty=False)))
    assert view.session("A") == (1, 2, None)
    _, res = put(view, sync("A", 1, LDirty("A", 5)))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED


# ------------------------------------------------------------- the fencing conditions


def test_fence_1_an_older_incarnation_is_fenced(view: View) -> None:
    put(view, sync("A", 2, Sess("A", 2)))
    before = dump(view)
    for e in (
        sync("A", 1, Mk(20, ROOT_INO, b"top", REG, 0, 0, T0)),
        jour("A", 1, Mk(20, ROOT_INO, b"top", REG, 0, 0, T0)),
    ):
        seq, res = put(view, e)
        assert res.fenced is not None and res.fenced.rule == FENCE_SUPERSEDED
        assert not res.inodes and not res.entries
    after = dump(view)
    assert after["inodes"] == before["inodes"] and after["dentries"] == before["dentries"]
    # The journaled one fences the old incarnation (so its lrcv can be recorded).
    assert view.open_fencing("A", 1) == seq


def test_fence_1_a_fenced_incarnation_keeps_its_survivors_a_prefix(view: View) -> None:
    pa = acquire(view, "A", ALICE)
    pb = acquire(view, "A", BOB)
    # A flush split in three entries: e1 (alice), e2 (bob), e3 (alice). B takes bob
    # over between e1 and e2 (review finding 7).
    _, r1 = put(view, jour("A", 1, Mk(20, ALICE, b"1", REG, 0, 0, T0), claims={ALICE: pa}))
    put(view, sync("B", 1, LRec(BOB, "r", "w")))
    put(view, sync("B", 1, LTko(BOB, "r")))
    _, r2 = put(view, jour("A", 1, Mk(21, BOB, b"2", REG, 0, 0, T0), claims={BOB: pb}))
    _, r3 = put(view, jour("A", 1, Mk(22, ALICE, b"3", REG, 0, 0, T0), claims={ALICE: pa}))
    assert r1.fenced is None
    assert r2.fenced is not None and r2.fenced.rule == FENCE_NOT_HELD
    assert r3.fenced is not None and r3.fenced.rule == FENCE_INCARNATION
    assert view.lookup(ALICE, b"1") == 20 and view.lookup(ALICE, b"3") is None


def test_fence_2_a_journaled_entry_in_a_free_domain(view: View) -> None:
    _, res = put(view, jour("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), claims={ALICE: 5}))
    assert res.fenced is not None and res.fenced.rule == FENCE_NOT_HELD
    assert view.lookup(ALICE, b"f") is None
    # The same change as a sync entry applies: the domain is FREE.
    _, res = put(view, sync("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0)))
    assert res.fenced is None and view.lookup(ALICE, b"f") == 20


def test_fence_2_a_journaled_entry_in_a_domain_held_by_another(view: View) -> None:
    p = acquire(view, "B", ALICE)
    _, res = put(view, jour("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), claims={ALICE: p}))
    assert res.fenced is not None and res.fenced.rule == FENCE_NOT_HELD


def test_fence_2_a_journaled_entry_at_another_epoch(view: View) -> None:
    p = acquire(view, "A", ALICE)
    for claims in ({ALICE: p - 1}, {}):
        _, res = put(view, jour("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), claims=claims))
        assert res.fenced is not None and res.fenced.rule == FENCE_EPOCH
        view.db.execute("DELETE FROM fenced")  # (the next try is a fresh incarnation's)


def test_fence_3_a_sync_entry_in_a_domain_held_by_another(view: View) -> None:
    p = acquire(view, "A", ALICE)
    mk = Mk(20, ALICE, b"f", REG, 0, 0, T0)
    _, res = put(view, sync("B", 1, mk, claims={ALICE: p}))
    assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE
    assert view.open_fencing("B", 1) is None  # a fenced sync entry fences no incarnation
    # The holder's own sync change must claim the domain at its epoch.
    _, res = put(view, sync("A", 1, mk))
    assert res.fenced is not None and res.fenced.rule == FENCE_EPOCH
    _, res = put(view, sync("A", 1, mk, claims={ALICE: p}))
    assert res.fenced is None


def test_fence_4_an_op_that_fails_fences_the_entry_and_the_next_applies(view: View) -> None:
    """Review finding 19: never a mount stuck at that position."""
    p = acquire(view, "A", ALICE)
    bad = jour(
        "A",
        1,
        Mk(20, ALICE, b"f", REG, 0, 0, T0),
        Rm(ALICE, b"missing", T0),
        claims={ALICE: p},
    )
    seq, res = put(view, bad)
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED
    assert "missing" in res.fenced.reason
    assert view.lookup(ALICE, b"f") is None and view.applied_seq == seq
    # A name that exists (an sqlite IntegrityError inside apply) fences too.
    put(view, sync("B", 1, Mk(30, ROOT_INO, b"n", REG, 0, 0, T0)))
    _, res = put(view, sync("B", 1, Mk(31, ROOT_INO, b"n", REG, 0, 0, T0)))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED
    _, res = put(view, sync("B", 1, Mk(31, ROOT_INO, b"m", REG, 0, 0, T0)))
    assert res.fenced is None and view.lookup(ROOT_INO, b"m") == 31


def test_a_journaled_entry_may_not_claim_inode_numbers(view: View) -> None:
    p = acquire(view, "A", ALICE)
    _, res = put(view, jour("A", 1, ClaimInodes(1000, 10), claims={ALICE: p}))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED


def test_after_fmt_an_entry_without_a_lease_header_is_fenced(view: View) -> None:
    _, res = put(view, entry("old", None, Mk(20, ROOT_INO, b"f", REG, 0, 0, T0), kind=None))
    assert res.fenced is not None and res.fenced.rule == FENCE_NO_HEADER
    assert view.lookup(ROOT_INO, b"f") is None


# ------------------------------------------------------------- pre-lease logs and views


def test_an_old_format_entry_that_fails_still_stops_the_mount(tmp_path: Path) -> None:
    v = new_view(tmp_path / "v.db")
    with pytest.raises(CorruptObject, match="'rm' operation does not apply"):
        put(v, entry("old", None, Rm(ROOT_INO, b"missing", T0), kind=None))
    with pytest.raises(CorruptObject, match="lease operation 'lacq'"):
        put(v, entry("old", None, LAcq(2), kind=None))
    assert v.applied_seq == 0


def test_grants_need_the_lease_format(tmp_path: Path) -> None:
    v = new_view(tmp_path / "v.db")
    put(v, entry("old", None, Mk(10, ROOT_INO, b"alice", DIR, 0, 0, T0), kind=None))
    _, res = put(v, sync("A", 1, LAcq(10)))
    assert res.fenced is not None and res.fenced.rule == FENCE_OP_FAILED
    assert "format 3" in res.fenced.reason
    _, res = put(v, sync("A", 1, Fmt(3), LAcq(10)))
    assert res.fenced is None and holder(v, 10) == ("A", 1)


def test_a_newer_format_stops_the_mount(view: View) -> None:
    with pytest.raises(NewerFormat, match="upgrade efsish"):
        put(view, sync("A", 1, Fmt(4)))


def test_a_view_from_before_leases_gains_the_tables(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    v = new_view(path)
    put(v, entry("old", None, Mk(10, ROOT_INO, b"alice", DIR, 0, 0, T0), kind=None))
    for t in ("sessions", "leases", "recalls", "fenced"):
        v.db.execute(f"DROP TABLE {t}")
    seq, data = checkpoints.snapshot(v, tmp_path)
    v.close()
    # A checkpoint from before leases installs and opens with the tables, as does the
    # view file itself.
    ck = tmp_path / "ck" / "view.db"
    ck.parent.mkdir()
    checkpoints.install(data, seq, "checkpoints/1", ck, "uuid")
    for p in (path, ck):
        w = View(p)
        tables = {r[0] for r in w.db.execute("SELECT name FROM sqlite_master")}
        assert {"sessions", "leases", "recalls", "fenced"} <= tables
        _, res = put(w, sync("A", 1, Fmt(3), Sess("A", 1), LAcq(10)))
        assert res.fenced is None and holder(w, 10) == ("A", 1)
        w.close()


def test_a_readonly_view_of_an_old_file_is_not_changed(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    v = new_view(path)
    v.db.execute("DROP TABLE leases")
    v.close()
    r = View(path, readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        r.lease(10)
    r.close()


# -------------------------------------------------------- epochs and the ABA of finding 1


def test_an_old_epoch_never_matches_again(view: View) -> None:
    """Review finding 1: A holds alice at E and journals c1; B takes it over and frees
    it; alice is moved away and back (its row stays a tombstone and its epoch moves on);
    A's c1, claiming E, is fenced however the row looks now."""
    e = acquire(view, "A", ALICE)
    put(view, sync("B", 1, LRec(ALICE, "r", "w")))
    put(view, sync("B", 1, LTko(ALICE, "r")))
    put(view, jour("B", 1, LRel(ALICE), claims={ALICE: view.lease(ALICE)[1]}))
    gone, _ = put(view, sync("B", 1, Mv(ROOT_INO, b"alice", BOB, b"alice", T0)))
    assert view.lease(ALICE) == (None, gone)  # no longer a domain root: a tombstone
    back, _ = put(view, sync("B", 1, Mv(BOB, b"alice", ROOT_INO, b"alice", T0)))
    assert view.lease(ALICE) == (None, back)
    # Even with A holding alice again, E is in the past.
    again = acquire(view, "A", ALICE)
    assert again > e
    _, res = put(view, jour("A", 1, Mk(20, ALICE, b"c1", REG, 0, 0, T0), claims={ALICE: e}))
    assert res.fenced is not None and res.fenced.rule == FENCE_EPOCH
    epochs = [r[0] for r in view.db.execute("SELECT epoch FROM leases WHERE domain = ?", (ALICE,))]
    assert epochs == [again]


# ------------------------------------------------------- the domains an op touches (§3, §4)


def test_a_rename_touches_both_domains_and_the_renamed_inode(view: View) -> None:
    put(view, sync("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), Mk(21, BOB, b"d", DIR, 0, 0, T0)))
    pb = acquire(view, "B", BOB)
    mv = Mv(ALICE, b"f", ALICE, b"g", T0)  # within alice: bob's lease is no matter
    _, res = put(view, sync("A", 1, mv))
    assert res.fenced is None
    # Into bob, or moving bob's directory out: fenced while B holds bob.
    for op in (Mv(ALICE, b"g", BOB, b"g", T0), Mv(BOB, b"d", ALICE, b"d", T0)):
        _, res = put(view, sync("A", 1, op))
        assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE
    # Renaming the domain root itself (in the top) changes its ctime: it is in bob.
    _, res = put(view, sync("A", 1, Mv(ROOT_INO, b"bob", ROOT_INO, b"robert", T0)))
    assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE
    # The holder renames it: the domain keeps its name and its lease.
    _, res = put(
        view, sync("B", 1, Mv(ROOT_INO, b"bob", ROOT_INO, b"robert", T0), claims={BOB: pb})
    )
    assert res.fenced is None and view.lease(BOB) == (("B", 1), pb)


def test_a_replaced_target_and_a_hard_link_touch_their_domains(view: View) -> None:
    put(view, sync("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), Mk(21, BOB, b"t", REG, 0, 0, T0)))
    pb = acquire(view, "B", BOB)
    # Replacing bob's file from the top (a link in the top to it first) touches bob.
    from efsish.meta.ops import Ln

    _, res = put(view, sync("A", 1, Ln(20, ROOT_INO, b"f", T0)))
    assert res.fenced is None
    _, res = put(view, sync("A", 1, Mv(ROOT_INO, b"f", BOB, b"t", T0)))
    assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE
    # A multi-domain file (linked in alice and bob): a change to it touches both.
    _, res = put(view, sync("B", 1, Ln(20, BOB, b"f2", T0), claims={BOB: pb}))
    assert res.fenced is None
    pa = acquire(view, "A", ALICE)
    _, res = put(view, jour("A", 1, SetAttr(20, mode=REG | 0o600), claims={ALICE: pa}))
    assert res.fenced is not None and res.fenced.rule == FENCE_NOT_HELD
    _, res = put(view, sync("B", 1, SetAttr(20, mode=REG | 0o600), claims={BOB: pb}))
    assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE


def test_domain_roots_appear_and_go_with_mkdir_rmdir_and_moves(view: View) -> None:
    p, _ = put(view, sync("A", 1, Mk(30, ROOT_INO, b"carol", DIR, 0, 0, T0)))
    assert view.lease(30) == (None, p)
    acquire(view, "A", 30)
    # rmdir of a held root by another mount: fenced; by the holder: the row is a tombstone.
    _, res = put(view, sync("B", 1, Rm(ROOT_INO, b"carol", T0)))
    assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE
    q, res = put(view, sync("A", 1, Rm(ROOT_INO, b"carol", T0), claims={30: view.lease(30)[1]}))
    assert res.fenced is None and view.lease(30) == (None, q) and 30 in res.leases
    # A directory moved up to the root's level becomes a domain root.
    put(view, sync("A", 1, Mk(31, ALICE, b"sub", DIR, 0, 0, T0)))
    r, res = put(view, sync("A", 1, Mv(ALICE, b"sub", ROOT_INO, b"sub", T0)))
    assert res.fenced is None and view.lease(31) == (None, r)


def test_a_top_directory_moved_to_another_depth_touches_the_roots_under_it(
    tmp_path: Path,
) -> None:
    v = new_view(tmp_path / "v.db", lease_depth=2)
    start(v, "A", "B")
    put(v, sync("A", 1, Mk(10, ROOT_INO, b"home", DIR, 0, 0, T0)))
    put(v, sync("A", 1, Mk(11, ROOT_INO, b"old", DIR, 0, 0, T0)))
    put(v, sync("A", 1, Mk(20, 10, b"alice", DIR, 0, 0, T0)))
    assert v.lease(20)[0] is None and v.lease(10) == (None, 0)  # /home is the top
    pa = acquire(v, "A", 20)
    # Renaming /home within the top keeps alice where she is: no lease needed.
    _, res = put(v, sync("B", 1, Mv(ROOT_INO, b"home", ROOT_INO, b"users", T0)))
    assert res.fenced is None and v.lease(20) == (("A", 1), pa)
    # Moving /users into /old makes alice depth 3: it stops being a domain root.
    _, res = put(v, sync("B", 1, Mv(ROOT_INO, b"users", 11, b"users", T0)))
    assert res.fenced is not None and res.fenced.rule == FENCE_HELD_ELSEWHERE
    q, res = put(v, sync("A", 1, Mv(ROOT_INO, b"users", 11, b"users", T0), claims={20: pa}))
    assert res.fenced is None
    assert v.lease(20) == (None, q) and v.lease(10) == (None, q)  # users became a root


def test_a_journaled_entry_that_changes_the_top_is_fenced(view: View) -> None:
    # The top is never leased: two holders could otherwise both journal one name there.
    p = acquire(view, "A", ALICE)
    _, res = put(view, jour("A", 1, Mk(30, ROOT_INO, b"newtop", REG, 0, 0, T0), claims={ALICE: p}))
    assert res.fenced is not None and res.fenced.rule == FENCE_NOT_HELD
    assert view.lookup(ROOT_INO, b"newtop") is None


@pytest.mark.parametrize("taken", [False, True])
def test_our_own_journaled_entry_gets_the_verdict_every_replayer_gives(
    tmp_path: Path, taken: bool
) -> None:
    # The writer's view already holds its journaled ops; judge_own_journaled must give
    # the same verdict and lease state as apply on a replayer that applies them.
    views = []
    for name in ("writer", "replayer"):
        v = new_view(tmp_path / f"{name}.db")
        start(v, "A", "B", homes={"alice": ALICE, "bob": BOB})
        p = acquire(v, "A", ALICE)
        if taken:
            put(v, sync("B", 1, LRec(ALICE, "r1", "w")))
            put(v, sync("B", 1, LTko(ALICE, "r1")))
        views.append(v)
    writer, replayer = views
    e = jour("A", 1, Mk(20, ALICE, b"f", REG, 0, 0, T0), claims={ALICE: p})
    writer.begin()
    writer.apply_op(e.ops[0], ApplyResult())  # journaled: in the writer's view already
    writer.commit()
    seq = writer.applied_seq + 1
    own = ApplyResult()
    writer.begin()
    leasing.judge_own_journaled(writer, seq, e, [[ALICE]], own)  # its journal row's domains
    writer.set_meta("applied_seq", seq)
    writer.commit()
    _, other = put(replayer, e)
    assert (own.fenced is None) == (other.fenced is None) == (not taken)
    for table in ("leases", "recalls", "fenced"):
        assert dump(writer)[table] == dump(replayer)[table], table
