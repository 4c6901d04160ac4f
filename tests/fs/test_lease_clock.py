"""The store `Date` guard (docs/design/LEASES.md §7 (4)) below FUSE: when the store's
clock advances by more than the lease clock plus L/4 between two polls (a VM whose clock
stood still while it was paused), the holder treats its leases as lapsed: its next change
in a held domain is a sync entry and its next read there catches up with the log.

In-process mounts of a format-3 filesystem (the fixtures of test_leases.py) on a memory
store that answers with a `Date` a test can move: the fake clock is the input, what is
asserted is the holder's real behaviour (entries in the log, requests it sends)."""

from __future__ import annotations

import math
import time
import uuid

import pytest

from efsish.meta.view import ROOT_INO
from efsish.store.memory import MemoryStore
from tests.fs import test_leases
from tests.fs.test_leases import Make, Mount, entries, mkdir, write_file

# The fixtures of test_leases.py (`store` and `lease_time` are this module's own).
leases, sb, make = test_leases.leases, test_leases.sb, test_leases.make

LEASE_TIME = 30.0  # L/4 + 1 s = 8.5 s: far above the drift of two real clocks in a test


class DatedStore(MemoryStore):
    """A memory store whose answers carry a `Date` (whole seconds, like the header):
    the wall clock plus `ahead`, which a test moves to play a paused VM."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ahead = 0.0

    def server_date(self) -> float | None:
        return float(math.floor(time.time() + self.ahead))


@pytest.fixture
async def store() -> DatedStore:
    return DatedStore(f"dated-{uuid.uuid4().hex}")


@pytest.fixture
def lease_time() -> float:
    return LEASE_TIME


async def holding(make: Make) -> tuple[Mount, int]:
    """A mount with no poller (each poll is the test's `catch_up`) holding /home, with
    an empty journal and a valid lease."""
    a = await make(poll_interval=3600, commit_interval=3600, atime=False)
    home = await mkdir(a.fs, ROOT_INO, b"home")
    await write_file(a.fs, home, b"first", b"")  # acquires the domain
    assert a.fs.leases is not None and a.fs.leases.state.held
    await a.fs.leases.sync()
    await a.fs.meta.catch_up()  # a poll: renews
    return a, home


async def poll_after(a: Mount, store: DatedStore, jump: float) -> None:
    """The store's clock moves `jump` s ahead of the lease clock, then a poll."""
    store.ahead += jump
    await a.fs.meta.catch_up()


@pytest.mark.parametrize("jump", [0.0, 60.0])
async def test_a_store_clock_jump_lapses_the_leases_for_changes(
    make: Make, store: DatedStore, jump: float
) -> None:
    a, home = await holding(make)
    await poll_after(a, store, jump)
    before = len(await entries(store))
    await mkdir(a.fs, home, b"after")  # one change in the held domain
    new = (await entries(store))[before:]
    if jump:
        # Not journaled under a lease the lease clock cannot vouch for: committed now.
        assert [e.kind for e in new] == ["sync"]
        assert a.fs.meta.journal_rows == 0
    else:
        assert new == [] and a.fs.meta.journal_rows > 0  # journaled, as while valid


@pytest.mark.parametrize("jump", [0.0, 60.0])
async def test_a_store_clock_jump_lapses_the_leases_for_reads(
    make: Make, store: DatedStore, jump: float
) -> None:
    a, home = await holding(make)
    await poll_after(a, store, jump)
    before = a.log_gets() + a.log_puts()
    assert (await a.fs.lookup(home, b"first")).ino > 0
    # Lapsed: the read proves the head (a catch-up's GET, or the PUT that takes a
    # share of the top: LEASES.md §17); valid: the view answers.
    assert a.log_gets() + a.log_puts() - before == (1 if jump else 0)
    before = a.log_gets() + a.log_puts()
    assert (await a.fs.lookup(home, b"first")).ino > 0
    assert a.log_gets() + a.log_puts() - before == 0  # that proof renewed the lease
