"""Safety of `efsish mount` and `efsish umount` on a shared machine: umount acts only on
the efsish daemon of that mountpoint, never on whatever process a stale registry file
names; the root daemon keeps its cache and log only where no other user can write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from efsish.mount import _registry_file
from efsish.procs import pid_alive
from tests.fuse.conftest import efsish, force_unmount, is_mounted
from tests.fuse.helpers import poll


def _plant_registry(mp: Path, pid: int) -> Path:
    """A registry file for mp naming pid, as a daemon killed with -9 leaves behind."""
    reg = _registry_file(str(mp))
    reg.parent.mkdir(parents=True, exist_ok=True)
    reg.write_text(json.dumps({"pid": pid, "mountpoint": str(mp)}))
    return reg


def test_umount_with_stale_registry_kills_nothing(mounter, tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        # A plain directory whose registry file names an unrelated live process.
        plain = tmp_path / "plain"
        plain.mkdir()
        reg = _plant_registry(plain, bystander.pid)
        res = efsish("umount", str(plain), check=False)
        assert res.returncode != 0
        assert "not mounted" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert pid_alive(bystander.pid), "umount killed an unrelated process"
        assert not reg.exists(), "stale registry file left behind"

        # A real mount whose daemon died with -9: the dead mount is still in the mount
        # table, and its registry file names a PID that now belongs to someone else.
        m = mounter()
        os.kill(m.pid, signal.SIGKILL)
        assert poll(lambda: not pid_alive(m.pid), timeout=10), "the daemon did not die"
        assert is_mounted(m.path)
        reg = _plant_registry(m.path, bystander.pid)
        res = efsish("umount", str(m.path), check=False)
        assert res.returncode == 0, res.stderr
        assert not is_mounted(m.path), "the dead mount is still there"
        assert pid_alive(bystander.pid), "umount killed an unrelated process"
        assert not reg.exists(), "stale registry file left behind"

        # Nothing mounted there any more: say so, non-zero exit.
        res = efsish("umount", str(m.path), check=False)
        assert res.returncode != 0
        assert "not mounted" in res.stderr, res.stderr
    finally:
        bystander.kill()
        bystander.wait()


Attempt = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def attempt(tmp_path: Path) -> Iterator[Attempt]:
    """attempt(cache_dir, *args, store=None) -> the result of `efsish mount STORE MP
    --cache-dir cache_dir *args` on a fresh mountpoint (and a fresh store unless one is
    given); whatever it mounted is unmounted and its daemon stopped in teardown."""
    fresh = f"file://{tmp_path}/store"
    efsish("format", fresh, "--block-size", "1M")
    made: list[Path] = []

    def run(cache: Path, *args: str, store: str | None = None) -> subprocess.CompletedProcess[str]:
        mp = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        mp.mkdir()
        made.append(mp)
        return efsish(
            "mount", store or fresh, str(mp), "--cache-dir", str(cache), *args, check=False
        )

    yield run
    for mp in made:
        pid = None
        reg = _registry_file(str(mp))
        if reg.exists():
            pid = int(json.loads(reg.read_text())["pid"])
        if is_mounted(mp):
            efsish("umount", str(mp), check=False)
        force_unmount(mp, pid)


def _refused(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0, f"mount accepted: {res.stderr}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_cache_dir_of_another_user_is_refused(attempt: Attempt, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 1234, 1234)
    _refused(attempt(foreign), str(foreign), "uid 1234", "rm -rf")
    assert not (foreign / "efsish.log").exists()

    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    _refused(attempt(open_to_all), str(open_to_all), "chmod go-w")
    assert os.stat(open_to_all).st_mode & 0o777 == 0o777
    assert not (open_to_all / "efsish.log").exists()

    # A cache dir mount would create inside a directory others may write to.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    _refused(attempt(shared / "cache"), str(shared), "chmod go-w")
    assert not (shared / "cache").exists()

    # Nothing was mounted by any of these.
    assert not [mp for mp in tmp_path.glob("mnt-*") if is_mounted(mp)]


def test_symlinked_log_is_refused(attempt: Attempt, tmp_path: Path) -> None:
    secret = tmp_path / "root-only"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / "efsish.log").symlink_to(secret)
    _refused(attempt(cache), "efsish.log", "symlink")
    assert secret.read_text() == "secret\n"
    assert not [mp for mp in tmp_path.glob("mnt-*") if is_mounted(mp)]

    # log=FILE: the same.
    other = tmp_path / "other.log"
    other.symlink_to(secret)
    _refused(attempt(tmp_path / "cache2", "-o", f"log={other}"), str(other), "symlink")
    assert secret.read_text() == "secret\n"
    assert not [mp for mp in tmp_path.glob("mnt-*") if is_mounted(mp)]


def test_second_mount_on_one_cache_dir_is_refused(mounter, attempt: Attempt) -> None:
    m = mounter()
    (m.path / "f").write_text("one\n")
    res = attempt(m.cache_dir, store=m.store)
    _refused(res, str(m.cache_dir), f"at {m.path} (pid {m.pid})", "own -o cache_dir")
    assert [mp for mp in m.path.parent.glob("mnt-*") if is_mounted(mp)] == []
    # The first mount is unharmed and still writes.
    (m.path / "g").write_text("two\n")
    assert (m.path / "f").read_text() == "one\n"
    assert (m.path / "g").read_text() == "two\n"
    # Another filesystem may share the cache dir (each has its own part of it).
    assert attempt(m.cache_dir).returncode == 0
    # Once the first mount is gone, its cache dir is free again.
    efsish("umount", str(m.path))
    assert attempt(m.cache_dir, store=m.store).returncode == 0
