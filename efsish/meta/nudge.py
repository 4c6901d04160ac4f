"""Nudges: the direct channel between mounts (docs/design/LEASES.md §11).

A nudge is one UDP datagram that tells a mount "the log has something for you at or
after position `seq`; catch up now" (a recall, §6.4, or its answer). It carries no
authority: everything it could announce is read from the log, so a lost, late or
refused nudge costs only latency (the mount finds the same entry at its next poll).

This module owns

- the key, a random 256-bit value in the bucket at `secrets/nudge` (an envelope of kind
  N), created once by whichever mount needs it first (a conditional create: an existing
  key is never overwritten) and read by every mount, so only bucket readers can nudge;
- the datagram: `(fs uuid, from, to, seq, rid)` and an HMAC-SHA256 of all of it under
  the key, in a compact binary form of at most 512 bytes. HMAC and SHA-256 come from the
  standard library (`hmac`, `hashlib`: OpenSSL's implementation), and the MAC is compared
  with `hmac.compare_digest` (constant time);
- `resolve_bind`, what `-o nudge=auto|off|HOST:PORT` means: `auto` is an ephemeral port
  on the local address this machine reaches the store from (127.0.0.1 for file:// and
  memory:// stores); `off` is no socket at all (neither listening nor sending);
- `Nudger`: one UDP socket that receives nudges (validating the fs uuid, the addressee,
  the MAC and the position, at most 20 wake-ups a second) and sends them.

The heartbeat (efsish.meta.heartbeat) advertises the address. This module must not
decide what a wake-up does (its caller's callback does) and must not import the
filesystem.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from efsish import codec
from efsish.errors import CorruptObject, NotFound, PreconditionFailed, UsageError
from efsish.meta.heartbeat import Heartbeat
from efsish.retry import retry_transient
from efsish.store import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "secrets/"
KEY = f"{PREFIX}nudge"
KEY_BYTES = 32  # 256 bits
MAX_DATAGRAM = 512
MAGIC = b"EFSN\x01"  # "efsish nudge", format 1; covered by the MAC
_MAC = hashlib.sha256().digest_size
_SEQ = struct.Struct(">Q")
# The rid of an acknowledgement ("ack:<incarnation>"): the sender has applied the log up
# to seq (LEASES.md §17). It wakes nothing; `on_ack` records it.
ACK = "ack:"
# A probe (`efsish status`): "ping:<nonce>" asks the receiver to answer "pong:<nonce>" to
# the datagram's source address; nothing else happens (at most RATE answers a second).
PING, PONG = "ping:", "pong:"
# A read-only mount's request (LEASES.md §6.4, reads): "flush:<nonce>" asks a holder to
# put every change it answered so far in the log; it answers "flushed:<nonce>" to the
# datagram's source, with seq the position at or below which they all are. Neither is
# filtered by position or rate: the holder coalesces requests into one flush at a time.
FLUSH, FLUSHED = "flush:", "flushed:"
RATE = 20  # wake-ups a second, at most
INVALID_LOG_EVERY = 60.0  # seconds between debug lines about dropped datagrams


# ------------------------------------------------------------------------------- key


def _encode_key(key: bytes) -> bytes:
    return codec.encode_json(b"N", {"key": key.hex()})


def _decode_key(blob: bytes) -> bytes:
    d = codec.decode_json(b"N", blob, KEY)
    raw = d.get("key") if isinstance(d, dict) else None
    try:
        key = bytes.fromhex(raw) if isinstance(raw, str) else b""
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise CorruptObject(f"{KEY}: not a {KEY_BYTES * 8}-bit key")
    return key


async def load_key(store: ObjectStore, *, create: bool = True) -> bytes:
    """The filesystem's nudge key: read from `secrets/nudge`, or, if there is none and
    `create`, made and stored with a conditional create, so that of mounts racing to make
    it every one ends with the one that landed. An existing key is never replaced.

    Raises NotFound if there is none and not `create` (a read-only mount), CorruptObject
    (one line saying what to do) if the object cannot be read as a key twice in a row (a
    GET carries no checksum), and store errors as they come."""
    damaged: CorruptObject | None = None
    for _ in range(4):
        try:
            blob = await retry_transient(lambda: store.get(KEY), f"read of {KEY}")
        except NotFound:
            if not create:
                raise
            mine = secrets.token_bytes(KEY_BYTES)
            create_it = functools.partial(store.put_if_absent, KEY, _encode_key(mine))
            try:
                await retry_transient(create_it, f"creation of {KEY}")
            except PreconditionFailed:
                continue  # another mount's key landed first (or ours, its answer lost)
            return mine
        try:
            return _decode_key(blob)
        except CorruptObject as e:
            if damaged is not None:
                break
            damaged = e
    if damaged is None:  # created and deleted under us, again and again
        raise CorruptObject(f"{KEY} keeps disappearing; check what deletes it")
    raise CorruptObject(
        f"{damaged}; mounts take no nudges until it is replaced: delete {KEY} and remount "
        "(each mount reads the key when it starts)"
    )


# -------------------------------------------------------------------------- datagram


@dataclass(frozen=True)
class Nudge:
    """One datagram's content: `sender` asks `to` (client ids) of filesystem `fs` to
    catch up to at least log position `seq`, about recall `rid` ("" if none)."""

    fs: str
    sender: str
    to: str
    seq: int
    rid: str


class InvalidNudge(ValueError):
    """A datagram that is not a valid nudge; the message says why (for the debug log)."""


def _field(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"nudge field too long: {text[:20]!r}...")
    return bytes([len(raw)]) + raw


def encode(key: bytes, n: Nudge) -> bytes:
    """The datagram for `n`, MACed with `key`; ValueError if it would not fit."""
    if not 0 <= n.seq < 1 << 63:
        raise ValueError(f"nudge seq out of range: {n.seq}")
    body = MAGIC + _field(n.fs) + _field(n.sender) + _field(n.to) + _SEQ.pack(n.seq) + _field(n.rid)
    out = body + hmac.digest(key, body, "sha256")
    if len(out) > MAX_DATAGRAM:
        raise ValueError(f"nudge of {len(out)} bytes is over {MAX_DATAGRAM}")
    return out


def decode(key: bytes, data: bytes) -> Nudge:
    """The nudge in `data` if it is well formed and its MAC is right; InvalidNudge if not.
    It does not check who it is for or how new it is (the receiver does)."""
    if len(data) > MAX_DATAGRAM:
        raise InvalidNudge(f"{len(data)} bytes, over {MAX_DATAGRAM}")
    if not data.startswith(MAGIC):
        raise InvalidNudge("not a nudge (bad magic)")
    body, mac = data[:-_MAC], data[-_MAC:]
    pos = len(MAGIC)

    def text() -> str:
        nonlocal pos
        if pos >= len(body) or pos + 1 + body[pos] > len(body):
            raise InvalidNudge("truncated")
        raw = body[pos + 1 : pos + 1 + body[pos]]
        pos += 1 + body[pos]
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise InvalidNudge("a field is not UTF-8") from None

    fs, sender, to = text(), text(), text()
    if pos + _SEQ.size > len(body):
        raise InvalidNudge("truncated")
    (seq,) = _SEQ.unpack_from(body, pos)
    pos += _SEQ.size
    rid = text()
    if pos != len(body) or len(mac) != _MAC:
        raise InvalidNudge("truncated or trailing bytes")
    if not hmac.compare_digest(mac, hmac.digest(key, body, "sha256")):
        raise InvalidNudge("wrong MAC (another key, or altered)")
    if seq >= 1 << 63:
        raise InvalidNudge("seq out of range")
    return Nudge(fs, sender, to, seq, rid)


# ------------------------------------------------------------------------- addresses


def parse_option(value: str) -> str | tuple[str, int]:
    """`-o nudge=` checked: "auto", "off", or (host, port) from HOST:PORT ([v6]:PORT for
    an IPv6 address; port 0 picks a free one). ValueError if malformed. HOST must be an
    address other mounts can reach this one at, so a wildcard (0.0.0.0, ::) is refused."""
    if value in ("auto", "off"):
        return value
    host, sep, port_s = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ValueError(f"{value!r}: expected auto, off or HOST:PORT")
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False  # a host name, resolved by resolve_bind
    if unspecified:
        raise ValueError(f"{value!r}: give the address other mounts reach this one at")
    return host, int(port_s)


def format_address(host: str, port: int) -> str:
    """The "host:port" a heartbeat advertises ([v6]:port for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """(ip, port) from an advertised "host:port"; ValueError unless the host is a numeric
    address (a nudge is never worth a DNS lookup)."""
    host, _, port_s = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ip = ipaddress.ip_address(host)
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return str(ip), port


async def resolve_bind(option: str, store: ObjectStore) -> tuple[str, int] | None:
    """The (address, port) to listen for nudges on for `-o nudge=option`, or None for
    `off`. `auto`: port 0 (ephemeral) on the local address a connected UDP socket gets
    toward the store's endpoint host (no packet is sent), 127.0.0.1 for a store on this
    machine; if no route to it can be found, None with a warning (nudges cost only
    latency). HOST:PORT: that address (a name is resolved once, here). UsageError for a
    malformed option or a name that does not resolve."""
    try:
        parsed = parse_option(option)
    except ValueError as e:
        raise UsageError(f"invalid nudge option: {e}") from None
    if parsed == "off":
        return None
    if isinstance(parsed, tuple):
        host, port = parsed
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as e:
            raise UsageError(f"nudge={option}: cannot resolve {host!r} ({e})") from None
        return str(infos[0][4][0]), port
    target = store.endpoint_host()
    if target is None:
        return "127.0.0.1", 0
    try:
        infos = await trio.socket.getaddrinfo(target, 443, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)  # UDP: only picks the route and the local address
            local = str(probe.getsockname()[0])
    except OSError as e:
        log.warning("nudges off: no local address toward the store at %s (%s)", target, e)
        return None
    return local, 0


# -------------------------------------------------------------------------- endpoint


@dataclass
class NudgeStats:
    """Counters since the Nudger started (for `efsish status` and the metrics)."""

    sent: int = 0  # datagrams handed to the kernel
    send_failed: int = 0  # not sent: no address, a bad one, or the socket refused
    received: int = 0  # datagrams read, valid or not
    woken: int = 0  # callbacks made
    dropped_invalid: int = 0  # malformed, wrong MAC, another filesystem or addressee
    dropped_stale: int = 0  # valid, but at or below the applied position (late or replayed)
    dropped_rate: int = 0  # valid and new, but over RATE wake-ups a second
    acks: int = 0  # valid acknowledgements (LEASES.md §17)
    pongs: int = 0  # probes answered
    flush_asks: int = 0  # valid requests of read-only mounts to flush the journal
    flush_answers: int = 0  # valid answers to such requests of ours


class Nudger:
    """One mount's nudge endpoint: a UDP socket bound at construction, `serve()` to take
    nudges (run it in a nursery; cancel it to stop: the socket is closed), `nudge()` to
    send them. `applied()` is the mount's applied log position; `on_wake(nudge)` is called
    (synchronously: it must not block, e.g. it sets an event the catch-up loop waits on)
    for every valid nudge addressed to `client` of `fs` whose seq is above it, at most
    `rate` times in any second. `on_ack(nudge)` is called instead for a valid
    acknowledgement (rid `ack:...`), whatever its seq. `on_flush(nudge, source)` is called
    for a read-only mount's request to flush (rid `flush:...`; `answer` replies to the
    source), `on_flushed(nudge)` for an answer to one of ours. Nothing a datagram holds
    makes `serve` raise."""

    def __init__(
        self,
        key: bytes,
        fs: str,
        client: str,
        bind: tuple[str, int],
        *,
        applied: Callable[[], int],
        on_wake: Callable[[Nudge], None],
        on_ack: Callable[[Nudge], None] | None = None,
        on_flush: Callable[[Nudge, Any], None] | None = None,
        on_flushed: Callable[[Nudge], None] | None = None,
        rate: int = RATE,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a nudge key is 32 bytes")
        self._key, self.fs, self.client = key, fs, client
        self._applied, self._on_wake, self._rate = applied, on_wake, rate
        self._on_ack = on_ack
        self._on_flush, self._on_flushed = on_flush, on_flushed
        self.stats = NudgeStats()
        self._wakes: collections.deque[float] = collections.deque()
        self._pongs: collections.deque[float] = collections.deque()
        self._last_invalid_log = -INVALID_LOG_EVERY
        self._invalid_since_log = 0
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            self._sock.bind(bind)
        except OSError:
            self._sock.close()
            raise
        host, port = self._sock.getsockname()[:2]
        self.address = format_address(str(host), int(port))
        """Where this endpoint listens, "host:port", for the heartbeat."""

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def __enter__(self) -> Nudger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Take nudges until cancelled; closes the socket on the way out."""
        task_status.started()
        taken = 0
        try:
            while True:
                try:
                    data, peer = self._sock.recvfrom(MAX_DATAGRAM + 1)
                except (BlockingIOError, InterruptedError):
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                except OSError as e:  # e.g. an ICMP error queued on the socket
                    log.debug("nudge socket: %s", e)
                    await trio.sleep(0.01)
                    continue
                self._take(data, peer)
                taken += 1
                if taken % 64 == 0:  # a flood must not starve the other tasks
                    await trio.lowlevel.checkpoint()
        finally:
            self.close()

    # ------------------------------------------------------------------- receiving

    def _take(self, data: bytes, peer: Any) -> None:
        self.stats.received += 1
        try:
            n = decode(self._key, data)
            if n.fs != self.fs:
                raise InvalidNudge(f"for another filesystem ({n.fs[:36]!r})")
            if n.to != self.client:
                raise InvalidNudge(f"for another client ({n.to[:40]!r})")
        except InvalidNudge as e:
            self._invalid(str(e), peer)
            return
        if n.rid.startswith(PING):
            self._pong(n, peer)
            return
        if n.rid.startswith(FLUSH) or n.rid.startswith(FLUSHED):
            self._flush_rid(n, peer)
            return
        if n.rid.startswith(ACK):
            self.stats.acks += 1
            if self._on_ack is not None:
                try:
                    self._on_ack(n)
                except Exception:
                    log.exception("nudge: the acknowledgement callback failed")
            return
        try:
            applied = self._applied()
        except Exception:
            log.exception("nudge: cannot read the applied position")
            return
        if n.seq <= applied:
            self.stats.dropped_stale += 1
            return
        now = time.monotonic()
        while self._wakes and now - self._wakes[0] >= 1.0:
            self._wakes.popleft()
        if len(self._wakes) >= self._rate:
            self.stats.dropped_rate += 1
            return
        self._wakes.append(now)
        self.stats.woken += 1
        try:
            self._on_wake(n)
        except Exception:
            log.exception("nudge: the wake-up callback failed")

    def _flush_rid(self, n: Nudge, peer: Any) -> None:
        """A request to flush (to the callback, with where to answer) or an answer."""
        asked = n.rid.startswith(FLUSH)
        if asked:
            self.stats.flush_asks += 1
        else:
            self.stats.flush_answers += 1
        try:
            if asked and self._on_flush is not None:
                self._on_flush(n, peer)
            elif not asked and self._on_flushed is not None:
                self._on_flushed(n)
        except Exception:
            log.exception("nudge: the flush callback failed")

    def answer(self, peer: Any, to: str, seq: int, rid: str) -> bool:
        """Send a nudge to address `peer` (a datagram's source), for client `to`. False,
        with a debug line, if it was not sent."""
        try:
            self._sock.sendto(encode(self._key, Nudge(self.fs, self.client, to, seq, rid)), peer)
        except (OSError, ValueError) as e:
            self.stats.send_failed += 1
            log.debug("nudge answer to %s at %s not sent: %s", to, peer, e)
            return False
        self.stats.sent += 1
        return True

    def _pong(self, n: Nudge, peer: Any) -> None:
        """Answer a probe to where it came from (rate-limited like wake-ups)."""
        now = time.monotonic()
        while self._pongs and now - self._pongs[0] >= 1.0:
            self._pongs.popleft()
        if len(self._pongs) >= self._rate:
            return
        self._pongs.append(now)
        try:
            answer = Nudge(self.fs, self.client, n.sender, 0, PONG + n.rid[len(PING) :])
            self._sock.sendto(encode(self._key, answer), peer)
            self.stats.pongs += 1
        except (OSError, ValueError) as e:
            log.debug("nudge: probe from %s not answered: %s", peer, e)

    def _invalid(self, why: str, peer: Any) -> None:
        self.stats.dropped_invalid += 1
        self._invalid_since_log += 1
        now = time.monotonic()
        if now - self._last_invalid_log >= INVALID_LOG_EVERY:
            log.debug(
                "dropped %d invalid nudge datagram(s); the last from %s: %s",
                self._invalid_since_log,
                peer,
                why,
            )
            self._last_invalid_log, self._invalid_since_log = now, 0

    # --------------------------------------------------------------------- sending

    def nudge(self, to: Heartbeat, seq: int, rid: str = "") -> bool:
        """Send one nudge to the mount of heartbeat `to` (fire and forget: one
        non-blocking send; a full socket buffer drops it). False, with a debug line, if it
        was not sent: no advertised address, a bad one, or a send error."""
        if to.nudge is None:
            self.stats.send_failed += 1
            return False
        try:
            addr = parse_address(to.nudge)
            data = encode(self._key, Nudge(self.fs, self.client, to.client, seq, rid))
            self._sock.sendto(data, addr)
        except (OSError, ValueError) as e:
            self.stats.send_failed += 1
            log.debug("nudge to %s at %s not sent: %s", to.client, to.nudge, e)
            return False
        self.stats.sent += 1
        return True


# ------------------------------------------------------------------------ probing


async def probe(
    key: bytes, fs: str, targets: list[Heartbeat], wait: float = 1.0
) -> dict[str, float | None]:
    """Send each target mount's advertised address a ping and wait up to `wait` s for
    the answers: {client: round trip in seconds, or None if none came}. For `efsish
    status`: an answer shows the address reaches a listening mount from this machine."""
    out: dict[str, float | None] = {t.client: None for t in targets if t.nudge}
    me = f"probe-{secrets.token_hex(6)}"
    sent: dict[str, tuple[str, float]] = {}  # nonce -> (client, when sent)
    socks: dict[int, socket.socket] = {}
    try:
        for t in targets:
            if not t.nudge:
                continue
            try:
                host, port = parse_address(t.nudge)
            except ValueError:
                continue
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socks.get(family)
            if sock is None:
                sock = socks[family] = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
            nonce = secrets.token_hex(8)
            data = encode(key, Nudge(fs, me, t.client, 0, PING + nonce))
            try:
                sock.sendto(data, (host, port))
            except OSError as e:
                log.debug("probe of %s at %s not sent: %s", t.client, t.nudge, e)
                continue
            sent[nonce] = (t.client, time.perf_counter())
        with trio.move_on_after(wait):
            while any(out[c] is None for c, _ in sent.values()):
                got = False
                for sock in socks.values():
                    try:
                        data, _ = sock.recvfrom(MAX_DATAGRAM + 1)
                    except (BlockingIOError, InterruptedError, OSError):
                        continue
                    got = True
                    try:
                        n = decode(key, data)
                    except InvalidNudge:
                        continue
                    hit = sent.get(n.rid[len(PONG) :]) if n.rid.startswith(PONG) else None
                    if n.fs == fs and n.to == me and hit is not None and n.sender == hit[0]:
                        out[hit[0]] = time.perf_counter() - hit[1]
                if not got:
                    await trio.sleep(0.002)
    finally:
        for sock in socks.values():
            sock.close()
    return out
