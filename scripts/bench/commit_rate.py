"""efsish commit rate (issue 4 item 3): N mounts of one filesystem creating empty files at
once, and the latency a single create adds on an idle mount (S3 and file:// stores)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from common import cpu_seconds, log, percentile, tree_pids
from systems import Efsish, Server
from workloads import create_latency


def storm(dirs: list[Path], threads: int, duration: float, shared: bool = False) -> dict[str, Any]:
    """`threads` threads per mount create empty files for `duration` seconds, each thread
    in its own subdirectory of the mount's directory: the kernel serialises creates in
    one directory (the directory's i_rwsem), so threads sharing a directory would never
    have two creates in flight and group commit could not batch anything."""
    for d in dirs:
        for t in range(threads):
            (d / f"t{t}").mkdir()

    def sub(t: int) -> str:
        return "t0" if shared else f"t{t}"

    barrier = threading.Barrier(len(dirs) * threads + 1)
    res: list[list[tuple[int, float, list[float], str | None]]] = [
        [(0, 0.0, [], None)] * threads for _ in dirs
    ]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def worker(m: int, t: int, d: Path) -> None:
        lat: list[float] = []
        i = 0
        err = None
        barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + duration
        try:
            while True:
                s = time.perf_counter()
                if s >= deadline:
                    break
                os.close(os.open(f"{d}/{sub(t)}/f{t}-{i:07d}", flags, 0o644))
                lat.append(time.perf_counter() - s)
                i += 1
        except OSError as e:
            err = repr(e)
        res[m][t] = (i, time.perf_counter() - t0, lat, err)

    ths = [
        threading.Thread(target=worker, args=(m, t, d), daemon=True)
        for m, d in enumerate(dirs)
        for t in range(threads)
    ]
    for th in ths:
        th.start()
    barrier.wait()
    for th in ths:
        th.join(duration + 300)
    elapsed = max(e for r in res for (_, e, _, _) in r)
    per_mount = [sum(c for (c, _, _, _) in r) for r in res]
    per_mount_lat = [[x for (_, _, lat, _) in r for x in lat] for r in res]
    lats = [x for r in res for (_, _, lat, _) in r for x in lat]
    errors = [err for r in res for (_, _, _, err) in r if err]
    return {
        "elapsed_s": elapsed,
        "creates": sum(per_mount),
        "creates_per_s": sum(per_mount) / elapsed,
        "per_mount_creates_per_s": [c / elapsed for c in per_mount],
        "per_mount_creates": per_mount,
        "per_mount_latency_p95_ms": [
            percentile(v, 95) * 1000 if v else None for v in per_mount_lat
        ],
        "latency_max_ms": max(lats) * 1000 if lats else None,
        "latency_p50_ms": percentile(lats, 50) * 1000 if lats else None,
        "latency_p95_ms": percentile(lats, 95) * 1000 if lats else None,
        "errors": errors,
    }


def daemon_errors(logs: list[Path]) -> dict[str, int]:
    """ERROR lines of the daemons' logs, by message (timestamps and pids stripped)."""
    out: dict[str, int] = {}
    for p in logs:
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if " ERROR " in line:
                msg = line.split(" ERROR ", 1)[1][:200]
                out[msg] = out.get(msg, 0) + 1
    return out


def _count(client: Any, bucket: str, prefix: str) -> int:
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        n += page.get("KeyCount", 0)
    return n


def run(
    server: Server,
    server_pid: int,
    work: Path,
    env: dict[str, str],
    *,
    ns: tuple[int, ...],
    threads: int,
    duration: float,
    idle_samples: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"threads_per_mount": threads, "duration_s": duration, "storm": []}
    client = server.client()
    cases = [(n, False) for n in ns] + [(ns[0], True)]
    for n, shared in cases:
        prefix = f"commit-{n}{'-shared' if shared else ''}"
        fs = Efsish(server, work / prefix, env, store_url=f"s3://efsish/{prefix}")
        fs.prepare()
        entries_before = _count(client, "efsish", f"{prefix}/log/")
        mounts = []
        try:
            for i in range(n):
                mounts.append(fs.mount(fs.work / f"m{i}", fs.work / f"c{i}"))
            dirs = []
            for i, m in enumerate(mounts):
                d = m.mp / f"mount{i}"
                d.mkdir()
                dirs.append(d)
            pids = [p for m in mounts for p in m.daemon_pids()]
            s3pids = tree_pids(server_pid)
            c0, s0 = cpu_seconds(pids), cpu_seconds(s3pids)
            where = "one shared directory" if shared else "a directory each"
            log(
                f"commit rate: {n} mount(s) x {threads} threads ({where}) creating files "
                f"for {duration:.0f}s"
            )
            r = storm(dirs, threads, duration, shared)
            r["cpu_daemons_s"] = cpu_seconds(pids) - c0
            r["cpu_s3_s"] = cpu_seconds(s3pids) - s0
        finally:
            for m in mounts:
                fs.umount(m)
        r["daemon_errors"] = daemon_errors([m.cache_dir / "efsish.log" for m in mounts])
        entries = _count(client, "efsish", f"{prefix}/log/") - entries_before
        r["mounts"] = n
        r["shared_dir"] = shared
        r["log_entries"] = entries
        r["creates_per_entry"] = r["creates"] / entries if entries else None
        log(
            f"  {r['creates_per_s']:.0f} creates/s total "
            f"({', '.join(f'{x:.0f}' for x in r['per_mount_creates_per_s'])} per mount), "
            f"{r['creates_per_entry'] or 0:.1f} creates per log entry, "
            f"{len(r['errors'])} failed creates, daemon errors: {r['daemon_errors'] or 'none'}"
        )
        out["storm"].append(r)
        shutil.rmtree(fs.work, ignore_errors=True)

    out["idle"] = {}
    for store in ("s3", "file"):
        if store == "s3":
            fs = Efsish(server, work / "idle-s3", env, store_url="s3://efsish/idle")
        else:
            fs = Efsish(
                server,
                work / "idle-file",
                env,
                store_url=f"file://{work / 'idle-file' / 'store'}",
                bucket=None,
            )
            (work / "idle-file" / "store").mkdir(parents=True, exist_ok=True)
        fs.prepare()
        m = fs.mount(fs.work / "mnt", fs.work / "cache")
        try:
            (m.mp / "warm").mkdir()  # the first commit claims an inode range; not timed
            lat = create_latency(m.mp / "idle", idle_samples)
        finally:
            fs.umount(m)
        out["idle"][store] = {
            "samples_ms": [x * 1000 for x in lat],
            "p50_ms": percentile(lat, 50) * 1000,
            "p95_ms": percentile(lat, 95) * 1000,
        }
        log(
            f"idle create latency on {store}: p50 {out['idle'][store]['p50_ms']:.1f} ms, "
            f"p95 {out['idle'][store]['p95_ms']:.1f} ms"
        )
    return out
