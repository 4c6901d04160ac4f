"""The trio pacer of the EFS throughput model: :class:`Throttle`, which the data path awaits
before each request so that one mount's metered throughput follows the permitted rate, and
the EFS metrics it counts (``BurstCreditBalance``, ``PermittedThroughput``,
``MeteredIOBytes`` ...).

What this module owns
    Pacing: the token buckets (metered bytes, the per-client ceiling, IOPS, the elastic
    ceilings), FIFO fairness in chunks, the hysteresis of running out of credits, the
    counters behind :meth:`Throttle.snapshot`, and the metering to exchange with other
    mounts (:meth:`Throttle.drain_local_metered`, :meth:`Throttle.record_remote`). The
    model it paces by (modes, closed-form rates, metering rules, :class:`CreditLedger`)
    is efsish/throttle.py.

What it must not do
    It must not import pyfuse3, and it must not touch the network or the object store:
    persisting the ledger and exchanging metering between mounts is the caller's job
    (efsish/metering.py). It reads time only from ``trio.current_time()``, so tests drive
    it with ``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import trio

from efsish.throttle import (
    IOPS_WINDOW_SECONDS,
    MIN_OP_BYTES,
    CreditLedger,
    MiB,
    OpKind,
    OpKindLike,
    ThrottleConfig,
    ThroughputMode,
    baseline_bps,
    burst_bps,
    credit_cap,
    metered_bytes,
    permitted_bps,
)

# Log lines name their logger: the pacer is part of the throughput model (efsish.throttle).
log = logging.getLogger("efsish.throttle")


class _Bucket:
    """A token bucket that may go into debt.

    A request of ``cost`` conforms once the bucket holds ``min(cost, capacity)`` tokens;
    it then takes ``cost``, so a request larger than the capacity leaves a debt that the
    next request waits for. The long-run rate is therefore exactly ``rate`` whatever the
    request sizes, and the burst is at most ``capacity``.
    """

    __slots__ = ("burst_seconds", "capacity", "min_capacity", "rate", "tokens", "updated_at")

    def __init__(self, rate: float, burst_seconds: float, min_capacity: float, now: float):
        self.rate = rate
        self.burst_seconds = burst_seconds
        self.min_capacity = min_capacity
        self.capacity = max(min_capacity, rate * burst_seconds)  # follows the rate
        self.tokens = 0.0  # no burst allowance before the rate has been earned
        self.updated_at = now

    def refill(self, now: float) -> None:
        if now > self.updated_at:
            self.tokens = min(self.capacity, self.tokens + self.rate * (now - self.updated_at))
            self.updated_at = now

    def set_rate(self, rate: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.capacity = max(self.min_capacity, rate * self.burst_seconds)
        self.tokens = min(self.tokens, self.capacity)

    def wait_seconds(self, cost: float, now: float) -> float:
        self.refill(now)
        need = min(cost, self.capacity)
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.refill(now)
        self.tokens -= cost


# Waits shorter than this are rounding error, not pacing (avoids zero-length sleep loops).
_EPSILON_SECONDS: Final = 1e-9


@dataclass
class _Counters:
    metered: float = 0.0
    total: float = 0.0
    data_read: float = 0.0
    data_write: float = 0.0
    metadata: float = 0.0
    ops_window: deque[list[int]] = field(default_factory=deque)  # [second, reads, writes]


class Throttle:
    """Paces one mount's requests so its metered throughput follows the permitted rate.

    Call ``await throttle.acquire(kind, nbytes)`` before each filesystem request (one
    call per FUSE read/write/metadata request). It returns once the request may proceed.

    Limits enforced, each as a token bucket holding ``burst_seconds`` worth of its rate
    (so there are no multi-second stalls or bursts):

    - metered bytes at ``permitted_bps * share``: the filesystem's permitted rate
      (bursting/provisioned/elastic), of which this mount may use ``share``;
    - raw bytes at ``per_client_ceiling_bps`` (a per-client limit, not shared);
    - requests per second: ``read_iops`` for reads and metadata, ``write_iops`` for
      writes, times ``share``; each request counts as one operation;
    - elastic mode only: raw read/write bytes at ``elastic_read_bps`` /
      ``elastic_write_bps`` times ``share``.

    Fairness: a request takes its tokens in chunks of about ``chunk_seconds`` of the
    current rate, and waiters are served one chunk at a time in FIFO order (a
    ``trio.StrictFIFOLock``), so a small request waits behind at most one chunk of each
    request ahead of it, never behind the whole of a large one.

    Credits: the throttle advances its :class:`CreditLedger` on every grant, so the
    balance and the permitted rate follow the model exactly. Several mounts share one
    balance either by sharing one ledger object (in one process) or, across machines, by
    each reporting :meth:`drain_local_metered` to the others, which apply it with
    :meth:`record_remote`; :meth:`set_share` divides the permitted rate between them.
    In provisioned and elastic modes the balance is frozen (neither earned nor spent).

    Running out of credits has hysteresis, so the rate does not flap between burst and
    baseline while credits are earned and spent at the baseline: the throttle drops to
    the baseline when the balance reaches zero, and returns to the burst rate only once
    the balance would last one chunk, or one ``sync_interval`` (the time between metering
    exchanges with the other mounts, during which their use is not yet known here), at
    the burst rate. Each transition is logged once (a warning when credits run out).

    All methods that look at time must run inside trio (they use ``trio.current_time()``).
    """

    def __init__(
        self,
        config: ThrottleConfig,
        stored_bytes: float,
        *,
        ledger: CreditLedger | None = None,
        share: float = 1.0,
        burst_seconds: float = 0.2,
        chunk_seconds: float = 0.05,
        sync_interval: float = 0.0,
    ) -> None:
        if stored_bytes < 0:
            raise ValueError(f"stored_bytes must be >= 0, got {stored_bytes}")
        if not 0 < chunk_seconds <= burst_seconds:
            raise ValueError("need 0 < chunk_seconds <= burst_seconds")
        if sync_interval < 0:
            raise ValueError(f"sync_interval must be >= 0, got {sync_interval}")
        self._check_share(share)
        self._config = config
        self._stored = float(stored_bytes)
        self._ledger = ledger
        self._share = share
        self._burst_seconds = burst_seconds
        self._chunk_seconds = chunk_seconds
        self._resume_seconds = max(chunk_seconds, sync_interval)
        self._lock = trio.StrictFIFOLock()
        self._changed = trio.Event()
        self._counters = _Counters()
        self._local_unreported = 0.0
        self._started_at: float | None = None
        self._buckets: dict[str, _Bucket] = {}
        self._rates_for: tuple[float, float, ThrottleConfig] | None = None
        self._exhausted = False

    # --- settings -------------------------------------------------------------------

    @property
    def config(self) -> ThrottleConfig:
        return self._config

    @property
    def stored_bytes(self) -> float:
        return self._stored

    @property
    def share(self) -> float:
        return self._share

    @property
    def ledger(self) -> CreditLedger:
        """The ledger, advanced to now (created on first use if none was given)."""
        self._sync(trio.current_time())
        assert self._ledger is not None
        return self._ledger

    def set_config(self, config: ThrottleConfig) -> None:
        """Apply new settings from now on (``initial_balance`` only affects new ledgers)."""
        now = trio.current_time()
        self._sync(now)
        if config.mode is not self._config.mode:
            log.info("throughput mode changed: %s -> %s", self._config.mode, config.mode)
        self._config = config
        self._sync(now)
        self._wake()

    def set_stored_bytes(self, stored_bytes: float) -> None:
        """Apply a new stored size (re-measured periodically) from now on."""
        if stored_bytes < 0:
            raise ValueError(f"stored_bytes must be >= 0, got {stored_bytes}")
        now = trio.current_time()
        self._sync(now)
        self._stored = float(stored_bytes)
        self._sync(now)
        self._wake()

    def set_share(self, fraction: float) -> None:
        """Let this mount use ``fraction`` (0 < fraction <= 1) of the filesystem's limits."""
        self._check_share(fraction)
        now = trio.current_time()
        self._sync(now)
        self._share = fraction
        self._sync(now)
        self._wake()

    def set_balance(self, balance: float) -> None:
        """Replace the credit balance as of now (e.g. with the one read from the bucket)."""
        if balance < 0:
            raise ValueError(f"balance must be >= 0, got {balance}")
        now = trio.current_time()
        self._sync(now)
        assert self._ledger is not None
        self._ledger.balance = min(balance, credit_cap(self._stored))
        self._sync(now)
        self._wake()

    def record_remote(self, metered: float) -> None:
        """Spend credits for ``metered`` bytes that other mounts of the filesystem used."""
        if metered < 0:
            raise ValueError(f"metered bytes must be >= 0, got {metered}")
        self._sync(trio.current_time(), metered)
        self._wake()

    def drain_local_metered(self) -> float:
        """Metered bytes used by this mount since the last call (for heartbeats)."""
        value, self._local_unreported = self._local_unreported, 0.0
        return value

    # --- rates ----------------------------------------------------------------------

    def permitted_bps(self) -> float:
        """The filesystem's permitted metered rate now (EFS ``PermittedThroughput``)."""
        self._sync(trio.current_time())
        return self._permitted()

    def rate_bps(self) -> float:
        """This mount's metered rate now: the permitted rate times its share."""
        return self.permitted_bps() * self._share

    # --- pacing ---------------------------------------------------------------------

    async def acquire(self, kind: OpKindLike, nbytes: int) -> float:
        """Wait until a request of ``nbytes`` may proceed; return its metered bytes.

        Cancellation is safe: chunks not yet granted are not charged.
        """
        op = OpKind(kind)
        total_metered = metered_bytes(op, nbytes, self._config.read_discount)
        if not self._lock.locked() and self._grant_at_once(op, nbytes, total_metered):
            return total_metered
        return await self._acquire_paced(op, nbytes, total_metered)

    def grant_now(self, kind: OpKindLike, nbytes: int) -> bool:
        """Grant a request now if `acquire` would grant it without waiting (nobody
        queued ahead, one chunk, every token there), with the same pacing and
        counting; False: the caller awaits `acquire`. Most requests (every one not
        throttled) are granted here, which spares them acquire's coroutine."""
        if self._lock.locked():
            return False
        op = kind if isinstance(kind, OpKind) else OpKind(kind)
        return self._grant_at_once(
            op, nbytes, metered_bytes(op, nbytes, self._config.read_discount)
        )

    async def _acquire_paced(self, op: OpKind, nbytes: int, total_metered: float) -> float:
        """`acquire` in chunks, in FIFO order, waiting for the tokens of each."""
        remaining_raw = nbytes
        remaining_metered = total_metered
        first = True
        while first or remaining_raw > 0:
            async with self._lock:
                self._sync(trio.current_time())
                chunk_raw = self._chunk_size(op, nbytes, total_metered, remaining_raw)
                if chunk_raw >= remaining_raw:
                    chunk_raw, chunk_metered = remaining_raw, remaining_metered
                else:
                    chunk_metered = total_metered * chunk_raw / nbytes
                costs = self._costs(op, chunk_raw, chunk_metered, first)
                await self._wait_for(costs)
                self._grant(op, costs, chunk_raw, chunk_metered, first, trio.current_time())
            remaining_raw -= chunk_raw
            remaining_metered -= chunk_metered
            first = False
        return total_metered

    def _grant_at_once(self, op: OpKind, nbytes: int, total_metered: float) -> bool:
        """Grant a request that nobody is queued ahead of, that fits in one chunk and
        whose tokens are all there: what the locked path would do without waiting, minus
        its two trips through the scheduler (most requests, every one not throttled).
        Nothing here awaits, so no other task can come between the check and the grant,
        and one reading of the clock serves the whole of it."""
        now = trio.current_time()
        self._sync(now)
        # A request of at most MIN_OP_BYTES is always one chunk (a chunk is never less).
        if nbytes > MIN_OP_BYTES and self._chunk_size(op, nbytes, total_metered, nbytes) < nbytes:
            return False
        costs = self._costs(op, nbytes, total_metered, True)
        if self._max_wait(costs, now) > _EPSILON_SECONDS:
            return False
        self._grant(op, costs, nbytes, total_metered, True, now)
        return True

    def _chunk_size(self, op: OpKind, nbytes: int, total_metered: float, remaining: int) -> int:
        """The next chunk of a request, at the bucket rates of the caller's last sync."""
        if nbytes == 0:
            return 0
        metered_per_raw = total_metered / nbytes
        raw_rate = min(
            self._buckets["metered"].rate / metered_per_raw,
            self._buckets["client"].rate,
            self._buckets[self._elastic_bucket(op)].rate
            if self._config.mode is ThroughputMode.ELASTIC
            else math.inf,
        )
        chunk = max(MIN_OP_BYTES, int(raw_rate * self._chunk_seconds))
        # Do not leave a sliver for a final chunk of its own.
        return remaining if remaining - chunk < MIN_OP_BYTES else chunk

    def _costs(
        self, op: OpKind, chunk_raw: int, chunk_metered: float, first: bool
    ) -> dict[str, float]:
        costs = {"metered": chunk_metered, "client": float(chunk_raw)}
        if first:
            costs[self._iops_bucket(op)] = 1.0
        if self._config.mode is ThroughputMode.ELASTIC:
            costs[self._elastic_bucket(op)] = float(chunk_raw)
        return costs

    def _max_wait(self, costs: dict[str, float], now: float) -> float:
        """How long until every bucket holds its cost (the caller has synced to now)."""
        buckets = self._buckets
        wait = 0.0
        for name, c in costs.items():
            w = buckets[name].wait_seconds(c, now)
            if w > wait:
                wait = w
        return wait

    async def _wait_for(self, costs: dict[str, float]) -> None:
        while True:
            now = trio.current_time()
            self._sync(now)
            wait = self._max_wait(costs, now)
            if wait <= _EPSILON_SECONDS:
                return
            # Sleep until the tokens are there, or until the settings change (which may
            # raise the rate), then look again.
            with trio.move_on_at(now + wait):
                await self._changed.wait()

    def _grant(
        self,
        op: OpKind,
        costs: dict[str, float],
        chunk_raw: int,
        chunk_metered: float,
        first: bool,
        now: float,
    ) -> None:
        for name, cost in costs.items():
            self._buckets[name].take(cost, now)
        c = self._counters
        c.metered += chunk_metered
        c.total += chunk_raw
        if op is OpKind.READ:
            c.data_read += chunk_raw
        elif op is OpKind.WRITE:
            c.data_write += chunk_raw
        else:
            c.metadata += chunk_raw
        if first:
            self._count_op(op, now)
        self._local_unreported += chunk_metered
        self._sync(now, chunk_metered)

    # --- metrics --------------------------------------------------------------------

    def snapshot(self) -> dict[str, float]:
        """The EFS metrics, keyed by their EFS names (:data:`METRIC_NAMES`).

        The byte counters are this mount's cumulative totals since it started;
        PermittedThroughput and BurstCreditBalance are the filesystem's (shared) values;
        PercentIOLimit is the busier of the read and write IOPS ceilings over the last
        minute, in percent of this mount's share.
        """
        now = trio.current_time()
        self._sync(now)
        assert self._ledger is not None
        c = self._counters
        return {
            "MeteredIOBytes": c.metered,
            "TotalIOBytes": c.total,
            "DataReadIOBytes": c.data_read,
            "DataWriteIOBytes": c.data_write,
            "MetadataIOBytes": c.metadata,
            "PermittedThroughput": self._permitted(),
            "BurstCreditBalance": self._ledger.balance,
            "PercentIOLimit": self._percent_io_limit(now),
        }

    def _count_op(self, op: OpKind, now: float) -> None:
        second = math.floor(now)
        window = self._counters.ops_window
        if not window or window[-1][0] != second:
            window.append([second, 0, 0])
            while window[0][0] <= second - IOPS_WINDOW_SECONDS:
                window.popleft()
        window[-1][2 if op is OpKind.WRITE else 1] += 1

    def _percent_io_limit(self, now: float) -> float:
        assert self._started_at is not None
        second = math.floor(now)
        reads = writes = 0
        for sec, r, w in self._counters.ops_window:
            if sec > second - IOPS_WINDOW_SECONDS:
                reads += r
                writes += w
        span = min(float(IOPS_WINDOW_SECONDS), max(1.0, now - self._started_at))
        read_limit = self._config.read_iops * self._share * span
        write_limit = self._config.write_iops * self._share * span
        return min(100.0, 100.0 * max(reads / read_limit, writes / write_limit))

    # --- internals ------------------------------------------------------------------

    @staticmethod
    def _check_share(fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"share must be in (0, 1], got {fraction}")

    @staticmethod
    def _iops_bucket(op: OpKind) -> str:
        return "write_iops" if op is OpKind.WRITE else "read_iops"

    @staticmethod
    def _elastic_bucket(op: OpKind) -> str:
        return "elastic_read" if op is OpKind.READ else "elastic_write"

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _permitted(self) -> float:
        assert self._ledger is not None
        balance = 0.0 if self._exhausted else self._ledger.balance
        return permitted_bps(self._config, self._stored, balance)

    def _update_exhausted(self) -> None:
        assert self._ledger is not None
        balance = self._ledger.balance
        if not self._exhausted and balance <= 0:
            self._exhausted = True
            log.warning(
                "burst credits exhausted: throughput held to the baseline %.1f MiB/s",
                baseline_bps(self._stored) / MiB,
            )
        elif self._exhausted and balance >= burst_bps(self._stored) * self._resume_seconds:
            self._exhausted = False
            log.info(
                "burst credits available again (%.0f MiB): up to %.1f MiB/s",
                balance / MiB,
                burst_bps(self._stored) / MiB,
            )

    def _sync(self, now: float, metered: float = 0.0) -> None:
        """Bring the ledger to ``now`` (spending ``metered``) and set the bucket rates."""
        if self._ledger is None:
            self._ledger = CreditLedger.new(now, self._stored, self._config.initial_balance)
        if self._started_at is None:
            self._started_at = now
        if self._config.mode is ThroughputMode.BURSTING:
            self._ledger.advance(now, metered, self._stored)
            self._update_exhausted()
        else:
            self._ledger.touch(now)
        permitted = self._permitted()
        cfg = self._config
        key = (permitted, self._share, cfg)
        if key == self._rates_for:
            return  # the rates stand (a sync on every grant: most find nothing changed)
        self._rates_for = key
        rates = {
            "metered": permitted * self._share,
            "client": cfg.per_client_ceiling_bps,
            "read_iops": cfg.read_iops * self._share,
            "write_iops": cfg.write_iops * self._share,
            "elastic_read": cfg.elastic_read_bps * self._share,
            "elastic_write": cfg.elastic_write_bps * self._share,
        }
        for name, rate in rates.items():
            bucket = self._buckets.get(name)
            if bucket is None:
                min_capacity = 1.0 if name.endswith("_iops") else float(MIN_OP_BYTES)
                self._buckets[name] = _Bucket(rate, self._burst_seconds, min_capacity, now)
            elif bucket.rate != rate:
                bucket.set_rate(rate, now)
