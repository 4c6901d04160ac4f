"""Two mounts of one store on one machine (separate mountpoints and cache dirs) work
together: closed files are read correctly on the other mount, and new names appear there
within seconds without any action on it. Each test runs on a format-2, a lease
(format-3) and an encrypted lease filesystem."""

from __future__ import annotations

import functools
import os
import random
import stat
import threading
from pathlib import Path

import pytest

from tests.fuse.conftest import ALL_VARIANTS, Mount, stop_mount
from tests.fuse.helpers import poll

MiB = 1 << 20


pytestmark = ALL_VARIANTS


@pytest.fixture
def pair(mounter) -> tuple[Path, Path]:
    a: Mount = mounter()
    b: Mount = mounter(a.store)
    assert a.cache_dir != b.cache_dir
    return a.path, b.path


def test_closed_file_read_on_other_mount(pair: tuple[Path, Path]) -> None:
    a, b = pair
    rnd = random.Random(5)
    files = {
        "empty": b"",
        "small": b"small file\n",
        "inline-edge": rnd.randbytes(16 * 1024),
        "block-edge": rnd.randbytes(MiB),
        "big": rnd.randbytes(5 * MiB + 17),
    }
    (a / "dir" / "sub").mkdir(parents=True)
    for name, data in files.items():
        (a / "dir" / "sub" / name).write_bytes(data)
    # immediately (close() returned on A): B must read the same bytes
    for name, data in files.items():
        assert (b / "dir" / "sub" / name).read_bytes() == data, name
        assert os.stat(b / "dir" / "sub" / name).st_size == len(data)
    assert sorted(os.listdir(b / "dir" / "sub")) == sorted(files)
    # and the other direction
    (b / "dir" / "from_b").write_bytes(b"written on b")
    assert (a / "dir" / "from_b").read_bytes() == b"written on b"


def _rewrite_cases(a: Path, b: Path, name: str, new: bytes, how: str) -> None:
    fa, fb = a / name, b / name
    if how == "truncate":
        fa.write_bytes(new)
    else:  # in place: open r+b and overwrite the start, then truncate to size
        with open(fa, "r+b") as fh:
            fh.write(new)
            fh.truncate(len(new))
    assert fa.read_bytes() == new, f"{name}/{how}: wrong content on the writing mount itself"
    with open(fb, "rb") as fh:
        got = fh.read()
    assert len(got) == len(new), f"{name}/{how}: B read {len(got)} bytes, want {len(new)}"
    assert got == new, f"{name}/{how}: B read stale content"
    assert os.stat(fb).st_size == len(new)


@pytest.mark.parametrize("how", ["truncate", "in_place"])
def test_rewrite_seen_after_other_mount_read(pair: tuple[Path, Path], how: str) -> None:
    a, b = pair
    rnd = random.Random(6)
    for name, size in (("small", 100), ("big", 3 * MiB)):
        old = rnd.randbytes(size)
        (a / name).write_bytes(old)
        assert (b / name).read_bytes() == old  # B now has it in its caches
        _rewrite_cases(a, b, name, rnd.randbytes(size), how)  # same size
        _rewrite_cases(a, b, name, rnd.randbytes(size + 5000), how)  # larger
        _rewrite_cases(a, b, name, rnd.randbytes(size // 2), how)  # smaller


def test_rewrite_while_other_mount_keeps_file_open(pair: tuple[Path, Path]) -> None:
    """A descriptor opened on B before the rewrite may see either version, but a new open
    after A's close must see the new content."""
    a, b = pair
    (a / "f").write_bytes(b"version 1" * 1000)
    with open(b / "f", "rb") as held:
        assert held.read(9) == b"version 1"
        (a / "f").write_bytes(b"version 2" * 2000)
        with open(b / "f", "rb") as fresh:
            got = fresh.read()
        assert got == b"version 2" * 2000, (
            f"B read {len(got)} bytes: {got.count(b'version 1')} x 'version 1', "
            f"{got.count(b'version 2')} x 'version 2'"
        )


def test_partial_update_seen(pair: tuple[Path, Path]) -> None:
    a, b = pair
    data = bytearray(random.Random(7).randbytes(4 * MiB))
    (a / "f").write_bytes(data)
    assert (b / "f").read_bytes() == data
    with open(a / "f", "r+b") as fh:
        for off in (0, MiB - 3, 2 * MiB + 100, 4 * MiB - 10):
            fh.seek(off)
            fh.write(b"PATCH")
            data[off : off + 5] = b"PATCH"
    assert (b / "f").read_bytes() == bytes(data)
    with open(b / "f", "ab") as fh:  # append on B, read on A
        fh.write(b"tail")
    assert (a / "f").read_bytes() == bytes(data) + b"tail"


def test_new_name_appears_without_action(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "d").mkdir()
    poll(lambda: (b / "d").is_dir())
    assert os.listdir(b / "d") == []  # B has listed (and cached) the empty directory
    assert not (b / "d" / "new").exists()  # and may cache a negative entry
    (a / "d" / "new").write_bytes(b"x")
    assert poll(lambda: "new" in os.listdir(b / "d"), timeout=3), "new name not seen on B"
    assert poll(lambda: (b / "d" / "new").exists(), timeout=3), "negative entry stuck on B"
    assert (b / "d" / "new").read_bytes() == b"x"
    # removal and rename are seen too
    os.rename(a / "d" / "new", a / "d" / "renamed")
    assert poll(lambda: os.listdir(b / "d") == ["renamed"], timeout=3), os.listdir(b / "d")
    assert poll(lambda: not (b / "d" / "new").exists(), timeout=3)
    os.unlink(a / "d" / "renamed")
    assert poll(lambda: os.listdir(b / "d") == [], timeout=3), os.listdir(b / "d")
    # a new top-level name, with B sitting in the root listing
    os.listdir(b)
    (a / "top").mkdir()
    assert poll(lambda: "top" in os.listdir(b), timeout=3)


def test_metadata_changes_seen(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "f").write_bytes(b"x")
    st = os.stat(b / "f")
    assert stat.S_IMODE(st.st_mode) == 0o644
    os.chmod(a / "f", 0o600)
    os.chown(a / "f", 1000, 1000)
    os.utime(a / "f", ns=(1, 2 * 10**18))
    os.setxattr(a / "f", "user.k", b"v")

    def seen() -> bool:
        s = os.stat(b / "f")
        return (stat.S_IMODE(s.st_mode), s.st_uid, s.st_mtime_ns) == (0o600, 1000, 2 * 10**18)

    assert poll(seen, timeout=3), os.stat(b / "f")
    assert os.getxattr(b / "f", "user.k") == b"v"
    os.link(a / "f", a / "g")
    assert poll(lambda: os.stat(b / "f").st_nlink == 2, timeout=3)


def test_concurrent_creates_on_both(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "shared").mkdir()
    poll(lambda: (b / "shared").is_dir())
    errors: list[BaseException] = []

    def writer(root: Path, tag: str) -> None:
        try:
            for i in range(40):
                (root / "shared" / f"{tag}{i}").write_bytes(f"{tag}{i}".encode() * 100)
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(r, t)) for r, t in ((a, "a"), (b, "b"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    want = sorted([f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
    for root in (a, b):
        d = root / "shared"
        assert poll(functools.partial(lambda d: sorted(os.listdir(d)) == want, d), timeout=3)
        for n in want:
            assert (root / "shared" / n).read_bytes() == n.encode() * 100


def test_mmap_writes_reach_the_other_mount(mounter) -> None:
    """Shared writable mappings: pages stored through a mapping and msync'ed are seen by
    an open on the other mount; pages dirtied after the descriptor was closed reach the
    store when the mapping goes (munmap), at the latest when the mount is unmounted."""
    import mmap

    a_m: Mount = mounter()
    b_m: Mount = mounter(a_m.store)
    a, b = a_m.path, b_m.path
    rnd = random.Random(11)
    data = bytearray(rnd.randbytes(5 * MiB + 123))  # 1 MiB blocks: six of them
    (a / "m").write_bytes(data)
    assert (b / "m").read_bytes() == data
    with open(a / "m", "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        for off in (0, MiB - 2, 3 * MiB + 7, len(data) - 4):
            mm[off : off + 4] = b"MMAP"
            data[off : off + 4] = b"MMAP"
        mm.flush()  # msync(MS_SYNC)
        with open(b / "m", "rb") as other:
            assert other.read() == data, "B did not see pages msync'ed on A"
    assert (b / "m").read_bytes() == data
    assert (a / "m").read_bytes() == data

    # Dirtied after close(): no FLUSH follows, only the writeback and the RELEASE at munmap.
    fd = os.open(a / "m", os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    os.close(fd)
    mm[2 * MiB : 2 * MiB + 5] = b"LATER"
    data[2 * MiB : 2 * MiB + 5] = b"LATER"
    mm.close()
    assert (a / "m").read_bytes() == data
    # A mapping of B's reads the new bytes too (kernel cache dropped on a remote change).
    poll(lambda: (b / "m").read_bytes() == data, timeout=10)
    with open(b / "m", "rb") as fb, mmap.mmap(fb.fileno(), 0, prot=mmap.PROT_READ) as mm_b:
        assert mm_b[:] == data
    stop_mount(a_m)
    assert (b / "m").read_bytes() == data
