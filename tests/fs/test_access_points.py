"""Access points in process (efsish.access): the root mapping at the inode boundary, the
root's creation, and every request performed (and checked) as the access point's
identity, whatever the caller's. The real-mount counterparts are in
tests/fuse/test_access_points.py."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from efsish import acl
from efsish.access import AccessPointFs, Identity, open_root, permitted
from efsish.errors import EfsishError, FsError
from efsish.filesystem import Ctx, Filesystem
from efsish.meta import accesspoints as aps
from efsish.meta.accesspoints import CreationInfo
from efsish.meta.view import ROOT_INO, Attr

ROOT = Ctx(uid=0, gid=0)
CALLER = Ctx(uid=1000, gid=1000, umask=0o022)  # the caller's identity is ignored
ALICE = aps.make("/home/alice", 1001, 1001, (10,), CreationInfo(1001, 1001, 0o700))


async def _ap_fs(fs: Filesystem, ap: aps.AccessPoint = ALICE) -> AccessPointFs:
    return AccessPointFs(fs, ap, await open_root(fs, ap, read_only=False))


async def test_root_is_created_with_the_creation_owner_and_mode(fs: Filesystem) -> None:
    home = await fs.mkdir(ROOT_INO, b"home", 0o2755, ROOT)
    await fs.setattr(home.ino, ROOT, gid=50)  # setgid: new entries would get gid 50
    apfs = await _ap_fs(fs)
    root = await apfs.getattr(ROOT_INO)
    real = await fs.lookup(home.ino, b"alice")
    assert (root.uid, root.gid, stat.S_IMODE(root.mode)) == (1001, 1001, 0o700)
    assert stat.S_ISDIR(real.mode) and real.ino != ROOT_INO
    # A second mount finds it.
    assert await open_root(fs, ALICE, read_only=False) == real.ino


async def test_directories_above_the_root_are_roots_0755(fs: Filesystem) -> None:
    ap = aps.make("/a/b/c", 5, 5, creation=CreationInfo(5, 6, 0o750))
    await _ap_fs(fs, ap)
    a = await fs.lookup(ROOT_INO, b"a")
    b = await fs.lookup(a.ino, b"b")
    c = await fs.lookup(b.ino, b"c")
    assert [(x.uid, x.gid, stat.S_IMODE(x.mode)) for x in (a, b, c)] == [
        (0, 0, 0o755),
        (0, 0, 0o755),
        (5, 6, 0o750),
    ]


async def test_missing_root_without_creation_info_or_read_only_is_an_error(
    fs: Filesystem,
) -> None:
    bare = aps.make("/home/bob", 1002, 1002)
    with pytest.raises(EfsishError, match=r"does not exist.*no creation info"):
        await open_root(fs, bare, read_only=False)
    with pytest.raises(EfsishError, match="read-only"):
        await open_root(fs, ALICE, read_only=True)
    await fs.mknod(ROOT_INO, b"file", stat.S_IFREG | 0o644, ROOT)
    with pytest.raises(EfsishError, match="not a directory"):
        await open_root(fs, aps.make("/file", 1, 1), read_only=False)
    with pytest.raises(FsError):
        await fs.lookup(ROOT_INO, b"home")  # nothing was created


async def test_the_kernel_sees_only_the_subtree(fs: Filesystem) -> None:
    apfs = await _ap_fs(fs)
    real_root = (await fs.lookup((await fs.lookup(ROOT_INO, b"home")).ino, b"alice")).ino
    await fs.mknod(ROOT_INO, b"outside", stat.S_IFREG | 0o644, ROOT)
    sub = await apfs.mkdir(ROOT_INO, b"sub", 0o755, CALLER)
    # The root's ".." is the root; a subdirectory's ".." is the kernel's root.
    assert (await apfs.lookup(ROOT_INO, b"..")).ino == ROOT_INO
    assert (await apfs.lookup(sub.ino, b"..")).ino == ROOT_INO
    assert (await apfs.getattr(ROOT_INO)).uid == 1001
    assert [n for _, n, _ in await apfs.readdir(ROOT_INO, 0)] == [b"sub"]
    with pytest.raises(FsError) as e:
        await apfs.lookup(ROOT_INO, b"outside")
    assert e.value.errno == errno.ENOENT
    # The root's own number is never handed out, and is refused if sent.
    with pytest.raises(FsError) as e:
        await apfs.getattr(real_root)
    assert e.value.errno == errno.ESTALE
    # The kernel's root in, the filesystem's root directory never out.
    apfs.remember(ROOT_INO)
    assert fs.kernel_refs.get(real_root) == 1 and ROOT_INO not in fs.kernel_refs


async def test_every_request_is_made_as_the_access_point_identity(fs: Filesystem) -> None:
    apfs = await _ap_fs(fs)
    d = await apfs.mkdir(ROOT_INO, b"d", 0o777, CALLER)
    fh, f = await apfs.create(d.ino, b"f", 0o666, os.O_WRONLY, CALLER)
    await apfs.release(fh)
    ln = await apfs.symlink(d.ino, b"l", b"f", CALLER)
    for a in (d, f, ln):
        assert (a.uid, a.gid) == (1001, 1001)
    assert stat.S_IMODE(d.mode) == 0o755 and stat.S_IMODE(f.mode) == 0o644  # caller's umask
    # Permission checks use the access point's identity: a directory of another user
    # that only its owner may enter is closed, whoever calls.
    priv = await fs.mkdir(
        (await fs.lookup((await fs.lookup(ROOT_INO, b"home")).ino, b"alice")).ino,
        b"priv",
        0o700,
        ROOT,
    )
    await fs.mknod(priv.ino, b"secret", stat.S_IFREG | 0o600, ROOT)
    with pytest.raises(FsError) as e:
        await apfs.lookup(priv.ino, b"secret")
    assert e.value.errno == errno.EACCES
    with pytest.raises(FsError) as e:
        await apfs.mknod(priv.ino, b"new", stat.S_IFREG | 0o644, CALLER)
    assert e.value.errno == errno.EACCES
    assert not await apfs.access(priv.ino, os.R_OK)
    assert await apfs.access(d.ino, os.R_OK | os.W_OK | os.X_OK)
    # chown is root's, chmod the owner's.
    with pytest.raises(FsError) as e:
        await apfs.setattr(f.ino, CALLER, uid=0)
    assert e.value.errno == errno.EPERM
    with pytest.raises(FsError) as e:
        await apfs.setattr(priv.ino, CALLER, mode=0o777)
    assert e.value.errno == errno.EPERM
    assert stat.S_IMODE((await apfs.setattr(f.ino, CALLER, mode=0o600)).mode) == 0o600
    # A secondary gid counts; a group it is not in does not.
    await apfs.setattr(f.ino, CALLER, gid=10)
    with pytest.raises(FsError) as e:
        await apfs.setattr(f.ino, CALLER, gid=20)
    assert e.value.errno == errno.EPERM


async def test_rename_and_link_stay_inside_and_are_checked(fs: Filesystem) -> None:
    apfs = await _ap_fs(fs)
    a = await apfs.mkdir(ROOT_INO, b"a", 0o755, CALLER)
    fh, f = await apfs.create(a.ino, b"f", 0o644, os.O_WRONLY, CALLER)
    await apfs.release(fh)
    await apfs.rename(a.ino, b"f", ROOT_INO, b"g", 0)
    assert (await apfs.lookup(ROOT_INO, b"g")).ino == f.ino
    await apfs.link(f.ino, a.ino, b"h")
    alice = (await fs.lookup((await fs.lookup(ROOT_INO, b"home")).ino, b"alice")).ino
    ro = await fs.mkdir(alice, b"ro", 0o755, ROOT)
    with pytest.raises(FsError) as e:
        await apfs.rename(ROOT_INO, b"g", ro.ino, b"g", 0)
    assert e.value.errno == errno.EACCES
    with pytest.raises(FsError) as e:
        await apfs.link(f.ino, ro.ino, b"g")
    assert e.value.errno == errno.EACCES
    # Sticky: another user's entry in a sticky directory stays.
    tmp = await fs.mkdir(alice, b"tmp", 0o1777, ROOT)
    await fs.mknod(tmp.ino, b"theirs", stat.S_IFREG | 0o666, Ctx(uid=7, gid=7))
    with pytest.raises(FsError) as e:
        await apfs.unlink(tmp.ino, b"theirs")
    assert e.value.errno == errno.EPERM


def _attr(mode: int, uid: int = 1, gid: int = 1) -> Attr:
    return Attr(2, mode, uid, gid, 1, 0, 0, 0, 0, 0, 0)


def test_permitted_follows_owner_acl_group_other() -> None:
    who = Identity(1001, 1001, frozenset({1001, 10}))
    assert permitted(_attr(0o700, uid=1001), None, who, 7)
    assert not permitted(_attr(0o070, uid=1001, gid=1001), None, who, 4)  # owner class only
    assert permitted(_attr(0o040, gid=10), None, who, 4)  # a secondary group
    assert not permitted(_attr(0o004, gid=10), None, who, 4)  # group class, not other
    assert permitted(_attr(0o004, gid=99), None, who, 4)
    root = Identity(0, 0, frozenset({0}))
    assert permitted(_attr(stat.S_IFREG | 0o000), None, root, 6)
    assert not permitted(_attr(stat.S_IFREG | 0o644), None, root, 1)
    # ACL: a named user entry limited by the mask; a named group.
    ents = [
        [acl.USER_OBJ, 7, 0xFFFFFFFF],
        [acl.USER, 7, 1001],
        [acl.GROUP_OBJ, 0, 0xFFFFFFFF],
        [acl.GROUP, 4, 10],
        [acl.MASK, 5, 0xFFFFFFFF],
        [acl.OTHER, 0, 0xFFFFFFFF],
    ]
    value = acl.encode(ents)
    assert permitted(_attr(0o750), value, who, 5)
    assert not permitted(_attr(0o750), value, who, 2)  # the mask
    group_only = Identity(1002, 1002, frozenset({1002, 10}))
    assert permitted(_attr(0o750), value, group_only, 4)
    assert not permitted(_attr(0o757), value, group_only, 1)  # matched a group: no other
