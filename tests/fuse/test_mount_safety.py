"""Safety of `efsish mount` and `efsish umount` on a shared machine: umount acts only on
the efsish daemon of that mountpoint, never on whatever process a stale registry file
names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from efsish.mount import _registry_file
from efsish.procs import pid_alive
from tests.fuse.conftest import efsish, is_mounted
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
