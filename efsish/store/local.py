"""A local-directory ObjectStore (`file:///ABS/PATH`): the embedded default store.

Lets people try efsish without any S3 server, and lets several mounts on one host share a
filesystem. Writes are atomic (temp file + fsync + rename); put_if_absent uses link(2),
which fails if the name exists, so it is atomic across processes on the same host.

Layout: every key component but the last becomes a directory named COMPONENT.d, the last
a file named COMPONENT.o, so "a" and "a/b" can coexist as in S3. Temp files live in tmp/.
This module must not be used over NFS or other filesystems without atomic link().
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from efsish.errors import NotFound, PreconditionFailed, StoreConfigError
from efsish.store.base import ObjectInfo, ObjectStore, check_key, clip_range, range_past_end

DIR_SUFFIX = ".d"
OBJ_SUFFIX = ".o"
LIST_PAGE = 1000
MARKER = "efsish-local-store"
T = TypeVar("T")


class LocalStore(ObjectStore):
    """Objects as files under a root directory. See the module docstring."""

    def __init__(self, root: str | Path, *, create: bool = False, concurrency: int = 16) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        if not self.root.is_absolute():
            raise StoreConfigError(f"file:// store path must be absolute, got {root!s}")
        self._objroot = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._create = create
        self._limiter = trio.CapacityLimiter(concurrency)

    # ------------------------------------------------------------------ helpers (sync)

    def _path(self, key: str) -> Path:
        parts = check_key(key).split("/")
        return self._objroot.joinpath(*(p + DIR_SUFFIX for p in parts[:-1]), parts[-1] + OBJ_SUFFIX)

    def _ensure_dirs(self) -> None:
        if not self.root.exists():
            if not self._create:
                raise StoreConfigError(
                    f"{self.root} does not exist: run `efsish format {self.url}` first"
                )
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise StoreConfigError(f"{self.root} is not a directory")
        if self._create and not (self.root / MARKER).exists():
            self._refuse_foreign_content()
        self._objroot.mkdir(exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        marker = self.root / MARKER
        if not marker.exists():
            marker.write_text("This directory is an efsish object store. Do not edit.\n")

    def _refuse_foreign_content(self) -> None:
        """A new store goes only into an empty directory: one that holds anything else
        (another store below it, say) is the file:// form of a non-empty prefix."""
        with os.scandir(self.root) as it:
            found = sorted(e.name for e in it if e.name not in ("objects", "tmp", MARKER))
        if not found:
            return
        for name in found:
            if (self.root / name / MARKER).exists():
                raise StoreConfigError(
                    f"{self.root} encloses the efsish store file://{self.root / name}: "
                    "stores must not nest; choose a new or empty directory"
                )
        raise StoreConfigError(
            f"{self.root} is not empty (found {found[0]!r}) and is not an efsish store: "
            "choose a new or empty directory"
        )

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_get(self, key: str, start: int | None, end: int | None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if range_past_end(size, start):
                    raise NotFound(f"{key}: range starts at {start}, object has {size} bytes")
                s, e = clip_range(size, start, end)
                f.seek(s)
                return f.read(e - s)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None

    def _sync_put(self, key: str, data: bytes, exclusive: bool) -> None:
        path = self._path(key)
        self._ensure_dirs()
        tmp = self._write_tmp(data)
        try:
            for _ in range(5):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    if exclusive:
                        os.link(tmp, path)
                    else:
                        os.replace(tmp, path)
                    break
                except FileNotFoundError:
                    continue  # parent removed concurrently: recreate and retry
                except FileExistsError:
                    if self._sync_get(key, None, None) == data:
                        return  # idempotent: we (or a retry of ours) already wrote it
                    raise PreconditionFailed(key) from None
            self._fsync_dir(path.parent)
        finally:
            if exclusive:
                tmp.unlink(missing_ok=True)

    def _sync_head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def _sync_delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass

    def _walk(self, directory: Path, keyprefix: str, after: bytes | None) -> Iterator[ObjectInfo]:
        """Yield objects under directory in UTF-8 key order, skipping keys <= after."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        items: list[tuple[bytes, str, os.DirEntry[str], bool]] = []
        for ent in entries:
            if ent.name.endswith(DIR_SUFFIX) and ent.is_dir():
                comp = ent.name[: -len(DIR_SUFFIX)]
                items.append(((keyprefix + comp + "/").encode(), comp, ent, True))
            elif ent.name.endswith(OBJ_SUFFIX):
                comp = ent.name[: -len(OBJ_SUFFIX)]
                items.append(((keyprefix + comp).encode(), comp, ent, False))
        items.sort(key=lambda t: t[0])
        for sortkey, comp, ent, is_dir in items:
            if is_dir:
                # Every key below starts with sortkey: skip the subtree if all are <= after.
                if after is not None and sortkey < after and not after.startswith(sortkey):
                    continue
                yield from self._walk(Path(ent.path), keyprefix + comp + "/", after)
            elif after is None or sortkey > after:
                try:
                    size = ent.stat().st_size
                except FileNotFoundError:
                    continue
                yield ObjectInfo(keyprefix + comp, size)

    def _iter_keys(self, prefix: str, after: str | None) -> Iterator[ObjectInfo]:
        dirpart, _, _ = prefix.rpartition("/")
        start = self._objroot
        keyprefix = ""
        if dirpart:
            start = self._objroot.joinpath(*(c + DIR_SUFFIX for c in dirpart.split("/")))
            keyprefix = dirpart + "/"
        after_b = after.encode() if after is not None else None
        for info in self._walk(start, keyprefix, after_b):
            if info.key.startswith(prefix):
                yield info

    def _sync_check(self) -> None:
        self._ensure_dirs()
        if not os.access(self.root, os.W_OK):
            raise StoreConfigError(
                f"{self.root} is not writable by this user; mount read-only with `-o ro`"
            )

    # --------------------------------------------------------------------- async API

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        data: bytes = await self._run(self._sync_get, key, start, end)
        return data

    async def put(self, key: str, data: bytes) -> None:
        await self._run(self._sync_put, key, bytes(data), False)

    async def put_if_absent(self, key: str, data: bytes) -> None:
        await self._run(self._sync_put, key, bytes(data), True)

    async def head(self, key: str) -> ObjectInfo:
        info: ObjectInfo = await self._run(self._sync_head, key)
        return info

    async def delete(self, key: str) -> None:
        await self._run(self._sync_delete, key)

    async def list(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        it = self._iter_keys(prefix, start_after)
        while True:
            page: list[ObjectInfo] = await self._run(lambda: list(itertools.islice(it, LIST_PAGE)))
            for info in page:
                yield info
            if len(page) < LIST_PAGE:
                return

    def enclosing(self) -> Sequence[ObjectStore]:
        # head() on these only stats a path (DIR/objects/KEY.o).
        return [LocalStore(p, concurrency=1) for p in Path(os.path.normpath(self.root)).parents]

    async def check(self) -> None:
        await self._run(self._sync_check)
