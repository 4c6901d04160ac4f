"""Garbage collection, log trimming and status: the maintenance of a filesystem's bucket.

- gc deletes blocks the log has marked as garbage, but only once every live mount has
  applied the change (heartbeats in clients/ tell how far each mount is; a mount whose
  heartbeat is older than `expire` seconds counts as crashed), the change is older than
  `grace`, and no live mount holds the block (unlinked-but-open files). It then commits a
  `gc` op so every view forgets the deleted keys. Blocks that were uploaded but never
  referenced (a writer that crashed before committing) are swept after `orphan_age`,
  except those whose key names a client that holds a lease or has an `ldirty` mark (its
  journal may reference them: LEASES.md §9).
- trim deletes log entries up to the newest checkpoint once every live mount is past
  them and they are older than `grace`; it keeps the two newest checkpoints. It never
  passes the applied position a client with a journal (a lease or an `ldirty` mark) last
  published, however old its heartbeat, nor, without a heartbeat, the position of its
  `ldirty` mark: that client comes back to its cache and its journal (LEASES.md §9).
It must never delete anything a live mount may still read, nor any key that is not
exactly in one of this filesystem's key forms (blocks.is_block_key, keys.parse_seq): an
object of another filesystem nested in this prefix, or a user's, is never touched.
"""

from __future__ import annotations

import errno
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio
from tqdm import tqdm

from efsish import codec
from efsish.data.blocks import DATA_PREFIX, block_key_client, block_key_time_ns, is_block_key
from efsish.errors import CorruptObject, FsError, NotFound
from efsish.meta import accesspoints, heartbeat
from efsish.meta.keys import CKPT_PREFIX, LOG_PREFIX, ckpt_key, log_key, parse_seq
from efsish.meta.log import MetaLog
from efsish.meta.ops import BlocksDeleted, LogEntry, LRcv, Op
from efsish.meta.planning import PlanContext
from efsish.meta.superblock import load_superblock
from efsish.meta.view import View
from efsish.store import ObjectStore

log = logging.getLogger(__name__)


async def log_head(store: ObjectStore) -> tuple[int, int]:
    """(first, last) log positions present in the store; (0, 0) if none."""
    first = last = 0
    async for info in store.list(LOG_PREFIX):
        s = parse_seq(info.key, LOG_PREFIX)
        if s is not None:
            first = first or s
            last = s
    return first, last


async def recoveries(
    store: ObjectStore, first: int, last: int, limit: int = 2000
) -> list[tuple[int, LRcv]]:
    """The recovery directories (`lrcv`, LEASES.md §10) named by the newest `limit`
    log entries in [first, last]: where a fenced mount put the changes it had answered
    and the log refused."""
    out: list[tuple[int, LRcv]] = []
    for seq in range(max(first, last - limit + 1), last + 1):
        try:
            blob = await store.get(log_key(seq))
        except NotFound:
            continue
        entry = LogEntry.unwire(codec.decode_json(b"L", blob, log_key(seq)))
        out += [(seq, op) for op in entry.ops if isinstance(op, LRcv)]
    return out


async def checkpoints(store: ObjectStore) -> list[int]:
    seqs = [parse_seq(i.key, CKPT_PREFIX) async for i in store.list(CKPT_PREFIX)]
    return [s for s in seqs if s is not None]


def _dirty_clients(view: View) -> set[str]:
    """Clients that may have a journal referencing blocks the log does not: those that
    hold a lease or whose newest `ldirty` is not cleared (LEASES.md §9)."""
    rows = view.db.execute(
        "SELECT holder_client FROM leases WHERE holder_client IS NOT NULL "
        "UNION SELECT client FROM sessions WHERE dirty_seq IS NOT NULL"
    )
    return {str(r[0]) for r in rows}


def _journal_floors(view: View) -> dict[str, int]:
    """The clients that may have a journal (as `_dirty_clients`), each with the newest
    log position the log alone proves its view had applied: just below its `ldirty`
    mark (or, for a holder with none, its `sess`)."""
    rows = view.db.execute(
        "SELECT client, COALESCE(dirty_seq, started_seq) FROM sessions "
        "WHERE dirty_seq IS NOT NULL OR client IN "
        "(SELECT holder_client FROM leases WHERE holder_client IS NOT NULL)"
    )
    return {str(r[0]): max(0, int(r[1]) - 1) for r in rows}


@dataclass
class GcResult:
    deleted_blocks: int = 0
    deleted_bytes: int = 0
    swept_orphans: int = 0
    deferred: int = 0
    trimmed_entries: int = 0
    deleted_checkpoints: int = 0
    notes: list[str] = field(default_factory=list)


async def collect(
    store: ObjectStore,
    meta: MetaLog,
    *,
    dry_run: bool = False,
    grace: float = 3600.0,
    orphan_age: float = 24 * 3600.0,
    progress: bool = False,
    trim: bool = True,
) -> GcResult:
    """One gc + trim pass using `meta` (a MetaLog whose committer is running)."""
    if meta.read_only:
        raise FsError("read-only mount: no gc", errno.EROFS)
    res = GcResult()
    await meta.catch_up()
    everyone = await heartbeat.read_all(store, exclude=meta.client_id, strict=True)
    clients = [c for c in everyone if c.live()]
    min_seq = min([c.applied_seq for c in clients], default=meta.applied_seq)
    held = {k for c in clients for k in c.held}
    now = time.time_ns()
    garbage = await meta.read(View.garbage)
    referenced = await meta.read(View.referenced_keys)
    sizes = {i.key: i.size async for i in store.list(DATA_PREFIX) if is_block_key(i.key)}
    victims: list[str] = []
    for key, seq, t in garbage:
        if not is_block_key(key):
            res.notes.append(f"kept {key!r}: the log calls it garbage, but it is not a block key")
        elif seq > min_seq or now - t < grace * 1e9 or key in held or key in referenced:
            res.deferred += 1
        else:
            victims.append(key)
    known = {k for k, _, _ in garbage}
    dirty = await meta.read(_dirty_clients)
    orphans = [
        k
        for k in sizes
        if k not in referenced
        and k not in known
        and k not in held
        and block_key_client(k) not in dirty
        and (block_key_time_ns(k) or now) < now - orphan_age * 1e9
    ]
    bar = tqdm(
        total=len(victims) + len(orphans),
        desc="gc",
        unit="blk",
        disable=not progress or not sys.stderr.isatty(),
    )
    limiter = trio.CapacityLimiter(16)

    async def delete(key: str) -> None:
        async with limiter:
            if not dry_run:
                await store.delete(key)
        bar.update(1)

    async with trio.open_nursery() as n:
        for k in victims + orphans:
            n.start_soon(delete, k)
    bar.close()
    res.deleted_blocks = len(victims)
    res.deleted_bytes = sum(sizes.get(k, 0) for k in victims + orphans)
    res.swept_orphans = len(orphans)
    if victims and not dry_run:
        keys = list(victims)

        def plan(view: View, pc: PlanContext) -> tuple[list[Op], None]:
            return [BlocksDeleted(tuple(keys))], None

        await meta.submit(plan)
    if trim:
        floor = min(min_seq, meta.applied_seq)
        published = {c.client: c.applied_seq for c in everyone}
        for client, seq in (await meta.read(_journal_floors)).items():
            if client != meta.client_id:
                floor = min(floor, published.get(client, seq))
        await _trim(store, meta, res, min_seq=floor, grace=grace, dry_run=dry_run)
    return res


async def _trim(
    store: ObjectStore, meta: MetaLog, res: GcResult, *, min_seq: int, grace: float, dry_run: bool
) -> None:
    ckpts = await checkpoints(store)
    if not ckpts:
        res.notes.append("no checkpoint yet: the log is not trimmed")
        return
    newest = ckpts[-1]
    limit = min(newest, min_seq)
    now = time.time_ns()
    async for info in store.list(LOG_PREFIX):
        s = parse_seq(info.key, LOG_PREFIX)
        if s is None:
            continue
        if s > limit:
            break
        try:
            entry = codec.decode_json(b"L", await store.get(info.key), info.key)
            if now - int(entry.get("t", now)) < grace * 1e9:
                break
        except (NotFound, CorruptObject):
            pass
        if not dry_run:
            await store.delete(log_key(s))
        res.trimmed_entries += 1
    for s in ckpts[:-2]:
        if not dry_run:
            await store.delete(ckpt_key(s))
        res.deleted_checkpoints += 1


async def run_gc(
    store: ObjectStore, *, dry_run: bool, grace: float, progress: bool, out: TextIO | None = None
) -> int:
    stream = out or sys.stdout
    sb = await load_superblock(store)
    with tempfile.TemporaryDirectory(prefix="efsish-gc-") as tmp:
        meta = MetaLog(store, sb, Path(tmp) / "gc.db", client_id="gc")
        await meta.open()
        async with trio.open_nursery() as n:
            await n.start(meta.run)
            r = await collect(store, meta, dry_run=dry_run, grace=grace, progress=progress)
            n.cancel_scope.cancel()
        await meta.aclose()
    verb = "would delete" if dry_run else "deleted"
    print(
        f"gc: {verb} {r.deleted_blocks} garbage block(s) and {r.swept_orphans} "
        f"never-committed block(s), {r.deleted_bytes} bytes; {r.deferred} deferred "
        f"(still visible to a mount or younger than {grace:.0f}s); log: {verb} "
        f"{r.trimmed_entries} entries and {r.deleted_checkpoints} old checkpoint(s)",
        file=stream,
    )
    for note in r.notes:
        print(f"gc: {note}", file=stream)
    return 0


async def run_status(store: ObjectStore, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    sb = await load_superblock(store)
    first, last = await log_head(store)
    ckpts = await checkpoints(store)
    clients = await heartbeat.read_all(store)
    info: dict[str, Any] = {
        "filesystem": sb.fs_uuid,
        "format": f"{sb.format_version}" + (" (leases)" if sb.leases else ""),
        "block size": sb.block_size,
        "throughput mode": sb.throughput_mode,
        "log": f"entries {first}..{last}" if last else "empty",
        "newest checkpoint": ckpts[-1] if ckpts else "none",
    }
    for k, v in info.items():
        print(f"{k:>18}: {v}", file=stream)
    if sb.leases and last:
        print(
            f"{'leases':>18}: depth {sb.lease_depth}, lease time {sb.lease_time:g} s", file=stream
        )
        for seq, rcv in await recoveries(store, first, last):
            print(
                f"{'recovered':>18}: {rcv.path} (changes of mount {rcv.client}, "
                f"incarnation {rcv.inc}, refused by the log; log entry {seq})",
                file=stream,
            )
    live = [c for c in clients if c.live()]
    print(f"{'live mounts':>18}: {len(live)}", file=stream)
    if clients:
        print(
            f"  {'HOST':<20} {'MOUNTPOINT':<28} {'VERSION':<8} {'APPLIED':>8} "
            f"{'LAST SEEN':>10}  STATE",
            file=stream,
        )
        for c in sorted(clients, key=lambda c: (c.host, c.mountpoint)):
            state = "live" if c.live() else "expired"
            print(
                f"  {c.host:<20} {c.mountpoint:<28} {c.version:<8} {c.applied_seq:>8} "
                f"{c.age():>9.0f}s  {state}",
                file=stream,
            )
            if c.format:
                print(f"    {mount_leases(c)}", file=stream)
            if c.format >= 3:
                print(f"    {mount_nudges(c)}", file=stream)
    points = await accesspoints.list_all(store)
    print(f"{'access points':>18}: {len(points)}", file=stream)
    for ap in points:
        print(f"  {ap.describe()}", file=stream)
    return 0


def mount_leases(c: heartbeat.Heartbeat) -> str:
    """One line: the format a mount runs, the lease domains it holds and its changes
    not yet in the log (count, age of the oldest), as its last heartbeat says."""
    parts = [f"format {c.format}"]
    if c.format >= 3:
        held = ", ".join(c.domains) if c.domains else "none"
        parts.append(f"leases: {held}")
        if c.journal_rows:
            parts.append(
                f"uncommitted changes: {c.journal_rows}, oldest {c.journal_age():.1f} s ago"
            )
        else:
            parts.append("uncommitted changes: none")
    return "; ".join(parts)


def mount_nudges(c: heartbeat.Heartbeat) -> str:
    """One line: the UDP address a lease mount takes nudges on (LEASES.md §11), as its
    heartbeat advertises it, and how old that heartbeat is. Not probed: a nudge has no
    reply, so whether the address is reachable shows only as slower recalls."""
    if c.nudge is None:
        return "nudges: none (nudge=off, or no socket: recalls of its domains wait for its poll)"
    return f"nudges: {c.nudge}, advertised {c.age():.0f} s ago (not probed)"
