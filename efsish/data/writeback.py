"""Writes and uploads: the path from a FUSE write to uploaded blocks waiting for commit.

A write goes into the file's write buffer (within the write budget). Once an interval of
the buffer holds two blocks, whole blocks are cut off and uploaded in the background;
under memory pressure the largest buffers are uploaded as they are. A flush uploads what
is left (small files stay inline) and waits for every upload of the file; the commit of
the new layout is the caller's (filesystem.py plans it). Background writeback asks the
caller to commit files held open with writes older than `writeback_interval`.

This module owns the uploads in flight (BlockIO runs at most 16 at once; the rest queue)
and the errors they report to the writer. It must not plan or commit log entries, nor
import filesystem.py.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import trio

from efsish.data.blocks import BlockIO
from efsish.data.budget import WriteBudget
from efsish.data.dirty import Interval
from efsish.data.openfile import OpenFile, Pending
from efsish.data.staged import StagedBlocks
from efsish.errors import EfsishError, FsError, StoreError
from efsish.meta.view import Extent

log = logging.getLogger(__name__)

INLINE_MAX = 16 * 1024  # files up to this size keep their data in the log
PRESSURE_FILES = 4  # under pressure, the largest buffers uploaded at once


class Writeback:
    """Write buffers to uploads for the open files of one mount (`files`, shared with
    the facade that opens and closes them)."""

    def __init__(
        self,
        blocks: BlockIO,
        budget: WriteBudget,
        files: Mapping[int, OpenFile],
        block_size: int,
        interval: float,
    ) -> None:
        self.blocks = blocks
        self.budget = budget
        self.files = files
        self.block_size = block_size
        self.interval = interval
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Uploads and background commits run in `nursery` from now on."""
        self._nursery = nursery

    async def write(self, of: OpenFile, off: int, data: bytes) -> None:
        """Buffer `data` at `off`; start uploading whole blocks once there are enough."""
        if of.error is not None:
            err, of.error = of.error, None
            raise FsError(f"earlier background upload failed: {err}", errno.EIO)
        await self.budget.wait_for_room(self._relieve_pressure)
        self.budget.write(of.dirty, off, data)
        of.size = max(of.size, off + len(data))
        of.mtime = time.time_ns()
        if not of.modified:
            of.dirty_since = time.monotonic()
        of.modified = True
        if of.deferred:  # a write after utimens: the write's time wins, as on a local disk
            of.deferred.pop("mtime", None)
            of.deferred.pop("ctime", None)
        if of.orphan is None and of.dirty.nbytes >= 2 * self.block_size:
            for block_off, block in self.budget.take_full_blocks(of.dirty, self.block_size):
                self._start_upload(of, block_off, block)

    def _relieve_pressure(self) -> None:
        """Too much unwritten data: start uploading the largest write buffers as they are
        (partial blocks too); they are committed at the next flush/close of their file."""
        files = sorted(
            (f for f in self.files.values() if f.orphan is None and f.dirty),
            key=lambda f: f.dirty.nbytes,
            reverse=True,
        )
        for of in files[:PRESSURE_FILES]:
            for iv in self.budget.take_all(of.dirty):
                self._upload_interval(of, iv)

    def _upload_interval(self, of: OpenFile, iv: Interval) -> None:
        """Start uploading all of `iv`, cut into blocks (each copied once, if at all)."""
        while len(iv):
            off = iv.off
            self._start_upload(of, off, iv.take_front(min(self.block_size, len(iv))))

    async def _stage_interval(self, of: OpenFile, iv: Interval, staged: StagedBlocks) -> None:
        """Stage all of `iv`, cut into blocks; a block whose file cannot be written is
        uploaded as usual."""
        while len(iv):
            off = iv.off
            data = iv.take_front(min(self.block_size, len(iv)))
            try:
                key, h, crcs = await staged.stage(of.ino, data, self._relieve_pressure)
            except OSError as e:
                log.warning("cannot stage a block of inode %d (%s); uploading it", of.ino, e)
                self._start_upload(of, off, data)
                continue
            p = Pending(Extent(off, len(data), key, 0, len(data), h, crcs=crcs))
            p.done.set()
            of.pending.append(p)

    def _start_upload(self, of: OpenFile, off: int, data: bytes) -> None:
        p = Pending(Extent(off, len(data), data=data))
        of.pending.append(p)
        self._spawn_upload(of, p)

    def _spawn_upload(self, of: OpenFile, p: Pending) -> None:
        self.budget.upload_started(p.ext.len)
        assert self._nursery is not None
        self._nursery.start_soon(self._upload, of, p)

    async def _upload(self, of: OpenFile, p: Pending) -> None:
        data = p.ext.data or b""
        try:
            key, h, crcs = await self.blocks.upload(of.ino, data)
            p.ext = Extent(p.ext.off, len(data), key, 0, len(data), h, crcs=crcs)
        except StoreError as e:
            log.error("upload of a block of inode %d failed: %s", of.ino, e)
            p.failed = True
            of.error = e
        finally:
            p.done.set()
            await self.budget.upload_finished(len(data))

    async def upload_all(self, of: OpenFile, staged: StagedBlocks | None = None) -> None:
        """Upload everything `of` has not uploaded (again, where an upload failed) and
        wait for all its uploads: afterwards `of.pending` holds the extents to commit.
        With `staged` (the file's change will be journaled under a lease), what is left
        in the buffer is staged instead: on local disk, uploaded in the background.
        Raises EIO with the first upload error since the last report. The caller holds
        `of.flush_lock`."""
        for iv in self.budget.take_all(of.dirty):
            if of.size <= INLINE_MAX:
                data = iv.tobytes()
                of.pending.append(Pending(Extent(iv.off, len(data), data=data)))
                of.pending[-1].done.set()
                continue
            if staged is not None:
                await self._stage_interval(of, iv, staged)
                continue
            self._upload_interval(of, iv)
        for p in of.pending:
            if p.failed and p.done.is_set():  # an earlier upload failed: try again
                p.failed, p.done = False, trio.Event()
                self._spawn_upload(of, p)
        for p in list(of.pending):
            await p.done.wait()
        if of.error is not None:
            err, of.error = of.error, None
            raise FsError(f"upload or commit failed: {err}", errno.EIO)

    async def run(self, flush: Callable[[OpenFile], Awaitable[None]]) -> None:
        """Commit the writes of files held open for long: like the kernel's dirty-page
        writeback, data written to a file that stays open (a log, a database) becomes
        durable and visible to other mounts within about `interval` seconds, not only at
        close/fsync. `flush` uploads and commits a file. Errors are logged; the writer
        sees them at its next write/fsync/close."""
        while True:
            await trio.sleep(self.interval / 2)
            now = time.monotonic()
            for of in list(self.files.values()):
                if (
                    of.modified
                    and of.orphan is None
                    and now - of.dirty_since >= self.interval
                    and not of.flush_lock.locked()
                    and self._nursery is not None
                ):
                    self._nursery.start_soon(self._background_flush, flush, of)

    async def _background_flush(
        self, flush: Callable[[OpenFile], Awaitable[None]], of: OpenFile
    ) -> None:
        try:
            await flush(of)
        except Exception as e:
            if not isinstance(e, EfsishError):
                log.exception("background commit of inode %d crashed", of.ino)
            log.warning("background commit of inode %d failed: %s", of.ino, e)
            if of.error is None:
                of.error = e  # reported to the writer by its next write/fsync/close
