"""POSIX semantics through a real FUSE mount, compared with local disk where it matters,
on a plain and on an encrypted filesystem (both in the lease format, the default).

Most tests share one mount per module and per variant (the `work` fixture gives each
test its own directory on it); the remount test uses its own mounts."""

from __future__ import annotations

import errno
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fuse.conftest import Mount, efsish, is_mounted
from tests.fuse.filler import entry_names
from tests.fuse.helpers import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    UTIME_NOW,
    UTIME_OMIT,
    assert_same_tree,
    expect_errno,
    poll,
    renameat2,
    snapshot,
    utimensat,
)

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "encrypted"])
def encrypted(request: pytest.FixtureRequest) -> bool:
    """Every test here runs on a plain and on an encrypted filesystem, but those marked
    PLAIN_ONLY (each says why)."""
    return bool(request.param)


# For a test whose subject encryption does not touch and that would add many seconds to
# the suite (a comment at each use says which).
PLAIN_ONLY = pytest.mark.parametrize("encrypted", [False], ids=["plain"], indirect=True)


def both(tmp_path: Path, work: Path) -> list[Path]:
    """[local-disk dir, mount dir] for running the same steps on each."""
    local = tmp_path / "local"
    local.mkdir()
    return [local, work]


# --------------------------------------------------------------------- lookup/getattr


def test_lookup_getattr(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"hello")
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 5
    assert st.st_nlink == 1
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_ino == os.stat(f).st_ino
    (work / "d").mkdir()
    sd = os.stat(work / "d")
    assert stat.S_ISDIR(sd.st_mode)
    assert sd.st_ino != st.st_ino
    assert os.stat(work / "d" / ".." / "f").st_ino == st.st_ino
    expect_errno(errno.ENOENT, os.stat, work / "missing")
    expect_errno(errno.ENOTDIR, os.stat, work / "f" / "x")
    assert sorted(os.listdir(work)) == ["d", "f"]


# ----------------------------------------------------------------------- setattr


def test_chmod(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    for mode in (0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000, 0o644):
        os.chmod(f, mode)
        assert stat.S_IMODE(os.stat(f).st_mode) == mode, oct(mode)
        assert stat.S_ISREG(os.stat(f).st_mode)
    d = work / "d"
    d.mkdir()
    os.chmod(d, 0o3770)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o3770
    assert stat.S_ISDIR(os.stat(d).st_mode)
    # fchmod through an open descriptor
    with open(f, "rb") as fh:
        os.fchmod(fh.fileno(), 0o640)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


def test_chown(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    os.chown(f, 1000, 1001)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    os.chown(f, -1, 2000)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1000, 2000)
    os.chown(f, 3000, -1)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (3000, 2000)
    # chown of a symlink itself
    os.symlink("f", work / "l")
    os.lchown(work / "l", 1234, 5678)
    assert (os.lstat(work / "l").st_uid, os.lstat(work / "l").st_gid) == (1234, 5678)
    assert os.stat(work / "l").st_uid == 3000
    # chown by root clears setuid on a regular file, as on local disk
    os.chmod(f, 0o4755)
    os.chown(f, 1000, 1000)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755


def test_truncate_up_and_down(tmp_path: Path, work: Path) -> None:
    data = random.Random(1).randbytes(3 * MiB + 4321)
    results = []
    for root in both(tmp_path, work):
        f = root / "f"
        f.write_bytes(data)
        os.truncate(f, 1536 * 1024 + 7)  # down, into the middle of a block
        assert os.stat(f).st_size == 1536 * 1024 + 7
        os.truncate(f, 4 * MiB + 11)  # up: a hole that must read as zeros
        assert os.stat(f).st_size == 4 * MiB + 11
        g = root / "g"
        g.write_bytes(b"abcdef")
        os.truncate(g, 2)
        os.truncate(g, 10)
        # ftruncate on an open descriptor with unflushed data
        with open(root / "h", "w+b") as fh:
            fh.write(b"0123456789" * 1000)
            fh.flush()
            os.ftruncate(fh.fileno(), 15)
            fh.seek(0)
            assert fh.read() == b"012345678901234"
            os.ftruncate(fh.fileno(), 20)
            fh.seek(30)
            fh.write(b"Z")
        results.append({n: (root / n).read_bytes() for n in ("f", "g", "h")})
    local, mounted = results
    assert mounted["g"] == b"ab" + b"\0" * 8
    assert mounted["h"] == b"012345678901234" + b"\0" * 15 + b"Z"
    assert mounted["f"][: 1536 * 1024 + 7] == data[: 1536 * 1024 + 7]
    assert mounted["f"][1536 * 1024 + 7 :] == b"\0" * (4 * MiB + 11 - (1536 * 1024 + 7))
    assert mounted == local


def test_truncate_then_reopen(work: Path) -> None:
    """The new size is durable: another open (and a fresh page cache) sees it."""
    f = work / "f"
    data = os.urandom(2 * MiB + 5)
    f.write_bytes(data)
    os.truncate(f, 100)
    with open(f, "rb") as fh:
        assert fh.read() == data[:100]
    os.truncate(f, 2 * MiB)
    with open(f, "rb") as fh:
        got = fh.read()
    assert len(got) == 2 * MiB
    assert got[:100] == data[:100]
    assert got[100:] == b"\0" * (2 * MiB - 100)


# ------------------------------------------------------------------------ utimens


def test_utime_ns_exact(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    a, m = 1_000_000_123_456_789, 1_200_000_987_654_321
    os.utime(f, ns=(a, m))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a, m)
    d = work / "d"
    d.mkdir()
    os.utime(d, ns=(5, 7))
    st = os.stat(d)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5, 7)
    # still the same after the kernel's attribute cache expires
    time.sleep(1.2)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a, m)


def test_utime_now_and_omit(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    a, m = 1_000_000_000_000_000_001, 1_100_000_000_000_000_002
    os.utime(f, ns=(a, m))
    before = time.time_ns()
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))
    after = time.time_ns()
    st = os.stat(f)
    assert st.st_atime_ns == a, "UTIME_OMIT changed atime"
    assert before - 10**9 <= st.st_mtime_ns <= after + 10**9
    os.utime(f, ns=(a, m))
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(f)
    assert st.st_mtime_ns == m, "UTIME_OMIT changed mtime"
    assert before - 10**9 <= st.st_atime_ns <= time.time_ns() + 10**9
    # both omitted: nothing changes
    os.utime(f, ns=(a, m))
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (a, m)
    # explicit seconds + nanoseconds
    utimensat(f, (12345, 678), (0, UTIME_OMIT))
    assert os.stat(f).st_atime_ns == 12345 * 10**9 + 678
    assert os.stat(f).st_mtime_ns == m


def test_utime_default_is_now(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    os.utime(f, ns=(10**18, 10**18))
    before = time.time_ns()
    os.utime(f)
    after = time.time_ns()
    st = os.stat(f)
    for t in (st.st_atime_ns, st.st_mtime_ns):
        assert before - 10**9 <= t <= after + 10**9


def test_touch_d_matches_local(tmp_path: Path, work: Path) -> None:
    out = []
    for root in both(tmp_path, work):
        f = root / "f"
        subprocess.run(["touch", "-d", "2001-02-03 04:05:06.123456789 UTC", str(f)], check=True)
        subprocess.run(["touch", "-a", "-d", "1999-12-31 23:59:59.5 UTC", str(f)], check=True)
        st = os.stat(f)
        out.append((st.st_atime_ns, st.st_mtime_ns, st.st_size))
        subprocess.run(["touch", "-m", "-d", "2010-01-01 00:00:00 UTC", str(f)], check=True)
        st = os.stat(f)
        out.append((st.st_atime_ns, st.st_mtime_ns, st.st_size))
    assert out[0] == (946684799500000000, 981173106123456789, 0)
    assert out[:2] == out[2:]


# ------------------------------------------------------------------- mkdir/rmdir


def test_mkdir_rmdir(work: Path) -> None:
    d = work / "d"
    os.mkdir(d, 0o750)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    expect_errno(errno.EEXIST, os.mkdir, d)
    (d / "f").write_bytes(b"x")
    os.mkdir(d / "sub")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, d / "f")
    expect_errno(errno.EISDIR, os.unlink, d / "sub")
    expect_errno(errno.ENOENT, os.rmdir, d / "missing")
    expect_errno(errno.ENOENT, os.mkdir, work / "missing" / "x")
    os.unlink(d / "f")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    os.rmdir(d / "sub")
    os.rmdir(d)
    assert not d.exists()
    assert os.listdir(work) == []
    # a name can be reused for a different type
    (work / "d").write_bytes(b"now a file")
    assert (work / "d").read_bytes() == b"now a file"


def test_mkdir_mode_and_umask(work: Path) -> None:
    old = os.umask(0o027)
    try:
        os.mkdir(work / "d", 0o777)
        fd = os.open(work / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(work / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(work / "f").st_mode) == 0o640


# ------------------------------------------------------------------------- open


def test_open_excl(work: Path) -> None:
    f = work / "f"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"first")
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    assert f.read_bytes() == b"first"
    # O_EXCL on a dangling symlink also fails
    os.symlink("nowhere", work / "dangling")
    expect_errno(errno.EEXIST, os.open, work / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    # O_CREAT without O_EXCL opens the existing file
    fd = os.open(f, os.O_CREAT | os.O_RDONLY)
    assert os.read(fd, 100) == b"first"
    os.close(fd)
    # many exclusive creates racing for one name: exactly one wins
    wins = []

    def racer(i: int) -> None:
        try:
            fd = os.open(work / "race", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(i).encode())
        os.close(fd)
        wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert (work / "race").read_bytes() == str(wins[0]).encode()


def test_open_trunc(work: Path) -> None:
    f = work / "f"
    f.write_bytes(os.urandom(3 * MiB))
    ino = os.stat(f).st_ino
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"new")
    os.close(fd)
    assert f.read_bytes() == b"new"
    assert os.stat(f).st_ino == ino
    # O_TRUNC on a read-write open with nothing written leaves an empty file
    os.close(os.open(f, os.O_RDWR | os.O_TRUNC))
    assert f.read_bytes() == b""
    assert os.stat(f).st_size == 0


def test_open_append(tmp_path: Path, work: Path) -> None:
    res = []
    for root in both(tmp_path, work):
        f = root / "f"
        f.write_bytes(b"start:")
        a = os.open(f, os.O_WRONLY | os.O_APPEND)
        b = os.open(f, os.O_WRONLY | os.O_APPEND)
        for i in range(50):
            os.write(a if i % 2 else b, f"<{i}>".encode() * (i + 1))
        # lseek does not defeat O_APPEND
        os.lseek(a, 0, os.SEEK_SET)
        os.write(a, b"END")
        os.close(a)
        os.close(b)
        # reopen with O_APPEND after close: appends to the durable size
        with open(f, "ab") as fh:
            fh.write(b"+more")
        res.append(f.read_bytes())
    assert res[1].startswith(b"start:<0><1><1><2><2><2>")
    assert res[1].endswith(b"END+more")
    assert res[0] == res[1]


# ----------------------------------------------------------------- read/write


def test_pwrite_pread_random_offsets(tmp_path: Path, work: Path) -> None:
    rnd = random.Random(42)
    ops = []
    for _ in range(300):
        off = rnd.choice([rnd.randrange(0, 6 * MiB), rnd.randrange(0, 64) * MiB // 4])
        n = rnd.choice([1, 7, 4096, rnd.randrange(1, 300_000), MiB, MiB + 1])
        ops.append((off, rnd.randbytes(n), rnd.random()))
    contents = []
    for root in both(tmp_path, work):
        f = root / "f"
        fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
        for off, data, r in ops:
            assert os.pwrite(fd, data, off) == len(data)
            if r < 0.05:
                os.fsync(fd)
            elif r < 0.08:
                os.close(fd)
                fd = os.open(f, os.O_RDWR)
            elif r < 0.3:
                # read back a random window, overlapping what was just written
                s = max(0, off - 1000)
                got = os.pread(fd, len(data) + 2000, s)
                assert got[off - s : off - s + len(data)] == data
        os.close(fd)
        contents.append(f.read_bytes())
    local, mounted = contents
    assert len(mounted) == len(local)
    assert mounted == local
    # preads of the final file at arbitrary offsets
    fd = os.open(work / "f", os.O_RDONLY)
    try:
        for _ in range(100):
            off = rnd.randrange(0, len(local) + 10)
            n = rnd.randrange(0, 3 * MiB)
            assert os.pread(fd, n, off) == local[off : off + n]
    finally:
        os.close(fd)


def test_read_sees_newest_of_overlapping_writes(work: Path) -> None:
    """Reads while newer data is still uploading must show the newest bytes, never older
    committed data laid over them."""
    f = work / "f"
    base = random.Random(3).randbytes(4 * MiB)
    f.write_bytes(base)
    fd = os.open(f, os.O_RDWR)
    try:
        want = bytearray(base)
        for i in range(10):
            new = bytes([i + 1]) * (2 * MiB + 4096)  # two full blocks and a bit: uploads
            off = (i * 300_000) % (2 * MiB)
            os.pwrite(fd, new, off)
            want[off : off + len(new)] = new
            got = os.pread(fd, len(want), 0)
            bad = next((j for j in range(len(want)) if got[j] != want[j]), None)
            assert bad is None, f"round {i}: first wrong byte at {bad}"
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(want)


@pytest.mark.parametrize("offset", [3 * GiB, 6 * GiB + 123])
def test_sparse_file_far_hole(work: Path, offset: int) -> None:
    f = work / "sparse"
    with open(f, "wb") as fh:
        fh.write(b"head")
        fh.seek(offset)
        fh.write(b"tail-data")
    assert os.stat(f).st_size == offset + 9
    with open(f, "rb") as fh:
        assert fh.read(4) == b"head"
        for off in (4, MiB, GiB, offset - 5000, offset - 1):
            fh.seek(off)
            want = min(4096, offset - off)
            assert fh.read(want) == b"\0" * want, off
        fh.seek(offset - 3)
        assert fh.read(100) == b"\0\0\0tail-data"
        assert fh.read(100) == b""
    # writing into the middle of the hole
    with open(f, "r+b") as fh:
        fh.seek(2 * GiB + 5)
        fh.write(b"middle")
    with open(f, "rb") as fh:
        fh.seek(2 * GiB)
        assert fh.read(16) == b"\0" * 5 + b"middle" + b"\0" * 5
    assert os.stat(f).st_size == offset + 9


def test_fsync_and_flush(work: Path) -> None:
    f = work / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR)
    data = os.urandom(2 * MiB + 3)
    os.write(fd, data)
    os.fsync(fd)
    os.fdatasync(fd)
    # visible through a second descriptor while the first is open
    with open(f, "rb") as fh:
        assert fh.read() == data
    os.write(fd, b"more")
    os.close(fd)
    assert f.read_bytes() == data + b"more"
    dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    # fsync on a read-only descriptor is allowed too
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())


def test_unlink_open_file(work: Path) -> None:
    f = work / "f"
    big = os.urandom(3 * MiB)
    f.write_bytes(big)
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert "f" not in os.listdir(work)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(big), 0) == big
        os.pwrite(fd, b"XYZ", MiB)
        os.pwrite(fd, b"appended", len(big))
        want = big[:MiB] + b"XYZ" + big[MiB + 3 :] + b"appended"
        assert os.fstat(fd).st_size == len(want)
        assert os.pread(fd, len(want) + 10, 0) == want
        os.ftruncate(fd, 10)
        assert os.pread(fd, 100, 0) == want[:10]
        # the name can be reused at once without affecting the open file
        f.write_bytes(b"new file")
        assert os.pread(fd, 100, 0) == want[:10]
    finally:
        os.close(fd)
    assert f.read_bytes() == b"new file"


def test_unlink_open_file_created_and_unflushed(work: Path) -> None:
    f = work / "tmpfile"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"a" * 100)
        os.unlink(f)
        os.write(fd, b"b" * (2 * MiB))
        assert os.pread(fd, 200, 0) == b"a" * 100 + b"b" * 100
        assert os.fstat(fd).st_size == 100 + 2 * MiB
    finally:
        os.close(fd)
    assert os.listdir(work) == []


# --------------------------------------------------------------------- links


def test_hard_links(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"shared")
    (work / "d").mkdir()
    os.link(f, work / "g")
    os.link(f, work / "d" / "h")
    st = os.stat(f)
    assert st.st_nlink == 3
    assert os.stat(work / "g").st_ino == st.st_ino
    assert os.stat(work / "d" / "h").st_nlink == 3
    with open(work / "g", "ab") as fh:
        fh.write(b"+")
    assert (work / "d" / "h").read_bytes() == b"shared+"
    assert f.read_bytes() == b"shared+"
    os.unlink(f)
    assert os.stat(work / "g").st_nlink == 2
    assert (work / "g").read_bytes() == b"shared+"
    os.rename(work / "g", work / "d" / "g2")
    assert os.stat(work / "d" / "h").st_nlink == 2
    expect_errno(errno.EEXIST, os.link, work / "d" / "h", work / "d" / "g2")
    expect_errno(errno.EPERM, os.link, work / "d", work / "dlink")
    expect_errno(errno.ENOENT, os.link, work / "missing", work / "x")
    os.unlink(work / "d" / "g2")
    assert os.stat(work / "d" / "h").st_nlink == 1
    # rename of one link over another link of the same inode: a no-op
    os.link(work / "d" / "h", work / "d" / "h2")
    os.rename(work / "d" / "h", work / "d" / "h2")
    assert sorted(os.listdir(work / "d")) == ["h", "h2"]
    assert os.stat(work / "d" / "h").st_nlink == 2


def test_directory_nlink(work: Path) -> None:
    d = work / "d"
    d.mkdir()
    assert os.stat(d).st_nlink == 2
    for i in range(3):
        (d / f"s{i}").mkdir()
    (d / "file").write_bytes(b"")
    assert os.stat(d).st_nlink == 5
    assert os.stat(d / "s0").st_nlink == 2
    os.rmdir(d / "s0")
    assert os.stat(d).st_nlink == 4
    os.rename(d / "s1", work / "moved")
    assert os.stat(d).st_nlink == 3
    assert os.stat(work).st_nlink == 4  # 2 + d + moved
    os.rename(work / "moved", d / "back")
    assert os.stat(d).st_nlink == 4
    assert os.stat(work).st_nlink == 3


def test_symlink_readlink(work: Path) -> None:
    (work / "target").write_bytes(b"t")
    os.symlink("target", work / "l")
    assert os.readlink(work / "l") == "target"
    assert (work / "l").read_bytes() == b"t"
    st = os.lstat(work / "l")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    for n in (1, 255, 1000, 4080, 4081, 4095):
        t = ("x" * 200 + "/") * (n // 201) + "y" * (n % 201)
        assert len(t) == n
        os.symlink(t, work / f"s{n}")
        assert os.readlink(work / f"s{n}") == t
        assert os.lstat(work / f"s{n}").st_size == n
    expect_errno(errno.ENAMETOOLONG, os.symlink, "z" * 4096, work / "too_long")
    assert not os.path.lexists(work / "too_long")
    expect_errno(errno.EEXIST, os.symlink, "x", work / "l")
    expect_errno(errno.EINVAL, os.readlink, work / "target")
    # non-UTF-8 bytes in the target survive
    os.symlink(b"\xff\xfe/raw", os.fsencode(work / "raw"))
    assert os.readlink(os.fsencode(work / "raw")) == b"\xff\xfe/raw"


# -------------------------------------------------------------------- rename


def test_rename_replaces_file_atomically(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"old" * 1000)
    old_fd = os.open(f, os.O_RDONLY)
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                data = f.read_bytes()
            except FileNotFoundError:
                errors.append("ENOENT: the name was missing during a rename")
                continue
            if data not in (b"old" * 1000, *(f"v{i}".encode() * 1000 for i in range(60))):
                errors.append(f"torn content {data[:20]!r}")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            tmp = work / f"tmp{i}"
            tmp.write_bytes(f"v{i}".encode() * 1000)
            os.rename(tmp, f)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:5]
    assert f.read_bytes() == b"v59" * 1000
    assert os.listdir(work) == ["f"]
    # the replaced file stays readable through a descriptor opened before
    assert os.read(old_fd, 3000) == b"old" * 1000
    os.close(old_fd)


def test_rename_dirs(work: Path) -> None:
    a, b = work / "a", work / "b"
    a.mkdir()
    (a / "inner").write_bytes(b"x")
    b.mkdir()
    os.rename(a, b)  # over an empty directory
    assert not a.exists()
    assert (b / "inner").read_bytes() == b"x"
    c = work / "c"
    c.mkdir()
    (c / "f").write_bytes(b"")
    e = expect_errno((errno.ENOTEMPTY, errno.EEXIST), os.rename, b, c)
    assert e.errno == errno.ENOTEMPTY  # what Linux local filesystems report
    (b / "sub").mkdir()
    (b / "sub" / "subsub").mkdir()
    expect_errno(errno.EINVAL, os.rename, b, b / "sub" / "x")
    expect_errno(errno.EINVAL, os.rename, b, b / "sub" / "subsub" / "x")
    expect_errno(errno.ENOTDIR, os.rename, b, c / "f")
    expect_errno(errno.EISDIR, os.rename, c / "f", b)
    expect_errno(errno.ENOENT, os.rename, work / "missing", work / "x")
    # moving a directory to another parent keeps its contents
    os.rename(b, c / "moved")
    assert (c / "moved" / "inner").read_bytes() == b"x"
    assert os.path.isdir(c / "moved" / "sub" / "subsub")
    assert sorted(os.listdir(work)) == ["c"]
    assert (
        os.stat(c / "moved" / "sub" / "subsub" / "..").st_ino == os.stat(c / "moved" / "sub").st_ino
    )
    # rename to itself is a no-op
    os.rename(c / "f", c / "f")
    assert (c / "f").exists()


def test_renameat2_noreplace(work: Path) -> None:
    (work / "a").write_bytes(b"a")
    (work / "b").write_bytes(b"b")
    expect_errno(errno.EEXIST, renameat2, work / "a", work / "b", RENAME_NOREPLACE)
    assert (work / "a").read_bytes() == b"a"
    assert (work / "b").read_bytes() == b"b"
    renameat2(work / "a", work / "c", RENAME_NOREPLACE)
    assert not (work / "a").exists()
    assert (work / "c").read_bytes() == b"a"


def test_renameat2_exchange(work: Path) -> None:
    (work / "a").write_bytes(b"file a")
    (work / "d").mkdir()
    (work / "d" / "inner").write_bytes(b"i")
    ia, id_ = os.stat(work / "a").st_ino, os.stat(work / "d").st_ino
    renameat2(work / "a", work / "d", RENAME_EXCHANGE)
    assert (work / "d").read_bytes() == b"file a"
    assert (work / "a" / "inner").read_bytes() == b"i"
    assert os.stat(work / "d").st_ino == ia
    assert os.stat(work / "a").st_ino == id_
    # across directories
    (work / "x").mkdir()
    (work / "x" / "y").write_bytes(b"y")
    renameat2(work / "x" / "y", work / "d", RENAME_EXCHANGE)
    assert (work / "d").read_bytes() == b"y"
    assert (work / "x" / "y").read_bytes() == b"file a"
    expect_errno(errno.ENOENT, renameat2, work / "a", work / "missing", RENAME_EXCHANGE)
    expect_errno(
        errno.EINVAL, renameat2, work / "a", work / "b", RENAME_EXCHANGE | RENAME_NOREPLACE
    )
    # exchanging a directory with its own descendant is refused
    expect_errno(errno.EINVAL, renameat2, work / "a", work / "a" / "inner", RENAME_EXCHANGE)


# ---------------------------------------------------------------- special files


def test_mkfifo(work: Path) -> None:
    p = work / "fifo"
    os.mkfifo(p, 0o640)
    st = os.lstat(p)
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    # and it works as a pipe
    got: list[bytes] = []

    def reader() -> None:
        with open(p, "rb") as fh:
            got.append(fh.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(p, "wb") as fh:
        fh.write(b"through the fifo")
    t.join(10)
    assert got == [b"through the fifo"]
    os.unlink(p)


def test_mknod_device_and_socket(work: Path) -> None:
    os.mknod(work / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.lstat(work / "chr")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(1, 3)
    old = os.getcwd()
    os.chdir(work)  # keep the socket path short
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("sock")
        s.listen(1)
        assert stat.S_ISSOCK(os.lstat("sock").st_mode)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect("sock")
        conn, _ = s.accept()
        c.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        for x in (c, conn, s):
            x.close()
    finally:
        os.chdir(old)
    assert sorted(os.listdir(work)) == ["chr", "sock"]


# -------------------------------------------------------------------- readdir


def _fill_dir(d: Path, n: int, prefix: str = "entry") -> set[str]:
    """n empty files in d, created through the mount by 8 threads. The kernel serialises
    creates in one directory, but one thread's close and lookup overlap another's
    create."""
    names = set(entry_names(n, prefix))

    def create(name: str) -> None:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, names))
    return names


def _fill_dir_from_another_client(
    m: Mount, d: Path, n: int, tmp: Path, prefix: str = "entry"
) -> set[str]:
    """n empty files in d, created by a second client of m's store without FUSE
    (tests/fuse/filler.py): the tests that use it are about listing a large directory
    through the mount; 20,000 creates through FUSE took 149 s of them."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuse.filler",
            m.store,
            str(d.relative_to(m.path)),
            str(n),
            prefix,
            str(tmp / "filler-cache"),
            *([str(m.key_file)] if m.key_file else []),
        ],
        check=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],  # `-m tests...` from any directory
    )
    return set(entry_names(n, prefix))


def _list_checked(d: Path) -> list[str]:
    names = os.listdir(d)
    dups = {n for n in names if names.count(n) > 1} if len(set(names)) != len(names) else set()
    assert not dups, f"duplicate entries: {sorted(dups)[:10]}"
    return names


def test_readdir_many(work: Path) -> None:
    names = _fill_dir(work, 2000)
    listed = _list_checked(work)
    assert set(listed) == names
    # scandir types and a second pass agree
    with os.scandir(work) as it:
        ents = list(it)
    assert len(ents) == 2000
    assert all(e.is_file(follow_symlinks=False) for e in ents)
    assert set(_list_checked(work)) == names


# PLAIN_ONLY: the two 20,000-entry listings (27 s) are about listings that scale, which
# encryption does not change; the 2,000-entry ones list through the same paths encrypted.
@pytest.mark.slow
@PLAIN_ONLY
def test_readdir_20000(shared_mount: Mount, work: Path, tmp_path: Path) -> None:
    names = _fill_dir_from_another_client(shared_mount, work, 20000, tmp_path)
    assert set(_list_checked(work)) == names
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: os.unlink(work / n), list(names)[:5000]))
    assert set(_list_checked(work)) == set(list(names)[5000:])


def _readdir_under_churn(stable: set[str], d: Path, rounds: int) -> None:
    stop = threading.Event()
    churn_err: list[BaseException] = []

    def churn() -> None:
        i = 0
        try:
            while not stop.is_set():
                p = d / f"churn-{i:06d}"
                p.write_bytes(b"")
                if i >= 20:
                    os.unlink(d / f"churn-{i - 20:06d}")
                if i % 7 == 0:
                    os.rename(d / f"churn-{i:06d}", d / f"churn-{i:06d}")
                i += 1
        except BaseException as e:
            churn_err.append(e)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(rounds):
            listed = _list_checked(d)
            missing = stable - set(listed)
            assert not missing, f"{len(missing)} stable entries missing, e.g. {sorted(missing)[:5]}"
            assert all(n in stable or n.startswith("churn-") for n in listed)
    finally:
        stop.set()
        t.join()
    assert not churn_err, churn_err


def test_readdir_while_changing(work: Path) -> None:
    _readdir_under_churn(_fill_dir(work, 2000, "stable"), work, 5)


@pytest.mark.slow
@PLAIN_ONLY
def test_readdir_20000_while_changing(shared_mount: Mount, work: Path, tmp_path: Path) -> None:
    stable = _fill_dir_from_another_client(shared_mount, work, 20000, tmp_path, "stable")
    _readdir_under_churn(stable, work, 5)


# -------------------------------------------------------------------- statfs


def test_statfs(work: Path) -> None:
    s = os.statvfs(work)
    assert s.f_namemax == 255
    assert s.f_bsize > 0
    assert s.f_frsize > 0
    assert s.f_blocks > 0
    assert 0 < s.f_bfree <= s.f_blocks
    assert 0 < s.f_bavail <= s.f_blocks
    assert s.f_files > 0
    assert 0 < s.f_ffree <= s.f_files
    # free space is at least a terabyte ("unlimited" like EFS)
    assert s.f_bavail * s.f_frsize >= 1 << 40
    # df works on it
    out = subprocess.run(["df", "-P", str(work)], capture_output=True, text=True, check=True)
    assert "efsish" in out.stdout or str(work).startswith(out.stdout.split()[-1])
    # inodes in use grow when files are created
    before = s.f_files - s.f_ffree
    _fill_dir(work, 10)
    s2 = os.statvfs(work)
    assert s2.f_files - s2.f_ffree >= before + 10


# -------------------------------------------------------------------- xattrs


def test_xattrs(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"")
    expect_errno(errno.ENODATA, os.getxattr, f, "user.missing")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.b", b"\0binary\xff" * 100)
    assert os.getxattr(f, "user.a") == b"1"
    assert os.getxattr(f, "user.b") == b"\0binary\xff" * 100
    assert sorted(os.listxattr(f)) == ["user.a", "user.b"]
    expect_errno(errno.EEXIST, os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    assert os.getxattr(f, "user.a") == b"1"
    expect_errno(errno.ENODATA, os.setxattr, f, "user.c", b"2", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, f, "user.c")
    os.setxattr(f, "user.a", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.a") == b"replaced"
    os.setxattr(f, "user.c", b"created", os.XATTR_CREATE)
    assert os.getxattr(f, "user.c") == b"created"
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.empty") == b""
    os.removexattr(f, "user.b")
    expect_errno(errno.ENODATA, os.removexattr, f, "user.b")
    assert sorted(os.listxattr(f)) == ["user.a", "user.c", "user.empty"]
    # on directories and (not following) symlinks' targets
    (work / "d").mkdir()
    os.setxattr(work / "d", "user.dir", b"yes")
    assert os.listxattr(work / "d") == ["user.dir"]
    os.symlink("f", work / "l")
    assert os.getxattr(work / "l", "user.c") == b"created"  # follows
    # xattrs move with rename and are shared by hard links
    os.rename(f, work / "g")
    os.link(work / "g", work / "h")
    assert os.getxattr(work / "h", "user.c") == b"created"
    # a 64 KiB value
    big = os.urandom(65536)
    os.setxattr(work / "g", "user.big", big)
    assert os.getxattr(work / "g", "user.big") == big
    # setfattr/getfattr agree
    subprocess.run(
        ["setfattr", "-n", "user.tool", "-v", "from-setfattr", str(work / "g")], check=True
    )
    out = subprocess.run(
        ["getfattr", "-d", str(work / "g")], capture_output=True, text=True, check=True
    ).stdout
    assert 'user.tool="from-setfattr"' in out
    # the kernel refuses names in the user namespace longer than 255 bytes
    expect_errno(errno.ERANGE, os.setxattr, work / "g", "user." + "n" * 251, b"x")
    os.setxattr(work / "g", "user." + "n" * 250, b"max")
    assert os.getxattr(work / "g", "user." + "n" * 250) == b"max"


def test_xattr_survive_cache_expiry(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.k", b"v")
    time.sleep(1.2)
    assert os.getxattr(f, "user.k") == b"v"
    assert os.listxattr(f) == ["user.k"]


# ----------------------------------------------------------------- name lengths


def test_name_length_limits(work: Path) -> None:
    ok, bad = "n" * 255, "n" * 256
    (work / "src").write_bytes(b"s")
    # 255 bytes is fine everywhere
    fd = os.open(work / ok, os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    assert ok in os.listdir(work)
    os.unlink(work / ok)
    os.mkdir(work / ok)
    os.rmdir(work / ok)
    os.symlink("src", work / ok)
    os.unlink(work / ok)
    os.link(work / "src", work / ok)
    os.unlink(work / ok)
    os.rename(work / "src", work / ok)
    os.rename(work / ok, work / "src")
    # multi-byte UTF-8: 127 × 2 bytes + 1 = 255 bytes ok; 128 × 2 = 256 bytes too long
    os.mkdir(work / ("é" * 127 + "x"))
    expect_errno(errno.ENAMETOOLONG, os.mkdir, work / ("é" * 128))
    # 256 bytes: ENAMETOOLONG for every operation that creates a name
    expect_errno(errno.ENAMETOOLONG, os.open, work / bad, os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, work / bad)
    expect_errno(errno.ENAMETOOLONG, os.rename, work / "src", work / bad)
    expect_errno(errno.ENAMETOOLONG, os.symlink, "src", work / bad)
    expect_errno(errno.ENAMETOOLONG, os.link, work / "src", work / bad)
    expect_errno(errno.ENAMETOOLONG, os.mkfifo, work / bad)
    expect_errno(errno.ENAMETOOLONG, os.stat, work / bad)
    assert sorted(os.listdir(work)) == sorted(["src", "é" * 127 + "x"])
    assert (work / "src").read_bytes() == b"s"


def test_odd_names(tmp_path: Path, work: Path) -> None:
    names = [
        " leading space",
        "trailing space ",
        "-dash",
        "with\nnewline",
        "tab\there",
        "ünïcödé",
        "日本語",
        "emoji-😀",
        "quote'\"",
        "back\\slash",
        "*?[glob]",
        ".hidden",
        "..dots",
        "...",
    ]
    for n in names:
        (work / n).write_text(n)
    raw = b"\xff\xfe-not-utf8"
    fd = os.open(os.fsencode(work) + b"/" + raw, os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    assert sorted(os.listdir(work)) == sorted([*names, os.fsdecode(raw)])
    assert raw in os.listdir(os.fsencode(work))
    for n in names:
        assert (work / n).read_text() == n
    # names that differ only in case are different files
    (work / "Case").write_text("upper")
    (work / "case").write_text("lower")
    assert (work / "Case").read_text() == "upper"


# --------------------------------------------------------------- timestamps


def _settle() -> None:
    time.sleep(0.02)


def test_mtime_ctime_on_write(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x" * 100)
    old = 1_000_000_000 * 10**9
    os.utime(f, ns=(old, old))
    c0 = os.stat(f).st_ctime_ns
    _settle()
    t0 = time.time_ns()
    with open(f, "r+b") as fh:
        fh.seek(50)
        fh.write(b"y")
        fh.flush()
        st = os.fstat(fh.fileno())
        assert st.st_mtime_ns >= t0 - 10**9, "mtime not updated by write while open"
    st = os.stat(f)
    assert st.st_mtime_ns >= t0 - 10**9, "mtime not updated by write"
    assert st.st_ctime_ns > c0, "ctime not updated by write"
    assert st.st_atime_ns == old, "a write changed atime"
    # truncate changes mtime and ctime too
    os.utime(f, ns=(old, old))
    c1 = os.stat(f).st_ctime_ns
    _settle()
    os.truncate(f, 10)
    st = os.stat(f)
    assert st.st_mtime_ns > old
    assert st.st_ctime_ns > c1
    # the mtime set by write is durable (same after the attribute cache expires)
    m = st.st_mtime_ns
    time.sleep(1.2)
    assert os.stat(f).st_mtime_ns == m


def test_mtime_not_changed_by_read_or_open(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"data")
    os.utime(f, ns=(2 * 10**18, 10**18))  # atime > mtime: relatime will not touch it
    st0 = os.stat(f)
    _settle()
    assert f.read_bytes() == b"data"
    os.close(os.open(f, os.O_RDWR))  # an open for writing without writes
    time.sleep(1.2)
    st = os.stat(f)
    assert st.st_mtime_ns == st0.st_mtime_ns
    assert st.st_ctime_ns == st0.st_ctime_ns


def test_ctime_on_metadata_changes(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"x")
    m = os.stat(f).st_mtime_ns

    def ctime_changes(action) -> None:
        c = os.stat(f).st_ctime_ns
        _settle()
        action()
        st = os.stat(f)
        assert st.st_ctime_ns > c, action
        assert st.st_mtime_ns == m, f"{action} changed mtime"

    ctime_changes(lambda: os.chmod(f, 0o600))
    ctime_changes(lambda: os.chown(f, 1000, 1000))
    ctime_changes(lambda: os.link(f, work / "g"))
    ctime_changes(lambda: os.unlink(work / "g"))
    ctime_changes(lambda: os.setxattr(f, "user.x", b"1"))

    def rename_there_and_back() -> None:
        os.rename(f, work / "f2")
        os.rename(work / "f2", f)

    ctime_changes(rename_there_and_back)


def test_dir_times_on_entry_changes(work: Path) -> None:
    d = work / "d"
    d.mkdir()
    other = work / "other"
    other.mkdir()
    old = 10**18

    def changes_dir(action, *dirs: Path) -> None:
        for x in dirs:
            os.utime(x, ns=(old, old))
        cs = [os.stat(x).st_ctime_ns for x in dirs]
        _settle()
        action()
        for x, c in zip(dirs, cs, strict=True):
            st = os.stat(x)
            assert st.st_mtime_ns > old, f"{action}: mtime of {x.name} not updated"
            assert st.st_ctime_ns > c, f"{action}: ctime of {x.name} not updated"

    changes_dir(lambda: (d / "f").write_bytes(b""), d)
    changes_dir(lambda: os.mkdir(d / "sub"), d)
    changes_dir(lambda: os.symlink("x", d / "sym"), d)
    changes_dir(lambda: os.link(d / "f", d / "f2"), d)
    changes_dir(lambda: os.unlink(d / "f2"), d)
    changes_dir(lambda: os.rename(d / "f", d / "g"), d)
    changes_dir(lambda: os.rename(d / "g", other / "g"), d, other)
    changes_dir(lambda: os.rmdir(d / "sub"), d)
    changes_dir(lambda: os.mkfifo(d / "fifo"), d)
    # writing a file inside does not change the directory's mtime
    os.utime(d, ns=(old, old))
    with open(d / "fifo2", "wb"):
        pass
    os.utime(d, ns=(old, old))
    (other / "g").write_bytes(b"content")
    assert os.stat(d).st_mtime_ns == old


def test_atime_relatime(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"content")
    st = os.stat(f)
    # atime older than mtime: a read must update it (relatime)
    os.utime(f, ns=(st.st_mtime_ns - 10 * 10**9, st.st_mtime_ns))
    old_atime = os.stat(f).st_atime_ns
    t0 = time.time_ns()
    assert f.read_bytes() == b"content"
    new = poll(lambda: os.stat(f).st_atime_ns > old_atime, timeout=3)
    assert new, "atime not updated by a read although atime <= mtime"
    assert os.stat(f).st_atime_ns >= t0 - 10**9
    # atime more than a day old (but newer than mtime): updated too
    day = 24 * 3600 * 10**9
    now = time.time_ns()
    os.utime(f, ns=(now - 2 * day, now - 3 * day))
    assert f.read_bytes() == b"content"
    assert poll(lambda: os.stat(f).st_atime_ns > now - day, timeout=3), "day-old atime kept"
    # and the mtime stays as it was
    assert os.stat(f).st_mtime_ns == now - 3 * day


# ------------------------------------------------------------------ persistence


def _populate(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "small").write_bytes(b"small file")
    (root / "dir" / "big").write_bytes(random.Random(7).randbytes(5 * MiB + 3))
    os.link(root / "dir" / "small", root / "dir" / "sub" / "hardlink")
    os.symlink("../small", root / "dir" / "sub" / "symlink")
    os.chmod(root / "dir" / "small", 0o640)
    os.mkdir(root / "private", 0o700)
    (root / "private" / "exec").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "private" / "exec", 0o755)
    os.chown(root / "private" / "exec", 1000, 1000)
    os.setxattr(root / "dir" / "small", "user.k", b"v")
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as fh:
        fh.seek(64 * MiB)
        fh.write(b"end")
    with open(root / "dir" / "big", "r+b") as fh:  # a random write into a large file
        fh.seek(2 * MiB + 100)
        fh.write(b"PATCHED")
    os.utime(root / "dir" / "sub", ns=(123, 456))
    os.utime(root / "dir", ns=(1, 10**18))


def test_data_persists_across_remount(mounter, tmp_path: Path) -> None:
    m: Mount = mounter()
    local = tmp_path / "local"
    local.mkdir()
    _populate(local)
    _populate(m.path)
    # same as on local disk (times differ: the two trees were made at different moments)
    assert_same_tree(snapshot(local, times=False), snapshot(m.path, times=False))
    before = snapshot(m.path)
    efsish("umount", str(m.path))
    assert not is_mounted(m.path)
    m2 = mounter(m.store)
    assert_same_tree(before, snapshot(m2.path))
    # and it is still writable
    (m2.path / "dir" / "small").write_bytes(b"changed")
    assert (m2.path / "dir" / "sub" / "hardlink").read_bytes() == b"changed"
    efsish("umount", str(m2.path))
    assert efsish("fsck", m.store, "-q", *m.key_args()).returncode == 0


# ------------------------------------------------------------ more edge cases


def test_utime_on_open_dirty_file_survives_close(tmp_path: Path, work: Path) -> None:
    out = []
    for root in both(tmp_path, work):
        f = root / "f"
        fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, os.urandom(3 * MiB))
        os.utime(fd, ns=(1_111_111_111_000_000_001, 1_222_222_222_000_000_002))
        os.write(fd, b"")  # a zero-length write changes nothing
        os.close(fd)
        time.sleep(1.2)  # past the kernel attribute cache
        st = os.stat(f)
        out.append((st.st_atime_ns, st.st_mtime_ns, st.st_size))
    assert out[1] == out[0]


def test_posix_fallocate(tmp_path: Path, work: Path) -> None:
    res = []
    for root in both(tmp_path, work):
        f = root / "f"
        f.write_bytes(b"abc")
        fd = os.open(f, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 2 * MiB)
        finally:
            os.close(fd)
        res.append((os.stat(f).st_size, f.read_bytes()))
    assert res[1][0] == 2 * MiB
    assert res[1] == res[0]


def test_cp_and_mv_within_and_into_mount(tmp_path: Path, work: Path) -> None:
    data = os.urandom(3 * MiB + 1)
    (work / "a").write_bytes(data)
    subprocess.run(["cp", str(work / "a"), str(work / "b")], check=True)
    assert (work / "b").read_bytes() == data
    subprocess.run(["cp", "--reflink=auto", str(work / "a"), str(work / "c")], check=True)
    assert (work / "c").read_bytes() == data
    # copy over an existing, longer file (cp opens it with O_TRUNC)
    (work / "d").write_bytes(os.urandom(5 * MiB))
    subprocess.run(["cp", str(work / "a"), str(work / "d")], check=True)
    assert (work / "d").read_bytes() == data
    local = tmp_path / "local.bin"
    local.write_bytes(data[::-1])
    subprocess.run(["mv", str(local), str(work / "moved-in")], check=True)
    assert (work / "moved-in").read_bytes() == data[::-1]
    (work / "sub").mkdir()
    subprocess.run(["mv", str(work / "b"), str(work / "sub" / "b")], check=True)
    assert (work / "sub" / "b").read_bytes() == data
    assert sorted(os.listdir(work)) == ["a", "c", "d", "moved-in", "sub"]


def test_removed_directory_still_open(tmp_path: Path, work: Path) -> None:
    """fstat/fchmod on a descriptor of a removed directory behave as on local disk."""
    res = []
    for root in both(tmp_path, work):
        d = root / "d"
        d.mkdir()
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rmdir(d)
            time.sleep(1.2)  # past the kernel attribute cache
            st = os.fstat(fd)
            res.append((stat.S_ISDIR(st.st_mode), os.listdir(fd)))
        finally:
            os.close(fd)
    assert res[1] == res[0] == (True, [])


def test_path_resolved_before_replace_still_opens(work: Path) -> None:
    """A file replaced by rename while another process holds it by an O_PATH descriptor
    (the kernel keeps the inode referenced) can still be opened through /proc/self/fd."""
    f = work / "f"
    f.write_bytes(b"old")
    pfd = os.open(f, os.O_PATH)
    try:
        (work / "new").write_bytes(b"new")
        os.rename(work / "new", f)
        time.sleep(1.2)
        assert os.fstat(pfd).st_nlink == 0
        with open(f"/proc/self/fd/{pfd}", "rb") as fh:
            assert fh.read() == b"old"
    finally:
        os.close(pfd)
    assert f.read_bytes() == b"new"


def _bdi_readahead_kb(path: Path) -> int:
    st = os.stat(path)
    return int(
        Path(
            f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        ).read_text()
    )


# PLAIN_ONLY: kernel settings of the mount, which the store below the daemon does not
# touch (11 s with its two mounts).
@PLAIN_ONLY
def test_kernel_readahead_and_noatime_options(mounter: Callable[..., Mount]) -> None:
    """The mount raises the kernel's readahead from 128 KiB (1 MiB FUSE reads instead of
    128 KiB ones); -o readahead= sets it; -o noatime stops access-time updates."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (/sys/class/bdi is root-writable)")
    default = mounter()
    assert _bdi_readahead_kb(default.path) == 1024
    m = mounter(None, "-o", "readahead=4M,noatime")
    assert _bdi_readahead_kb(m.path) == 4096
    f = m.path / "f"
    f.write_bytes(b"content")
    st = os.stat(f)
    os.utime(f, ns=(st.st_mtime_ns - 10 * 10**9, st.st_mtime_ns))  # relatime would update
    before = os.stat(f).st_atime_ns
    assert f.read_bytes() == b"content"
    time.sleep(2.5)  # atime updates are committed within about a second
    assert os.stat(f).st_atime_ns == before
