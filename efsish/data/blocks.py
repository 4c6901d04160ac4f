"""Block I/O: upload new immutable blocks and fetch (verified, cached) existing ones.

Keys say what they hold: data/<ino hex>-<time hex>-<random>, never reused or overwritten;
on a lease filesystem data/<ino hex>-<client>-<time hex>-<random>, so gc can tell whose
block an unreferenced one is (docs/design/LEASES.md §9). A
block's checksum (codec.block_hash) is recorded in the log next to every reference to it,
so a corrupt or foreign object is detected (EIO), never returned. Concurrent fetches of one
block share one GET. This module must not know about inodes beyond using the number in key names.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import Protocol

import cachetools
import google_crc32c
import trio

from efsish.codec import CRC_CHUNK, block_hash, block_matches, chunk_crcs, chunks_match
from efsish.data.cache import BlockCache
from efsish.errors import CorruptObject, NotFound, StoreError
from efsish.retry import retry_transient
from efsish.store import ObjectStore

log = logging.getLogger(__name__)

DATA_PREFIX = "data/"
# google-crc32c falls back to pure Python where it has no wheel: far too slow for the
# event loop (the checksums then go to worker threads like the older ones).
CRC32C_IN_C = google_crc32c.implementation == "c"
if not CRC32C_IN_C:
    log.warning("google-crc32c has no C extension here: block checksums will be slow")


_CLIENT = re.compile(r"[0-9a-f]{16}")  # a lease-mode client id (meta.leases.load_client_id)


def new_block_key(ino: int, client: str | None = None) -> str:
    """data/<inode hex>-[<client>-]<creation time, ns hex>-<random>: never reused. The
    client is named only when it is a lease-mode client id."""
    who = f"{client}-" if client is not None and _CLIENT.fullmatch(client) else ""
    return f"{DATA_PREFIX}{ino:x}-{who}{time.time_ns():x}-{uuid.uuid4().hex[:16]}"


# Exactly what new_block_key makes, and the key of the first efsish versions
# (data/<inode hex>-<uuid hex>). Anything else under data/ (another filesystem nested in
# this prefix, a user's object) is not this filesystem's: gc never deletes it.
_BLOCK_KEY = re.compile(r"data/[0-9a-f]+-(?P<t>[0-9a-f]+)-[0-9a-f]{16}")
_CLIENT_BLOCK_KEY = re.compile(r"data/[0-9a-f]+-(?P<c>[0-9a-f]{16})-(?P<t>[0-9a-f]+)-[0-9a-f]{16}")
_FIRST_BLOCK_KEY = re.compile(r"data/[0-9a-f]+-[0-9a-f]{32}")


def is_block_key(key: str) -> bool:
    """Whether `key` is exactly in the form of this filesystem's block keys."""
    return bool(
        _BLOCK_KEY.fullmatch(key)
        or _CLIENT_BLOCK_KEY.fullmatch(key)
        or _FIRST_BLOCK_KEY.fullmatch(key)
    )


def block_key_time_ns(key: str) -> int | None:
    """The creation time recorded in a block key, or None for any other key."""
    m = _BLOCK_KEY.fullmatch(key) or _CLIENT_BLOCK_KEY.fullmatch(key)
    return int(m["t"], 16) if m else None


def block_key_client(key: str) -> str | None:
    """The client a block key names (lease filesystems), or None."""
    m = _CLIENT_BLOCK_KEY.fullmatch(key)
    return m["c"] if m else None


class LocalBlocks(Protocol):
    """Blocks held on this machine only, not uploaded yet (staged.StagedBlocks)."""

    def __contains__(self, key: str) -> bool: ...

    async def read(self, key: str) -> bytes | None: ...


# Ranged GETs of one block before a small read fetches it whole instead (wants_range).
RANGED_PER_BLOCK = 2


class _Fetch:
    """One block on its way; those who ask for it meanwhile wait for this one."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None


class BlockIO:
    """Uploads and verified, cached downloads of data blocks."""

    def __init__(
        self,
        store: ObjectStore,
        cache: BlockCache,
        concurrency: int = 16,
        memory_bytes: int = 128 * 1024 * 1024,
        cache_writes_below: int = 1024 * 1024,
        checksum: str = "crc32c",
        client: str | None = None,
    ) -> None:
        self.store = store
        self.client = client  # named in new block keys (lease filesystems)
        # Blocks not uploaded yet (staged under a lease): read from here first.
        self.local: LocalBlocks | None = None
        self.checksum = checksum
        self.cache = cache
        self.memory_bytes = memory_bytes
        # Uploaded blocks this size or larger (whole blocks of big sequential writes) are
        # not written to the disk cache: that doubled the disk writes of every large
        # write (JuiceFS does the same by default); the page cache and the in-memory LRU
        # still serve an immediate re-read. Small files and tails are cached.
        self.cache_writes_below = cache_writes_below
        # Verified blocks in memory: a FUSE read is at most 1 MiB, a block up to 64 MiB,
        # so sequential reads hit the same block many times; verify it once, not each time.
        self._mem: cachetools.LRUCache[str, bytes] = cachetools.LRUCache(
            maxsize=memory_bytes, getsizeof=len
        )
        self._limiter = trio.CapacityLimiter(concurrency)
        self._hash_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self._inflight: dict[str, _Fetch] = {}
        self.bytes_up = 0
        self.ranged_gets = 0
        self._ranged: cachetools.LRUCache[str, int] = cachetools.LRUCache(maxsize=16384)
        self.bytes_down = 0

    def new_key(self, ino: int) -> str:
        return new_block_key(ino, self.client)

    async def checksums(self, data: bytes) -> tuple[str, str | None]:
        """(block hash, chunk checksums) of `data`, as recorded in the log."""
        h = await self._hash(data)
        crcs = None
        if self.checksum == "crc32c" and CRC32C_IN_C:
            crcs = chunk_crcs(data)  # ~0.25 ms per 4 MiB
        return h, crcs

    async def upload(self, ino: int, data: bytes) -> tuple[str, str, str | None]:
        """Store `data` as a new block; return (key, hash, chunk checksums)."""
        key = self.new_key(ino)
        h, crcs = await self.checksums(data)
        await self.put_block(key, data)
        return key, h, crcs

    async def put_block(self, key: str, data: bytes) -> None:
        """PUT block `key` (retrying transient errors), and keep it for reads."""
        async with self._limiter:
            await retry_transient(lambda: self.store.put(key, data), f"upload of {key}")
        self.bytes_up += len(data)
        self.remember(key, data)
        if len(data) < self.cache_writes_below:
            self.cache.offer(key, data)

    @staticmethod
    def _inline(size: int, crc32c: bool) -> bool:
        """Whether to checksum `size` bytes on the event loop rather than in a worker
        thread: CRC-32C of a 4 MiB block takes ~0.25 ms here, less than a thread hop
        costs; the older checksums (zlib CRC-32 ~2 ms, SHA-256 ~10 ms per 4 MiB) and
        very large blocks go to a thread (both libraries release the GIL)."""
        return size < 64 * 1024 or (crc32c and CRC32C_IN_C and size <= 16 * 1024 * 1024)

    async def _hash(self, data: bytes) -> str:
        if self._inline(len(data), self.checksum == "crc32c"):
            return block_hash(data, self.checksum)
        return await trio.to_thread.run_sync(
            block_hash, data, self.checksum, limiter=self._hash_limiter
        )

    async def _matches(self, data: bytes, hash_: str) -> bool:
        if self._inline(len(data), hash_.startswith("k")):
            return block_matches(data, hash_)
        return await trio.to_thread.run_sync(block_matches, data, hash_, limiter=self._hash_limiter)

    def remember(self, key: str, data: bytes) -> None:
        if len(data) <= self._mem.maxsize // 4:
            self._mem[key] = data

    async def fetch(self, key: str, hash_: str | None, size: int) -> bytes:
        """The whole block `key`, verified against `hash_`."""
        data = self._mem.get(key)
        if data is not None:
            return data
        f = self._inflight.get(key)
        if f is not None:
            await f.done.wait()
            if f.result is not None:
                return f.result  # (blocks too large for the memory LRU are shared too)
            return await self.fetch(key, hash_, size)  # it failed: try for ourselves
        # One fetch per block at a time, disk-cache lookup included: a reader and the
        # readahead asking for the same block while the lookup ran in its thread used to
        # both miss it and both GET the block.
        f = self._inflight[key] = _Fetch()
        try:
            data = None
            if self.local is not None and key in self.local:
                data = await self.local.read(key)
                if data is not None and hash_ is not None and not await self._matches(data, hash_):
                    log.error("staged block %s failed its checksum", key)
                    raise CorruptObject(f"staged block {key} failed its checksum")
            if data is None:
                data = await self.cache.get(key, hash_)
            if data is not None:
                self.remember(key, data)
            else:
                data = await self._download(key, hash_, size)
            f.result = data
            return data
        finally:
            f.done.set()
            del self._inflight[key]

    def wants_range(self, key: str) -> bool:
        """Whether a small read of block `key` should GET only its chunks: not when the
        block is here already (memory, on its way, disk cache), nor once it was read in
        parts RANGED_PER_BLOCK times: a block read at random again and again (a small
        database, an index) is then fetched whole, and cached like any other."""
        if key in self._mem or key in self._inflight or key in self.cache:
            return False
        if self.local is not None and key in self.local:
            return False
        # (Chunks are checked on the event loop: only with google-crc32c's C extension.)
        return CRC32C_IN_C and self._ranged.get(key, 0) < RANGED_PER_BLOCK

    async def fetch_range(self, key: str, crcs: str, size: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of block `key` (`size` bytes) by a ranged GET of just the
        CRC_CHUNKs that hold them, each verified against `crcs`: for random reads, which
        would otherwise fetch a whole block (up to 64 MiB) for a few KiB. Nothing is
        cached here (the kernel's page cache keeps what was read)."""
        first = start // CRC_CHUNK
        lo, hi = first * CRC_CHUNK, min(size, -(-end // CRC_CHUNK) * CRC_CHUNK)
        for attempt in (1, 2):
            data = await self._get(key, lo, hi)
            if len(data) == hi - lo and chunks_match(data, crcs, first):
                break
            if attempt == 1:
                log.warning("part of data block %s failed its checksum; reading it again", key)
                continue
            log.error("data block %s is corrupt in [%d, %d)", key, lo, hi)
            raise CorruptObject(f"data block {key} failed its checksum in [{lo}, {hi})")
        self.bytes_down += len(data)
        self.ranged_gets += 1
        self._ranged[key] = self._ranged.get(key, 0) + 1
        return data[start - lo : end - lo]

    async def _get(self, key: str, lo: int | None = None, hi: int | None = None) -> bytes:
        """GET block `key` (or [lo, hi) of it); a missing block is corruption."""
        try:
            async with self._limiter:
                return await self.store.get(key, lo, hi)
        except NotFound:
            log.error("data block %s is missing from the store", key)
            raise CorruptObject(f"data block {key} is missing") from None
        except StoreError as e:
            log.error("cannot read data block %s: %s", key, e)
            raise

    async def _download(self, key: str, hash_: str | None, size: int) -> bytes:
        for attempt in (1, 2):
            data = await self._get(key)
            if not (size and len(data) != size) and (
                hash_ is None or await self._matches(data, hash_)
            ):
                break
            if attempt == 1:
                # A GET carries no checksum of its own: damaged on the way? Once more.
                log.warning("data block %s failed its checksum; reading it again", key)
                continue
            log.error("data block %s is corrupt (size %d, expected %d)", key, len(data), size)
            raise CorruptObject(f"data block {key} failed its checksum")
        self.bytes_down += len(data)
        self.remember(key, data)
        self.cache.offer(key, data)
        return data

    def prefetch(self, nursery: trio.Nursery, key: str, hash_: str | None, size: int) -> None:
        """Start fetching a block in the background (readahead); errors are ignored."""
        if key in self._inflight:
            return

        async def run() -> None:
            try:
                await self.fetch(key, hash_, size)
            except (StoreError, CorruptObject):
                pass

        nursery.start_soon(run)
