"""efsish.meta.heartbeat: the one owner of `clients/<id>` objects."""

from __future__ import annotations

import time

import pytest

from efsish import codec
from efsish.errors import CorruptObject
from efsish.meta import heartbeat
from efsish.meta.heartbeat import Heartbeat
from efsish.store.memory import MemoryStore


def test_a_heartbeat_round_trips_and_an_old_minimal_one_decodes() -> None:
    hb = Heartbeat(
        "c1",
        5,
        host="h",
        mountpoint="/home",
        version="0.1.0",
        pid=9,
        applied_seq=42,
        starving=True,
        held=["data/x"],
        metered_total=3.5,
        started=1,
        nudge="192.0.2.7:40123",
        format=3,
        newest_format=3,
        domains=["/alice", "/bob"],
        journal_rows=12,
        journal_oldest=4,
        inc=3,
    )
    assert Heartbeat.unwire(hb.wire()) == hb
    # The fields the first heartbeats carried; everything else takes its default.
    old = Heartbeat.unwire({"client": "c2", "applied_seq": 7, "t": 10, "future": [1]})
    assert (old.client, old.applied_seq, old.t, old.held, old.starving) == ("c2", 7, 10, [], False)
    assert old.nudge is None  # written before nudges, or by a mount with nudge=off
    # Written before heartbeats told formats, leases and the journal.
    assert (old.format, old.newest_format, old.domains, old.journal_rows) == (0, 0, [], 0)
    assert old.inc == 0  # written before heartbeats told the incarnation
    assert old.journal_age() == 0.0
    assert Heartbeat("c", 1, journal_rows=2, journal_oldest=10**9).journal_age(3 * 10**9) == 2
    assert Heartbeat.unwire({**hb.wire(), "nudge": None}).nudge is None
    with pytest.raises(CorruptObject, match="malformed heartbeat"):
        Heartbeat.unwire({"client": "c3"})  # no time: its age cannot be told


def test_age_and_liveness_follow_the_readers_clock() -> None:
    now = time.time_ns()
    assert Heartbeat("c", now - 5 * 10**9).age(now) == pytest.approx(5)
    assert Heartbeat("c", now - 5 * 10**9).live(now)
    assert not Heartbeat("c", now - int((heartbeat.EXPIRE + 1) * 1e9)).live(now)


async def test_read_all_skips_foreign_keys_and_unreadable_ones_unless_strict() -> None:
    store = MemoryStore("heartbeats")
    await heartbeat.write(store, Heartbeat("a", time.time_ns()))
    await heartbeat.write(store, Heartbeat("b", time.time_ns()))
    await store.put("clients/nested/fs/clients/x", codec.encode_json(b"H", {"client": "x", "t": 1}))
    assert sorted(h.client for h in await heartbeat.read_all(store)) == ["a", "b"]
    assert [h.client for h in await heartbeat.read_all(store, exclude="a")] == ["b"]
    await store.put("clients/garbled", b"not an envelope")
    assert sorted(h.client for h in await heartbeat.read_all(store)) == ["a", "b"]
    with pytest.raises(CorruptObject, match="clients/garbled cannot be read"):
        await heartbeat.read_all(store, strict=True)
    await heartbeat.delete(store, "a")
    await store.delete("clients/garbled")
    assert [h.client for h in await heartbeat.read_all(store, strict=True)] == ["b"]
