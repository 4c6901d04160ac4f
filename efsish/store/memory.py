"""An in-memory ObjectStore for tests: thread-safe, shared per name within one process.

`memory://NAME` URLs opened in the same process see the same objects, so several
simulated mounts can share one "bucket". Nothing here persists or crosses processes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator

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
        # One dict and one lock per name, so separate instances of one name agree.
        with _BUCKETS_LOCK:
            self._objects = _BUCKETS.setdefault(name, {})
            self._lock = _LOCKS.setdefault(name, threading.Lock())

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        check_key(key)
        with self._lock:
            data = self._objects.get(key)
        if data is None or range_past_end(len(data), start):
            raise NotFound(key)
        s, e = clip_range(len(data), start, end)
        return data[s:e]

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        with self._lock:
            self._objects[key] = bytes(data)

    async def put_if_absent(self, key: str, data: bytes) -> None:
        check_key(key)
        with self._lock:
            old = self._objects.get(key)
            if old is None:
                self._objects[key] = bytes(data)
                return
        if old != data:
            raise PreconditionFailed(key)

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        with self._lock:
            data = self._objects.get(key)
        if data is None:
            raise NotFound(key)
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest())

    async def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)

    async def list(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        after = start_after
        while True:
            with self._lock:
                keys = sorted(
                    (k for k in self._objects if k.startswith(prefix)),
                    key=lambda k: k.encode(),
                )
                if after is not None:
                    keys = [k for k in keys if k.encode() > after.encode()]
                page = [(k, len(self._objects[k])) for k in keys[:LIST_PAGE]]
            for k, size in page:
                yield ObjectInfo(k, size)
            if len(page) < LIST_PAGE:
                return
            after = page[-1][0]


def reset_memory_stores() -> None:
    """Forget every memory bucket (for test isolation)."""
    with _BUCKETS_LOCK:
        _BUCKETS.clear()
        _LOCKS.clear()
