"""A lean path for the S3 requests every metadata operation waits for: whole-object GET,
HEAD and small (conditional) PUT, sent from the trio event loop itself.

Every lookup waits for one GET of the next log position and every metadata change for a
conditional PUT. Through botocore each of those costs ~0.9-1.7 ms of client CPU (parameter
validation, the event system, urllib3, http.client's e-mail header parser and a SigV4
signer that rebuilds its signing key every time) and a hop to a worker thread; on a
nearby server that is more than the request itself (measured here: botocore+urllib3 GET
of a missing key 917 us CPU, a plain socket exchange 48 us). This module sends them over
pooled keep-alive connections (non-blocking sockets driven by trio's wait_readable, TLS
where the endpoint is https), signs
them with AWS Signature V4 (signing key cached per day; `tests/store/test_s3lean.py`
checks the signature against botocore's signer for the same request and time), and reads
the answer with a strict HTTP/1.1 parser.

Data blocks (up to LEAN_MAX_PLAIN_BODY, plain http only) take this path too: through
boto3 a 4 MiB PUT costs a worker-thread hop, a BytesIO copy of the body and 256 reads of
16 KiB under the GIL; here it is one non-blocking send of the caller's bytes, which copies
at most what the socket's buffer takes per wake-up (~0.3 ms of event loop for 4 MiB on
loopback). Over TLS the encryption would run on the event loop (milliseconds per block,
stalling FUSE), so TLS bodies above LEAN_MAX_BODY still go to boto3 in a thread. Bodies
above SIGNED_BODY_MAX are sent UNSIGNED-PAYLOAD, as boto3 sends them with
payload_signing_enabled off; the x-amz-checksum-crc32c header the caller adds is what
the server checks them against.

Only the plain outcomes are handled here: 200, 204, 404, 409 and 412. Anything else — an
error status, a connection problem, a timeout, a response this parser does not accept —
returns None, and the caller repeats the request through boto3, which retries, parses the
error and maps it to a clear message. This module must not retry (beyond resending once
on a pooled connection that the server had closed before answering), interpret errors,
block the event loop (TLS bodies above LEAN_MAX_BODY are not for it), or be used for
virtual-hosted addressing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit
from urllib.request import getproxies, proxy_bypass

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")

PLAIN_STATUSES = frozenset({200, 204, 206, 404, 409, 412})
GIVE_UP_AFTER = 5  # connection failures before any success: leave it all to boto3
LEAN_MAX_BODY = 1 << 20  # larger PUT bodies over TLS go through boto3 (in a worker thread)
LEAN_MAX_PLAIN_BODY = 64 << 20  # over plain http: up to the largest block size
SIGNED_BODY_MAX = 256 * 1024  # larger bodies are sent UNSIGNED-PAYLOAD (see above)
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_HEAD = 64 * 1024
BIG_BODY = 256 * 1024  # bodies larger than this are received as pieces joined once
RECEIVE_MAX = 1024 * 1024  # at most this much per receive (what a loopback wake-up holds)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Characters SigV4 leaves unescaped in a path segment (RFC 3986 unreserved, plus "/").
_SAFE_PATH = "/~"


def usable_for(endpoint: str) -> bool:
    """Whether the lean path can talk to `endpoint` as boto3 would: not through a proxy
    (boto3 honours HTTP(S)_PROXY; this path does not)."""
    parts = urlsplit(endpoint)
    proxies = getproxies()
    return not (parts.scheme in proxies and not proxy_bypass(parts.hostname or ""))


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]


class ProtocolError(Exception):
    """The server's answer is not one this parser accepts (the caller asks boto3)."""


class SigV4:
    """AWS Signature Version 4 for S3 requests with no query string."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}

    def _signing_key(self, secret: str, day: str) -> bytes:
        k = self._keys.get((secret, day))
        if k is None:
            k = ("AWS4" + secret).encode()
            for part in (day, self.region, self.service, "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, day): k}  # one day, one secret at a time
        return k

    def sign(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        payload_hash: str,
        access_key: str,
        secret_key: str,
        amz_date: str,
    ) -> str:
        """The Authorization header for a request whose `headers` (lower-case names,
        every one of them signed) already include host, x-amz-date and
        x-amz-content-sha256. `path` is the already-escaped request path."""
        names = sorted(headers)
        canonical_headers = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
        signed = ";".join(names)
        canonical = f"{method}\n{path}\n\n{canonical_headers}\n{signed}\n{payload_hash}"
        day = amz_date[:8]
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        sig = hmac.new(
            self._signing_key(secret_key, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        return (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={sig}"
        )


class Transport(Protocol):
    """One connection's byte pipe (a socket here; a fake in the tests)."""

    async def send_some(self, data: memoryview) -> int: ...

    async def receive_some(self, max_bytes: int) -> bytes: ...

    def close(self) -> None: ...


class SocketTransport:
    """A non-blocking socket, plain or TLS, driven with trio's wait_readable/writable.

    A request costs one trip through the event loop (waiting for the answer); trio's
    SocketStream/SSLStream add several schedule points per send and receive, and each
    trip costs tens of microseconds of Python on a loop that also serves FUSE."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, host: str, port: int, tls: ssl.SSLContext | None) -> SocketTransport:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {host}")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                try:
                    sock.connect(addr)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err)) from None
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if tls is None:
                    return cls(sock)
                wrapped = tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
                t = cls(wrapped)
                await t._io(wrapped.do_handshake, writing=False)
                return t
            except OSError as e:
                trio.lowlevel.notify_closing(sock)
                sock.close()
                error = e
            except BaseException:
                trio.lowlevel.notify_closing(sock)
                sock.close()
                raise
        raise error

    async def _io(self, fn: Callable[..., T], *args: Any, writing: bool) -> T:
        while True:
            try:
                return fn(*args)
            except BlockingIOError:
                if writing:
                    await trio.lowlevel.wait_writable(self.sock)
                else:
                    await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.sock)

    async def send_some(self, data: memoryview) -> int:
        """Send what the socket takes now (waiting until it takes anything)."""
        n: int = await self._io(self.sock.send, data, writing=True)
        return n

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._io(self.sock.recv, max_bytes, writing=False)

    def close(self) -> None:
        try:
            trio.lowlevel.notify_closing(self.sock)
        except RuntimeError:  # outside a trio run (nothing can be waiting on it then)
            pass
        self.sock.close()


class _Conn:
    def __init__(self, transport: Transport, idle_timeout: float = 30.0) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.received = False  # any byte of an answer arrived on this connection
        # Like boto3's read timeout: how long a receive may wait for the next bytes (a
        # large body that keeps arriving is never cut off).
        self.idle_timeout = idle_timeout

    async def _fill(self) -> None:
        with trio.fail_after(self.idle_timeout):
            data = await self.transport.receive_some(BIG_BODY)
        if not data:
            raise ProtocolError("connection closed by the server")
        self.received = True
        self.buf += data

    async def _read_until(self, delim: bytes, what: str) -> bytes:
        """The bytes before the next `delim` (consumed with it), at most MAX_HEAD."""
        start = 0
        while True:
            i = self.buf.find(delim, start)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(delim)]
                return out
            if len(self.buf) > MAX_HEAD:
                raise ProtocolError(f"{what} too long")
            start = max(0, len(self.buf) - len(delim) + 1)
            await self._fill()

    async def read_head(self) -> bytes:
        return await self._read_until(b"\r\n\r\n", "response headers")

    async def read_exact(self, n: int) -> bytes:
        if n - len(self.buf) > BIG_BODY:
            # A large body (a data block): keep the bytes each receive returns and join
            # them once. Receiving into a zero-filled bytearray of the body's size and
            # turning that into bytes cost more (1.81 against 1.41 CPU-ms per 4 MiB
            # answer on loopback); the block must end up as bytes, the only buffer
            # google-crc32c takes.
            pieces = [bytes(self.buf)]
            have = len(self.buf)
            self.buf.clear()
            while have < n:
                with trio.fail_after(self.idle_timeout):
                    got = await self.transport.receive_some(min(n - have, RECEIVE_MAX))
                if not got:
                    raise ProtocolError("connection closed by the server")
                self.received = True
                pieces.append(got)
                have += len(got)
            return b"".join(pieces)
        while len(self.buf) < n:
            await self._fill()
        if len(self.buf) == n:  # the usual case: the whole buffer is the body
            out = bytes(self.buf)
            self.buf.clear()
            return out
        with memoryview(self.buf) as view:
            out = bytes(view[:n])
        del self.buf[:n]
        return out

    async def read_line(self) -> bytes:
        return await self._read_until(b"\r\n", "chunk header")

    async def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_line = (await self.read_line()).split(b";", 1)[0].strip()
            if not size_line or size_line.strip(b"0123456789abcdefABCDEF"):
                raise ProtocolError("bad chunk size")
            size = int(size_line, 16)
            if size == 0:
                while await self.read_line():  # trailers, up to the empty line
                    pass
                return bytes(out)
            out += await self.read_exact(size)
            if await self.read_exact(2) != b"\r\n":
                raise ProtocolError("bad chunk end")


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-case names) of an HTTP/1.x response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:80]!r}")
        key = name.decode("latin-1").lower()
        val = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    if parts[0] == b"HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
        headers["connection"] = "close"
    return int(parts[1]), headers


class LeanS3:
    """Signed requests to one bucket at one endpoint, path-style, from the event loop."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        region: str,
        credentials: Callable[[], Any],
        *,
        verify_tls: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        pool_size: int = 32,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {endpoint!r}")
        self.https = parts.scheme == "https"
        self.hostname = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        default_port = (self.https and self.port == 443) or (not self.https and self.port == 80)
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        # The Host header as botocore signs it: the default port is left out.
        self.host = host if default_port else f"{host}:{self.port}"
        self.base = f"{parts.path.rstrip('/')}/{quote(bucket, safe='')}/"
        self.signer = SigV4(region)
        self._credentials = credentials
        self._verify_tls = verify_tls
        self._ssl: ssl.SSLContext | None = None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = trio.Semaphore(pool_size)
        self._idle: list[_Conn] = []
        self._token: object | None = None  # the trio run the pooled connections belong to
        self.requests = 0
        self.fallbacks = 0
        self.disabled = False

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if self._verify_tls:
                # The same CA bundle boto3 would use: AWS_CA_BUNDLE, else botocore's default.
                from botocore.httpsession import get_cert_path

                cafile = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
                self._ssl = ssl.create_default_context(
                    cafile=cafile if isinstance(cafile, str) else None
                )
            else:
                self._ssl = ssl.create_default_context()
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        return self._ssl

    def close(self) -> None:
        """Close the pooled (idle) connections."""
        for c in self._idle:
            try:
                c.transport.close()
            except OSError:
                pass
        self._idle.clear()

    async def _frozen_credentials(self) -> Any:
        """The credentials to sign with. Refreshable ones (instance role, SSO, assume
        role) are refreshed by a blocking call to IMDS or STS when they are about to
        expire: that runs in a worker thread, not on the event loop."""
        creds = self._credentials()
        if creds is None:
            return None
        refresh_needed = getattr(creds, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            return await trio.to_thread.run_sync(creds.get_frozen_credentials)
        return creds.get_frozen_credentials()

    async def _connect(self) -> _Conn:
        with trio.fail_after(self.connect_timeout):
            tls = self._tls_context() if self.https else None
            return _Conn(
                await SocketTransport.connect(self.hostname, self.port, tls), self.read_timeout
            )

    def takes(self, size: int) -> bool:
        """Whether a PUT body of `size` bytes may go through this path."""
        return not self.disabled and size <= (LEAN_MAX_BODY if self.https else LEAN_MAX_PLAIN_BODY)

    def _request_bytes(
        self,
        method: str,
        key: str,
        body: bytes,
        extra: dict[str, str] | None,
        amz_date: str | None = None,
        frozen: Any = None,
    ) -> list[bytes] | None:
        """The request as the pieces to send: head and body in one piece when the body is
        small (one packet), the caller's body object as a piece of its own when it is
        large (no copy of a data block)."""
        if frozen is None:
            creds = self._credentials()
            if creds is None:
                return None
            frozen = creds.get_frozen_credentials()
        path = self.base + quote(key, safe=_SAFE_PATH)
        amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        if len(body) > SIGNED_BODY_MAX:
            payload_hash = UNSIGNED_PAYLOAD
        else:
            payload_hash = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        headers = {
            "host": self.host,
            "x-amz-date": amz_date,
            "x-amz-content-sha256": payload_hash,
        }
        if frozen.token:
            headers["x-amz-security-token"] = frozen.token
        for k, v in (extra or {}).items():
            headers[k.lower()] = v
        auth = self.signer.sign(
            method, path, headers, payload_hash, frozen.access_key, frozen.secret_key, amz_date
        )
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"authorization: {auth}")
        if method in ("PUT", "POST") or body:
            lines.append(f"content-length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return [head, body] if len(body) > SIGNED_BODY_MAX else [head + body]

    async def _exchange(self, conn: _Conn, method: str, req: list[bytes]) -> tuple[Response, bool]:
        """Send `req` and read the answer; (response, whether conn can be reused)."""
        conn.received = False
        for piece in req:
            view = memoryview(piece)
            while view:
                # Like the receives (and boto3): read_timeout bounds each wait for the
                # socket to take more, so a block going out slowly but steadily is not
                # cut off, and a server that stops reading is.
                with trio.fail_after(self.read_timeout):
                    sent = await conn.transport.send_some(view)
                view = view[sent:]
        # Each receive below waits at most read_timeout for more bytes (see _Conn).
        head = await conn.read_head()
        status, headers = parse_head(head)
        while 100 <= status < 200:  # interim answers (100 Continue): skip them
            status, headers = parse_head(await conn.read_head())
        reusable = "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await conn.read_chunked()
        elif "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit()):  # no sign, "_" or spaces
                raise ProtocolError("bad content-length")
            n = int(length)
            body = await conn.read_exact(n)
        else:
            raise ProtocolError("response without a length")
        if conn.buf:
            reusable = False  # bytes beyond the answer: do not trust this connection
        return Response(status, body, headers), reusable

    async def request(
        self, method: str, key: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response | None:
        """Send one request for `key` (the full key, prefix included); None means "ask
        boto3 instead" (an error status, a connection failure, no credentials)."""
        if not self.takes(len(body)):
            return None
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:  # connections of an earlier trio run are not usable
            self.close()
            self._token = token
        try:
            frozen = await self._frozen_credentials()
            if frozen is None:
                return None
            req = self._request_bytes(method, key, body, headers, frozen=frozen)
        except Exception as e:  # credentials that cannot be resolved: boto3 will say why
            log.debug("lean %s %s: cannot sign (%s); falling back to boto3", method, key, e)
            return None
        if req is None:
            return None
        async with self._slots:
            for fresh_only in (False, True):
                reused = bool(self._idle) and not fresh_only
                conn: _Conn | None = None
                try:
                    conn = self._idle.pop() if reused else await self._connect()
                    resp, reusable = await self._exchange(conn, method, req)
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.TooSlowError,
                    ProtocolError,
                    UnicodeError,
                ) as e:
                    if conn is not None:
                        conn.transport.close()
                    stale = reused and conn is not None and not conn.received
                    if stale and not isinstance(e, trio.TooSlowError):
                        # A pooled connection the server had closed while idle: once more
                        # on a new one (safe: the callers' requests are idempotent).
                        continue
                    log.debug("lean %s %s failed (%s); falling back to boto3", method, key, e)
                    self.fallbacks += 1
                    if self.requests == 0 and self.fallbacks >= GIVE_UP_AFTER:
                        log.info("lean S3 requests keep failing (%s); using boto3 only", e)
                        self.disabled = True
                    return None
                except BaseException:  # cancelled mid-answer: the connection is unusable
                    if conn is not None:
                        conn.transport.close()
                    raise
                if reusable:
                    self._idle.append(conn)
                else:
                    conn.transport.close()
                break
            else:  # pragma: no cover - the loop always breaks or returns
                return None
        self.requests += 1
        if resp.status not in PLAIN_STATUSES:
            self.fallbacks += 1
            return None
        return resp
