"""A lean path for the small, latency-bound S3 requests: whole-object GET, HEAD and
conditional PUT of small objects (the metadata log's entries, mostly).

Every metadata operation waits for one or two of these, and botocore's client machinery
(parameter validation, the event system, response parsing) costs more CPU and wall time
than the request itself on a nearby server. Here a request is signed with botocore's own
SigV4 signer (`S3SigV4Auth`, so signing stays the library's job, credentials come from
the same provider chain and refresh as usual) and sent over a pooled urllib3 connection.

Only the plain outcomes are handled here: 200, 404 and 412 (and 409 for conditional
PUTs). Anything else — an error status, a connection problem, a redirect — returns None,
and the caller repeats the request through boto3, which retries, parses the error and
maps it to a clear message. This module must not retry, interpret errors, or be used for
path-less (virtual-hosted) addressing or multipart bodies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit
from urllib.request import getproxies, proxy_bypass

import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

PLAIN_STATUSES = frozenset({200, 204, 404, 409, 412})
GIVE_UP_AFTER = 5  # connection failures before any success: leave it all to boto3


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


class LeanS3:
    """Signed requests to one bucket at one endpoint, path-style."""

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
        self.base = f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}/"
        self.region = region
        self._credentials = credentials
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED" if verify_tls else "CERT_NONE"}
        if verify_tls:
            # The same CA bundle boto3 would use: AWS_CA_BUNDLE, else botocore's default.
            from botocore.httpsession import get_cert_path

            tls["ca_certs"] = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=pool_size,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            **tls,
        )
        self.requests = 0
        self.fallbacks = 0
        self.disabled = False

    def close(self) -> None:
        self._pool.clear()

    def request(
        self, method: str, key: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response | None:
        """Send one request for `key` (the full key, prefix included); None means "ask
        boto3 instead" (an error status, a connection failure, no credentials)."""
        creds = self._credentials()
        if creds is None or self.disabled:
            return None
        url = self.base + quote(key, safe="/~")
        req = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
        try:
            S3SigV4Auth(creds.get_frozen_credentials(), "s3", self.region).add_auth(req)
            resp = self._pool.request(
                method,
                url,
                body=body if method == "PUT" else None,
                headers=dict(req.headers.items()),
                redirect=False,
                preload_content=True,
            )
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            log.debug("lean %s %s failed (%s); falling back to boto3", method, key, e)
            self.fallbacks += 1
            if self.requests == 0 and self.fallbacks >= GIVE_UP_AFTER:
                log.info("lean S3 requests keep failing (%s); using boto3 only", e)
                self.disabled = True
            return None
        self.requests += 1
        if resp.status not in PLAIN_STATUSES:
            self.fallbacks += 1
            return None
        return Response(resp.status, resp.data, {k.lower(): v for k, v in resp.headers.items()})
