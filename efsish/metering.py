"""Glue between the EFS throughput model (efsish.throttle) and the bucket: one credit
balance and one permitted rate for the whole filesystem, shared by every mount.

- throttle/config: the throughput mode and provisioned rate (`efsish config` writes it;
  live mounts re-read it every few seconds). Absent: the superblock's format-time values.
- throttle/ledger: the credit balance on wall-clock time, written by mounts every
  LEDGER_EVERY seconds, so a restart (of one mount or all) never resets the balance.
- Each mount publishes its cumulative metered bytes in its heartbeat; every SYNC seconds
  a mount reads the others' heartbeats, charges their new metered bytes to its copy of
  the ledger, and takes an equal share of the permitted rate with the mounts that were
  active, so two busy mounts together get the filesystem's rate, not twice it.
- The EFS metrics are written every second to a small JSON file next to the mount's
  registry entry (read by `efsish stats`) and, optionally, served to Prometheus.

This module must not import pyfuse3 and does no pacing arithmetic of its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from efsish import codec
from efsish.errors import CorruptObject, NotFound, StoreError
from efsish.meta.heartbeat import Heartbeat
from efsish.meta.superblock import Superblock
from efsish.pacer import Throttle
from efsish.store import ObjectStore
from efsish.throttle import (
    METRIC_NAMES,
    CreditLedger,
    MiB,
    OpKindLike,
    ThrottleConfig,
    ThroughputMode,
)

log = logging.getLogger(__name__)

CONFIG_KEY = "throttle/config"
LEDGER_KEY = "throttle/ledger"
SYNC = 2.0
LEDGER_EVERY = 15.0
CONFIG_EVERY = 5.0
CLIENT_EXPIRE = 120.0
# A lease mount's state (docs/design/LEASES.md), exported next to the EFS metrics (0 on
# a mount that holds no leases).
LEASE_METRICS = {
    "LeasesHeld": "lease domains this efsish mount holds",
    "JournalRows": "changes answered by this mount but not yet committed to the log",
    "JournalOldestAgeSeconds": "age of the oldest change not yet committed to the log",
}
# How the FUSE adapter's polling after each reply went (-o busy_poll; 0 when it is off).
FUSE_METRICS = {
    "FuseRequestsPolled": "FUSE requests this mount read while polling after a reply",
    "FusePollsIdle": "polls after a reply that found no request within busy_poll",
    "FusePollIdleSeconds": "time spent in polls that found no request",
    "FusePollWindowMicroseconds": "how long a poll after a reply lasts now (0: off)",
}


def config_from_dict(d: dict[str, Any]) -> ThrottleConfig:
    mode = ThroughputMode(str(d.get("mode", "bursting")))
    mibps = float(d.get("provisioned_mibps", 0) or 0)
    initial = d.get("initial_balance")
    return ThrottleConfig(
        mode=mode,
        provisioned_bps=mibps * MiB,
        initial_balance=float(initial) if initial is not None else None,
    )


async def load_config(store: ObjectStore, sb: Superblock) -> tuple[ThrottleConfig, dict[str, Any]]:
    try:
        raw = codec.decode_json(b"T", await store.get(CONFIG_KEY), CONFIG_KEY)
    except NotFound:
        raw = {"mode": sb.throughput_mode, "provisioned_mibps": sb.provisioned_mibps}
    return config_from_dict(raw), raw


async def write_config(
    store: ObjectStore,
    sb: Superblock,
    *,
    mode: str | None,
    provisioned_mibps: float | None,
    initial_balance: float | None = None,
) -> dict[str, Any]:
    """Change the throughput settings of a filesystem (takes effect on live mounts)."""
    _, raw = await load_config(store, sb)
    new = dict(raw)
    if mode is not None:
        new["mode"] = mode
    if provisioned_mibps is not None:
        new["provisioned_mibps"] = provisioned_mibps
    if initial_balance is not None:
        new["initial_balance"] = initial_balance
        await store.delete(LEDGER_KEY)  # test/benchmark override: start a new balance
    config_from_dict(new)  # validate before writing
    new["changed"] = time.time_ns()
    await store.put(CONFIG_KEY, codec.encode_json(b"T", new))
    return new


async def load_ledger(store: ObjectStore) -> tuple[float, float, dict[str, float]] | None:
    """(balance, wall-clock seconds it was valid at, metered totals of each mount already
    charged to it), or None for a new filesystem."""
    try:
        d = codec.decode_json(b"T", await store.get(LEDGER_KEY), LEDGER_KEY)
        seen = {str(k): float(v) for k, v in dict(d.get("seen", {})).items()}
        return float(d["balance"]), float(d["wall"]), seen
    except NotFound:
        return None
    except (CorruptObject, KeyError, ValueError, TypeError) as e:
        log.error("credit ledger is unreadable (%s); starting from a full balance", e)
        return None


class Metering:
    """A mount's throttle, kept in step with the filesystem's shared balance."""

    def __init__(
        self,
        store: ObjectStore,
        sb: Superblock,
        client_id: str,
        stats_file: Path | None = None,
        prometheus_port: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.store = store
        self.read_only = read_only  # paced by its own copy of the balance, never saved
        self.sb = sb
        self.client_id = client_id
        self.stats_file = stats_file
        self.prometheus_port = prometheus_port
        self.throttle: Throttle | None = None
        self.metered_total = 0.0
        self.stored_bytes = 0
        self.client_connections = 1
        self._seen: dict[str, float] = {}
        self._raw_config: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}
        # More metrics of the mount: LEASE_METRICS from the filesystem, FUSE_METRICS
        # from the FUSE adapter (each adds its source).
        self.extra: list[Callable[[], dict[str, float]]] = []

    async def start(self, nursery: trio.Nursery, stored_bytes: int) -> None:
        config, self._raw_config = await load_config(self.store, self.sb)
        self.stored_bytes = stored_bytes
        now = trio.current_time()
        saved = await load_ledger(self.store)
        if saved is None:
            ledger = CreditLedger.new(now, stored_bytes, config.initial_balance)
        else:
            balance, wall, seen = saved
            # Usage of other mounts up to these totals is already in the balance: charge
            # only what they metered since (the first sync), so all copies agree.
            self._seen.update(seen)
            # Credits accrue for the time no mount was running, as on EFS.
            ledger = CreditLedger(balance=balance, updated_at=now - max(0.0, time.time() - wall))
        self.throttle = Throttle(config, stored_bytes, ledger=ledger, sync_interval=SYNC)
        if self.prometheus_port:
            self._start_prometheus(self.prometheus_port)
        nursery.start_soon(self._loop)

    async def acquire(self, kind: OpKindLike, nbytes: int) -> None:
        t = self.throttle
        if t is not None and not t.grant_now(kind, nbytes):
            await t.acquire(kind, nbytes)

    def drain_metered(self) -> float:
        """The bytes metered by this mount since it started (for its heartbeat)."""
        if self.throttle is not None:
            self.metered_total += self.throttle.drain_local_metered()
        return self.metered_total

    def metrics(self) -> dict[str, float]:
        """The EFS metrics (CloudWatch names) as this mount sees them now."""
        if self.throttle is None:
            return {}
        m = self.throttle.snapshot()
        m["ClientConnections"] = float(self.client_connections)
        m["StorageBytes"] = float(self.stored_bytes)
        for source in self.extra:
            m.update(source())
        return m

    async def _loop(self) -> None:
        last_ledger = last_config = time.monotonic()
        while True:
            await trio.sleep(1.0)
            try:
                await self._write_stats()
                if time.monotonic() - last_config >= CONFIG_EVERY:
                    last_config = time.monotonic()
                    await self._reload_config()
                if time.monotonic() - last_ledger >= LEDGER_EVERY:
                    last_ledger = time.monotonic()
                    await self._save_ledger()
            except StoreError as e:
                log.warning("metering: %s", e)

    async def sync(self, clients: list[Heartbeat], stored_bytes: int) -> None:
        """Charge other mounts' new metered bytes and re-divide the rate (every SYNC s)."""
        assert self.throttle is not None
        self.stored_bytes = stored_bytes
        self.throttle.set_stored_bytes(stored_bytes)
        remote = 0.0
        active_others = 0
        live = 1
        now_ns = time.time_ns()
        for hb in clients:
            cid = hb.client
            if cid == self.client_id:
                continue
            if hb.age(now_ns) > CLIENT_EXPIRE:
                continue
            live += 1
            total = hb.metered_total
            prev = self._seen.get(cid)
            self._seen[cid] = total
            if prev is not None and total > prev:
                remote += total - prev
                active_others += 1
        self.client_connections = live
        if remote:
            self.throttle.record_remote(remote)
        self.throttle.set_share(1.0 / (1 + active_others))

    async def _reload_config(self) -> None:
        assert self.throttle is not None
        config, raw = await load_config(self.store, self.sb)
        if raw != self._raw_config:
            self._raw_config = raw
            self.throttle.set_config(config)
            if raw.get("initial_balance") is not None and await load_ledger(self.store) is None:
                self.throttle.set_balance(float(raw["initial_balance"]))
            log.info("throughput settings changed: %s", raw)

    async def _save_ledger(self) -> None:
        assert self.throttle is not None
        if self.read_only:
            return
        self.throttle.permitted_bps()  # bring the ledger up to now
        balance = self.throttle.ledger.balance
        self.drain_metered()  # fold this mount's usage into metered_total
        seen = {**self._seen, self.client_id: self.metered_total}
        doc = {"balance": balance, "wall": time.time(), "client": self.client_id, "seen": seen}
        await self.store.put(LEDGER_KEY, codec.encode_json(b"T", doc))

    async def save(self) -> None:
        """Persist the balance now (at unmount)."""
        if self.throttle is not None:
            await self._save_ledger()

    async def _write_stats(self) -> None:
        m = self.metrics()
        for name, gauge in self._gauges.items():
            gauge.set(m.get(name, 0.0))
        if self.stats_file is None or not m:
            return
        doc = {
            "t": time.time(),
            "mode": str(self._raw_config.get("mode", "bursting")),
            "provisioned_mibps": self._raw_config.get("provisioned_mibps", 0),
            "share": self.throttle.share if self.throttle else 1.0,
            "metrics": m,
        }
        tmp = self.stats_file.with_suffix(".tmp")
        data = json.dumps(doc)

        def write() -> None:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(data)
            os.replace(tmp, self.stats_file)  # type: ignore[arg-type]

        await trio.to_thread.run_sync(write)

    def _start_prometheus(self, port: int) -> None:
        import prometheus_client

        registry = prometheus_client.CollectorRegistry()
        names = [*METRIC_NAMES, "ClientConnections", "StorageBytes"]
        for name in names:
            self._gauges[name] = prometheus_client.Gauge(
                name, f"EFS metric {name} of this efsish mount", registry=registry
            )
        for name, what in (LEASE_METRICS | FUSE_METRICS).items():
            self._gauges[name] = prometheus_client.Gauge(name, what, registry=registry)
        prometheus_client.start_http_server(port, addr="127.0.0.1", registry=registry)
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", port)
