"""The lease ops and the lease header of a log entry (efsish.meta.ops): their encoding,
and that an entry without the header encodes exactly as before leases existed."""

from __future__ import annotations

from typing import Any

import pytest

from efsish import codec
from efsish.errors import CorruptObject
from efsish.meta.ops import (
    JOURNALED,
    SYNC,
    Fmt,
    LAcq,
    LAdopt,
    LDirty,
    LFlush,
    LogEntry,
    LRcv,
    LRec,
    LRel,
    LShr,
    LTko,
    Mk,
    Op,
    Sess,
    decode_op,
)

T0 = 1_700_000_000_000_000_000

SAMPLES: list[tuple[dict[str, Any], Op]] = [
    ({"o": "sess", "c": "c1", "inc": 3}, Sess("c1", 3)),
    ({"o": "lacq", "d": 10}, LAcq(10)),
    ({"o": "lrec", "d": 10, "rid": "r1", "want": "r"}, LRec(10, "r1", "r")),
    ({"o": "lrec", "d": 10, "rid": "r2", "want": "w"}, LRec(10, "r2", "w")),
    ({"o": "lflush", "d": 10, "rid": "r1"}, LFlush(10, "r1")),
    ({"o": "lrel", "d": 10}, LRel(10)),
    ({"o": "lrel", "d": 10, "rid": "r2"}, LRel(10, "r2")),
    ({"o": "lrel", "d": 10, "rid": "r2", "to": "c2"}, LRel(10, "r2", "c2")),
    ({"o": "ltko", "d": 10, "rid": "r3"}, LTko(10, "r3")),
    ({"o": "ladopt", "d": 10}, LAdopt(10)),
    (
        {"o": "lrcv", "c": "c1", "inc": 3, "path": "/.efsish-recovered/c1-x"},
        LRcv("c1", 3, "/.efsish-recovered/c1-x"),
    ),
    ({"o": "ldirty", "c": "c1", "inc": 3}, LDirty("c1", 3)),
    ({"o": "ldirty", "c": "c1", "inc": 3, "clean": True}, LDirty("c1", 3, dirty=False)),
    ({"o": "lshr"}, LShr()),
    ({"o": "lshr", "off": True}, LShr(on=False)),
    ({"o": "fmt", "v": 3}, Fmt(3)),
]


@pytest.mark.parametrize("wire,op", SAMPLES, ids=[w["o"] for w, _ in SAMPLES])
def test_every_lease_op_decodes_and_encodes_back(wire: dict[str, Any], op: Op) -> None:
    assert decode_op(wire) == op
    assert op.wire() == wire


@pytest.mark.parametrize(
    "wire,why",
    [
        ({"o": "lrec", "d": 10, "rid": "r", "want": "x"}, "malformed 'lrec'"),
        ({"o": "lrec", "d": 10, "rid": "", "want": "r"}, "malformed 'lrec'"),
        ({"o": "sess", "c": 5, "inc": 1}, "malformed 'sess'"),
        ({"o": "lacq"}, "malformed 'lacq'"),
        ({"o": "lrel", "d": 10, "to": 7}, "malformed 'lrel'"),
    ],
)
def test_a_malformed_lease_op_is_a_clear_corrupt_object(wire: Any, why: str) -> None:
    with pytest.raises(CorruptObject, match=why):
        decode_op(wire)


def test_an_entry_without_the_lease_header_encodes_as_before() -> None:
    e = LogEntry("tx1", "c1", T0, [Mk(7, 1, b"a", 0o100644, 0, 0, T0)])
    assert set(e.wire()) == {"tx", "client", "t", "ops"}
    back = LogEntry.unwire(e.wire())
    assert back == e and not back.leased


def test_the_lease_header_round_trips() -> None:
    e = LogEntry(
        "tx1",
        "c1",
        T0,
        [LAcq(10), Mk(7, 10, b"a", 0o100644, 0, 0, T0)],
        inc=2,
        kind=JOURNALED,
        batch=(5, 9),
        claims={10: 44, 3: 7},
    )
    w = e.wire()
    assert w["inc"] == 2 and w["kind"] == "journaled" and w["batch"] == [5, 9]
    assert w["claims"] == {"3": 7, "10": 44}
    blob = codec.encode_json(b"L", w)
    back = LogEntry.unwire(codec.decode_json(b"L", blob))
    assert back == e and back.leased and back.journaled
    # Optional parts are left out when unset.
    s = LogEntry("tx2", "c1", T0, [Sess("c1", 1)], inc=1, kind=SYNC)
    assert set(s.wire()) == {"tx", "client", "t", "ops", "inc", "kind"}
    assert LogEntry.unwire(s.wire()) == s


@pytest.mark.parametrize(
    "extra",
    [
        {"kind": "sync"},  # no incarnation
        {"inc": 1},  # no kind
        {"inc": 1, "kind": "later"},
        {"inc": "1", "kind": "sync"},
        {"inc": 1, "kind": "sync", "claims": {"x": 1}},
        {"inc": 1, "kind": "sync", "batch": [1]},
    ],
)
def test_a_malformed_lease_header_is_a_clear_corrupt_object(extra: dict[str, Any]) -> None:
    with pytest.raises(CorruptObject, match="malformed lease header"):
        LogEntry.unwire({"tx": "t", "client": "c", "t": 1, "ops": [], **extra})
