"""Access points on real mounts (`-o access_point=ID`): the mount shows only the access
point's subtree, and every request is made and checked as its identity, whoever calls.
Users are numeric uids in forked children (tests/fuse/helpers.run_as); paths are
relative to the mountpoint, entered while still root."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from tests.fuse.conftest import Mount, efsish
from tests.fuse.helpers import expect_errno, poll, run_as

ALICE, BOB = 1001, 1002
CALLERS = (0, 1000, 1003)  # local users of the machine that mounts the access point


def create_ap(store: str, root: str, uid: int, *extra: str) -> str:
    out = efsish("access-point", "create", store, "--root", root, "--uid", str(uid),
                 "--gid", str(uid), *extra)  # fmt: skip
    ap_id = out.stdout.strip()
    assert ap_id.startswith("fsap-"), out.stdout
    return ap_id


def home(owner: int) -> tuple[str, ...]:
    return ("--create-owner", f"{owner}:{owner}", "--create-mode", "0700")


def as_user(uid: int, m: Mount, fn: Callable[[], object]) -> object:
    return run_as(uid, uid, fn, cwd=m.path, groups=[])


def test_every_local_user_acts_as_the_access_point(
    mounter: Callable[..., Mount],
) -> None:
    plain = mounter()
    ap_id = create_ap(plain.store, "/home/alice", ALICE, *home(ALICE), "--secondary-gids", "50")
    m = mounter(plain.store, "-o", f"access_point={ap_id}")
    st = os.stat(m.path)
    # The root was created with the creation info, and is the mount's root.
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (ALICE, ALICE, 0o700)
    assert st.st_ino == 1

    for uid in CALLERS:

        def work(uid: int = uid) -> tuple[int, int]:
            os.mkdir(f"d{uid}")
            with open(f"d{uid}/f", "w") as f:
                f.write(f"from {uid}")
            os.chmod(f"d{uid}/f", 0o600)
            s = os.stat(f"d{uid}/f")
            return s.st_uid, s.st_gid

        # Everyone enters alice's 0700 root and owns what they create as alice.
        assert as_user(uid, m, work) == (ALICE, ALICE)
    # Files of others' uids: alice may read what she owns, whoever asks.
    for uid in CALLERS:
        for other in CALLERS:

            def read(other: int = other) -> str:
                return Path(f"d{other}/f").read_text()

            assert as_user(uid, m, read) == f"from {other}"

    # On the plain mount the same files are alice's, private to her.
    plain_home = plain.path / "home" / "alice"
    names = sorted(p.name for p in poll(lambda: list(plain_home.iterdir())))
    assert names == [f"d{u}" for u in sorted(CALLERS)]
    for uid in CALLERS:
        s = os.stat(plain_home / f"d{uid}" / "f")
        assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (ALICE, ALICE, 0o600)

    def read_on_plain() -> str:
        return Path("home/alice/d1000/f").read_text()

    expect_errno(errno.EACCES, as_user, 1000, plain, read_on_plain)

    # Root's file there, private to root: even root cannot read it through the access
    # point (the identity is alice's), and alice's secondary gid grants group access.
    (plain_home / "roots").write_text("root only")
    os.chmod(plain_home / "roots", 0o600)
    (plain_home / "group50").write_text("group 50")
    os.chown(plain_home / "group50", 0, 50)
    os.chmod(plain_home / "group50", 0o640)
    poll(lambda: (m.path / "group50").exists())
    for uid in CALLERS:
        expect_errno(errno.EACCES, as_user, uid, m, lambda: Path("roots").read_text())
        assert as_user(uid, m, lambda: Path("group50").read_text()) == "group 50"
        assert as_user(uid, m, lambda: os.access("roots", os.R_OK)) is False
        assert as_user(uid, m, lambda: os.access("group50", os.R_OK)) is True
        # chown is root's: not even the root caller gives files away.
        expect_errno(errno.EPERM, as_user, uid, m, lambda: os.chown("d0/f", 0, 0))


def test_two_access_points_see_their_own_subtrees(mounter: Callable[..., Mount]) -> None:
    plain = mounter()
    a_id = create_ap(plain.store, "/home/alice", ALICE, *home(ALICE))
    b_id = create_ap(plain.store, "/home/bob", BOB, *home(BOB))
    a = mounter(plain.store, "-o", f"access_point={a_id}")
    b = mounter(plain.store, "-o", f"access_point={b_id}")
    as_user(1000, a, lambda: Path("notes").write_text("alice's"))
    as_user(1000, b, lambda: Path("notes").write_text("bob's"))
    assert (a.path / "notes").read_text() == "alice's"
    assert (b.path / "notes").read_text() == "bob's"
    assert os.listdir(a.path) == ["notes"] and os.listdir(b.path) == ["notes"]
    for name in ("home", "alice", "bob"):
        assert not (a.path / name).exists() and not (b.path / name).exists()
    homes = plain.path / "home"
    poll(lambda: (homes / "bob" / "notes").exists())
    assert sorted(os.listdir(homes)) == ["alice", "bob"]
    for who, uid in (("alice", ALICE), ("bob", BOB)):
        s = os.stat(homes / who / "notes")
        assert (s.st_uid, s.st_gid) == (uid, uid)
        assert (homes / who / "notes").read_text() == f"{who}'s"
        d = os.stat(homes / who)
        assert (d.st_uid, stat.S_IMODE(d.st_mode)) == (uid, 0o700)
    # What the plain mount adds under one root shows on that access point only.
    (homes / "bob" / "from-plain").write_text("x")
    assert poll(lambda: (b.path / "from-plain").exists())
    assert not (a.path / "from-plain").exists()
    # Bob's access point cannot reach alice's files by any name.
    expect_errno(errno.ENOENT, os.stat, b.path / ".." / b.path.name / "alice")


def test_no_path_leads_out_of_the_root(mounter: Callable[..., Mount], tmp_path: Path) -> None:
    plain = mounter()
    ap_id = create_ap(plain.store, "/home/alice", ALICE, *home(ALICE))
    m = mounter(plain.store, "-o", f"access_point={ap_id}")
    (m.path / "f").write_text("mine")
    (m.path / "sub").mkdir()
    (plain.path / "top-secret").write_text("outside")
    # ".." of the root leaves the mount, into the local directory above it.
    assert os.stat(m.path / "..").st_ino == os.stat(m.path.parent).st_ino
    assert os.stat(m.path / "sub" / "..").st_ino == 1
    assert sorted(os.listdir(m.path / "sub" / "..")) == ["f", "sub"]
    # Renames and links out of the mount are cross-device; a relative symlink that
    # climbs resolves in the local namespace, never in the filesystem's.
    expect_errno(errno.EXDEV, os.rename, m.path / "f", tmp_path / "f")
    expect_errno(errno.EXDEV, os.rename, m.path / "f", m.path / ".." / "f")
    expect_errno(errno.EXDEV, os.link, m.path / "f", tmp_path / "f2")
    (plain.path / "home" / "alice" / "up").symlink_to("../../top-secret")
    poll(lambda: (m.path / "up").is_symlink())
    assert not (m.path / "up").exists()  # .../mntX/../../top-secret is not there
    (plain.path / "home" / "alice" / "abs").symlink_to("/top-secret")
    poll(lambda: (m.path / "abs").is_symlink())
    assert not (m.path / "abs").exists()
    # The root's listing holds its own entries only.
    assert sorted(os.listdir(m.path)) == ["abs", "f", "sub", "up"]


def test_missing_root_and_unknown_ids_are_one_line_errors(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    plain = mounter()
    bare = create_ap(plain.store, "/home/carol", 1004)  # no creation info
    mp = tmp_path / "bare"
    mp.mkdir()
    for opt, want in (
        (f"access_point={bare}", "does not exist"),
        ("access_point=fsap-00000000000000000", "no access point fsap-00000000000000000"),
        ("access_point=../x", "invalid value for mount option access_point"),
    ):
        res = efsish("mount", plain.store, str(mp), "--cache-dir", str(tmp_path / "c"), "-o",
                     opt, check=False)  # fmt: skip
        assert res.returncode != 0, res.stdout
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], res.stderr
        assert not os.path.ismount(mp)
    # Created on the plain mount, it mounts.
    (plain.path / "home" / "carol").mkdir(parents=True)
    os.chown(plain.path / "home" / "carol", 1004, 1004)
    m = mounter(plain.store, "-o", f"access_point={bare}")
    assert os.stat(m.path).st_uid == 1004
    out = efsish("access-point", "list", plain.store).stdout
    assert bare in out and "root=/home/carol" in out
    assert bare in efsish("status", plain.store).stdout
    efsish("access-point", "delete", plain.store, bare)
    assert bare not in efsish("access-point", "list", plain.store).stdout


def test_read_only_access_point(mounter: Callable[..., Mount]) -> None:
    plain = mounter()
    ap_id = create_ap(plain.store, "/home/alice", ALICE, *home(ALICE))
    rw = mounter(plain.store, "-o", f"access_point={ap_id}")  # creates the root
    (rw.path / "f").write_text("alice's")
    os.chmod(rw.path / "f", 0o600)
    fd = os.open(rw.path, os.O_RDONLY)
    try:
        os.fsync(fd)  # in the log: a read-only mount recalls no lease
    finally:
        os.close(fd)
    ro = mounter(plain.store, "-o", f"access_point={ap_id},ro")
    assert sorted(os.listdir(ro.path)) == ["f"]
    assert as_user(1000, ro, lambda: Path("f").read_text()) == "alice's"
    expect_errno(errno.EROFS, as_user, 1000, ro, lambda: Path("g").write_text("x"))
    expect_errno(errno.EROFS, as_user, 0, ro, lambda: os.unlink("f"))
