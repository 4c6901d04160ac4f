"""Lease domains (efsish.meta.domains, LEASES.md §3) computed from a view."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from efsish.meta import domains
from efsish.meta import view as view_module
from efsish.meta.ops import Extent, Ln, Mk, Mv, Rm, SetAttr, Write
from efsish.meta.view import ROOT_INO, ApplyResult, View
from tests.meta.leaselog import DIR, REG, T0, new_view
from tests.meta.views import apply

TOP = domains.TOP


def tree(v: View) -> None:
    """/home(2)/alice(3)/src(4)/f(5), /home/bob(6), /g(7) linked as /home/alice/src/g
    and /home/bob/g too, /etc(8)."""
    res = ApplyResult()
    v.begin()
    for op in (
        Mk(2, ROOT_INO, b"home", DIR, 0, 0, T0),
        Mk(3, 2, b"alice", DIR, 0, 0, T0),
        Mk(4, 3, b"src", DIR, 0, 0, T0),
        Mk(5, 4, b"f", REG, 0, 0, T0),
        Mk(6, 2, b"bob", DIR, 0, 0, T0),
        Mk(7, ROOT_INO, b"g", REG, 0, 0, T0),
        Ln(7, 4, b"g", T0),
        Ln(7, 6, b"g", T0),
        Mk(8, ROOT_INO, b"etc", DIR, 0, 0, T0),
    ):
        v.apply_op(op, res)
    v.commit()


def test_depth_one_makes_each_top_level_directory_a_domain(tmp_path: Path) -> None:
    v = new_view(tmp_path / "v.db")
    tree(v)
    assert [domains.depth(v, d) for d in (ROOT_INO, 2, 3, 4)] == [0, 1, 2, 3]
    assert domains.domain_of_dir(v, ROOT_INO) is TOP
    assert [domains.domain_of_dir(v, d) for d in (2, 3, 4, 6, 8)] == [2, 2, 2, 2, 8]
    assert domains.domains_of_inode(v, 5) == {2}
    assert domains.domains_of_inode(v, 7) == {TOP, 2}  # linked in the top and in /home
    assert domains.domains_of_inode(v, 2) == {2}  # a root's attributes are its domain's
    assert domains.domains_of_inode(v, 99) == set()
    assert domains.is_domain_root(v, 2) and not domains.is_domain_root(v, 3)
    assert not domains.is_domain_root(v, 7)
    assert domains.roots_in(v, ROOT_INO) == {2, 8}
    assert domains.roots_in(v, 3) == set()
    assert domains.subtree_domains(v, 4) == {2}


def test_depth_two_makes_each_home_a_domain(tmp_path: Path) -> None:
    v = new_view(tmp_path / "v.db", lease_depth=2)
    tree(v)
    assert [domains.domain_of_dir(v, d) for d in (ROOT_INO, 2, 3, 4, 6, 8)] == [
        TOP,
        TOP,
        3,
        3,
        6,
        TOP,
    ]
    assert domains.domains_of_inode(v, 7) == {TOP, 3, 6}  # a multi-domain file
    assert domains.domains_of_inode(v, 5) == {3}
    assert domains.roots_in(v, ROOT_INO) == {3, 6}
    assert domains.roots_in(v, 2) == {3, 6}
    # /home's subtree, were it one level deeper, would have its roots one level up.
    assert domains.roots_in(v, 2, at_depth=2) == {2}
    assert domains.subtree_domains(v, 2) == {TOP, 3, 6}


def test_kept_rows_follow_every_change_and_rollback(tmp_path: Path) -> None:
    """The writer keeps the parents of directories, the leases and the meta counters in
    memory (View.keep_rows): a rename, an exchange, a removal, a lease handed over and a
    rolled-back transaction change what it answers exactly as they change the tables."""
    v = new_view(tmp_path / "v.db")
    v.keep_rows()
    tree(v)
    assert [domains.domain_of_dir(v, d) for d in (3, 4)] == [2, 2]  # walked: now kept
    apply(v, Mv(2, b"alice", 8, b"alice", T0))  # /home/alice -> /etc/alice
    assert [v.parent_of(3), domains.domain_of_dir(v, 4)] == [8, 8]
    apply(v, Mk(9, 6, b"d", DIR, 0, 0, T0), Mv(8, b"alice", 6, b"d", T0, exchange=True))
    assert [v.parent_of(3), v.parent_of(9)] == [6, 8]
    apply(v, Rm(8, b"alice", T0))
    assert v.parent_of(9) is None
    v.begin()
    v.apply_op(Mv(6, b"d", ROOT_INO, b"d", T0), ApplyResult())
    assert v.parent_of(3) == ROOT_INO
    v.rollback()
    assert v.parent_of(3) == 6

    assert v.lease(2) == (None, 0)
    v.begin()
    v.set_lease(2, ("a", 1), 7)
    v.set_meta("jseq_next:a", 5)
    assert v.lease(2) == (("a", 1), 7) and v.get_meta("jseq_next:a") == 5
    v.commit()
    v.begin()
    v.set_lease(2, None, 9)
    v.set_meta("jseq_next:a", 6)
    v.rollback()
    assert v.lease(2) == (("a", 1), 7) and v.get_meta("jseq_next:a") == 5
    fresh = View(tmp_path / "v.db")  # what the tables hold
    for d in (3, 9):
        assert v.parent_of(d) == fresh.parent_of(d)
    assert fresh.lease(2) == v.lease(2) and fresh.get_meta("jseq_next:a") == 5


def test_kept_parents_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parents a writer keeps are forgotten all at once when there are
    KEPT_PARENTS of them: memory stays bounded in a tree of millions of directories."""
    monkeypatch.setattr(view_module, "KEPT_PARENTS", 3)
    v = new_view(tmp_path / "v.db")
    v.keep_rows()
    tree(v)
    assert [v.parent_of(d) for d in (2, 3, 4)] == [ROOT_INO, 2, 3]
    assert v._parents is not None and len(v._parents) == 3
    assert v.parent_of(6) == 2  # the fourth: the others are forgotten
    assert v._parents == {6: 2}


def _dump(v: View) -> list[list[tuple[object, ...]]]:
    return [
        sorted(v.db.execute(f"SELECT * FROM {t}").fetchall())
        for t in ("inodes", "dentries", "extents", "garbage")
    ]


@pytest.mark.parametrize("seed", range(12))
def test_kept_files_answer_as_the_tables_do(tmp_path: Path, seed: int) -> None:
    """The writer keeps the files its Mk made (View.born_parent) so that their layout at
    close needs neither their parents nor their extents read. Random creates, layouts
    (overlapping pieces, several per op), truncations, links, renames, removals and
    rolled-back transactions, on a writer that keeps rows and on one that does not:
    the domains of every file and the tables stay the same."""
    rng = random.Random(seed)
    kept, plain = new_view(tmp_path / "k.db"), new_view(tmp_path / "p.db")
    kept.keep_rows()
    dirs = [3, 4, 6, 8]  # /home/alice, /home/alice/src, /home/bob, /etc: three domains
    for v in (kept, plain):
        tree(v)
    names: dict[tuple[int, bytes], int] = {(4, b"f"): 5, (ROOT_INO, b"g"): 7}
    names.update({(4, b"g"): 7, (6, b"g"): 7})
    next_ino, t, used = 100, T0, 0

    def piece() -> Extent:
        off = rng.randrange(0, 3) * rng.choice((1, 4096))
        n = rng.randrange(1, 6000)
        return Extent(off, n, data=bytes([rng.randrange(256)]) * n)

    for _step in range(150):
        t += 1
        files = sorted(set(names.values()))
        k = rng.random()
        if k < 0.3 or not files:
            op: Any = Mk(next_ino, rng.choice(dirs), b"n%d" % next_ino, REG, 0, 0, t)
            next_ino += 1
        elif k < 0.65:
            pieces = tuple(piece() for _ in range(rng.randrange(1, 4)))
            ino = next_ino - 1 if rng.random() < 0.5 else rng.choice(files)  # newest often
            op = Write(ino, pieces, max(e.end for e in pieces), t)
        elif k < 0.72:
            op = SetAttr(rng.choice(files), size=rng.randrange(0, 9000), ctime=t)
        elif k < 0.8:
            op = Ln(rng.choice(files), rng.choice(dirs), b"l%d" % t, t)
        else:
            parent, name = rng.choice(sorted(names))
            if k < 0.9:
                op = Rm(parent, name, t)
            else:
                op = Mv(parent, name, rng.choice(dirs), b"m%d" % t, t)
        roll = rng.random() < 0.15
        used += isinstance(op, Write) and kept.born_parent(op.ino) is not None
        for v in (kept, plain):
            v.begin()
            v.apply_op(op, ApplyResult())
            if roll:
                v.rollback()
            else:
                v.commit()
        if not roll:
            if isinstance(op, (Mk, Ln)):
                names[(op.parent, op.name)] = op.ino
            elif isinstance(op, Rm):
                del names[(op.parent, op.name)]
            elif isinstance(op, Mv):
                names[(op.dst_parent, op.dst_name)] = names.pop((op.src_parent, op.src_name))
        for ino in sorted(set(names.values()) | set(files)):
            assert domains.domains_of_inode(kept, ino) == domains.domains_of_inode(plain, ino)
    assert used >= 5, "few layouts of kept files: the test proves little"
    assert _dump(kept) == _dump(plain)
