"""Bad store configuration gives one clear, typed error that says what to fix."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import trio

from efsish.devtools import s3server
from efsish.errors import (
    NotFound,
    PreconditionFailed,
    StoreConfigError,
    TransientStoreError,
)
from efsish.store import StoreOptions, open_store
from efsish.store.s3 import S3Store
from efsish.store.s3lean import LEAN_MAX_BODY, SIGNED_BODY_MAX


async def test_missing_bucket(moto_target) -> None:
    store = open_store("s3://no-such-bucket-xyz/p", StoreOptions(endpoint=moto_target.endpoint))
    with pytest.raises(StoreConfigError, match="does not exist"):
        await store.check()


async def test_unreachable_endpoint() -> None:
    port = s3server.free_port()  # nothing listens there
    store = open_store("s3://bucket/p", StoreOptions(endpoint=f"http://127.0.0.1:{port}"))
    with pytest.raises(StoreConfigError, match="cannot reach"):
        await store.check()


def test_malformed_urls() -> None:
    for url in ["s3://", "ftp://x", "file://relative/path", "bucket"]:
        with pytest.raises(StoreConfigError):
            open_store(url)


WRONG_KEY = "the access key or secret is wrong; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


@pytest.mark.integration
@pytest.mark.parametrize("lean", ["1", "0"])
@pytest.mark.parametrize(
    ("key_id", "code"),
    [(s3server.ACCESS_KEY, "SignatureDoesNotMatch"), ("no-such-key", "InvalidAccessKeyId")],
)
async def test_wrong_credentials(seaweedfs_target, monkeypatch, lean, key_id, code) -> None:
    """SeaweedFS checks every signature. A HEAD's 403 has no body, so it cannot say why;
    efsish must not call a wrong secret missing permission, on either request path."""
    good = open_store(f"s3://{seaweedfs_target.bucket}/creds", seaweedfs_target.options())
    await good.put("k", b"v")
    await good.aclose()
    monkeypatch.setenv("EFSISH_S3_LEAN", lean)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(f"s3://{seaweedfs_target.bucket}/creds", seaweedfs_target.options())
    for call in (store.check, lambda: store.head("k"), lambda: store.get("k")):
        with pytest.raises(StoreConfigError) as e:
            await call()
        assert f"rejected the credentials ({code}): {WRONG_KEY}" in str(e.value)
    await store.aclose()


@pytest.mark.integration
def test_cli_says_a_wrong_secret_is_wrong(seaweedfs_target) -> None:
    url = f"s3://{seaweedfs_target.bucket}/cli-creds"
    proc = subprocess.run(
        [sys.executable, "-m", "efsish", "check", url, "--endpoint", seaweedfs_target.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and WRONG_KEY in lines[0], proc.stderr
    assert "permission" not in lines[0]


@pytest.mark.integration
async def test_check_passes_on_seaweedfs(seaweedfs_target) -> None:
    store = open_store(f"s3://{seaweedfs_target.bucket}/ok", seaweedfs_target.options())
    await store.check()  # includes the conditional-write probe


def test_cli_prints_one_line_not_a_traceback(moto_target) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "efsish",
            "check",
            "s3://no-such-bucket-xyz",
            "--endpoint",
            moto_target.endpoint,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("efsish: bucket 'no-such-bucket-xyz' does not exist")


class _Raw:
    """Just enough of a urllib3 response for botocore to read a canned body."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, *_: Any, **__: Any) -> Any:
        yield self.body


async def test_server_refusing_crc32c_gets_crc32(moto_target, caplog) -> None:
    """Some S3-compatible servers refuse x-amz-checksum-crc32c (400 InvalidRequest,
    "Checksum algorithm not supported"): uploads switch to CRC-32 instead of failing."""
    from botocore.awsrequest import AWSResponse, HTTPHeaders

    store = open_store(
        f"s3://{moto_target.bucket}/nocrc32c", StoreOptions(endpoint=moto_target.endpoint)
    )
    assert isinstance(store, S3Store)
    seen: list[str] = []

    def refuse(request: Any, **_: Any) -> AWSResponse | None:
        names = {k.lower() for k in request.headers}
        seen.append("crc32c" if "x-amz-checksum-crc32c" in names else "crc32")
        if "x-amz-checksum-crc32c" not in names:
            return None  # sent on to the server
        body = (
            b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidRequest</Code>"
            b"<Message>Checksum algorithm not supported: CRC32C</Message></Error>"
        )
        headers = HTTPHeaders()
        headers["Content-Type"] = "application/xml"
        return AWSResponse(request.url, 400, headers, _Raw(body))

    # (botocore sends a response a before-send handler returns instead of the request)
    store._client.meta.events.register("before-send.s3.PutObject", refuse)  # type: ignore[arg-type]
    # Small PUTs take the lean path first; this server refuses its CRC-32C the same way
    # (an error status: the lean path hands the request to boto3).
    assert store._lean is not None
    lean_request = store._lean.request
    lean_seen: list[str] = []

    async def lean(method: str, key: str, body: bytes = b"", headers: Any = None) -> Any:
        if method == "PUT":
            names = {k.lower() for k in headers or {}}
            lean_seen.append("crc32c" if "x-amz-checksum-crc32c" in names else "crc32")
            if "x-amz-checksum-crc32c" in names:
                return None
        return await lean_request(method, key, body, headers)

    store._lean.request = lean  # type: ignore[method-assign]
    async with trio.open_nursery() as n:  # several in flight when the first refusal comes
        for i in range(6):
            n.start_soon(store.put, f"data/{i}", b"block %d" % i)
    for i in range(6):
        assert await store.get(f"data/{i}") == b"block %d" % i
    assert seen.count("crc32c") >= 1 and seen.count("crc32") == 6
    seen.clear()
    lean_seen.clear()
    await store.put("data/later", b"later")
    await store.put_if_absent("log/1", b"entry")
    assert lean_seen == ["crc32", "crc32"]  # CRC-32 only from now on, on both paths
    assert seen == []  # and the lean path's PUTs are accepted
    assert await store.get("data/later") == b"later"
    assert caplog.text.count("refuses x-amz-checksum-crc32c") == 1


@pytest.mark.integration
async def test_body_damaged_in_transit_is_refused(seaweedfs_target) -> None:
    """Payloads are not hashed into the signature; the CRC-32C every PUT carries is what
    lets the server refuse a body damaged on the way (and efsish sends it again). (The
    boto3 path, which TLS endpoints use for data blocks and every endpoint when a lean
    request fails; the lean path's test is the next one.)"""
    store = open_store(f"s3://{seaweedfs_target.bucket}/crc", seaweedfs_target.options())
    assert isinstance(store, S3Store)
    store._lean = None
    damaged: list[int] = []

    def damage(request: Any, **_: Any) -> None:
        if len(damaged) < budget[0] and request.body:
            raw = request.body
            body = bytearray(raw.read() if hasattr(raw, "read") else raw)
            if hasattr(raw, "seek"):
                raw.seek(0)
            body[len(body) // 2] ^= 0xFF
            request.body = bytes(body)
            damaged.append(1)

    budget = [1]
    store._client.meta.events.register("before-send.s3.PutObject", damage)
    data = os.urandom(SIGNED_BODY_MAX + 1)
    await store.put("data/once", data)  # damaged once, resent intact
    assert damaged == [1]
    assert await store.get("data/once") == data
    damaged.clear()  # the same for a conditional PUT (a checkpoint) too big for lean
    big = os.urandom(LEAN_MAX_BODY + 1)
    await store.put_if_absent("checkpoints/once", big)
    assert damaged == [1]
    assert await store.get("checkpoints/once") == big
    budget[0] = 100  # damaged every time: an error, and nothing stored
    with pytest.raises(TransientStoreError, match="BadDigest"):
        await store.put("data/always", data)
    with pytest.raises(NotFound):
        await store.get("data/always")


@pytest.mark.integration
async def test_lean_puts_damaged_in_transit_are_refused_and_sent_again(seaweedfs_target) -> None:
    """The lean path signs each body's SHA-256, but SeaweedFS stores a body that does not
    match it; the CRC-32C header is what it checks. A log entry stored damaged would stop
    every mount at its position for good, so: a damaged lean PUT (conditional or not) is
    refused, sent again through boto3, and stored intact."""
    store = open_store(f"s3://{seaweedfs_target.bucket}/leandmg", seaweedfs_target.options())
    assert isinstance(store, S3Store) and store._lean is not None
    lean = store._lean
    request_bytes = lean._request_bytes
    damaged: list[str] = []

    def damage(method: str, key: str, body: bytes, extra: Any, **kw: Any) -> Any:
        pieces = request_bytes(method, key, body, extra, **kw)
        if method != "PUT" or pieces is None or not body or len(damaged) >= budget[0]:
            return pieces
        damaged.append(key)
        req = pieces[-1]  # the body is the end of the last piece
        i = len(req) - len(body) // 2  # a byte in the middle of the body
        return [*pieces[:-1], req[:i] + bytes([req[i] ^ 0xFF]) + req[i + 1 :]]

    budget = [3]
    lean._request_bytes = damage  # type: ignore[method-assign,assignment]
    entry = os.urandom(3000)
    block = os.urandom(100 * 1024)
    big = os.urandom(4 << 20)  # a whole data block: unsigned, only its CRC-32C protects it
    await store.put_if_absent("log/1", entry)
    await store.put("data/small", block)
    await store.put("data/big", big)
    assert len(damaged) == 3 and lean.fallbacks == 3
    assert await store.get("log/1") == entry
    assert await store.get("data/small") == block
    assert await store.get("data/big") == big
    # Undamaged, every kind of PUT stays on the lean path (the checksum header is signed
    # correctly: a refused signature would have fallen back to boto3 as well).
    requests = lean.requests
    await store.put_if_absent("log/2", entry)
    await store.put("data/small2", block)
    await store.put("data/big2", big)
    assert lean.fallbacks == 3 and len(damaged) == 3 and lean.requests == requests + 3
    assert await store.get("data/big2") == big


@pytest.mark.integration
async def test_lean_requests_and_their_fallback(seaweedfs_target, monkeypatch) -> None:
    """Small GET/HEAD/conditional PUT take the lean signed path; an error status goes
    through boto3 again, so the error still says what to fix."""
    store = open_store(f"s3://{seaweedfs_target.bucket}/lean", seaweedfs_target.options())
    assert isinstance(store, S3Store) and store._lean is not None
    await store.put_if_absent("log/1", b"x")
    with pytest.raises(PreconditionFailed):
        await store.put_if_absent("log/1", b"y")
    await store.put_if_absent("log/1", b"x")  # our own earlier success: idempotent
    assert await store.get("log/1") == b"x"
    assert (await store.head("log/1")).size == 1
    with pytest.raises(NotFound):
        await store.get("log/2")
    with pytest.raises(NotFound):
        await store.head("log/2")
    assert store._lean.requests >= 7
    assert store._lean.fallbacks == 0
    missing = open_store("s3://no-such-bucket-lean/x", seaweedfs_target.options())
    with pytest.raises(StoreConfigError, match="does not exist"):
        await missing.get("log/1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    bad = open_store(f"s3://{seaweedfs_target.bucket}/lean", seaweedfs_target.options())
    assert isinstance(bad, S3Store) and bad._lean is not None
    with pytest.raises(StoreConfigError, match=r"credentials|access denied"):
        await bad.get("log/1")
    assert bad._lean.fallbacks >= 1


async def test_only_a_real_409_is_retried_as_a_conflict(moto_target, monkeypatch) -> None:
    """A transient error on a key whose name contains "409" (log position 409) is that
    error, not a conflict to retry eight times."""
    from efsish.errors import WriteConflict

    store = open_store(
        f"s3://{moto_target.bucket}/c409", StoreOptions(endpoint=moto_target.endpoint)
    )
    assert isinstance(store, S3Store)
    calls: list[str] = []
    error: list[Exception] = [TransientStoreError("S3 error ServiceUnavailable after retries")]

    async def no_lean(*_: Any, **__: Any) -> None:
        return None

    async def put_checked(key: str, **_: Any) -> None:
        calls.append(key)
        raise error[0]

    monkeypatch.setattr(store, "_lean_call", no_lean)
    monkeypatch.setattr(store, "_put_checked", put_checked)

    async def no_pause(seconds: float) -> None:
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(trio, "sleep", no_pause)  # no back-off between the retries
    with pytest.raises(TransientStoreError, match="ServiceUnavailable"):
        await store.put_if_absent("log/0000000000000409", b"e")
    assert len(calls) == 1
    calls.clear()
    error[0] = WriteConflict("log/0000000000000410: S3 error ConditionalRequestConflict")
    with pytest.raises(TransientStoreError, match="kept conflicting"):
        await store.put_if_absent("log/0000000000000410", b"e")
    assert len(calls) == 8


async def test_a_conditional_put_to_a_missing_bucket_says_so(moto_target) -> None:
    store = open_store("s3://no-such-bucket-cond/x", StoreOptions(endpoint=moto_target.endpoint))
    assert isinstance(store, S3Store) and store._lean is not None
    with pytest.raises(StoreConfigError, match="does not exist"):
        await store.put_if_absent("log/0000000000000001", b"v")


async def test_our_own_write_is_recognised_when_its_read_back_arrives_damaged(
    moto_target,
) -> None:
    """The conditional PUT was stored but its answer lost; the resend gets 412 and the
    read-back that tells our own write from another's arrives damaged once: it is read
    again, and the write is ours (a log entry judged another mount's would turn a
    successful mkdir into EEXIST)."""
    store = open_store(
        f"s3://{moto_target.bucket}/own", StoreOptions(endpoint=moto_target.endpoint)
    )
    assert isinstance(store, S3Store) and store._lean is not None
    real = store._lean.request
    state = {"lost": 0, "damaged": 0}

    async def request(method: str, key: str, body: bytes = b"", headers: Any = None) -> Any:
        r = await real(method, key, body, headers)
        if method == "PUT" and headers and "If-None-Match" in headers and not state["lost"]:
            state["lost"] = 1
            return None  # stored, answer lost
        if method == "GET" and r is not None and r.status == 200 and not state["damaged"]:
            state["damaged"] = 1
            r.body = r.body[:5] + bytes([r.body[5] ^ 1]) + r.body[6:]
        return r

    store._lean.request = request  # type: ignore[method-assign]
    await store.put_if_absent("log/1", b"our entry " * 30)
    assert state == {"lost": 1, "damaged": 1}
    with pytest.raises(PreconditionFailed):  # another writer's bytes, read twice alike
        await store.put_if_absent("log/1", b"another entry")
