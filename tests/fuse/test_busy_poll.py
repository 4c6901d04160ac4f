"""The FUSE loop's polling after each reply (-o busy_poll, patches/pyfuse3-fd-polling.patch),
through real mounts: it finds the requests of a process that sends one after another, the
daemon's other tasks keep running while it does, the window shrinks while no CPU is to
spare, and busy_poll=0 turns it off."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from efsish.fuse_ops import SHORT_POLL_US, SPARE_HIGH, SPARE_LOW, poll_window
from tests.fuse.conftest import Mount, efsish


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fuse_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        ln.split()[0]: float(ln.split()[1])
        for ln in text.splitlines()
        if ln.split(" ")[0]
        in ("FuseRequestsPolled", "FusePollsIdle", "MetadataIOBytes", "FusePollWindowMicroseconds")
    }


def ask(path: Path, seconds: float, clients: int = 1) -> int:
    """getxattr of a name the file lacks, again and again for `seconds`, in `clients`
    processes of their own (nothing in this one holds them up): a FUSE request each time
    that the daemon answers from memory (the kernel caches no xattrs). Returns how many
    were sent."""
    code = (
        "import errno, os, sys, time\n"
        "n, end = 0, time.monotonic() + float(sys.argv[2])\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        os.getxattr(sys.argv[1], 'user.absent')\n"
        "    except OSError as e:\n"
        "        assert e.errno == errno.ENODATA, e\n"
        "    n += 1\n"
        "print(n)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(clients)
    ]
    return sum(int(p.communicate(timeout=seconds + 60)[0]) for p in procs)


def test_polling_finds_back_to_back_requests_and_the_loop_keeps_running(
    mounter: Callable[..., Mount],
) -> None:
    """While two processes send requests back to back (answered without awaiting anything),
    most are read by polling, and the daemon's 1 s metrics task still runs: the gauges move
    during the stream, not only after it (a polling loop that never let trio schedule
    would starve it, and with it lease renewal)."""
    port = free_port()
    m = mounter(None, "-o", f"prometheus_port={port},busy_poll=1000")
    f = m.path / "f"
    f.write_bytes(b"x")
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(ask(f, 6.0, clients=2)))
    t.start()
    seen = []
    try:
        while t.is_alive():
            seen.append(fuse_metrics(port).get("FuseRequestsPolled", 0.0))
            time.sleep(0.5)
    finally:
        t.join()
    # Readings taken while the stream surely ran: the gauge, set every second, moved at
    # least every two.
    during = {x for x in seen[:-2] if x > 0}
    assert len(during) >= 4, seen
    deadline = time.monotonic() + 10
    while (got := fuse_metrics(port))["FuseRequestsPolled"] < done[0] / 2:
        assert time.monotonic() < deadline, (got, done)
        time.sleep(0.5)


def test_busy_poll_zero_waits_through_trio(mounter: Callable[..., Mount]) -> None:
    port = free_port()
    m = mounter(None, "-o", f"prometheus_port={port},busy_poll=0")
    f = m.path / "f"
    f.write_bytes(b"x")
    before = fuse_metrics(port)["MetadataIOBytes"]
    assert ask(f, 1.0) > 100
    deadline = time.monotonic() + 10
    while (got := fuse_metrics(port))["MetadataIOBytes"] == before:  # refreshed since
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert got["FuseRequestsPolled"] == 0 and got["FusePollsIdle"] == 0, got


def test_busy_poll_values_are_checked(mounter: Callable[..., Mount], tmp_path: Path) -> None:
    plain = mounter()
    mp = tmp_path / "bad"
    mp.mkdir()
    for value in ("-1", "1001", "fast", "2.5"):
        res = efsish("mount", plain.store, str(mp), "--cache-dir", str(tmp_path / "c"), "-o",
                     f"busy_poll={value}", check=False)  # fmt: skip
        assert res.returncode != 0, res.stdout
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "invalid value for mount option busy_poll" in lines[0], lines
        assert not os.path.ismount(mp)


def test_poll_window_follows_the_spare_cpu() -> None:
    """Below SPARE_LOW idle CPUs the short window, above SPARE_HIGH the full one, in
    between whatever it was; never longer than busy_poll."""
    assert poll_window(50, 50, SPARE_LOW - 0.01) == SHORT_POLL_US
    assert poll_window(50, SHORT_POLL_US, SPARE_HIGH + 0.01) == 50
    mid = (SPARE_LOW + SPARE_HIGH) / 2
    assert poll_window(50, 50, mid) == 50 and poll_window(50, SHORT_POLL_US, mid) == SHORT_POLL_US
    assert poll_window(10, 10, 0.0) == 10


def window_now(port: int) -> float:
    return fuse_metrics(port)["FusePollWindowMicroseconds"]


def test_the_poll_window_shrinks_while_every_cpu_is_busy(mounter: Callable[..., Mount]) -> None:
    """A busy loop on every CPU leaves none to spare: the window falls to SHORT_POLL_US
    within seconds, and goes back to busy_poll once they stop."""
    port = free_port()
    mounter(None, "-o", f"prometheus_port={port},busy_poll=200")
    deadline = time.monotonic() + 10
    while window_now(port) != 200:  # the gauges are set once a second
        assert time.monotonic() < deadline, window_now(port)
        time.sleep(0.3)
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        deadline = time.monotonic() + 15
        while window_now(port) != SHORT_POLL_US:
            assert time.monotonic() < deadline, window_now(port)
            time.sleep(0.3)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    deadline = time.monotonic() + 15
    while window_now(port) != 200:
        assert time.monotonic() < deadline, window_now(port)
        time.sleep(0.3)
