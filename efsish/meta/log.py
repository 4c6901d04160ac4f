"""The metadata log client: the commit state machine (group commit with conditional
PUTs, answering callers, settling the answered entry into SQLite) and catch-up with
the log in the bucket.

Protocol (docs/ARCHITECTURE.md): to commit, a batch of planners is validated against the
view at position S inside one SQLite transaction; their ops are PUT as `log/S+1` with
If-None-Match. On success the callers are answered and then the SQLite transaction
commits (reads of the view wait for that); on 412 it rolls back, the view catches up to
the head, and the planners run again (they may now fail, e.g. EEXIST). Requests that
arrive while a PUT is in flight form the next batch (group commit). The local commit of
an answered entry is left to the worker-thread hop that plans the next batch, if one
comes within SETTLE_WAIT; anyone who needs the view or the writer sooner hurries it.

MetaLog owns the writer lock, the view's connections and position, the settle state and
the decisions of when to plan, answer, roll back, catch up and checkpoint. The parts it
drives live beside it: planning.py (a batch becomes an entry, in the worker thread),
memo.py (answers kept in memory), inodes.py (the claimed inode range), checkpoints.py
(the checkpoint objects) and keys.py (the log's key names).

SQLite work runs in worker threads behind CapacityLimiters, except the one small
transaction of a journaled change (`_in_writer_here`); the writer connection is used only
under `self._wlock`. This module must not import pyfuse3 or know POSIX rules.

It is longer than the ~600 lines the project aims for: the commit state machine and
catch-up share the writer lock, `_seq`, the settle state (`_unsettled`, `_settling`,
`_behind`) and the rules of which task may touch the writer when; split across modules,
those rules could no longer be read in one place. The lease paths (`submit_local`,
`flush`, `rebuild`) are commit paths under the same lock and the same `_seq`, so they
stay here too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from efsish import codec
from efsish.errors import (
    CorruptObject,
    EfsishError,
    FsError,
    NotFound,
    PreconditionFailed,
    TransientStoreError,
)
from efsish.meta import checkpoints, journal, leasing
from efsish.meta.inodes import InodeRange
from efsish.meta.keys import LOG_PREFIX, log_key, parse_seq, seq_of
from efsish.meta.memo import Fresh, Listed, Memo
from efsish.meta.ops import SYNC, ClaimInodes, LogEntry, Op
from efsish.meta.planning import LeaseHeader, Outcome, Plan, PlanContext, Planner, plan_batch
from efsish.meta.superblock import Superblock
from efsish.meta.view import ApplyResult, Attr, Extent, View, checkpoint_wal
from efsish.retry import retry_transient
from efsish.store import ObjectStore

if TYPE_CHECKING:
    import outcome

    from efsish.meta.leases import Leases as LeaseHooks

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 512
# Contention must slow a commit down, never fail it: retry conflicts (with growing,
# randomised back-off so a losing mount eventually wins) until this deadline.
CONFLICT_DEADLINE = 120.0
FAIRNESS_PAUSE = 0.010  # seconds, at most, between commits while another mount starves
STARVING_AFTER = 3  # consecutive lost races that make a mount report itself starving
CHASING_AFTER = 20  # entries applied in one catch-up that mean we are chasing a busy writer
# A flush that met rows referencing blocks staged after it waited for the uploads this
# many times waits for them under the writer lock (`_flush_open`).
LATE_TRIES = 3
# The view's WAL is checkpointed in the background (`keep_wal`), looked at every
# WAL_CHECK_EVERY seconds: once WAL_QUIET_WRITES inodes were written to the view since the
# last checkpoint and nothing since the last look, or once WAL_BUSY_WRITES were, whatever
# goes on (a change writes about 14 frames of 4 KiB).
WAL_CHECK_EVERY = 0.25
WAL_QUIET_WRITES = 100
WAL_BUSY_WRITES = 700
# A catch-up that finds entries reads the following positions in windows that double up
# to this many GETs at once: a backlog of n entries costs about log2(n) round trips rather
# than n, and at most as many GETs past the head as it found entries.
CATCH_UP_WINDOW = 8
# How long an answered entry may wait for the next batch's planning hop to commit it to
# SQLite (one worker-thread hop per change instead of two for a serial caller: rm -rf,
# tar, a build). Readers of the view and takers of the writer lock do not wait for it.
SETTLE_WAIT = 0.050

# A journaled change runs its transaction on the trio thread (`_in_writer_here`) unless
# its rows scale with a file's size or with its number of ops: the layout, removal or
# truncation of a file this large (256 extents of 4 MiB and more: the view walks them,
# 0.1-1 s for tens of GiB), or a change of more ops than HEAVY_OPS (a batch of atimes).
HEAVY_BYTES = 1 << 30
HEAVY_OPS = 256


@trio.lowlevel.enable_ki_protection
async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in one of trio's cached worker threads and return its result (or
    raise its exception), not cancellable while it runs (trio.to_thread.run_sync with
    abandon_on_cancel=False, without a copied context or thread names; fn reaches the
    trio thread through trio.from_thread only with an explicit trio_token)."""
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)
    out: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    return out


class _SettleFailed(Exception):
    """The local commit of an answered entry failed (in the hop that was to plan next)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Pending(Generic[T]):
    planner: Planner[T]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class MetaLog:
    """One mount's connection to the metadata log. See the module docstring."""

    def __init__(
        self,
        store: ObjectStore,
        sb: Superblock,
        db_path: Path,
        *,
        client_id: str | None = None,
        on_apply: Callable[[ApplyResult, bool], None] | None = None,
        checkpoint_every: int = 1000,
        read_only: bool = False,
    ) -> None:
        self.store = store
        # A read-only mount follows the log but never writes to the bucket: no entries,
        # no checkpoints (it may hold read-only credentials).
        self.read_only = read_only
        self.sb = sb
        self.db_path = Path(db_path)
        self.client_id = client_id or uuid.uuid4().hex[:16]
        # The lease protocol's per-mount state (efsish.meta.leases), on a format-3
        # filesystem; None: every change is committed on its own, as before leases.
        self.leases: LeaseHooks | None = None
        self._header: LeaseHeader | None = None  # set before each planning hop
        # A client without a lease state (`efsish gc`) on a lease filesystem: the header
        # of its sync entries (entries without one are fenced after fmt(3)).
        self.sync_header: LeaseHeader | None = None
        if sb.leases and client_id is not None:
            self.sync_header = LeaseHeader(client_id, 1, lambda d: False)
        self._rebuilding: trio.Event | None = None  # set while `rebuild` replaces the view
        self.on_apply = on_apply or (lambda res, remote: None)
        self.checkpoint_every = checkpoint_every
        self._wlimiter = trio.CapacityLimiter(1)
        self._rlimiter = trio.CapacityLimiter(1)
        # The WAL checkpoint's worker thread (`keep_wal`): taken, like `_rlimiter`, by
        # whatever closes or replaces the view's files.
        self._cplimiter = trio.CapacityLimiter(1)
        self.view_writes = 0  # inodes written to the view (each applied entry: at least 1)
        self.wal_checkpoints = 0
        self._closed = False
        self._wlock = trio.Lock()
        self._flush_lock = trio.Lock()  # one journal flush at a time (`flush`)
        self.rebuilds = 0  # views rebuilt after a fence (`rebuild`)
        self._queue: list[_Pending[Any]] = []
        self._wake = trio.Event()
        self.inodes = InodeRange()  # saved and restored around every plan
        self._claiming = False  # a `_claim_ahead` is wanted or under way
        self._claim_wanted = trio.Event()  # `run_claims` starts one
        self._catchups_started = 0
        self._catchups_done_from = 0  # start ticket of the newest completed catch-up
        self.writer: View
        self.reader: View
        self.broken: str | None = None  # set when the log cannot be applied
        # The position of the view as last committed to SQLite, kept in Python: read
        # without touching the writer connection, which a worker thread may be using.
        self._seq = 0
        self._polite_until = 0.0  # trio time until which to pause between commits
        self._starving_until = 0.0  # trio time until which this mount reports starving
        self.last_checkpoint = 0
        self.commits = 0
        self.entries_written = 0
        # Committed attributes and lookups in memory; every applied entry updates it
        # (`_applied`) before anyone is answered or anything else is applied.
        self.memo = Memo()
        # Set while an entry of ours is in the log (and answered) but not yet in SQLite:
        # its seq is `_unsettled`, and the committer task holds `_wlock` until it is.
        self._settling: trio.Event | None = None
        self._unsettled: int | None = None
        self._settle_soon = False  # someone waits for the local commit: do it now
        self._hop_settled: int | None = None  # set by `_plan` once it committed `settle`
        self._answered = 0  # entries of ours answered so far (see `read`)
        # Set while a hop commits an applied entry to SQLite before `_applied` has
        # told the memo and the filesystem about it (see `_publish` and `read`).
        self._publishing: trio.Event | None = None
        self.reads_repeated = 0
        # Why reads of the view are refused: our own entry `_behind_seq`, answered, could
        # not be recorded in SQLite yet. Cleared once the view has applied it (any later
        # catch-up re-applies it from the log, e.g. the poller's within a second).
        self._behind: str | None = None
        self._behind_seq = 0

    async def _in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a worker thread, one at a time (`_wlimiter`): every use of the
        writer connection. A change pays one or two of these hops, so they skip what
        trio.to_thread.run_sync adds that they do not use (a copied context, naming
        the OS thread twice per call): about half its CPU. As with it, a cancelled
        caller waits for the thread to finish (SQLite work is never abandoned)."""
        async with self._wlimiter:
            return await in_thread(fn, *args)

    async def _in_writer_here(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the trio thread, holding `_wlimiter` as `_in_writer` does: for
        the one small transaction of a journaled change (`submit_local`: a few indexed
        statements and a WAL append, 100-300 µs). The hop there and back cost as much
        as the work: a file tar extracts makes two such changes (its create and its
        layout at close), and without the hop they took 350 and 650 µs instead of 560
        and 1,020 (docs/BENCHMARKS.md). Catch-ups, flushes, sync commits and heavy
        journaled changes (HEAVY_BYTES), whose size has no bound, keep their hops."""
        async with self._wlimiter:
            return fn(*args)

    # --------------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Open (or build) the local view and catch up with the log head."""
        await trio.to_thread.run_sync(self._open_local)
        if not await trio.to_thread.run_sync(self.writer.initialised):
            await self._load_initial()
        self._seq = await trio.to_thread.run_sync(lambda: self.writer.applied_seq)
        if self.leases is not None:
            self.journal_rows = await trio.to_thread.run_sync(lambda: journal.count(self.writer))
        try:
            await self.catch_up(check_trimmed=True)
        except leasing.LeaseLost:
            pass  # recorded (fenced_at): the lease code recovers before serving

    def _open_local(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        view = self._view()
        uuid_ = view.get_meta("fs_uuid")
        if uuid_ is not None and uuid_ != self.sb.fs_uuid:
            log.warning("cache %s belongs to another filesystem; discarding it", self.db_path)
            view.close()
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.db_path) + suffix).unlink(missing_ok=True)
            view = self._view()
        view.keep_rows()
        self.writer = view
        self.reader = self._view()

    def _view(self) -> View:
        view = View(self.db_path, lease_depth=self.sb.lease_depth)
        if self.leases is not None:
            journal.ensure(view)
        return view

    async def _load_initial(self) -> None:
        """Fill an empty view from the newest checkpoint, or create the root."""
        newest = await checkpoints.newest(self.store)
        if newest is not None:
            blob = await self.store.get(newest)
            seq = seq_of(newest)
            await trio.to_thread.run_sync(self._install_checkpoint, blob, seq, newest)
            self.last_checkpoint = seq
            log.info("loaded checkpoint %s", newest)
            return
        sb = self.sb

        def init() -> None:
            self.writer.begin()
            self.writer.init_root(sb.fs_uuid, sb.created)
            self.writer.commit()

        await self._in_writer(init)

    def _install_checkpoint(self, blob: bytes, seq: int, what: str) -> None:
        data = checkpoints.decode(blob, what)
        self.writer.close()
        self.reader.close()
        checkpoints.install(data, seq, what, self.db_path, self.sb.fs_uuid)
        self.writer = self._view()
        self.writer.keep_rows()
        self.reader = self._view()
        self.memo.forget_all()

    async def aclose(self) -> None:
        log.info(
            "metadata: %d changes in %d log entries; %d answers from memory; %d reads "
            "repeated (they overlapped an answer)",
            self.commits,
            self.entries_written,
            self.memo_hits,
            self.reads_repeated,
        )
        # Not under a read running in a worker thread (a background task's stats read,
        # say): closing a SQLite connection another thread is using crashes the
        # process. A read that starts after this fails with an error instead.
        async with self._writer_lock(), self._rlimiter, self._cplimiter:
            self.writer.close()
            self.reader.close()
            self._closed = True

    async def keep_wal(self) -> None:
        """Checkpoint the view's WAL in a worker thread, on a connection of its own,
        while changes and reads go on: when the view is quiet, at the latest after
        WAL_BUSY_WRITES. (SQLite's own checkpoint runs inside the COMMIT that crosses
        its threshold and syncs two files there.)"""
        path = self.db_path

        def checkpoint() -> None:
            if not self._closed:
                t0 = time.perf_counter()
                frames, _ = checkpoint_wal(path)
                ms = 1e3 * (time.perf_counter() - t0)
                log.debug("checkpointed %d WAL frames in %.1f ms", frames, ms)

        seen = done = self.view_writes
        while True:
            await trio.sleep(WAL_CHECK_EVERY)
            now = self.view_writes
            quiet, seen = now == seen, now
            if now - done < (WAL_QUIET_WRITES if quiet else WAL_BUSY_WRITES):
                continue
            try:
                await trio.to_thread.run_sync(checkpoint, limiter=self._cplimiter)
                done = now
                self.wal_checkpoints += 1
            except (OSError, sqlite3.Error, EfsishError) as e:
                log.warning("checkpoint of the metadata view's WAL in %s failed: %s", path, e)

    # ------------------------------------------------------------------------- reads

    def _hurry(self) -> None:
        """Ask the committer to commit its answered entry to SQLite now, rather than
        leave it to the next batch's planning hop."""
        if self._unsettled is not None:
            self._settle_soon = True
            self._wake.set()

    @asynccontextmanager
    async def _writer_lock(self) -> AsyncIterator[None]:
        """`_wlock`, hurrying an answered entry's local commit (the committer holds the
        lock until that is done)."""
        self._hurry()
        async with self._wlock:
            yield

    async def _settled(self) -> None:
        """Wait until this mount's last committed entry is in SQLite (see
        `_commit_batch`): every read of the view begins with this. (The memo is up to
        date before anyone is answered.)"""
        while self._rebuilding is not None:  # the view is being replaced (fenced)
            await self._rebuilding.wait()
        settling = self._settling
        if settling is not None:
            self._hurry()
            await settling.wait()
        if self._behind is not None:
            raise FsError(f"metadata view unusable: {self._behind}")

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(reader_view, *args) in a worker thread on committed state.

        A read that waited for the reader, or ran, while one of our entries was answered
        may have read SQLite before that entry's local COMMIT, after its callers dropped
        what they held in memory for it (a flushed file's pending writes, its unflushed
        size): what it read may be older than a write() that returned before it began.
        Such a read is repeated, the second time holding the writer lock so that no
        further answer can come in between (a steady stream of commits cannot starve it).

        A read never returns a view newer than what `_applied` has told the memo and
        the filesystem: one that ends while a hop's COMMIT is in SQLite and its
        `_applied` still to come (`_publish`) waits for that first.
        """
        # Counted before the wait: the hop that commits our last entry may go straight on
        # to answer the next one (a store whose PUT does not yield) before we resume.
        answered = self._answered
        await self._settled()
        out = await trio.to_thread.run_sync(fn, self.reader, *args, limiter=self._rlimiter)
        publishing = self._publishing
        if publishing is not None:
            # The read may have seen an entry that a hop committed to SQLite while the
            # filesystem has not heard of it yet (`_applied` runs once the hop is back
            # on the trio thread): wait for that, so that no caller acts on a view
            # newer than what on_apply told it (e.g. an inode freed while open here:
            # its extents are gone from the view, its snapshot not yet taken).
            await publishing.wait()
        if answered == self._answered:
            return out
        self.reads_repeated += 1
        async with self._writer_lock():
            await self._settled()
            return await trio.to_thread.run_sync(fn, self.reader, *args, limiter=self._rlimiter)

    def heavy(
        self,
        size: int = 0,
        ops: int = 0,
        *,
        ino: int | None = None,
        entry: tuple[int, bytes] | None = None,
    ) -> bool:
        """Whether a journaled change of a file of `size` bytes (or of the size the memo
        knows for inode `ino` or entry (parent, name), if larger), or of `ops` ops, keeps
        its worker-thread hop (HEAVY_BYTES)."""
        if ino is not None or entry is not None:
            size = max(size, self.memo.known_size(ino, entry))
        return size >= HEAVY_BYTES or ops > HEAVY_OPS

    async def getattr(self, ino: int) -> Attr | None:
        """The committed attributes of `ino` (a copy: callers may change it)."""
        await self._not_rebuilding()
        return await self.memo.getattr(ino, self.read)

    async def lookup(self, parent: int, name: bytes) -> Attr | None:
        """The committed attributes of the entry `name` in `parent`, or None."""
        await self._not_rebuilding()
        return await self.memo.lookup(parent, name, self.read)

    async def domains(self, ino: int) -> set[int | None]:
        """The lease domains of `ino` in the committed view (see `Memo.domains`)."""
        await self._not_rebuilding()
        return await self.memo.domains(ino, self.sb.lease_depth, self.read)

    async def extents(self, ino: int, start: int, end: int) -> list[Extent]:
        """The committed extents of file `ino` overlapping [start, end) (see
        `Memo.extents`)."""
        await self._not_rebuilding()
        return await self.memo.extents(ino, start, end, self.read)

    async def readdir(self, ino: int, after: int, limit: int) -> Listed:
        """Up to `limit` committed entries of directory `ino` after cursor `after`, with
        their attributes (see `Memo.readdir`)."""
        await self._not_rebuilding()
        return await self.memo.readdir(ino, after, limit, self.read)

    async def getxattr(self, ino: int, name: bytes) -> bytes | None:
        """The committed value of xattr `name` of `ino`, or None. (The kernel asks for
        security.capability before every write and chown: answered from memory.)"""
        await self._not_rebuilding()
        return await self.memo.getxattr(ino, name, self.read)

    async def _not_rebuilding(self) -> None:
        """Reads wait while the view is rebuilt (`rebuild`): it is replayed from the
        start, and the memo refilled with every intermediate state."""
        while self._rebuilding is not None:
            await self._rebuilding.wait()

    @property
    def memo_hits(self) -> int:
        return self.memo.hits

    def _fresh(self, res: ApplyResult) -> Fresh | None:
        """What the entry just applied to the writer changed, re-read for the memo (in
        the writer's worker thread; see `Memo.fresh`)."""
        return self.memo.fresh(self.writer, res)

    def _applied(self, res: ApplyResult, remote: bool, fresh: Fresh | None = None) -> None:
        """An entry was applied to the view (another mount's: committed; ours: in the
        log, its local commit follows, see `_commit_locked`): update the memo, then
        tell the filesystem. Runs on the trio thread under the write lock, so nothing
        was applied between that and this."""
        self.memo.applied(res, fresh)
        self.view_writes += max(1, len(res.inodes))
        if self.leases is not None and (res.leases or res.shares):
            # On the trio thread, under the write lock, with no hop running: the
            # writer's state (our own answered entry's open transaction included).
            self.leases.refresh(self.writer)
            if res.shares:
                self.leases.shares_changed(res, remote)
        self.on_apply(res, remote)

    @contextmanager
    def _publish(self) -> Iterator[None]:
        """Around a hop that commits applied ops to SQLite and the `_applied` call
        after it (an entry of another mount, a journaled change, our flushed batch):
        the reader connection sees the commit before the trio thread runs
        `_applied`, so a read that returns meanwhile waits for it (`read`). Format-2
        entries of ours need none of this: `_applied` runs before their COMMIT."""
        done = self._publishing = trio.Event()
        try:
            yield
        finally:
            self._publishing = None
            done.set()

    @property
    def applied_seq(self) -> int:
        return self._seq

    # ---------------------------------------------------------------------- catch-up

    async def catch_up(self, check_trimmed: bool = False, upto: int | None = None) -> int:
        """Apply every entry up to the log head; return how many were applied.

        The common case, nothing new, costs one GET of the next position and does not
        wait for the writer lock: a lookup must not queue behind a commit in flight (it
        would also keep concurrent creates from reaching the same group commit). A 404
        there proves the view was at the head at a moment after this call began, which is
        what close-to-open needs. Otherwise concurrent callers share work: a caller
        returns once a catch-up that *started after it was called* has finished, or a
        request sent after it was called proved the head (`head_proven`).
        `check_trimmed` also verifies (one more request) that the log was not trimmed
        past this view while it was away; open() and the poller ask for it.

        `upto`: apply entries up to position `upto` and stop there, with no GET of the
        position after it (a nudge named `upto`: the caller needs what is at or below
        it, not a proof of the head). Costs nothing when the view is there already."""
        if upto is not None:
            if self._seq >= upto:
                return 0
            async with self._writer_lock():
                return await self._catch_up_locked(upto=upto, unlocked_gets=True)
        ticket = self._catchups_started
        called = self.sends
        first: tuple[int, bytes] | None = None
        if not check_trimmed:
            seq = self._seq + 1
            sent, tk = self._stamp()
            try:
                first = (seq, await self.store.get(log_key(seq)))
            except NotFound:
                self._renewed(sent, tk)
                return 0
        async with self._writer_lock():
            if not check_trimmed and (
                self._catchups_done_from > ticket or self.head_proven > called
            ):
                # A catch-up that began after this call finished meanwhile, or (lease
                # mode) a request sent after it proved the head: e.g. a commit this
                # waited behind, whose conflict read to the head and whose PUT landed.
                return 0
            self._catchups_started += 1
            start = self._catchups_started
            n = await self._catch_up_locked(check_trimmed, first, unlocked_gets=True)
            self._catchups_done_from = start
            return n

    async def _catch_up_locked(
        self,
        check_trimmed: bool = False,
        first: tuple[int, bytes] | None = None,
        upto: int | None = None,
        unlocked_gets: bool = False,
    ) -> int:
        """Apply entries from the view's position on (under the writer lock). With
        `unlocked_gets` the lock is released during each GET, so that local changes do
        not wait a round trip per remote entry; entries applied meanwhile by someone
        else are skipped."""
        applied = 0
        window = 1
        while upto is None or self._seq < upto:
            seq = self._seq + 1
            # Up to `upto` every position is known to exist (a nudge names a landed
            # entry): GET them all at once rather than growing the window.
            n = window if upto is None else min(CATCH_UP_WINDOW, upto - self._seq)
            sent: float | None = None
            tk = 0
            if first is not None and first[0] == seq:
                blobs = [first[1]]
            else:
                sent, tk = self._stamp()
                if unlocked_gets:
                    blobs = await self._get_unlocked(seq, n)
                else:
                    blobs = await self._get_run(seq, n)
            first = None
            found = len(blobs)
            if seq != self._seq + 1:
                # Applied meanwhile, by a flush or a commit (the lock was free).
                skip = self._seq + 1 - seq
                if skip < 0 or skip > found or (skip == found and found == n):
                    continue  # nothing here proves anything about the head: GET again
                blobs, seq = blobs[skip:], seq + skip
            moved = False
            for i, blob in enumerate(blobs):
                if i and unlocked_gets and self._wlock.statistics().tasks_waiting:
                    # Local changes wait: let them in between two entries, rather than
                    # after all of them (another mount's second of creates, applied at
                    # once, held them 40-150 ms).
                    await self._let_waiters_in()
                    moved = self._seq != seq + i - 1  # a commit caught up meanwhile
                    if moved:
                        break
                await self._apply_remote(seq + i, blob)
                applied += 1
                if applied == CHASING_AFTER:
                    # Another mount writes entries as fast as this one can apply them: say
                    # so in the heartbeat (a commit of ours waiting behind it would starve).
                    self._starving_until = trio.current_time() + 3.0
            if moved:
                continue  # on from the view's position
            if sent is not None and found < n:
                # A 404 at seq + len(blobs), sent at `sent`, and every entry before it
                # applied: the head at that moment (LEASES.md §7: the renewal).
                self._renewed(sent, tk)
                if applied == 0 and check_trimmed:
                    await self._check_trimmed(seq)
                return applied
            window = min(2 * window, CATCH_UP_WINDOW)
        return applied

    @asynccontextmanager
    async def _lock_released(self) -> AsyncIterator[None]:
        """The writer lock (held by this task) released for the body, then taken again,
        after whoever asked for it meanwhile (trio hands it over in that order)."""
        self._wlock.release()
        try:
            yield
        finally:
            self._hurry()
            with trio.CancelScope(shield=True):
                await self._wlock.acquire()

    async def _get_unlocked(self, seq: int, n: int) -> list[bytes]:
        """`_get_run` with the writer lock (held by this task) released meanwhile."""
        async with self._lock_released():
            return await self._get_run(seq, n)

    async def _let_waiters_in(self) -> None:
        """Let those waiting for the writer lock (held by this task) have it first."""
        async with self._lock_released():
            pass

    async def _get_run(self, seq: int, n: int) -> list[bytes]:
        """Log entries seq, seq+1, ... up to the first that does not exist, GETting `n`
        positions at once; a failure past the first missing position is ignored."""
        if n == 1:
            try:
                return [await self.store.get(log_key(seq))]
            except NotFound:
                return []
        got: list[bytes | Exception | None] = [None] * n

        async def one(i: int) -> None:
            try:
                got[i] = await self.store.get(log_key(seq + i))
            except NotFound:
                got[i] = None
            except Exception as e:  # raised below, unless past the head
                got[i] = e

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        out: list[bytes] = []
        for g in got:
            if isinstance(g, Exception):
                raise g
            if g is None:
                break
            out.append(g)
        return out

    async def _check_trimmed(self, seq: int) -> None:
        """If log entries below the head were trimmed past us, reload a checkpoint."""
        if seq <= 1:
            return
        try:
            await self.store.head(log_key(seq - 1))
            return
        except NotFound:
            pass
        first: str | None = None
        async for info in self.store.list(LOG_PREFIX):
            if parse_seq(info.key, LOG_PREFIX) is not None:
                first = info.key
                break
        if first is None or seq_of(first) <= seq:
            return
        if self.leases is not None and self.journal_rows:
            # gc trims past a client with a journal only after taking its leases over
            # (LEASES.md §9): the journal is fenced. The lease code salvages it from
            # this view, then rebuilds from the newest checkpoint (§10).
            reason = f"the log was trimmed past this mount's position {seq - 1}"
            self.leases.fenced_at(seq - 1, reason)
            raise leasing.LeaseLost(reason)
        raise CorruptObject(
            f"log entries before {first} were trimmed while this mount was at {seq - 1}; "
            "remove the cache directory to reload from the newest checkpoint"
        )

    async def _apply_remote(self, seq: int, blob: bytes, again: bool = False) -> None:
        def apply(seq: int = seq) -> tuple[ApplyResult, Fresh | None, int | None]:
            where = f"{self.store.url}/{log_key(seq)}"
            entry = LogEntry.unwire(codec.decode_json(b"L", blob, where))
            res = ApplyResult()
            rows: int | None = None
            self.writer.begin()
            try:
                if self.leases is not None:
                    self.leases.apply_remote(self.writer, seq, entry, res)
                    if entry.client == self.client_id:  # our own entry may drop rows
                        rows = journal.count(self.writer)
                else:
                    self.writer.apply_entry(seq, entry, res)
                self.writer.commit()
            except BaseException:
                self.writer.rollback()
                raise
            return res, self._fresh(res), rows

        try:
            with self._publish():
                res, fresh, rows = await self._in_writer(apply)
                if rows is not None:
                    self.journal_rows = rows
                self._seq = seq
                if self._behind is not None and seq >= self._behind_seq:
                    log.info("metadata view has applied entry %d again: reads resume", seq)
                    self._behind = None
                self._applied(res, True, fresh)
        except CorruptObject as e:
            if not again:
                # Damaged on the way here (a GET carries no checksum)? Read it once more.
                blob2 = await self.store.get(log_key(seq))
                if blob2 != blob:
                    log.warning("log entry %d arrived damaged (%s); read it again", seq, e)
                    return await self._apply_remote(seq, blob2, again=True)
            self.broken = str(e)
            log.error("cannot apply the metadata log: %s", e)
            raise
        except leasing.LeaseLost as e:
            # Stopped before this entry: the view holds journaled changes it would
            # make wrong (LEASES.md §10).
            assert self.leases is not None
            self.leases.fenced_at(seq, str(e))
            raise
        except sqlite3.Error as e:  # e.g. a full or failing disk under the cache dir
            raise FsError(f"cannot update the metadata view in {self.db_path}: {e}") from e

    # ------------------------------------------------------------------------ commit

    async def submit(self, planner: Planner[T]) -> T:
        """Queue a planner for the next group commit and return its result."""
        if self.read_only:
            raise FsError("read-only mount", errno.EROFS)
        if self.broken:
            raise FsError(f"metadata log unusable: {self.broken}")
        p: _Pending[T] = _Pending(planner)
        self._queue.append(p)
        self._wake.set()
        await p.done.wait()
        if p.error is not None:
            raise p.error
        result: T = p.result
        return result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer loop: takes everything queued and commits it as one entry."""
        task_status.started()
        try:
            while True:
                if self._unsettled is not None:
                    # Our last entry is answered but not in SQLite yet. A serial caller's
                    # next change usually comes within a millisecond, and the hop that
                    # plans it commits this one too; whoever needs the view or the writer
                    # lock meanwhile has it done at once.
                    if self._wlock.statistics().tasks_waiting:
                        self._settle_soon = True  # queued for the lock mid-commit
                    if not self._queue and not self._settle_soon:
                        self._wake = trio.Event()
                        with trio.move_on_after(SETTLE_WAIT):
                            await self._wake.wait()
                    if not self._queue or self._settle_soon:
                        await self._settle_answered()
                        continue
                elif not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                if trio.current_time() < self._polite_until:
                    # Another mount reports that it keeps losing the race for the next log
                    # position. The mount that just won is already at the head with its
                    # next batch ready, so without a pause it would win again and again
                    # (measured: 24 vs 1,775 creates in 10 s with two mounts); a short
                    # random pause lets the loser's retry land first.
                    await self._settle_answered()
                    await trio.sleep(FAIRNESS_PAUSE * random.uniform(0.5, 1.0))
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._commit_batch(batch)
                except BaseException as e:
                    for p in batch:
                        if not p.done.is_set():
                            p.error = e if isinstance(e, Exception) else FsError("cancelled")
                            p.done.set()
                    if not isinstance(e, Exception):
                        raise
                    log.error("commit failed: %s", e)
        finally:
            # Unmount (cancelled): an answered entry must still reach SQLite.
            await self._settle_answered()

    async def _commit_batch(self, batch: list[_Pending[Any]]) -> None:
        """Commit `batch` as one entry. On success the committer task keeps `_wlock`,
        with the entry answered but not yet in SQLite (`_unsettled`); otherwise the
        lock is released."""
        if self._unsettled is None:
            await self._wlock.acquire()
        answered = False
        try:
            answered = await self._commit_locked(batch)
        finally:
            if not answered:
                if self._unsettled is not None:  # e.g. cancelled before the planning hop
                    await self._settle_answered()  # (releases the lock)
                else:
                    self._wlock.release()

    async def _commit_locked(self, batch: list[_Pending[Any]]) -> bool:
        """`_commit_batch` under the lock; True if an entry was written and answered."""
        deadline = trio.current_time() + CONFLICT_DEADLINE
        attempt = 0
        while trio.current_time() < deadline:
            attempt += 1
            saved_range = self.inodes.save()
            settle = self._unsettled
            self._hop_settled = None
            # How a lease-era sync entry is written, read on the trio thread (the lease
            # clock may be trio's) for the planning hop.
            self._header = self.sync_header if self.leases is None else self.leases.header()
            try:
                (seq, blob, res, outcomes), fresh = await self._in_writer(self._plan, batch, settle)
            except _SettleFailed as e:
                assert settle is not None
                self.inodes.restore(saved_range)
                await self._settle_failed(settle, e.cause)
                continue
            except BaseException:
                # Planning failed, or the hop never ran (cancelled): it rolled its own
                # transaction back. If it committed the answered entry first, the
                # `finally` below counts that entry as settled.
                self.inodes.restore(saved_range)
                raise
            finally:
                if settle is not None and self._hop_settled == settle:
                    self._settled_now()
            # From here until the PUT succeeds, any failure rolls the planned
            # transaction back: it must never be committed unless it is in the log.
            sent = False
            try:
                stale = any(err is not None for _, err in outcomes) and await self._stale(seq)
                if stale:
                    # An error (ENOENT, EEXIST...) must be judged against the log head,
                    # not a view that is behind it: catch up and plan again.
                    await self._rollback()
                    self.inodes.restore(saved_range)
                    await self._catch_up_locked()
                    continue
                if blob is None:
                    await self._in_writer(self.writer.commit)
                    self._deliver(batch, outcomes)
                    return False
                if self.leases is not None and self.journal_rows and self.leases.ready:
                    # A sync change comes after the journal in the log (the order
                    # this mount answered them): flush first, then plan it again.
                    await self._rollback()
                    self.inodes.restore(saved_range)
                    await self._flush_locked()
                    continue
                sent = True
                put_at, put_tk = self._stamp()
                await self._put_entry(seq, blob)
            except PreconditionFailed:
                await self._rollback()
                self.inodes.restore(saved_range)
                if attempt >= STARVING_AFTER:
                    self._starving_until = trio.current_time() + 3.0
                await self._catch_up_locked()
                if attempt > 2:
                    # Several losers at once: spread them out, briefly. (A long,
                    # growing back-off only hands the next position to the winner,
                    # which is why winners pause instead; see `run`.)
                    await trio.sleep(random.uniform(0, 0.005))
                continue
            except BaseException:
                await self._rollback()
                if sent:
                    # The PUT failed without an answer (errors on every try, or
                    # cancelled): the entry may be in the log all the same, holding the
                    # inode numbers it took, and a catch-up will apply it. Never hand
                    # them out again: the next create claims a fresh range.
                    self.inodes.abandon()
                else:
                    self.inodes.restore(saved_range)
                raise

            # The entry is committed: it is in the log. Answer the callers now and
            # commit it to SQLite afterwards, off their path: in the hop that plans the
            # next batch (`_plan`), or on its own once none came within SETTLE_WAIT or
            # someone needs the view (`_settle_answered`). Until then this task holds the
            # lock and reads of the view wait (`_settled`); the memo already holds the
            # entry's outcome (`fresh`, read in the planning hop), so what the kernel
            # asks next (the new inode's attributes and xattrs, its directory's) is
            # answered at once. The filesystem hears of the entry (e.g. a flushed file's
            # extents) before anyone is answered.
            self._seq = seq
            self.commits += len(batch)
            self.entries_written += 1
            self._unsettled = seq
            self._settling = trio.Event()
            self._answered += 1
            self._applied(res, False, fresh)
            self._renewed(put_at, put_tk)
            self._deliver(batch, outcomes)
            return True
        raise TransientStoreError(
            f"could not claim a log position in {CONFLICT_DEADLINE:.0f}s ({attempt} conflicts)"
        )

    async def _rollback(self) -> None:
        """Roll the writer's open transaction back (shielded: it must not stay open)."""
        with trio.CancelScope(shield=True):
            await self._in_writer(self.writer.rollback)

    def _settled_now(self) -> None:
        """The answered entry is in SQLite: reads of the view may go on."""
        settling = self._settling
        self._unsettled, self._settling, self._settle_soon = None, None, False
        if settling is not None:
            settling.set()

    async def _settle_answered(self) -> None:
        """Commit the answered entry to SQLite in a hop of its own, and release the lock
        the committer task held for it. Nothing to do if there is none."""
        seq = self._unsettled
        if seq is None:
            return

        def finish() -> None:
            self.writer.set_meta("applied_seq", seq)
            self.writer.commit()

        try:
            try:
                # Local work, bounded: an unmount's cancellation must not leave the entry
                # answered but uncommitted (and the writer's transaction open).
                with trio.CancelScope(shield=True):
                    await self._in_writer(finish)
                self._settled_now()
            except Exception as e:
                await self._settle_failed(seq, e)
        finally:
            self._wlock.release()

    async def _settle_failed(self, seq: int, e: Exception) -> None:
        """Our entry `seq`, already in the log and answered, could not be committed to
        SQLite: the view goes back to `seq - 1` and applies the entry again from the
        log, as another mount would; if that fails too, reads of the view are refused
        (it would be behind what this mount acknowledged) until a later catch-up has
        applied the entry. Reads of the view wait until this is over."""
        log.error("could not record committed entry %d locally (%s); re-applying it", seq, e)
        settling = self._settling
        self._unsettled = None  # nobody may commit that transaction any more
        self._seq = seq - 1
        self.memo.forget_all()
        self._behind_seq = seq
        self._behind = f"entry {seq}, already answered, is not in the local view yet ({e})"

        def undo() -> int:
            self.writer.rollback()
            return self.writer.applied_seq

        try:
            with trio.CancelScope(shield=True):
                at = await self._in_writer(undo)
            if at >= seq:
                # The COMMIT reported an error but had gone through: the view has it.
                self._seq, self._behind = at, None
                log.info("entry %d was recorded locally after all", seq)
            else:
                await self._catch_up_locked()
        except Exception as e2:
            # Reads stay refused (EIO) until a later catch-up applies the entry: the
            # poller tries every poll interval, and so does every commit (its PUT of
            # position `seq` conflicts with our own entry).
            self._behind = f"the local view cannot be updated ({e2}); retrying"
            log.error("metadata view behind what this mount answered: %s", e2)
        finally:
            self._settling, self._settle_soon = None, False
            if settling is not None:
                settling.set()

    @property
    def starving(self) -> bool:
        """This mount lost the race for the log position several times in a row lately
        (published in its heartbeat, so that the others make room)."""
        return trio.current_time() < self._starving_until

    def make_room(self, seconds: float) -> None:
        """Another mount is starving: pause briefly between commits for `seconds`."""
        self._polite_until = max(self._polite_until, trio.current_time() + seconds)

    def _plan(
        self, batch: list[_Pending[Any]], settle: int | None = None
    ) -> tuple[Plan, Fresh | None]:
        """Plan `batch` in a new transaction of the writer (a worker thread). `settle`:
        our answered entry of that seq, whose transaction is still open, is committed
        first (raises _SettleFailed if that fails; `_hop_settled` says it went through).
        Any other failure rolls the new transaction back before it leaves."""
        view = self.writer
        if settle is not None:
            try:
                view.set_meta("applied_seq", settle)
                view.commit()
            except Exception as e:
                raise _SettleFailed(e) from e
            self._hop_settled = settle
        view.begin()
        try:
            planners = [p.planner for p in batch]
            plan = plan_batch(view, planners, self.inodes, self.client_id, self._header)
            # What the entry changed, as it will be once committed (for the memo).
            return plan, None if plan.blob is None else self._fresh(plan.res)
        except BaseException:
            view.rollback()
            raise

    async def _stale(self, seq: int) -> bool:
        """True if log entry `seq` already exists (this view is behind the head)."""
        try:
            await self.store.head(log_key(seq))
        except NotFound:
            return False
        return True

    async def _put_entry(self, seq: int, blob: bytes) -> None:
        """PUT log/seq; retry transient errors with the same bytes (idempotent)."""
        key = log_key(seq)
        await retry_transient(lambda: self.store.put_if_absent(key, blob), f"log write {seq}")

    @staticmethod
    def _deliver(batch: list[_Pending[Any]], outcomes: list[Outcome]) -> None:
        for p, (result, error) in zip(batch, outcomes, strict=True):
            p.result, p.error = result, error
            p.done.set()

    # ------------------------------------------------------------------ leases (§6)

    journal_rows = 0  # rows in the local journal (lease mode; kept by the lease code)

    def _lease_clock(self) -> float:
        return 0.0 if self.leases is None else self.leases.clock()

    # Requests to the log that can prove the head, counted as they are sent, and the
    # count of the newest one that did (a GET that returned 404, or a PUT that landed,
    # with every earlier entry applied): a proof numbered above `sends` as read at some
    # moment shows the view at the head after that moment (lease mode only).
    sends = 0
    head_proven = 0

    def _stamp(self) -> tuple[float, int]:
        """The lease clock and the number of a request about to be sent."""
        self.sends += 1
        return self._lease_clock(), self.sends

    def _renewed(self, sent: float, tk: int) -> None:
        """A GET that returned 404 (or a PUT that landed) was sent at lease-clock time
        `sent` (as request number `tk`) with every earlier entry applied: no recall had
        landed by then. The store's `Date` of that answer goes with it (the guard of
        LEASES.md §7 (4))."""
        if self.leases is not None:
            self.head_proven = max(self.head_proven, tk)
            self.leases.renewed(sent, self.store.server_date())

    async def submit_local(
        self, planner: Planner[T], ok: frozenset[int], heavy: bool = False
    ) -> tuple[T, frozenset[int]] | None:
        """Plan `planner` against the view as a journaled change: if every op touches
        only domains in `ok` (held, valid, not recalled) it is applied and appended to
        the journal in one SQLite transaction, committed before this returns (result,
        domains touched). None: not a local change (another domain, the top, an inode
        range claim, an error to be judged against the head): commit it as a sync one.
        `heavy`: its transaction may be long (HEAVY_BYTES): run it in a worker thread."""
        if self.read_only:
            raise FsError("read-only mount", errno.EROFS)
        if self.broken:
            raise FsError(f"metadata log unusable: {self.broken}")
        leases = self.leases
        assert leases is not None
        async with self._writer_lock():
            if self.broken:
                raise FsError(f"metadata log unusable: {self.broken}")
            saved = self.inodes.save()
            with self._publish():
                try:
                    run = self._in_writer if heavy else self._in_writer_here
                    out = await run(self._plan_local, planner, ok, leases.clock())
                except BaseException:
                    self.inodes.restore(saved)
                    raise
                if out is None:
                    self.inodes.restore(saved)
                    return None
                result, doms, res, fresh, nrows = out
                self.journal_rows += nrows
                self.commits += 1
                self._answered += 1
                self._applied(res, False, fresh)
        if not self._claiming and self.inodes.wants_spare():
            # Half the inode range is used: claim the next in the background, so that
            # no create waits for a flush and a claim when this one runs out.
            self._claiming = True
            self._claim_wanted.set()
        return result, doms

    async def run_claims(self) -> None:
        """Claim inode ranges ahead of need when `submit_local` asks (lease mode)."""
        while True:
            await self._claim_wanted.wait()
            self._claim_wanted = trio.Event()
            try:
                await self._claim_ahead()
            except Exception as e:  # a create that finds no range left claims one itself
                log.warning("could not claim inode numbers ahead: %s", e)
            finally:
                self._claiming = False

    async def _claim_ahead(self) -> None:
        """Claim the inode range to follow this mount's current one (efsish.meta.inodes)
        in an entry of its own. A claim changes nothing anyone reads, so it waits for no
        journal flush; and like a flush it holds the writer lock only to plan and to
        record it, not through its PUT and the races it loses to another mount (a sync
        commit does: journaled changes waited 90-525 ms behind one, docs/BENCHMARKS.md).
        An entry a catch-up applied first is left unused (whether it was fenced is not
        known here); one whose PUT went unanswered too."""
        leases = self.leases
        assert leases is not None
        while not self.broken and not self.read_only:
            async with self._writer_lock():
                planned = await self._in_writer_here(self._plan_claim, leases.header())
            if planned is None:
                return
            seq, entry, blob = planned
            put_at, put_tk = self._stamp()
            try:
                await self._put_entry(seq, blob)
            except PreconditionFailed:
                await self.catch_up()  # (lets local changes in between entries)
                continue
            async with self._writer_lock():
                if self._seq == seq - 1:
                    await self._record_flushed(entry, seq)  # raises if fenced
                    claim = entry.ops[0]
                    assert isinstance(claim, ClaimInodes)
                    self.inodes.add_spare(claim)
                self._renewed(put_at, put_tk)
            return

    def _plan_claim(self, header: LeaseHeader) -> tuple[int, LogEntry, bytes] | None:
        """(Under the writer lock.) The entry that claims the range to follow the current
        one at the next position, judged as every replayer will judge it there (never
        write one that would be fenced); None if none is wanted or it would be fenced."""
        if not self.inodes.wants_spare():
            return None
        view = self.writer
        seq = view.applied_seq + 1
        claim = ClaimInodes(int(view.get_meta("next_ino")), self.inodes.spare_size())
        entry = LogEntry(uuid.uuid4().hex, self.client_id, time.time_ns(), [claim])
        entry.inc, entry.kind = header.inc, SYNC
        res = ApplyResult()
        view.begin()
        try:
            view.apply_entry(seq, entry, res)
        finally:
            view.rollback()
        if res.fenced is not None:
            return None
        return seq, entry, journal.encode(entry)

    def _plan_local(
        self, planner: Planner[T], ok: frozenset[int], mono: float
    ) -> tuple[T, frozenset[int], ApplyResult, Fresh | None, int] | None:
        leases = self.leases
        assert leases is not None
        view = self.writer
        view.begin()
        try:
            ctx = PlanContext(self.inodes)
            jseq = journal.next_jseq(view, self.client_id)
            prov = leases.journaled_entry(view)
            try:
                ops, result = planner(view, ctx)
            except FsError:
                view.rollback()
                return None
            if ctx.extra or not ops:
                view.rollback()
                return None
            res = ApplyResult()
            doms: set[int] = set()
            per_op: list[set[int]] = []
            for op in ops:
                touched, movers = leasing.touches_movers(view, op)
                if not touched or not touched <= ok:
                    view.rollback()
                    return None
                per_op.append({d for d in touched if d is not None})
                doms |= per_op[-1]
                leases.claim(view, prov, per_op[-1])
                view.cur_seq = journal.PENDING + jseq + len(per_op) - 1
                try:
                    leasing.apply_leased_op(view, op, prov, res, (touched, movers))
                except (leasing.Fence, CorruptObject):
                    view.rollback()
                    return None
            if ctx.after is not None:
                result = ctx.after(view)
            journal.append(view, self.client_id, ops, per_op, ctx.now_ns, mono, jseq)
            fresh = self._fresh(res)
            view.commit()
        except BaseException:
            view.rollback()
            raise
        return result, frozenset(doms), res, fresh, len(ops)

    async def flush(self, extra: list[Op] | None = None) -> None:
        """Commit the journal to the log (LEASES.md §6.3), with `extra` lease ops (the
        answer to a recall, releases) after it in the last entry. One flush at a time."""
        if self.leases is not None and not self.read_only:
            # The staged uploads go up before the writer lock is taken, so that reads and
            # local changes do not queue behind them.
            await self.leases.before_flush()
        async with self._flush_lock:
            if extra:
                # Lease ops ride in the last entry: no change may be journaled between
                # computing it and recording it (one in a domain it releases would be
                # fenced), so the writer lock is held across the PUT.
                async with self._writer_lock():
                    await self._flush_locked(extra)
            else:
                await self._flush_open()

    async def _flush_open(self) -> None:
        """Flush the journal without holding the writer lock during a PUT: local changes
        go on meanwhile (they add rows after the ones the entry carries). The entry is
        computed and recorded under the lock; a catch-up that meets it first records it
        (`Leases.apply_remote`: our rows still in the journal). A rebuild in between
        (fenced) makes this flush fail: what it carried went to the recovery directory."""
        leases = self.leases
        assert leases is not None
        if self.read_only:
            return
        late = 0
        rebuilds = self.rebuilds
        # The rows to flush: those answered before the flush began. Rows answered
        # meanwhile wait for the next flush (else a steady stream of changes could
        # keep an fsync from returning).
        target: int | None = None

        def plan_next() -> tuple[tuple[LogEntry | None, bool] | None, int]:
            newest = journal.newest_jseq(self.writer) if target is None else target
            return leases.flush_entries(self.writer, None, False, newest), newest

        while True:
            async with self._writer_lock():
                self._check_unfenced(rebuilds)
                if late > LATE_TRIES:
                    # Blocks keep being staged faster than they go up: wait under the
                    # lock, so that no new row can reference a new one.
                    await leases.before_flush()
                plan, newest = await self._in_writer(plan_next)
                if target is None:
                    target = newest
                if plan is not None and plan[0] is None:
                    self.journal_rows = 0  # (a catch-up may have met our last entry)
                    return
                seq = self._seq + 1
            if plan is None:
                # A row references a block staged since `before_flush`: it goes first.
                late += 1
                await leases.before_flush()
                continue
            entry, last = plan
            assert entry is not None
            # Encoded (up to a MiB of JSON, compressed) without the writer lock.
            blob = await trio.to_thread.run_sync(journal.encode, entry)
            put_at, put_tk = self._stamp()
            try:
                await self._put_entry(seq, blob)
            except PreconditionFailed:
                # Another entry took the position (or a lost answer of ours landed
                # there: the catch-up recognises it by its label and drops its rows).
                # Its GET goes without the writer lock, like the PUT.
                await self.catch_up()
                continue
            async with self._writer_lock():
                self._check_unfenced(rebuilds)
                if self._seq < seq:
                    assert self._seq == seq - 1  # only our entry can be at `seq`
                    await self._record_flushed(entry, seq)
                else:
                    # A catch-up met the entry during the PUT and recorded it.
                    self.journal_rows = await self._in_writer(lambda: journal.count(self.writer))
                self._renewed(put_at, put_tk)
            if last:
                return

    def _check_unfenced(self, rebuilds: int) -> None:
        """(Under the writer lock, in a flush.) Raise if the view was rebuilt since the
        flush began (`rebuilds` then): the journal it was to commit was fenced and went
        to the recovery directory, not the log; or if the log cannot be applied."""
        if self.rebuilds != rebuilds:
            raise FsError("fenced during the journal flush: its changes were recovered", errno.EIO)
        if self.broken:
            raise FsError(f"metadata log unusable: {self.broken}", errno.EIO)

    async def _flush_locked(self, extra: list[Op] | None = None) -> None:
        """Flush the journal (and `extra`) holding the writer lock throughout: for lease
        ops, and for a sync commit that must come after the journal."""
        leases = self.leases
        assert leases is not None
        if self.read_only:
            return
        while True:
            if self.broken:
                raise FsError(f"metadata log unusable: {self.broken}")
            await leases.before_flush()  # staged blocks of the journal go up first
            plan = await self._in_writer(leases.flush_entries, self.writer, extra, True)
            assert plan is not None
            entry, last = plan
            if entry is None:
                self.journal_rows = 0  # (a catch-up may have met our last entry)
                return
            blob = journal.encode(entry)
            seq = self._seq + 1
            put_at, put_tk = self._stamp()
            try:
                await self._put_entry(seq, blob)
            except PreconditionFailed:
                # Another entry took the position (or a lost answer of ours landed
                # there: the catch-up recognises it by its label and drops its rows).
                await self._catch_up_locked()
                continue
            await self._record_flushed(entry, seq)
            self._renewed(put_at, put_tk)
            if last:
                return

    async def _record_flushed(self, entry: LogEntry, seq: int) -> None:
        """Our flushed `entry` landed at `seq`: record it in the view (under the lock)."""
        leases = self.leases
        assert leases is not None

        def record() -> tuple[ApplyResult, int]:
            res = ApplyResult()
            self.writer.begin()
            try:
                leases.apply_own(self.writer, seq, entry, res)
                self.writer.commit()
            except BaseException:
                self.writer.rollback()
                raise
            return res, journal.count(self.writer)

        with self._publish():
            with trio.CancelScope(shield=True):
                res, left = await self._in_writer(record)
            self._seq = seq
            self.entries_written += 1
            self.journal_rows = left
            self._applied(res, False, None)
        if res.fenced is not None:
            leases.fenced_at(seq, str(res.fenced))
            raise FsError(f"fenced at log entry {seq}: {res.fenced}", errno.EIO)

    async def rebuild(self, salvage: Callable[[View], T]) -> T:
        """Fenced (LEASES.md §10): return `salvage(writer)` (what the journal made,
        read before it goes), then rebuild the view from the newest checkpoint and the
        log: pending changes cannot be undone row by row."""
        async with self._writer_lock():
            out = await self._in_writer(salvage, self.writer)
            self.rebuilds += 1
            self._rebuilding = trio.Event()
            try:
                await self._rebuild_locked()
            finally:
                self.memo.forget_all()  # it was refilled with intermediate states
                self._rebuilding.set()
                self._rebuilding = None
            return out

    async def _rebuild_locked(self) -> None:
        def wipe() -> None:
            self.writer.close()
            self.reader.close()
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.db_path) + suffix).unlink(missing_ok=True)
            self._open_local()

        # No read of the old file runs, nor one of the new file while a checkpoint
        # replaces it (it closes and reopens the connections), nor a WAL checkpoint.
        async with self._rlimiter, self._cplimiter:
            with trio.CancelScope(shield=True):
                await self._in_writer(wipe)
            self.memo.forget_all()
            self.journal_rows = 0
            self._behind = None
            self.broken = None
            await self._load_initial()
        self._seq = await trio.to_thread.run_sync(lambda: self.writer.applied_seq)
        await self._catch_up_locked()
        if self.leases is not None:
            self.leases.refresh(self.writer)

    # ------------------------------------------------------------------- checkpoints

    async def maybe_checkpoint(self) -> bool:
        if self.read_only:
            return False  # the mounts that write checkpoint the log
        if self.applied_seq - self.last_checkpoint < self.checkpoint_every:
            return False
        if self.journal_rows:
            return False  # the view holds changes that are not in the log yet
        await self.write_checkpoint()
        return True

    async def write_checkpoint(self) -> int:
        """Upload a snapshot of the view as checkpoints/<seq>; return seq."""
        if self.read_only:
            raise FsError("read-only mount: no checkpoints", errno.EROFS)
        async with self._writer_lock():
            if self.journal_rows:
                raise FsError("the view holds changes not in the log yet: no checkpoint")
            seq, data = await self._in_writer(
                checkpoints.snapshot, self.writer, self.db_path.parent
            )
        await checkpoints.upload(self.store, seq, data)
        self.last_checkpoint = seq
        log.info("wrote checkpoint %d (%d bytes)", seq, len(data))
        return seq
