"""Bad store configuration gives one clear, typed error that says what to fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from efsish.devtools import s3server
from efsish.errors import StoreConfigError
from efsish.store import StoreOptions, open_store


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


@pytest.mark.integration
async def test_wrong_credentials(seaweedfs_target, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    store = open_store(f"s3://{seaweedfs_target.bucket}/x", seaweedfs_target.options())
    with pytest.raises(StoreConfigError, match=r"credentials|access denied"):
        await store.check()


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
