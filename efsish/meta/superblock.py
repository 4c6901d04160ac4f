"""The superblock: what a filesystem is (uuid, block size, throughput settings).

Written once by `efsish format` with a conditional create, read by every mount. Must not
be rewritten except through the `config` key it points to (throughput changes).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from efsish import codec
from efsish.errors import CorruptObject, EfsishError, NotFound, PreconditionFailed
from efsish.store import ObjectStore

SUPERBLOCK_KEY = "superblock"
# 1: data blocks checksummed with CRC-32 ("r"). 2: with CRC-32C ("k"), recorded in
# extra["block_checksum"], so that an efsish that knows only format 1 refuses to mount
# (it could not verify the new checksums) instead of reporting every block as corrupt.
FORMAT_VERSION = 2
MIN_BLOCK = 64 * 1024
MAX_BLOCK = 64 * 1024 * 1024


class NotFormatted(EfsishError):
    """The store holds no efsish filesystem."""


class AlreadyFormatted(EfsishError):
    """The store already holds an efsish filesystem."""


@dataclass
class Superblock:
    fs_uuid: str
    block_size: int
    created: int
    format_version: int = FORMAT_VERSION
    throughput_mode: str = "bursting"
    provisioned_mibps: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def block_checksum(self) -> str:
        """The checksum new data blocks get (codec.block_hash): "crc32" before format 2."""
        return str(self.extra.get("block_checksum", "crc32"))


async def format_fs(
    store: ObjectStore,
    *,
    block_size: int = 4 * 1024 * 1024,
    throughput_mode: str = "bursting",
    provisioned_mibps: float = 0.0,
) -> Superblock:
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise EfsishError(
            f"block size {block_size} must be a power of two between 64 KiB and 64 MiB"
        )
    sb = Superblock(
        fs_uuid=str(uuid.uuid4()),
        block_size=block_size,
        created=time.time_ns(),
        throughput_mode=throughput_mode,
        provisioned_mibps=provisioned_mibps,
        extra={"block_checksum": "crc32c"},
    )
    # A prefix that already has log entries or data but no superblock is foreign or damaged.
    async for info in store.list(""):
        if info.key != SUPERBLOCK_KEY and not info.key.startswith(".efsish-probe/"):
            raise AlreadyFormatted(
                f"{store.url} is not empty (found {info.key!r}); choose an empty bucket/prefix"
            )
        break
    try:
        await store.put_if_absent(SUPERBLOCK_KEY, codec.encode_json(b"S", asdict(sb)))
    except PreconditionFailed:
        raise AlreadyFormatted(f"{store.url} already holds an efsish filesystem") from None
    return sb


async def load_superblock(store: ObjectStore) -> Superblock:
    try:
        blob = await store.get(SUPERBLOCK_KEY)
    except NotFound:
        raise NotFormatted(
            f"{store.url} holds no efsish filesystem: run `efsish format {store.url}` first"
        ) from None
    try:
        d = codec.decode_json(b"S", blob, f"{store.url}/superblock")
        if not isinstance(d, dict):
            raise CorruptObject("not a JSON object")
        version = d.setdefault("format_version", 1)  # format 1 always wrote it; be lenient
        if not isinstance(version, int) or isinstance(version, bool):
            raise CorruptObject(f"format_version is {version!r}")
        if version > FORMAT_VERSION:
            raise EfsishError(
                f"{store.url} was formatted by a newer efsish (format {version}); upgrade "
                "efsish on this machine"
            )
        if not isinstance(d.get("extra", {}), dict):
            raise CorruptObject("its 'extra' field is not an object")
        sb = Superblock(**d)
    except (TypeError, CorruptObject) as e:
        raise NotFormatted(f"{store.url}/superblock is not an efsish superblock: {e}") from None
    if sb.block_checksum not in codec.BLOCK_CHECKSUMS:
        raise EfsishError(
            f"{store.url} records block checksum {sb.block_checksum!r}, which this efsish "
            "does not know; upgrade efsish on this machine"
        )
    return sb
