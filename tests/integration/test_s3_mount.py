"""End to end on a real S3 server (SeaweedFS): format, mount twice, share files, fsck."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from tests.fuse.conftest import efsish

pytestmark = [pytest.mark.integration, pytest.mark.fuse]


def test_two_mounts_on_seaweedfs(mounter, seaweedfs_target) -> None:
    store = f"s3://{seaweedfs_target.bucket}/fs-{uuid.uuid4().hex[:8]}"
    ep = ("--endpoint", seaweedfs_target.endpoint)
    efsish("format", store, *ep, "--block-size", "1M")
    a = mounter(store, *ep, fmt=False)
    b = mounter(store, *ep, fmt=False)
    data = os.urandom(5 * 1024 * 1024 + 123)
    (a.path / "home").mkdir()
    (a.path / "home" / "big").write_bytes(data)
    (a.path / "home" / "small").write_text("hello")
    assert (b.path / "home" / "big").read_bytes() == data
    assert (b.path / "home" / "small").read_text() == "hello"
    (b.path / "home" / "small").write_text("changed on b")
    assert (a.path / "home" / "small").read_text() == "changed on b"
    (a.path / "home" / "new").write_text("x")
    deadline = time.monotonic() + 5
    while "new" not in os.listdir(b.path / "home"):
        assert time.monotonic() < deadline, "a new name did not show up on the other mount"
        time.sleep(0.1)
    res = efsish("fsck", store, *ep, "-q", check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mount_errors_are_one_line(tmp_path, seaweedfs_target) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    ep = ("--endpoint", seaweedfs_target.endpoint)
    cases = [
        (f"s3://{seaweedfs_target.bucket}/unformatted-{uuid.uuid4().hex[:6]}", "efsish format"),
        ("s3://no-such-bucket-efsish/x", "does not exist"),
    ]
    for store, expect in cases:
        res = efsish("mount", store, str(mp), *ep, "--cache-dir", str(tmp_path / "c"), check=False)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], res.stderr
    res = efsish("mount", "s3://x/y", str(mp), *ep, "-o", "bogus=1", check=False)
    assert res.returncode == 2 and "unknown mount option" in res.stderr
    res = efsish("mount", "s3://x/y", str(tmp_path / "missing"), *ep, check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = efsish("mount", "s3://x/y", str(mp), "--endpoint", "http://127.0.0.1:1", check=False)
    assert res.returncode == 1 and "cannot reach" in res.stderr
    for env_bad in (
        {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"},
        {"AWS_SECRET_ACCESS_KEY": "wrong"},  # the right key id, a wrong secret
    ):
        res = efsish(
            "mount", f"s3://{seaweedfs_target.bucket}/x", str(mp), *ep, check=False, env=env_bad
        )
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "the access key or secret is wrong; check AWS_ACCESS_KEY_ID" in res.stderr
