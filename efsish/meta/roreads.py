"""Close-to-open for read-only mounts in domains another mount holds (docs/design/
LEASES.md §6.4, reads).

A read-only mount (`-o ro`) writes nothing to the bucket, so it cannot recall a lease:
the holder's changes reach the log up to `commit_interval` after it answered them.
Before a read (lookup, open, opendir, getattr) of an inode in a domain its view says
another mount holds, this mount asks that holder over the nudge channel
(efsish.meta.nudge: the filesystem's key, which read-only credentials can read; the
holder's address from its heartbeat) to flush its journal: a `flush:<nonce>` datagram,
answered to its source with `flushed:<nonce>` and a log position at or below which every
change the holder answered before it got the request is. The mount catches up to that
position, then reads the head as every read does.

Rules:
- close-to-open needs the answer to a request sent after the read began: a read joins
  the request outstanding for its holder only if that one was sent after the read
  began; otherwise it waits for it to end and shares the next one. So one request per
  holder is outstanding at a time, and concurrent reads share it.
- no answer within ASK_WAIT (the datagram resent once after RESEND_AFTER): the read
  goes on with what the log has, as before (up to about `commit_interval` behind the
  holder), and the next QUIET reads of that holder do not ask. Logged once per holder,
  naming what to check.
- a holder without a nudge address, whose heartbeat is missing or expired, or a
  filesystem without a nudge key: no request (logged once).

It is not a lease: nothing here is authoritative, only faster than the poll. This
module must not import the filesystem.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from efsish.errors import EfsishError, NotFound
from efsish.meta import heartbeat, nudge
from efsish.meta.heartbeat import Heartbeat
from efsish.meta.log import MetaLog
from efsish.meta.nudge import Nudge, Nudger
from efsish.meta.view import View

log = logging.getLogger(__name__)

# Seconds a read waits for a holder's answer. An answer costs a UDP round trip plus the
# holder's flush: a PUT (20-100 ms on a distant store) after the staged uploads its
# journal references, which its backpressure keeps to about commit_interval. Past a
# second a read has waited about as long as the fallback (the log, up to commit_interval
# behind) is stale, so waiting longer buys little.
ASK_WAIT = 1.0
RESEND_AFTER = 0.25  # a lost datagram: send the same request once more
QUIET = 5.0  # after an unanswered request, reads of that holder do not ask for this long
PEER_TTL = 60.0  # seconds a holder's heartbeat is trusted for its address
KEY_RETRY = 60.0  # seconds before reading the nudge key again after it was missing


@dataclass
class _Holder:
    """What this mount asked of one holder (a client id)."""

    sent: int = 0  # requests sent
    answered: int = 0  # the newest request answered...
    pos: int = 0  # ... and the newest position an answer named
    missed: int = 0  # the newest request not answered in time
    busy: trio.Event | None = None  # set when the outstanding request ends
    quiet_until: float = 0.0  # trio time
    hb: tuple[float, Heartbeat | None] | None = None  # (trio time read, heartbeat)
    warned: bool = False


class RoReads:
    """The read barrier of a read-only mount of a lease filesystem. See the module
    docstring. `nursery` is set when the mount starts; until then nothing is asked."""

    def __init__(self, meta: MetaLog, where: str) -> None:
        self.meta = meta
        self.where = where  # -o nudge=auto|off|HOST:PORT: where answers come back
        self.nursery: trio.Nursery | None = None
        self._holders: dict[str, _Holder] = {}
        self._held: dict[int, str] = {}  # domain -> holder client, as of `_held_at`
        self._held_at = -1
        self._endpoint: Nudger | None = None
        self._endpoint_lock = trio.Lock()
        self._key_retry_at = 0.0
        self._no_key_warned = False
        self._answers: dict[str, tuple[str, list[int], trio.Event]] = {}
        self.requests = 0  # requests sent to holders (a resend is the same request)

    async def barrier(self, ino: int, head: Callable[[], Awaitable[None]] | None) -> None:
        """Before a read of `ino`: ask the holders of its domains (other mounts) to flush
        and catch up to their answers; `head` (the usual catch-up to the head) once. A
        domain found held by another mount after the head was read is asked too."""
        asked: set[str] = set()
        caught = head is None
        while True:
            holders = await self._holders_of(ino) - asked
            if holders:
                asked |= holders
                for client in sorted(holders):
                    pos = await self.ask(client)
                    if pos is not None:
                        try:
                            await self.meta.catch_up(upto=pos)
                        except EfsishError as e:
                            log.warning("catch-up failed, serving possibly stale metadata: %s", e)
                continue
            if not caught:
                caught = True
                assert head is not None
                await head()
                continue
            return

    async def _holders_of(self, ino: int) -> set[str]:
        """The other mounts that hold a domain of `ino` in the view (no query of the
        inode's domains while nobody holds one)."""
        seq = self.meta.applied_seq
        if self._held_at != seq:
            held = await self.meta.read(_held)  # the view at seq or later
            self._held, self._held_at = held, seq
        if not self._held:
            return set()
        me = self.meta.client_id
        out = {self._held.get(d) for d in await self.meta.domains(ino) if d is not None}
        return {c for c in out if c is not None and c != me}

    async def ask(self, client: str) -> int | None:
        """A log position at or below which every change `client` answered before this
        call is, or None if it cannot be had in time (read what the log has)."""
        h = self._holders.setdefault(client, _Holder())
        need = h.sent + 1  # an answer to a request sent from now on
        while h.answered < need:
            if h.missed >= need or trio.current_time() < h.quiet_until:
                return None
            if h.busy is not None:
                await h.busy.wait()  # if sent before this read began, share the next one
                continue
            h.busy = trio.Event()
            try:
                gen, pos = await self._request(client, h)
            finally:
                h.busy.set()
                h.busy = None
            if pos is None:
                h.missed = gen
                h.quiet_until = trio.current_time() + QUIET
            else:
                h.answered, h.pos = gen, max(h.pos, pos)
        return h.pos

    async def _request(self, client: str, h: _Holder) -> tuple[int, int | None]:
        """Send one request to `client` and wait for its answer: (its number, counted
        when its datagram went out, with no await before; the answer's position or
        None)."""
        ep = await self._nudger()
        hb = await self._heartbeat(client, h) if ep is not None else None
        h.sent += 1
        gen = h.sent
        if ep is None or hb is None:
            return gen, None
        nonce = secrets.token_hex(8)
        got: list[int] = []
        done = trio.Event()
        self._answers[nonce] = (client, got, done)
        self.requests += 1
        try:
            with trio.move_on_after(ASK_WAIT):
                for wait in (RESEND_AFTER, ASK_WAIT):
                    if not ep.nudge(hb, self.meta.applied_seq, nudge.FLUSH + nonce):
                        break
                    with trio.move_on_after(wait):
                        await done.wait()
                    if done.is_set():
                        break
        finally:
            del self._answers[nonce]
        if got:
            return gen, got[0]
        h.hb = None  # its address may have changed: read the heartbeat again next time
        self._warn(
            h,
            f"mount {client} (holding a domain this read-only mount reads) did not "
            f"answer a request to flush its journal within {ASK_WAIT:.1f}s: reads there "
            f"show the log, up to its commit_interval behind; check that UDP from this "
            f"machine reaches {hb.nudge} (firewall)",
        )
        return gen, None

    def _answered(self, n: Nudge) -> None:
        """An answer (from the Nudger, synchronously)."""
        hit = self._answers.get(n.rid.removeprefix(nudge.FLUSHED))
        if hit is not None and hit[0] == n.sender and not hit[2].is_set():
            hit[1].append(n.seq)
            hit[2].set()

    async def _heartbeat(self, client: str, h: _Holder) -> Heartbeat | None:
        """`client`'s heartbeat if it takes nudges and is alive (one that does is read
        again after PEER_TTL), else None (logged once)."""
        now = trio.current_time()
        if h.hb is None or now - h.hb[0] >= PEER_TTL:
            try:
                h.hb = (now, await heartbeat.read(self.meta.store, client))
            except EfsishError as e:
                log.debug("no request to flush to %s: its heartbeat cannot be read (%s)", client, e)
                return None
        hb = h.hb[1]
        if hb is None or hb.nudge is None or hb.age() > heartbeat.EXPIRE:
            h.hb = None  # read again at the next request (a mount starting, restarted)
            why = (
                "has no heartbeat"
                if hb is None
                else "takes no nudges"
                if hb.nudge is None
                else f"has not written its heartbeat for {hb.age():.0f}s"
            )
            self._warn(
                h,
                f"mount {client} (holding a domain this read-only mount reads) {why}: "
                "reads there show the log, up to its commit_interval behind",
            )
            return None
        return hb

    async def _nudger(self) -> Nudger | None:
        """The UDP endpoint requests go out from and answers come back to, made at the
        first request (None: `-o nudge=off`, no key in the bucket yet, no socket)."""
        async with self._endpoint_lock:
            if self._endpoint is not None or self.nursery is None:
                return self._endpoint
            if trio.current_time() < self._key_retry_at:
                return None
            self._key_retry_at = trio.current_time() + KEY_RETRY
            try:
                bind = await nudge.resolve_bind(self.where, self.meta.store)
                if bind is None:
                    return None
                key = await nudge.load_key(self.meta.store, create=False)
                ep = Nudger(
                    key,
                    self.meta.sb.fs_uuid,
                    self.meta.client_id,
                    bind,
                    applied=lambda: self.meta.applied_seq,
                    on_wake=lambda n: None,
                    on_flushed=self._answered,
                )
            except NotFound:
                if not self._no_key_warned:
                    self._no_key_warned = True
                    log.warning(
                        "no nudge key in the bucket (no mount takes nudges): reads in "
                        "domains other mounts hold show the log, up to their "
                        "commit_interval behind"
                    )
                return None
            except (EfsishError, OSError) as e:
                log.warning("read-only mount: no requests to flush to holders (%s)", e)
                return None
            await self.nursery.start(ep.serve)
            self._endpoint = ep
            return ep

    def _warn(self, h: _Holder, message: str) -> None:
        if not h.warned:
            h.warned = True
            log.warning("%s", message)


def _held(view: View) -> dict[int, str]:
    """domain -> holder client of every held domain."""
    return {
        int(d): str(c)
        for d, c in view.db.execute(
            "SELECT domain, holder_client FROM leases WHERE holder_client IS NOT NULL"
        )
    }
