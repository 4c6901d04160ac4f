"""`-o ro` on a real mount: the kernel and the daemon refuse every change, and the
daemon writes nothing to the store (no heartbeat, access times, checkpoints, ledger)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.conftest import Mount, efsish, stop_mount

POLL = 0.2


def store_state(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file and directory of a file:// store: inode, size, mtime, ctime. Any write
    (a new object, a replaced one, a temp file, a delete) changes it."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def test_a_read_only_mount_writes_nothing_to_the_store(mounter: Callable[..., Mount]) -> None:
    rw = mounter()
    (rw.path / "d").mkdir()
    (rw.path / "d" / "small").write_text("hello")
    big = os.urandom(3 * 1024 * 1024 + 5)
    (rw.path / "d" / "big").write_bytes(big)
    os.setxattr(rw.path / "d" / "small", "user.k", b"v")
    os.symlink("big", rw.path / "d" / "link")
    stop_mount(rw)  # its heartbeat and ledger writes end here
    root = Path(rw.store.removeprefix("file://"))
    before = store_state(root)

    ro = mounter(rw.store, "-o", f"ro,poll_interval={POLL}", fmt=False)
    d = ro.path / "d"
    assert sorted(os.listdir(d)) == ["big", "link", "small"]
    assert (d / "small").read_text() == "hello"
    assert (d / "big").read_bytes() == big
    assert os.readlink(d / "link") == "big"
    assert os.getxattr(d / "small", "user.k") == b"v"
    assert os.stat(d / "big").st_size == len(big)
    changes: list[tuple[str, Callable[[], object]]] = [
        ("create", lambda: (d / "new").write_text("x")),
        ("mkdir", lambda: (d / "newdir").mkdir()),
        ("unlink", lambda: (d / "small").unlink()),
        ("rename", lambda: (d / "small").rename(d / "other")),
        ("chmod", lambda: os.chmod(d / "small", 0o600)),
        ("utime", lambda: os.utime(d / "small", (1, 1))),
        ("setxattr", lambda: os.setxattr(d / "small", "user.k", b"w")),
        ("open for writing", lambda: open(d / "small", "r+b").close()),
    ]
    for what, change in changes:
        with pytest.raises(OSError) as e:
            change()
        assert e.value.errno == errno.EROFS, what
    # Several poll, heartbeat (2 s) and access-time (1 s) intervals, reading all along.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert (d / "small").read_text() == "hello"
        os.listdir(d)
        time.sleep(POLL)
    stop_mount(ro)
    after = store_state(root)
    changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
    assert changed == [], f"the read-only mount wrote to the store: {changed}"


def test_a_read_only_mount_reads_a_file_closed_under_a_lease_at_once(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    # A holds /home with an hour's commit interval: what it closes stays in its journal.
    # B (-o ro, no poll for 30 s) cannot recall the lease: it asks A over the nudge
    # channel to flush before it reads there (LEASES.md §6.4, reads).
    store = f"file://{tmp_path}/ro-lease"
    efsish("format", store, "--block-size", "1M")  # format 3, leases
    a = mounter(store, "-o", "commit_interval=3600")
    b = mounter(store, "-o", "ro,poll_interval=30", fmt=False)
    (a.path / "home").mkdir()
    (a.path / "home" / "first").write_bytes(b"acquires the lease")
    assert sorted(os.listdir(b.path / "home")) == ["first"]
    for i in range(3):
        (a.path / "home" / f"f{i}").write_bytes(b"closed on A %d" % i)
        t0 = time.monotonic()
        assert (b.path / "home" / f"f{i}").read_bytes() == b"closed on A %d" % i
        assert time.monotonic() - t0 < 1.0
