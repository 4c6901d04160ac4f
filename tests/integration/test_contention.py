"""Contention between mounts on the real S3 server keeps the filesystem correct, on a
format-2 and on a lease (format-3) filesystem."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.conftest import Mount, efsish, format_args

pytestmark = [pytest.mark.integration, pytest.mark.fuse]


@pytest.fixture(params=[2, 3], ids=["format2", "format3"])
def fs_format(request: pytest.FixtureRequest) -> int:
    """Every test here runs on a format-2 and on a lease (format-3) filesystem."""
    return int(request.param)


@pytest.fixture
def three(mounter, seaweedfs_target, fs_format: int) -> tuple[str, tuple[str, str], list[Mount]]:
    store = f"s3://{seaweedfs_target.bucket}/cont-{uuid.uuid4().hex[:8]}"
    ep = ("--endpoint", seaweedfs_target.endpoint)
    efsish("format", store, *ep, "--block-size", "1M", *format_args(fs_format))
    return store, ep, [mounter(store, *ep, fmt=False) for _ in range(3)]


def run_all(fns: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except OSError as e:
            results[i] = e

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return results


def fsck_clean(store: str, ep: tuple[str, str]) -> None:
    res = efsish("fsck", store, *ep, "-q", check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_renames_into_one_target(three) -> None:
    store, ep, mounts = three
    for i, m in enumerate(mounts):
        (m.path / f"src{i}").write_text(f"from {i}")
    results = run_all(
        [
            functools.partial(os.rename, m.path / f"src{i}", m.path / "target")
            for i, m in enumerate(mounts)
        ]
    )
    assert all(r is None for r in results), results
    content = (mounts[0].path / "target").read_text()
    assert content in {f"from {i}" for i in range(3)}
    for m in mounts:
        names = sorted(os.listdir(m.path))
        assert names == ["target"], names
        assert (m.path / "target").read_text() == content
        assert os.stat(m.path / "target").st_nlink == 1
    fsck_clean(store, ep)


def test_mkdir_p_races_and_cross_renames(three) -> None:
    store, ep, mounts = three
    results = run_all(
        [functools.partial(os.makedirs, m.path / "a" / "b" / "c", exist_ok=True) for m in mounts]
    )
    assert all(r is None for r in results), results
    (mounts[0].path / "x").mkdir()
    (mounts[0].path / "y").mkdir()
    # Two renames that together would make a cycle: at most one may succeed.
    results = run_all(
        [
            lambda: os.rename(mounts[1].path / "x", mounts[1].path / "y" / "x"),
            lambda: os.rename(mounts[2].path / "y", mounts[2].path / "x" / "y"),
        ]
    )
    oks = [r for r in results if r is None]
    assert len(oks) == 1, results
    err = next(r for r in results if r is not None)
    assert isinstance(err, OSError) and err.errno in (errno.EINVAL, errno.ENOENT)
    fsck_clean(store, ep)


def test_rm_rf_while_another_mount_creates(three) -> None:
    store, ep, mounts = three
    tree = mounts[0].path / "tree"
    for d in range(5):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(10):
            (tree / f"d{d}" / f"f{f}").write_text("x")
    stop = time.monotonic() + 4
    created: list[str] = []

    def creator() -> None:
        i = 0
        while time.monotonic() < stop:
            try:
                # Recreate the directory the remover may have taken: creates keep racing
                # the removal for the whole run, however fast rm -rf is.
                d = mounts[1].path / "tree" / f"d{i % 5}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"new{i}").write_text("y")
                created.append(f"d{i % 5}/new{i}")
            except OSError:
                pass  # the directory may be gone: that is the point
            i += 1

    def remover() -> None:
        while time.monotonic() < stop:
            shutil.rmtree(mounts[2].path / "tree", ignore_errors=True)
            time.sleep(0.05)

    run_all([creator, remover])
    shutil.rmtree(mounts[2].path / "tree", ignore_errors=True)
    for m in mounts:
        assert "tree" not in os.listdir(m.path)
    assert created, "the creator never got to create anything"
    fsck_clean(store, ep)


def test_appends_to_different_files_in_one_directory(three) -> None:
    store, ep, mounts = three
    (mounts[0].path / "logs").mkdir()

    def appender(i: int) -> Callable[[], None]:
        def run() -> None:
            for n in range(30):
                with open(mounts[i].path / "logs" / f"m{i}.log", "a") as f:
                    f.write(f"line {n} from {i}\n")

        return run

    results = run_all([appender(i) for i in range(3)])
    assert all(r is None for r in results), results
    for m in mounts:
        for i in range(3):
            lines = (m.path / "logs" / f"m{i}.log").read_text().splitlines()
            assert lines == [f"line {n} from {i}" for n in range(30)]
    fsck_clean(store, ep)


def test_status_lists_live_mounts(three) -> None:
    store, ep, mounts = three
    (mounts[0].path / "f").write_text("x")
    time.sleep(2.5)  # one heartbeat period
    out = efsish("status", store, *ep).stdout
    assert "live mounts: 3" in out, out
    for m in mounts:
        assert str(m.path) in out
    res = efsish("gc", store, *ep, "--dry-run", "-q").stdout
    assert "would delete" in res
    Path(mounts[0].path / "f").unlink()
