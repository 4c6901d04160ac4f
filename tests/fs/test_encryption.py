"""An encrypted filesystem in-process (store/crypt.py under the whole stack): it works
as a plain one, the bucket holds none of its names or bytes, and a damaged object is
EIO, never data."""

from __future__ import annotations

import base64
import errno
import io
import os
import uuid
from pathlib import Path

import pytest

from efsish import codec
from efsish.errors import CorruptObject, EfsishError, FsError
from efsish.fsck import run_fsck
from efsish.meta.superblock import SUPERBLOCK_KEY, format_fs, load_superblock
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.crypt import CryptStore, Keyring, superblock_info
from efsish.store.memory import MemoryStore
from tests.fs.helpers import ROOT, fsck, mounted, read_file, read_sequentially, write_file

KEYS = Keyring((bytes(range(32)),), "a test key")
NAME = b"quarterly-secret-report.txt"
DIRNAME = b"private-project-zebra"
SMALL = b"the inline contents of a small secret file " * 8  # inline in the log entry
BIG = os.urandom(1024) + b"big-file-plaintext-marker" * 100_000  # ~2.4 MiB: 3 blocks
MIB = 1024 * 1024


async def workload(store: ObjectStore, cache: Path) -> tuple[int, int]:
    """Format, then write a directory, a small file, a big one and an xattr; return the
    inodes of the two files."""
    enc = superblock_info(KEYS) if isinstance(store, CryptStore) else None
    sb = await format_fs(store, block_size=MIB, encryption=enc)
    async with mounted(store, sb, cache, checkpoint_every=3) as fs:
        d = await fs.mkdir(ROOT_INO, DIRNAME, 0o755, ROOT)
        small = await write_file(fs, d.ino, NAME, SMALL)
        big = await write_file(fs, d.ino, b"big-" + NAME, BIG)
        await fs.setxattr(big, b"user.classification", b"top-secret-label", ROOT)
        await fs.fsyncdir()  # the journal (format 3, the default) into the log
        await fs.meta.write_checkpoint()
    return small, big


async def raw_objects(raw: ObjectStore) -> dict[str, bytes]:
    return {i.key: await raw.get(i.key) async for i in raw.list("")}


def readable(blob: bytes) -> bytes:
    """What anyone reading the bucket can see in an object: its bytes, and the payload
    of a metadata envelope (zstd hides names from a plain grep)."""
    try:
        return blob + codec.decode(blob[len(codec.MAGIC) : len(codec.MAGIC) + 1], blob)
    except (CorruptObject, KeyError, AssertionError):
        return blob


# Each in its own bytes and as the log spells inline data and xattr values (base64).
SECRETS = [NAME, DIRNAME, b"top-secret-label", SMALL[:30], b"big-file-plaintext"]


def forms(secret: bytes) -> list[bytes]:
    return [secret, base64.b64encode(secret).rstrip(b"=")]


async def test_the_bucket_holds_no_name_or_byte_of_an_encrypted_filesystem(
    tmp_path: Path,
) -> None:
    # The same workload on a plain filesystem shows where the secrets would be.
    plain = MemoryStore(f"enc-{uuid.uuid4().hex}")
    await workload(plain, tmp_path / "plain")
    seen = b"".join(readable(b) for b in (await raw_objects(plain)).values())
    for secret in SECRETS:
        assert any(f in seen for f in forms(secret)), secret

    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    store = CryptStore(raw, KEYS)
    small, big = await workload(store, tmp_path / "w")
    objects = await raw_objects(raw)
    assert any(k.startswith("checkpoints/") for k in objects)
    assert any(k.startswith("data/") for k in objects)
    for key, blob in objects.items():
        for secret in SECRETS:
            assert not any(f in readable(blob) for f in forms(secret)), (key, secret)
        if key != SUPERBLOCK_KEY:
            assert not blob.startswith(codec.MAGIC), key  # no readable envelope at all

    # A fresh mount (empty cache) reads everything back; a small read deep in the big
    # file takes the ranged path, chunk by chunk.
    sb = await load_superblock(store)
    async with mounted(store, sb, tmp_path / "r") as fs:
        assert await read_file(fs, small) == SMALL
        fh, _ = await fs.open(big, os.O_RDONLY)
        try:
            at = MIB + MIB // 2 + 17
            assert bytes(await fs.read(fh, at, 4096)) == BIG[at : at + 4096]
        finally:
            await fs.release(fh)
        assert fs.blocks.ranged_gets == 1
        assert await read_sequentially(fs, big, 256 * 1024) == BIG
    assert (await fsck(store))[0] == 0


async def test_a_flipped_byte_in_a_block_is_eio_never_data(tmp_path: Path) -> None:
    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    store = CryptStore(raw, KEYS)
    _, big = await workload(store, tmp_path / "w")
    blocks = sorted([i.key async for i in raw.list("data/")])
    blob = bytearray(await raw.get(blocks[0]))
    blob[len(blob) // 2] ^= 1
    await raw.put(blocks[0], bytes(blob))
    sb = await load_superblock(store)
    async with mounted(store, sb, tmp_path / "r") as fs:
        for ino in (big,):
            with pytest.raises(FsError) as e:
                await read_sequentially(fs, ino, 256 * 1024)
            assert e.value.errno == errno.EIO
    out = io.StringIO()
    assert await run_fsck(store, verify_data=True, progress=False, out=out) != 0
    assert "failed authentication" in out.getvalue() or "corrupt" in out.getvalue()


async def test_a_flipped_byte_in_a_log_entry_is_an_error_never_data(tmp_path: Path) -> None:
    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    store = CryptStore(raw, KEYS)
    # Format 2: every change is its own entry, so log/1 is the create.
    sb = await format_fs(store, block_size=MIB, leases=False, encryption=superblock_info(KEYS))
    async with mounted(store, sb, tmp_path / "a") as reader:
        async with mounted(store, sb, tmp_path / "w") as writer:
            await write_file(writer, ROOT_INO, NAME, SMALL)
        first = sorted([i.key async for i in raw.list("log/")])[0]  # the create
        blob = bytearray(await raw.get(first))
        blob[-3] ^= 1
        await raw.put(first, bytes(blob))
        # A live mount that reads the damaged entry stops applying the log (as with a
        # corrupt plain entry): the lookup fails, the file never appears.
        with pytest.raises(EfsishError):
            await reader.lookup(ROOT_INO, NAME)
    # A new mount refuses to start on it, as on a corrupt plain log.
    with pytest.raises(BaseExceptionGroup) as e:
        async with mounted(store, sb, tmp_path / "r"):
            pass
    assert e.group_contains(CorruptObject, match="failed authentication")
    assert (await fsck(store))[0] != 0


async def test_an_encrypted_filesystem_with_leases(tmp_path: Path) -> None:
    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    store = CryptStore(raw, KEYS)
    sb = await format_fs(store, block_size=MIB, leases=True, encryption=superblock_info(KEYS))
    assert sb.leases and (await load_superblock(store)).leases
    async with mounted(store, sb, tmp_path / "a") as fs:
        d = await fs.mkdir(ROOT_INO, DIRNAME, 0o755, ROOT)
        ino = await write_file(fs, d.ino, NAME, SMALL)
    async with mounted(store, sb, tmp_path / "b") as fs:
        assert await read_file(fs, ino) == SMALL
    for blob in (await raw_objects(raw)).values():
        assert NAME not in blob and DIRNAME not in blob


async def test_an_efsish_without_encryption_refuses_an_encrypted_filesystem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from efsish.meta import superblock

    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    sb = await format_fs(CryptStore(raw, KEYS), block_size=MIB, encryption=superblock_info(KEYS))
    assert sb.format_version == 4
    # A build that knows only format 3 would otherwise write plaintext into it.
    monkeypatch.setattr(superblock, "NEWEST_FORMAT", 3)
    with pytest.raises(EfsishError, match="formatted by a newer efsish \\(format 4\\); upgrade"):
        await load_superblock(raw)


async def test_upgrade_turns_leases_on_and_keeps_an_encrypted_filesystem_encrypted(
    tmp_path: Path,
) -> None:
    from efsish.upgrade import upgrade_fs

    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    store = CryptStore(raw, KEYS)
    sb = await format_fs(store, block_size=MIB, leases=False, encryption=superblock_info(KEYS))
    assert not sb.leases and sb.format_version == 4
    async with mounted(store, sb, tmp_path / "a") as fs:
        ino = await write_file(fs, ROOT_INO, NAME, SMALL)
    new = await upgrade_fs(store, settle=0, out=io.StringIO())
    assert new.leases and new.encryption == sb.encryption and new.format_version == 4
    again = await load_superblock(store)
    assert again.leases and again.encryption == sb.encryption
    async with mounted(store, again, tmp_path / "b") as fs:
        assert fs.leases is not None
        assert await read_file(fs, ino) == SMALL
        await write_file(fs, ROOT_INO, b"after", SMALL)
    for blob in (await raw_objects(raw)).values():
        assert NAME not in blob
    await fsck(store)


# ------------------------------------------------------------- a flipped byte, any object

KINDS = ["data", "log", "checkpoint", "heartbeat", "nudge", "access point", "config", "ledger"]
WHERE = {"header (key id)": 5, "body": None, "last byte": -1}  # None: the middle


async def with_every_kind(tmp_path: Path) -> tuple[MemoryStore, CryptStore, int, str]:
    """An encrypted lease filesystem with an object of each kind a mount writes but a
    heartbeat (log entries before and after a checkpoint, data blocks, secrets/nudge, the
    throughput config and ledger) and an access point; (raw, store, a 3-block file, the
    access point's id)."""
    from efsish.meta import accesspoints
    from efsish.metering import write_config

    raw = MemoryStore(f"enc-{uuid.uuid4().hex}")
    store = CryptStore(raw, KEYS)
    sb = await format_fs(store, block_size=MIB, encryption=superblock_info(KEYS))
    await write_config(store, sb, mode="elastic", provisioned_mibps=None)
    ap = accesspoints.make("/shared", 1001, 1001)
    await accesspoints.create(store, ap)
    async with mounted(store, sb, tmp_path / "w") as fs:
        big = await write_file(fs, ROOT_INO, b"big", BIG)
        await fs.fsyncdir()
        await fs.meta.write_checkpoint()
        await write_file(fs, ROOT_INO, NAME, SMALL)  # entries a new mount replays
        await fs.fsyncdir()
    return raw, store, big, ap.id


async def flip(raw: ObjectStore, key: str, where: int | None) -> None:
    blob = bytearray(await raw.get(key))
    blob[len(blob) // 2 if where is None else where] ^= 0x01
    await raw.put(key, bytes(blob))


@pytest.mark.parametrize("where", list(WHERE.values()), ids=list(WHERE))
@pytest.mark.parametrize("kind", KINDS)
async def test_a_flipped_byte_in_any_object_is_an_error_and_a_log_line_never_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, where: int | None
) -> None:
    """Whatever the object and wherever the byte: what needs it gets EIO (a block), the
    mount refuses to start (the log, a checkpoint, the throughput config, the access
    point), or does without it (gc refuses to run on a heartbeat it cannot read; a mount
    takes no nudges, or restarts the credit balance, as when the object is missing);
    never its bytes. The mount's log names the object and says it failed
    authentication."""
    from efsish.gc import run_gc
    from efsish.meta import accesspoints, heartbeat

    raw, store, big, ap_id = await with_every_kind(tmp_path)
    sb = await load_superblock(store)
    keys = sorted([i.key async for i in raw.list("")])

    def newest(prefix: str) -> str:
        return [k for k in keys if k.startswith(prefix)][-1]

    key = ""
    if kind == "data":
        key = newest("data/")
        await flip(raw, key, where)
        async with mounted(store, sb, tmp_path / "r") as fs:
            with pytest.raises(FsError) as e:
                await read_sequentially(fs, big, 256 * 1024)
            assert e.value.errno == errno.EIO
    elif kind in ("log", "checkpoint", "config"):
        key = {"log": newest("log/"), "checkpoint": newest("checkpoints/")}.get(
            kind, "throttle/config"
        )
        await flip(raw, key, where)
        with pytest.raises(BaseExceptionGroup) as eg:
            async with mounted(store, sb, tmp_path / "r"):
                pass
        assert eg.group_contains(CorruptObject, match=f"^{key} failed authentication")
    elif kind == "access point":
        key = accesspoints.key_of(ap_id)
        await flip(raw, key, where)
        with pytest.raises(CorruptObject, match=f"^{key} failed authentication"):
            await accesspoints.load(store, ap_id)  # what mount -o access_point= does first
    elif kind == "heartbeat":
        # A mount's heartbeat, left in the bucket as by a mount that was killed.
        async with mounted(store, sb, tmp_path / "a") as a:
            await a.write_heartbeat()
            hb = await heartbeat.read(store, a.meta.client_id)
        assert hb is not None
        await heartbeat.write(store, hb)
        key = heartbeat.key(hb.client)
        await flip(raw, key, where)
        with pytest.raises(BaseExceptionGroup) as eg:  # from gc's nursery
            await run_gc(store, dry_run=False, grace=0, progress=False, out=io.StringIO())
        assert eg.group_contains(CorruptObject, match=f"heartbeat {key} cannot be read")
        assert await heartbeat.read_all(store) == []  # what other mounts see of it
    elif kind in ("nudge", "ledger"):
        key = "secrets/nudge" if kind == "nudge" else "throttle/ledger"
        await flip(raw, key, where)
        async with mounted(store, sb, tmp_path / "r") as fs:
            assert fs.leases is not None
            assert (fs.leases.nudges.nudger is None) == (kind == "nudge")
            assert await read_file(fs, big) == BIG
    says = [r for r in caplog.records if r.name == "efsish.store.crypt" and r.levelname == "ERROR"]
    assert says, caplog.text
    assert all(r.getMessage().startswith(f"{key} failed authentication") for r in says), says
