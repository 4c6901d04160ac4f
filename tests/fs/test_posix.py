"""POSIX semantics of Filesystem, called directly (no FUSE), on a plain and on an
encrypted filesystem (both in the lease format, the default)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from efsish import acl
from efsish.acl import ACL_ACCESS, ACL_DEFAULT
from efsish.errors import FsError
from efsish.filesystem import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Ctx,
    Filesystem,
)
from efsish.meta.ops import Op, SetXattr
from efsish.meta.planning import PlanContext
from efsish.meta.view import ROOT_INO, View
from tests.fs.conftest import FsFactory
from tests.fs.helpers import ROOT, read_file, write_file


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def encrypted(request: pytest.FixtureRequest) -> bool:
    """Every test here runs on a plain and on an encrypted filesystem."""
    return bool(request.param)


def errno_of(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


async def test_create_exists_and_missing(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"a", b"hello")
    assert (await fs.lookup(ROOT_INO, b"a")).ino == ino
    with pytest.raises(FsError) as e:
        await fs.mknod(ROOT_INO, b"a", stat.S_IFREG | 0o644, ROOT)
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        await fs.lookup(ROOT_INO, b"nope")
    assert errno_of(e) == errno.ENOENT
    assert await read_file(fs, ino) == b"hello"


async def test_name_limits(fs: Filesystem) -> None:
    await fs.mkdir(ROOT_INO, b"x" * 255, 0o755, ROOT)
    for call in (
        fs.mkdir(ROOT_INO, b"y" * 256, 0o755, ROOT),
        fs.lookup(ROOT_INO, b"y" * 256),
        fs.symlink(ROOT_INO, b"y" * 256, b"t", ROOT),
    ):
        with pytest.raises(FsError) as e:
            await call
        assert errno_of(e) == errno.ENAMETOOLONG
    await fs.symlink(ROOT_INO, b"ok", b"t" * 4095, ROOT)
    with pytest.raises(FsError) as e:
        await fs.symlink(ROOT_INO, b"long", b"t" * 4096, ROOT)
    assert errno_of(e) == errno.ENAMETOOLONG
    ino = (await fs.lookup(ROOT_INO, b"ok")).ino
    assert await fs.readlink(ino) == b"t" * 4095


async def test_dirs_nlink_and_rmdir(fs: Filesystem) -> None:
    d = await fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    await fs.mkdir(d.ino, b"s1", 0o755, ROOT)
    await fs.mkdir(d.ino, b"s2", 0o755, ROOT)
    assert (await fs.getattr(d.ino)).nlink == 4
    with pytest.raises(FsError) as e:
        await fs.rmdir(ROOT_INO, b"d")
    assert errno_of(e) == errno.ENOTEMPTY
    with pytest.raises(FsError) as e:
        await fs.unlink(ROOT_INO, b"d")
    assert errno_of(e) == errno.EISDIR
    await fs.rmdir(d.ino, b"s1")
    assert (await fs.getattr(d.ino)).nlink == 3
    root_links = (await fs.getattr(ROOT_INO)).nlink
    await fs.rmdir(d.ino, b"s2")
    await fs.rmdir(ROOT_INO, b"d")
    assert (await fs.getattr(ROOT_INO)).nlink == root_links - 1


async def test_hard_links(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"f", b"data")
    await fs.link(ino, ROOT_INO, b"g")
    assert (await fs.getattr(ino)).nlink == 2
    await fs.unlink(ROOT_INO, b"f")
    assert (await fs.getattr(ino)).nlink == 1
    assert await read_file(fs, ino) == b"data"
    d = await fs.mkdir(ROOT_INO, b"dir", 0o755, ROOT)
    with pytest.raises(FsError) as e:
        await fs.link(d.ino, ROOT_INO, b"dirlink")
    assert errno_of(e) == errno.EPERM


async def test_rename_rules(fs: Filesystem) -> None:
    a = await fs.mkdir(ROOT_INO, b"a", 0o755, ROOT)
    b = await fs.mkdir(a.ino, b"b", 0o755, ROOT)
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"a", b.ino, b"inside")
    assert errno_of(e) == errno.EINVAL
    f1 = await write_file(fs, ROOT_INO, b"f1", b"one")
    f2 = await write_file(fs, ROOT_INO, b"f2", b"two")
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"f1", ROOT_INO, b"f2", RENAME_NOREPLACE)
    assert errno_of(e) == errno.EEXIST
    await fs.rename(ROOT_INO, b"f1", ROOT_INO, b"f2", RENAME_EXCHANGE)
    assert (await fs.lookup(ROOT_INO, b"f2")).ino == f1
    assert (await fs.lookup(ROOT_INO, b"f1")).ino == f2
    await fs.rename(ROOT_INO, b"f1", ROOT_INO, b"f2")  # replace
    assert (await fs.lookup(ROOT_INO, b"f2")).ino == f2
    with pytest.raises(FsError):
        await fs.lookup(ROOT_INO, b"f1")
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"f2", ROOT_INO, b"a")
    assert errno_of(e) == errno.EISDIR
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"a", ROOT_INO, b"f2")
    assert errno_of(e) == errno.ENOTDIR
    empty = await fs.mkdir(ROOT_INO, b"empty", 0o755, ROOT)
    await fs.rename(a.ino, b"b", ROOT_INO, b"empty")  # dir over empty dir
    assert (await fs.lookup(ROOT_INO, b"empty")).ino == b.ino
    with pytest.raises(FsError):
        await fs.getattr(empty.ino)
    assert (await fs.getattr(a.ino)).nlink == 2


async def test_rename_noreplace_onto_another_name_of_the_same_file(fs: Filesystem) -> None:
    """RENAME_NOREPLACE fails with EEXIST whenever the new name exists, even when it is
    another hard link of the same file (Linux checks the flag before the same-file
    shortcut: renameat2(2)); a plain rename between two such names does nothing."""
    f = await write_file(fs, ROOT_INO, b"x", b"data")
    await fs.link(f, ROOT_INO, b"y")
    with pytest.raises(FsError) as e:
        await fs.rename(ROOT_INO, b"x", ROOT_INO, b"y", RENAME_NOREPLACE)
    assert errno_of(e) == errno.EEXIST
    await fs.rename(ROOT_INO, b"x", ROOT_INO, b"y")
    assert (await fs.lookup(ROOT_INO, b"x")).ino == (await fs.lookup(ROOT_INO, b"y")).ino == f
    assert (await fs.getattr(f)).nlink == 2


async def test_setgid_dir_inheritance(fs: Filesystem) -> None:
    d = await fs.mkdir(ROOT_INO, b"shared", 0o2775, Ctx(0, 0))
    await fs.setattr(d.ino, ROOT, gid=500)
    f = await fs.mknod(d.ino, b"f", stat.S_IFREG | 0o644, Ctx(1000, 1000))
    assert (f.uid, f.gid) == (1000, 500)
    sub = await fs.mkdir(d.ino, b"sub", 0o755, Ctx(1000, 1000))
    assert sub.gid == 500 and sub.mode & stat.S_ISGID


async def test_chown_clears_setuid(fs: Filesystem) -> None:
    f = await fs.mknod(ROOT_INO, b"f", stat.S_IFREG | 0o6755, ROOT)
    a = await fs.setattr(f.ino, ROOT, uid=1000)
    assert a.uid == 1000 and not a.mode & stat.S_ISUID and not a.mode & stat.S_ISGID


async def test_truncate_and_sparse(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"f", b"x" * 100_000)
    await fs.setattr(ino, ROOT, size=10)
    assert await read_file(fs, ino) == b"x" * 10
    await fs.setattr(ino, ROOT, size=50_000)
    assert await read_file(fs, ino) == b"x" * 10 + bytes(49_990)
    fh, _ = await fs.open(ino, os.O_RDWR)
    await fs.write(fh, 5 << 30, b"end")  # 5 GiB offset: a hole
    await fs.flush(fh)
    await fs.release(fh)
    attr = await fs.getattr(ino)
    assert attr.size == (5 << 30) + 3
    fh, _ = await fs.open(ino, os.O_RDONLY)
    assert await fs.read(fh, (5 << 30) - 5, 8) == bytes(5) + b"end"
    assert await fs.read(fh, 3 << 30, 4096) == bytes(4096)
    await fs.release(fh)


async def test_random_write_touches_only_its_block(fs: Filesystem) -> None:
    bs = fs.block_size
    data = bytearray(os.urandom(8 * bs))
    ino = await write_file(fs, ROOT_INO, b"big", bytes(data))
    up_before = fs.blocks.bytes_up
    fh, _ = await fs.open(ino, os.O_RDWR)
    await fs.write(fh, 3 * bs + 100, b"patch")
    await fs.flush(fh)
    await fs.release(fh)
    assert fs.blocks.bytes_up - up_before == 5  # only the new bytes were uploaded
    data[3 * bs + 100 : 3 * bs + 105] = b"patch"
    assert await read_file(fs, ino) == bytes(data)


async def test_unlinked_open_file_keeps_working(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"tmp", b"before")
    fh, _ = await fs.open(ino, os.O_RDWR)
    await fs.unlink(ROOT_INO, b"tmp")
    assert await fs.read(fh, 0, 100) == b"before"
    await fs.write(fh, 6, b"+after")
    await fs.flush(fh)
    assert await fs.read(fh, 0, 100) == b"before+after"
    assert (await fs.getattr(ino)).nlink == 0
    await fs.release(fh)
    with pytest.raises(FsError):
        await fs.getattr(ino)


async def test_a_file_another_mount_unlinks_keeps_working_where_it_is_open(
    make_fs: FsFactory,
) -> None:
    """Mount B unlinks a file that A has open, A not having heard of it yet: A's flush,
    fchmod and ftruncate, each planned against A's old view, find the file gone when
    their log position turns out to hold the unlink. The file then lives on A alone, and
    each of them must still act on it: the flush's bytes used to be dropped (reads gave
    the old ones), fchmod failed with ENOENT, and a truncated orphan read its old bytes
    again once extended."""
    a, b = await make_fs(), await make_fs()
    old = os.urandom(100 * 1024)
    ino = await write_file(a, ROOT_INO, b"f", old)
    fh, _ = await a.open(ino, os.O_RDWR)
    await a.write(fh, 0, b"new bytes")
    await b.unlink(ROOT_INO, b"f")
    await a.flush(fh)  # planned on A's old view: its log position holds the unlink
    want = bytearray(b"new bytes" + old[9:])
    assert bytes(await a.read(fh, 0, len(want))) == want
    assert (await a.setattr(ino, ROOT, mode=0o600)).mode & 0o7777 == 0o600
    await a.setattr(ino, ROOT, size=10)
    await a.write(fh, 50_000, b"!")
    want = want[:10] + bytes(50_000 - 10) + b"!"
    assert bytes(await a.read(fh, 0, 60_000)) == want
    attr = await a.getattr(ino)
    assert (attr.size, attr.nlink, attr.mode & 0o7777) == (50_001, 0, 0o600)
    await a.release(fh)
    with pytest.raises(FsError):
        await a.getattr(ino)


async def test_xattrs(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"f", b"")
    await fs.setxattr(ino, b"user.a", b"1", ROOT, XATTR_CREATE)
    with pytest.raises(FsError) as e:
        await fs.setxattr(ino, b"user.a", b"2", ROOT, XATTR_CREATE)
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        await fs.setxattr(ino, b"user.b", b"2", ROOT, XATTR_REPLACE)
    assert errno_of(e) == errno.ENODATA
    await fs.setxattr(ino, b"user.a", b"3", ROOT, XATTR_REPLACE)
    assert await fs.getxattr(ino, b"user.a") == b"3"
    assert await fs.listxattr(ino, ROOT) == [b"user.a"]
    await fs.removexattr(ino, b"user.a", ROOT)
    with pytest.raises(FsError) as e:
        await fs.getxattr(ino, b"user.a")
    assert errno_of(e) == errno.ENODATA


async def test_system_xattrs_other_than_acls_are_refused(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"f", b"")
    owner, other = Ctx(1000, 1000), Ctx(1001, 1001)
    await fs.setattr(ino, ROOT, uid=1000, gid=1000)
    for ctx in (ROOT, owner, other):
        with pytest.raises(FsError) as e:
            await fs.setxattr(ino, b"system.evil", b"x" * 60_000, ctx)
        assert errno_of(e) == errno.EOPNOTSUPP
        with pytest.raises(FsError) as e:
            await fs.removexattr(ino, b"system.evil", ctx)
        assert errno_of(e) == errno.EOPNOTSUPP

    # One stored before the rule (committed as an older version did): only its owner
    # (or root) may remove it.
    def plant(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        return [SetXattr(ino, b"system.evil", b"junk", pc.now_ns)], None

    await fs.meta.submit(plant)
    with pytest.raises(FsError) as e:
        await fs.removexattr(ino, b"system.evil", other)
    assert errno_of(e) == errno.EPERM
    await fs.removexattr(ino, b"system.evil", owner)
    assert await fs.listxattr(ino, ROOT) == []


async def test_trusted_xattrs_are_listed_to_root_only(fs: Filesystem) -> None:
    ino = await write_file(fs, ROOT_INO, b"f", b"")
    await fs.setxattr(ino, b"trusted.t", b"1", ROOT)
    await fs.setxattr(ino, b"user.u", b"2", ROOT)
    assert await fs.listxattr(ino, ROOT) == [b"trusted.t", b"user.u"]
    assert await fs.listxattr(ino, Ctx(1000, 1000)) == [b"user.u"]


async def test_default_acl_is_inherited(fs: Filesystem) -> None:
    no_id = 0xFFFFFFFF
    # setfacl -d -m g:3000:rwx on a 0755 directory
    default = acl.encode(
        [
            [acl.USER_OBJ, 7, no_id],
            [acl.GROUP_OBJ, 5, no_id],
            [acl.GROUP, 7, 3000],
            [acl.MASK, 7, no_id],
            [acl.OTHER, 5, no_id],
        ]
    )
    d = await fs.mkdir(ROOT_INO, b"shared", 0o755, ROOT)
    await fs.setxattr(d.ino, ACL_DEFAULT, default, ROOT)
    user = Ctx(1000, 1000)

    f = await fs.mknod(d.ino, b"f", stat.S_IFREG | 0o666, user)
    assert f.mode == stat.S_IFREG | 0o664  # group bits: the mask, limited by the mode
    assert acl.entries(await fs.getxattr(f.ino, ACL_ACCESS)) == [
        [acl.USER_OBJ, 6, no_id],
        [acl.GROUP_OBJ, 5, no_id],
        [acl.GROUP, 7, 3000],
        [acl.MASK, 6, no_id],
        [acl.OTHER, 4, no_id],
    ]
    assert await fs.listxattr(f.ino, user) == [ACL_ACCESS]

    private = await fs.mknod(d.ino, b"p", stat.S_IFREG | 0o600, user)
    assert private.mode == stat.S_IFREG | 0o600
    assert acl.parse_acl(await fs.getxattr(private.ino, ACL_ACCESS)) == (0o600, False)

    sub = await fs.mkdir(d.ino, b"sub", 0o777, user)
    assert sub.mode == stat.S_IFDIR | 0o775
    assert await fs.getxattr(sub.ino, ACL_DEFAULT) == default
    inner = await fs.mknod(sub.ino, b"inner", stat.S_IFREG | 0o644, user)
    assert acl.parse_acl(await fs.getxattr(inner.ino, ACL_ACCESS)) == (0o644, False)

    link = await fs.symlink(d.ino, b"l", b"f", user)
    assert link.mode == stat.S_IFLNK | 0o777
    assert await fs.listxattr(link.ino, user) == []

    # A default ACL of only the base entries: the mode says it all, no ACL is stored.
    minimal = acl.encode(
        [[acl.USER_OBJ, 7, no_id], [acl.GROUP_OBJ, 5, no_id], [acl.OTHER, 0, no_id]]
    )
    await fs.setxattr(sub.ino, ACL_DEFAULT, minimal, ROOT)
    g = await fs.mknod(sub.ino, b"g", stat.S_IFREG | 0o666, user)
    assert g.mode == stat.S_IFREG | 0o640
    assert await fs.listxattr(g.ino, user) == []


async def test_umask_applies_only_without_default_acl(fs: Filesystem) -> None:
    """With FUSE_DONT_MASK the kernel passes the umask beside the mode: efsish applies it
    when the directory has no default ACL and ignores it when it has one (as ext4);
    symlinks stay 0777. Without it (umask None) the mode is taken as it comes."""
    user = Ctx(1000, 1000, umask=0o077)
    assert (await fs.mknod(ROOT_INO, b"f", stat.S_IFREG | 0o666, user)).mode == (
        stat.S_IFREG | 0o600
    )
    assert (await fs.mknod(ROOT_INO, b"p", stat.S_IFIFO | 0o666, user)).mode == (
        stat.S_IFIFO | 0o600
    )
    assert (await fs.mkdir(ROOT_INO, b"d", 0o1777, user)).mode == stat.S_IFDIR | 0o1700
    _, attr = await fs.create(ROOT_INO, b"c", 0o644, os.O_WRONLY, user)
    assert attr.mode == stat.S_IFREG | 0o600
    assert (await fs.symlink(ROOT_INO, b"l", b"f", user)).mode == stat.S_IFLNK | 0o777
    masked = Ctx(1000, 1000)
    assert (await fs.mknod(ROOT_INO, b"g", stat.S_IFREG | 0o666, masked)).mode == (
        stat.S_IFREG | 0o666
    )

    no_id = 0xFFFFFFFF
    d = await fs.mkdir(ROOT_INO, b"team", 0o775, ROOT)
    default = acl.encode(
        [[acl.USER_OBJ, 7, no_id], [acl.GROUP_OBJ, 7, no_id], [acl.OTHER, 5, no_id]]
    )
    await fs.setxattr(d.ino, ACL_DEFAULT, default, ROOT)
    assert (await fs.mknod(d.ino, b"f", stat.S_IFREG | 0o666, user)).mode == (stat.S_IFREG | 0o664)
    assert (await fs.mkdir(d.ino, b"d", 0o777, user)).mode == stat.S_IFDIR | 0o775


async def test_readdir_is_stable_and_complete(fs: Filesystem) -> None:
    for i in range(300):
        await fs.mknod(ROOT_INO, b"f%03d" % i, stat.S_IFREG | 0o644, ROOT)
    seen: list[bytes] = []
    after = 0
    while True:
        page = await fs.readdir(ROOT_INO, after, 50)
        if not page:
            break
        seen += [name for _, name, _ in page]
        after = page[-1][0]
        # Churn while listing: remove a later entry, add a new one.
        if len(seen) < 250:
            await fs.unlink(ROOT_INO, b"f%03d" % (299 - len(seen) // 50))
            await fs.mknod(ROOT_INO, b"new%03d" % len(seen), stat.S_IFREG | 0o644, ROOT)
    stable = {b"f%03d" % i for i in range(295)}
    assert stable <= set(seen)
    assert len(seen) == len(set(seen))


async def test_many_small_dirty_files_do_not_deadlock(make_fs) -> None:
    import trio

    fs = await make_fs(max_dirty_bytes=256 * 1024)
    handles = []
    for i in range(20):
        fh, attr = await fs.create(ROOT_INO, b"f%d" % i, 0o644, os.O_WRONLY, ROOT)
        handles.append((fh, attr.ino))
    with trio.fail_after(30):
        for i, (fh, _) in enumerate(handles):
            await fs.write(fh, 0, bytes([i]) * 60_000)  # < 2 blocks each: never cut alone
    for fh, _ in handles:
        await fs.release(fh)
    for i, (_, ino) in enumerate(handles):
        assert await read_file(fs, ino) == bytes([i]) * 60_000


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False], ids=["plain"])
async def test_readdir_of_100000_entries(fs: Filesystem) -> None:
    """Plain only: it measures listings that scale (about 45 s on 2 cores); encryption
    changes nothing in them, and test_readdir_is_stable_and_complete lists through an
    encrypted log."""
    import trio

    d = await fs.mkdir(ROOT_INO, b"big", 0o755, ROOT)
    limiter = trio.CapacityLimiter(200)

    async def create(i: int) -> None:
        async with limiter:
            await fs.mknod(d.ino, b"entry-%06d" % i, stat.S_IFREG | 0o644, ROOT)

    async with trio.open_nursery() as n:
        for i in range(100_000):
            n.start_soon(create, i)
    names: list[bytes] = []
    after = 0
    while True:
        page = await fs.readdir(d.ino, after, 1000)
        if not page:
            break
        names += [name for _, name, _ in page]
        after = page[-1][0]
    assert len(names) == 100_000 and len(set(names)) == 100_000
    assert (await fs.lookup(d.ino, b"entry-099999")).is_reg
