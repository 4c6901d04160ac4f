"""The memo (efsish.meta.memo) driven directly on a view: answers from memory follow
every applied entry, and a read that began before an apply does not store what it saw."""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from typing import TypeVar

from efsish.meta.memo import Memo
from efsish.meta.ops import Mk, SetAttr, SetXattr
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
