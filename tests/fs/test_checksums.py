"""Which checksum data blocks get: CRC-32C on filesystems formatted since format 2, CRC-32
on format-1 filesystems (so that older efsish versions still mounting them can verify
every block); a superblock from a newer format is refused with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import google_crc32c
import pytest

from efsish import codec
from efsish.errors import EfsishError
from efsish.meta.superblock import (
    LEASE_FORMAT_VERSION,
    SUPERBLOCK_KEY,
    Superblock,
    format_fs,
    load_superblock,
)
from efsish.meta.view import ROOT_INO, View
from efsish.store import ObjectStore
from efsish.store.memory import MemoryStore
from tests.fs.helpers import BS, mounted, read_sequentially, write_file


async def block_hashes(store: ObjectStore, sb: Superblock, cache: Path, data: bytes) -> list[str]:
    """Write `data` to a new file and return the checksums recorded for its blocks; check
    that a fresh mount (empty cache) reads it back."""
    async with mounted(store, sb, cache / "w") as fs:
        ino = await write_file(fs, ROOT_INO, b"f", data)
        exts = await fs.meta.read(View.extents, ino, 0, len(data))
    async with mounted(store, sb, cache / "r") as fs:
        assert await read_sequentially(fs, ino) == data
    return [e.hash for e in exts if e.key is not None and e.hash is not None]


async def test_new_filesystems_checksum_blocks_with_crc32c(tmp_path: Path) -> None:
    store = MemoryStore(f"fs-{uuid.uuid4().hex}")
    sb = await format_fs(store, block_size=BS)
    loaded = await load_superblock(store)
    assert loaded.format_version == LEASE_FORMAT_VERSION == 3  # the default
    assert loaded.block_checksum == "crc32c"
    data = os.urandom(3 * BS + 5)
    hashes = await block_hashes(store, loaded, tmp_path, data)
    assert len(hashes) == 4
    assert hashes[0] == f"k{google_crc32c.value(data[:BS]):08x}"
    assert all(h.startswith("k") for h in hashes)
    assert sb.block_checksum == "crc32c"


async def test_format1_filesystems_keep_crc32(tmp_path: Path) -> None:
    store = MemoryStore(f"fs-{uuid.uuid4().hex}")
    old = asdict(Superblock(fs_uuid=str(uuid.uuid4()), block_size=BS, created=1))
    old["format_version"] = 1
    del old["extra"]  # as format 1 wrote it: no block_checksum
    await store.put_if_absent(SUPERBLOCK_KEY, codec.encode_json(b"S", old))
    sb = await load_superblock(store)
    assert sb.block_checksum == "crc32"
    data = os.urandom(2 * BS)
    hashes = await block_hashes(store, sb, tmp_path, data)
    assert hashes and all(h.startswith("r") for h in hashes)
    assert codec.block_matches(data[:BS], hashes[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 5, "new_field": 1}, "newer efsish \\(format 5\\); upgrade"),
        ({"extra": {"block_checksum": "blake3"}}, "block checksum 'blake3'.*upgrade"),
        ({"extra": None}, "not an efsish superblock: its 'extra' field"),
        ({"format_version": "2"}, "not an efsish superblock: format_version"),
    ],
)
async def test_superblocks_this_version_cannot_serve_are_refused(
    change: dict[str, object], message: str
) -> None:
    store = MemoryStore(f"fs-{uuid.uuid4().hex}")
    d = asdict(Superblock(fs_uuid=str(uuid.uuid4()), block_size=BS, created=1))
    d.update(change)
    await store.put_if_absent(SUPERBLOCK_KEY, codec.encode_json(b"S", d))
    with pytest.raises(EfsishError, match=message):
        await load_superblock(store)


async def test_a_lease_format_filesystem_is_refused_by_an_efsish_that_knows_format_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from efsish.meta import superblock

    store = MemoryStore(f"fmt3-{uuid.uuid4().hex}")
    sb = await format_fs(store, block_size=BS, leases=True, lease_time=5.0)
    loaded = await load_superblock(store)
    assert loaded.leases and (loaded.lease_depth, loaded.lease_time) == (1, 5.0)
    assert sb.format_version == 3
    # A build that knows only format 2 (the check as it was) says what to do.
    monkeypatch.setattr(superblock, "NEWEST_FORMAT", 2)
    with pytest.raises(EfsishError, match="formatted by a newer efsish \\(format 3\\); upgrade"):
        await load_superblock(store)
    # Format 3 is the default; format 2 is asked for.
    dflt = await format_fs(MemoryStore(f"fmt3-{uuid.uuid4().hex}"), block_size=BS)
    assert dflt.format_version == 3 and dflt.leases
    plain = await format_fs(MemoryStore(f"fmt2-{uuid.uuid4().hex}"), block_size=BS, leases=False)
    assert plain.format_version == 2 and not plain.leases


@pytest.mark.parametrize(("args", "version"), [((), 3), (("--leases",), 3), (("--no-leases",), 2)])
def test_efsish_format_makes_a_lease_filesystem_unless_told_not_to(
    tmp_path: Path, args: tuple[str, ...], version: int
) -> None:
    store = f"file://{tmp_path}/fs"
    res = subprocess.run(
        [sys.executable, "-m", "efsish", "format", store, "--block-size", "1M", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    blob = (tmp_path / "fs" / "objects" / "superblock.o").read_bytes()
    sb = codec.decode_json(b"S", blob, "the superblock")
    assert sb["format_version"] == version
    assert ("leases (depth 1)" in res.stdout) == (version == 3), res.stdout
