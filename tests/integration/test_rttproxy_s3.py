"""A real S3 round trip through the latency-injecting proxy: a GET from SeaweedFS takes
the added round trip longer, through the trio API and through the command line (which
also counts the requests that passed)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import trio

from efsish.devtools.rttproxy import command, rtt_proxy
from tests.conftest import S3Target

RTT = 0.020


def _client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _get_times(client: Any, bucket: str, key: str, n: int) -> list[float]:
    client.get_object(Bucket=bucket, Key=key)["Body"].read()  # connection up, untimed
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"x" * 1000
        out.append(time.perf_counter() - t0)
    return out


async def test_get_through_the_proxy_takes_the_added_round_trip(
    seaweedfs_target: S3Target,
) -> None:
    u = urlsplit(seaweedfs_target.endpoint)
    bucket, key = seaweedfs_target.bucket, f"rttproxy/{uuid.uuid4().hex}"
    direct = _client(seaweedfs_target.endpoint)
    await trio.to_thread.run_sync(
        lambda: direct.put_object(Bucket=bucket, Key=key, Body=b"x" * 1000)
    )
    base = await trio.to_thread.run_sync(_get_times, direct, bucket, key, 20)
    async with rtt_proxy(u.hostname or "127.0.0.1", u.port or 80, RTT) as p:
        far = await trio.to_thread.run_sync(_get_times, _client(p.endpoint), bucket, key, 20)
        assert p.stats.requests["GET"] == 21
    added = statistics.median(far) - statistics.median(base)
    assert min(far) >= RTT
    assert RTT - 0.002 <= added <= RTT + 0.006, (base, far)


def test_command_line_proxy(seaweedfs_target: S3Target, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        command(seaweedfs_target.endpoint, RTT * 1000, stats),
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c = _client(f"http://127.0.0.1:{port}")
        key = f"rttproxy/{uuid.uuid4().hex}"
        c.put_object(Bucket=seaweedfs_target.bucket, Key=key, Body=b"x" * 1000)
        times = _get_times(c, seaweedfs_target.bucket, key, 5)
        assert min(times) >= RTT
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    counts = json.loads(stats.read_text())
    assert counts["requests"] == {"PUT": 1, "GET": 6}
    assert counts["open_connections"] == 0
