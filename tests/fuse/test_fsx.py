"""fsx-style data integrity: one file, hundreds of seeded random operations (pwrite at
block edges and past the end, appends through a second descriptor, ftruncate down and up,
writes through a shared mapping, preads, fsync, page-cache drops, close and reopen),
handed between two mounts of one store at random points. Every read is compared with an
in-memory model; at every hand-off the other mount must read exactly the model
(close-to-open), and so must a fresh mount with an empty cache at the end, after which
fsck must be clean.

The filesystem is formatted with the smallest block size (64 KiB) so that a 1-2 MiB file
spans many blocks and every operation meets block edges, partial blocks, holes and the
inline-size edge (16 KiB). On a failure the message names the seed and the last
operations, so the run can be repeated exactly."""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.conftest import Mount, efsish, format_args, stop_mount

pytestmark = pytest.mark.fuse

KiB = 1024
BLOCK = 64 * KiB
INLINE = 16 * KiB
MAX_SIZE = 2 * 1024 * KiB


def _offset(rng: random.Random, size: int) -> int:
    """An offset that often sits on or next to a block edge, the inline edge or the end."""
    kind = rng.random()
    if kind < 0.35:
        return max(0, rng.randrange(0, MAX_SIZE // BLOCK) * BLOCK + rng.choice([-1, 0, 1]))
    if kind < 0.45:
        return INLINE + rng.choice([-1, 0, 1])
    if kind < 0.65 and size:
        return max(0, size + rng.choice([-3, -1, 0, 1, 4096]))
    return rng.randrange(0, MAX_SIZE)


def _length(rng: random.Random) -> int:
    return rng.choice(
        [1, 2, 511, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, rng.randrange(1, 3 * BLOCK)]
    )


class Fsx:
    """The file under test on one of two mounts, and the model it must match."""

    def __init__(self, mounts: list[Path], seed: int) -> None:
        self.mounts = mounts
        self.rng = random.Random(seed)
        self.seed = seed
        self.model = bytearray()
        self.side = 0
        self.history: list[str] = []
        self.path = mounts[0] / "fsx"
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o644)

    def fail(self, what: str) -> None:
        tail = "\n  ".join(self.history[-25:])
        pytest.fail(f"seed {self.seed}, op {len(self.history)}: {what}\nlast ops:\n  {tail}")

    def check(self, got: bytes, off: int, n: int, where: str) -> None:
        want = bytes(self.model[off : off + n])
        if got != want:
            first = next(
                (i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                min(len(got), len(want)),
            )
            self.fail(
                f"{where}: pread({n}, {off}) gave {len(got)} bytes, want {len(want)};"
                f" first difference at file offset {off + first}"
            )

    def verify_whole(self, path: Path, where: str) -> None:
        """Open (close-to-open: the open, not a bare stat, must see the last close
        elsewhere), then compare the size and every byte with the model."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != len(self.model):
                self.fail(f"{where}: size {size} after open, want {len(self.model)}")
            got = bytearray()
            while chunk := os.pread(fd, 1 << 20, len(got)):
                got += chunk
        finally:
            os.close(fd)
        self.check(bytes(got), 0, len(self.model), where)

    def step(self, orphan: bool = False) -> None:
        """One random operation. `orphan`: the file was unlinked while open, so only
        what works on the descriptor (no append by path, reopen or hand-off)."""
        rng, size = self.rng, len(self.model)
        weights = [30, 5, 10, 8, 25, 5, 5, 5, 6] if not orphan else [30, 0, 10, 8, 25, 5, 5, 0, 0]
        op = rng.choices(
            [
                "write",
                "append",
                "truncate",
                "mapwrite",
                "read",
                "fsync",
                "drop",
                "reopen",
                "handoff",
            ],
            weights=weights,
        )[0]
        if op == "write":
            off, data = _offset(rng, size), rng.randbytes(_length(rng))
            if off + len(data) > MAX_SIZE:
                off = max(0, MAX_SIZE - len(data))
            self.history.append(f"pwrite({len(data)}, {off})")
            if os.pwrite(self.fd, data, off) != len(data):
                self.fail("short write")
            if off > size:
                self.model.extend(bytes(off - size))
            self.model[off : off + len(data)] = data
        elif op == "append":
            # through a second descriptor, closed at once while the first stays open
            data = rng.randbytes(min(_length(rng), MAX_SIZE - size))
            self.history.append(f"O_APPEND write({len(data)}) at {size}, close")
            afd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                if os.write(afd, data) != len(data):
                    self.fail("short append")
            finally:
                os.close(afd)
            self.model += data
        elif op == "truncate":
            new = rng.choice([0, INLINE, INLINE + 1, size // 2, _offset(rng, size)])
            new = min(new, MAX_SIZE)
            self.history.append(f"ftruncate({new}) from {size}")
            os.ftruncate(self.fd, new)
            if new < size:
                del self.model[new:]
            else:
                self.model.extend(bytes(new - size))
        elif op == "mapwrite" and size:
            off = rng.randrange(0, size)
            data = rng.randbytes(min(_length(rng), size - off))
            sync = rng.random() < 0.5
            self.history.append(f"mmap write({len(data)}, {off}){' msync' if sync else ''}")
            with mmap.mmap(self.fd, size) as m:
                m[off : off + len(data)] = data
                if sync:
                    m.flush()
            self.model[off : off + len(data)] = data
        elif op == "read":
            off = rng.choice([_offset(rng, size), rng.randrange(0, size + 1)])
            n = rng.choice([_length(rng), 4 * BLOCK])
            self.history.append(f"pread({n}, {off})")
            self.check(os.pread(self.fd, n, off), off, n, "read")
        elif op == "fsync":
            self.history.append("fsync")
            os.fsync(self.fd)
        elif op == "drop":
            # write back, then drop this file's pages: later reads go through FUSE again
            self.history.append("fsync + fadvise(DONTNEED)")
            os.fsync(self.fd)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        elif op == "reopen":
            self.history.append("close, reopen")
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR)
        elif op == "handoff":
            self.history.append(f"close, hand off to mount {1 - self.side}")
            os.close(self.fd)
            self.side = 1 - self.side
            self.path = self.mounts[self.side] / "fsx"
            self.fd = os.open(self.path, os.O_RDWR)
            self.verify_whole(self.path, f"after hand-off to mount {self.side}")

    def close(self) -> None:
        os.close(self.fd)


# CI runs two seeds; EFSISH_FSX_SEEDS=1-200 (and EFSISH_FSX_OPS) runs more when hunting.
_SEEDS = os.environ.get("EFSISH_FSX_SEEDS", "1-2").partition("-")
SEEDS = range(int(_SEEDS[0]), int(_SEEDS[2] or _SEEDS[0]) + 1)
OPS = int(os.environ.get("EFSISH_FSX_OPS", "500"))


@pytest.fixture(params=[2, 3], ids=["format2", "format3"])
def fs_format(request: pytest.FixtureRequest) -> int:
    """Every test here runs on a lease (format-3, the default) filesystem, and on a
    format-2 one with half the operations (`ops`), to keep the suite's time."""
    return int(request.param)


def ops(fs_format: int) -> int:
    return OPS if fs_format == 3 else OPS // 2


@pytest.mark.parametrize("seed", SEEDS)
def test_random_io_matches_model_across_mounts_and_remount(
    mounter: Callable[..., Mount], tmp_path: Path, seed: int, fs_format: int
) -> None:
    store = f"file://{tmp_path}/fsx-store"
    efsish("format", store, "--block-size", "64K", *format_args(fs_format))
    a, b = mounter(store), mounter(store)
    fsx = Fsx([a.path, b.path], seed)
    try:
        for _ in range(ops(fs_format)):
            fsx.step()
    finally:
        fsx.close()
    handoffs = sum(h.startswith("close, hand off") for h in fsx.history)
    assert handoffs >= ops(fs_format) // 50, fsx.history  # it exercised the other mount
    for m in (a, b):
        fsx.verify_whole(m.path / "fsx", f"end, on {m.path.name}")
    stop_mount(a)
    stop_mount(b)
    fresh = mounter(store)  # a new cache dir: every block comes from the store
    fsx.verify_whole(fresh.path / "fsx", "fresh mount, empty cache")
    stop_mount(fresh)
    res = efsish("fsck", store, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# Seed 3 is in CI's set here: it met the race of a flush and another mount's unlink.
ORPHAN_SEEDS = SEEDS if "EFSISH_FSX_SEEDS" in os.environ else range(1, 4)


@pytest.mark.parametrize("seed", ORPHAN_SEEDS)
def test_random_io_on_a_file_unlinked_while_open(
    mounter: Callable[..., Mount], tmp_path: Path, seed: int, fs_format: int
) -> None:
    """The same random I/O on a descriptor whose file another mount has unlinked (its
    data then lives on this mount until the last close: writes, truncates, mmap writes
    and page-cache drops must all still match the model), and the name reused at once
    elsewhere. After the close nothing of it is left, and fsck is clean."""
    store = f"file://{tmp_path}/orphan-store"
    efsish("format", store, "--block-size", "64K", *format_args(fs_format))
    a, b = mounter(store), mounter(store)
    fsx = Fsx([a.path, b.path], 1000 + seed)
    try:
        for _ in range(ops(fs_format) // 5):
            fsx.step(orphan=False)
        fsx.history.append("close; reopen on mount 0; unlink on mount 1")
        os.close(fsx.fd)
        fsx.fd = os.open(a.path / "fsx", os.O_RDWR)
        os.unlink(b.path / "fsx")
        (b.path / "fsx").write_bytes(b"another file under the same name")
        for _ in range(ops(fs_format) // 2):
            fsx.step(orphan=True)
        fsx.verify_whole(Path(f"/proc/self/fd/{fsx.fd}"), "through the unlinked descriptor")
    finally:
        fsx.close()
    for m in (a, b):
        fd = os.open(m.path / "fsx", os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 0) == b"another file under the same name"
        finally:
            os.close(fd)
    stop_mount(a)
    stop_mount(b)
    res = efsish("fsck", store, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
