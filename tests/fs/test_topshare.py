"""Shared reads of the top (docs/design/LEASES.md §17) below FUSE: in-process mounts of a
format-3 filesystem on one memory store (the fixtures of test_leases.py). A mount with
a share answers reads of the top with no request; a change of the top on another mount
is answered only once every share it ended is acknowledged or has lapsed, so a read
that begins after it returned sees it (close-to-open for the names in the top)."""

from __future__ import annotations

import errno
import logging
import os

import pytest
import trio

from efsish.errors import FsError
from efsish.meta import topshare
from efsish.meta.view import ROOT_INO
from tests.fs import test_leases
from tests.fs.test_leases import Clock, Make, Mount, entries, mkdir

# The fixtures of test_leases.py (`lease_time` is this module's own).
leases, sb, make, store = test_leases.leases, test_leases.sb, test_leases.make, test_leases.store

LEASE_TIME = 3.0  # S = 1 s: a change waits at most 2 s for a share nobody acknowledges
S = topshare.share_time(LEASE_TIME)


@pytest.fixture
def lease_time() -> float:
    return LEASE_TIME


def share(m: Mount) -> topshare.TopShare:
    assert m.fs.leases is not None
    return m.fs.leases.share


async def shares_top(m: Mount) -> None:
    """A read of the top that would catch up: the mount takes a share instead."""
    with pytest.raises(FsError):
        await m.fs.lookup(ROOT_INO, b"no such name")
    assert share(m).held


def deafen(m: Mount) -> None:
    """Mount `m` drops every nudge it receives (as behind a firewall)."""
    assert m.fs.leases is not None and m.fs.leases.nudges.nudger is not None
    m.fs.leases.nudges.nudger._on_wake = lambda n: None


async def timed_mkdir(m: Mount, name: bytes) -> tuple[int, float]:
    t0 = trio.current_time()
    ino = await mkdir(m.fs, ROOT_INO, name)
    return ino, trio.current_time() - t0


async def lshr_ops(m: Mount) -> list[dict[str, object]]:
    """The lshr ops mount `m` wrote, in log order."""
    return [
        op.wire()
        for e in await entries(m.store)
        if e.client == m.fs.meta.client_id
        for op in e.ops
        if op.wire()["o"] == "lshr"
    ]


async def test_reads_of_the_top_under_a_share_send_no_request(make: Make) -> None:
    a = await make(poll_interval=3600, atime=False)
    assert share(a).held  # taken as the mount started (one PUT)
    assert await lshr_ops(a) == [{"o": "lshr"}]
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await mkdir(a.fs, home, b"sub")
    await a.fs.meta.catch_up()  # a proof: the share is valid for S
    before = len(a.store.requests)
    for _ in range(5):
        assert (await a.fs.lookup(ROOT_INO, b"home")).ino == home
        with pytest.raises(FsError) as e:
            await a.fs.lookup(ROOT_INO, b"missing")
        assert e.value.errno == errno.ENOENT
        await a.fs.opendir(ROOT_INO)
        assert (await a.fs.lookup(home, b"..")).ino == ROOT_INO
    # (The heartbeat task may list clients/ meanwhile; the reads send nothing.)
    assert [r for r in a.store.requests[before:] if not r[1].startswith("clients/")] == []


async def test_without_nudges_a_mount_takes_no_share_and_catches_up(make: Make) -> None:
    a = await make(poll_interval=3600, atime=False, nudge="off")
    home = await mkdir(a.fs, ROOT_INO, b"home")
    for _ in range(2):
        before = a.log_gets()
        assert (await a.fs.lookup(ROOT_INO, b"home")).ino == home
        assert a.log_gets() - before == 1
    assert not share(a).held and await lshr_ops(a) == []


async def test_a_change_of_the_top_waits_for_the_sharers_ack(make: Make) -> None:
    a = await make(poll_interval=3600)
    b = await make(poll_interval=0.05)
    await shares_top(b)
    await a.fs.meta.catch_up()
    x, took = await timed_mkdir(a, b"x")
    # B was nudged, applied the entry and acknowledged it: no wait for 2 x S.
    assert took < S, took
    assert share(a).ack_timeouts == 0 and share(b).revocations == 1
    assert not share(b).held
    assert (await b.fs.lookup(ROOT_INO, b"x")).ino == x


async def test_a_sharer_that_does_not_hear_the_change_is_waited_for(make: Make) -> None:
    # B shares the top but neither gets the nudge nor polls: it would answer a lookup of
    # the new name from its old view while its share is valid. A's mkdir is answered
    # only after 2 x S, when B's share has certainly lapsed; B's lookup then catches up.
    a = await make(poll_interval=3600)
    b = await make(poll_interval=3600)
    await shares_top(b)
    deafen(b)
    await b.fs.meta.catch_up()  # a proof: B's share is valid for S from now
    assert share(b).valid()
    x, took = await timed_mkdir(a, b"x")
    assert took >= 2 * S - 0.05, took
    assert share(a).ack_timeouts == 1
    assert not share(b).valid()
    assert (await b.fs.lookup(ROOT_INO, b"x")).ino == x


async def test_a_writer_without_nudges_reads_the_ack_in_the_log(make: Make) -> None:
    a = await make(poll_interval=3600, nudge="off")
    b = await make(poll_interval=0.05)
    await shares_top(b)
    _, took = await timed_mkdir(a, b"x")
    assert took < S, took  # B acknowledged with an lshr(off) entry, which A read
    assert share(a).ack_timeouts == 0
    assert await lshr_ops(b) == [{"o": "lshr"}, {"o": "lshr", "off": True}]


async def test_a_crashed_sharer_costs_one_wait_and_a_clean_one_none(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make(poll_interval=3600)
    b = await make(poll_interval=0.05)
    c = await make(poll_interval=0.05)
    await shares_top(b)
    await shares_top(c)
    b.scope.cancel()  # kill -9: no clean unmount, B's share stays in the log
    await c.fs.shutdown()  # a clean unmount ends C's share
    assert await lshr_ops(c) == [{"o": "lshr"}, {"o": "lshr", "off": True}]
    with caplog.at_level(logging.WARNING, logger="efsish.meta.topshare"):
        _, took = await timed_mkdir(a, b"x")
    assert 2 * S - 0.05 <= took < 2 * S + 1.0, took
    assert share(a).ack_timeouts == 1
    assert f"{b.fs.meta.client_id}/1 did not acknowledge" in caplog.text
    _, took = await timed_mkdir(a, b"y")  # B's share ended with x: no wait
    assert took < S, took
    # A mount started later replays x in its start-up catch-up: it does not wait for B.
    d = await make(poll_interval=0.05)
    _, took = await timed_mkdir(d, b"z")
    assert took < S, took


async def test_after_a_revocation_a_mount_shares_again_then_cools_down(make: Make) -> None:
    clock = Clock()
    a = await make(poll_interval=3600)
    b = await make(poll_interval=0.05, lease_clock=clock)
    await shares_top(b)
    await timed_mkdir(a, b"x")
    assert not share(b).held
    # Within RESHARE_AFTER a read of the top catches up (a GET), no lshr.
    before = b.log_gets()
    assert (await b.fs.lookup(ROOT_INO, b"x")) is not None
    assert b.log_gets() > before and not share(b).held
    clock.offset += topshare.RESHARE_AFTER + 0.1
    with pytest.raises(FsError):
        await b.fs.lookup(ROOT_INO, b"nothing")  # takes a share instead of catching up
    assert share(b).held and len(await lshr_ops(b)) == 2
    # A second revocation within a minute: a cool-down of 10 s before the next share.
    await timed_mkdir(a, b"y")
    clock.offset += topshare.RESHARE_AFTER + 0.1
    with pytest.raises(FsError):
        await b.fs.lookup(ROOT_INO, b"nothing")
    assert not share(b).held and len(await lshr_ops(b)) == 2
    clock.offset += topshare.COOL_DOWN_FIRST
    with pytest.raises(FsError):
        await b.fs.lookup(ROOT_INO, b"nothing")
    assert share(b).held and len(await lshr_ops(b)) == 3


async def test_a_change_that_depends_on_an_unseen_change_of_the_top_waits_too(
    make: Make, nursery: trio.Nursery
) -> None:
    # A makes /y while B (a deaf sharer) has not seen it; C sees it at once and makes
    # /y/f. C's create must not be answered while B may still answer "no /y" from its
    # share: a read on B after C's create returned must find /y/f.
    a = await make(poll_interval=3600)
    b = await make(poll_interval=3600)
    c = await make(poll_interval=0.02)
    await shares_top(b)
    deafen(b)
    await b.fs.meta.catch_up()  # a proof: B's share is valid for S from now
    made = trio.Event()

    async def make_y() -> None:
        await mkdir(a.fs, ROOT_INO, b"y")
        made.set()

    nursery.start_soon(make_y)
    with trio.fail_after(S):
        while (y := await c.fs.meta.lookup(ROOT_INO, b"y")) is None:  # noqa: ASYNC110
            await trio.sleep(0.01)
    t0 = trio.current_time()
    f = await write_and_close(c, y.ino, b"f")
    assert trio.current_time() - t0 >= S, "C answered while B could still miss /y"
    attr = await b.fs.lookup((await b.fs.lookup(ROOT_INO, b"y")).ino, b"f")
    assert attr.ino == f
    await made.wait()


async def write_and_close(m: Mount, parent: int, name: bytes) -> int:
    fh, attr = await m.fs.create(parent, name, 0o644, os.O_WRONLY, test_leases.ROOT)
    await m.fs.release(fh)
    return attr.ino


async def test_without_nudges_a_heartbeat_acknowledges_the_change(make: Make) -> None:
    # B takes no nudge (a firewall): it sees A's change at its poll, and its next
    # heartbeat (its incarnation, its applied position) is the acknowledgement A reads.
    a = await make(poll_interval=3600)
    b = await make(poll_interval=0.05, heartbeat_interval=0.2)
    await shares_top(b)
    deafen(b)
    b.fs.leases.nudges.send = lambda *args: False  # type: ignore[method-assign]
    _, took = await timed_mkdir(a, b"x")
    assert took < 2 * S - 0.3, took
    assert share(a).ack_timeouts == 0 and share(b).revocations == 1
