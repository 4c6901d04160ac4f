"""An in-memory ObjectStore for tests: thread-safe, shared per name within one process.

`memory://NAME[/PREFIX]` URLs opened in the same process see the same objects, so several
simulated mounts can share one "bucket"; a PREFIX is a key prefix in that bucket, as in
s3://BUCKET/PREFIX. Nothing here persists or crosses processes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Sequence

from efsish.errors import NotFound, PreconditionFailed
from efsish.store.base import ObjectInfo, ObjectStore, check_key, clip_range, range_past_end

_BUCKETS: dict[str, dict[str, bytes]] = {}
_LOCKS: dict[str, threading.Lock] = {}
_BUCKETS_LOCK = threading.Lock()

LIST_PAGE = 1000


class MemoryStore(ObjectStore):
    """Objects in a dict guarded by a lock; the same name shares the same dict."""

    def __init__(self, name: str = "") -> None:
        self.url = f"memory://{name}"
        bucket, _, prefix = name.strip("/").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._base = f"{self.prefix}/" if self.prefix else ""
        # One dict and one lock per bucket, so separate instances of one name agree.
        with _BUCKETS_LOCK:
            self._objects = _BUCKETS.setdefault(bucket, {})
            self._lock = _LOCKS.setdefault(bucket, threading.Lock())

    def _k(self, key: str) -> str:
        return self._base + check_key(key)

    def enclosing(self) -> Sequence[ObjectStore]:
        parts = self.prefix.split("/") if self.prefix else []
        return [
            MemoryStore("/".join([self.bucket, *parts[:n]])) for n in range(len(parts) - 1, -1, -1)
        ]

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._lock:
            data = self._objects.get(self._k(key))
        if data is None or range_past_end(len(data), start):
            raise NotFound(key)
        s, e = clip_range(len(data), start, end)
        return data[s:e]

    async def put(self, key: str, data: bytes) -> None:
        full = self._k(key)
        with self._lock:
            self._objects[full] = bytes(data)

    async def put_if_absent(self, key: str, data: bytes) -> None:
        full = self._k(key)
        with self._lock:
            old = self._objects.get(full)
            if old is None:
                self._objects[full] = bytes(data)
                return
        if old != data:
            raise PreconditionFailed(key)

    async def head(self, key: str) -> ObjectInfo:
        with self._lock:
            data = self._objects.get(self._k(key))
        if data is None:
            raise NotFound(key)
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest())

    async def delete(self, key: str) -> None:
        full = self._k(key)
        with self._lock:
            self._objects.pop(full, None)

    async def list(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        after = None if start_after is None else self._base + start_after
        full_prefix = self._base + prefix
        while True:
            with self._lock:
                keys = sorted(
                    (k for k in self._objects if k.startswith(full_prefix)),
                    key=lambda k: k.encode(),
                )
                if after is not None:
                    keys = [k for k in keys if k.encode() > after.encode()]
                page = [(k, len(self._objects[k])) for k in keys[:LIST_PAGE]]
            for k, size in page:
                yield ObjectInfo(k[len(self._base) :], size)
            if len(page) < LIST_PAGE:
                return
            after = page[-1][0]


def reset_memory_stores() -> None:
    """Forget every memory bucket (for test isolation)."""
    with _BUCKETS_LOCK:
        _BUCKETS.clear()
        _LOCKS.clear()
