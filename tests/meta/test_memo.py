"""The memo (efsish.meta.memo) driven directly on a view: answers from memory follow
every applied entry, and a read that began before an apply does not store what it saw."""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from typing import TypeVar

from efsish.meta import domains
from efsish.meta.memo import Memo
from efsish.meta.ops import Extent, Ln, Mk, Mv, Rm, SetAttr, SetXattr, Write
from efsish.meta.view import ROOT_INO, View
from tests.meta.views import T0, apply

T = TypeVar("T")
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


class Reads:
    """The `read` a memo is given: runs fn(view) and counts the calls. `meanwhile`, if
    set, runs once after the view was read and before the answer is returned (an entry
    applied while the read was on its way back)."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.calls = 0
        self.meanwhile: Callable[[], None] | None = None

    def __call__(self, fn: Callable[[View], T], /) -> Awaitable[T]:
        async def run() -> T:
            self.calls += 1
            out = fn(self.view)
            if self.meanwhile is not None:
                meanwhile, self.meanwhile = self.meanwhile, None
                meanwhile()
            return out

        return run()


async def test_an_answer_read_once_comes_from_memory_after(view: View) -> None:
    memo, read = Memo(), Reads(view)
    apply(view, Mk(2, ROOT_INO, b"f", REG, 0, 0, T0))
    a = await memo.lookup(ROOT_INO, b"f", read)
    assert a is not None and a.ino == 2
    assert await memo.getattr(2, read) == a
    assert await memo.lookup(ROOT_INO, b"nothing", read) is None
    assert await memo.lookup(ROOT_INO, b"nothing", read) is None  # absent, remembered
    assert read.calls == 2 and memo.hits == 2
    a.size = 99  # callers get copies
    got = await memo.getattr(2, read)
    assert got is not None and got.size == 0


async def test_a_getattr_that_began_before_an_apply_does_not_store_what_it_saw(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    apply(view, Mk(2, ROOT_INO, b"f", REG, 0, 0, T0))

    def chmod() -> None:
        memo.applied(apply(view, SetAttr(2, mode=stat.S_IFREG | 0o600, ctime=T0 + 1)))

    read.meanwhile = chmod
    old = await memo.getattr(2, read)
    assert old is not None and stat.S_IMODE(old.mode) == 0o644  # read before the chmod
    new = await memo.getattr(2, read)
    assert new is not None and stat.S_IMODE(new.mode) == 0o600
    assert read.calls == 2 and memo.hits == 0


async def test_a_lookup_that_began_before_an_apply_does_not_store_what_it_saw(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    read.meanwhile = lambda: memo.applied(apply(view, Mk(2, ROOT_INO, b"f", REG, 0, 0, T0)))
    assert await memo.lookup(ROOT_INO, b"f", read) is None  # read before the create
    a = await memo.lookup(ROOT_INO, b"f", read)
    assert a is not None and a.ino == 2
    assert read.calls == 2


async def test_a_getxattr_that_began_before_an_apply_does_not_store_what_it_saw(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    apply(view, Mk(2, ROOT_INO, b"f", REG, 0, 0, T0))
    set_x = SetXattr(2, b"user.k", b"v", T0 + 1)
    read.meanwhile = lambda: memo.applied(apply(view, set_x))
    assert await memo.getxattr(2, b"user.k", read) is None  # read before the set
    assert await memo.getxattr(2, b"user.k", read) == b"v"
    assert read.calls == 2


async def test_an_applied_entry_drops_what_it_changed_and_puts_in_what_was_re_read(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    apply(view, Mk(2, ROOT_INO, b"d", DIR, 0, 0, T0))
    assert await memo.lookup(ROOT_INO, b"d", read) is not None
    res = apply(view, Mk(3, 2, b"f", REG, 0, 0, T0 + 1))
    memo.applied(res, memo.fresh(view, res))  # as the hop that applied it does
    calls = read.calls
    f = await memo.lookup(2, b"f", read)
    d = await memo.getattr(2, read)
    assert f is not None and f.ino == 3 and d is not None and d.mtime == T0 + 1
    assert read.calls == calls  # both from memory
    res = apply(view, SetAttr(3, size=5))
    memo.applied(res)  # nothing re-read: only forgotten
    got = await memo.getattr(3, read)
    assert got is not None and got.size == 5 and read.calls == calls + 1


async def test_a_new_name_in_a_directory_created_here_is_answered_from_memory(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    res = apply(view, Mk(2, ROOT_INO, b"d", DIR, 0, 0, T0))
    memo.applied(res, memo.fresh(view, res))
    assert await memo.lookup(2, b"new", read) is None
    assert await memo.getxattr(2, b"user.k", read) is None  # a new inode has none
    assert read.calls == 0
    res = apply(view, Mk(3, 2, b"big", REG, 0, 0, T0 + 1))
    memo.applied(res)  # only forgotten: the directory is no longer complete
    a = await memo.lookup(2, b"big", read)
    assert a is not None and a.ino == 3 and read.calls == 1


async def test_forget_all_also_stops_reads_in_flight_from_storing(view: View) -> None:
    memo, read = Memo(), Reads(view)
    apply(view, Mk(2, ROOT_INO, b"f", REG, 0, 0, T0))
    read.meanwhile = memo.forget_all
    assert await memo.getattr(2, read) is not None
    assert await memo.getattr(2, read) is not None
    assert read.calls == 2


# ------------------------------------------------------------ the tree's shape (domains)


def truth(view: View, ino: int) -> set[int | None]:
    """The lease domains of `ino` as efsish.meta.domains computes them from the view."""
    try:
        return domains.domains_of_inode(view, ino)
    except ValueError:
        return set()


def shape(view: View) -> None:
    """/a(2)/x(4)/y(5)/f(6), /b(3), at lease depth 1: domains 2 (a) and 3 (b)."""
    apply(
        view,
        Mk(2, ROOT_INO, b"a", DIR, 0, 0, T0),
        Mk(3, ROOT_INO, b"b", DIR, 0, 0, T0),
        Mk(4, 2, b"x", DIR, 0, 0, T0),
        Mk(5, 4, b"y", DIR, 0, 0, T0),
        Mk(6, 5, b"f", REG, 0, 0, T0),
    )


async def test_domains_come_from_memory_once_the_tree_was_walked(view: View) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(6, 1, read) == {2} == truth(view, 6)
    calls = read.calls
    for ino, want in ((6, {2}), (5, {2}), (4, {2}), (2, {2}), (ROOT_INO, {None})):
        assert await memo.domains(ino, 1, read) == want == truth(view, ino)
    assert read.calls == calls
    assert await memo.domains(3, 1, read) == {3} and read.calls == calls + 1  # not walked
    assert await memo.domains(99, 1, read) == set()  # an inode the view does not hold


async def test_a_directory_renamed_across_domains_moves_its_subtree(view: View) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    for ino, want in ((5, {2}), (6, {2}), (3, {3})):
        assert await memo.domains(ino, 1, read) == want  # now in memory
    # /a/x -> /b/x: x's own parent changes; y and f below it follow through x.
    memo.applied(apply(view, Mv(2, b"x", 3, b"x", T0 + 1)))
    for ino in (4, 5, 6):
        assert await memo.domains(ino, 1, read) == {3} == truth(view, ino)
    # /b/x -> /x: x becomes a domain root itself (depth 1), y and f in its domain.
    memo.applied(apply(view, Mv(3, b"x", ROOT_INO, b"x", T0 + 2)))
    for ino in (4, 5, 6):
        assert await memo.domains(ino, 1, read) == {4} == truth(view, ino)
    # Deeper leases: /x/y is a root at depth 2.
    assert await memo.domains(6, 2, read) == {5}


async def test_rmdir_forgets_the_directory(view: View) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(4, 1, read) == {2}
    memo.applied(apply(view, Rm(5, b"f", T0 + 1), Rm(4, b"y", T0 + 1), Rm(2, b"x", T0 + 1)))
    assert await memo.domains(4, 1, read) == set() == truth(view, 4)
    assert await memo.domains(5, 1, read) == set() == truth(view, 5)


async def test_a_link_or_unlink_changes_a_files_domains(view: View) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(6, 1, read) == {2}
    memo.applied(apply(view, Ln(6, 3, b"g", T0 + 1)))  # linked into /b too
    assert await memo.domains(6, 1, read) == {2, 3} == truth(view, 6)
    memo.applied(apply(view, Rm(5, b"f", T0 + 2)))  # only /b/g is left
    assert await memo.domains(6, 1, read) == {3} == truth(view, 6)


async def test_the_domains_stay_in_memory_across_creates_and_unlinks(view: View) -> None:
    """A create or unlink changes its directory: its place in the tree (and the new
    file's) stays known, so the lease domains the kernel's next lookup, or the new
    file's close, asks for need no read of the view."""
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(6, 1, read) == {2}
    calls = read.calls
    for op, asked in (
        (Mk(7, 5, b"g", REG, 0, 0, T0 + 1), (5, 7, 6)),  # a create in /a/x/y
        (Rm(5, b"f", T0 + 2), (5, 7)),  # an unlink there (6 is gone)
        (Mk(8, 5, b"h", REG, 0, 0, T0 + 3), (5, 8, 7)),
        (Rm(5, b"g", T0 + 4), (5, 8)),
    ):
        res = apply(view, op)
        memo.applied(res, memo.fresh(view, res))
        for ino in asked:
            assert await memo.domains(ino, 1, read) == truth(view, ino)
    assert read.calls == calls  # every answer came from memory


async def test_a_walk_that_began_before_an_apply_does_not_store_what_it_saw(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    read.meanwhile = lambda: memo.applied(apply(view, Mv(2, b"x", 3, b"x", T0 + 1)))
    assert await memo.domains(5, 1, read) == {2}  # read before the rename
    assert await memo.domains(5, 1, read) == {3}
    assert read.calls == 2


async def test_forget_all_forgets_the_shape(view: View) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(5, 1, read) == {2}
    view.db.execute("UPDATE dentries SET parent = 3 WHERE ino = 4")  # a replaced view
    memo.forget_all()
    assert await memo.domains(5, 1, read) == {3} == truth(view, 5)


# -------------------------------------------------------------------------- listings


async def test_a_listing_answers_the_lookups_getattrs_and_xattrs_that_follow(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    apply(view, Mk(7, 4, b"g", REG, 0, 0, T0), SetXattr(7, b"user.k", b"v", T0))
    listed = await memo.readdir(4, 0, 10, read)
    assert [(n, a.ino, x) for _, n, a, x in listed] == [(b"y", 5, False), (b"g", 7, True)]
    calls = read.calls
    y = await memo.lookup(4, b"y", read)
    assert y is not None and y.ino == 5 and await memo.getattr(7, read) == listed[1][2]
    assert await memo.getxattr(5, b"security.selinux", read) is None
    assert await memo.domains(5, 1, read) is not None and await memo.domains(7, 1, read)
    assert read.calls == calls + 1  # the walk up from x, once
    # A later xattr on y is seen: the change drops what the listing stored.
    memo.applied(apply(view, SetXattr(5, b"security.selinux", b"l", T0 + 1)))
    assert await memo.getxattr(5, b"security.selinux", read) == b"l"
    # The cursor continues after the last entry read.
    assert await memo.readdir(4, listed[0][0], 10, read) == listed[1:]


async def test_a_listing_that_began_before_an_apply_does_not_store_what_it_saw(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    read.meanwhile = lambda: memo.applied(apply(view, SetAttr(5, mode=stat.S_IFDIR | 0o700)))
    (old,) = await memo.readdir(4, 0, 10, read)
    assert stat.S_IMODE(old[2].mode) == 0o755  # read before the chmod
    got = await memo.getattr(5, read)
    assert got is not None and stat.S_IMODE(got.mode) == 0o700


async def test_a_write_chmod_or_create_keeps_the_shape_where_no_dentry_moved(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(6, 1, read) == {2}
    calls = read.calls
    memo.applied(apply(view, SetAttr(6, mode=REG & ~0o004, ctime=T0 + 1)))
    memo.applied(apply(view, Write(6, (Extent(0, 3, data=b"abc"),), 3, T0 + 2)))
    res = apply(view, Mk(7, 5, b"g", REG, 0, 0, T0 + 3))  # y's times change, not its place
    memo.applied(res, memo.fresh(view, res))
    for ino, want in ((6, {2}), (5, {2}), (7, {2})):  # g: its parent from its name
        assert await memo.domains(ino, 1, read) == want == truth(view, ino)
    assert read.calls == calls


async def test_a_directory_moved_in_the_entry_that_changes_its_times_is_walked_again(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    shape(view)
    assert await memo.domains(6, 1, read) == {2}
    # One entry: a file created in /a/x (x's times change) and x moved to /b.
    res = apply(view, Mk(8, 4, b"h", REG, 0, 0, T0 + 1), Mv(2, b"x", 3, b"x", T0 + 1))
    memo.applied(res, memo.fresh(view, res))
    for ino in (4, 5, 6, 8):
        assert await memo.domains(ino, 1, read) == {3} == truth(view, ino)


# --------------------------------------------------------------------------- layouts


def small_file(view: View, data: bytes = b"hello") -> None:
    apply(
        view,
        Mk(2, ROOT_INO, b"f", REG, 0, 0, T0),
        Write(2, (Extent(0, len(data), data=data),), len(data), T0),
    )


async def test_a_layout_read_once_comes_from_memory_until_the_data_changes(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    small_file(view)
    assert await memo.extents(2, 0, 100, read) == view.extents(2, 0, 100)
    assert await memo.extents(2, 1, 50, read) == view.extents(2, 1, 50)
    assert read.calls == 1
    memo.applied(apply(view, SetAttr(2, size=2, ctime=T0 + 1)))  # a truncate elsewhere
    got = await memo.extents(2, 0, 100, read)
    assert [(e.off, e.len, e.data) for e in got] == [(0, 2, b"he")] and read.calls == 2
    # A rewrite, then a range past what was read: both from the view.
    memo.applied(apply(view, Write(2, (Extent(0, 5, data=b"HELLO"),), 5, T0 + 2)))
    assert [e.data for e in await memo.extents(2, 0, 100, read)] == [b"HELLO"]
    assert await memo.extents(2, 0, 200, read) == view.extents(2, 0, 200)
    assert read.calls == 4


async def test_the_layout_an_entry_wrote_is_put_in_and_a_freed_files_forgotten(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    apply(view, Mk(2, ROOT_INO, b"f", REG, 0, 0, T0))
    res = apply(view, Write(2, (Extent(0, 3, data=b"abc"),), 3, T0 + 1))
    memo.applied(res, memo.fresh(view, res))
    assert await memo.extents(2, 0, 1 << 40, read) == view.extents(2) and read.calls == 0
    # /g renamed over /f: f's inode is freed, and its layout with it.
    apply(view, Mk(3, ROOT_INO, b"g", REG, 0, 0, T0 + 2))
    memo.applied(apply(view, Mv(ROOT_INO, b"g", ROOT_INO, b"f", T0 + 3)))
    assert await memo.extents(2, 0, 100, read) == [] and read.calls == 1


async def test_a_layout_read_that_began_before_a_write_does_not_store_what_it_saw(
    view: View,
) -> None:
    memo, read = Memo(), Reads(view)
    small_file(view)
    write = Write(2, (Extent(0, 5, data=b"HELLO"),), 5, T0 + 1)
    read.meanwhile = lambda: memo.applied(apply(view, write))
    assert [e.data for e in await memo.extents(2, 0, 100, read)] == [b"hello"]  # before it
    assert [e.data for e in await memo.extents(2, 0, 100, read)] == [b"HELLO"]
    assert read.calls == 2


async def test_layouts_kept_are_bounded(view: View, monkeypatch) -> None:
    from efsish.meta import memo as memo_mod

    monkeypatch.setattr(memo_mod, "EXTENT_MEMO_BYTES", 16 * (memo_mod.EXTENT_OVERHEAD * 2 + 5))
    memo, read = Memo(), Reads(view)
    for i in range(40):
        ino = 2 + i
        apply(
            view,
            Mk(ino, ROOT_INO, b"f%d" % i, REG, 0, 0, T0),
            Write(ino, (Extent(0, 5, data=b"hello"),), 5, T0),
        )
        await memo.extents(ino, 0, 100, read)
    assert len(memo._extents) == 16 and read.calls == 40
    assert await memo.extents(41, 0, 100, read) == view.extents(41) and read.calls == 40
    assert await memo.extents(2, 0, 100, read) == view.extents(2) and read.calls == 41
