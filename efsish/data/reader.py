"""The read path: the bytes of an open file, from its committed layout, the uploads
not yet committed and its write buffer, and readahead for sequential readers.

A read asks for the committed extents through the file's extent cache (asking again when
a commit of the same file overtook the answer), or takes them from the file's snapshot
once the log has freed it; it lays the uncommitted uploads over them, then the dirty
bytes, copied before any wait. Blocks come from BlockIO (memory LRU, disk cache, GET; a
small random read GETs only the chunks that hold it). Readahead keeps the next blocks
of a sequential reader downloading, in a window that doubles up to
`readahead_max_bytes`.

This module owns the per-file read state (OpenFile.ra, OpenFile.ext_cache). It must not
change a file's data or layout, nor import filesystem.py or the metadata log: the
committed layout comes from the `extents_of` callable.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio

from efsish.data.blocks import BlockIO
from efsish.data.openfile import OpenFile
from efsish.errors import EfsishError, FsError
from efsish.meta.view import Extent

EXTENT_CACHE_SPAN = 64 * 1024**2  # bytes of a file's layout a reader caches at once
EXTENT_CACHE_MAX = 256  # extents; a more fragmented span is not cached
READ_SNAPSHOT_TRIES = 4  # reads of the extents a commit of the same file overlapped

# (ino, start, end) -> the committed extents of the inode overlapping [start, end)
ExtentsOf = Callable[[int, int, int], Awaitable[list[Extent]]]


class Reader:
    """Reads of the open files of one mount."""

    def __init__(
        self,
        blocks: BlockIO,
        extents_of: ExtentsOf,
        block_size: int,
        readahead_blocks: int,
        readahead_max_bytes: int,
    ) -> None:
        self.blocks = blocks
        self.extents_of = extents_of
        self.block_size = block_size
        self.readahead_blocks = readahead_blocks
        self.readahead_max_bytes = readahead_max_bytes
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Readahead runs in `nursery` from now on (none before)."""
        self._nursery = nursery

    async def read(self, of: OpenFile, off: int, size: int) -> bytes | memoryview:
        """The bytes [off, off + size) of `of` as this mount sees them (EIO if a block
        cannot be read)."""
        end = min(off + size, of.size)
        if off >= end:
            return b""
        for _ in range(READ_SNAPSHOT_TRIES):
            if of.orphan is not None:
                break
            gen = of.ext_cache.gen
            committed = await self.extents(of, off, end)
            # A flush that committed while we asked has moved its pending extents into
            # the view after our answer came from it: ask again, or they would be missed.
            if gen == of.ext_cache.gen:
                break
        if of.orphan is not None:
            # (Also when the file was freed — renamed over, unlinked — while the view was
            # asked: the view may no longer have its extents, but the snapshot does.)
            committed = of.orphan.overlapping(off, end)
        layers: list[Extent] = list(committed)
        layers += [p.ext for p in of.pending if p.ext.off < end and p.ext.end > off]
        # The dirty bytes are copied now, before any wait: a flush during the block fetches
        # below takes them out of the buffer (into uploads this read does not know).
        dirty: list[tuple[int, bytes]] = []
        for iv in of.dirty.overlapping(off, end):
            start = max(off, iv.off)
            dirty.append((start, iv.slice(start, min(end, iv.end))))
        ranged = not self._sequential(of, off)
        if len(layers) == 1 and not dirty and layers[0].off <= off and layers[0].end >= end:
            # The common case: one block piece covers the whole read; no copying around.
            try:
                out = await self._piece(layers[0], off, end, ranged)
            except EfsishError as e:
                raise FsError(f"read failed: {e}", errno.EIO) from None
        else:
            out = await self._assemble(layers, dirty, off, end, ranged)
        if of.orphan is None and self._nursery is not None:
            await self._readahead(of, off, end)
        of.ra.last_read_end = end
        return out

    async def extents(self, of: OpenFile, off: int, end: int) -> list[Extent]:
        """The committed extents of `of` overlapping [off, end), through its cache."""
        cached = of.ext_cache.get(off, end)
        if cached is not None:
            return cached
        gen, span_end = of.ext_cache.gen, max(end, off + EXTENT_CACHE_SPAN)
        exts = await self.extents_of(of.ino, off, span_end)
        if len(exts) <= EXTENT_CACHE_MAX and gen == of.ext_cache.gen:
            of.ext_cache.span = (off, span_end, exts)  # nothing changed the file meanwhile
        return [e for e in exts if e.off < end and e.end > off]

    async def _assemble(
        self,
        layers: list[Extent],
        dirty: list[tuple[int, bytes]],
        off: int,
        end: int,
        ranged: bool = False,
    ) -> bytes:
        """The bytes [off, end) from block pieces laid over each other in layer order
        (committed, pending oldest to newest), then the dirty bytes (offset, bytes),
        copied before any wait: newer data wins."""
        buf = bytearray(end - off)
        pieces: list[bytes | memoryview | None] = [None] * len(layers)

        async def fetch(i: int, e: Extent) -> None:
            pieces[i] = await self._piece(e, off, end, ranged)

        try:
            async with trio.open_nursery() as n:
                for i, e in enumerate(layers):
                    n.start_soon(fetch, i, e)
        except BaseExceptionGroup as eg:
            raise FsError(f"read failed: {eg.exceptions[0]}", errno.EIO) from None
        for e, piece in zip(layers, pieces, strict=True):
            s0 = max(off, e.off)
            if piece:
                buf[s0 - off : s0 - off + len(piece)] = piece
        for s, data in dirty:
            buf[s - off : s - off + len(data)] = data
        return bytes(buf)

    def _sequential(self, of: OpenFile, off: int) -> bool:
        """Whether a read at `off` continues the file's previous read (or starts at 0).
        The kernel issues its own reads slightly out of order: allow a little slack."""
        if of.ra.last_read_end < 0:
            return off == 0
        slack = min(1024 * 1024, self.block_size)
        return of.ra.last_read_end - slack <= off <= of.ra.last_read_end + slack

    async def _piece(
        self, e: Extent, off: int, end: int, ranged: bool = False
    ) -> bytes | memoryview:
        """The bytes of extent e inside [off, end): a view into the cached block, not a
        copy (pyfuse3 replies from any buffer; a sequential reader would otherwise copy
        every byte once more on the event loop). A `ranged` (random) read of a small part
        of a block that is nowhere here GETs only the chunks that hold it."""
        s, e2 = max(off, e.off), min(end, e.end)
        if e.key is None:
            return (e.data or b"")[s - e.off : e2 - e.off]
        k = e.koff + (s - e.off)
        if ranged and e.crcs and (e2 - s) * 8 <= e.bsize and self.blocks.wants_range(e.key):
            return await self.blocks.fetch_range(e.key, e.crcs, e.bsize, k, k + (e2 - s))
        block = await self.blocks.fetch(e.key, e.hash, e.bsize)
        if k == 0 and e2 - s == len(block):
            return block
        return memoryview(block)[k : k + (e2 - s)]

    async def _readahead(self, of: OpenFile, off: int, end: int) -> None:
        """Adaptive readahead: while a file is read sequentially, keep the next blocks
        downloading; the window starts at `readahead_blocks` blocks, is topped up each
        time the reader frees a block's worth of it, and doubles each time, up to
        `readahead_max_bytes` (bounded further by the verified-block memory budget). A
        random read resets it: fetch only what is asked. The kernel issues its own reads
        slightly out of order, so "sequential" allows a little slack around the previous
        read's end."""
        if of.ra.last_read_end < 0 or not self._sequential(of, off):
            of.ra.window, of.ra.end = 0, 0
            return
        limit = max(self.block_size, min(self.readahead_max_bytes, self.blocks.memory_bytes // 2))
        if of.ra.window == 0:
            of.ra.window = min(limit, self.readahead_blocks * self.block_size)
            of.ra.end = end
        if of.ra.end - end > of.ra.window - self.block_size or of.ra.end >= of.size:
            return  # not a whole block of room in the window yet
        if of.ra.end > end:  # the reader keeps going: grow the window
            of.ra.window = min(limit, of.ra.window * 2)
        start = max(end, of.ra.end)
        stop = min(of.size, end + of.ra.window)
        of.ra.end = stop
        if start >= stop:
            return
        ahead = await self.extents_of(of.ino, start, stop)
        assert self._nursery is not None
        for e in ahead:
            if e.key is not None:
                self.blocks.prefetch(self._nursery, e.key, e.hash, e.bsize)
