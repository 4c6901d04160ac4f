"""The on-disk block cache: immutable blocks as files under the cache dir, indexed by a
size-bounded cachetools LRU, rebuilt from the directory at start so it survives restarts.

Blocks never change once written, so a cached block is never stale; every entry is
checked against the block hash recorded in the metadata when read. Disk I/O runs in
worker threads. Filling the cache is best-effort and off the critical path: `offer` queues
a block for a background writer (bounded in bytes; a block that does not fit is simply not
cached), so an upload or a read never waits for the local disk. This module must not talk
to the object store.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

import cachetools
import trio

from efsish.codec import block_matches

log = logging.getLogger(__name__)


def _read_nofollow(path: Path) -> bytes:
    """The bytes of a file, never through a symlink (the daemon runs as root)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        return f.read()


class _Index(cachetools.LRUCache[str, int]):
    """LRU of key -> size; evicting an entry deletes its file."""

    def __init__(self, maxsize: int, root: Path) -> None:
        super().__init__(maxsize=maxsize, getsizeof=lambda size: max(size, 1))
        self.root = root

    def popitem(self) -> tuple[str, int]:
        key, size = super().popitem()
        try:
            (self.root / key).unlink()
        except FileNotFoundError:
            pass
        return key, size


class BlockCache:
    """Thread-safe disk cache of whole blocks."""

    def __init__(self, root: Path, max_bytes: int, queue_bytes: int = 8 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.queue_bytes = queue_bytes
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued = 0
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self.dropped = 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index = _Index(max_bytes, self.root)
        self._limiter = trio.CapacityLimiter(8)
        self.hits = 0
        self.misses = 0
        entries = sorted(
            (
                e
                for e in os.scandir(self.root)
                if e.is_file(follow_symlinks=False) and not e.name.endswith(".tmp")
            ),
            key=lambda e: e.stat().st_atime,
        )
        for e in entries:
            self._index[e.name] = e.stat().st_size

    @staticmethod
    def _name(key: str) -> str:
        return key.replace("/", "_")

    def _get(self, key: str, hash_: str | None) -> bytes | None:
        name = self._name(key)
        with self._lock:
            present = name in self._index
            if present:
                self._index[name] = self._index[name]  # touch
        if not present:
            return None
        try:
            data = _read_nofollow(self.root / name)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symlink is never a cached block
            log.warning("cached block %s is unreadable (%s); dropping it", key, e)
            self._drop(name)
            return None
        if hash_ is not None and not block_matches(data, hash_):
            log.warning("cached block %s is corrupt; dropping it", key)
            self._drop(name)
            return None
        return data

    def _drop(self, name: str) -> None:
        with self._lock:
            self._index.pop(name, None)
        (self.root / name).unlink(missing_ok=True)

    def _put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        tmp = self.root / f"{name}.{threading.get_ident()}.tmp"
        tmp.unlink(missing_ok=True)  # a leftover of a crash; O_EXCL below needs it gone
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)
        with self._lock:
            self._index[name] = len(data)

    async def get(self, key: str, hash_: str | None) -> bytes | None:
        # A block the index does not know is not on disk: no worker-thread hop (~0.1 ms)
        # in front of the GET of every cold block. Asked without the lock, which a worker
        # may hold while evictions delete files: a membership test is one dict lookup under
        # the GIL, and a block that arrives or goes meanwhile costs at most one GET or one
        # hop (`_get` looks again under the lock).
        known = self._name(key) in self._index
        data = (
            await trio.to_thread.run_sync(self._get, key, hash_, limiter=self._limiter)
            if known
            else None
        )
        if data is None:
            self.misses += 1
        else:
            self.hits += 1
        return data

    def __contains__(self, key: str) -> bool:
        """Whether the index holds `key` (asked without the lock, as `get` does)."""
        return self._name(key) in self._index

    def offer(self, key: str, data: bytes) -> None:
        """Cache a block in the background (see `run`), unless the queue is full. A block
        larger than the queue's bound (blocks reach 64 MiB) is taken when the queue is
        empty: it used to be refused always, so such filesystems cached nothing."""
        if len(data) > self._index.maxsize:
            return
        if self._queued and self._queued + len(data) > self.queue_bytes:
            self.dropped += 1
            return
        self._queue.append((key, data))
        self._queued += len(data)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background writer: drains what `offer` queued. Runs until cancelled."""
        task_status.started()
        while True:
            if not self._queue:
                self._idle.set()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            key, data = self._queue[0]
            try:
                await trio.to_thread.run_sync(self._put, key, data, limiter=self._limiter)
            except OSError as e:
                log.warning("cannot cache block %s: %s", key, e)
            finally:
                self._queue.popleft()
                self._queued -= len(data)

    async def drain(self) -> None:
        """Wait until every offered block is on disk (needs `run` running)."""
        await self._idle.wait()

    @property
    def used_bytes(self) -> int:
        return int(self._index.currsize)
