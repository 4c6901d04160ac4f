"""Recall latency of the lease mode (issue 20, docs/design/LEASES.md §6.4 and §11): two
mounts of a `--leases` filesystem, each through its own latency-adding store proxy. A
creates `/statN/f` and `/open_readN/f` (new top-level directories: domains A then holds)
and closes them; B then stats the first and opens and reads the second, which recalls
each domain from A. Both calls on B are timed, with
nudges on (`-o nudge=auto`) and off (`-o nudge=off`: A sees the recall at its next poll).
Before the samples each mode's two fresh mounts idle for --idle-seconds and the requests
each proxy passes meanwhile, scaled to an hour, are the requests per idle mount-hour.

    scripts/bench/recall [--store-rtt 20] [--samples 30] [--idle-seconds 60] [--out FILE]

Needs root (FUSE mounts). Starts and stops its own SeaweedFS, proxies and mounts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine_info, start_seaweedfs
from common import log, percentile, s3_env
from systems import FORMAT_ARGS, Efsish, Server, StoreProxy, stop_everything

BUCKET = "recall"


def idle_requests(proxies: list[StoreProxy], seconds: float) -> list[float]:
    """Requests each proxy passes in `seconds` of idling, scaled to an hour."""
    time.sleep(0.3)  # the proxies rewrite their counts 5 times a second
    before = [p.requests() for p in proxies]
    t0 = time.perf_counter()
    time.sleep(seconds)
    time.sleep(0.3)
    took = time.perf_counter() - t0
    return [(p.requests() - b) * 3600 / took for p, b in zip(proxies, before, strict=True)]


def recall_samples(a: Path, b: Path, n: int) -> dict[str, list[float]]:
    """Seconds B takes to stat, and to open and read, a file A has just closed in a
    domain A holds (a new top-level directory each time, so every sample recalls):
    a stat is one recall (the lookup of the name), an open+read two (the lookup, then
    the open: each must see what A closed before it began)."""
    out: dict[str, list[float]] = {"stat": [], "open_read": []}
    for i in range(n):
        data = f"sample {i}".encode()
        for kind in out:
            d = a / f"{kind}{i:03d}"
            d.mkdir()
            (d / "f").write_bytes(data)  # acquires the domain; its layout is journaled
        time.sleep(random.uniform(0.1, 0.6))  # no phase lock with A's poll
        t0 = time.perf_counter()
        size = os.stat(b / f"stat{i:03d}" / "f").st_size
        out["stat"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(b / f"open_read{i:03d}" / "f", "rb") as f:
            got = f.read()
        out["open_read"].append(time.perf_counter() - t0)
        if got != data or size != len(data):
            raise AssertionError(f"B read {got!r} ({size} bytes) for sample {i}: A wrote {data!r}")
    return out


def run_mode(
    upstream: Server, rtt: float, work: Path, env: dict[str, str], mode: str, a: Any
) -> dict[str, Any]:
    """Both measurements for `-o nudge=<mode>` on a filesystem of its own."""
    proxies = [StoreProxy(upstream, rtt, work / f"proxy-{mode}-{m}") for m in "ab"]
    opts = f"nudge={mode},poll_interval={a.poll_interval:g}"
    fs = [
        Efsish(
            p.server,
            work / f"{mode}-{m}",
            env,
            store_url=f"s3://{BUCKET}/{mode}",
            bucket=BUCKET,
            mount_opts=opts,
            format_args=(*FORMAT_ARGS, "--leases"),
        )
        for p, m in zip(proxies, "ab", strict=True)
    ]
    fs[0].prepare()
    ma = fs[0].mount(work / f"{mode}-a" / "mnt", work / f"{mode}-a" / "cache")
    mb = fs[1].mount(work / f"{mode}-b" / "mnt", work / f"{mode}-b" / "cache")
    try:
        time.sleep(5.0)  # startup done (sess, first heartbeats)
        log(f"nudge={mode}: idle mounts for {a.idle_seconds:.0f} s")
        idle = idle_requests(proxies, a.idle_seconds)
        log(f"nudge={mode}: {a.samples} recalls")
        samples = recall_samples(ma.mp, mb.mp, a.samples)
    finally:
        fs[1].umount(mb)
        fs[0].umount(ma)
        for p in proxies:
            p.stop()
    res: dict[str, Any] = {"idle_requests_per_hour": idle}
    for kind, v in samples.items():
        res[kind] = {
            "samples_ms": [x * 1000 for x in v],
            "p50_ms": percentile(v, 50) * 1000,
            "p95_ms": percentile(v, 95) * 1000,
            "max_ms": max(v) * 1000,
        }
        log(
            f"nudge={mode}: {kind} p50 {res[kind]['p50_ms']:.0f} ms, "
            f"p95 {res[kind]['p95_ms']:.0f} ms, max {res[kind]['max_ms']:.0f} ms"
        )
    log(f"nudge={mode}: idle requests per mount-hour " + ", ".join(f"{x:.0f}" for x in idle))
    return res


def main() -> int:
    from efsish.devtools import s3server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--store-rtt", type=float, default=20.0, help="ms added per round trip")
    p.add_argument("--samples", type=int, default=30, help="recalls timed per mode")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--poll-interval", type=float, default=1.0, help="the mounts' -o poll_interval")
    p.add_argument("--modes", default="auto,off", help="nudge= values to measure")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="efsish-recall."))
    started = datetime.datetime.now().astimezone()
    log(f"work dir {work}; starting SeaweedFS")
    info = start_seaweedfs(s3server, work / "s3")
    results: dict[str, Any] = {}
    try:
        upstream = Server(info.endpoint, info.access_key, info.secret_key)
        upstream.create_bucket(BUCKET)
        env = s3_env(info.access_key, info.secret_key)
        for mode in a.modes.split(","):
            results[mode] = run_mode(upstream, a.store_rtt, work, env, mode, a)
    finally:
        stop_everything(s3server, work / "s3")
    out = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench/recall", *sys.argv[1:]]),
        "store_rtt_ms": a.store_rtt,
        "poll_interval_s": a.poll_interval,
        "machine": machine_info(),
        "modes": results,
    }
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"recall latency at a {a.store_rtt:g} ms store (B reads a file A just closed)")
    print(f"{'nudge':<6} {'on B':<10} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7}  idle req/mount-h")
    for mode, r in results.items():
        idle = ", ".join(f"{x:.0f}" for x in r["idle_requests_per_hour"])
        for kind in ("stat", "open_read"):
            k = r[kind]
            print(
                f"{mode:<6} {kind:<10} {k['p50_ms']:>7.0f} {k['p95_ms']:>7.0f} {k['max_ms']:>7.0f}"
                f"  {idle if kind == 'stat' else ''}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
