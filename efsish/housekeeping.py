"""A mount's housekeeping: the background loops that keep it in step with the others.

The poller catches up with the log every poll interval, checkpoints and runs gc; the
heartbeat loop publishes `clients/<id>` (where this mount is, the blocks it still
reads, its leases and journal) and reads the other mounts' (fairness, lease peers,
the shared throughput ledger); the lease gauges for the metrics.

This module owns those loops and what a heartbeat says. It must not know POSIX rules
or open files (the blocks a mount holds come from the `held_blocks` it is given), or
import efsish.filesystem; errors in a round are logged and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Protocol

import trio

from efsish import __version__
from efsish.errors import EfsishError, FsError, StoreError
from efsish.gc import collect as gc_collect
from efsish.meta import heartbeat
from efsish.meta.leases import Leases, domain_paths
from efsish.meta.log import MetaLog
from efsish.meta.superblock import NEWEST_FORMAT, Superblock
from efsish.meta.view import View
from efsish.metering import Metering
from efsish.store import ObjectStore

log = logging.getLogger(__name__)

STORED_REMEASURE = 60.0  # seconds between measurements of the stored size (EFS: ~hourly)
TRIM_CHECK_INTERVAL = 30.0  # seconds between checks that the log was not trimmed past us


class HousekeepingOptions(Protocol):
    """The mount options the loops read (efsish.filesystem.Options)."""

    poll_interval: float
    heartbeat_interval: float
    gc_interval: float
    gc_grace: float
    read_only: bool
    mountpoint: str


class Housekeeping:
    """The poller and the heartbeat of one mount. See the module docstring."""

    def __init__(
        self,
        store: ObjectStore,
        sb: Superblock,
        opts: HousekeepingOptions,
        meta: MetaLog,
        leases: Leases | None,
        metering: Metering,
        held_blocks: Callable[[], list[str]],
    ) -> None:
        self.store = store
        self.sb = sb
        self.opts = opts
        self.meta = meta
        self.leases = leases
        self.metering = metering
        self.held_blocks = held_blocks
        self.started = time.time()

    async def poller(self) -> None:
        """Every poll interval: catch up with the log, checkpoint when due, and run gc
        once per gc interval (not on a read-only mount)."""
        last_gc = last_trim_check = time.monotonic()
        while True:
            await trio.sleep(self.opts.poll_interval)
            try:
                check = time.monotonic() - last_trim_check > TRIM_CHECK_INTERVAL
                if check:
                    last_trim_check = time.monotonic()
                await self.meta.catch_up(check_trimmed=check)
                await self.meta.maybe_checkpoint()
                if not self.opts.read_only and time.monotonic() - last_gc > self.opts.gc_interval:
                    last_gc = time.monotonic()
                    r = await gc_collect(self.store, self.meta, grace=self.opts.gc_grace)
                    log.info(
                        "gc: %d blocks deleted, %d log entries trimmed",
                        r.deleted_blocks + r.swept_orphans,
                        r.trimmed_entries,
                    )
            except EfsishError as e:
                log.warning("background catch-up failed: %s", e)
            except Exception:
                # A bug here must not take the mount (and everyone's unflushed writes)
                # down with it: say so loudly and keep serving.
                log.exception("background catch-up crashed; the mount keeps running")

    async def heartbeat(self) -> None:
        """Every heartbeat interval: publish the heartbeat, read the others' (leases,
        fairness, the shared throughput ledger)."""
        stored: int | None = None
        last_measure = 0.0
        while True:
            try:
                # First the heartbeat itself: without it, other mounts' gc would take
                # this mount for crashed and stop sparing the blocks it holds.
                await self.write_heartbeat()
                if stored is None or time.monotonic() - last_measure > STORED_REMEASURE:
                    stored = (await self.meta.read(View.stats))[1]
                    last_measure = time.monotonic()
                others = await heartbeat.read_all(self.store, exclude=self.meta.client_id)
                if self.leases is not None:
                    self.leases.nudges.peers_seen(others)
                recent = 5 * self.opts.heartbeat_interval
                if any(hb.starving and hb.age() < recent for hb in others):
                    self.meta.make_room(2 * self.opts.heartbeat_interval)
                await self.metering.sync(others, stored)
            except (StoreError, FsError) as e:  # FsError: the view is unusable for now
                log.warning("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat crashed; the mount keeps running")
            await trio.sleep(self.opts.heartbeat_interval)

    async def write_heartbeat(self) -> None:
        """Publish where this mount is (clients/<id>): read by status and gc. A
        read-only mount publishes nothing (see docs/ARCHITECTURE.md, read-only mounts)."""
        if self.opts.read_only:
            return
        domains: list[str] = []
        rows = oldest = 0
        if self.leases is not None:
            held = sorted(self.leases.state.held)
            if held:
                domains = [f"#{d}" for d in held]
                with trio.move_on_after(1.0):  # never hold the heartbeat up for names
                    try:
                        domains = await self.meta.read(domain_paths, held)
                    except FsError:
                        pass
            rows = self.meta.journal_rows
            if rows:
                oldest = time.time_ns() - int(self.leases.journal_age() * 1e9)
        hb = heartbeat.Heartbeat(
            client=self.meta.client_id,
            t=time.time_ns(),
            host=socket.gethostname(),
            mountpoint=self.opts.mountpoint,
            version=__version__,
            pid=os.getpid(),
            applied_seq=self.meta.applied_seq,
            starving=self.meta.starving,
            held=self.held_blocks(),
            metered_total=self.metering.drain_metered(),
            started=int(self.started * 1e9),
            nudge=self.leases.nudges.address if self.leases is not None else None,
            format=self.sb.format_version,
            newest_format=NEWEST_FORMAT,
            domains=domains,
            journal_rows=rows,
            journal_oldest=oldest,
            inc=self.leases.inc if self.leases is not None else 0,
        )
        await heartbeat.write(self.store, hb)

    def lease_metrics(self) -> dict[str, float]:
        """The lease state for the metrics (stats file, Prometheus): domains held, the
        journal's rows and the age of the oldest one."""
        assert self.leases is not None
        return {
            "LeasesHeld": float(len(self.leases.state.held)),
            "JournalRows": float(self.meta.journal_rows),
            "JournalOldestAgeSeconds": self.leases.journal_age(),
        }
