"""`efsish upgrade`: turn a format-2 filesystem into a lease one (format 3) in place
(docs/design/LEASES.md §14).

The steps, each safe to repeat after a crash (`efsish upgrade` again resumes):

1. every live mount's heartbeat must come from an efsish that knows format 3
   (`newest_format`), unless forced;
2. a claim object (`upgrade-3`, a conditional create: one upgrader wins) records the new
   superblock; then the superblock is rewritten from it, so that an efsish that knows
   only format 2 refuses to mount from now on;
3. after two heartbeat periods the heartbeats are checked again (a mount of an older
   efsish that started before the superblock changed); if one is there, the old
   superblock is put back and the upgrade refused;
4. `fmt(3)` is committed at the log head by a conditional PUT. From that entry on every
   entry without a lease header is fenced, so a format-2 mount still running makes no
   more changes (its commits are refused, efsish.meta.planning) until it is remounted.
   A second `fmt(3)` (two upgraders resuming at once) is fenced and changes nothing.

It must not change anything but the superblock, the claim and one log entry.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import asdict, replace
from typing import TextIO

import trio

from efsish import codec
from efsish.errors import EfsishError, NotFound, PreconditionFailed
from efsish.meta import heartbeat
from efsish.meta.keys import LOG_PREFIX, log_key, parse_seq
from efsish.meta.ops import SYNC, Fmt, LogEntry
from efsish.meta.superblock import (
    DEFAULT_LEASE_TIME,
    LEASE_FORMAT_VERSION,
    SUPERBLOCK_KEY,
    Superblock,
    load_superblock,
)
from efsish.store import ObjectStore

log = logging.getLogger(__name__)

CLAIM_KEY = "upgrade-3"
# Two heartbeat periods of a mount (efsish.filesystem.Options.heartbeat_interval).
SETTLE = 4.0


class UpgradeRefused(EfsishError):
    """A live mount runs an efsish that does not know format 3."""


def _old_mounts(hbs: list[heartbeat.Heartbeat]) -> list[heartbeat.Heartbeat]:
    return [h for h in hbs if h.live() and h.newest_format < LEASE_FORMAT_VERSION]


async def _refuse_old_mounts(store: ObjectStore, force: bool) -> None:
    old = _old_mounts(await heartbeat.read_all(store))
    if old and not force:
        who = ", ".join(f"{h.host}:{h.mountpoint} (efsish {h.version})" for h in old)
        raise UpgradeRefused(
            f"{store.url}: {len(old)} live mount(s) run an efsish that does not know format "
            f"3 ({who}): upgrade efsish there and remount, or unmount them, then run "
            "`efsish upgrade` again (--force upgrades anyway: they stop writing)"
        )


async def _log_end(store: ObjectStore) -> int:
    last = 0
    async for info in store.list(LOG_PREFIX):
        s = parse_seq(info.key, LOG_PREFIX)
        if s is not None:
            last = max(last, s)
    return last


def fmt_entry(client: str) -> bytes:
    """A fmt(3) entry: a sync lease-era entry of `client` at incarnation 0."""
    entry = LogEntry(uuid.uuid4().hex, client, time.time_ns(), [Fmt(LEASE_FORMAT_VERSION)])
    entry.inc, entry.kind = 0, SYNC
    return codec.encode_json(b"L", entry.wire())


async def upgrade_fs(
    store: ObjectStore,
    *,
    force: bool = False,
    lease_depth: int = 1,
    lease_time: float = DEFAULT_LEASE_TIME,
    settle: float = SETTLE,
    out: TextIO | None = None,
) -> Superblock:
    """Upgrade `store`'s filesystem to format 3 (see the module docstring); return the
    new superblock. A filesystem already at format 3 is left as it is."""
    stream = out or sys.stdout
    sb = await load_superblock(store)
    try:
        claim: bytes | None = await store.get(CLAIM_KEY)
    except NotFound:
        claim = None
    if sb.leases and claim is None:
        print(f"{store.url} is already at format {sb.format_version} (leases)", file=stream)
        return sb
    if lease_depth < 1 or not 0 < lease_time < float("inf"):
        raise EfsishError("the lease depth must be at least 1 and the lease time positive")
    await _refuse_old_mounts(store, force)
    # An encrypted filesystem (format 4) keeps its format and turns the lease flag on.
    lease_extra = {"lease_depth": lease_depth, "lease_time": lease_time}
    if sb.encryption is not None:
        lease_extra["leases"] = True
    new = replace(
        sb,
        format_version=max(sb.format_version, LEASE_FORMAT_VERSION),
        extra={**sb.extra, **lease_extra},
    )
    orig = sb
    if claim is None:
        doc = {"old": asdict(sb), "new": asdict(new)}
        try:
            await store.put_if_absent(CLAIM_KEY, codec.encode_json(b"S", doc))
            claim_ours = True
        except PreconditionFailed:
            claim_ours = False
    else:
        claim_ours = False
    if not claim_ours:
        # Another upgrade claimed it first (or stopped half way): finish that one.
        d = codec.decode_json(b"S", await store.get(CLAIM_KEY), f"{store.url}/{CLAIM_KEY}")
        orig, new = Superblock(**d["old"]), Superblock(**d["new"])
        print(f"resuming the upgrade of {store.url} recorded in {CLAIM_KEY}", file=stream)
    await store.put(SUPERBLOCK_KEY, codec.encode_json(b"S", asdict(new)))
    await trio.sleep(settle)
    try:
        await _refuse_old_mounts(store, force)
    except UpgradeRefused:
        # As it was (no fmt is in the log yet): those mounts may go on.
        await store.put(SUPERBLOCK_KEY, codec.encode_json(b"S", asdict(orig)))
        await store.delete(CLAIM_KEY)
        raise
    seq = await _log_end(store) + 1
    blob = fmt_entry(f"upgrade-{uuid.uuid4().hex[:8]}")
    while True:
        try:
            await store.put_if_absent(log_key(seq), blob)
            break
        except PreconditionFailed:
            seq += 1  # the head moved on: the next position
    await store.delete(CLAIM_KEY)
    print(
        f"upgraded {store.url} to format 3 (leases, depth {new.lease_depth}) at log entry "
        f"{seq}; mounts that ran format 2 make no more changes: remount them",
        file=stream,
    )
    return new
