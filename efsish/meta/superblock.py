"""The superblock: what a filesystem is (uuid, block size, throughput settings).

Written once by `efsish format` with a conditional create, read by every mount. Must not
be rewritten except through the `config` key it points to (throughput changes).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from efsish import codec
from efsish.errors import (
    CorruptObject,
    EfsishError,
    NotFound,
    PermanentStoreError,
    PreconditionFailed,
)
from efsish.meta.keys import log_key
from efsish.meta.ops import SYNC, Fmt, LogEntry
from efsish.store import ObjectStore
from efsish.store.crypt import check_keys

log = logging.getLogger(__name__)

SUPERBLOCK_KEY = "superblock"
PROBE_PREFIX = ".efsish-probe/"  # written and deleted by ObjectStore.check()
COUNT_LIMIT = 1000  # objects counted for a message about a prefix that holds no filesystem
# 1: data blocks checksummed with CRC-32 ("r"). 2: with CRC-32C ("k"), recorded in
# extra["block_checksum"], so that an efsish that knows only format 1 refuses to mount
# (it could not verify the new checksums) instead of reporting every block as corrupt.
# 3: the lease protocol (docs/design/LEASES.md), the default of `efsish format`
# (`--no-leases` makes format 2) and what `efsish upgrade` turns a format-2 filesystem
# into: extra["lease_depth"] and extra["lease_time"], and the log holds a fmt(3) entry
# (log/1 when formatted so). An efsish that knows only format 2 refuses it ("formatted by
# a newer efsish").
# 4: encrypted at rest (store/crypt.py), written by `efsish format --encrypt`:
# extra["encryption"] says how, extra["leases"] whether format 3's lease protocol is on.
# An efsish that knows only format 3 refuses it instead of writing plaintext into it.
FORMAT_VERSION = 2
LEASE_FORMAT_VERSION = 3
ENCRYPTED_FORMAT_VERSION = 4
NEWEST_FORMAT = ENCRYPTED_FORMAT_VERSION
DEFAULT_LEASE_TIME = 15.0  # seconds (LEASES.md §7: L)
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

    @property
    def leases(self) -> bool:
        """The filesystem uses the lease protocol (format 3, or 4 with extra["leases"])."""
        return self.format_version == LEASE_FORMAT_VERSION or bool(self.extra.get("leases"))

    @property
    def encryption(self) -> dict[str, Any] | None:
        """How the filesystem is encrypted (store/crypt.py), or None."""
        enc = self.extra.get("encryption")
        return enc if isinstance(enc, dict) else None

    @property
    def lease_depth(self) -> int:
        """The depth of the lease domains' roots (LEASES.md §3; the root is 0)."""
        return int(self.extra.get("lease_depth", 1))

    @property
    def lease_time(self) -> float:
        """L, seconds: how long a holder answers locally after its last proof that no
        recall had landed (LEASES.md §7)."""
        return float(self.extra.get("lease_time", DEFAULT_LEASE_TIME))


async def check_formattable(store: ObjectStore) -> None:
    """Raise AlreadyFormatted unless `store` may get a new filesystem: its prefix must be
    empty and lie neither inside nor above another filesystem. Reads only."""
    # Filesystems must not nest: each one's gc would take the other's objects for its own
    # garbage. One HEAD per enclosing prefix finds a filesystem above this prefix; one
    # below it would make the prefix non-empty, which the listing finds.
    outer = await enclosing_filesystem(store)
    if outer is not None:
        raise AlreadyFormatted(
            f"{store.url} is inside the efsish filesystem {outer}: filesystems must not "
            "nest; choose a prefix outside it"
        )
    # A prefix that already has log entries or data but no superblock is foreign or damaged.
    async for info in store.list(""):
        if info.key == SUPERBLOCK_KEY or info.key.startswith(PROBE_PREFIX):
            continue
        try:
            await store.head(SUPERBLOCK_KEY)
        except NotFound:
            pass
        else:
            raise AlreadyFormatted(f"{store.url} already holds an efsish filesystem")
        inner = await filesystem_below(store, info.key)
        if inner is not None:
            raise AlreadyFormatted(
                f"{store.url} encloses the efsish filesystem {inner}: filesystems must not "
                "nest; choose a prefix outside it"
            )
        raise AlreadyFormatted(
            f"{store.url} is not empty (found {info.key!r}); choose an empty bucket/prefix"
        )


async def format_fs(
    store: ObjectStore,
    *,
    block_size: int = 4 * 1024 * 1024,
    throughput_mode: str = "bursting",
    provisioned_mibps: float = 0.0,
    leases: bool = True,
    lease_depth: int = 1,
    lease_time: float = DEFAULT_LEASE_TIME,
    encryption: dict[str, Any] | None = None,
) -> Superblock:
    """Create a filesystem. With `leases` (the default), a format-3 one (LEASES.md
    §14): the superblock records the lease depth and time, and log/1 is the fmt(3) entry,
    so that every entry after it carries a lease header; without, a format-2 one. With
    `encryption` (crypt.superblock_info of the keys `store` encrypts with), a format-4
    one, with or without leases."""
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
    if leases:
        if lease_depth < 1 or not lease_time > 0 or lease_time == float("inf"):
            raise EfsishError("the lease depth must be at least 1 and the lease time positive")
        sb.format_version = LEASE_FORMAT_VERSION
        sb.extra.update(lease_depth=lease_depth, lease_time=lease_time)
    if encryption is not None:
        sb.format_version = ENCRYPTED_FORMAT_VERSION
        sb.extra.update(encryption=encryption, leases=leases)
    await check_keys(store, encryption)
    await check_formattable(store)
    try:
        await store.put_if_absent(SUPERBLOCK_KEY, codec.encode_json(b"S", asdict(sb)))
    except PreconditionFailed:
        raise AlreadyFormatted(f"{store.url} already holds an efsish filesystem") from None
    if leases:
        await store.put_if_absent(log_key(1), _fmt_entry(sb))
    return sb


def _fmt_entry(sb: Superblock) -> bytes:
    """log/1 of a format-3 filesystem: fmt(3), a sync entry of the formatter."""
    entry = LogEntry(uuid.uuid4().hex, "format", sb.created, [Fmt(LEASE_FORMAT_VERSION)])
    entry.inc, entry.kind = 0, SYNC
    return codec.encode_json(b"L", entry.wire())


async def enclosing_filesystem(store: ObjectStore) -> str | None:
    """The URL of an efsish filesystem whose prefix encloses `store`'s, or None. A prefix
    this store's credentials may not read counts as holding none."""
    for outer in store.enclosing():
        try:
            await outer.head(SUPERBLOCK_KEY)
        except NotFound:
            continue
        except PermanentStoreError as e:  # e.g. a policy that grants only this prefix
            log.debug("cannot look for a filesystem at %s: %s", outer.url, e)
            continue
        return outer.url
    return None


async def filesystem_below(store: ObjectStore, key: str) -> str | None:
    """The URL of an efsish filesystem under `store` that `key` belongs to, or None: one
    HEAD of the superblock at each prefix of `key`."""
    parts = key.split("/")[:-1]
    for n in range(1, len(parts) + 1):
        prefix = "/".join(parts[:n])
        try:
            await store.head(f"{prefix}/{SUPERBLOCK_KEY}")
        except NotFound:
            continue
        return f"{store.url.rstrip('/')}/{prefix}"
    return None


async def _not_formatted(store: ObjectStore) -> NotFormatted:
    """Why `store` holds no filesystem, and what to do: format it if it is empty; else
    say what it holds (another filesystem above or below it, or foreign objects)."""
    outer = await enclosing_filesystem(store)
    if outer is not None:
        return NotFormatted(
            f"{store.url} holds no efsish filesystem: it is a prefix inside the efsish "
            f"filesystem {outer}; use that URL"
        )
    count = 0
    first = ""
    async for info in store.list(""):
        if info.key.startswith(PROBE_PREFIX):
            continue
        first = first or info.key
        count += 1
        if count >= COUNT_LIMIT:
            break
    if not count:
        return NotFormatted(
            f"{store.url} holds no efsish filesystem: run `efsish format {store.url}` first"
        )
    inner = await filesystem_below(store, first)
    if inner is not None:
        return NotFormatted(
            f"{store.url} holds no efsish filesystem but encloses the efsish filesystem "
            f"{inner}; use that URL"
        )
    many = f"{count}+" if count >= COUNT_LIMIT else str(count)
    return NotFormatted(
        f"{store.url} holds {many} object(s) (e.g. {first!r}) but no efsish filesystem: "
        "check the URL, or for a new filesystem choose an empty prefix (or remove those "
        "objects) and run `efsish format`"
    )


async def load_superblock(store: ObjectStore) -> Superblock:
    try:
        blob = await store.get(SUPERBLOCK_KEY)
    except NotFound:
        raise await _not_formatted(store) from None
    try:
        d = codec.decode_json(b"S", blob, f"{store.url}/superblock")
        if not isinstance(d, dict):
            raise CorruptObject("not a JSON object")
        version = d.setdefault("format_version", 1)  # format 1 always wrote it; be lenient
        if not isinstance(version, int) or isinstance(version, bool):
            raise CorruptObject(f"format_version is {version!r}")
        if version > NEWEST_FORMAT:
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
    await check_keys(store, sb.encryption)
    return sb
