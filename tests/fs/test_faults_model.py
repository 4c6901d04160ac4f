"""Random metadata and data operations under injected store faults, checked against a
model after every one.

Mount A works through a FaultyStore; mount B reads the same store without faults. Before
each operation a fault mode is drawn: none; a few failing writes that the retries must
absorb (the operation must then succeed); or an outage of every write, with or without
the write done before its answer is lost (the operation may then fail, with EIO only).
After every operation:

- what B sees (caught up with the log) is the tree before the operation or the tree
  after it, nothing in between and nothing else (atomicity of each change);
- a success means the tree after it;
- A, with the faults off again, sees exactly what B sees (no change lives only on the
  mount that made it, none is lost there).

At the end a fresh mount sees the same tree and fsck is clean. Time runs on trio's
MockClock (jumping whenever every task waits), so the retries' back-off costs nothing;
the lease clock is trio's too, and the mounts poll every 0.5 s so that a holder answers
a recall without waiting for the lease time. It runs on format 2 and on format 3.
A failure names the seed and the last operations; EFSISH_FAULT_SEEDS="1-40" and
EFSISH_FAULT_OPS=400 run more."""

from __future__ import annotations

import copy
import errno
import os
import random
import stat
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from efsish.errors import FsError
from efsish.filesystem import Ctx, Filesystem
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.faulty import FaultPlan
from tests.fs.conftest import FsFactory
from tests.fs.helpers import Flaky, fsck

# Claims every few creates (tests/fs/conftest.py).
pytestmark = pytest.mark.usefixtures("small_inode_ranges")

ROOT = Ctx(0, 0)
KiB = 1024
NAMES = "abcdefgh"  # per directory: small, so that renames often replace and rmdir works
WRITES = frozenset({"put", "put_if_absent", "delete"})

Path_ = tuple[str, ...]
# A tree as seen: path -> ("d", mode) or ("f", mode, content), and the groups of paths
# that are one inode (hard links).
Tree = tuple[dict[Path_, tuple[object, ...]], frozenset[frozenset[Path_]]]


def _seeds() -> list[int]:
    spec = os.environ.get("EFSISH_FAULT_SEEDS", "1-3")
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


OPS_PER_SEED = int(os.environ.get("EFSISH_FAULT_OPS", "150"))


@dataclass
class Model:
    dirs: dict[Path_, int] = field(default_factory=lambda: {(): 0o755})
    names: dict[Path_, int] = field(default_factory=dict)  # file path -> model inode
    data: dict[int, bytearray] = field(default_factory=dict)
    modes: dict[int, int] = field(default_factory=dict)
    next_ino: int = 1

    def tree(self) -> Tree:
        out: dict[Path_, tuple[object, ...]] = {p: ("d", m) for p, m in self.dirs.items()}
        groups: dict[int, set[Path_]] = {}
        for p, i in self.names.items():
            out[p] = ("f", self.modes[i], bytes(self.data[i]))
            groups.setdefault(i, set()).add(p)
        return out, frozenset(frozenset(g) for g in groups.values() if len(g) > 1)

    def children(self, d: Path_) -> list[Path_]:
        return [p for p in [*self.dirs, *self.names] if len(p) == len(d) + 1 and p[:-1] == d]


async def walk(fs: Filesystem) -> Tree:
    """The whole tree as `fs` sees it, read through the filesystem's own calls."""
    await fs.meta.catch_up()
    out: dict[Path_, tuple[object, ...]] = {(): ("d", (await fs.getattr(ROOT_INO)).mode & 0o7777)}
    by_ino: dict[int, set[Path_]] = {}
    todo: list[tuple[Path_, int]] = [((), ROOT_INO)]
    while todo:
        path, ino = todo.pop()
        await fs.opendir(ino)
        for _, name, a in await fs.readdir(ino, 0, 10_000):
            p = (*path, name.decode())
            if a.is_dir:
                out[p] = ("d", a.mode & 0o7777)
                todo.append((p, a.ino))
                continue
            fh, _ = await fs.open(a.ino, os.O_RDONLY)
            try:
                content = bytes(await fs.read(fh, 0, a.size + 1))
            finally:
                await fs.release(fh)
            assert len(content) == a.size, f"{p}: read {len(content)} bytes of {a.size}"
            out[p] = ("f", a.mode & 0o7777, content)
            by_ino.setdefault(a.ino, set()).add(p)
            assert a.nlink == len(by_ino[a.ino]) or len(by_ino[a.ino]) < a.nlink, p
    return out, frozenset(frozenset(g) for g in by_ino.values() if len(g) > 1)


async def resolve(fs: Filesystem, path: Path_) -> int:
    ino = ROOT_INO
    for part in path:
        ino = (await fs.lookup(ino, part.encode())).ino
    return ino


class Run:
    def __init__(self, seed: int, a: Filesystem, b: Filesystem, faulty: Flaky) -> None:
        self.rng = random.Random(seed)
        self.seed, self.a, self.b, self.faulty = seed, a, b, faulty
        self.model = Model()
        self.history: list[str] = []
        self.eio = 0
        self.absorbed = 0

    def fail(self, why: str) -> None:
        last = "\n  ".join(self.history[-20:])
        pytest.fail(f"seed {self.seed}, op {len(self.history)}: {why}\nlast ops:\n  {last}")

    def _free_name(self, d: Path_) -> Path_:
        """A name not in `d` (the caller chose `d` from `_roomy`)."""
        taken = {p[-1] for p in self.model.children(d)}
        return (*d, self.rng.choice([n for n in NAMES if n not in taken]))

    def _roomy(self, dirs: list[Path_]) -> list[Path_]:
        return [d for d in dirs if len(self.model.children(d)) < len(NAMES)]

    def choose(self) -> tuple[str, tuple[object, ...], Model]:
        """An operation valid on the model, and the model as it is after it."""
        m, rng = self.model, self.rng
        after = copy.deepcopy(m)
        files = sorted(m.names)
        dirs = self._roomy(sorted(m.dirs))  # those with a free name
        kinds = ["mknod", "mkdir"] if len(m.names) < 20 else ["unlink"] * 2
        if files:
            kinds += ["write"] * 4 + ["truncate", "rename", "unlink", "link", "chmod"]
        if len(m.dirs) > 1:
            kinds += ["rmdir", "rename_dir"]
        kind = rng.choice(kinds)
        if not dirs or (kind == "mkdir" and () not in dirs):
            kind = "unlink" if files else "rmdir"
        if kind == "mknod":
            p = self._free_name(rng.choice(dirs))
            after.names[p], after.next_ino = m.next_ino, m.next_ino + 1
            after.data[m.next_ino], after.modes[m.next_ino] = bytearray(), 0o644
            return kind, (p,), after
        if kind == "mkdir":
            p = self._free_name(rng.choice([d for d in dirs if len(d) < 2] or [()]))
            after.dirs[p] = 0o755
            return kind, (p,), after
        if kind == "rmdir":
            empty = [d for d in m.dirs if d and not m.children(d)]
            if not empty:
                return self.choose()
            p = rng.choice(empty)
            del after.dirs[p]
            return kind, (p,), after
        if kind == "rename_dir":
            if () not in dirs:
                return self.choose()
            src = rng.choice([d for d in m.dirs if len(d) == 1])
            dst = self._free_name(())
            for p in [*after.dirs]:
                if p[:1] == src:
                    after.dirs[(*dst, *p[1:])] = after.dirs.pop(p)
            for p in [*after.names]:
                if p[:1] == src:
                    after.names[(*dst, *p[1:])] = after.names.pop(p)
            return "rename", (src, dst), after
        p = rng.choice(files)
        ino = m.names[p]
        if kind == "write":
            size = len(m.data[ino])
            off = rng.choice([0, size, 16 * KiB - 1, 64 * KiB - 3, rng.randrange(0, 200 * KiB)])
            n = rng.choice([1, 100, 4 * KiB, 16 * KiB + 1, 64 * KiB, rng.randrange(1, 150 * KiB)])
            data = rng.randbytes(n)
            buf = after.data[ino]
            if len(buf) < off + n:
                buf.extend(bytes(off + n - len(buf)))
            buf[off : off + n] = data
            return kind, (p, off, data), after
        if kind == "truncate":
            size = rng.choice([0, 1, 16 * KiB, 64 * KiB + 5, rng.randrange(0, 200 * KiB)])
            buf = after.data[ino]
            del buf[size:]
            buf.extend(bytes(size - len(buf)))
            return kind, (p, size), after
        if kind == "chmod":
            mode = rng.choice([0o600, 0o640, 0o755, 0o444])
            after.modes[ino] = mode
            return kind, (p, mode), after
        if kind == "unlink":
            del after.names[p]
            return kind, (p,), after
        # rename or link of a file to a free name, or (rename) over another file
        others = [f for f in files if f != p and m.names[f] != ino]
        if kind == "rename" and others and (rng.random() < 0.4 or not dirs):
            dst = rng.choice(others)
        elif not dirs:
            return self.choose()
        else:
            dst = self._free_name(rng.choice(dirs))
        if kind == "link":
            after.names[dst] = ino
        else:
            after.names[dst] = after.names.pop(p)
        return kind, (p, dst), after

    async def do(self, kind: str, args: tuple[object, ...]) -> None:
        a = self.a
        if kind in ("mknod", "mkdir"):
            (p,) = args
            assert isinstance(p, tuple)
            parent = await resolve(a, p[:-1])
            if kind == "mkdir":
                await a.mkdir(parent, p[-1].encode(), 0o755, ROOT)
            else:
                await a.mknod(parent, p[-1].encode(), stat.S_IFREG | 0o644, ROOT)
            return
        p = args[0]
        assert isinstance(p, tuple)
        ino = await resolve(a, p)
        if kind == "write":
            _, off, data = args
            assert isinstance(off, int) and isinstance(data, bytes)
            fh, _ = await a.open(ino, os.O_WRONLY)
            try:
                await a.write(fh, off, data)
                await a.flush(fh)
            finally:
                await a.release(fh)
        elif kind == "truncate":
            size = args[1]
            assert isinstance(size, int)
            await a.setattr(ino, ROOT, size=size)
        elif kind == "chmod":
            mode = args[1]
            assert isinstance(mode, int)
            await a.setattr(ino, ROOT, mode=mode)
        elif kind == "unlink":
            await a.unlink(await resolve(a, p[:-1]), p[-1].encode())
        elif kind == "rmdir":
            await a.rmdir(await resolve(a, p[:-1]), p[-1].encode())
        else:
            dst = args[1]
            assert isinstance(dst, tuple)
            dp = await resolve(a, dst[:-1])
            if kind == "link":
                await a.link(ino, dp, dst[-1].encode())
            else:
                await a.rename(await resolve(a, p[:-1]), p[-1].encode(), dp, dst[-1].encode())

    async def step(self) -> None:
        kind, args, after = self.choose()
        rng, faulty = self.rng, self.faulty
        mode = rng.choices(["none", "flaky", "outage"], [6, 2, 2])[0]
        lost = rng.random() < 0.5
        shown = [a if not isinstance(a, bytes) else f"<{len(a)} bytes>" for a in args]
        self.history.append(f"{kind} {shown} faults={mode}{' lost-answer' if lost else ''}")
        faulty.plan = FaultPlan(ops=WRITES, lost_answer=lost)
        faulty.fail_next = rng.randint(1, 3) if mode == "flaky" else 0
        faulty.outage = mode == "outage"
        error: FsError | None = None
        try:
            await self.do(kind, args)
        except FsError as e:
            error = e
        finally:
            faulty.plan, faulty.fail_next, faulty.outage = FaultPlan(), 0, False
        if error is not None and (mode != "outage" or error.errno != errno.EIO):
            self.fail(f"{kind} failed with {errno.errorcode.get(error.errno)}: {error}")
        if mode == "flaky":
            self.absorbed += 1
        seen = await walk(self.b)
        if seen == after.tree():
            self.model = after
        elif error is not None and seen == self.model.tree():
            pass  # failed and did nothing
        else:
            before = self.model.tree()[0]
            want = after.tree()[0]
            diff = sorted(
                {str(p) for p in {*seen[0], *want} if seen[0].get(p) != want.get(p)}
                | {str(p) for p in {*seen[0], *before} if seen[0].get(p) != before.get(p)}
            )
            self.fail(f"another mount sees neither the tree before nor after; differs at {diff}")
        if error is not None:
            self.eio += 1
        mine = await walk(self.a)
        if mine != seen:
            diff = sorted(str(p) for p in {*mine[0], *seen[0]} if mine[0].get(p) != seen[0].get(p))
            self.fail(f"the faulty mount and another mount disagree at {diff}")


@pytest.fixture(params=[False, True], ids=["format2", "format3"])
def leases(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.002)


@pytest.mark.parametrize("seed", _seeds())
async def test_random_operations_under_store_faults(
    seed: int, clock: trio.testing.MockClock, store: ObjectStore, make_fs: FsFactory
) -> None:
    faulty = Flaky(store)
    a = await make_fs(on=faulty, lease_clock=trio.current_time, poll_interval=0.5)
    b = await make_fs(lease_clock=trio.current_time, poll_interval=0.5)
    run = Run(seed, a, b, faulty)
    for _ in range(OPS_PER_SEED):
        await run.step()
    # Faults must actually have hit: some operations failed, some retries absorbed.
    assert run.eio > 0 and run.absorbed > 0, (run.eio, run.absorbed)
    fresh = await make_fs(lease_clock=trio.current_time, poll_interval=0.5)
    assert await walk(fresh) == run.model.tree()
    code, out = await fsck(store)
    assert code == 0, out
