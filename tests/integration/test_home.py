"""The /home scenario: the first machine migrates its old /home with `cp -a`, a second
machine mounts and sees everything; users cannot read each other's homes anywhere."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.fuse.conftest import efsish

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

USERS = {"alice": 1000, "bob": 1001}


def make_old_home(root: Path) -> None:
    for name, uid in USERS.items():
        home = root / name
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "id_ed25519").write_text(f"secret key of {name}\n")
        os.chmod(home / ".ssh" / "id_ed25519", 0o600)
        os.chmod(home / ".ssh", 0o700)
        (home / "notes.txt").write_text(f"{name}'s notes\n" * 100)
        os.link(home / "notes.txt", home / "notes-hardlink.txt")
        os.symlink("notes.txt", home / "notes-symlink")
        (home / "bin").mkdir()
        (home / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
        os.chmod(home / "bin" / "tool", 0o755)
        os.setxattr(home / "notes.txt", "user.origin", f"{name}-laptop".encode())
        (home / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        for dirpath, dirnames, filenames in os.walk(home):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), uid, uid)
        os.chown(home, uid, uid)
        os.chmod(home, 0o700)
        os.utime(home / "notes.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            content: object = None
            if os.path.islink(p):
                content = os.readlink(p)
            elif p.is_file():
                content = p.read_bytes()
            xattrs = (
                {}
                if os.path.islink(p)
                else {k: os.getxattr(p, k) for k in os.listxattr(p) if k.startswith("user.")}
            )
            links = st.st_nlink if not p.is_dir() else None
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                links,
                st.st_mtime_ns if not p.is_dir() else None,
                content,
                xattrs,
            )
    return out


def as_user(uid: int, cwd: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run cmd as uid in cwd (entered as root first: pytest's tmp dirs are 0700)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_home_migration_and_isolation(mounter, seaweedfs_target, tmp_path: Path) -> None:
    old = tmp_path / "oldhome"
    old.mkdir()
    make_old_home(old)
    store = f"s3://{seaweedfs_target.bucket}/home-{uuid.uuid4().hex[:8]}"
    ep = ("--endpoint", seaweedfs_target.endpoint)
    efsish("format", store, *ep)
    first = mounter(store, *ep, fmt=False)
    subprocess.run(["cp", "-a", f"{old}/.", str(first.path)], check=True, timeout=120)
    assert describe(first.path) == describe(old)
    second = mounter(store, *ep, fmt=False)  # "another machine" mounts later
    assert describe(second.path) == describe(old)
    for m in (first, second):
        st = os.stat(m.path / "alice")
        assert (st.st_uid, st.st_mode & 0o7777) == (1000, 0o700)
        # bob cannot list or read alice's home, on any mount; alice can.
        r = as_user(1001, m.path, "ls", "bob")  # the mount root itself is reachable
        assert r.returncode == 0, r.stderr
        r = as_user(1001, m.path, "ls", "alice")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = as_user(1001, m.path, "cat", "alice/notes.txt")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = as_user(1000, m.path, "cat", "alice/.ssh/id_ed25519")
        assert r.returncode == 0 and "secret key of alice" in r.stdout, r.stderr
    # A file bob writes on the second machine is his, and alice sees nothing of it.
    r = as_user(1001, second.path, "sh", "-c", "umask 077; echo mine > bob/new.txt")
    assert r.returncode == 0, r.stderr
    st = os.stat(first.path / "bob" / "new.txt")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1001, 1001, 0o600)
    res = efsish("fsck", store, *ep, "-q", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
