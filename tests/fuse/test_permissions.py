"""Permission checks for many users through a real mount (allow_other +
default_permissions: the kernel enforces modes), each scenario also run on local disk and
compared. Users are numeric uids in forked children; paths are relative to a directory the
child enters while still root, because the mountpoint's parents are private to root."""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fuse.conftest import Mount
from tests.fuse.helpers import run_as

U1, U2 = 1000, 1001
SHARED_GROUP = 3000


def outcome(fn: Callable[..., Any], *args: Any) -> str:
    """'ok' or the errno name of the OSError fn(*args) raised (in the calling process)."""
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def as_user(
    uid: int,
    root: Path,
    fn: Callable[[], Any],
    *,
    gid: int | None = None,
    groups: list[int] | None = None,
    umask: int = 0o022,
) -> Any:
    return run_as(uid, uid if gid is None else gid, fn, cwd=root, umask=umask, groups=groups)


def on_both(tmp_path: Path, work: Path, scenario: Callable[[Path], Any]) -> Any:
    """Run scenario(root) on local disk and on the mount; assert equal results; return the
    mount's."""
    local = tmp_path / "local"
    local.mkdir()
    os.chmod(local, 0o755)
    os.chmod(work, 0o755)
    want = scenario(local)
    got = scenario(work)
    assert got == want, f"mount differs from local disk:\nmount: {got}\nlocal: {want}"
    return got


def make_homes(root: Path) -> None:
    for uid in (U1, U2):
        h = root / "home" / f"u{uid}"
        h.mkdir(parents=True)
        os.chown(h, uid, uid)
        os.chmod(h, 0o700)
    os.chmod(root / "home", 0o755)


def test_private_home_directories(tmp_path: Path, work: Path) -> None:
    def scenario(root: Path) -> dict[str, Any]:
        make_homes(root)
        r: dict[str, Any] = {}

        def setup_own(uid: int) -> None:
            os.mkdir(f"home/u{uid}/docs")
            with open(f"home/u{uid}/secret", "w") as f:
                f.write(f"secret of {uid}")
            os.chmod(f"home/u{uid}/secret", 0o644)  # readable, but the home dir is not

        for uid in (U1, U2):
            as_user(uid, root, functools.partial(setup_own, uid))
        for me, other in ((U1, U2), (U2, U1)):
            o = f"home/u{other}"

            def probe(o: str = o, me: int = me) -> dict[str, str]:
                return {
                    "list_other": outcome(os.listdir, o),
                    "read_other": outcome(lambda: open(f"{o}/secret").read()),
                    "stat_other": outcome(os.stat, f"{o}/secret"),
                    "create_in_other": outcome(lambda: open(f"{o}/intruder", "w").close()),
                    "mkdir_in_other": outcome(os.mkdir, f"{o}/intruder_dir"),
                    "unlink_other": outcome(os.unlink, f"{o}/secret"),
                    "rename_from_other": outcome(os.rename, f"{o}/secret", f"home/u{me}/stolen"),
                    "chdir_other": outcome(os.chdir, o),
                    "list_own": str(sorted(os.listdir(f"home/u{me}"))),
                    "read_own": open(f"home/u{me}/secret").read(),
                }

            r[f"{me}"] = as_user(me, root, probe)
        # root sees everything
        r["root_list"] = sorted(os.listdir(root / "home" / f"u{U1}"))
        return r

    got = on_both(tmp_path, work, scenario)
    for me in (U1, U2):
        g = got[str(me)]
        for k in (
            "list_other",
            "read_other",
            "stat_other",
            "create_in_other",
            "mkdir_in_other",
            "unlink_other",
            "rename_from_other",
            "chdir_other",
        ):
            assert g[k] == "EACCES", (me, k, g[k])
        assert g["read_own"] == f"secret of {me}"
        assert g["list_own"] == str(["docs", "secret"])
    assert got["root_list"] == ["docs", "secret"]


def test_new_files_get_caller_ids(tmp_path: Path, work: Path) -> None:
    def scenario(root: Path) -> dict[str, Any]:
        make_homes(root)
        h = root / "home" / f"u{U1}"
        os.chmod(h, 0o777)  # let U1 with another primary group in

        def create() -> dict[str, Any]:
            d = f"home/u{U1}"
            with open(f"{d}/file", "w") as f:
                f.write("x")
            os.mkdir(f"{d}/dir")
            os.symlink("file", f"{d}/link")
            os.mkfifo(f"{d}/fifo")
            os.link(f"{d}/file", f"{d}/hard")
            out = {}
            for n in ("file", "dir", "link", "fifo", "hard"):
                st = os.lstat(f"{d}/{n}")
                out[n] = (st.st_uid, st.st_gid)
            return out

        r = {"u1": as_user(U1, root, create)}
        for n in ("file", "dir", "link", "fifo", "hard"):
            os.unlink(h / n) if n != "dir" else os.rmdir(h / n)
        r["u1_gid4000"] = as_user(U1, root, create, gid=4000)
        return r

    got = on_both(tmp_path, work, scenario)
    assert set(got["u1"].values()) == {(U1, U1)}
    assert set(got["u1_gid4000"].values()) == {(U1, 4000)}


def test_umask_respected(tmp_path: Path, work: Path) -> None:
    """Without a default ACL the umask limits every create as on ext4, whether the
    kernel applies it or efsish does (FUSE_DONT_MASK); symlinks are always 0777."""

    def scenario(root: Path) -> dict[str, Any]:
        make_homes(root)

        def create(tag: str) -> dict[str, int]:
            d = f"home/u{U1}"
            fd = os.open(f"{d}/f{tag}", os.O_CREAT | os.O_WRONLY, 0o666)
            os.close(fd)
            os.close(os.open(f"{d}/x{tag}", os.O_CREAT | os.O_WRONLY, 0o750))
            os.mkdir(f"{d}/d{tag}", 0o777)
            os.mkfifo(f"{d}/p{tag}", 0o666)
            os.mknod(f"{d}/n{tag}", stat.S_IFREG | 0o666)
            os.symlink(f"f{tag}", f"{d}/l{tag}")
            with open(f"{d}/py{tag}", "w"):
                pass
            return {
                n: stat.S_IMODE(os.lstat(f"{d}/{n}{tag}").st_mode)
                for n in ("f", "x", "d", "p", "n", "l", "py")
            }

        return {
            oct(um): as_user(U1, root, functools.partial(create, oct(um)), umask=um)
            for um in (0o022, 0o027, 0o077, 0o002, 0o000)
        }

    got = on_both(tmp_path, work, scenario)
    assert got[oct(0o022)] == {
        "f": 0o644, "x": 0o750, "d": 0o755, "p": 0o644, "n": 0o644, "l": 0o777, "py": 0o644
    }  # fmt: skip
    assert got[oct(0o027)] == {
        "f": 0o640, "x": 0o750, "d": 0o750, "p": 0o640, "n": 0o640, "l": 0o777, "py": 0o640
    }  # fmt: skip
    assert got[oct(0o077)] == {
        "f": 0o600, "x": 0o700, "d": 0o700, "p": 0o600, "n": 0o600, "l": 0o777, "py": 0o600
    }  # fmt: skip
    assert got[oct(0o002)] == {
        "f": 0o664, "x": 0o750, "d": 0o775, "p": 0o664, "n": 0o664, "l": 0o777, "py": 0o664
    }  # fmt: skip
    assert got[oct(0o000)] == {
        "f": 0o666, "x": 0o750, "d": 0o777, "p": 0o666, "n": 0o666, "l": 0o777, "py": 0o666
    }  # fmt: skip


def test_setgid_directory(tmp_path: Path, work: Path) -> None:
    def scenario(root: Path) -> dict[str, Any]:
        proj = root / "project"
        proj.mkdir()
        os.chown(proj, 0, SHARED_GROUP)
        os.chmod(proj, 0o2775)

        def create() -> dict[str, Any]:
            with open("project/file", "w") as f:
                f.write("x")
            os.mkdir("project/sub")
            os.mkdir("project/sub/deeper")
            with open("project/sub/deeper/f", "w"):
                pass
            out = {}
            for n in ("file", "sub", "sub/deeper", "sub/deeper/f"):
                st = os.lstat(f"project/{n}")
                out[n] = (st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)))
            return out

        res: dict[str, Any] = as_user(U1, root, create, groups=[SHARED_GROUP])
        return res

    got = on_both(tmp_path, work, scenario)
    assert got["file"] == (U1, SHARED_GROUP, oct(0o644))
    assert got["sub"] == (U1, SHARED_GROUP, oct(0o2755))
    assert got["sub/deeper"] == (U1, SHARED_GROUP, oct(0o2755))
    assert got["sub/deeper/f"] == (U1, SHARED_GROUP, oct(0o644))


def test_sticky_directory(tmp_path: Path, work: Path) -> None:
    def scenario(root: Path) -> dict[str, Any]:
        t = root / "tmp"
        t.mkdir()
        os.chmod(t, 0o1777)

        def mk(name: str) -> None:
            with open(f"tmp/{name}", "w") as f:
                f.write(name)
            os.chmod(f"tmp/{name}", 0o666)  # even world-writable files are protected
            os.mkdir(f"tmp/{name}.d")

        as_user(U1, root, lambda: mk("u1file"))
        as_user(U2, root, lambda: mk("u2file"))

        def u2() -> dict[str, str]:
            return {
                "unlink_others": outcome(os.unlink, "tmp/u1file"),
                "rmdir_others": outcome(os.rmdir, "tmp/u1file.d"),
                "rename_others": outcome(os.rename, "tmp/u1file", "tmp/mine"),
                "replace_others": outcome(os.rename, "tmp/u2file", "tmp/u1file"),
                "write_others": outcome(lambda: open("tmp/u1file", "a").write("ok to write")),
                "unlink_own": outcome(os.unlink, "tmp/u2file"),
                "rmdir_own": outcome(os.rmdir, "tmp/u2file.d"),
            }

        r: dict[str, Any] = {"u2": as_user(U2, root, u2)}
        r["left"] = sorted(os.listdir(t))
        r["u1_unlink_own"] = as_user(U1, root, lambda: outcome(os.unlink, "tmp/u1file"))
        # the directory owner may delete others' files
        os.chown(t, U2, U2)
        as_user(U1, root, lambda: mk("again"))
        r["dir_owner_unlinks"] = as_user(U2, root, lambda: outcome(os.unlink, "tmp/again"))
        return r

    got = on_both(tmp_path, work, scenario)
    u2 = got["u2"]
    for k in ("unlink_others", "rmdir_others", "rename_others", "replace_others"):
        assert u2[k] in ("EPERM", "EACCES"), (k, u2[k])
    assert u2["write_others"] == "ok"
    assert u2["unlink_own"] == "ok"
    assert u2["rmdir_own"] == "ok"
    assert got["left"] == ["u1file", "u1file.d"]
    assert got["u1_unlink_own"] == "ok"
    assert got["dir_owner_unlinks"] == "ok"


def test_file_mode_checks(tmp_path: Path, work: Path) -> None:
    def scenario(root: Path) -> dict[str, Any]:
        d = root / "d"
        d.mkdir()
        os.chmod(d, 0o755)
        f = d / "f"
        f.write_text("data")
        os.chown(f, U1, SHARED_GROUP)
        os.chmod(f, 0o640)
        w = d / "world"
        w.write_text("w")
        os.chown(w, U1, U1)
        os.chmod(w, 0o644)

        def other() -> dict[str, str]:
            return {
                "read": outcome(lambda: open("d/f").read()),
                "write": outcome(lambda: open("d/f", "a").close()),
                "truncate": outcome(os.truncate, "d/world", 0),
                "write_world": outcome(lambda: open("d/world", "a").close()),
                "read_world": outcome(lambda: open("d/world").read()),
                "chmod": outcome(os.chmod, "d/world", 0o666),
                "chown": outcome(os.chown, "d/world", U2, U2),
                "utime_now": outcome(os.utime, "d/world"),
                "utime_set": outcome(os.utime, "d/world", (1, 1)),
                "setxattr": outcome(os.setxattr, "d/world", "user.x", b"1"),
                "create_in_dir": outcome(lambda: open("d/new", "w").close()),
                "unlink_in_dir": outcome(os.unlink, "d/world"),
            }

        def group_member() -> dict[str, str]:
            return {
                "read": outcome(lambda: open("d/f").read()),
                "write": outcome(lambda: open("d/f", "a").close()),
            }

        def read_after_chmod_0() -> str:
            os.chmod("d/world", 0)
            return Path("d/world").read_text()

        def owner() -> dict[str, str]:
            return {
                "chmod": outcome(os.chmod, "d/world", 0o600),
                "chgrp_member": outcome(os.chown, "d/world", -1, SHARED_GROUP),
                "chgrp_nonmember": outcome(os.chown, "d/world", -1, 4444),
                "chown_away": outcome(os.chown, "d/world", U2, -1),
                "utime_set": outcome(os.utime, "d/world", (1, 1)),
                "read_0000": outcome(read_after_chmod_0),
            }

        return {
            "other": as_user(U2, root, other),
            "member": as_user(U2, root, group_member, groups=[SHARED_GROUP]),
            "owner": as_user(U1, root, owner, groups=[SHARED_GROUP]),
            "root_reads_0000": open(w).read(),
            "world_gid": os.stat(w).st_gid,
        }

    got = on_both(tmp_path, work, scenario)
    o = got["other"]
    assert o == {
        "read": "EACCES",
        "write": "EACCES",
        "truncate": "EACCES",
        "write_world": "EACCES",
        "read_world": "ok",
        "chmod": "EPERM",
        "chown": "EPERM",
        "utime_now": "EACCES",
        "utime_set": "EPERM",
        "setxattr": "EACCES",
        "create_in_dir": "EACCES",
        "unlink_in_dir": "EACCES",
    }
    assert got["member"] == {"read": "ok", "write": "EACCES"}
    assert got["owner"] == {
        "chmod": "ok",
        "chgrp_member": "ok",
        "chgrp_nonmember": "EPERM",
        "chown_away": "EPERM",
        "utime_set": "ok",
        "read_0000": "EACCES",
    }
    assert got["root_reads_0000"] == "w"
    assert got["world_gid"] == SHARED_GROUP


def test_write_by_other_clears_setuid(tmp_path: Path, work: Path) -> None:
    def scenario(root: Path) -> dict[str, Any]:
        f = root / "prog"
        f.write_bytes(b"#!/bin/sh\n")
        os.chown(f, U1, U1)
        os.chmod(f, 0o6777)

        def append() -> None:
            with open("prog", "ab") as fh:
                fh.write(b"echo modified\n")

        as_user(U2, root, append)
        g = root / "prog2"
        g.write_bytes(b"x")
        os.chown(g, U1, U1)
        os.chmod(g, 0o4777)
        as_user(U2, root, lambda: os.truncate("prog2", 0))
        return {
            "prog": oct(stat.S_IMODE(os.stat(f).st_mode)),
            "prog2": oct(stat.S_IMODE(os.stat(g).st_mode)),
            "content": f.read_bytes(),
        }

    got = on_both(tmp_path, work, scenario)
    assert got["prog"] == oct(0o777)
    assert got["prog2"] == oct(0o777)
    assert got["content"] == b"#!/bin/sh\necho modified\n"


def test_many_users_at_once(work: Path) -> None:
    os.chmod(work, 0o755)
    users = list(range(2000, 2012))
    for u in users:
        h = work / f"u{u}"
        h.mkdir()
        os.chown(h, u, u)
        os.chmod(h, 0o700)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def session(u: int) -> dict[str, Any]:
        mine = f"u{u}"
        for i in range(30):
            with open(f"{mine}/f{i}", "w") as f:
                f.write(f"{u}:{i}" * 100)
        os.mkdir(f"{mine}/sub")
        os.rename(f"{mine}/f0", f"{mine}/sub/f0")
        others = [f"u{x}" for x in users if x != u]
        denied = [outcome(os.listdir, o) for o in others]
        content_ok = all(Path(f"{mine}/f{i}").read_text() == f"{u}:{i}" * 100 for i in range(1, 30))
        return {"denied": sorted(set(denied)), "n": len(os.listdir(mine)), "ok": content_ok}

    def worker(u: int) -> None:
        try:
            results[u] = run_as(u, u, session, u, cwd=work)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for u in users:
        assert results[u] == {"denied": ["EACCES"], "n": 30, "ok": True}, (u, results[u])
        st = os.stat(work / f"u{u}" / "f5")
        assert (st.st_uid, st.st_gid) == (u, u)


def acl_xattr(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in its Linux xattr form: (tag, perm, id) entries after the header."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_system_and_trusted_xattrs(tmp_path: Path, work: Path) -> None:
    """The kernel checks nothing for system.* names other than ACLs and leaves the
    listing of trusted.* names to the filesystem: as on ext4, a user can neither attach
    system.* data to a file (not even their own) nor see or touch trusted.* ones."""
    no_id = 0xFFFFFFFF
    acl = acl_xattr((1, 6, no_id), (2, 6, U2), (4, 4, no_id), (0x10, 6, no_id), (0x20, 4, no_id))

    def scenario(root: Path) -> dict[str, Any]:
        d = root / "d"
        d.mkdir()
        os.chmod(d, 0o755)
        f = d / "rootfile"
        f.write_text("r")
        os.chmod(f, 0o644)
        os.setxattr(f, "trusted.r", b"root only")
        mine = d / "mine"
        mine.write_text("m")
        os.chown(mine, U1, U1)

        def user() -> dict[str, Any]:
            return {
                "set_system_other": outcome(os.setxattr, "d/rootfile", "system.x", b"x" * 60000),
                "remove_system_other": outcome(os.removexattr, "d/rootfile", "system.x"),
                "set_system_own": outcome(os.setxattr, "d/mine", "system.x", b"x"),
                "acl_other": outcome(os.setxattr, "d/rootfile", "system.posix_acl_access", acl),
                "acl_own": outcome(os.setxattr, "d/mine", "system.posix_acl_access", acl),
                "set_trusted": outcome(os.setxattr, "d/mine", "trusted.x", b"x"),
                "get_trusted": outcome(os.getxattr, "d/rootfile", "trusted.r"),
                "remove_trusted": outcome(os.removexattr, "d/rootfile", "trusted.r"),
                "list": sorted(os.listxattr("d/rootfile")),
            }

        return {
            "u1": as_user(U1, root, user),
            "root_set_system": outcome(os.setxattr, f, "system.x", b"x"),
            "root_list": sorted(os.listxattr(f)),
            "root_trusted": os.getxattr(f, "trusted.r"),
            "mine_acl": os.getxattr(mine, "system.posix_acl_access") == acl,
        }

    got = on_both(tmp_path, work, scenario)
    unsupported = errno.errorcode[errno.EOPNOTSUPP]
    assert got["u1"] == {
        "set_system_other": unsupported,
        "remove_system_other": unsupported,
        "set_system_own": unsupported,
        "acl_other": "EPERM",
        "acl_own": "ok",
        "set_trusted": "EPERM",
        "get_trusted": "ENODATA",
        "remove_trusted": "EPERM",
        "list": [],
    }
    assert got["root_set_system"] == unsupported
    assert got["root_list"] == ["trusted.r"]
    assert got["root_trusted"] == b"root only"
    assert got["mine_acl"] is True


def getfacl(p: Path) -> str:
    out = subprocess.run(
        ["getfacl", "-n", "--omit-header", str(p)], capture_output=True, text=True, check=True
    )
    return out.stdout


def test_default_acl_inheritance(tmp_path: Path, work: Path, shared_mount: Mount) -> None:
    """setfacl -d on a directory: what is created in it gets the ACL and mode ext4 gives
    (compared with local disk, read back with getfacl and stat), by every kind of create,
    two levels down, under umasks that take permissions the default ACL grants (the
    default ACL replaces the umask); the inherited entries are enforced."""

    def scenario(root: Path) -> dict[str, Any]:
        for name, spec in (
            ("shared", f"g:{SHARED_GROUP}:rwx,u:{U2}:r-x"),  # extended: mask entries
            ("plain", "o::---"),  # only the base entries: no access ACL is stored
        ):
            d = root / name
            d.mkdir()
            os.chown(d, U1, SHARED_GROUP)
            os.chmod(d, 0o775)
            subprocess.run(["setfacl", "-d", "-m", spec, str(d)], check=True)

        def create(d: str, um: str) -> None:
            for n, m in (("f666", 0o666), ("f600", 0o600), ("f750", 0o750)):
                os.close(os.open(f"{d}/{n}{um}", os.O_CREAT | os.O_WRONLY, m))
            os.mkdir(f"{d}/d777{um}", 0o777)
            os.mkdir(f"{d}/d750{um}", 0o750)
            os.mkfifo(f"{d}/p{um}", 0o666)
            os.symlink("f666", f"{d}/l{um}")
            with open(f"{d}/d777{um}/inner", "w"):
                pass
            os.mkdir(f"{d}/d777{um}/sub")

        r: dict[str, Any] = {}
        for um in (0o022, 0o077, 0o002, 0o000):
            for dn in ("shared", "plain"):
                as_user(U1, root, functools.partial(create, dn, oct(um)), umask=um)
        for p in sorted(root.rglob("*")):
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            r[rel] = (oct(st.st_mode), st.st_gid)
            if not stat.S_ISLNK(st.st_mode):
                r[rel + " acl"] = getfacl(p)

        def u2() -> dict[str, str]:
            return {
                "read_shared": outcome(lambda: open("shared/f6660o2").read()),
                "write_shared": outcome(lambda: open("shared/f6660o2", "a").close()),
                "create_shared_sub": outcome(lambda: open("shared/d7770o2/sub/x", "w").close()),
                "read_plain": outcome(lambda: open("plain/f6660o2").read()),
            }

        r["u2"] = as_user(U2, root, u2)
        r["team"] = as_user(
            1002,
            root,
            lambda: outcome(lambda: open("shared/d7770o2/sub/x", "w").close()),
            groups=[SHARED_GROUP],
        )
        return r

    got = on_both(tmp_path, work, scenario)
    for um in ("0o22", "0o77", "0o2", "0o0"):  # the umask plays no part
        assert got[f"shared/f666{um}"] == (oct(0o100664), U1)
        assert f"group:{SHARED_GROUP}:rwx\t#effective:rw-" in got[f"shared/f666{um} acl"]
        assert got[f"shared/d777{um}"] == (oct(0o40775), U1)
        assert got[f"plain/f666{um}"] == (oct(0o100660), U1)
    assert "default:" in got["shared/d7770o2/sub acl"]
    assert got["u2"] == {
        "read_shared": "ok",
        "write_shared": "EACCES",
        "create_shared_sub": "EACCES",
        "read_plain": "EACCES",
    }
    assert got["team"] == "ok"
    assert "umask: applied by efsish" in shared_mount.log(), shared_mount.log()[-2000:]
