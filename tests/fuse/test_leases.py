"""Two real mounts of a filesystem made with `efsish format --leases`: a change made
under A's lease is seen by B (a recall), and kill -9 of A followed by a remount on the
same cache dir loses nothing A answered; nudges make a recall quick although neither
mount polls the log for 30 s."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from efsish.meta import heartbeat, nudge
from efsish.mount import _registry_file
from efsish.store import open_store
from tests.fuse.conftest import Mount, efsish, force_unmount, is_mounted


def test_two_mounts_of_a_lease_filesystem(mounter: Callable[..., Mount], tmp_path: Path) -> None:
    store = f"file://{tmp_path}/leases"
    out = efsish("format", store, "--block-size", "1M", "--leases").stdout
    assert "leases (depth 1)" in out
    a = mounter(store, "-o", "commit_interval=30")
    b = mounter(store)
    home = a.path / "home"
    home.mkdir()
    (home / "first").write_bytes(b"acquires the lease")
    for i in range(20):
        (home / f"f{i}").write_bytes(b"v%d" % i * (i + 1))
    # With a 30 s commit interval these are in A's journal, not in the log: B's open
    # recalls the lease and A flushes first.
    assert (b.path / "home" / "f19").read_bytes() == b"v19" * 20
    assert sorted(os.listdir(b.path / "home")) == sorted(["first", *(f"f{i}" for i in range(20))])
    # More changes under A's lease (a second recall hands the domain back or releases
    # it), then kill -9 of A and a remount on its cache dir: nothing answered is lost.
    for i in range(20, 30):
        (a.path / "home" / f"f{i}").write_bytes(b"late %d" % i)
    os.unlink(a.path / "home" / "f0")
    os.kill(a.pid, signal.SIGKILL)
    force_unmount(a.path, a.pid)
    assert not is_mounted(a.path)
    efsish("mount", store, str(a.path), "--cache-dir", str(a.cache_dir))
    a.pid = int(json.loads(_registry_file(str(a.path)).read_text())["pid"])
    for m in (a, b):
        names = set(os.listdir(m.path / "home"))
        assert "f0" not in names and {f"f{i}" for i in range(1, 30)} <= names, m.path
        assert (m.path / "home" / "f29").read_bytes() == b"late 29"
    # A clean unmount commits and releases everything; fsck is clean.
    efsish("umount", str(a.path))
    efsish("umount", str(b.path))
    res = efsish("fsck", store, "-q", check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_nudge_ends_a_recall_long_before_the_poll(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    store = f"file://{tmp_path}/nudged"
    efsish("format", store, "--block-size", "1M", "--leases")
    a = mounter(store, "-o", "poll_interval=30,commit_interval=30")
    b = mounter(store, "-o", "poll_interval=30")
    client = json.loads(_registry_file(str(a.path)).read_text())["client"]

    async def a_heartbeat() -> heartbeat.Heartbeat | None:
        async with open_store(store) as s:
            return await heartbeat.read(s, client)

    hb = trio.run(a_heartbeat)
    assert hb is not None and hb.nudge is not None
    assert nudge.parse_address(hb.nudge)[0] == "127.0.0.1"  # a file:// store is local
    (a.path / "home").mkdir()
    (a.path / "home" / "f").write_bytes(b"closed on A")  # journaled under A's lease
    # A next reads the log 30 s after it mounted; B's recall nudges it, and A's answer
    # nudges B.
    t0 = time.monotonic()
    assert (b.path / "home" / "f").read_bytes() == b"closed on A"
    took = time.monotonic() - t0
    assert took < 5.0, f"recall took {took:.1f}s"


def test_kill_9_with_staged_blocks_not_uploaded(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    """Files closed under a lease whose blocks are staged in the cache dir and not
    uploaded (the store refuses new objects meanwhile): kill -9, then a remount on the
    same cache dir uploads them before it commits the journal; the bytes are intact."""
    root = tmp_path / "staged"
    store = f"file://{root}"
    efsish("format", store, "--block-size", "1M", "--leases")
    a = mounter(store, "-o", "commit_interval=30")
    home = a.path / "home"
    home.mkdir()
    with open(home / "first", "wb") as f:  # acquires the lease
        f.write(os.urandom(65536))
        f.flush()
        os.fsync(f.fileno())  # its block is uploaded: data/ exists
    data_dir = root / "objects" / "data.d"
    assert data_dir.is_dir(), sorted(os.listdir(root / "objects"))
    files = {f"f{i}": os.urandom(65536 + i) for i in range(5)}
    subprocess.run(["chattr", "+i", str(data_dir)], check=True)  # no new block lands
    try:
        for name, data in files.items():
            (home / name).write_bytes(data)  # close returns: staged, journaled
        staged = list(a.cache_dir.glob("*/staged/data_*"))
        assert len(staged) >= len(files)
        os.kill(a.pid, signal.SIGKILL)
        force_unmount(a.path, a.pid)
    finally:
        subprocess.run(["chattr", "-i", str(data_dir)], check=True)
    assert not is_mounted(a.path)
    efsish("mount", store, str(a.path), "--cache-dir", str(a.cache_dir))
    a.pid = int(json.loads(_registry_file(str(a.path)).read_text())["pid"])
    for name, data in files.items():
        assert (home / name).read_bytes() == data
    assert not list(a.cache_dir.glob("*/staged/data_*"))
    efsish("umount", str(a.path))
    res = efsish("fsck", store, "--verify-data", check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_and_prometheus_show_a_mounts_leases_and_journal(
    mounter: Callable[..., Mount],
) -> None:
    """`efsish status` lists the domains a mount holds and its uncommitted changes; its
    Prometheus endpoint exports the same as LeasesHeld, JournalRows and
    JournalOldestAgeSeconds."""
    port = free_port()
    a = mounter(None, "-o", f"commit_interval=30,prometheus_port={port}")
    home = a.path / "alice"
    home.mkdir()
    (home / "first").write_bytes(b"acquires the lease")
    for i in range(5):
        (home / f"f{i}").write_bytes(b"x")
    deadline = time.monotonic() + 20
    while True:
        status = efsish("status", a.store).stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        values = {
            ln.split()[0]: float(ln.split()[1])
            for ln in metrics.splitlines()
            if ln.startswith(("LeasesHeld ", "JournalRows ", "JournalOldestAgeSeconds "))
        }
        rows = int(values.get("JournalRows", 0))  # each create, each close's layout
        if rows >= 5 and f"uncommitted changes: {rows}," in status:
            break
        assert time.monotonic() < deadline, (status, values)
        time.sleep(0.5)
    assert "format: 3 (leases)" in status
    assert f"    format 3; leases: /alice; uncommitted changes: {rows}, oldest " in status, status
    assert values["LeasesHeld"] == 1 and values["JournalOldestAgeSeconds"] > 0, values
    fd = os.open(home, os.O_RDONLY)
    try:
        os.fsync(fd)  # of the directory: the journal reaches the log
    finally:
        os.close(fd)
    deadline = time.monotonic() + 20
    while "uncommitted changes: none" not in efsish("status", a.store).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def journal_rows(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for ln in r.read().decode().splitlines():
            if ln.startswith("JournalRows "):
                return int(float(ln.split()[1]))
    raise AssertionError("no JournalRows in the metrics")


def test_sync_of_a_path_on_the_mount_commits_the_journal(mounter: Callable[..., Mount]) -> None:
    """`sync MOUNTPOINT` (coreutils fsyncs the directory) commits every journaled change
    at once, long before commit_interval. It is the documented way to flush: plain sync
    and syncfs(2) never reach a FUSE daemon (Linux sends FUSE_SYNCFS to virtiofs only)."""
    port = free_port()
    a = mounter(None, "-o", f"commit_interval=30,prometheus_port={port}")
    home = a.path / "bob"
    home.mkdir()
    for i in range(4):
        (home / f"f{i}").write_bytes(b"journaled")
    deadline = time.monotonic() + 20
    while journal_rows(port) < 4:
        assert time.monotonic() < deadline, "the changes were never journaled"
        time.sleep(0.2)
    t0 = time.monotonic()
    subprocess.run(["sync", str(a.path)], check=True, timeout=60)
    while journal_rows(port) != 0:
        assert time.monotonic() - t0 < 10, "sync of the mountpoint left the journal"
        time.sleep(0.2)


def test_efsish_upgrade_of_a_mounted_format_2_filesystem(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    """`efsish upgrade` while a format-2 mount runs: the mount stops changing the tree
    (EROFS, its entries would be fenced); remounted, it runs the lease protocol."""
    store = f"file://{tmp_path}/old"
    assert "no leases (format 2)" in efsish("format", store, "--no-leases").stdout
    a = mounter(store)
    (a.path / "home").mkdir()
    (a.path / "home" / "before").write_bytes(b"format 2")
    time.sleep(2.5)  # its heartbeat says which formats it knows
    out = efsish("upgrade", store).stdout
    assert "upgraded" in out and "to format 3" in out, out
    with pytest.raises(OSError) as e:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until its poll meets the fmt entry
            (a.path / "home" / f"after{time.monotonic_ns()}").mkdir()
            time.sleep(0.2)
    assert e.value.errno == errno.EROFS
    assert "upgraded to format 3 (leases) while this mount ran format 2" in a.log()
    efsish("umount", str(a.path))
    efsish("mount", store, str(a.path), "--cache-dir", str(a.cache_dir))
    a.pid = int(json.loads(_registry_file(str(a.path)).read_text())["pid"])
    assert (a.path / "home" / "before").read_bytes() == b"format 2"
    (a.path / "home" / "after").write_bytes(b"format 3")
    assert "format: 3 (leases)" in efsish("status", store).stdout
    assert "already at format 3" in efsish("upgrade", store).stdout
