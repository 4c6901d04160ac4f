"""A read-only mount on SeaweedFS with credentials that may only read and list: it works
and writes nothing (every write would be refused by the server, and the daemon would say
so in its log); a read-write mount with the same credentials fails with one clear line."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from efsish.devtools import s3server
from efsish.mount import _registry_file
from tests.conftest import S3Target
from tests.fuse.conftest import Mount, efsish, stop_mount

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

RO_ENV = {
    "AWS_ACCESS_KEY_ID": s3server.RO_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": s3server.RO_SECRET_KEY,
}


def objects(target: S3Target, prefix: str) -> dict[str, str]:
    """Every object under `prefix` and its ETag, read with the full credentials."""
    s3 = boto3.client("s3", endpoint_url=target.endpoint)
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["ETag"]
    return out


def test_read_only_credentials(
    mounter: Callable[..., Mount], seaweedfs_target: S3Target, tmp_path: Path
) -> None:
    prefix = f"fs-ro-{uuid.uuid4().hex[:8]}"
    store = f"s3://{seaweedfs_target.bucket}/{prefix}"
    ep = ("--endpoint", seaweedfs_target.endpoint)
    efsish("format", store, *ep, "--block-size", "1M")
    rw = mounter(store, *ep, fmt=False)
    data = os.urandom(2 * 1024 * 1024 + 7)
    (rw.path / "big").write_bytes(data)
    (rw.path / "small").write_text("hello")
    stop_mount(rw)
    before = objects(seaweedfs_target, prefix)

    # A read-write mount with these credentials: refused before it mounts, in one line.
    mp = tmp_path / "ro-mp"
    mp.mkdir()
    rw_cache, cache = tmp_path / "rw-cache", tmp_path / "ro-cache"
    res = efsish(
        "mount", store, str(mp), *ep, "--cache-dir", str(rw_cache), check=False, env=RO_ENV
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "not write" in lines[0] and "-o ro" in lines[0], lines[0]

    opts = ("-o", "ro,poll_interval=0.2")
    efsish("mount", store, str(mp), *ep, "--cache-dir", str(cache), *opts, env=RO_ENV)
    pid = int(json.loads(_registry_file(str(mp)).read_text())["pid"])
    ro = Mount(store, mp, cache, pid)
    try:
        assert sorted(os.listdir(mp)) == ["big", "small"]
        assert (mp / "big").read_bytes() == data
        deadline = time.monotonic() + 5  # poll, heartbeat and access-time intervals
        while time.monotonic() < deadline:
            assert (mp / "small").read_text() == "hello"
            time.sleep(0.2)
    finally:
        stop_mount(ro)
    log = ro.log()
    assert "denied" not in log.lower() and "not write" not in log, log[-3000:]
    assert objects(seaweedfs_target, prefix) == before
