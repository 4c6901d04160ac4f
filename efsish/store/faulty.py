"""Wrapper stores that inject faults and latency, for reliability tests and benchmarks.

FaultyStore wraps any ObjectStore and, per operation, can fail with a given probability,
fail after N calls, add fixed or random latency, or hang until cancelled. With
`lost_answer`, a failing write (put, put_if_absent, delete) is carried out first and only
its answer is lost: the ambiguous outcome of a request that timed out after the server
had done it. Randomness comes
from a seeded random.Random so a failing test can be replayed. It must never be used
outside tests and benchmarks.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from efsish.errors import StoreError, TransientStoreError
from efsish.store.base import ObjectInfo, ObjectStore

OPS = ("get", "put", "put_if_absent", "head", "delete", "list")


@dataclass
class FaultPlan:
    """What to inject. `ops` limits faults to those operations (all if empty)."""

    error_rate: float = 0.0
    fail_after: int | None = None  # every call after this many calls fails
    latency: float = 0.0  # seconds added to every call
    jitter: float = 0.0  # plus uniform(0, jitter)
    ops: frozenset[str] = field(default_factory=frozenset)
    error: type[StoreError] = TransientStoreError
    lost_answer: bool = False  # a failing write is done, then the error is raised
    seed: int = 0


class FaultyStore(ObjectStore):
    """Delegates to `inner`, injecting the faults described by `plan`."""

    def __init__(self, inner: ObjectStore, plan: FaultPlan | None = None) -> None:
        self.inner = inner
        self.plan = plan or FaultPlan()
        self.url = f"faulty+{inner.url}"
        self.calls: dict[str, int] = dict.fromkeys(OPS, 0)
        self.requests: list[tuple[str, str]] = []  # (op, key) of every call, in order
        self._rng = random.Random(self.plan.seed)

    async def _fault(self, op: str, key: str) -> StoreError | None:
        """Count the call, wait the planned latency, and return the error to inject."""
        plan = self.plan
        self.calls[op] += 1
        self.requests.append((op, key))
        if plan.ops and op not in plan.ops:
            return None
        delay = plan.latency + (self._rng.uniform(0, plan.jitter) if plan.jitter else 0.0)
        if delay:
            await trio.sleep(delay)
        total = sum(self.calls.values())
        if plan.fail_after is not None and total > plan.fail_after:
            return plan.error(f"injected fault: {op} {key} after {plan.fail_after} calls")
        if plan.error_rate and self._rng.random() < plan.error_rate:
            return plan.error(f"injected fault: {op} {key}")
        return None

    async def _before(self, op: str, key: str) -> None:
        error = await self._fault(op, key)
        if error is not None:
            raise error

    async def _write(self, op: str, key: str, do: Callable[[], Awaitable[None]]) -> None:
        error = await self._fault(op, key)
        if error is not None and not self.plan.lost_answer:
            raise error
        await do()
        if error is not None:
            raise error

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        await self._before("get", key)
        return await self.inner.get(key, start, end)

    async def put(self, key: str, data: bytes) -> None:
        await self._write("put", key, lambda: self.inner.put(key, data))

    async def put_if_absent(self, key: str, data: bytes) -> None:
        await self._write("put_if_absent", key, lambda: self.inner.put_if_absent(key, data))

    async def head(self, key: str) -> ObjectInfo:
        await self._before("head", key)
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        await self._write("delete", key, lambda: self.inner.delete(key))

    async def list(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        await self._before("list", prefix)
        async for info in self.inner.list(prefix, start_after):
            yield info

    async def check(self) -> None:
        await self.inner.check()

    def enclosing(self) -> Sequence[ObjectStore]:
        return self.inner.enclosing()

    def endpoint_host(self) -> str | None:
        return self.inner.endpoint_host()

    def server_date(self) -> float | None:
        return self.inner.server_date()

    async def aclose(self) -> None:
        await self.inner.aclose()
