"""Heartbeats: the `clients/<client id>` objects that tell which mounts are alive, how far
each has applied the log, and what each still reads.

This module owns the `clients/` prefix, the typed `Heartbeat` record and its encoding (a
metadata envelope of kind H), and reading, writing and deleting them. Every mount
rewrites its own every few seconds (efsish.filesystem); gc reads them to know which
blocks and log entries it may delete, metering to share the throughput, the commit path
to make room for a starving mount, and `efsish status` to show them.

It must not decide what to do with them, and must not import the filesystem or gc.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from efsish import codec
from efsish.errors import CorruptObject, NotFound, StoreError
from efsish.store import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "clients/"
# Seconds without a new heartbeat after which a mount counts as crashed.
EXPIRE = 120.0


def key(client: str) -> str:
    return f"{PREFIX}{client}"


@dataclass
class Heartbeat:
    """One mount's heartbeat. Fields an older efsish did not write read as their
    defaults; fields a newer one adds are ignored."""

    client: str
    t: int  # the writer's wall clock, ns, when written
    host: str = "?"
    mountpoint: str = "?"
    version: str = "?"
    pid: int = 0
    applied_seq: int = 0  # the log position the mount has applied
    starving: bool = False  # it keeps losing the race for the next log position
    held: list[str] = field(default_factory=list)  # blocks it may read that the log dropped
    metered_total: float = 0.0  # bytes metered by its throttle since it started
    started: int = 0  # ns
    nudge: str | None = None  # "host:port" it takes nudges on (efsish.meta.nudge), if any
    # The format the mount runs (2, 3) and the newest one its efsish knows; 0: not said
    # (an efsish from before these fields, which `efsish upgrade` counts as format 2).
    format: int = 0
    newest_format: int = 0
    # Lease mode: the domains it holds (their roots' paths), and its local journal: the
    # changes answered but not yet in the log, and the writer's wall clock (ns) at the
    # oldest of them (0: none).
    domains: list[str] = field(default_factory=list)
    journal_rows: int = 0
    journal_oldest: int = 0
    # Lease mode: the incarnation that wrote it (0: not said). With `applied_seq` it
    # acknowledges a change of the top that ended this mount's share (LEASES.md §17)
    # when nudges do not get through.
    inc: int = 0

    def journal_age(self, now_ns: int | None = None) -> float:
        """Seconds since the oldest uncommitted change, by the reader's wall clock (0:
        none)."""
        if not self.journal_rows or not self.journal_oldest:
            return 0.0
        return max(
            0.0, ((time.time_ns() if now_ns is None else now_ns) - self.journal_oldest) / 1e9
        )

    def age(self, now_ns: int | None = None) -> float:
        """Seconds since it was written, by the reader's wall clock."""
        return ((time.time_ns() if now_ns is None else now_ns) - self.t) / 1e9

    def live(self, now_ns: int | None = None) -> bool:
        return self.age(now_ns) < EXPIRE

    def wire(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "host": self.host,
            "mountpoint": self.mountpoint,
            "version": self.version,
            "pid": self.pid,
            "applied_seq": self.applied_seq,
            "starving": self.starving,
            "held": list(self.held),
            "metered_total": self.metered_total,
            "t": self.t,
            "started": self.started,
            "nudge": self.nudge,
            "format": self.format,
            "newest_format": self.newest_format,
            "domains": list(self.domains),
            "journal_rows": self.journal_rows,
            "journal_oldest": self.journal_oldest,
            "inc": self.inc,
        }

    @classmethod
    def unwire(cls, d: Any) -> Heartbeat:
        if not isinstance(d, Mapping):
            raise CorruptObject("a heartbeat must be an object")
        try:
            return cls(
                client=str(d["client"]),
                t=int(d["t"]),
                host=str(d.get("host", "?")),
                mountpoint=str(d.get("mountpoint", "?")),
                version=str(d.get("version", "?")),
                pid=int(d.get("pid", 0)),
                applied_seq=int(d.get("applied_seq", 0)),
                starving=bool(d.get("starving", False)),
                held=[str(k) for k in d.get("held", [])],
                metered_total=float(d.get("metered_total", 0.0)),
                started=int(d.get("started", 0)),
                nudge=None if d.get("nudge") is None else str(d["nudge"]),
                format=int(d.get("format", 0)),
                newest_format=int(d.get("newest_format", 0)),
                domains=[str(p) for p in d.get("domains", [])],
                journal_rows=int(d.get("journal_rows", 0)),
                journal_oldest=int(d.get("journal_oldest", 0)),
                inc=int(d.get("inc", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptObject(f"malformed heartbeat: {e!r}") from None


async def write(store: ObjectStore, hb: Heartbeat) -> None:
    await store.put(key(hb.client), codec.encode_json(b"H", hb.wire()))


async def read(store: ObjectStore, client: str) -> Heartbeat | None:
    """The heartbeat of mount `client`, or None if it has none (unmounted, or never
    published one). Store errors and CorruptObject as they come."""
    try:
        blob = await store.get(key(client))
    except NotFound:
        return None
    return Heartbeat.unwire(codec.decode_json(b"H", blob, key(client)))


async def delete(store: ObjectStore, client: str) -> None:
    await store.delete(key(client))


async def read_all(
    store: ObjectStore, *, exclude: str | None = None, strict: bool = False
) -> list[Heartbeat]:
    """Every mount's heartbeat but `exclude`'s. Keys not of the form `clients/<id>` are
    not heartbeats of this filesystem and are skipped. One that cannot be read twice (a
    GET carries no checksum) is skipped with a warning, or, if `strict` (gc), stops the
    caller: gc must not delete blocks a live mount may still hold or be about to use."""
    out: list[Heartbeat] = []
    async for info in store.list(PREFIX):
        client = info.key[len(PREFIX) :]
        if not client or "/" in client or client == exclude:
            continue
        for attempt in (1, 2):
            try:
                out.append(
                    Heartbeat.unwire(codec.decode_json(b"H", await store.get(info.key), info.key))
                )
                break
            except NotFound:
                break  # unmounted since the listing
            except CorruptObject as e:
                if attempt == 1:
                    continue
                if strict:
                    raise CorruptObject(
                        f"heartbeat {info.key} cannot be read ({e}): gc cannot tell what "
                        "that mount still uses, so it deleted nothing. If no mount with that "
                        "id is running, delete that object and run gc again"
                    ) from None
                log.warning("ignoring unreadable heartbeat %s: %s", info.key, e)
            except StoreError as e:
                if strict:
                    raise
                log.debug("skipping heartbeat %s: %s", info.key, e)
                break
    return out
