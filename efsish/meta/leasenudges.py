"""The nudge wiring of a lease mount (docs/design/LEASES.md §11): listening for nudges
(the address goes in the mount's heartbeat), catching up to the position a nudge names,
and sending one to the holder when a recall lands and to the recaller when an answer
lands; and answering a read-only mount's request to flush the journal (LEASES.md §6.4,
reads): one flush per batch of requests, an empty journal answered at once. The channel
itself (key, datagrams, rate limits) is efsish.meta.nudge.

This module owns where nudges go and what one wakes. It must not decide anything from
a nudge: a nudge only makes this mount read the log sooner, and every wait it shortens
also ends by polling the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from efsish.errors import EfsishError, StoreError
from efsish.meta import heartbeat, nudge
from efsish.meta.heartbeat import Heartbeat
from efsish.meta.log import MetaLog
from efsish.meta.nudge import Nudge, Nudger

log = logging.getLogger(__name__)

ACK = nudge.ACK
PEER_TTL = 60.0  # seconds a heartbeat read to nudge its mount is trusted for its address
# Requests to flush waiting for the next flush, at most (more are dropped: those readers
# time out and read the log).
MAX_FLUSH_ASKS = 256


class Nudges:
    """One lease mount's nudges. See the module docstring."""

    def __init__(self, meta: MetaLog, where: str) -> None:
        self.meta = meta
        self.where = where  # -o nudge=auto|off|HOST:PORT
        self.client = meta.client_id
        self.nudger: Nudger | None = None
        # Where sends run: set once the lease mount has started (None: send none).
        self.nursery: trio.Nursery | None = None
        # client -> (time.monotonic() when read, its heartbeat or None): where to nudge it
        self._peers: dict[str, tuple[float, Heartbeat | None]] = {}
        self._catch = trio.Event()  # set by a nudge: the catch-up task runs
        self.woken = trio.Event()  # set (and replaced) by each nudge: recalls look
        self.seq = 0  # the highest position a valid nudge asked us to catch up to
        # Called with ((client, inc), seq) when a mount acknowledges it has applied our
        # change of the top up to `seq` (LEASES.md §17).
        self.on_ack: Callable[[tuple[str, int], int], None] | None = None
        # Flushes the journal for read-only mounts' requests (set by Leases; raises when
        # it cannot: the requests stay unanswered). (client, rid) -> where to answer.
        self.flush_journal: Callable[[], Awaitable[None]] | None = None
        self._asks: dict[tuple[str, str], Any] = {}
        self._asked = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen for nudges as `-o nudge=` says (§11), before the first heartbeat so
        that it advertises the address. Anything that keeps nudges from working is a
        warning, not a failure: without them, recalls wait for the next poll."""
        if self.nudger is not None:
            return
        bind = await nudge.resolve_bind(self.where, self.meta.store)
        if bind is None:
            return
        try:
            key = await nudge.load_key(self.meta.store)
        except StoreError as e:
            log.warning("nudges off (recalls wait for the next poll): %s", e)
            return
        try:
            nudger = Nudger(
                key,
                self.meta.sb.fs_uuid,
                self.client,
                bind,
                applied=lambda: self.meta.applied_seq,
                on_wake=self._woken,
                on_ack=self._ack,
                on_flush=self._flush_asked,
            )
        except OSError as e:
            log.warning(
                "nudges off (recalls wait for the next poll): cannot listen on %s (%s); "
                "give a free HOST:PORT with -o nudge=",
                nudge.format_address(*bind),
                e.strerror or e,
            )
            return
        self.nudger = nudger
        await nursery.start(nudger.serve)
        nursery.start_soon(self._catcher)
        nursery.start_soon(self._answerer)
        log.info("taking nudges on %s", nudger.address)

    @property
    def address(self) -> str | None:
        """Where this mount takes nudges ("host:port"), for its heartbeat; None if not."""
        return self.nudger.address if self.nudger is not None else None

    def peers_seen(self, others: list[Heartbeat]) -> None:
        """The other mounts' heartbeats, as the heartbeat task just read them: the
        addresses nudges go to (so a recall costs no request to find one)."""
        now = time.monotonic()
        self._peers = {hb.client: (now, hb) for hb in others}

    def _woken(self, n: Nudge) -> None:
        """A valid, new nudge (from the Nudger, synchronously): catch up now."""
        self.seq = max(self.seq, n.seq)
        self._catch.set()
        self.woken.set()
        self.woken = trio.Event()

    def _ack(self, n: Nudge) -> None:
        """A valid ack nudge (rid `ack:<inc>`): its sender applied the log up to n.seq."""
        try:
            inc = int(n.rid.removeprefix(ACK))
        except ValueError:
            return
        if self.on_ack is not None:
            self.on_ack((n.sender, inc), n.seq)

    def _flush_asked(self, n: Nudge, peer: Any) -> None:
        """A read-only mount asks that every change answered so far be in the log
        (§6.4, reads). With an empty journal it is: answered at once with the applied
        position, with no PUT. Otherwise the next flush answers it. Before the lease
        mount has started nothing is answered (the reader times out, reads the log)."""
        if self.flush_journal is None or self.nursery is None:
            return
        if not self.meta.journal_rows:
            self._answer(n.sender, n.rid, peer, self.meta.applied_seq)
        elif len(self._asks) < MAX_FLUSH_ASKS:
            self._asks[(n.sender, n.rid)] = peer
            self._asked.set()

    def _answer(self, client: str, rid: str, peer: Any, seq: int) -> None:
        if self.nudger is not None:
            self.nudger.answer(peer, client, seq, nudge.FLUSHED + rid.removeprefix(nudge.FLUSH))

    async def _answerer(self) -> None:
        """One flush of the journal (no lease op: the domains stay held) per batch of
        requests to flush; requests that come during it wait for the next one, since
        its entry may have been computed before they came."""
        while True:
            await self._asked.wait()
            self._asked = trio.Event()
            asks, self._asks = self._asks, {}
            if not asks or self.flush_journal is None:
                continue
            try:
                await self.flush_journal()
            except EfsishError as e:
                log.debug("not answering %d request(s) to flush: %s", len(asks), e)
                continue
            except Exception:
                log.exception("flushing for read-only mounts crashed; the mount keeps running")
                continue
            seq = self.meta.applied_seq  # every change answered before is at or below it
            for (client, rid), peer in asks.items():
                self._answer(client, rid, peer, seq)

    async def _catcher(self) -> None:
        """Catch up once per nudge, to the position it names and no further (no GET of
        the position after it): the holder meets the recall (and its reactor answers),
        a recaller the answer. The poll reads on to the head."""
        while True:
            await self._catch.wait()
            self._catch = trio.Event()
            try:
                await self.meta.catch_up(upto=self.seq)
            except EfsishError as e:
                log.debug("catch-up after a nudge: %s", e)
            except Exception:
                log.exception("catch-up after a nudge crashed; the mount keeps running")

    def send(self, client: str, seq: int, rid: str) -> bool:
        """Nudge mount `client` to catch up to `seq` (fire and forget). Whether it is
        likely to nudge back: this mount listens, and `client`'s newest heartbeat we
        read (if any) advertises an address."""
        if self.nudger is None or self.nursery is None or client == self.client:
            return False
        self.nursery.start_soon(self._nudge, self.nudger, client, seq, rid)
        hit = self._peers.get(client)
        return hit is None or (hit[1] is not None and hit[1].nudge is not None)

    async def _nudge(self, nudger: Nudger, client: str, seq: int, rid: str) -> None:
        peer = await self.peer(client)
        if peer is not None:
            nudger.nudge(peer, seq, rid)

    def peers(self) -> list[str]:
        """The clients whose heartbeats (read lately) advertise a nudge address."""
        return [c for c, (_, hb) in self._peers.items() if hb is not None and hb.nudge]

    async def peer(self, client: str) -> Heartbeat | None:
        """The newest heartbeat of `client` this mount has read: the heartbeat task's
        (every few seconds), else one GET of it, trusted for PEER_TTL either way."""
        now = time.monotonic()
        hit = self._peers.get(client)
        if hit is not None and now - hit[0] < PEER_TTL:
            return hit[1]
        try:
            hb = await heartbeat.read(self.meta.store, client)
        except StoreError as e:
            log.debug("no nudge to %s: its heartbeat cannot be read (%s)", client, e)
            return hit[1] if hit is not None else None
        self._peers[client] = (now, hb)
        return hb
