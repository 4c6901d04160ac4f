"""The ObjectStore interface every part of efsish talks to, and what it promises.

A store holds immutable-by-convention objects under string keys ("a/b/c", UTF-8, no empty
components). Every method is async and must never block the trio event loop: backends
that make blocking calls run them in worker threads behind a CapacityLimiter.

The contract (tests/store/test_contract.py checks it against every backend):
- get(key) returns the whole object; get(key, start, end) the bytes [start, end) clipped
  to the object's size; a missing key, or a range that starts past the end of a non-empty
  object, raises NotFound.
- put(key, data) creates or replaces the object atomically (readers see old or new).
- put_if_absent(key, data) creates the object only if the key does not exist. Of any
  number of racing writers with different data exactly one succeeds; the others raise
  PreconditionFailed. It is idempotent: if the key already holds exactly `data` (for
  instance because a retried request had in fact succeeded) it succeeds.
- head(key) returns ObjectInfo or raises NotFound.
- delete(key) is idempotent: deleting a missing key is not an error.
- enclosing() returns views of the stores whose prefix encloses this one's (no I/O).
- list(prefix, start_after) yields ObjectInfo, paginating internally. Keys that differ
  only after the last "/" of the prefix (one "level", e.g. log/00000012) come in
  ascending UTF-8 byte order and start_after works among them; across deeper
  "directories" the order is backend-specific (SeaweedFS walks its directory tree), so
  efsish only relies on order within one level.

This module must not import any backend library (boto3, moto, ...).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from efsish.errors import StoreConfigError


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or head() tells about one object."""

    key: str
    size: int
    etag: str = ""


def check_key(key: str) -> str:
    """Reject keys that no backend can store faithfully; return the key unchanged."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be non-empty, no leading/trailing /")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' component")
    if "\x00" in key:
        raise ValueError("invalid object key: contains NUL")
    if len(key.encode()) > 1024:
        raise ValueError("invalid object key: longer than 1024 bytes")
    return key


def clip_range(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """Resolve an optional [start, end) range against an object of `size` bytes.

    Raises ValueError for a malformed range and lets the caller decide how to report a
    start beyond the end (NotFound)."""
    s = 0 if start is None else start
    e = size if end is None else min(end, size)
    if s < 0 or (end is not None and end < s):
        raise ValueError(f"invalid byte range [{start}, {end})")
    return s, max(s, e)


class ObjectStore(abc.ABC):
    """Async key/value object store. See the module docstring for the contract."""

    #: Human-readable location, e.g. "s3://bucket/prefix" or "file:///srv/efsish".
    url: str = ""

    @abc.abstractmethod
    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Return the object's bytes, or the range [start, end) of them."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Create or replace the object atomically."""

    @abc.abstractmethod
    async def put_if_absent(self, key: str, data: bytes) -> None:
        """Create the object only if absent; raise PreconditionFailed if another won."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo:
        """Return the object's size and etag, or raise NotFound."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object; a missing key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "", start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Yield objects whose key starts with prefix (and sorts after start_after)."""

    def enclosing(self) -> Sequence[ObjectStore]:
        """The same bucket (or directory tree) seen at each prefix that encloses this
        store's, nearest first: s3://b/x/y gives s3://b/x, then s3://b. They share this
        store's connections, so they are used only while it is open and never closed.
        Format and mount look for a filesystem there (filesystems must not nest)."""
        return []

    def endpoint_host(self) -> str | None:
        """The network host this store's requests go to, or None for a store on this
        machine (file://, memory://). Nudges listen on the local address that reaches it."""
        return None

    def endpoint_url(self) -> str | None:
        """The URL requests go to (its scheme says whether they are encrypted in
        transit), or None for a store on this machine."""
        return None

    def server_date(self) -> float | None:
        """The store's own clock (its `Date` response header, seconds since the epoch, 1 s
        resolution) in the newest response it sent, or None for a store without one
        (file://, memory://). The lease clock is checked against it (LEASES.md §7 (4))."""
        return None

    async def check(self) -> None:  # noqa: B027 - optional hook with a default
        """Verify the store is reachable and usable; raise StoreConfigError if not."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook with a default
        """Release connections and threads."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def range_past_end(size: int, start: int | None) -> bool:
    """True if a ranged read starting at `start` cannot return anything (S3 answers 416)."""
    return start is not None and start > 0 and start >= size


def require(cond: bool, message: str) -> None:
    """Raise StoreConfigError(message) unless cond holds."""
    if not cond:
        raise StoreConfigError(message)
