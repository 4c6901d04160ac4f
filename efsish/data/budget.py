"""The write budget: how many bytes of unwritten data this mount holds, and the writers'
wait when that is too many.

The budget counts the bytes in every open file's write buffer and in every upload in
flight (inline data waiting for a commit is small and not counted). It is the only owner
of that count: buffers change through it (write, take, truncate, drop) and uploads report their
start and end to it; nothing else adjusts the count. Writers wait while the count is over
the limit (`max_dirty_bytes`), asking the caller to relieve the pressure (start uploads)
each time round. This module must not do I/O or know about files beyond their buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from efsish.data.dirty import Chunk, DirtyBuffer, Interval

RECHECK = 1.0  # seconds a waiting writer sleeps before it relieves the pressure again


class WriteBudget:
    """The count of unwritten bytes (buffers and uploads in flight) and its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._freed = trio.Condition()

    @property
    def held(self) -> int:
        """Bytes in write buffers and uploads in flight."""
        return self._held

    async def wait_for_room(self, relieve: Callable[[], None]) -> None:
        """Return once the count is within the limit; `relieve` starts uploads."""
        while self._held > self.limit:
            relieve()
            async with self._freed:
                with trio.move_on_after(RECHECK):
                    await self._freed.wait()

    def write(self, buf: DirtyBuffer, off: int, data: Chunk) -> None:
        """Write `data` into `buf` at `off`, counting what the buffer grew by."""
        before = buf.nbytes
        buf.write(off, data)
        self._held += buf.nbytes - before

    def take_full_blocks(self, buf: DirtyBuffer, block_size: int) -> list[tuple[int, bytes]]:
        """Cut the whole blocks off `buf` (their bytes leave the buffer: the caller
        uploads them, see `upload_started`)."""
        before = buf.nbytes
        blocks = buf.take_full_blocks(block_size)
        self._held -= before - buf.nbytes
        return blocks

    def take_all(self, buf: DirtyBuffer) -> list[Interval]:
        """Take every interval out of `buf` (see `take_full_blocks`)."""
        before = buf.nbytes
        intervals = buf.take_all()
        self._held -= before - buf.nbytes
        return intervals

    def truncate(self, buf: DirtyBuffer, size: int) -> None:
        """Cut `buf` at file size `size` (ftruncate of a file with unwritten bytes): the
        bytes past it are forgotten, so they leave the count."""
        before = buf.nbytes
        buf.truncate(size)
        self._held -= before - buf.nbytes

    def drop(self, buf: DirtyBuffer) -> None:
        """`buf` goes away with its file (the last close of a file that lives here only)."""
        self._held -= buf.nbytes

    def upload_started(self, nbytes: int) -> None:
        self._held += nbytes

    async def upload_finished(self, nbytes: int) -> None:
        """An upload ended (done or failed): count it out and wake the waiting writers."""
        self._held -= nbytes
        async with self._freed:
            self._freed.notify_all()
