"""Staged blocks (docs/design/LEASES.md §5, §6.3): the data of files closed under a
lease, written to `staged/` in the cache dir and uploaded in the background.

A flush of a file in a domain this mount holds stages its blocks instead of uploading
them: each block gets its key (which names the client), its checksums, and a file in
`staged/`, and the `w` op that references it is journaled at once. Uploads run in the
background, at most `concurrency` at a time; a block that fails to upload is tried
again (the bytes are safe on disk). Staged bytes count in the write budget until
uploaded, so writers wait when uploads fall behind. The lease code waits for the
uploads before any entry that may reference them is PUT (`wait_all`), and deletes the
files once a flush after their upload has landed (`landed`). Until then reads of a
staged block come from its file (BlockIO.local). After a crash, `recover` checks each
staged block the journal references against its checksum and uploads it before the
journal is flushed; a block that fails is reported, never uploaded.

Disk I/O runs in worker threads; files are never opened through a symlink. This module
must not plan or commit log entries.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from efsish.codec import block_matches
from efsish.data.blocks import BlockIO
from efsish.data.budget import WriteBudget
from efsish.errors import NotFound, StoreError

log = logging.getLogger(__name__)

RETRY_FIRST = 0.5  # seconds before a failed upload is tried again (doubling)
RETRY_MAX = 30.0


def _name(key: str) -> str:
    return key.replace("/", "_")


class StagedBlocks:
    """The staged blocks of one mount: see the module docstring."""

    def __init__(
        self, root: Path, blocks: BlockIO, budget: WriteBudget, concurrency: int = 8
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.blocks = blocks
        self.budget = budget
        self._uploading: dict[str, trio.Event] = {}  # staged, not uploaded yet
        self._uploaded: set[str] = set()  # uploaded; the file stays until a flush lands
        self._limiter = trio.CapacityLimiter(concurrency)
        self._disk = trio.CapacityLimiter(4)
        self._nursery: trio.Nursery | None = None
        self.staged_count = 0
        self.upload_retries = 0
        blocks.local = self

    def start(self, nursery: trio.Nursery) -> None:
        """Uploads run in `nursery` from now on."""
        self._nursery = nursery

    def __contains__(self, key: str) -> bool:
        return key in self._uploading or key in self._uploaded

    @property
    def pending(self) -> int:
        """Blocks staged and not uploaded yet."""
        return len(self._uploading)

    def not_uploaded(self, keys: Iterable[str]) -> list[str]:
        """Those of `keys` that are staged and not uploaded yet."""
        return [k for k in keys if k in self._uploading]

    # ------------------------------------------------------------------ disk

    def _write(self, key: str, data: bytes) -> None:
        path = self.root / _name(key)
        tmp = self.root / f"{_name(key)}.{threading.get_ident()}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _read(self, key: str) -> bytes | None:
        try:
            fd = os.open(self.root / _name(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            return f.read()

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    async def read(self, key: str) -> bytes | None:
        """The bytes of staged block `key` (None if its file is gone)."""
        return await trio.to_thread.run_sync(self._read, key, limiter=self._disk)

    # ---------------------------------------------------------------- staging

    async def stage(
        self, ino: int, data: bytes, relieve: Callable[[], None] = lambda: None
    ) -> tuple[str, str, str | None]:
        """Stage `data` as a new block of inode `ino` and start its upload; return
        (key, hash, chunk checksums) as BlockIO.upload does. Waits while the write
        budget is over its limit (`relieve` starts uploads). OSError: the file could
        not be written (the caller uploads the block itself)."""
        await self.budget.wait_for_room(relieve)
        key = self.blocks.new_key(ino)
        h, crcs = await self.blocks.checksums(data)
        await trio.to_thread.run_sync(self._write, key, data, limiter=self._disk)
        self.budget.upload_started(len(data))
        self._uploading[key] = trio.Event()
        self.blocks.remember(key, data)
        self.staged_count += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._upload, key, data)
        return key, h, crcs

    async def _upload(self, key: str, data: bytes) -> None:
        delay = RETRY_FIRST
        try:
            while True:
                try:
                    async with self._limiter:
                        await self.blocks.put_block(key, data)
                    break
                except (StoreError, OSError) as e:  # (OSError: a file:// store)
                    self.upload_retries += 1
                    log.warning("upload of staged block %s failed (%s); trying again", key, e)
                    await trio.sleep(delay)
                    delay = min(RETRY_MAX, 2 * delay)
            self._uploaded.add(key)
            self._uploading.pop(key).set()
        finally:
            await self.budget.upload_finished(len(data))

    async def wait_all(self) -> None:
        """Return once every block staged before this call is uploaded."""
        for ev in list(self._uploading.values()):
            await ev.wait()

    def uploaded(self) -> set[str]:
        """The uploaded blocks whose files are still kept (a snapshot)."""
        return set(self._uploaded)

    async def landed(self, keys: set[str]) -> None:
        """A flush that began after `keys` were uploaded has landed: every journaled
        change that referenced them is in the log. Their files go."""
        keys &= self._uploaded
        if not keys:
            return
        self._uploaded -= keys
        names = [_name(k) for k in keys]
        try:
            await trio.to_thread.run_sync(self._unlink, names, limiter=self._disk)
        except OSError as e:
            log.warning("cannot delete staged blocks: %s", e)

    # ---------------------------------------------------------------- restart

    async def recover(self, refs: Iterable[tuple[str, str | None]]) -> set[str]:
        """After a restart, before the journal is flushed: every block the journal
        references (key, hash) that is staged here is checked against its hash and
        uploaded; one that is not staged must be in the store. Returns the keys that
        failed (corrupt, or nowhere): those are never uploaded, and their files are kept
        as `<name>.corrupt`. Every other staged file is deleted."""
        want = dict(refs)
        bad: set[str] = set()
        limiter = trio.CapacityLimiter(16)

        async def one(key: str, hash_: str | None) -> None:
            async with limiter:
                data = await self.read(key)
                if data is None:
                    try:
                        await self.blocks.store.head(key)
                    except NotFound:
                        log.error("block %s of the journal is neither staged nor stored", key)
                        bad.add(key)
                    return
                if hash_ is not None and not block_matches(data, hash_):
                    log.error("staged block %s failed its checksum: not uploaded", key)
                    bad.add(key)
                    return
                await self.blocks.put_block(key, data)

        async with trio.open_nursery() as n:
            for key, hash_ in want.items():
                n.start_soon(one, key, hash_)

        def tidy() -> None:
            bad_names = {_name(k) for k in bad}
            for entry in os.scandir(self.root):
                if not entry.is_file(follow_symlinks=False) or entry.name.endswith(".corrupt"):
                    continue
                path = self.root / entry.name
                if entry.name in bad_names:
                    os.replace(path, self.root / f"{entry.name}.corrupt")
                else:
                    path.unlink(missing_ok=True)

        await trio.to_thread.run_sync(tidy, limiter=self._disk)
        return bad
