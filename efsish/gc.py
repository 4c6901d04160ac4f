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
- take_over_gone (run by `efsish gc` before the rest) ends that for a client gone for
  good: one whose newest heartbeat is older than `gone_after` (a day). It recalls the
  client's domains as gc, waits the takeover time of §7 on its own lease clock, takes
  them over and frees them (`ltko`, `lrel`), and clears the client's `ldirty` mark for
  it (`ldirty(client, inc, clean)`), so trimming passes its position and its blocks
  become ordinary orphans. If the client comes back, the takeover fences its journal,
  which goes to its recovery directory (LEASES.md §10).
It must never delete anything a live mount may still read, nor any key that is not
exactly in one of this filesystem's key forms (blocks.is_block_key, keys.parse_seq): an
object of another filesystem nested in this prefix, or a user's, is never touched.
"""

from __future__ import annotations

import errno
import logging
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio
from tqdm import tqdm

from efsish import codec
from efsish.data.blocks import DATA_PREFIX, block_key_client, block_key_time_ns, is_block_key
from efsish.errors import CorruptObject, FsError, NotFound, UsageError
from efsish.meta import accesspoints, heartbeat, nudge
from efsish.meta.keys import CKPT_PREFIX, LOG_PREFIX, ckpt_key, log_key, parse_seq
from efsish.meta.leases import boottime, domain_paths
from efsish.meta.log import MetaLog
from efsish.meta.ops import BlocksDeleted, LDirty, LogEntry, LRcv, LRec, LRel, LTko, Op
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


# A client whose newest heartbeat is older than this is gone for good (LEASES.md §9).
GONE_AFTER = 86400.0
TAKEOVER_POLL = 0.5  # seconds between catch-ups while waiting for a takeover


def parse_duration(text: str) -> float:
    """`--gone-after`: seconds, or a number with s, m, h or d (e.g. 1d, 12h)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    t = text.strip().lower()
    unit = units.get(t[-1:], 0.0)
    try:
        x = float(t[:-1] if unit else t) * (unit or 1.0)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < heartbeat.EXPIRE:
        raise UsageError(
            f"--gone-after {text!r}: give a duration of at least {heartbeat.EXPIRE:.0f} "
            "seconds (a running mount's heartbeat can be that old), e.g. 1d, 12h or 86400"
        )
    return x


@dataclass
class Gone:
    """A client that may hold a journal (a lease or an uncleared `ldirty` mark) and has
    not been heard of for longer than `gone_after`."""

    client: str
    inc: int  # its newest incarnation
    dirty_seq: int | None  # its `ldirty` mark (None: cleared)
    domains: dict[int, tuple[str, int]]  # domain -> holder (any incarnation of it)
    seen: str  # how long ago it was last heard of, and by what
    where: str = ""  # "host:mountpoint" from its heartbeat, if any


@dataclass
class Takeover:
    """What take_over_gone did (or, dry run, would do) about one gone client."""

    gone: Gone
    taken: list[int] = field(default_factory=list)  # domains taken over
    answered: list[int] = field(default_factory=list)  # recalls its holder answered
    cleared: bool = False  # its ldirty mark cleared
    lines: list[str] = field(default_factory=list)  # one line per thing done, for gc's output


def _journal_holders(view: View) -> list[tuple[str, int, int | None, dict[int, tuple[str, int]]]]:
    """(client, newest incarnation, ldirty position, {domain: holder}) of every client
    that holds a lease or has an uncleared `ldirty` mark."""
    out: dict[str, tuple[str, int, int | None, dict[int, tuple[str, int]]]] = {}
    for c, i, d in view.db.execute(
        "SELECT client, inc, dirty_seq FROM sessions WHERE dirty_seq IS NOT NULL"
    ):
        out[str(c)] = (str(c), int(i), None if d is None else int(d), {})
    for dom, c, i in view.db.execute(
        "SELECT domain, holder_client, holder_inc FROM leases WHERE holder_client IS NOT NULL"
    ):
        c = str(c)
        if c not in out:
            sess = view.session(c)
            out[c] = (c, int(i) if sess is None else sess[0], None if sess is None else sess[2], {})
        out[c][3][int(dom)] = (c, int(i))
    return list(out.values())


async def gone_clients(
    store: ObjectStore, meta: MetaLog, gone_after: float, now_ns: int | None = None
) -> list[Gone]:
    """The clients with a lease or an `ldirty` mark whose newest heartbeat is older than
    `gone_after` seconds (by the wall clock). One without a heartbeat is judged by the
    time of its newest log entry the view names (its `ldirty`, `sess` or grant), if the
    log still has it. `meta` must be caught up."""
    now = time.time_ns() if now_ns is None else now_ns
    beats = {
        hb.client: hb for hb in await heartbeat.read_all(store, exclude=meta.client_id, strict=True)
    }
    candidates = await meta.read(_journal_holders)

    def marks(view: View, client: str, doms: list[int]) -> int:
        sess = view.session(client)
        seqs = [view.lease(d)[1] for d in doms]
        if sess is not None:
            seqs += [sess[1], sess[2] or 0]
        return max(seqs, default=0)

    out: list[Gone] = []
    for client, inc, dirty, doms in candidates:
        if client == meta.client_id:
            continue
        hb = beats.get(client)
        ages: list[tuple[float, str]] = []
        if hb is not None:
            ages.append((hb.age(now), f"its newest heartbeat is {_ago(hb.age(now))} old"))
        if hb is None or ages[0][0] > gone_after:
            # Its newest entry the view names (a restart that died before its first
            # heartbeat is younger than the heartbeat it left before).
            last = await meta.read(marks, client, list(doms))
            try:
                blob = await store.get(log_key(last))
                t = int(codec.decode_json(b"L", blob, log_key(last))["t"])
                age = (now - t) / 1e9
                ages.append((age, f"its newest log entry ({last}) is {_ago(age)} old"))
            except (NotFound, CorruptObject, KeyError, TypeError, ValueError):
                pass
        if not ages:
            continue  # its age cannot be told: it stays (the trimming floor keeps it)
        age, seen = min(ages)
        if hb is None:
            seen = f"no heartbeat, {seen}"
        if age > gone_after:
            where = f"{hb.host}:{hb.mountpoint}" if hb is not None else ""
            out.append(Gone(client, inc, dirty, dict(doms), seen, where))
    return out


def _ago(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"


async def take_over_gone(
    store: ObjectStore,
    meta: MetaLog,
    *,
    gone_after: float = GONE_AFTER,
    dry_run: bool = False,
    clock: Callable[[], float] = boottime,
    wall: Callable[[], int] = time.time_ns,
    progress: bool = False,
    say: Callable[[str], None] = lambda line: None,
) -> list[Takeover]:
    """Take over the leases of clients gone for good, and clear their `ldirty` marks
    (LEASES.md §9), so that they stop holding back log trimming and the orphan sweep.

    For every domain such a client holds, one entry recalls it as gc (`lrec`, want r);
    gc then waits, catching up, until its lease clock `clock` shows 2 x lease_time since
    that entry landed (§7's takeover rule). A recall the holder answers means it is alive
    after all: that client is left alone. Then one entry takes over every recall still
    open and frees the domain (`ltko`, `lrel`), and clears the mark of every gone client
    that now holds nothing (`ldirty(client, inc, clean)`). Each entry is planned against
    the head: a client that started a new incarnation meanwhile keeps its mark. `wall`
    (ns) ages heartbeats and log entries; `clock` is gc's lease clock. `say`
    gets one line per announcement (the wait, each takeover, each cleared mark); with
    `dry_run` nothing is committed and the lines say what would be done."""
    sb = meta.sb
    if not sb.leases or meta.read_only or (meta.leases is None and meta.sync_header is None):
        return []
    await meta.catch_up()
    gone = await gone_clients(store, meta, gone_after, wall())
    if not gone:
        return []
    out = [Takeover(g) for g in gone]
    by_client = {t.gone.client: t for t in out}
    wanted = {d: h for t in out for d, h in t.gone.domains.items()}
    paths = dict(zip(wanted, await meta.read(domain_paths, list(wanted)), strict=True))
    if dry_run:
        for t in out:
            for d in sorted(t.gone.domains):
                t.taken.append(d)
                t.lines.append(_took_line(t.gone, paths[d], d, "would take over"))
            t.cleared = t.gone.dirty_seq is not None
            if t.cleared:
                t.lines.append(_cleared_line(t.gone, "would clear"))
            for line in t.lines:
                say(line)
        return out

    # One recall per domain, as gc, in one entry.
    rids = {d: uuid.uuid4().hex[:12] for d in wanted}

    def recall(view: View, pc: PlanContext) -> tuple[list[Op], None]:
        return [
            LRec(d, rids[d], "r") for d in sorted(wanted) if view.lease(d)[0] == wanted[d]
        ], None

    pending: dict[int, str] = {}
    if wanted:
        await meta.submit(recall)
        seen = clock()  # we have the answer that shows our recalls (§7)
        pending = {
            d: rid
            for d, rid in rids.items()
            if await meta.read(lambda v, d=d, rid=rid: v.recall(d, rid)) is not None
        }
    if pending:
        wait = 2 * sb.lease_time
        say(
            f"waiting {wait:.0f} s (2 x the lease time) for {len(pending)} recalled domain(s) "
            "of gone mounts to be answered before taking them over"
        )
        bar = tqdm(
            total=round(wait),
            desc="takeover wait",
            unit="s",
            disable=not progress or not sys.stderr.isatty(),
        )
        while pending and clock() - seen < wait:
            await trio.sleep(TAKEOVER_POLL)
            bar.n = min(round(wait), round(clock() - seen))
            bar.refresh()
            await meta.catch_up()
            for d, rid in list(pending.items()):
                if await meta.read(lambda v, d=d, rid=rid: v.recall(d, rid)) is not None:
                    continue
                # Closed: the domain changed hands. FREE (a read recall's answer) or
                # adopted by a new incarnation: the client is alive. Taken by another
                # mount's own takeover: no sign of life, and nothing left for gc.
                del pending[d]
                client = wanted[d][0]
                now_holder = (await meta.read(lambda v, d=d: v.lease(d)))[0]
                if now_holder is None or now_holder[0] == client:
                    by_client[client].answered.append(d)
        bar.close()

    alive = {t.gone.client for t in out if t.answered}

    def take(view: View, pc: PlanContext) -> tuple[list[Op], tuple[set[int], set[str]]]:
        ops: list[Op] = []
        taking: set[int] = set()
        clearing: set[str] = set()
        for d, rid in sorted(pending.items()):
            if wanted[d][0] not in alive and view.recall(d, rid) is not None:
                ops += [LTko(d, rid), LRel(d)]
                taking.add(d)
        for t in out:
            g = t.gone
            sess = view.session(g.client)
            held = {
                int(r[0])
                for r in view.db.execute(
                    "SELECT domain FROM leases WHERE holder_client = ?", (g.client,)
                )
            }
            if (
                g.client not in alive
                and sess is not None
                and (sess[0], sess[2]) == (g.inc, g.dirty_seq)
                and g.dirty_seq is not None
                and held <= taking
            ):
                ops.append(LDirty(g.client, g.inc, dirty=False))
                clearing.add(g.client)
        return ops, (taking, clearing)

    taken, cleared = await meta.submit(take)
    for t in out:
        g = t.gone
        t.taken = sorted(d for d in taken if d in g.domains)
        t.cleared = g.client in cleared
        for d in t.taken:
            t.lines.append(_took_line(g, paths[d], d, "took over"))
        for d in sorted(t.answered):
            t.lines.append(
                f"left {_who(g)} alone: it answered the recall of {paths[d]} "
                f"(alive after all, though {g.seen})"
            )
        if t.cleared:
            t.lines.append(_cleared_line(g, "cleared"))
        for line in t.lines:
            say(line)
    return out


def _who(g: Gone) -> str:
    return f"mount {g.client}" + (f" ({g.where})" if g.where else "")


def _took_line(g: Gone, path: str, d: int, verb: str) -> str:
    return (
        f"{verb} lease domain {path} (#{d}) of {_who(g)} and freed it: {g.seen}; "
        "if it comes back, its unsaved changes there go to its recovery directory"
    )


def _cleared_line(g: Gone, verb: str) -> str:
    return (
        f"{verb} the journal mark of {_who(g)} ({g.seen}): the log is trimmed past it "
        "and its never-committed blocks are swept as orphans"
    )


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
    store: ObjectStore,
    *,
    dry_run: bool,
    grace: float,
    progress: bool,
    out: TextIO | None = None,
    gone_after: float = GONE_AFTER,
    orphan_age: float = 24 * 3600.0,
    clock: Callable[[], float] = boottime,
    wall: Callable[[], int] = time.time_ns,
) -> int:
    stream = out or sys.stdout

    def say(line: str) -> None:
        print(f"gc: {line}", file=stream, flush=True)

    sb = await load_superblock(store)
    with tempfile.TemporaryDirectory(prefix="efsish-gc-") as tmp:
        meta = MetaLog(store, sb, Path(tmp) / "gc.db", client_id="gc")
        await meta.open()
        async with trio.open_nursery() as n:
            await n.start(meta.run)
            await take_over_gone(
                store,
                meta,
                gone_after=gone_after,
                dry_run=dry_run,
                clock=clock,
                wall=wall,
                progress=progress,
                say=say,
            )
            r = await collect(
                store,
                meta,
                dry_run=dry_run,
                grace=grace,
                orphan_age=orphan_age,
                progress=progress,
            )
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
    probed, why_not = await _probe_nudges(store, sb.fs_uuid, [c for c in live if c.nudge])
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
                print(f"    {mount_nudges(c, probed, why_not)}", file=stream)
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


async def _probe_nudges(
    store: ObjectStore, fs: str, mounts: list[heartbeat.Heartbeat]
) -> tuple[dict[str, float | None], str]:
    """Ping the live mounts' nudge addresses from here (LEASES.md §11): {client: round
    trip or None}, or why they were not probed."""
    if not mounts:
        return {}, ""
    try:
        key = await nudge.load_key(store, create=False)
    except (NotFound, CorruptObject) as e:
        return {}, f"no nudge key ({e})" if not isinstance(e, NotFound) else "no nudge key"
    return await nudge.probe(key, fs, mounts), ""


def mount_nudges(
    c: heartbeat.Heartbeat, probed: dict[str, float | None] | None = None, why_not: str = ""
) -> str:
    """One line: the UDP address a lease mount takes nudges on (LEASES.md §11), as its
    heartbeat advertises it, how old that heartbeat is, and whether it answered a probe
    from this machine (an answer shows the address reaches a listening mount; no answer
    from here can still mean a firewall between this machine and that one only)."""
    if c.nudge is None:
        return "nudges: none (nudge=off, or no socket: recalls of its domains wait for its poll)"
    head = f"nudges: {c.nudge}, advertised {c.age():.0f} s ago"
    if probed is None or c.client not in probed:
        return f"{head} (not probed{': ' + why_not if why_not else ''})"
    rtt = probed[c.client]
    if rtt is None:
        return (
            f"{head}; did not answer a probe from this machine within 1 s (check that UDP "
            "reaches that address from the other mounts: without nudges recalls and "
            "changes of the top wait seconds)"
        )
    return f"{head}; answered a probe in {rtt * 1000:.1f} ms"
