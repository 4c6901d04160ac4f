"""Requests a lease holder sends to a real S3 server (SeaweedFS), counted by the
latency proxy between them: listing directories of a domain the mount holds costs none
(LEASES.md §6.2), so `rm -rf`, `ls -R` or `find` of a home waits for no round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from efsish.devtools import rttproxy
from tests.conftest import S3Target
from tests.fuse.conftest import Mount, efsish

pytestmark = [pytest.mark.integration, pytest.mark.fuse]


def _gets(stats: Path) -> int:
    """GETs the proxy has passed (its stats file is rewritten 5 times a second)."""
    time.sleep(0.5)
    counts: dict[str, Any] = json.loads(stats.read_text())
    return int(counts["requests"].get("GET", 0))


@contextmanager
def proxied_store(target: S3Target, tmp_path: Path, tag: str) -> Iterator[tuple[str, ...]]:
    """A filesystem formatted (leases: the default) behind a counting proxy in front of
    the server: yields (store URL, "--endpoint", proxy URL); the proxy's counts go to
    tmp_path / "stats.json" (read them with `_gets`)."""
    proxy = subprocess.Popen(
        rttproxy.command(target.endpoint, 0, tmp_path / "stats.json"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None
        ep = ("--endpoint", f"http://127.0.0.1:{int(proxy.stdout.readline())}")
        store = f"s3://{target.bucket}/{tag}-{uuid.uuid4().hex[:8]}"
        efsish("format", store, *ep, "--block-size", "1M")
        yield (store, *ep)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=10)


def test_listing_a_held_domain_sends_no_request(
    mounter: Callable[..., Mount], seaweedfs_target: S3Target, tmp_path: Path
) -> None:
    stats = tmp_path / "stats.json"
    with proxied_store(seaweedfs_target, tmp_path, "lreq") as (store, *ep):
        # No poller: every log GET counted is one a request made (heartbeats still run).
        m = mounter(store, *ep, "-o", "poll_interval=3600,commit_interval=30", fmt=False)
        home = m.path / "home"
        home.mkdir()
        n = 30
        for i in range(n):  # the first create takes the lease on /home
            (home / f"d{i}").mkdir()
            (home / f"d{i}" / "f").write_bytes(b"x")
        before = _gets(stats)
        for i in range(n):
            assert os.listdir(home / f"d{i}") == ["f"]
        gets = _gets(stats) - before
        # Each listing is answered from the view; a heartbeat may read the bucket
        # meanwhile (a LIST or a GET every 2 s), never one GET per directory.
        assert gets <= 3, f"{gets} GETs for {n} listings in a held domain"
        # The ".." a listing shows is the parent directory.
        ls = subprocess.run(["ls", "-ia", str(home / "d0")], capture_output=True, text=True)
        inos = {name: int(ino) for ino, name in (x.split() for x in ls.stdout.split("\n") if x)}
        assert inos[".."] == home.stat().st_ino and inos["."] == (home / "d0").stat().st_ino


def test_cold_path_walks_through_the_top_send_no_request(
    mounter: Callable[..., Mount], seaweedfs_target: S3Target, tmp_path: Path
) -> None:
    # A share of the top (LEASES.md §17): with the kernel's dentries and inodes dropped,
    # every stat walks the path from the root again; the lookup of the home in the top
    # is answered from the view, so the walk costs no round trip.
    stats = tmp_path / "stats.json"
    with proxied_store(seaweedfs_target, tmp_path, "ltop") as (store, *ep):
        m = mounter(store, *ep, "-o", "poll_interval=3600,commit_interval=30", fmt=False)
        home = m.path / "home"
        home.mkdir()
        n = 30
        for i in range(n):
            (home / f"f{i}").write_bytes(b"x")
        assert not (m.path / "nothing").exists()
        before = _gets(stats)
        for i in range(n):
            Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes
            assert (home / f"f{i}").stat().st_size == 1
        gets = _gets(stats) - before
        # A heartbeat may read the bucket meanwhile (a LIST every 2 s), never one GET
        # per walk (as a catch-up at the top would: n of them).
        assert gets <= 3, f"{gets} GETs for {n} cold path walks"
