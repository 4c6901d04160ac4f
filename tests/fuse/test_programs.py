"""Real programs on a mount, each checked against the same work on local disk: cp -a +
diff -r, tar, git, SQLite, rsync."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fuse.conftest import Mount, efsish
from tests.fuse.helpers import assert_same_tree, snapshot

MiB = 1 << 20

for _tool in ("git", "rsync", "tar", "diff", "cp"):
    if shutil.which(_tool) is None:  # pragma: no cover - bootstrap installs them
        pytest.skip(
            f"{_tool} is not installed (scripts/bootstrap installs it)", allow_module_level=True
        )


def run(
    *cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
        )
    return p


def build_tree(root: Path) -> None:
    """A small home directory: files of several sizes, nested dirs, hard links, symlinks
    (relative, absolute, dangling, to a dir), modes, owners, user xattrs, fixed mtimes."""
    rnd = random.Random(1234)
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs" / "notes").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "private").mkdir(mode=0o700)
    os.chmod(root / "private", 0o700)
    (root / "empty_dir").mkdir()
    (root / "empty_file").write_bytes(b"")
    (root / "docs" / "readme.txt").write_text("hello\n" * 100)
    (root / "docs" / "notes" / "a.md").write_text("# A\n")
    (root / "docs" / "big.bin").write_bytes(rnd.randbytes(2 * MiB + 12345))
    (root / "docs" / "medium.bin").write_bytes(rnd.randbytes(100_000))
    for i in range(40):
        (root / "docs" / "notes" / f"n{i:02d}.txt").write_text(f"note {i}\n" * i)
    (root / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "private" / "key").write_bytes(rnd.randbytes(64))
    os.chmod(root / "private" / "key", 0o600)
    (root / "readonly").write_text("ro")
    os.chmod(root / "readonly", 0o444)
    os.link(root / "docs" / "readme.txt", root / "readme-hardlink")
    os.link(root / "docs" / "readme.txt", root / "docs" / "notes" / "readme-hardlink2")
    os.symlink("docs/readme.txt", root / "readme-symlink")
    os.symlink("../docs", root / "bin" / "docs-dir-link")
    os.symlink("/etc/hostname", root / "absolute-link")
    os.symlink("does/not/exist", root / "dangling")
    os.setxattr(root / "docs" / "readme.txt", "user.mime_type", b"text/plain")
    os.setxattr(root / "docs" / "big.bin", "user.checksum", b"\x00\x01binary\xff")
    os.setxattr(root / "docs", "user.dir_attr", b"on a directory")
    (root / "owned").write_text("owned by 1000")
    os.chown(root / "owned", 1000, 1000)
    os.chown(root / "docs" / "notes", 1000, 1001)
    os.utime(root / "docs" / "big.bin", ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    for dp, dns, fns in os.walk(root, topdown=False):
        for n in fns:
            p = Path(dp) / n
            if not p.is_symlink() and n != "big.bin":
                os.utime(p, ns=(1_700_000_000_000_000_000, 1_650_000_000_000_000_000))
        for n in dns:
            p = Path(dp) / n
            if not p.is_symlink():
                os.utime(p, ns=(1_700_000_000_000_000_000, 1_660_000_000_000_000_000))
            else:
                os.utime(
                    p,
                    ns=(1_700_000_000_000_000_000, 1_640_000_000_000_000_000),
                    follow_symlinks=False,
                )
        for n in fns:
            p = Path(dp) / n
            if p.is_symlink():
                os.utime(
                    p,
                    ns=(1_700_000_000_000_000_000, 1_630_000_000_000_000_000),
                    follow_symlinks=False,
                )
    os.utime(root, ns=(1_700_000_000_000_000_000, 1_670_000_000_000_000_000))


def strip_root(s: dict[str, Any]) -> dict[str, Any]:
    s = dict(s)
    s.pop(".", None)
    return s


def no_dir_times(s: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in strip_root(s).items():
        v = dict(v)
        if v["type"] == stat.S_IFDIR:
            v.pop("mtime_ns", None)
        out[k] = v
    return out


def _getfattr_blocks(out: str) -> dict[str, str]:
    """getfattr -d output as {file: attributes}; the order of files follows readdir."""
    blocks = {}
    for b in out.strip().split("\n\n"):
        head, _, rest = b.partition("\n")
        blocks[head] = rest
    return blocks


def test_cp_a_and_diff(tmp_path: Path, work: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    local_copy = tmp_path / "local_copy"
    run("cp", "-a", src, local_copy)
    dst = work / "dst"
    run("cp", "-a", src, dst)
    out = run("diff", "-r", "--no-dereference", src, dst, check=False)
    assert out.returncode == 0, f"diff -r found differences:\n{out.stdout}{out.stderr}"
    # modes, owners, links, xattrs and mtimes exactly as cp -a gives on local disk
    assert_same_tree(strip_root(snapshot(local_copy)), strip_root(snapshot(dst)))
    # and back from the mount to local disk
    back = tmp_path / "back"
    run("cp", "-a", dst, back)
    out = run("diff", "-r", "--no-dereference", src, back, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert_same_tree(strip_root(snapshot(local_copy)), strip_root(snapshot(back)))
    # getfattr sees the same xattrs as on local disk
    g1 = run("getfattr", "-h", "-R", "-d", "-m", "user.", "--absolute-names", ".", cwd=local_copy)
    g2 = run("getfattr", "-h", "-R", "-d", "-m", "user.", "--absolute-names", ".", cwd=dst)
    assert _getfattr_blocks(g1.stdout) == _getfattr_blocks(g2.stdout)
    assert "user.mime_type" in g2.stdout


def _tar_listing(archive: Path) -> list[str]:
    out = run("tar", "--xattrs", "--full-time", "-tvf", archive).stdout
    return sorted(out.splitlines())


def test_tar_create_and_extract(tmp_path: Path, work: Path) -> None:
    src_local = tmp_path / "tree"
    build_tree(src_local)
    src_mnt = work / "tree"
    build_tree(src_mnt)
    tar_flags = ["--xattrs", "--xattrs-include=user.*", "--numeric-owner", "--sort=name"]
    # create from the mount (and, for comparison, from local disk)
    a_local, a_mnt = tmp_path / "local.tar", tmp_path / "mnt.tar"
    run("tar", *tar_flags, "-cpf", a_local, "tree", cwd=tmp_path)
    run("tar", *tar_flags, "-cpf", a_mnt, "tree", cwd=work)
    assert _tar_listing(a_mnt) == _tar_listing(a_local)
    # identical archives except for ctime-dependent headers: compare extracted bytes
    # extract into the mount and on local disk, compare
    ex_local, ex_mnt = tmp_path / "ex", work / "ex"
    ex_local.mkdir()
    ex_mnt.mkdir()
    run("tar", *tar_flags, "-xpf", a_mnt, "-C", ex_local)
    run("tar", *tar_flags, "-xpf", a_mnt, "-C", ex_mnt)
    assert_same_tree(strip_root(snapshot(ex_local)), strip_root(snapshot(ex_mnt)))
    assert_same_tree(strip_root(snapshot(src_local)), strip_root(snapshot(ex_mnt / "tree")))
    # a compressed archive written to the mount and read back
    run("tar", *tar_flags, "-czpf", work / "t.tgz", "tree", cwd=tmp_path)
    out = run("tar", "-tzf", work / "t.tgz").stdout.splitlines()
    assert "tree/docs/big.bin" in out
    ex2 = work / "ex2"
    ex2.mkdir()
    run("tar", *tar_flags, "-xzpf", work / "t.tgz", "-C", ex2)
    assert_same_tree(strip_root(snapshot(src_local)), strip_root(snapshot(ex2 / "tree")))


GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test User",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test User",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_AUTHOR_DATE": "2024-01-02T03:04:05+00:00",
    "GIT_COMMITTER_DATE": "2024-01-02T03:04:05+00:00",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def _git_work(repo: Path, home: Path) -> dict[str, str]:
    env = {**GIT_ENV, "HOME": str(home), "GIT_CONFIG_GLOBAL": str(home / ".gitconfig")}

    def git(*args: str | Path) -> str:
        return run("git", *args, cwd=repo, env=env).stdout

    repo.mkdir()
    git("init", "-q", "-b", "main")
    build_tree(repo / "tree")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    status1 = git("status", "--porcelain")
    (repo / "tree" / "docs" / "readme.txt").write_text("changed\n")
    (repo / "new.txt").write_text("new\n")
    status2 = git("status", "--porcelain")
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    git("mv", "new.txt", "renamed.txt")
    git("rm", "-q", "tree/docs/big.bin")
    git("commit", "-q", "-m", "third")
    git("checkout", "-q", "-b", "branch", "HEAD~1")
    git("checkout", "-q", "main")
    git("gc", "-q")
    git("fsck", "--full", "--strict")
    return {
        "status1": status1,
        "status2": status2,
        "status3": git("status", "--porcelain"),
        "log": git("log", "--format=%H %s"),
        "ls": git("ls-files", "-s"),
        "head": git("rev-parse", "HEAD"),
    }


def test_git_init_add_commit(tmp_path: Path, work: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    want = _git_work(tmp_path / "repo", home)
    got = _git_work(work / "repo", home)
    assert got["status1"] == ""
    assert got["status2"] == want["status2"] != ""
    assert got["status3"] == ""
    assert len(got["log"].splitlines()) == 3
    # fixed dates: commit hashes are identical to those made on local disk
    assert got == want


def test_git_clone(tmp_path: Path, work: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    origin = tmp_path / "origin"
    _git_work(origin, home)
    env = {**GIT_ENV, "HOME": str(home), "GIT_CONFIG_GLOBAL": str(home / ".gitconfig")}
    results = []
    for dest in (tmp_path / "clone", work / "clone"):
        run("git", "clone", "-q", origin, dest, env=env)
        run("git", "clone", "-q", "--no-local", origin, f"{dest}-nolocal", env=env)
        for d in (dest, Path(f"{dest}-nolocal")):
            run("git", "fsck", "--full", "--strict", cwd=d, env=env)
            assert run("git", "status", "--porcelain", cwd=d, env=env).stdout == ""
        results.append(
            (
                run("git", "log", "--all", "--format=%H %s", cwd=dest, env=env).stdout,
                strip_root(snapshot(dest / "tree", times=False)),
            )
        )
    assert results[0][0] == results[1][0]
    assert_same_tree(results[0][1], results[1][1])
    # and the clone on the mount can be cloned again (reading packs from the mount)
    run("git", "clone", "-q", "--no-local", work / "clone", tmp_path / "clone2", env=env)
    run("git", "fsck", "--full", cwd=tmp_path / "clone2", env=env)


def _sqlite_work(db: Path, journal: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        con.execute(f"PRAGMA journal_mode={journal}")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
        con.execute("CREATE INDEX t_name ON t(name)")
        rnd = random.Random(99)
        for tx in range(10):
            with con:
                for i in range(200):
                    n = tx * 200 + i
                    con.execute(
                        "INSERT INTO t VALUES (?, ?, ?)",
                        (n, f"name-{rnd.randrange(10**6)}", rnd.randbytes(rnd.randrange(2000))),
                    )
        with con:
            con.execute("UPDATE t SET name = name || '-upd' WHERE id % 3 = 0")
            con.execute("DELETE FROM t WHERE id % 7 = 0")
        # a rolled-back transaction leaves nothing behind
        try:
            with con:
                con.execute("DELETE FROM t")
                raise RuntimeError("rollback")
        except RuntimeError:
            pass
        con.execute("VACUUM")
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT id, name, blob FROM t ORDER BY id").fetchall()
    finally:
        con.close()


def _check_db(db: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT id, name, blob FROM t ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite(tmp_path: Path, mounter, journal: str) -> None:
    m: Mount = mounter()
    want = _sqlite_work(tmp_path / "local.db", journal)
    got = _sqlite_work(m.path / "app.db", journal)
    assert len(got) == 2000 - len(range(0, 2000, 7))
    assert got == want
    assert _check_db(m.path / "app.db") == want
    # the sqlite3 command-line tool agrees
    if shutil.which("sqlite3"):
        out = run("sqlite3", m.path / "app.db", "PRAGMA integrity_check; SELECT count(*) FROM t;")
        assert out.stdout.split() == ["ok", str(len(want))]
    efsish("umount", str(m.path))
    m2 = mounter(m.store)
    assert _check_db(m2.path / "app.db") == want


def _rsync_tree(src: Path, dst: Path, *flags: str) -> None:
    run("rsync", "-a", *flags, f"{src}/", f"{dst}/")


def test_rsync(tmp_path: Path, work: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    local, dst = tmp_path / "local", work / "dst"
    for d in (local, dst):
        _rsync_tree(src, d, "-H", "-X")
    out = run("rsync", "-a", "-H", "-X", "--dry-run", "--itemize-changes", f"{src}/", f"{dst}/")
    assert out.stdout.strip() == "", f"rsync wants to change:\n{out.stdout}"
    assert_same_tree(strip_root(snapshot(local)), strip_root(snapshot(dst)))
    # plain rsync -a (no -H/-X) into a second directory, then nothing left to do
    dst2 = work / "plain"
    _rsync_tree(src, dst2)
    out = run("rsync", "-a", "--dry-run", "--itemize-changes", f"{src}/", f"{dst2}/")
    assert out.stdout.strip() == "", out.stdout
    # an incremental update: change, add and delete files; rsync transfers just those
    (src / "docs" / "medium.bin").write_bytes(b"changed")
    (src / "added").write_text("added")
    os.unlink(src / "docs" / "notes" / "n05.txt")
    out = run("rsync", "-a", "-H", "-X", "--delete", "--itemize-changes", f"{src}/", f"{dst}/")
    changed = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert {"docs/medium.bin", "added", "docs/notes/n05.txt"} <= changed, out.stdout
    _rsync_tree(src, local, "-H", "-X", "--delete")
    # rsync sets a directory's mtime before deleting inside it (on local disk too), and
    # then sees no difference within the same second: compare directory times loosely
    assert_same_tree(no_dir_times(snapshot(local)), no_dir_times(snapshot(dst)))
    out = run("rsync", "-a", "-H", "-X", "--dry-run", "--itemize-changes", f"{src}/", f"{dst}/")
    assert out.stdout.strip() == ""
    # rsync from the mount back to local disk (reads through the mount)
    back = tmp_path / "back"
    _rsync_tree(dst, back, "-H", "-X")
    assert_same_tree(no_dir_times(snapshot(dst)), no_dir_times(snapshot(back)))
