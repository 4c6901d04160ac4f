"""The shared credit balance: mounts charge each other's metering, split the rate,
persist the balance across restarts, and follow `efsish config` live."""

from __future__ import annotations

import time

import pytest

from efsish.meta.heartbeat import Heartbeat
from efsish.meta.superblock import format_fs
from efsish.metering import LEDGER_KEY, Metering, load_ledger, write_config
from efsish.store.memory import MemoryStore
from efsish.throttle import GiB, MiB, ThroughputMode, baseline_bps


def hb(client: str, total: float) -> Heartbeat:
    return Heartbeat(client, time.time_ns(), metered_total=total)


async def test_two_active_mounts_share_one_rate_and_one_balance(nursery) -> None:
    store = MemoryStore("metering-share")
    sb = await format_fs(store)
    await write_config(store, sb, mode=None, provisioned_mibps=None, initial_balance=10 * GiB)
    a, b = Metering(store, sb, "a"), Metering(store, sb, "b")
    await a.start(nursery, 0)
    await b.start(nursery, 0)
    assert a.throttle is not None and b.throttle is not None
    assert a.throttle.ledger.balance == pytest.approx(10 * GiB, rel=1e-6)
    await a.sync([hb("b", 0)], 0)  # first sight of b: no charge yet
    await a.throttle.acquire("write", 4 * MiB)
    await b.throttle.acquire("write", 4 * MiB)
    fa, fb = a.drain_metered(), b.drain_metered()
    assert fb == pytest.approx(4 * MiB)
    before = a.throttle.ledger.balance
    await a.sync([hb("b", fb), hb("a", fa)], 0)
    # b's 4 MiB were charged to a's copy of the one balance...
    assert before - a.throttle.ledger.balance == pytest.approx(4 * MiB, rel=0.01)
    # ...and a now takes half of the permitted rate, since b was active too.
    assert a.throttle.share == pytest.approx(0.5)
    assert a.client_connections == 2
    await a.sync([hb("b", fb)], 0)  # b idle: a gets it all again
    assert a.throttle.share == pytest.approx(1.0)


async def test_restart_keeps_the_balance(nursery) -> None:
    store = MemoryStore("metering-restart")
    sb = await format_fs(store)
    await write_config(store, sb, mode=None, provisioned_mibps=None, initial_balance=1 * GiB)
    m = Metering(store, sb, "x")
    await m.start(nursery, 0)
    assert m.throttle is not None
    await m.throttle.acquire("write", 32 * MiB)
    await m.save()
    saved = await load_ledger(store)
    assert saved is not None and saved[0] == pytest.approx(992 * MiB, rel=0.01)
    again = Metering(store, sb, "y")
    await again.start(nursery, 0)
    assert again.throttle is not None
    # Not reset to a full balance: only the baseline accrued since the save is added.
    assert again.throttle.ledger.balance == pytest.approx(992 * MiB, abs=baseline_bps(0) * 5)
    assert (await store.head(LEDGER_KEY)).size > 0


async def test_config_change_reaches_live_mounts(nursery) -> None:
    store = MemoryStore("metering-config")
    sb = await format_fs(store)
    m = Metering(store, sb, "x")
    await m.start(nursery, 0)
    assert m.throttle is not None and m.throttle.config.mode is ThroughputMode.BURSTING
    await write_config(store, sb, mode="provisioned", provisioned_mibps=3)
    await m._reload_config()
    assert str(m.throttle.config.mode) == str(ThroughputMode.PROVISIONED)
    assert m.throttle.permitted_bps() == pytest.approx(3 * MiB)
    with pytest.raises(ValueError):
        await write_config(store, sb, mode="provisioned", provisioned_mibps=0)
    metrics = m.metrics()
    for name in (
        "BurstCreditBalance",
        "PermittedThroughput",
        "MeteredIOBytes",
        "TotalIOBytes",
        "DataReadIOBytes",
        "DataWriteIOBytes",
        "MetadataIOBytes",
        "PercentIOLimit",
        "ClientConnections",
        "StorageBytes",
    ):
        assert name in metrics


async def test_a_mount_joining_a_busy_filesystem_agrees_on_the_balance(nursery) -> None:
    store = MemoryStore("metering-join")
    sb = await format_fs(store)
    await write_config(store, sb, mode=None, provisioned_mibps=None, initial_balance=1 * GiB)
    a = Metering(store, sb, "a")
    await a.start(nursery, 0)
    assert a.throttle is not None
    await a.throttle.acquire("write", 32 * MiB)
    await a.save()
    await a.throttle.acquire("write", 16 * MiB)  # after the save: only in a's heartbeat
    total_a = a.drain_metered()
    b = Metering(store, sb, "b")
    await b.start(nursery, 0)
    assert b.throttle is not None
    await b.sync([hb("a", total_a)], 0)
    assert b.throttle.ledger.balance == pytest.approx(a.throttle.ledger.balance, abs=2 * MiB)
    assert b.throttle.ledger.balance == pytest.approx(1 * GiB - 48 * MiB, abs=2 * MiB)
