"""InodeRange (efsish.meta.inodes) driven directly on a view: numbers of a plan that
never reached the log are handed out again after `restore`; after `abandon` none of the
old range ever is."""

from __future__ import annotations

from pathlib import Path

from efsish.meta.inodes import INO_RANGE, INO_RANGE_MAX, InodeRange
from efsish.meta.ops import ClaimInodes
from efsish.meta.view import FIRST_FREE_INO, ApplyResult, View


def _view(tmp_path: Path) -> View:
    view = View(tmp_path / "v.db")
    view.begin()
    view.init_root("fs-uuid", 1)
    view.commit()
    return view


def test_the_first_take_claims_a_range_and_the_next_ones_use_it(tmp_path: Path) -> None:
    view = _view(tmp_path)
    r = InodeRange()
    assert r.take(view) == (FIRST_FREE_INO, ClaimInodes(FIRST_FREE_INO, INO_RANGE))
    assert int(view.get_meta("next_ino")) == FIRST_FREE_INO + INO_RANGE  # claim applied
    assert [r.take(view) for _ in range(2)] == [
        (FIRST_FREE_INO + 1, None),
        (FIRST_FREE_INO + 2, None),
    ]


def test_a_used_up_range_claims_the_next_one_twice_as_large(tmp_path: Path) -> None:
    """Each claim doubles the last, from INO_RANGE up to INO_RANGE_MAX (a claim stalls
    the create that makes it: fewer claims for a mount that creates many files)."""
    view = _view(tmp_path)
    r = InodeRange()
    for _ in range(INO_RANGE):
        _, claim = r.take(view)
    assert claim is None
    start = FIRST_FREE_INO + INO_RANGE
    assert r.take(view) == (start, ClaimInodes(start, 2 * INO_RANGE))
    sizes = [INO_RANGE, 2 * INO_RANGE]
    while sizes[-1] < INO_RANGE_MAX or len(sizes) < 10:
        for _ in range(sizes[-1] - 1):
            assert r.take(view)[1] is None
        ino, claim = r.take(view)
        assert claim is not None and claim.start == ino == FIRST_FREE_INO + sum(sizes)
        sizes.append(claim.n)
    assert sizes == [min(INO_RANGE << k, INO_RANGE_MAX) for k in range(len(sizes))]
    assert sizes[-2:] == [INO_RANGE_MAX, INO_RANGE_MAX]
    assert int(view.get_meta("next_ino")) == FIRST_FREE_INO + sum(sizes)


def test_restore_hands_out_the_numbers_of_a_discarded_plan_again(tmp_path: Path) -> None:
    view = _view(tmp_path)
    r = InodeRange()
    view.begin()
    first, _ = r.take(view)
    view.commit()  # the range is in the log now
    saved = r.save()
    view.begin()
    taken = [r.take(view)[0] for _ in range(3)]
    view.rollback()  # the plan lost its race for the log position
    r.restore(saved)
    view.begin()
    assert [r.take(view)[0] for _ in range(3)] == taken == [first + 1, first + 2, first + 3]
    view.commit()


def test_restore_undoes_a_claim_made_by_the_discarded_plan(tmp_path: Path) -> None:
    view = _view(tmp_path)
    r = InodeRange()
    saved = r.save()
    view.begin()
    ino, claim = r.take(view)
    view.rollback()  # the claim never reached the log: next_ino is back in the view
    r.restore(saved)
    view.begin()
    assert r.take(view) == (ino, claim)  # claimed again, in the plan that commits
    view.commit()


def test_abandon_never_hands_out_the_rest_of_the_range(tmp_path: Path) -> None:
    view = _view(tmp_path)
    r = InodeRange()
    view.begin()
    first, _ = r.take(view)
    view.commit()  # a PUT that used `first` failed without an answer: it may be in the log
    r.abandon()
    view.begin()
    ino, claim = r.take(view)
    view.commit()
    assert claim == ClaimInodes(first + INO_RANGE, 2 * INO_RANGE)
    assert ino == first + INO_RANGE


def test_save_is_a_snapshot_not_a_view_of_the_range(tmp_path: Path) -> None:
    view = _view(tmp_path)
    r = InodeRange()
    r.take(view)
    saved = r.save()
    r.take(view)
    r.abandon()
    r.restore(saved)
    assert r.take(view) == (FIRST_FREE_INO + 1, None)


def _claim_ahead(view: View, r: InodeRange) -> ClaimInodes:
    """What the committer does for a range claimed ahead (efsish.meta.log): an entry
    of its own claims it; once it is in the log and applied, `add_spare`."""
    claim = ClaimInodes(int(view.get_meta("next_ino")), r.spare_size())
    view.begin()
    view.apply_op(claim, ApplyResult())
    view.commit()
    r.add_spare(claim)
    return claim


def test_the_next_range_is_claimed_ahead_once_half_is_used(tmp_path: Path) -> None:
    """On a lease filesystem the next range is claimed in the background once half the
    current one is used (`wants_spare`); `take` moves on to it without a claim of its
    own, so no create waits for one."""
    view = _view(tmp_path)
    r = InodeRange()
    assert not r.wants_spare()  # nothing claimed yet
    first, _ = r.take(view)
    for _ in range(INO_RANGE // 2 - 2):
        r.take(view)
    assert not r.wants_spare()
    r.take(view)  # half of the range is used
    assert r.wants_spare() and r.spare_size() == 2 * INO_RANGE
    spare = _claim_ahead(view, r)
    assert spare == ClaimInodes(first + INO_RANGE, 2 * INO_RANGE)
    assert not r.wants_spare()  # one at a time
    rest = [r.take(view) for _ in range(INO_RANGE // 2)]
    assert rest[-1] == (first + INO_RANGE - 1, None)  # the current range, to its end
    assert r.take(view) == (spare.start, None)  # then the spare, with no claim
    for _ in range(INO_RANGE - 1):
        assert r.take(view)[1] is None
    assert r.wants_spare()  # half of the spare is used
    assert _claim_ahead(view, r) == ClaimInodes(spare.start + spare.n, 4 * INO_RANGE)


def test_restore_and_abandon_cover_the_range_claimed_ahead(tmp_path: Path) -> None:
    """A plan's save and restore keep the range claimed ahead; after a PUT without an
    answer neither the rest of the range nor that one is handed out."""
    view = _view(tmp_path)
    r = InodeRange()
    r.take(view)
    while not r.wants_spare():
        r.take(view)
    spare = _claim_ahead(view, r)
    saved = r.save()
    r.restore(saved)
    assert not r.wants_spare()  # the spare is kept across a save and restore
    r.abandon()  # a PUT failed without an answer: it may be in the log
    ino, claim = r.take(view)
    assert claim is not None and claim.start == ino == spare.start + spare.n
