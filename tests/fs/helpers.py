"""Helpers shared by the in-process tests (tests/fs): small file I/O through the
Filesystem facade, a mount that can be restarted on its cache dir, and fsck."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from efsish.errors import StoreError, TransientStoreError
from efsish.filesystem import Ctx, Filesystem, Options
from efsish.fsck import run_fsck
from efsish.meta.superblock import Superblock
from efsish.store import ObjectStore
from efsish.store.faulty import FaultyStore

ROOT = Ctx(0, 0)
BS = 64 * 1024  # the block size of the fs fixtures


async def write_file(fs: Filesystem, parent: int, name: bytes, data: bytes) -> int:
    fh, attr = await fs.create(parent, name, 0o644, os.O_WRONLY, ROOT)
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)
    return attr.ino


async def read_file(fs: Filesystem, ino: int) -> bytes:
    fh, _ = await fs.open(ino, os.O_RDONLY)
    try:
        size = (await fs.getattr(ino)).size
        return bytes(await fs.read(fh, 0, size + 10))
    finally:
        await fs.release(fh)


async def read_sequentially(fs: Filesystem, ino: int, chunk: int = 16 * 1024) -> bytes:
    fh, _ = await fs.open(ino, os.O_RDONLY)
    out = bytearray()
    try:
        while True:
            piece = await fs.read(fh, len(out), chunk)
            if not piece:
                return bytes(out)
            out += piece
    finally:
        await fs.release(fh)


@asynccontextmanager
async def mounted(
    store: ObjectStore, sb: Superblock, cache_dir: Path, **opts: object
) -> AsyncIterator[Filesystem]:
    """A Filesystem that is shut down and stopped (its tasks cancelled) on exit, so the
    next one can reuse its cache directory: a restart of the mount."""
    async with trio.open_nursery() as n:
        fs = Filesystem(store, sb, Options(cache_dir=cache_dir, poll_interval=3600, **opts))  # type: ignore[arg-type]
        await fs.start(n)
        try:
            yield fs
        finally:
            await fs.shutdown()
            await fs.meta.aclose()
            n.cancel_scope.cancel()


async def fsck(store: ObjectStore) -> tuple[int, str]:
    out = io.StringIO()
    code = await run_fsck(store, progress=False, out=out)
    return code, out.getvalue()


class Flaky(FaultyStore):
    """Fails the next `fail_next` calls of the planned operations, or all of them while
    `outage` is set; `plan.lost_answer` decides whether a failing write is done first."""

    fail_next = 0
    outage = False

    async def _fault(self, op: str, key: str) -> StoreError | None:
        await super()._fault(op, key)  # counts the call
        if self.plan.ops and op not in self.plan.ops:
            return None
        if self.outage:
            return TransientStoreError(f"injected outage: {op} {key}")
        if self.fail_next > 0:
            self.fail_next -= 1
            return TransientStoreError(f"injected fault: {op} {key}")
        return None
