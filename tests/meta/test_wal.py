"""The view's WAL (efsish.meta.view, MetaLog.keep_wal): a change's COMMIT does not
checkpoint it (SQLite would sync two files there); a background checkpoint on a
connection of its own does, and the WAL file is truncated and written again from its
start after it (overwriting the frames of the previous round in place was slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from efsish.meta import log as metalog
from efsish.meta.view import WAL_AUTOCHECKPOINT, View, checkpoint_wal
from tests.fs import test_leases
from tests.fs.test_leases import Make, mkdir
from tests.meta.views import T0

leases, sb, make, store = test_leases.leases, test_leases.sb, test_leases.make, test_leases.store
lease_time = test_leases.lease_time


def grow(view: View, n: int) -> None:
    for i in range(n):
        view.begin()
        view.set_meta(f"k{i % 7}", f"{i:06d}" + "x" * 2000)
        view.commit()


def wal_size(path: str | Path) -> int:
    return os.stat(f"{path}-wal").st_size


def test_commits_leave_the_wal_to_the_background_checkpoint(tmp_path: Path) -> None:
    view = View(tmp_path / "view.db")
    view.init_root("uuid", T0)
    grow(view, 1500)  # SQLite's default would have checkpointed at 1,000 frames
    big = wal_size(view.path)
    frames, done = checkpoint_wal(view.path)
    assert 1500 <= frames < WAL_AUTOCHECKPOINT and done == frames
    grow(view, 3)  # the next writer truncates the WAL and starts it again
    assert wal_size(view.path) < big // 20
    frames, _ = checkpoint_wal(view.path)
    assert frames < 20
    assert view.get_meta("k2") == "000002" + "x" * 2000


def test_no_view_no_checkpoint_and_no_new_database(tmp_path: Path) -> None:
    assert checkpoint_wal(tmp_path / "none.db") == (0, 0)
    assert not (tmp_path / "none.db").exists()


async def test_a_mount_checkpoints_its_wal_once_quiet(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metalog, "WAL_QUIET_WRITES", 20)
    monkeypatch.setattr(metalog, "WAL_BUSY_WRITES", 10**9)
    monkeypatch.setattr(metalog, "WAL_CHECK_EVERY", 0.05)
    a = await make()
    home = await mkdir(a.fs, 1, b"home")
    for i in range(30):
        await mkdir(a.fs, home, b"d%d" % i)
    with trio.fail_after(5):
        while not a.fs.meta.wal_checkpoints:  # noqa: ASYNC110 (a background task)
            await trio.sleep(0.05)
    await mkdir(a.fs, home, b"after")
    frames, _ = checkpoint_wal(a.fs.meta.db_path)
    assert frames < 40  # started again from the beginning
