"""Shared fixtures: the S3 servers every tier may need, started once per session.

- moto: moto's threaded server in this process (fast, for the contract suite).
- seaweedfs: a real SeaweedFS server started with efsish.devtools.s3server (integration
  tier), stopped by PID at the end of the session.
- env: any endpoint named by EFSISH_TEST_S3_ENDPOINT (+ _BUCKET, and the usual AWS_*
  credentials), e.g. MinIO, Ceph or AWS.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from efsish.devtools import s3server
from efsish.store import StoreOptions


@dataclass(frozen=True)
class S3Target:
    """How tests reach one S3 server."""

    name: str
    endpoint: str
    bucket: str

    def options(self) -> StoreOptions:
        return StoreOptions(endpoint=self.endpoint)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint}


def _set_test_credentials() -> None:
    # Static test credentials; moto accepts any, SeaweedFS is configured with these.
    if not os.environ.get("EFSISH_TEST_S3_ENDPOINT"):
        os.environ["AWS_ACCESS_KEY_ID"] = s3server.ACCESS_KEY
        os.environ["AWS_SECRET_ACCESS_KEY"] = s3server.SECRET_KEY
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # Never let a developer's own ~/.aws profile leak into tests.
    os.environ.pop("AWS_PROFILE", None)


_set_test_credentials()


def _make_motos_conditional_put_atomic() -> None:
    """moto's server answers requests in threads, and its PUT with If-None-Match: *
    checks that the key is absent, then stores it, with no lock between the two: two
    racing writers can both get 200 (seen once in the 16-process race of the contract
    suite). SeaweedFS and AWS make the check and the write one step; so, here, does a
    lock around moto's PUT of an object."""
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_efsish_locked", False):
        return
    lock = threading.Lock()
    put = S3Response.put_object

    def locked(self: Any) -> Any:
        with lock:
            return put(self)

    locked._efsish_locked = True  # type: ignore[attr-defined]
    S3Response.put_object = locked  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def moto_target() -> Iterator[S3Target]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    _make_motos_conditional_put_atomic()
    port = s3server.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="efsish-moto")
    try:
        yield S3Target("moto", endpoint, "efsish-moto")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_target() -> Iterator[S3Target]:
    state = Path(tempfile.mkdtemp(prefix="efsish-test-seaweedfs-"))
    info = s3server.start("seaweedfs", state, bucket="efsish-test", timeout=90)
    try:
        yield S3Target("seaweedfs", info.endpoint, info.bucket)
    finally:
        s3server.stop(state)


@pytest.fixture(scope="session")
def env_target() -> S3Target:
    endpoint = os.environ["EFSISH_TEST_S3_ENDPOINT"]
    return S3Target("env", endpoint, os.environ.get("EFSISH_TEST_S3_BUCKET", "efsish-test"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier by directory: tests/fuse are `fuse`, tests/integration are `integration`."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "fuse" in parts:
            item.add_marker(pytest.mark.fuse)
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
