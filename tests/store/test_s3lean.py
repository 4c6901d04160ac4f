"""The lean S3 path: its SigV4 signature equals botocore's for the same request and time,
its HTTP/1.1 parser accepts what servers send and refuses what it cannot trust, and on a
real server (moto here, SeaweedFS in the integration tier) requests really go through it
rather than silently falling back to boto3."""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import threading

import pytest
import trio
import trustme
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from efsish.errors import NotFound, PreconditionFailed
from efsish.store import open_store
from efsish.store.s3 import S3Store
from efsish.store.s3lean import (
    SIGNED_BODY_MAX,
    LeanS3,
    ProtocolError,
    SigV4,
    SocketTransport,
    _Conn,
    parse_head,
)

AMZ_DATE = "20261202T031500Z"


def botocore_authorization(
    creds: Credentials, method: str, url: str, body: bytes, headers: dict[str, str]
) -> str:
    """botocore's own Authorization header for this request at AMZ_DATE (add_auth's
    steps, with the timestamp fixed instead of read from the clock), with efsish's client
    setting payload_signing_enabled=False (which botocore honours for bodies it streams)."""
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    if len(body) > SIGNED_BODY_MAX:
        req.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    auth = S3SigV4Auth(creds, "s3", "eu-west-3")
    req.context["timestamp"] = AMZ_DATE
    auth._modify_request_before_signing(req)  # type: ignore[attr-defined]
    canonical = auth.canonical_request(req)
    sig = auth.signature(auth.string_to_sign(req, canonical), req)
    auth._inject_signature_to_request(req, sig)  # type: ignore[attr-defined]
    return str(req.headers["Authorization"])


class FixedCreds:
    def __init__(self, creds: Credentials) -> None:
        self.creds = creds

    def get_frozen_credentials(self) -> object:
        return self.creds.get_frozen_credentials()


@pytest.mark.parametrize(
    ("method", "key", "body", "extra", "token"),
    [
        ("GET", "fs/log/0000000000000042", b"", {}, None),
        ("HEAD", "a b/ü+ñ=&$@,;~x", b"", {}, None),
        ("PUT", "fs/log/0000000000000043", b"\x00entry" * 50, {"If-None-Match": "*"}, None),
        ("PUT", "fs/clients/abc", b"{}", {}, "session-token/+="),
        # A data block: UNSIGNED-PAYLOAD, its CRC-32C header signed instead.
        (
            "PUT",
            "fs/data/1-2-3",
            b"\xab" * (SIGNED_BODY_MAX + 1),
            {"x-amz-checksum-crc32c": "AAAAAA=="},
            None,
        ),
    ],
)
def test_signature_matches_botocore(
    method: str, key: str, body: bytes, extra: dict[str, str], token: str | None
) -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    lean = LeanS3("http://127.0.0.1:8333", "bucket-1", "eu-west-3", lambda: FixedCreds(creds))
    pieces = lean._request_bytes(method, key, body, extra, amz_date=AMZ_DATE)
    assert pieces is not None
    req = b"".join(pieces)
    if len(body) > SIGNED_BODY_MAX:  # sent as it is, not copied behind the head
        assert len(pieces) == 2 and pieces[1] is body
        assert b"x-amz-content-sha256: UNSIGNED-PAYLOAD\r\n" in pieces[0]
    else:
        assert len(pieces) == 1  # one packet
    head = req.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    sent = dict(line.split(": ", 1) for line in lines[1:])
    path = lines[0].split(" ")[1]
    ours = sent.pop("authorization")
    sent.pop("content-length", None)
    theirs = botocore_authorization(creds, method, "http://127.0.0.1:8333" + path, body, sent)
    assert ours == theirs
    assert req.endswith(body)


def test_signing_key_is_cached_per_day() -> None:
    s = SigV4("us-east-1")
    a = s._signing_key("secret", "20261202")
    assert s._signing_key("secret", "20261202") is a
    assert s._signing_key("secret", "20261203") != a


def test_host_header_leaves_out_default_ports() -> None:
    def creds() -> None:
        return None

    assert LeanS3("https://s3.example.com", "b", "r", creds).host == "s3.example.com"
    assert LeanS3("http://s3.example.com:80/", "b", "r", creds).host == "s3.example.com"
    assert LeanS3("http://127.0.0.1:9000", "b", "r", creds).host == "127.0.0.1:9000"
    assert LeanS3("http://[::1]:9000", "b", "r", creds).host == "[::1]:9000"
    assert LeanS3("http://h:1/base/", "b", "r", creds).base == "/base/b/"


def test_parse_head() -> None:
    status, h = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 12\r\nX-A: 1\r\nx-a: 2")
    assert status == 404 and h["content-length"] == "12" and h["x-a"] == "1, 2"
    assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0")[1]["connection"] == "close"
    for bad in (
        b"HTTP/2 200 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 200 OK\r\nno colon here",
        b"HTTP/1.1 200 OK\r\n Folded: header",
    ):
        with pytest.raises(ProtocolError):
            parse_head(bad)


class FakeTransport:
    """Hands out fixed bytes in small pieces, as a slow server would."""

    def __init__(self, data: bytes, piece: int = 3) -> None:
        self.data = data
        self.piece = piece

    async def send_some(self, data: memoryview) -> int:
        await trio.lowlevel.checkpoint()
        return len(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        n = min(self.piece, max_bytes)
        out, self.data = self.data[:n], self.data[n:]
        return out

    def close(self) -> None:
        pass


async def exchange(raw: bytes, method: str = "GET", piece: int = 3) -> tuple[int, bytes, bool]:
    lean = LeanS3("http://127.0.0.1:1", "b", "r", lambda: None)
    resp, reusable = await lean._exchange(_Conn(FakeTransport(raw, piece)), method, [b"req"])
    return resp.status, resp.body, reusable


async def test_bodies_by_length_chunks_and_head() -> None:
    assert await exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello") == (
        200,
        b"hello",
        True,
    )
    chunked = (
        b"HTTP/1.1 404 NF\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert await exchange(chunked) == (404, b"abcde", True)
    assert await exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD") == (
        200,
        b"",
        True,
    )
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 412 PF\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert await exchange(interim) == (412, b"", False)
    # Bytes beyond the answer: the connection is not reused.
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy"
    assert (await exchange(extra, piece=1000))[2] is False
    # A large body, received in odd-sized pieces and joined once.
    big = bytes(range(256)) * 4099
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    assert await exchange(raw, piece=70_001) == (200, big, True)


async def test_truncated_or_unbounded_answers_are_refused() -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # connection closed early
        b"HTTP/1.1 200 OK\r\nContent-Length: 9000000\r\n\r\n" + b"x" * 500_000,
        b"HTTP/1.1 200 OK\r\n\r\nbody until close",  # no length: not for this parser
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        # What int() takes but HTTP does not (a sign, "_"; "-3" used to drop 3 bytes).
        b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000,
    ):
        # The long answers arrive 1 KiB at a time (3 bytes at a time they took 16 s of
        # trio checkpoints); the short ones 3 bytes at a time, to cross every boundary.
        with pytest.raises(ProtocolError):
            await exchange(raw, piece=3 if len(raw) < 1000 else 1024)


class SlowReader(FakeTransport):
    """A server that takes a request 64 KiB at a time, 10 ms apart (a thin uplink), or
    that stops taking it after `stall_after` bytes."""

    def __init__(self, answer: bytes, stall_after: int | None = None) -> None:
        super().__init__(answer, piece=1 << 20)
        self.taken = bytearray()
        self.stall_after = stall_after

    async def send_some(self, data: memoryview) -> int:
        if self.stall_after is not None and len(self.taken) >= self.stall_after:
            await trio.sleep_forever()
        await trio.sleep(0.01)
        n = min(len(data), 65536)
        self.taken += data[:n]
        return n


async def test_a_slow_upload_that_keeps_going_is_not_cut_off() -> None:
    """The same for a data block the server takes slowly: the timeout bounds each wait
    for the socket to take more (as boto3's does), not the whole body; a server that
    stops reading is still given up on."""
    lean = LeanS3("http://127.0.0.1:1", "b", "r", lambda: None, read_timeout=0.05)
    pieces = [b"PUT /b/data/x HTTP/1.1\r\n\r\n", os.urandom(1 << 20)]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    slow = SlowReader(ok)
    start = trio.current_time()
    resp, _ = await lean._exchange(_Conn(slow, idle_timeout=0.05), "PUT", pieces)
    assert resp.status == 200 and bytes(slow.taken) == b"".join(pieces)
    assert trio.current_time() - start > 0.15  # 17 sends, 10 ms each: > 3 timeouts
    stalled = SlowReader(ok, stall_after=300_000)
    with pytest.raises(trio.TooSlowError):
        await lean._exchange(_Conn(stalled, idle_timeout=0.05), "PUT", pieces)


async def test_a_slow_answer_that_keeps_coming_is_not_cut_off() -> None:
    """The read timeout is for silence, as in boto3, not for the whole answer: a large
    block arriving steadily over a slow link takes longer than it and still arrives."""
    body = bytes(range(256)) * 4000  # ~1 MB
    creds = FixedCreds(Credentials("AKID", "secret"))

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 100_000):  # ~0.6 s in all, never silent for 0.2 s
            await stream.send_all(body[i : i + 100_000])
            await trio.sleep(0.06)

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        lean = LeanS3(f"http://127.0.0.1:{port}", "b", "us-east-1", lambda: creds, read_timeout=0.2)
        start = trio.current_time()
        r = await lean.request("GET", "data/block")
        assert trio.current_time() - start > 0.4
        assert r is not None and r.body == body and lean.fallbacks == 0
        n.cancel_scope.cancel()


async def test_a_credential_refresh_does_not_stop_the_event_loop() -> None:
    """Refreshable credentials (instance role, SSO, assume role) refresh with a blocking
    call to IMDS or STS: it runs in a worker thread, and FUSE requests go on meanwhile."""
    import datetime
    import time

    from botocore.credentials import RefreshableCredentials

    def fetch() -> dict[str, str]:
        time.sleep(0.5)  # what IMDS/STS may take
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=6)
        return {
            "access_key": "AKID",
            "secret_key": "s",
            "token": "t",
            "expiry_time": later.isoformat(),
        }

    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    creds = RefreshableCredentials.create_from_metadata(
        {"access_key": "AKID", "secret_key": "s", "token": "t", "expiry_time": soon.isoformat()},
        fetch,
        "test",
    )
    lean = LeanS3("http://127.0.0.1:9", "b", "us-east-1", lambda: creds, connect_timeout=0.2)
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.monotonic()
        while True:
            await trio.sleep(0.01)
            now = time.monotonic()
            worst, last = max(worst, now - last), now

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        await trio.sleep(0.05)
        await lean.request("GET", "log/0000000000000001")  # nothing listens: None
        n.cancel_scope.cancel()
    assert creds.get_frozen_credentials().token == "t" and worst < 0.3, worst


SERVERS = ["moto", pytest.param("seaweedfs", marks=pytest.mark.integration)]


@pytest.mark.parametrize("server", SERVERS)
async def test_requests_use_the_lean_path_on_a_real_server(server, request) -> None:
    target = request.getfixturevalue(f"{server}_target")
    store = open_store(f"s3://{target.bucket}/lean-test-{trio.current_time()}", target.options())
    assert isinstance(store, S3Store) and store._lean is not None
    lean = store._lean
    try:
        with pytest.raises(NotFound):
            await store.get("log/0000000000000001")
        await store.put_if_absent("log/0000000000000001", b"entry")
        with pytest.raises(PreconditionFailed):
            await store.put_if_absent("log/0000000000000001", b"other")
        await store.put_if_absent("log/0000000000000001", b"entry")  # our own: idempotent
        assert await store.get("log/0000000000000001") == b"entry"
        assert (await store.head("log/0000000000000001")).size == 5
        with pytest.raises(NotFound):
            await store.head("log/0000000000000002")
        assert await store.get("log/0000000000000001", 1, 3) == b"nt"  # ranged: 206
        assert await store.get("log/0000000000000001", 3, 99) == b"ry"
        assert lean.requests >= 9
        assert lean.fallbacks == 0
        if server == "seaweedfs":  # keeps connections alive (moto's server closes them)
            assert len(lean._idle) == 1  # one keep-alive connection served them all
    finally:
        await store.aclose()


@pytest.mark.integration
async def test_a_server_that_closed_an_idle_connection_is_asked_again(seaweedfs_target) -> None:
    target = seaweedfs_target
    store = open_store(f"s3://{target.bucket}/lean-stale-{trio.current_time()}", target.options())
    assert isinstance(store, S3Store) and store._lean is not None
    lean = store._lean
    try:
        await store.put_if_absent("k", b"v")
        assert len(lean._idle) == 1
        # What a server's idle timeout does: the pooled connection is closed under us.
        transport = lean._idle[0].transport
        assert isinstance(transport, SocketTransport)
        transport.sock.shutdown(socket.SHUT_RDWR)
        assert await store.get("k") == b"v"
        assert lean.fallbacks == 0
    finally:
        await store.aclose()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 servers do

    def do_GET(self) -> None:
        body = b"hello over tls" if self.path.endswith("/there") else b"<Error/>"
        self.send_response(200 if self.path.endswith("/there") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a certificate from a test CA (trustme)."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca_file
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_tls_requests_verify_the_server_and_reuse_the_connection(
    tls_server, monkeypatch
) -> None:
    endpoint, ca_file = tls_server
    creds = FixedCreds(Credentials("AKID", "secret"))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca_file))
    lean = LeanS3(endpoint, "b", "us-east-1", lambda: creds)
    r = await lean.request("GET", "k/there")
    assert r is not None and r.status == 200 and r.body == b"hello over tls"
    r = await lean.request("GET", "k/missing")
    assert r is not None and r.status == 404
    assert len(lean._idle) == 1 and lean.fallbacks == 0
    lean.close()

    # A server whose certificate is not trusted: refused, and left to boto3 (which
    # reports the TLS error to the user).
    monkeypatch.delenv("AWS_CA_BUNDLE")  # botocore's default bundle: not our test CA
    untrusting = LeanS3(endpoint, "b", "us-east-1", lambda: creds)
    assert await untrusting.request("GET", "k/there") is None
    assert untrusting.fallbacks == 1 and untrusting.requests == 0


async def test_a_server_that_never_answers_is_left_to_boto3() -> None:
    """A hung server costs at most the read timeout, then the caller asks boto3 (which
    has its own retries and error messages): never a hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    creds = FixedCreds(Credentials("AKID", "secret"))
    lean = LeanS3(f"http://127.0.0.1:{port}", "b", "r", lambda: creds, read_timeout=0.3)
    try:
        with trio.fail_after(5):
            assert await lean.request("GET", "k") is None
        assert lean.fallbacks == 1 and not lean._idle
    finally:
        listener.close()
