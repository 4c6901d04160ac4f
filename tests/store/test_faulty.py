"""The fault-injecting wrapper: deterministic faults and latency on a simulated clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from efsish.errors import PermanentStoreError, TransientStoreError
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.memory import MemoryStore


async def _count_failures(store: FaultyStore, n: int) -> int:
    failures = 0
    for i in range(n):
        try:
            await store.put(f"k{i}", b"x")
        except TransientStoreError:
            failures += 1
    return failures


async def test_error_rate_is_seeded_and_roughly_right() -> None:
    a = FaultyStore(MemoryStore("faulty-a"), FaultPlan(error_rate=0.3, seed=7))
    b = FaultyStore(MemoryStore("faulty-b"), FaultPlan(error_rate=0.3, seed=7))
    fa = await _count_failures(a, 1000)
    fb = await _count_failures(b, 1000)
    assert fa == fb  # same seed, same faults
    assert 240 < fa < 360


async def test_fail_after_and_per_operation() -> None:
    s = FaultyStore(
        MemoryStore("faulty-c"),
        FaultPlan(fail_after=3, ops=frozenset({"put"}), error=PermanentStoreError),
    )
    for i in range(3):
        await s.put(f"k{i}", b"x")
    with pytest.raises(PermanentStoreError):
        await s.put("k3", b"x")
    assert await s.get("k0") == b"x"  # reads are not in `ops`


async def test_lost_answer_does_the_write_then_fails() -> None:
    inner = MemoryStore("faulty-lost")
    s = FaultyStore(inner, FaultPlan(fail_after=0, lost_answer=True, ops=frozenset({"put"})))
    with pytest.raises(TransientStoreError):
        await s.put("k", b"x")
    assert await inner.get("k") == b"x"  # done, only the answer was lost
    s.plan = FaultPlan(fail_after=0, ops=frozenset({"put"}))
    with pytest.raises(TransientStoreError):
        await s.put("k2", b"x")
    assert [i.key async for i in inner.list()] == ["k"]  # a plain fault does nothing


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_latency_uses_the_trio_clock(mock_clock) -> None:
    s = FaultyStore(MemoryStore("faulty-d"), FaultPlan(latency=2.0))
    t0 = trio.current_time()
    await s.put("k", b"x")
    await s.get("k")
    assert trio.current_time() - t0 == pytest.approx(4.0)
