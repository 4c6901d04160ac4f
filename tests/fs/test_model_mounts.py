"""Three mounts of one filesystem driven through random changes, store faults, pauses and
kill -9, checked against a model at every step (the model test of issue 20).

The mounts run in this trio process on one memory store, each through its own
MountStore (tests/fs/model.py). The tree has /m0, /m1, /m2, each mount's own subtree (as
/home users), and /shared, which all of them change. A step is one of:

- an operation by one mount, in its own subtree, in /shared or across the two: create
  (O_EXCL, with data), mkdir, write+close, append, truncate, rename (replacing a file, or
  with RENAME_NOREPLACE), link, unlink, rmdir, chmod, setxattr, write+fsync, a read, and
  O_EXCL create or RENAME_NOREPLACE onto an existing name (EEXIST). Store faults are
  drawn for it: none; a few failed writes, which the retries must absorb; or an outage
  of every write, with or without the write done before its answer is lost, when the
  call may fail, with EIO only;
- a race: two or three mounts create (O_EXCL), mkdir, link or RENAME_NOREPLACE one name
  in /shared at the same moment (some of them through a flaky store);
- a pause: a mount's store hangs, before the requests reach it or after it did them and
  before their answers, often with an operation of that mount in flight (in its own
  subtree); the others go on; later it resumes, or is killed;
- kill -9 of a mount: its tasks are cancelled where they are, no shutdown or flush; it
  is mounted again on the same cache dir, or on a new one (the cache dir lost).

What must hold:

1. close-to-open: once a change returned on one mount, lookups from the root, open and
   read on every mount show it (type, mode, size, bytes, xattrs, link count), for each
   name it touched; every few steps a whole tree (opendir/readdir/open) is compared;
2. one winner: of the racers exactly one succeeds, the others get EEXIST;
3. fsync: a change an fsync returned for survives a kill with the cache dir lost;
4. nothing answered is lost: after a kill -9 and a remount, every change whose call
   returned is there. Today every change is in the bucket's log before its call returns,
   so this holds with the cache dir lost as well. LEASE_LOSS switches on the lease
   mode's weaker rule: with the cache dir lost, the killed mount's latest changes that
   no fsync covered, from about the last commit interval, may be missing (those only);
5. a call that failed, or that a kill cut short, happened entirely or not at all (each
   call of an operation made of several: create, then write);
6. at the end all mounts, and a fresh one, show the model's tree, and fsck is clean.

Outcomes the model cannot know at once (a failed call, a call in flight on a paused
mount, one cut by a kill) are "doubts": the next tree read decides them, and must be one
of their possible outcomes. A paused mount's call only touches its own subtree and
inodes no other name refers to, so it commutes with everything the others do meanwhile.

Time runs on trio's MockClock (jumping whenever every task waits). A failure names the
seed, the step and its operation, the first difference, and the last steps. Replay with
EFSISH_MODEL_SEEDS=7 (or a range, 1-30) and EFSISH_MODEL_OPS=300: the same operations
come again as long as what depends on thread timing (which racer wins, how far a call
got before a kill) comes out the same; the steps shown are enough to write a directed
test when it does not."""

from __future__ import annotations

import errno
import itertools
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import trio
import trio.testing

from efsish import codec
from efsish.errors import FsError, NotFound
from efsish.filesystem import RENAME_NOREPLACE, Filesystem
from efsish.meta.keys import log_key
from efsish.meta.ops import LEASE_OPS, LogEntry
from efsish.meta.superblock import Superblock, format_fs
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.memory import MemoryStore
from tests.fs.helpers import ROOT, fsck
from tests.fs.model import (
    RECOVERY_DIR,
    Model,
    ModelError,
    Mount,
    Mounts,
    Path_,
    Step,
    Tree,
    first_difference,
    look,
    replay,
    resolve,
    show,
    show_path,
    show_value,
    walk,
)

# Claims every few creates (tests/fs/conftest.py).
pytestmark = pytest.mark.usefixtures("small_inode_ranges")

# The lease mode's rule 4 for a lost cache dir (see the module docstring); off (the
# sync format): every answered change is in the log. The lease format runs with it on.
LEASE_LOSS = {"sync": False, "lease": True}
LEASE_TIME = 5.0  # seconds (mock): a takeover comes 2 x this after an unanswered recall
COMMIT_INTERVAL = 1.0  # seconds; what a lost cache dir may lose is about this old at most
LOSS_WINDOW = 2 * COMMIT_INTERVAL  # the journal's backpressure bound (LEASES.md §6.3)

MOUNTS = 3
SHARED: Path_ = ("shared",)
NAMES = "abcde"  # per directory: few, so that names collide, get replaced and reused
MAX_ENTRIES = 16  # per subtree; above it, removals are preferred
WALK_EVERY = 3  # steps between whole-tree comparisons
MAX_PAUSE = 8  # steps a pause lasts at most
STEP_TIMEOUT = 900.0  # mock seconds: a step that takes longer is hung
KiB = 1024


def _seeds() -> list[int]:
    spec = os.environ.get("EFSISH_MODEL_SEEDS", "1-3")
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


OPS_PER_SEED = int(os.environ.get("EFSISH_MODEL_OPS", "150"))

Op = tuple[object, ...]


@dataclass
class Change:
    """Steps applied to the model, by one mount, answered at trio time `t`."""

    mount: int
    steps: list[Step]
    t: float
    synced: bool = False


@dataclass
class Doubt:
    """A call whose outcome is not known yet: any prefix of `steps` from `lo` on may
    have happened; `done` once it can change no more (returned or killed)."""

    mount: int
    label: str
    steps: list[Step]
    lo: int = 0
    done: bool = False
    finished: trio.Event = field(default_factory=trio.Event)
    returned: bool = False  # the call returned success
    error: BaseException | None = None


class Run:
    def __init__(
        self,
        seed: int,
        mounts: Mounts,
        live: list[Mount],
        root_mode: int,
        lease_loss: bool = False,
    ) -> None:
        self.lease_loss = lease_loss
        self.paused_t = 0.0  # trio time the pause began
        self.rng = random.Random(seed)
        self.seed, self.mounts, self.live = seed, mounts, live
        self.root_mode = root_mode
        self.model = Model.empty(root_mode)
        self.history: list[Change] = []
        self.doubts: list[Doubt] = []
        self.paused: Mount | None = None
        self.paused_at = 0
        self.in_flight: Doubt | None = None
        self.log: list[str] = []
        self.step_no = 0
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ reporting

    def note(self, what: str) -> None:
        self.log.append(f"#{self.step_no} {what}")

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def fail(self, why: str) -> NoReturn:
        last = "\n  ".join(self.log[-15:])
        pytest.fail(
            f"seed {self.seed}, step {self.step_no}: {why}\nlast steps:\n  {last}\n"
            f"replay: EFSISH_MODEL_SEEDS={self.seed} EFSISH_MODEL_OPS={self.step_no + 1} "
            "pytest tests/fs/test_model_mounts.py",
            pytrace=False,
        )

    # ------------------------------------------------------------------ the model

    def commit(self, mount: int, steps: list[Step], synced: bool = False) -> None:
        for s in steps:
            self.model.apply(s)
        self.history.append(Change(mount, steps, trio.current_time()))
        if synced:  # fsync returns once every change answered before it has landed
            for c in self.history:
                if c.mount == mount:
                    c.synced = True

    def live_ones(self, but: Mount | None = None) -> list[Mount]:
        return [m for m in self.live if m is not self.paused and m is not but]

    def area_dirs(self, area: Path_, max_len: int = 3) -> list[Path_]:
        m = self.model
        return [d for d in m.under(area) if m.is_dir(d) and len(d) <= max_len]

    def roomy(self, dirs: list[Path_]) -> list[Path_]:
        return [d for d in dirs if len(self.model.children(d)) < len(NAMES)]

    def free_name(self, d: Path_) -> Path_:
        taken = {p[-1] for p in self.model.children(d)}
        return (*d, self.rng.choice([n for n in NAMES if n not in taken]))

    def files(self, area: Path_, own_only: bool = False) -> list[Path_]:
        m = self.model
        out = [p for p in m.under(area) if m.is_file(p)]
        if own_only:  # inodes that no name outside `area` refers to
            out = [p for p in out if all(q[: len(area)] == area for q in m.paths_of(m.names[p]))]
        return sorted(out)

    def data(self) -> bytes:
        rng = self.rng
        n = rng.choice([1, 100, 4 * KiB, 16 * KiB + 1, 64 * KiB + 3, rng.randrange(1, 90 * KiB)])
        return rng.randbytes(n)

    # ------------------------------------------------------------ choosing an op

    def choose(self, i: int, restricted: bool = False) -> tuple[Op, list[Step], int | None]:
        """An operation for mount i, valid on the model: (op, its steps, the errno it
        must fail with, or None). `restricted`: in its own subtree, on inodes only named
        there (an operation left in flight on a paused mount)."""
        for _ in range(50):
            got = self._choose(i, restricted)
            if got is not None:
                return got
        area = (f"m{i}",)
        p = self.free_name(area) if self.roomy([area]) else None
        if p is None:
            raise ModelError(f"nothing to do in {area}")
        return ("mkdir", p, 0o755), [("mkdir", p, 0o755)], None

    def _choose(self, i: int, restricted: bool) -> tuple[Op, list[Step], int | None] | None:
        rng, m = self.rng, self.model
        own: Path_ = (f"m{i}",)
        area = own if restricted or rng.random() < 0.6 else SHARED
        other = area if restricted else (SHARED if area == own else own)
        files = self.files(area, restricted)
        dirs = self.area_dirs(area)
        subdirs = [d for d in dirs if d != area]
        full = len(m.under(area)) > MAX_ENTRIES
        weights = {
            "create": 0 if full else 4,
            "mkdir": 0 if full else 1.5,
            "write": 3,
            "append": 2,
            "fsync": 1,
            "truncate": 1,
            "rename": 3,
            "link": 0 if full else 1,
            "unlink": 5 if full else 2,
            "rmdir": 3 if full else 1,
            "chmod": 1,
            "setxattr": 1,
            "read": 0 if restricted else 1,
            "create_exists": 0 if restricted else 0.4,
            "noreplace_exists": 0 if restricted else 0.4,
        }
        kind = rng.choices(list(weights), list(weights.values()))[0]
        roomy = self.roomy(dirs)
        if kind in ("create", "mkdir"):
            parents = [d for d in roomy if kind == "create" or len(d) <= 2]
            if not parents:
                return None
            p = self.free_name(rng.choice(parents))
            if kind == "mkdir":
                mode = rng.choice([0o755, 0o700, 0o711])
                return ("mkdir", p, mode), [("mkdir", p, mode)], None
            mode, data = rng.choice([0o644, 0o600]), rng.choice([b"", self.data()])
            steps: list[Step] = [("mknod", p, mode)]
            if data:
                steps.append(("write", p, 0, data))
            return ("create", p, mode, data), steps, None
        if kind == "create_exists":
            taken = [p for p in m.under(area) if p != area]
            if not taken:
                return None
            p = rng.choice(taken)
            return ("create", p, 0o644, b""), [], errno.EEXIST
        if kind == "rmdir":
            empty = [d for d in subdirs if not m.children(d)]
            if not empty:
                return None
            p = rng.choice(empty)
            return ("rmdir", p), [("rmdir", p)], None
        if kind in ("chmod", "setxattr") and (not files or rng.random() < 0.3):
            if not subdirs:
                return None
            p = rng.choice(subdirs)
        elif kind == "rename" and subdirs and rng.random() < 0.25:
            p = rng.choice(subdirs)
            targets = [d for d in self.roomy(self.area_dirs(other, 2)) if d[: len(p)] != p]
            if not targets:
                return None
            dst = self.free_name(rng.choice(targets))
            flags = rng.choice([0, RENAME_NOREPLACE])
            return ("rename", p, dst, flags), [("rename", p, dst)], None
        else:
            if not files:
                return None
            p = rng.choice(files)
        size = len(m.inode(p).data)
        if kind in ("write", "fsync"):
            off = rng.choice([0, size, 16 * KiB - 1, 64 * KiB - 3, rng.randrange(0, 100 * KiB)])
            data = self.data()
            return (kind, p, off, data), [("write", p, off, data)], None
        if kind == "append":
            data = self.data()
            return ("append", p, data), [("write", p, size, data)], None
        if kind == "read":
            return ("read", p), [], None
        if kind == "truncate":
            n = rng.choice([0, 1, 16 * KiB, 64 * KiB + 5, rng.randrange(0, 100 * KiB)])
            return ("truncate", p, n), [("truncate", p, n)], None
        if kind == "chmod":
            modes = [0o755, 0o700, 0o711] if m.is_dir(p) else [0o600, 0o640, 0o755, 0o444]
            mode = rng.choice(modes)
            return ("chmod", p, mode), [("chmod", p, mode)], None
        if kind == "setxattr":
            name = rng.choice([b"user.a", b"user.b", b"user.c"])
            value = rng.randbytes(rng.choice([1, 10, 200]))
            return ("setxattr", p, name, value), [("setxattr", p, name, value)], None
        if kind == "unlink":
            return ("unlink", p), [("unlink", p)], None
        if kind == "noreplace_exists":
            taken = [q for q in m.under(other) if q != other and q != p]
            if not taken:
                return None
            dst = rng.choice(taken)
            return ("rename", p, dst, RENAME_NOREPLACE), [], errno.EEXIST
        # link, or rename of a file: to a free name here or in the other subtree, or
        # (rename) over another file
        ino = m.names[p]
        victims = [f for f in self.files(other, restricted) if m.names[f] != ino]
        if kind == "rename" and victims and rng.random() < 0.35:
            dst = rng.choice(victims)
            return ("rename", p, dst, 0), [("rename", p, dst)], None
        targets = self.roomy(self.area_dirs(rng.choice([area, other])))
        if not targets:
            return None
        dst = self.free_name(rng.choice(targets))
        if kind == "link":
            return ("link", p, dst), [("link", p, dst)], None
        flags = rng.choice([0, RENAME_NOREPLACE])
        return ("rename", p, dst, flags), [("rename", p, dst)], None

    def touched(self, args: Sequence[object]) -> list[Path_]:
        """The names an operation (its arguments) changed, their parents, and the other
        names of the files it changed (their link counts and bytes)."""
        m = self.model
        out: set[Path_] = set()
        for a in args:
            if isinstance(a, tuple):
                out.update({a, a[:-1]})
                if m.is_file(a):
                    out.update(m.paths_of(m.names[a]))
        return sorted(out)

    # ------------------------------------------------------------ doing an op

    async def execute(self, fs: Filesystem, op: Op) -> None:
        kind, p = op[0], op[1]
        assert isinstance(p, tuple)
        if kind == "create":
            mode, data = op[2], op[3]
            assert isinstance(mode, int) and isinstance(data, bytes)
            parent = await resolve(fs, p[:-1])
            excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            fh, _ = await fs.create(parent, p[-1].encode(), mode, excl, ROOT)
            try:
                if data:
                    await fs.write(fh, 0, data)
                    await fs.flush(fh)
            finally:
                await fs.release(fh)
        elif kind == "mkdir":
            mode = op[2]
            assert isinstance(mode, int)
            await fs.mkdir(await resolve(fs, p[:-1]), p[-1].encode(), mode, ROOT)
        elif kind in ("write", "fsync", "append"):
            data = op[-1]
            assert isinstance(data, bytes)
            ino = await resolve(fs, p)
            fh, _ = await fs.open(ino, os.O_WRONLY)
            try:
                # append: as the kernel does for O_APPEND, at the size this mount sees
                off = (await fs.getattr(ino)).size if kind == "append" else op[2]
                assert isinstance(off, int)
                await fs.write(fh, off, data)
                await (fs.fsync if kind == "fsync" else fs.flush)(fh)
            finally:
                await fs.release(fh)
        elif kind == "read":
            ino = await resolve(fs, p)
            fh, _ = await fs.open(ino, os.O_RDONLY)
            try:
                got = bytes(await fs.read(fh, 0, 1 << 20))
            finally:
                await fs.release(fh)
            want = self.model.inode(p).data
            if got != want:
                self.fail(f"read of {show_path(p)}: {show_value(got)}, expected {show_value(want)}")
        elif kind == "truncate":
            n = op[2]
            assert isinstance(n, int)
            await fs.setattr(await resolve(fs, p), ROOT, size=n)
        elif kind == "chmod":
            mode = op[2]
            assert isinstance(mode, int)
            await fs.setattr(await resolve(fs, p), ROOT, mode=mode)
        elif kind == "setxattr":
            name, value = op[2], op[3]
            assert isinstance(name, bytes) and isinstance(value, bytes)
            await fs.setxattr(await resolve(fs, p), name, value, ROOT)
        elif kind == "unlink":
            await fs.unlink(await resolve(fs, p[:-1]), p[-1].encode())
        elif kind == "rmdir":
            await fs.rmdir(await resolve(fs, p[:-1]), p[-1].encode())
        elif kind == "link":
            dst = op[2]
            assert isinstance(dst, tuple)
            ino = await resolve(fs, p)
            await fs.link(ino, await resolve(fs, dst[:-1]), dst[-1].encode())
        elif kind == "rename":
            dst, flags = op[2], op[3]
            assert isinstance(dst, tuple) and isinstance(flags, int)
            sp, dp = await resolve(fs, p[:-1]), await resolve(fs, dst[:-1])
            await fs.rename(sp, p[-1].encode(), dp, dst[-1].encode(), flags)
        else:
            raise AssertionError(f"unknown op {kind}")

    # ------------------------------------------------------------------- checks

    def candidates(
        self, bases: Sequence[tuple[Model, list[Change] | None]]
    ) -> list[tuple[Model, list[Change] | None, tuple[int, ...]]]:
        """Every model the doubts allow: for each base, each doubt at each prefix."""
        out = []
        ranges = [range(d.lo, len(d.steps) + 1) for d in self.doubts]
        for base, hist in bases:
            for ks in itertools.product(*ranges):
                m = base.copy()
                try:
                    for d, k in zip(self.doubts, ks, strict=True):
                        for s in d.steps[:k]:
                            m.apply(s)
                except ModelError:
                    continue
                out.append((m, hist, ks))
        return out

    def settle(
        self,
        seen: Tree,
        who: str,
        bases: Sequence[tuple[Model, list[Change] | None]] | None = None,
        rule: str = "",
    ) -> None:
        """`seen` must be one of the trees the model and its doubts allow; what it shows
        decides the doubts (those done are applied to the model)."""
        options = self.candidates(bases or [(self.model, None)])
        for option in options:
            if option[0].tree() == seen:
                _, hist, ks = option
                break
        else:
            want = options[0][0].tree() if options else self.model.tree()
            doubts = "; ".join(f"{d.label} (steps {d.lo}..{len(d.steps)})" for d in self.doubts)
            self.fail(
                f"{who} shows a tree the model does not allow{rule}: "
                f"{first_difference(seen, want)}" + (f"\n  undecided: {doubts}" if doubts else "")
            )
        if hist is not None:  # a lease-mode loss: the model goes back to what survived
            self.history = hist
            self.model = replay(self.root_mode, [s for c in hist for s in c.steps])
        for d, k in zip(list(self.doubts), ks, strict=True):
            if k != d.lo:
                self.note(f"  {who} shows {k} of the {len(d.steps)} steps of {d.label}")
            d.lo = k
            if d.done:
                self.doubts.remove(d)
                self.commit(d.mount, d.steps[:k])
                self.note(f"  {d.label}: {k} of {len(d.steps)} steps happened")

    async def compare_tree(
        self,
        m: Mount,
        rule: str = "",
        bases: Sequence[tuple[Model, list[Change] | None]] | None = None,
    ) -> None:
        if self.lease_loss and self.paused is not None:
            # The lease mode: a mount that needs a domain the paused mount holds takes
            # it over after 2 x lease_time; the paused mount's journal (its unsynced
            # changes from about the last commit interval before the pause) is then
            # fenced: in its recovery directory, not in the tree (LEASES.md §7, §10).
            bases = [
                *(bases or [(self.model, None)]),
                *self.lossy(self.paused.index, self.paused_t),
            ]
        self.settle(await walk(m.fs), f"mount {m.index}", bases, rule)

    async def check_names(self, paths: list[Path_], why: str) -> None:
        """Close-to-open: every live mount's lookups show the model's entry."""
        for m in self.live_ones():
            for p in paths:
                seen = await look(m.fs, p)
                want = self.model.entry(p)
                if seen != want:
                    sa = "absent" if seen is None else show_value(seen)
                    sb = "absent" if want is None else show_value(want)
                    self.fail(
                        f"after {why}: mount {m.index} shows {show_path(p)} as {sa}, expected {sb}"
                    )

    # ------------------------------------------------------------------- steps

    async def step(self) -> None:
        # Each step draws from its own stream: a step's choices depend only on the seed,
        # its number and the model, not on how many numbers earlier steps drew.
        rng = self.rng = random.Random(f"{self.seed}/{self.step_no}")
        r = rng.random()
        if self.paused is not None and self.step_no - self.paused_at >= MAX_PAUSE:
            await self.resume()
        elif r < 0.08:
            await self.race()
        elif r < 0.13:
            await (self.resume() if self.paused is not None else self.pause())
        elif r < 0.18:
            await self.kill(lose_cache=rng.random() < 0.4)
        else:
            await self.operation()
        if any(d.done for d in self.doubts) or self.step_no % WALK_EVERY == 0:
            await self.compare_tree(rng.choice(self.live_ones()))

    async def operation(self) -> None:
        rng = self.rng
        m = rng.choice(self.live_ones())
        op, steps, expect = self.choose(m.index)
        mode = rng.choices(["none", "flaky", "outage"], [7, 2, 1])[0]
        lost = rng.random() < 0.5
        self.note(f"mount {m.index}: {show(op)} faults={mode}{' lost-answer' if lost else ''}")
        m.store.faults(
            fail_next=rng.randint(1, 3) if mode == "flaky" else 0,
            outage=mode == "outage",
            lost=lost,
        )
        error: FsError | None = None
        try:
            await self.execute(m.fs, op)
        except FsError as e:
            error = e
        finally:
            m.store.faults()
        if expect is not None:
            # An outage may fail it with EIO too: its refusal can share a group commit
            # with another change (an atime update) whose PUT failed.
            allowed = {expect, errno.EIO} if mode == "outage" else {expect}
            if error is None or error.errno not in allowed:
                got = "success" if error is None else errno.errorcode.get(error.errno)
                self.fail(f"{show(op)} on mount {m.index}: {got}, expected EEXIST")
            self.count("refused")
            return
        if error is not None:
            if mode != "outage" or error.errno != errno.EIO:
                self.fail(
                    f"{show(op)} on mount {m.index} failed with "
                    f"{errno.errorcode.get(error.errno)}: {error}"
                )
            self.count("eio")
            self.doubts.append(Doubt(m.index, f"failed {show(op)}", steps, done=True))
            await self.compare_tree(rng.choice(self.live_ones()), " after a failed call")
        else:
            self.count(f"op {mode}")
            self.commit(m.index, steps, synced=op[0] == "fsync")
        await self.check_names(self.touched(op[1:]), f"{show(op)} on mount {m.index}")

    async def race(self) -> None:
        rng, model = self.rng, self.model
        racers = self.live_ones()
        rng.shuffle(racers)
        racers = racers[: rng.choice([2, 3])]
        parents = self.roomy(self.area_dirs(SHARED))
        if len(racers) < 2 or not parents:
            return await self.operation()
        p = self.free_name(rng.choice(parents))
        ops: list[tuple[Mount, Op, list[Step]]] = []
        used: set[int] = set()
        for m in racers:
            kind = rng.choice(["create", "mkdir", "link", "rename"])
            srcs = [f for f in self.files((f"m{m.index}",)) if model.names[f] not in used]
            if kind in ("link", "rename") and srcs:
                src = rng.choice(srcs)
                used.add(model.names[src])
                if kind == "link":
                    ops.append((m, ("link", src, p), [("link", src, p)]))
                else:
                    ops.append((m, ("rename", src, p, RENAME_NOREPLACE), [("rename", src, p)]))
            elif kind == "mkdir":
                ops.append((m, ("mkdir", p, 0o755), [("mkdir", p, 0o755)]))
            else:
                data = rng.choice([b"", self.data()])
                steps: list[Step] = [("mknod", p, 0o644)] + (
                    [("write", p, 0, data)] if data else []
                )
                ops.append((m, ("create", p, 0o644, data), steps))
        flaky = {m.index: rng.randint(1, 2) if rng.random() < 0.3 else 0 for m, _, _ in ops}
        self.note(
            "race: "
            + ", ".join(
                f"mount {m.index} {show(op)}{' (flaky)' if flaky[m.index] else ''}"
                for m, op, _ in ops
            )
        )
        results: dict[int, FsError | None] = {}

        async def run(m: Mount, op: Op) -> None:
            m.store.faults(fail_next=flaky[m.index])
            try:
                await self.execute(m.fs, op)
                results[m.index] = None
            except FsError as e:
                results[m.index] = e
            finally:
                m.store.faults()

        async with trio.open_nursery() as n:
            for m, op, _ in ops:
                n.start_soon(run, m, op)
        winners = [(m, op, steps) for m, op, steps in ops if results[m.index] is None]
        losers = {m.index: results[m.index] for m, _, _ in ops if results[m.index] is not None}
        if len(winners) != 1 or any(e is None or e.errno != errno.EEXIST for e in losers.values()):
            shown = {
                i: "success" if e is None else errno.errorcode.get(e.errno, str(e))
                for i, e in results.items()
            }
            self.fail(
                f"race for {show_path(p)}: exactly one must win, the others get EEXIST: {shown}"
            )
        m, won, steps = winners[0]
        self.count("race")
        self.note(f"  mount {m.index} won")
        self.commit(m.index, steps)
        await self.check_names(self.touched(won[1:]), f"the race won by mount {m.index}")

    async def pause(self) -> None:
        rng = self.rng
        m = rng.choice(self.live_ones())
        where = rng.choice(["request", "answer"])
        m.store.pause(where)
        self.paused, self.paused_at, self.paused_t = m, self.step_no, trio.current_time()
        self.count("pause")
        if rng.random() < 0.3:
            self.note(f"pause mount {m.index} ({where}s hang)")
            return
        op, steps, _ = self.choose(m.index, restricted=True)
        d = Doubt(m.index, f"{show(op)} in flight on mount {m.index}", steps)
        self.note(f"pause mount {m.index} ({where}s hang) with {show(op)} in flight")
        self.doubts.append(d)
        self.in_flight = d

        async def call() -> None:
            try:
                await self.execute(m.fs, op)
                d.returned = True
            except Exception as e:  # reported at the resume
                d.error = e
            finally:
                d.finished.set()

        m.nursery.start_soon(call)
        await trio.sleep(0.5)  # it reaches the store and hangs there

    async def resume(self) -> None:
        m, d = self.paused, self.in_flight
        assert m is not None
        self.note(f"resume mount {m.index}")
        m.store.resume()
        if self.lease_loss:
            await self.resume_leased(m, d)
            return
        self.paused = self.in_flight = None
        if d is None:
            return
        await d.finished.wait()
        if not d.returned:
            self.fail(f"{d.label}: failed after the resume: {d.error!r}")
        self.doubts.remove(d)
        self.commit(d.mount, d.steps)
        await self.check_names(self.touched([a for s in d.steps for a in s]), d.label)

    async def resume_leased(self, m: Mount, d: Doubt | None) -> None:
        """The lease mode's resume: the mount catches up; if another mount took one of
        its domains over meanwhile it is fenced, recovers, and its journal (the call in
        flight too) is in its recovery directory instead of the tree."""
        leases = m.fs.leases
        assert leases is not None
        if d is not None:
            await d.finished.wait()
        for _ in range(3):
            try:
                await m.fs.meta.catch_up()
                await leases.sync()
                break
            except FsError:
                await trio.sleep(1.0)
        while leases.fenced is not None or leases.recovering:  # noqa: ASYNC110
            await trio.sleep(0.1)
        if d is not None:
            if not d.returned and (d.error is None or getattr(d.error, "errno", 0) != errno.EIO):
                self.fail(f"{d.label}: failed after the resume: {d.error!r}")
            d.done = True  # in the tree, or in the recovery directory
        bases = [(self.model, None), *self.lossy(m.index, self.paused_t)]
        self.paused = self.in_flight = None
        await self.compare_tree(m, f" after mount {m.index} resumed (rule 4, lease mode)", bases)

    async def kill(self, lose_cache: bool) -> None:
        m = self.rng.choice(self.live)
        how = "with its cache dir lost" if lose_cache else "keeping its cache dir"
        self.note(f"kill -9 mount {m.index}, {how}")
        self.count("kill")
        if lose_cache:
            self.count("kill, cache lost")
        was_paused = m is self.paused
        d = self.in_flight if was_paused else None
        if was_paused:
            self.paused = self.in_flight = None
        new = await self.mounts.kill(m, lose_cache)
        self.live[self.live.index(m)] = new
        # The lease mode: another mount may have taken a domain over while this one was
        # paused. The new incarnation then finds its journal fenced and puts it in its
        # recovery directory, a call that returned during the pause with it (rule 5).
        fenced = False
        leases = new.fs.leases
        if self.lease_loss and was_paused and leases is not None:
            while leases.fenced is not None or leases.recovering:  # noqa: ASYNC110
                await trio.sleep(0.1)
            fenced = bool(leases.recovered)
        if d is not None:
            d.done = True  # cancelled: what it did is in the log, or nothing is
            if d.returned and not fenced:
                d.lo = len(d.steps)
        bases: list[tuple[Model, list[Change] | None]] = [(self.model, None)]
        if lose_cache and self.lease_loss:
            bases += self.lossy(m.index)
        if was_paused and self.lease_loss:
            bases += self.lossy(m.index, self.paused_t)  # taken over while paused
        rule = (
            f" (rules 3/4: kill -9 of mount {m.index} {how}: a change whose call "
            "returned is missing, or a change appeared that did not happen)"
        )
        await self.compare_tree(new, rule, bases)

    def lossy(self, i: int, at: float | None = None) -> list[tuple[Model, list[Change] | None]]:
        """The lease mode: with its cache dir (or its lease, taken over while it was
        paused at time `at`), mount i may lose its latest changes that no fsync covered
        and that are at most LOSS_WINDOW old (then); the models without the last 1, 2,
        ... of them (a journal loses a suffix)."""
        now = trio.current_time() if at is None else at
        mine = [k for k, c in enumerate(self.history) if c.mount == i]
        lost: list[int] = []
        for k in reversed(mine):
            c = self.history[k]
            if c.synced or now - c.t > LOSS_WINDOW:
                break
            lost.append(k)
        out: list[tuple[Model, list[Change] | None]] = []
        for n in range(1, len(lost) + 1):
            drop = set(lost[:n])
            hist = [c for k, c in enumerate(self.history) if k not in drop]
            try:
                out.append((replay(self.root_mode, [s for c in hist for s in c.steps]), hist))
            except ModelError:
                continue
        return out

    async def finish(self) -> None:
        """Rule 6: everyone catches up and shows the model's tree; fsck is clean."""
        self.note("finish")
        if self.paused is not None:
            await self.resume()
        for m in self.live:
            await self.compare_tree(m, " at the end (rule 6: convergence)")
        assert not self.doubts, [d.label for d in self.doubts]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.002)


@pytest.mark.parametrize("fmt", ["sync", "lease"])
@pytest.mark.parametrize("seed", _seeds())
async def test_mounts_against_the_model(
    seed: int,
    fmt: str,
    clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    store: ObjectStore,
    sb: Superblock,
    tmp_path: Path,
) -> None:
    random.seed(seed)  # the retries' jitter: a failing seed replays the same way
    # "sync": format 2 (every change committed on its own); "lease": format 3.
    store = MemoryStore(f"model-{uuid.uuid4().hex}")
    if fmt == "lease":
        sb = await format_fs(store, block_size=sb.block_size, leases=True, lease_time=LEASE_TIME)
    else:
        sb = await format_fs(store, block_size=sb.block_size, leases=False)
    mounts = Mounts(nursery, store, sb, tmp_path, COMMIT_INTERVAL)
    live = [await mounts.start(i) for i in range(MOUNTS)]
    root = await live[0].fs.getattr(ROOT_INO)
    run = Run(seed, mounts, live, root.mode & 0o7777, LEASE_LOSS[fmt])
    for top in [*(f"m{i}" for i in range(MOUNTS)), SHARED[0]]:
        await live[0].fs.mkdir(ROOT_INO, top.encode(), 0o755, ROOT)
        run.commit(0, [("mkdir", (top,), 0o755)])
    for run.step_no in range(OPS_PER_SEED):
        try:
            with trio.fail_after(STEP_TIMEOUT):
                await run.step()
        except trio.TooSlowError:
            run.fail(f"the step hung for {STEP_TIMEOUT} s (mock time)")
        except (AssertionError, pytest.fail.Exception):
            raise
        except Exception as e:
            run.fail(f"the step raised {e!r} (traceback above)")
    with trio.fail_after(STEP_TIMEOUT):
        await run.finish()
        fresh = await mounts.start(MOUNTS)
        await run.compare_tree(fresh, " on a fresh mount at the end")
        code, out = await fsck(store)
    assert code == 0, f"seed {seed}: fsck:\n{out}"
    if fmt == "lease":
        run.counts.update(await lease_counts(store))
    print(f"seed {seed} ({fmt}): {sorted(run.counts.items())}")
    if OPS_PER_SEED >= 100:  # the disruptions must actually have happened
        for what in ("race", "pause", "kill", "op flaky"):
            assert run.counts.get(what), (what, run.counts)


@pytest.mark.parametrize("fmt", ["sync", "lease"])
async def test_walk_leaves_the_recovery_dir_out_of_the_root(
    fmt: str, clock: trio.testing.MockClock, nursery: trio.Nursery, sb: Superblock, tmp_path: Path
) -> None:
    """The model does not hold the lease mode's recovery directory (LEASES.md §10); the
    filesystem counts it in the root's nlink like any subdirectory, so walk leaves it
    out of the root's entry, nlink included (under leases read by getattr)."""
    store = MemoryStore(f"model-{uuid.uuid4().hex}")
    sb = await format_fs(
        store, block_size=sb.block_size, leases=fmt == "lease", lease_time=LEASE_TIME
    )
    m = await Mounts(nursery, store, sb, tmp_path, COMMIT_INTERVAL).start(0)
    root_mode = (await m.fs.getattr(ROOT_INO)).mode & 0o7777
    await m.fs.mkdir(ROOT_INO, b"home", 0o755, ROOT)
    # What a recovery makes first (recovery.py): mkdir /.efsish-recovered, 0711.
    await m.fs.mkdir(ROOT_INO, RECOVERY_DIR, 0o711, ROOT)
    assert (await m.fs.getattr(ROOT_INO)).nlink == 4  # 2 + home + the recovery dir
    seen = await walk(m.fs)
    want = replay(root_mode, [("mkdir", ("home",), 0o755)]).tree()
    assert seen == want, first_difference(seen, want)


async def lease_counts(store: ObjectStore) -> dict[str, int]:
    """What the lease protocol did, from the log: journaled entries and lease ops."""
    counts: dict[str, int] = {}
    seq = 1
    while True:
        try:
            blob = await store.get(log_key(seq))
        except NotFound:
            return counts
        entry = LogEntry.unwire(codec.decode_json(b"L", blob, "log"))
        ops = [o.wire()["o"] for o in entry.ops]
        kinds = [str(entry.kind)] + [
            o.wire()["o"] for o in entry.ops if isinstance(o, LEASE_OPS) and o.wire()["o"] != "sess"
        ]
        if "ino" in ops:  # an inode range claimed ahead (alone) or by a create
            kinds.append("ino ahead" if ops == ["ino"] else "ino inline")
        for k in kinds:
            counts[f"log {k}"] = counts.get(f"log {k}", 0) + 1
        seq += 1
