"""The boto3 ObjectStore for any S3-compatible endpoint (AWS, MinIO, Ceph, SeaweedFS...).

URL: s3://BUCKET[/PREFIX]. The endpoint comes from the `endpoint` argument or the standard
AWS_ENDPOINT_URL variable; credentials from the standard AWS chain (environment,
~/.aws, instance role). Single requests are retried by botocore ("standard" mode, with
backoff); what still fails becomes a typed efsish error with a message that says what to
fix. Every blocking boto3 call runs in a worker thread behind a trio.CapacityLimiter
sized like the HTTP connection pool, so the event loop never blocks.

This module must not decide anything about the filesystem; it only moves bytes.
"""

from __future__ import annotations

import base64
import copy
import email.utils
import logging
import os
import random
import threading
import urllib.parse
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session
import google_crc32c
import trio

from efsish.errors import (
    NotFound,
    PermanentStoreError,
    PreconditionFailed,
    StoreConfigError,
    StoreError,
    TransientStoreError,
    WriteConflict,
)
from efsish.store.base import ObjectInfo, ObjectStore, check_key, range_past_end
from efsish.store.s3lean import LeanS3, Response
from efsish.store.s3lean import usable_for as lean_usable_for

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "BadDigest",  # the body was damaged on the way: sending it again is safe
    "RequestTimeTooSkewed",
    "ConditionalRequestConflict",
    "OperationAborted",
}
_KEY_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch"}
_TOKEN_CODES = {"InvalidToken", "ExpiredToken"}
_CONN_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
)
CONFLICT_RETRIES = 8
DIGEST_RETRIES = 3


class _BareForbidden(StoreConfigError):
    """A 403 that does not say why (the answer to a HEAD has no body): a wrong access key
    or secret looks exactly like missing permission. `S3Store._explain` tells them apart."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split s3://BUCKET[/PREFIX] into (bucket, prefix-without-slashes)."""
    if not url.startswith("s3://"):
        raise StoreConfigError(f"not an s3:// URL: {url}")
    rest = url[len("s3://") :].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreConfigError(f"{url}: missing bucket name (expected s3://BUCKET[/PREFIX])")
    return bucket, prefix.strip("/")


def _crc32c(data: bytes) -> str:
    """The x-amz-checksum-crc32c value of `data` (base64 of the big-endian CRC-32C):
    ~0.25 ms per 4 MiB with the CPU's CRC instruction, so it is computed inline."""
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _crc32(data: bytes) -> str:
    """The x-amz-checksum-crc32 value of `data`: for servers that refuse CRC-32C."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _refuses_checksum(e: StoreError) -> bool:
    """The server does not do the checksum algorithm we sent: a 4xx that says so (e.g.
    "InvalidRequest: Checksum algorithm not supported: CRC32C"), or a 501 NotImplemented.
    A wrong guess costs one resend with CRC-32."""
    text = str(e).lower()
    if isinstance(e, PermanentStoreError):
        return "checksum" in text or "crc32c" in text
    return isinstance(e, TransientStoreError) and "notimplemented" in text


class _SearchPaths(list[str]):
    """A loader's search path that ignores a path it already has (see `_session`)."""

    def append(self, path: str) -> None:
        if path not in self:
            super().append(path)


class _SharedLoader(botocore.loaders.Loader):
    """One botocore data loader for every store this process opens."""

    def __init__(self) -> None:
        super().__init__()
        self._search_paths = _SearchPaths(self.search_paths)


_LOADER = _SharedLoader()
# Clients are made one at a time: the loader's cache is a plain dict, and two threads
# loading a model for the first time would both process it (client creation holds the
# GIL nearly throughout, so this costs no parallelism).
_CLIENT_LOCK = threading.Lock()


def _session() -> boto3.session.Session:
    """A new boto3 session (own credentials and configuration, read now) whose service
    models come from `_LOADER`. A session of its own parses the S3 model again: 0.23 s
    per store opened here, 0.07 s with the shared loader, and 16 stores opened at once by
    16 threads took 6 s. boto3 adds its own data directory to the loader of every session
    it makes; `_SearchPaths` keeps that to one entry."""
    core = botocore.session.Session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


class DateSeen:
    """The store's `Date` header in the newest response (either path), as epoch seconds
    (LEASES.md §7 (4)). The lean path reports from the trio thread, boto3's `after-call`
    event from its worker threads; one assignment of a float either way."""

    def __init__(self) -> None:
        self.t: float | None = None
        self._raw: str | None = None

    def saw(self, raw: str | None) -> None:
        if not raw or raw == self._raw:
            return
        try:
            t = email.utils.parsedate_to_datetime(raw).timestamp()
        except (TypeError, ValueError):
            return  # a malformed Date says nothing; the guard waits for a good one
        self._raw, self.t = raw, t

    def after_call(self, http_response: Any = None, **_: Any) -> None:
        if http_response is not None:
            self.saw(http_response.headers.get("date"))


class S3Store(ObjectStore):
    """ObjectStore over boto3. See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        path_style: bool = True,
        verify_tls: bool = True,
        concurrency: int = 32,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        config = botocore.config.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=concurrency,
            # Bodies are not SHA-256-hashed into the signature (botocore would do it for
            # every 4 MiB block over http: ~2 ms CPU each); instead every PUT carries a
            # CRC-32C (x-amz-checksum-crc32c, ~0.25 ms per 4 MiB) that the server checks, so
            # a body damaged in transit is still refused (BadDigest), and data blocks are
            # verified against their hash in the metadata on every read anyway.
            s3={
                "addressing_style": "path" if path_style else "auto",
                "payload_signing_enabled": False,
            },
            tcp_keepalive=True,
            # Only send/require checksums where the operation needs them: many
            # S3-compatible servers reject the newer default CRC trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = _session()
        with _CLIENT_LOCK:
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=region or session.region_name or "us-east-1",
                config=config,
                verify=verify_tls,
            )
        self._limiter = trio.CapacityLimiter(concurrency)
        self._date = DateSeen()  # shared with the views enclosing() makes
        self._client.meta.events.register("after-call.s3", self._date.after_call)
        self._owns_client = True  # False in the views enclosing() makes
        self._put_crc32c = True  # False once the server refused x-amz-checksum-crc32c
        # Whole-object GET, HEAD and small PUTs go through a lean signed path (s3lean.py) when
        # the endpoint is addressed path-style; anything unusual falls back to boto3.
        self._lean: LeanS3 | None = None
        if (
            self.endpoint
            and path_style
            and os.environ.get("EFSISH_S3_LEAN", "1") != "0"
            and lean_usable_for(self.endpoint)
        ):
            self._lean = LeanS3(
                self.endpoint,
                self.bucket,
                self._client.meta.region_name,
                session.get_credentials,
                verify_tls=verify_tls,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                pool_size=concurrency,
            )

    async def _lean_call(
        self, method: str, full: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response | None:
        if self._lean is None:
            return None
        r = await self._lean.request(method, full, body, headers)
        if r is not None:
            self._date.saw(r.headers.get("date"))
        return r

    def server_date(self) -> float | None:
        return self._date.t

    # ------------------------------------------------------------------------ helpers

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unk(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def endpoint_url(self) -> str | None:
        return str(self.endpoint or self._client.meta.endpoint_url)

    def endpoint_host(self) -> str | None:
        # boto3's endpoint_url is the AWS regional endpoint when none is configured.
        return urllib.parse.urlsplit(self.endpoint or self._client.meta.endpoint_url).hostname

    def _where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint or 'the default AWS endpoint'}"

    def _map(self, exc: Exception, key: str) -> StoreError:
        """Translate a botocore exception into one typed efsish error."""
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreConfigError(
                "no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "configure ~/.aws/credentials, or attach an instance role"
            )
        if isinstance(exc, _CONN_ERRORS):
            return TransientStoreError(
                f"cannot reach {self._where()} ({type(exc).__name__}): is the server running "
                "and AWS_ENDPOINT_URL / --endpoint right?"
            )
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in ("NoSuchKey", "InvalidRange") or (
                status in (404, 416) and code != "NoSuchBucket"
            ):
                return NotFound(key)
            if code == "PreconditionFailed" or status == 412:
                return PreconditionFailed(key)
            if code == "NoSuchBucket":
                return StoreConfigError(
                    f"bucket {self.bucket!r} does not exist at "
                    f"{self.endpoint or 'AWS'}: create it (e.g. `aws s3 mb s3://{self.bucket}`) "
                    "or fix the URL"
                )
            if code in _KEY_CODES:
                return StoreConfigError(
                    f"{self._where()} rejected the credentials ({code}): the access key or "
                    "secret is wrong; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                    "~/.aws/credentials (and AWS_PROFILE)"
                )
            if code in _TOKEN_CODES:
                return StoreConfigError(
                    f"{self._where()} rejected the session token ({code}): it is wrong or "
                    "expired; renew AWS_SESSION_TOKEN or the profile in ~/.aws"
                )
            if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
                cls = _BareForbidden if code in ("", "403", "Forbidden") else StoreConfigError
                return cls(
                    f"access denied to {self._where()} ({code or status}): the credentials "
                    "lack permission for this bucket/prefix"
                )
            if status == 409 or code == "ConditionalRequestConflict":
                return WriteConflict(f"{key}: S3 error {code or status} (a concurrent write)")
            if code in _TRANSIENT_CODES or status >= 500:
                return TransientStoreError(f"{key}: S3 error {code or status} after retries")
            return PermanentStoreError(
                f"{key}: S3 error {code or status}: {err.get('Message', '')}"
            )
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return TransientStoreError(f"{key}: {exc}")
        raise exc

    async def _call(self, key: str, fn: Callable[..., T], **kwargs: Any) -> T:
        def run() -> T:
            try:
                return fn(**kwargs)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                raise self._map(e, key) from e

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def _explain(self, e: _BareForbidden) -> NoReturn:
        """Raise what a bodiless 403 means: a LIST of the prefix, whose error answer says
        why (SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied...), tells wrong
        credentials from missing permission; `e` itself if the LIST says nothing more."""
        try:
            await self._call(
                "/",
                self._client.list_objects_v2,
                Bucket=self.bucket,
                Prefix=f"{self.prefix}/" if self.prefix else "",
                MaxKeys=1,
            )
        except StoreConfigError as why:
            if not isinstance(why, _BareForbidden):
                raise why from None
        raise e

    # --------------------------------------------------------------------- async API

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        full = self._k(key)
        if (start is not None and start < 0) or (end is not None and end < (start or 0)):
            raise ValueError(f"invalid byte range [{start}, {end})")
        if end is not None and end == (start or 0):
            info = await self.head(key)  # empty range: only existence matters
            if range_past_end(info.size, start):
                raise NotFound(key)
            return b""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if start is not None or end is not None:
            s = start or 0
            kwargs["Range"] = f"bytes={s}-" if end is None else f"bytes={s}-{end - 1}"
        # A range (random reads) too: boto3 in a worker thread costs ~1-2 ms more. A
        # 416 or an empty object's range goes on to boto3, which says what it means.
        r = await self._lean_call(
            "GET", full, headers={"Range": kwargs["Range"]} if "Range" in kwargs else None
        )
        if r is not None:
            if r.status == 200 and "Range" not in kwargs:
                return r.body
            if r.status == 206 and "Range" in kwargs:
                return r.body
            if r.status == 200:  # a server that ignores Range sends the whole object
                return r.body[start or 0 : end]
            if r.status == 404 and b"NoSuchBucket" not in r.body:
                raise NotFound(key)

        def read() -> bytes:
            resp = self._client.get_object(**kwargs)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data

        try:
            return await self._call(key, read)
        except NotFound:
            if "Range" in kwargs and not start:
                # Some servers answer 416 to a range on an empty object.
                info = await self.head(key)
                if info.size == 0:
                    return b""
            raise

    async def _put_checked(self, key: str, **kwargs: Any) -> None:
        """put_object with the upload checksum (see the client config above): CRC-32C,
        or CRC-32 once the server refused CRC-32C (a warning, once) instead of failing
        every upload. Uploads already in flight with CRC-32C when the first refusal
        arrives are each sent again."""
        payload: bytes = kwargs["Body"]
        if not self._put_crc32c:
            await self._call(key, self._client.put_object, **kwargs, ChecksumCRC32=_crc32(payload))
            return
        try:
            await self._call(
                key, self._client.put_object, **kwargs, ChecksumCRC32C=_crc32c(payload)
            )
        except StoreError as e:
            if not _refuses_checksum(e):
                raise
            if self._put_crc32c:
                self._put_crc32c = False
                log.warning(
                    "%s refuses x-amz-checksum-crc32c (%s); sending CRC-32 checksums instead",
                    self._where(),
                    e,
                )
            await self._call(key, self._client.put_object, **kwargs, ChecksumCRC32=_crc32(payload))

    def _checksum_header(self, payload: bytes) -> dict[str, str]:
        """The upload checksum of a lean PUT, as boto3 would send it (see
        `_put_checked`). Servers need not check the signed SHA-256 of a body (SeaweedFS
        4.48 stores a damaged one), but they check this: a body damaged on the way is
        refused (BadDigest), and the caller sends it again through boto3."""
        if self._put_crc32c:
            return {"x-amz-checksum-crc32c": _crc32c(payload)}
        return {"x-amz-checksum-crc32": _crc32(payload)}

    async def put(self, key: str, data: bytes) -> None:
        payload = bytes(data)
        # The lean path takes every plain PUT it can (data blocks too, on plain http:
        # s3lean.py says why); the rest goes to boto3 in a worker thread.
        if self._lean is not None and self._lean.takes(len(payload)):
            r = await self._lean_call("PUT", self._k(key), payload, self._checksum_header(payload))
            if r is not None and r.status in (200, 204):
                return
            # Anything else (a damaged body refused, a server that does not do CRC-32C, a
            # missing bucket) is sent again through boto3, which says what went wrong.
        for attempt in range(DIGEST_RETRIES):
            try:
                await self._put_checked(key, Bucket=self.bucket, Key=self._k(key), Body=payload)
                return
            except TransientStoreError as e:
                # The server refused a body that arrived damaged: send it again.
                if "BadDigest" not in str(e) or attempt == DIGEST_RETRIES - 1:
                    raise
                log.warning("%s arrived damaged at the server (BadDigest); resending", key)

    async def put_if_absent(self, key: str, data: bytes) -> None:
        full = self._k(key)
        payload = bytes(data)

        async def attempt() -> None:
            r = await self._lean_call(
                "PUT", full, payload, {"If-None-Match": "*", **self._checksum_header(payload)}
            )
            if r is not None and r.status in (200, 204):
                return
            if r is not None and r.status == 412:
                raise PreconditionFailed(key)
            if r is not None and r.status == 409:
                raise WriteConflict(f"{key}: 409 ConditionalRequestConflict")
            # No answer, or another status (404 NoSuchBucket...): boto3 sends it again and
            # says what went wrong.
            await self._put_checked(
                key, Bucket=self.bucket, Key=full, Body=payload, IfNoneMatch="*"
            )

        for attempt_no in range(CONFLICT_RETRIES):
            try:
                await attempt()
                return
            except PreconditionFailed:
                # A retry of our own request may have hit its earlier success: idempotent.
                held = await self._holds(key, payload)
                if held is None:
                    continue  # gone again (412 then 404): send it once more
                if held:
                    return
                raise
            except WriteConflict:
                # Another conditional write was in flight at the server.
                await trio.sleep(random.uniform(0.01, 0.05) * (2**attempt_no))
            except TransientStoreError as e:
                # The server refused a body that arrived damaged (nothing was stored):
                # send it again, as `put` does.
                if "BadDigest" not in str(e) or attempt_no >= DIGEST_RETRIES - 1:
                    raise
                log.warning("%s arrived damaged at the server (BadDigest); resending", key)
        raise TransientStoreError(f"{key}: conditional create kept conflicting; try again")

    async def _holds(self, key: str, payload: bytes) -> bool | None:
        """Whether `key` holds exactly `payload` (our own earlier write); None if it does
        not exist. A GET carries no checksum, so a copy that arrives different is read
        again: two identical copies that differ from `payload` are another writer's."""
        last: bytes | None = None
        for _ in range(4):
            try:
                got = await self.get(key)
            except NotFound:
                return None
            if got == payload:
                return True
            if got == last:
                return False
            last = got
        raise TransientStoreError(f"{key}: read back differently each time; try again")

    async def head(self, key: str) -> ObjectInfo:
        r = await self._lean_call("HEAD", self._k(key))
        if r is not None:
            if r.status == 200:
                size = int(r.headers.get("content-length", "0"))
                return ObjectInfo(key, size, r.headers.get("etag", "").strip('"'))
            if r.status == 404:
                raise NotFound(key)
        try:
            resp = await self._call(
                key, self._client.head_object, Bucket=self.bucket, Key=self._k(key)
            )
        except _BareForbidden as e:
            await self._explain(e)
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp.get("ETag", "")).strip('"'))

    async def delete(self, key: str) -> None:
        try:
            await self._call(key, self._client.delete_object, Bucket=self.bucket, Key=self._k(key))
        except NotFound:
            pass

    async def list(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
        if start_after is not None:
            kwargs["StartAfter"] = base + start_after
        while True:
            resp = await self._call(prefix or "/", self._client.list_objects_v2, **kwargs)
            for obj in resp.get("Contents", []):
                yield ObjectInfo(
                    self._unk(obj["Key"]), int(obj["Size"]), str(obj.get("ETag", "")).strip('"')
                )
            if not resp.get("IsTruncated"):
                return
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    async def check(self) -> None:
        """Check reachability, credentials, the bucket, and conditional-write support."""
        try:
            await self._call("/", self._client.head_bucket, Bucket=self.bucket)
        except NotFound:
            raise StoreConfigError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS'}: "
                f"create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix the URL"
            ) from None
        except TransientStoreError as e:
            raise StoreConfigError(str(e)) from None
        except _BareForbidden as e:
            await self._explain(e)
        probe = f".efsish-probe/{uuid.uuid4().hex}"
        try:
            await self.put_if_absent(probe, b"a")
        except StoreConfigError:
            # The bucket answered (head_bucket above), so the credentials are valid: they
            # may read but not write.
            raise StoreConfigError(
                f"the credentials can read {self._where()} but not write to it (a test "
                "write was refused); mount read-only with `-o ro`, or use credentials "
                "allowed to write"
            ) from None
        try:
            try:
                await self.put_if_absent(probe, b"b")
            except PreconditionFailed:
                return
            raise StoreConfigError(
                f"{self._where()} ignores conditional writes (If-None-Match: *); efsish needs "
                "them to order its metadata log. Use a server that supports them "
                "(AWS S3, MinIO >= 2024-11, SeaweedFS >= 3.80, Ceph >= 19)."
            )
        finally:
            await self.delete(probe)

    def enclosing(self) -> Sequence[ObjectStore]:
        parts = self.prefix.split("/") if self.prefix else []
        views: list[ObjectStore] = []
        for n in range(len(parts) - 1, -1, -1):
            view = copy.copy(self)  # the same client, lean path and limiter
            view.prefix = "/".join(parts[:n])
            view.url = f"s3://{self.bucket}/{view.prefix}" if n else f"s3://{self.bucket}"
            view._owns_client = False
            views.append(view)
        return views

    async def aclose(self) -> None:
        if not self._owns_client:
            return
        self._client.close()
        if self._lean is not None:
            self._lean.close()
