"""The pieces of the multi-mount model test (tests/fs/test_model_mounts.py): a model of
an efsish tree, the tree as a mount shows it, and in-process mounts that can be paused
(their store hangs), faulted, killed and remounted.

The model is a pure function of the atomic changes applied to it (`Model.apply`), so a
history can be replayed with some changes left out (what the lease mode may lose with a
cache dir). A `Tree` is what can be compared: path -> entry, plus the groups of paths
that are one inode."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from efsish.errors import FsError
from efsish.filesystem import Filesystem, Options
from efsish.meta.superblock import Superblock
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.base import ObjectInfo
from efsish.store.faulty import FaultPlan
from tests.fs.helpers import ROOT, Flaky

RECOVERY_DIR = b".efsish-recovered"
WRITES = frozenset({"put", "put_if_absent", "delete"})

Path_ = tuple[str, ...]
# An atomic change, one committing call: (kind, *args); see Model.apply.
Step = tuple[object, ...]
Entry = tuple[object, ...]
Tree = tuple[dict[Path_, Entry], frozenset[frozenset[Path_]]]


class ModelError(Exception):
    """A step that is not valid on the model (a bug in the test's choice of steps)."""


@dataclass
class Inode:
    kind: str  # "d" or "f"
    mode: int
    data: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Model:
    inodes: dict[int, Inode]
    names: dict[Path_, int]  # every path, the root () included -> model inode
    next_ino: int = 1

    @classmethod
    def empty(cls, root_mode: int = 0o755) -> Model:
        return cls({0: Inode("d", root_mode)}, {(): 0})

    def copy(self) -> Model:
        inodes = {i: replace(n, xattrs=dict(n.xattrs)) for i, n in self.inodes.items()}
        return Model(inodes, dict(self.names), self.next_ino)

    # ------------------------------------------------------------------ queries

    def inode(self, p: Path_) -> Inode:
        return self.inodes[self.names[p]]

    def is_dir(self, p: Path_) -> bool:
        return p in self.names and self.inode(p).kind == "d"

    def is_file(self, p: Path_) -> bool:
        return p in self.names and self.inode(p).kind == "f"

    def children(self, d: Path_) -> list[Path_]:
        return [p for p in self.names if len(p) == len(d) + 1 and p[: len(d)] == d]

    def under(self, d: Path_) -> list[Path_]:
        """`d` and everything below it."""
        return [p for p in self.names if p[: len(d)] == d]

    def paths_of(self, ino: int) -> list[Path_]:
        return [p for p, i in self.names.items() if i == ino]

    def nlink(self, p: Path_) -> int:
        if self.is_dir(p):
            return 2 + sum(1 for c in self.children(p) if self.is_dir(c))
        return len(self.paths_of(self.names[p]))

    def entry(self, p: Path_) -> Entry | None:
        """What a lookup of `p` must show (None: ENOENT)."""
        if p not in self.names:
            return None
        n = self.inode(p)
        xattrs = tuple(sorted(n.xattrs.items()))
        if n.kind == "d":
            return ("d", n.mode, self.nlink(p), xattrs)
        return ("f", n.mode, self.nlink(p), n.data, xattrs)

    def tree(self) -> Tree:
        out: dict[Path_, Entry] = {}
        groups: dict[int, set[Path_]] = {}
        for p, i in self.names.items():
            e = self.entry(p)
            assert e is not None
            out[p] = e
            if self.inodes[i].kind == "f":
                groups.setdefault(i, set()).add(p)
        return out, frozenset(frozenset(g) for g in groups.values() if len(g) > 1)

    # ------------------------------------------------------------------ changes

    def _need(self, cond: bool, step: Step) -> None:
        if not cond:
            raise ModelError(f"not valid on the model: {show(step)}")

    def apply(self, step: Step) -> None:
        kind, p = step[0], step[1]
        assert isinstance(p, tuple)
        if kind in ("mknod", "mkdir"):
            mode = step[2]
            assert isinstance(mode, int)
            self._need(p not in self.names and self.is_dir(p[:-1]), step)
            self.inodes[self.next_ino] = Inode("f" if kind == "mknod" else "d", mode)
            self.names[p] = self.next_ino
            self.next_ino += 1
        elif kind == "write":
            off, data = step[2], step[3]
            assert isinstance(off, int) and isinstance(data, bytes)
            self._need(self.is_file(p), step)
            n = self.inode(p)
            old = n.data.ljust(off, b"\0")
            n.data = old[:off] + data + old[off + len(data) :]
        elif kind == "truncate":
            size = step[2]
            assert isinstance(size, int)
            self._need(self.is_file(p), step)
            n = self.inode(p)
            n.data = n.data[:size].ljust(size, b"\0")
        elif kind == "chmod":
            mode = step[2]
            assert isinstance(mode, int)
            self._need(p in self.names, step)
            self.inode(p).mode = mode
        elif kind == "setxattr":
            name, value = step[2], step[3]
            assert isinstance(name, bytes) and isinstance(value, bytes)
            self._need(p in self.names, step)
            self.inode(p).xattrs[name] = value
        elif kind == "unlink":
            self._need(self.is_file(p), step)
            self._drop(p)
        elif kind == "rmdir":
            self._need(self.is_dir(p) and p != () and not self.children(p), step)
            self._drop(p)
        elif kind == "link":
            dst = step[2]
            assert isinstance(dst, tuple)
            self._need(self.is_file(p) and dst not in self.names and self.is_dir(dst[:-1]), step)
            self.names[dst] = self.names[p]
        elif kind == "rename":
            dst = step[2]
            assert isinstance(dst, tuple)
            self._need(p in self.names and p != () and self.is_dir(dst[:-1]), step)
            self._need(dst[: len(p)] != p, step)  # not into itself
            if dst in self.names:
                self._need(self.is_file(p) and self.is_file(dst), step)
                self._drop(dst)
            for q in self.under(p):
                self.names[dst + q[len(p) :]] = self.names.pop(q)
        else:
            raise ModelError(f"unknown step {show(step)}")

    def _drop(self, p: Path_) -> None:
        ino = self.names.pop(p)
        if ino not in self.names.values():
            del self.inodes[ino]


def replay(root_mode: int, steps: Sequence[Step]) -> Model:
    m = Model.empty(root_mode)
    for s in steps:
        m.apply(s)
    return m


# ---------------------------------------------------------------------- showing


def show_value(v: object) -> str:
    if isinstance(v, bytes) and len(v) > 16:
        return f"<{len(v)} bytes {hashlib.sha1(v).hexdigest()[:8]}>"
    if isinstance(v, tuple) and v and all(isinstance(x, str) for x in v):
        return "/" + "/".join(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(show_value(x) for x in v) + ")"
    if isinstance(v, int) and v > 7 and v < 0o10000:
        return oct(v)
    return repr(v)


def show_path(p: Path_) -> str:
    return "/" + "/".join(p)


def show(step: Step) -> str:
    return f"{step[0]} " + " ".join(show_value(a) for a in step[1:])


def first_difference(seen: Tree, want: Tree) -> str:
    """The first path (in sorted order) where two trees differ, both sides shown."""
    for p in sorted({*seen[0], *want[0]}):
        a, b = seen[0].get(p), want[0].get(p)
        if a != b:
            sa = "absent" if a is None else show_value(a)
            sb = "absent" if b is None else show_value(b)
            return f"{show_path(p)}: seen {sa}, expected {sb}"
    if seen[1] != want[1]:
        only = sorted(str(sorted(show_path(p) for p in g)) for g in seen[1] ^ want[1])
        return f"hard-link groups differ: {only}"
    return "no difference"


# ---------------------------------------------------------------- reading a mount


async def entry_of(
    fs: Filesystem, ino: int, is_dir: bool, mode: int, nlink: int, fresh: bool = False
) -> Entry:
    """`ino`'s entry; `mode` and `nlink` as a lookup or readdir returned them, or as
    `dir_attr` did (`fresh`: used as they are)."""
    if is_dir and not fresh:
        mode, nlink = await dir_attr(fs, ino, mode, nlink)
    names = await fs.listxattr(ino, ROOT)
    xattrs = tuple(sorted([(n, await fs.getxattr(ino, n)) for n in names]))
    if is_dir:
        return ("d", mode & 0o7777, nlink, xattrs)
    fh, _ = await fs.open(ino, os.O_RDONLY)
    try:
        attr = await fs.getattr(ino)
        content = bytes(await fs.read(fh, 0, attr.size + 1))
    finally:
        await fs.release(fh)
    if len(content) != attr.size:
        raise AssertionError(f"inode {ino}: read {len(content)} bytes of {attr.size}")
    return ("f", mode & 0o7777, nlink, content, xattrs)


async def dir_attr(fs: Filesystem, ino: int, mode: int, nlink: int) -> tuple[int, int]:
    """A directory's mode and nlink. Under leases a domain root's attributes as a
    lookup or readdir of the top returns them may be up to a commit interval old
    (LEASES.md §3, as an NFS attribute cache): a stat() (getattr, a read of its
    domain) is fresh."""
    if fs.leases is None:
        return mode, nlink
    a = await fs.getattr(ino)
    return a.mode, a.nlink


async def walk(fs: Filesystem) -> Tree:
    """The whole tree as `fs` shows it, through its own calls only (opendir and open
    catch up with the log, as a process's opendir/open do)."""
    # The lease mode's recovery directory (LEASES.md §10) is not part of the model, but
    # as a subdirectory of the root it is one of the root's links (2 + subdirectories):
    # the root's entry leaves it out, nlink too. A recovery may create it while we look
    # (read the root until its nlink holds still, by the read entry_of would use).
    for _ in range(10):
        root = await fs.lookup(ROOT_INO, b".")
        mode, nlink = await dir_attr(fs, ROOT_INO, root.mode, root.nlink)
        listing = await fs.readdir(ROOT_INO, 0, 10_000)
        again = await fs.lookup(ROOT_INO, b".")
        if (await dir_attr(fs, ROOT_INO, again.mode, again.nlink))[1] == nlink:
            break
    nlink -= sum(1 for _, n, _ in listing if n == RECOVERY_DIR)
    out: dict[Path_, Entry] = {(): await entry_of(fs, ROOT_INO, True, mode, nlink, fresh=True)}
    by_ino: dict[int, set[Path_]] = {}
    todo: list[tuple[Path_, int]] = [((), ROOT_INO)]
    while todo:
        path, ino = todo.pop()
        await fs.opendir(ino)
        for _, name, a in await fs.readdir(ino, 0, 10_000):
            if not path and name == RECOVERY_DIR:
                continue
            p = (*path, name.decode())
            out[p] = await entry_of(fs, a.ino, a.is_dir, a.mode, a.nlink)
            if a.is_dir:
                todo.append((p, a.ino))
            else:
                by_ino.setdefault(a.ino, set()).add(p)
    return out, frozenset(frozenset(g) for g in by_ino.values() if len(g) > 1)


async def look(fs: Filesystem, p: Path_) -> Entry | None:
    """What `fs` shows for `p`, found by a chain of lookups from the root (each one
    catches up with the log: close-to-open for names); None when it does not exist."""
    ino = ROOT_INO
    attr = await fs.lookup(ROOT_INO, b".")
    for part in p:
        try:
            attr = await fs.lookup(ino, part.encode())
        except FsError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        ino = attr.ino
    return await entry_of(fs, ino, attr.is_dir, attr.mode, attr.nlink)


async def resolve(fs: Filesystem, p: Path_) -> int:
    ino = ROOT_INO
    for part in p:
        ino = (await fs.lookup(ino, part.encode())).ino
    return ino


# ------------------------------------------------------------------ mounts


class MountStore(Flaky):
    """One mount's way to the shared store. Faults (for the planned write operations):
    the next `fail_next` calls fail, or all of them while `outage` is set, the write done
    first when `plan.lost_answer`. A pause (`hang`) holds every call until `resume()`:
    "request" before the call reaches the store, "answer" after the store did it."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner, FaultPlan())
        self.fail_next = 0
        self.outage = False
        self.hang: str | None = None
        self._resumed = trio.Event()

    def faults(self, fail_next: int = 0, outage: bool = False, lost: bool = False) -> None:
        self.plan = FaultPlan(ops=WRITES, lost_answer=lost)
        self.fail_next, self.outage = fail_next, outage

    def pause(self, where: str) -> None:
        self.hang, self._resumed = where, trio.Event()

    def resume(self) -> None:
        self.hang = None
        self._resumed.set()

    async def _gate(self, where: str) -> None:
        while self.hang == where:
            await self._resumed.wait()

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        await self._gate("request")
        out = await super().get(key, start, end)
        await self._gate("answer")
        return out

    async def head(self, key: str) -> ObjectInfo:
        await self._gate("request")
        out = await super().head(key)
        await self._gate("answer")
        return out

    async def _write(self, op: str, key: str, do: Callable[[], Awaitable[None]]) -> None:
        await self._gate("request")
        await super()._write(op, key, do)
        await self._gate("answer")


@dataclass
class Mount:
    """One running mount: its Filesystem, its tasks' cancel scope and nursery."""

    index: int
    store: MountStore
    cache_dir: Path
    fs: Filesystem
    scope: trio.CancelScope
    nursery: trio.Nursery
    stopped: trio.Event
    generation: int = 0


class Mounts:
    """Starts mounts of one filesystem in the test's nursery, kills and remounts them."""

    def __init__(
        self,
        nursery: trio.Nursery,
        store: ObjectStore,
        sb: Superblock,
        tmp: Path,
        commit_interval: float = 1.0,
    ):
        self.nursery, self.store, self.sb, self.tmp = nursery, store, sb, tmp
        self.commit_interval = commit_interval
        self.started = 0

    async def start(self, index: int, cache_dir: Path | None = None, gen: int = 0) -> Mount:
        self.started += 1
        cache_dir = cache_dir or self.tmp / f"cache{index}.{self.started}"
        mstore = MountStore(self.store)
        opts = Options(cache_dir=cache_dir, poll_interval=3600)
        if self.sb.leases:
            # A holder sees recalls by its poll; the lease clock is trio's (mock) clock;
            # the cache dir is this process's, so a remount may adopt at once.
            opts = Options(
                cache_dir=cache_dir,
                poll_interval=1.0,
                commit_interval=self.commit_interval,
                cache_locked=True,
                lease_clock=trio.current_time,
            )
        fs = Filesystem(mstore, self.sb, opts)
        stopped = trio.Event()

        async def serve(
            task_status: trio.TaskStatus[tuple[trio.CancelScope, trio.Nursery]],
        ) -> None:
            try:
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as n:
                        await fs.start(n)
                        task_status.started((scope, n))
                        await trio.sleep_forever()
            finally:
                stopped.set()

        scope, n = await self.nursery.start(serve)
        return Mount(index, mstore, cache_dir, fs, scope, n, stopped, gen)

    async def kill(self, m: Mount, lose_cache: bool) -> Mount:
        """kill -9: the mount's tasks are cancelled where they are (no shutdown, no
        flush; its SQLite connections are closed as the process's exit would), then it
        is mounted again on the same cache dir, or on a new one when `lose_cache`."""
        m.scope.cancel()
        await m.stopped.wait()
        m.fs.meta.writer.close()
        m.fs.meta.reader.close()
        cache_dir: Path | None = m.cache_dir
        if lose_cache:
            await trio.to_thread.run_sync(shutil.rmtree, m.cache_dir, True)
            cache_dir = None
        return await self.start(m.index, cache_dir, m.generation + 1)

    async def stop(self, m: Mount) -> None:
        """A clean unmount."""
        await m.fs.shutdown()
        await m.fs.meta.aclose()
        m.scope.cancel()
        await m.stopped.wait()
