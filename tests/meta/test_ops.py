"""The log's op format (efsish.meta.ops) and View.apply_op, driven directly.

The samples below are ops exactly as efsish has written them into `log/<seq>` since its
first version (the encoding has only gained optional fields): each must still decode,
and encode back to the same object, or a filesystem formatted earlier stops mounting.
"""

from __future__ import annotations

import stat
from typing import Any

import pytest

from efsish import codec
from efsish.errors import CorruptObject
from efsish.meta.ops import (
    BlocksDeleted,
    ClaimInodes,
    Extent,
    Ln,
    LogEntry,
    Mk,
    Mv,
    Op,
    RemoveXattr,
    Rm,
    SetAttr,
    SetXattr,
    Write,
    decode_op,
)
from efsish.meta.view import FIRST_FREE_INO, ROOT_INO, View
from tests.meta.views import T0, apply

REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755

# (what an earlier efsish wrote, what it means)
SAMPLES: list[tuple[dict[str, Any], Op]] = [
    (
        {
            "o": "mk",
            "ino": 7,
            "p": 1,
            "name": "a\udcff",
            "mode": REG,
            "uid": 1000,
            "gid": 100,
            "rdev": 0,
            "t": T0,
            "tgt": None,
        },
        Mk(7, 1, b"a\xff", REG, 1000, 100, T0),
    ),
    (
        {
            "o": "mk",
            "ino": 8,
            "p": 1,
            "name": "l",
            "mode": stat.S_IFLNK | 0o777,
            "uid": 0,
            "gid": 0,
            "rdev": 0,
            "t": T0,
            "tgt": "dGFyZ2V0",
        },
        Mk(8, 1, b"l", stat.S_IFLNK | 0o777, 0, 0, T0, target=b"target"),
    ),
    (
        {"o": "ln", "ino": 7, "p": 1, "name": "b", "t": T0},
        Ln(7, 1, b"b", T0),
    ),
    ({"o": "rm", "p": 1, "name": "b", "t": T0}, Rm(1, b"b", T0)),
    (
        {"o": "mv", "sp": 1, "sn": "a", "dp": 9, "dn": "c", "t": T0},
        Mv(1, b"a", 9, b"c", T0),
    ),
    (
        {"o": "mv", "sp": 1, "sn": "a", "dp": 9, "dn": "c", "t": T0, "x": True},
        Mv(1, b"a", 9, b"c", T0, exchange=True),
    ),
    (
        {
            "o": "attr",
            "ino": 7,
            "mode": REG | 0o4000,
            "uid": 5,
            "gid": 6,
            "size": 3,
            "atime": T0,
            "mtime": T0,
            "ctime": T0,
        },
        SetAttr(7, mode=REG | 0o4000, uid=5, gid=6, size=3, atime=T0, mtime=T0, ctime=T0),
    ),
    ({"o": "attr", "ino": 7, "atime": T0}, SetAttr(7, atime=T0)),
    (
        # A block extent as written before ranged reads (6 elements), one with chunk
        # checksums (7), and inline bytes.
        {
            "o": "w",
            "ino": 7,
            "size": 70000,
            "t": T0,
            "ext": [
                [0, 4096, "data/7-1-x", 0, 4096, "b2" + "0" * 32],
                [4096, 65536, "data/7-2-y", 0, 262144, "k12345678", "0a0b0c0d0e0f0a0b"],
                [69632, 368, None, "aGVsbG8="],
            ],
        },
        Write(
            7,
            (
                Extent(0, 4096, "data/7-1-x", 0, 4096, "b2" + "0" * 32),
                Extent(4096, 65536, "data/7-2-y", 0, 262144, "k12345678", crcs="0a0b0c0d0e0f0a0b"),
                Extent(69632, 368, data=b"hello"),
            ),
            70000,
            T0,
        ),
    ),
    (
        {"o": "xs", "ino": 7, "name": "user.k", "v": "AAE=", "t": T0},
        SetXattr(7, b"user.k", b"\x00\x01", T0),
    ),
    ({"o": "xr", "ino": 7, "name": "user.k", "t": T0}, RemoveXattr(7, b"user.k", T0)),
    ({"o": "ino", "start": 2, "n": 1024}, ClaimInodes(2, 1024)),
    ({"o": "gc", "keys": ["data/7-1-x"]}, BlocksDeleted(("data/7-1-x",))),
]


@pytest.mark.parametrize("wire,op", SAMPLES, ids=[w["o"] for w, _ in SAMPLES])
def test_every_op_as_written_before_decodes_and_encodes_back(wire: dict[str, Any], op: Op) -> None:
    assert decode_op(wire) == op
    assert op.wire() == wire


def test_a_mk_without_the_optional_fields_decodes() -> None:
    op = decode_op(
        {"o": "mk", "ino": 7, "p": 1, "name": "a", "mode": REG, "uid": 0, "gid": 0, "t": 1}
    )
    assert op == Mk(7, 1, b"a", REG, 0, 0, 1)


@pytest.mark.parametrize(
    "wire,why",
    [
        ({"o": "zz"}, "unknown operation 'zz'"),
        ({"ino": 7}, "unknown operation None"),
        ([1, 2], "must be an object"),
        ({"o": "mk", "ino": 7, "p": 1, "name": "a", "mode": REG}, "malformed 'mk'"),
        ({"o": "attr", "ino": "seven"}, "malformed 'attr'"),
        ({"o": "w", "ino": 7, "size": 1, "t": 1, "ext": [[0]]}, "malformed 'w'"),
        ({"o": "rm", "p": 1, "name": 5, "t": 1}, "malformed 'rm'"),
        ({"o": "gc", "keys": "data/x"}, "malformed 'gc'"),
    ],
)
def test_a_malformed_op_is_a_clear_corrupt_object(wire: Any, why: str) -> None:
    with pytest.raises(CorruptObject, match=why):
        decode_op(wire)


def test_a_log_entry_round_trips_through_its_envelope() -> None:
    entry = LogEntry("tx1", "client1", T0, [op for _, op in SAMPLES])
    blob = codec.encode_json(b"L", entry.wire())
    assert LogEntry.unwire(codec.decode_json(b"L", blob)) == entry
    with pytest.raises(CorruptObject, match="ops must be a list"):
        LogEntry.unwire({"tx": "t", "client": "c", "t": 1, "ops": {}})


# ---------------------------------------------------------------- applying to a view


def test_mk_ln_rm_keep_names_and_link_counts(view: View) -> None:
    res = apply(view, Mk(2, ROOT_INO, b"d", DIR, 1, 2, T0), Mk(3, 2, b"f", REG, 1, 2, T0 + 1))
    assert res.created == {2, 3} and res.created_dirs == {2}
    assert view.lookup(ROOT_INO, b"d") == 2 and view.lookup(2, b"f") == 3
    root, d, f = view.getattr(ROOT_INO), view.getattr(2), view.getattr(3)
    assert root is not None and d is not None and f is not None
    assert (root.nlink, d.nlink, f.nlink) == (3, 2, 1)
    assert d.mtime == T0 + 1  # a new entry changes the directory's mtime
    assert (f.uid, f.gid, f.mode) == (1, 2, REG)

    apply(view, Ln(3, ROOT_INO, b"hard", T0 + 2))
    f = view.getattr(3)
    assert f is not None and f.nlink == 2 and f.ctime == T0 + 2
    res = apply(view, Rm(2, b"f", T0 + 3))
    assert not res.freed and view.getattr(3) is not None
    res = apply(view, Rm(ROOT_INO, b"hard", T0 + 4))
    assert 3 in res.freed and view.getattr(3) is None


def test_mv_replaces_and_exchanges(view: View) -> None:
    apply(
        view,
        Mk(2, ROOT_INO, b"d", DIR, 0, 0, T0),
        Mk(3, ROOT_INO, b"a", REG, 0, 0, T0),
        Mk(4, 2, b"b", REG, 0, 0, T0),
        Mk(5, ROOT_INO, b"sub", DIR, 0, 0, T0),
    )
    res = apply(view, Mv(ROOT_INO, b"a", 2, b"b", T0 + 1))
    assert view.lookup(2, b"b") == 3 and view.lookup(ROOT_INO, b"a") is None
    assert 4 in res.freed  # the replaced file had no other link
    apply(view, Mv(ROOT_INO, b"sub", 2, b"b", T0 + 2, exchange=True))
    assert view.lookup(2, b"b") == 5 and view.lookup(ROOT_INO, b"sub") == 3
    root, d = view.getattr(ROOT_INO), view.getattr(2)
    assert root is not None and d is not None
    assert (root.nlink, d.nlink) == (3, 3)  # the directory moved from the root into d


def test_write_truncate_and_garbage(view: View) -> None:
    blk = Extent(0, 8192, "data/3-a", 0, 8192, "k00000000")
    apply(view, Mk(3, ROOT_INO, b"f", REG, 0, 0, T0), Write(3, (blk,), 8192, T0 + 1))
    f = view.getattr(3)
    assert f is not None and (f.size, f.mtime, f.version) == (8192, T0 + 1, 1)
    assert view.extents(3) == [blk]
    # Overwrite the second half inline, then truncate below it: the block stays
    # referenced by its first half until the truncate to 0 drops it into garbage.
    apply(view, Write(3, (Extent(4096, 4096, data=b"x" * 4096),), 8192, T0 + 2))
    assert [e.key for e in view.extents(3)] == ["data/3-a", None]
    view.cur_seq = 9
    apply(view, SetAttr(3, size=0, mtime=T0 + 3, ctime=T0 + 3))
    assert view.extents(3) == [] and [g[:2] for g in view.garbage()] == [("data/3-a", 9)]
    apply(view, BlocksDeleted(("data/3-a",)))
    assert view.garbage() == []


def test_xattrs_and_inode_claims(view: View) -> None:
    apply(view, Mk(3, ROOT_INO, b"f", REG, 0, 0, T0), SetXattr(3, b"user.k", b"v", T0 + 1))
    assert view.getxattr(3, b"user.k") == b"v" and view.listxattr(3) == [b"user.k"]
    apply(view, RemoveXattr(3, b"user.k", T0 + 2))
    assert view.getxattr(3, b"user.k") is None
    assert int(view.get_meta("next_ino")) == FIRST_FREE_INO
    apply(view, ClaimInodes(100, 1024))
    assert int(view.get_meta("next_ino")) == 1124


def test_an_op_that_does_not_fit_the_view_is_corrupt(view: View) -> None:
    with pytest.raises(CorruptObject, match="'rm' operation does not apply"):
        apply(view, Rm(ROOT_INO, b"missing", T0))
    view.rollback()
    assert view.lookup(ROOT_INO, b"missing") is None
