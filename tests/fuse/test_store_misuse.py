"""Stores used the wrong way, through the command line on file:// stores: filesystems
nested in each other, and a prefix that holds someone else's objects."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.fuse.conftest import efsish


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr."""
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return str(lines[0])


def test_format_refuses_to_nest_filesystems(tmp_path: Path) -> None:
    home = f"file://{tmp_path}/home"
    efsish("format", home, "--block-size", "1M")
    msg = one_line(efsish("format", f"{home}/sub", check=False))
    assert f"inside the efsish filesystem {home}:" in msg and "must not nest" in msg
    assert not (tmp_path / "home" / "sub").exists()
    msg = one_line(efsish("format", f"file://{tmp_path}", check=False))
    assert f"encloses the efsish store {home}:" in msg
    efsish("format", f"file://{tmp_path}/home2")


def test_mount_says_what_a_prefix_of_foreign_objects_holds(tmp_path: Path) -> None:
    objects = tmp_path / "photos" / "objects"
    objects.mkdir(parents=True)
    for name in ("cat.jpg", "dog.jpg"):
        (objects / f"{name}.o").write_bytes(b"\xff\xd8")
    mp = tmp_path / "mp"
    mp.mkdir()
    store = f"file://{tmp_path}/photos"
    msg = one_line(efsish("mount", store, str(mp), "--cache-dir", str(tmp_path / "c"), check=False))
    assert f"{store} holds 2 object(s) (e.g. 'cat.jpg') but no efsish filesystem" in msg, msg
    assert "choose an empty prefix" in msg


def test_gc_spares_what_is_not_its_own(tmp_path: Path) -> None:
    home = f"file://{tmp_path}/home"
    efsish("format", home, "--block-size", "1M")
    # What an efsish that did not refuse to nest left two days ago: another filesystem
    # whose keys sit under data/ of this one (on S3, s3://b/home/data/x), and a user's
    # object whose name the old parser took for a block made at time 2.
    objects = tmp_path / "home" / "objects" / "data.d"
    then = f"{time.time_ns() - 2 * 86400 * 10**9:x}"
    theirs = [
        objects / "x.d" / "superblock.o",
        objects / "x.d" / "data.d" / f"1-{then}-0123456789abcdef.o",
        objects / "1-2-3.o",
    ]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not this filesystem's")
    res = efsish("gc", home, "--grace", "0", "-q")
    assert "and 0 never-committed block(s)" in res.stdout, res.stdout
    assert all(p.exists() for p in theirs)
