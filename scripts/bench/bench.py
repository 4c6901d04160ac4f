"""efsish benchmark suite (issue 5): efsish against JuiceFS, s3fs-fuse, rclone mount, the
local disk and raw boto3, all on one SeaweedFS server on 127.0.0.1. See docs/BENCHMARKS.md.

    scripts/bench/run [--quick] [--systems efsish,juicefs,...] [--runs N] [--size MiB]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as W
from common import (
    REPO,
    MiB,
    cpu_seconds,
    drop_caches,
    is_mounted,
    loadavg,
    log,
    mountpoints,
    percentile,
    run,
    s3_env,
    summarize,
    tree_pids,
    warn,
)
from systems import (
    ALL_SYSTEMS,
    LIVE_MOUNTS,
    PROXIES,
    Efsish,
    Mount,
    Server,
    StoreProxy,
    System,
    cleanup_mounts,
)

WARM_READS = 5  # warm reads per run; the run's figure is their median

BLOCK = 4 * MiB  # efsish's default block size: the raw-boto3 object size
UPLOAD_CONCURRENCY = 16  # efsish's upload concurrency: the raw-boto3 PUT/GET concurrency

# key -> (label, unit, better). Labels are filled with the run's parameters.
WORKLOADS: dict[str, tuple[str, str, str]] = {
    "seq_write": ("Sequential write {size} MiB (1 MiB writes + fsync)", "MiB/s", "higher"),
    "cold_read": ("Cold sequential read (remount, caches dropped)", "MiB/s", "higher"),
    "warm_read": ("Warm sequential read (read again)", "MiB/s", "higher"),
    "random_read": (
        "200 random 4 KiB preads of that file (remount, caches dropped, FADV_RANDOM)",
        "s",
        "lower",
    ),
    "small_create": ("{nsmall} x 4 KiB files: create+write+close", "s", "lower"),
    "small_stat": ("{nsmall} x 4 KiB files: stat (kernel caches dropped)", "s", "lower"),
    "small_read": ("{nsmall} x 4 KiB files: open+read+close (caches dropped)", "s", "lower"),
    "small_delete": ("{nsmall} x 4 KiB files: unlink", "s", "lower"),
    "tar_extract": (
        "tar -x of the Python stdlib ({tar_entries} entries, {tar_mib} MiB)",
        "s",
        "lower",
    ),
    "rm_rf": ("rm -rf of that tree", "s", "lower"),
    "git_clone": (
        "git clone --no-hardlinks of a local repo ({git_files} files, {git_src_files} in .git)",
        "s",
        "lower",
    ),
    "create_latency": ("One create on an idle mount (ms, p50 / p95)", "ms", "lower"),
    "vis_create": ("Two mounts: new file seen on the other (ms, p50 / p95)", "ms", "lower"),
    "vis_rename": ("Two mounts: rename seen on the other (ms, p50 / p95)", "ms", "lower"),
    "vis_rewrite": ("Two mounts: rewrite seen on the other (ms, p50 / p95)", "ms", "lower"),
    "idle_requests": (
        "S3 requests per idle mount-hour (counted at the store proxy over {idle_s:.0f} s, scaled)",
        "req/h",
        "lower",
    ),
}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.size = args.size * MiB
        self.pool = W.DataPool()
        self.results: dict[str, Any] = {
            "workloads": {k: {"results": {}} for k in WORKLOADS},
            "cpu": {},
            "errors": [],
            "skipped": {},
            "notes": {},
        }
        self.slow_skip: set[tuple[str, str]] = set()
        self.mounts: dict[str, Mount] = {}
        self.server: Server
        self.proxies: dict[str, StoreProxy] = {}
        self.server_pid = 0
        self.env: dict[str, str] = {}

    # ----------------------------------------------------------------- recording

    def record(self, wl: str, system: str, value: float) -> None:
        r = self.results["workloads"][wl]["results"].setdefault(system, {"runs": []})
        r["runs"].append(value)

    def record_samples(self, wl: str, system: str, samples: list[float | None]) -> None:
        r = self.results["workloads"][wl]["results"].setdefault(
            system, {"samples_ms": [], "timeouts": 0}
        )
        for s in samples:
            if s is None:
                r["timeouts"] += 1
            else:
                r["samples_ms"].append(s * 1000)

    def error(self, system: str, what: str, e: BaseException) -> None:
        msg = f"{system} {what}: {e!r}"
        warn(msg)
        self.results["errors"].append(msg)
        with (self.work / "errors.log").open("a") as f:
            f.write(msg + "\n" + traceback.format_exc() + "\n")

    def measure(self, system: str, group: str, pids: list[int], fn: Any) -> Any:
        """Run fn(), recording wall time, the CPU of the system's daemons and of S3."""
        s3 = tree_pids(self.server_pid)
        la = loadavg()
        c0, s0, w0 = cpu_seconds(pids), cpu_seconds(s3), time.perf_counter()
        own0 = time.process_time()
        out = fn()
        wall = time.perf_counter() - w0
        cpu = {
            "wall_s": wall,
            "daemon_cpu_s": cpu_seconds(pids) - c0 if pids else None,
            "s3_cpu_s": cpu_seconds(s3) - s0,
            "bench_cpu_s": time.process_time() - own0,
            "loadavg_before": la,
        }
        self.results["cpu"].setdefault(system, {}).setdefault(group, []).append(cpu)
        return out

    # -------------------------------------------------------------------- phases

    def run_fs_round(self, sysobj: System, r: int) -> None:
        name = sysobj.name
        m = self.mounts[name]
        base = m.mp / "bench"
        base.mkdir(exist_ok=True)
        a = self.args

        def drain() -> None:
            sysobj.drain(self.mounts[name])

        def pids() -> list[int]:
            return self.mounts[name].daemon_pids()

        def step(group: str, fn: Any) -> Any:
            if (name, group) in self.slow_skip or not selected(a, group):
                return None
            if not is_mounted(self.mounts[name].mp) and sysobj.kind == "fs":
                warn(f"{name} is no longer mounted; mounting it again")
                mm = self.mounts[name]
                self.mounts[name] = sysobj.mount(mm.mp, mm.cache_dir)
            t0 = time.perf_counter()
            try:
                out = self.measure(name, group, pids(), fn)
            except Exception as e:
                self.error(name, f"{group} (run {r + 1})", e)
                return None
            took = time.perf_counter() - t0
            if r == 0 and took > a.slow_limit and a.runs > 1:
                self.slow_skip.add((name, group))
                note = f"{group}: 1 run only (the first took {took:.0f} s > {a.slow_limit:.0f} s)"
                self.results["notes"].setdefault(name, []).append(note)
                log(f"  {name} {note}")
            return out

        log(f"run {r + 1}/{a.runs}: {name}")
        seq = base / "seq.bin"
        if seq.exists():
            seq.unlink()
            drain()

        def write_stored() -> float:
            t0 = time.perf_counter()
            W.seq_write(seq, self.size, self.pool, drain)
            sysobj.wait_stored(self.mounts[name], seq, self.size)
            return time.perf_counter() - t0

        v = step("seq_write", write_stored)
        if v:
            self.record("seq_write", name, self.size / MiB / v)
            log(f"  seq write {self.size / MiB / v:8.1f} MiB/s")

            def cold() -> None:
                """Remount with an empty cache and drop the kernel's caches."""
                try:
                    self.mounts[name] = sysobj.remount_cold(self.mounts[name])
                except Exception as e:
                    self.error(name, f"remount (run {r + 1})", e)
                    mm = self.mounts[name]
                    retry = mm.cache_dir.with_name("cache.retry")
                    self.mounts[name] = sysobj.mount(mm.mp, retry)
                drop_caches()

            cold()
            v = step("cold_read", lambda: W.seq_read(seq, self.size))
            if v:
                self.record("cold_read", name, self.size / MiB / v)
                log(f"  cold read {self.size / MiB / v:8.1f} MiB/s")
            # A warm read takes ~0.1 s from the page cache: one sample is mostly noise
            # of this shared machine, so each run's figure is the median of a few.
            v = step(
                "warm_read",
                lambda: statistics.median(W.seq_read(seq, self.size) for _ in range(WARM_READS)),
            )
            if v:
                self.record("warm_read", name, self.size / MiB / v)
                log(f"  warm read {self.size / MiB / v:8.1f} MiB/s")
            try:
                W.verify_content(seq, self.size, self.pool)
            except Exception as e:
                self.error(name, "content check of the sequential file", e)
            cold()
            v = step("random_read", lambda: W.random_reads(seq, self.size, self.pool))
            if v:
                self.record("random_read", name, v)
                log(f"  {W.RANDOM_READS} random reads {v:6.2f} s")

        out = step(
            "small_files",
            lambda: W.small_files(
                base / f"small-{r}", a.small_files, 4096, self.pool, drain, drop_caches
            ),
        )
        if out:
            for k, v in out.items():
                self.record(k, name, v)
            log("  small files " + ", ".join(f"{k[6:]} {v:.2f}s" for k, v in out.items()))

        tree = base / f"tar-{r}"
        tar_notes: list[str] = []
        v = step(
            "tar_extract",
            lambda: W.tar_extract(self.tarball, tree, drain, a.cmd_timeout, tar_notes),
        )
        if tar_notes and r == 0:
            self.results["notes"].setdefault(name, []).append(tar_notes[0])
            log(f"  {tar_notes[0]}")
        if v:
            self.record("tar_extract", name, v)
            log(f"  tar extract {v:.2f}s")
        if v and r == 0:  # untimed: is what tar wrote there (content, modes, owners, times)?
            res = subprocess.run(
                ["tar", "-df", str(self.tarball), "-C", str(tree)],
                capture_output=True,
                text=True,
                timeout=a.cmd_timeout,
            )
            lines = (res.stdout + res.stderr).strip().splitlines()
            note = (
                "tar -d after extraction: no differences"
                if res.returncode == 0
                else f"tar -d after extraction: {len(lines)} differences, e.g. {lines[:1]}"
            )
            self.results["notes"].setdefault(name, []).append(note)
            log(f"  {note}")
        if tree.exists():
            v = step("rm_rf", lambda: W.rm_rf(tree, drain, a.cmd_timeout))
            if v:
                self.record("rm_rf", name, v)
                log(f"  rm -rf {v:.2f}s")

        clone = base / f"git-{r}"
        v = step("git_clone", lambda: W.git_clone(self.git_src, clone, drain, a.cmd_timeout))
        if v:
            self.record("git_clone", name, v)
            log(f"  git clone {v:.2f}s")
        if clone.exists():
            subprocess.run(["rm", "-rf", str(clone)], timeout=a.cmd_timeout)

        lat_dir = base / f"lat-{r}"
        samples = step("create_latency", lambda: W.create_latency(lat_dir, a.latency_samples))
        if samples:
            self.record_samples("create_latency", name, samples)
            log(
                f"  idle create p50 {percentile(samples, 50) * 1000:.1f} ms, "
                f"p95 {percentile(samples, 95) * 1000:.1f} ms"
            )
        if lat_dir.exists():
            subprocess.run(["rm", "-rf", str(lat_dir)], timeout=a.cmd_timeout)
        drain()

    def run_raw_round(self, sysobj: System, r: int) -> None:
        name = sysobj.name
        c = sysobj.server.client(max_pool=UPLOAD_CONCURRENCY * 2)
        bucket = sysobj.bucket  # type: ignore[attr-defined]
        log(f"run {r + 1}/{self.args.runs}: raw boto3 ({UPLOAD_CONCURRENCY} concurrent)")
        prefix = f"run{r}"

        def step(group: str, fn: Any) -> Any:
            if not selected(self.args, group):
                return None
            try:
                return self.measure(name, group, [], fn)
            except Exception as e:
                self.error(name, f"{group} (run {r + 1})", e)
                return None

        v = step(
            "seq_write",
            lambda: W.boto3_seq_write(
                c, bucket, f"{prefix}/seq", self.size, self.pool, BLOCK, UPLOAD_CONCURRENCY
            ),
        )
        if v:
            self.record("seq_write", name, self.size / MiB / v)
            log(f"  PUT {self.size / MiB / v:8.1f} MiB/s")
            v = step(
                "cold_read",
                lambda: W.boto3_seq_read(
                    c, bucket, f"{prefix}/seq", self.size, BLOCK, UPLOAD_CONCURRENCY
                ),
            )
            if v:
                self.record("cold_read", name, self.size / MiB / v)
                log(f"  GET {self.size / MiB / v:8.1f} MiB/s")
        out = step(
            "small_files",
            lambda: W.boto3_small(
                c, bucket, f"{prefix}/small", self.args.small_files, 4096, self.pool
            ),
        )
        if out:
            for k, v in out.items():
                self.record(k, name, v)
            log("  small objects " + ", ".join(f"{k[6:]} {v:.2f}s" for k, v in out.items()))
        samples = step(
            "create_latency",
            lambda: W.boto3_create_latency(c, bucket, f"{prefix}/lat", self.args.latency_samples),
        )
        if samples:
            self.record_samples("create_latency", name, samples)
        try:  # free the space (the filesystems delete their files too)
            W.boto3_delete_prefix(c, bucket, prefix)
        except Exception as e:
            self.error(name, "cleanup of the run's objects", e)

    def run_visibility(self, sysobj: System) -> None:
        name = sysobj.name
        a = self.mounts[name]
        mp_b = sysobj.work / "mnt-b"
        log(f"two mounts: {name} ({self.args.vis_samples} samples per change, poll 10 ms)")
        try:
            b = sysobj.mount(mp_b, sysobj.work / "cache-b")
        except Exception as e:
            self.error(name, "second mount", e)
            return
        try:
            d = f"vis-{int(time.time())}"
            out = self.measure(
                name,
                "visibility",
                a.daemon_pids() + b.daemon_pids(),
                lambda: W.visibility(a.mp / d, b.mp / d, self.args.vis_samples),
            )
            for k, samples in out.items():
                self.record_samples(k, name, samples)
                ok = [s for s in samples if s is not None]
                if ok:
                    log(
                        f"  {k}: p50 {percentile(ok, 50) * 1000:.0f} ms, "
                        f"p95 {percentile(ok, 95) * 1000:.0f} ms, "
                        f"{len(samples) - len(ok)} not seen within 10 s"
                    )
        except Exception as e:
            self.error(name, "two-mount visibility", e)
        finally:
            sysobj.umount(b)

    def run_idle_requests(self, systems: list[System]) -> None:
        """Every mounted system idles at once for --idle-seconds; the requests each
        sends meanwhile (counted by its store proxy) scaled to an hour."""
        names = [s.name for s in systems if s.name in self.mounts and s.name in self.proxies]
        if not names:
            return
        secs = self.args.idle_seconds
        log(f"idle mounts: counting S3 requests of {', '.join(names)} for {secs:.0f} s")
        time.sleep(5.0)  # let the last workload's background work finish
        before = {n: self.proxies[n].requests() for n in names}
        t0 = time.perf_counter()
        time.sleep(secs)
        time.sleep(0.3)  # the proxies rewrite their counts 5 times a second
        took = time.perf_counter() - t0
        for n in names:
            per_hour = (self.proxies[n].requests() - before[n]) * 3600 / took
            self.record("idle_requests", n, per_hour)
            log(f"  {n}: {per_hour:.0f} requests per idle mount-hour")

    # ------------------------------------------------------------------ fixtures

    def make_fixtures(self) -> None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        self.tarball = self.work / "stdlib.tar"
        members = [stdlib.name]
        if self.args.quick or self.args.small_tree:  # a few packages, the top-level modules
            members = [f"{stdlib.name}/{p}" for p in ("json", "email", "asyncio", "logging")]
            members += [f"{stdlib.name}/{p.name}" for p in sorted(stdlib.glob("[a-c]*.py"))]
        run(
            [
                "tar",
                "-C",
                str(stdlib.parent),
                "-cf",
                str(self.tarball),
                "--exclude=site-packages",
                "--exclude=__pycache__",
                "--exclude=config-3*",
                *members,
            ]
        )
        with tarfile.open(self.tarball) as t:
            n = len(t.getmembers())
        self.params["tar_entries"] = n
        self.params["tar_mib"] = round(self.tarball.stat().st_size / MiB, 1)
        self.params["tar_source"] = f"{stdlib} (without site-packages, __pycache__, config-*)"
        self.git_src = self.work / "src.git"
        run(
            [
                "git",
                "clone",
                "-q",
                "--bare",
                "--no-hardlinks",
                str(self.args.git_repo),
                str(self.git_src),
            ]
        )
        if self.args.small_tree:  # one pack instead of hundreds of loose objects
            run(["git", "--git-dir", str(self.git_src), "gc", "-q", "--prune=now"])
        objs = run(["find", str(self.git_src), "-type", "f"]).stdout.splitlines()
        self.params["git_src_files"] = len(objs)
        files = run(["git", "--git-dir", str(self.git_src), "ls-tree", "-r", "--name-only", "HEAD"])
        self.params["git_files"] = len(files.stdout.splitlines())
        self.params["git_source"] = str(self.args.git_repo)

    # ---------------------------------------------------------------------- main

    def main(self) -> int:
        from efsish.devtools import s3server

        a = self.args
        out_dir = Path(a.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.params: dict[str, Any] = {
            "size_mib": a.size,
            "size": a.size,
            "nsmall": a.small_files,
            "runs": a.runs,
            "quick": a.quick,
            "vis_samples": a.vis_samples,
            "latency_samples": a.latency_samples,
            "raw_block_mib": BLOCK // MiB,
            "raw_concurrency": UPLOAD_CONCURRENCY,
            "efsish_throughput_mode": a.efsish_throughput_mode,
            "efsish_leases": not a.efsish_no_leases,
            "efsish_mount_opts": a.efsish_mount_opts,
            "store_rtt_ms": a.store_rtt,
            "idle_s": a.idle_seconds,
        }
        started = datetime.datetime.now().astimezone()
        names = [s.strip() for s in a.systems.split(",") if s.strip()]
        unknown = [n for n in names if n not in ALL_SYSTEMS]
        if unknown:
            print(
                f"unknown systems {unknown}; choose from {','.join(ALL_SYSTEMS)}", file=sys.stderr
            )
            return 2

        state = self.work / "s3"
        log(f"work dir {self.work}; starting SeaweedFS")
        info = start_seaweedfs(s3server, state)
        self.server_pid = info.pid
        versions: dict[str, str] = {}
        systems: list[System] = []
        made: list[System] = []
        try:
            self.server = Server(info.endpoint, info.access_key, info.secret_key)
            self.env = s3_env(info.access_key, info.secret_key)
            weed = run([str(REPO / ".venv/bin/weed"), "version"], check=False).stdout
            versions["SeaweedFS (S3 server)"] = (weed.strip().splitlines() or ["?"])[-1]
            for n in names:
                server = self.server
                if a.store_rtt is not None and ALL_SYSTEMS[n].kind != "local":
                    self.proxies[n] = StoreProxy(self.server, a.store_rtt, self.work / "proxy" / n)
                    server = self.proxies[n].server
                    log(f"{n}: S3 through a proxy adding {a.store_rtt:g} ms ({server.endpoint})")
                s: System = ALL_SYSTEMS[n](server, self.work, self.env)
                made.append(s)
                reason = s.ensure_installed()
                if reason:
                    warn(f"skipping {n}: {reason}")
                    self.results["skipped"][n] = reason
                    continue
                try:
                    versions[s.label] = s.version()
                    s.prepare()
                    formatted = getattr(s, "formatted", "")
                    if formatted:
                        versions[s.label] += f"; formatted: {formatted}"
                        self.params[f"{n}_formatted"] = formatted
                except Exception as e:
                    self.error(n, "prepare", e)
                    self.results["skipped"][n] = f"could not be set up: {e}"
                    continue
                systems.append(s)
            log("versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
            self.make_fixtures()

            for s in systems:
                if s.kind in ("fs", "local"):
                    try:
                        self.mounts[s.name] = s.mount(s.work / "mnt", s.work / "cache")
                    except Exception as e:
                        self.error(s.name, "mount", e)
                        self.results["skipped"][s.name] = f"mount failed: {e}"
            systems = [s for s in systems if s.kind == "raw" or s.name in self.mounts]

            for r in range(a.runs):
                for s in systems:
                    if s.kind == "raw":
                        self.run_raw_round(s, r)
                    else:
                        self.run_fs_round(s, r)

            if selected(a, "idle_requests"):
                if self.proxies:
                    self.run_idle_requests(systems)
                elif a.only:
                    warn("the idle-mount request count needs --store-rtt (it counts at the proxy)")

            for s in systems:
                if s.multi_mount and selected(a, "visibility"):
                    self.run_visibility(s)
            for s in systems:
                if s.kind == "fs" and not s.multi_mount:
                    self.results["notes"].setdefault(s.name, []).append(
                        "two mounts: not measured (no coherent multi-mount: each mount caches "
                        "the bucket listing and file data independently)"
                    )

            for s in systems:
                if s.name in self.mounts:
                    m = self.mounts.pop(s.name)
                    s.umount(m)

            if a.commit_rate and any(s.name == "efsish" for s in systems):
                import commit_rate

                try:
                    self.results["commit_rate"] = commit_rate.run(
                        next(s.server for s in systems if s.name == "efsish"),
                        self.server_pid,
                        self.work / "commit",
                        self.env,
                        ns=tuple(a.commit_mounts),
                        threads=a.commit_threads,
                        duration=a.commit_seconds,
                        idle_samples=a.latency_samples * 2,
                    )
                except Exception as e:
                    self.error("efsish", "commit rate", e)
                    cleanup_mounts()

            if a.profile and any(s.name == "efsish" for s in systems):
                try:
                    self.results["requests"] = self.run_request_counts(
                        [s.name for s in systems if s.name in ("efsish", "juicefs")]
                    )
                except Exception as e:
                    self.error("efsish", "request counting", e)
                    cleanup_mounts()
                try:
                    self.results["profiles"] = self.run_profiles(out_dir)
                except Exception as e:
                    self.error("efsish", "profiling", e)
                    cleanup_mounts()
        finally:
            cleanup_mounts()
            for s in made:
                try:
                    s.close()
                except Exception as e:
                    self.error(s.name, "stopping its servers", e)
            for p in list(PROXIES):
                p.stop()
            log("stopping SeaweedFS")
            s3server.stop(state)

        from systems import EFSISH_VERSIONS_SEEN

        if len(EFSISH_VERSIONS_SEEN) > 1:
            seen = "; ".join(f"{v} (from {t})" for v, t in EFSISH_VERSIONS_SEEN.items())
            note = f"the efsish code changed during the run; daemons ran: {seen}"
            warn(note)
            self.results["notes"].setdefault("efsish", []).append(note)
        finished = datetime.datetime.now().astimezone()
        self.results["meta"] = {
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "duration_s": round((finished - started).total_seconds()),
            "command": " ".join(["scripts/bench/run", *sys.argv[1:]]),
            "machine": machine_info(),
            "versions": versions,
            "efsish_versions_seen": EFSISH_VERSIONS_SEEN,
            "params": self.params,
            "systems": [s.name for s in systems],
            "labels": {s.name: s.label for s in systems},
            "workload_labels": {k: v[0].format(**self.params) for k, v in WORKLOADS.items()},
            "units": {k: v[1] for k, v in WORKLOADS.items()},
            "better": {k: v[2] for k, v in WORKLOADS.items()},
        }
        finalize(self.results)
        (out_dir / "results.json").write_text(json.dumps(self.results, indent=1))
        import report

        report.write(out_dir)
        log(f"results in {out_dir}: results.json, results.md, results.png")
        return 0

    # ----------------------------------------------------------- request counts

    def run_request_counts(self, names: list[str]) -> dict[str, Any]:
        """S3 requests per operation, counted by a forwarder between the mount and the
        server (an extra, unrecorded pass: the forwarder adds latency)."""
        from s3count import CountingProxy
        from systems import JuiceFS

        proxy = CountingProxy(self.server.endpoint)
        pserver = Server(proxy.endpoint, self.server.access_key, self.server.secret_key)
        n_small = min(self.args.small_files, 200)
        size = min(self.size, 64 * MiB)
        out: dict[str, Any] = {
            "params": {"small_files": n_small, "size_mib": size // MiB},
            "per": {
                "idle mount, per second": 1,
                "seq write, per MiB": size // MiB,
                "cold read, per MiB": size // MiB,
                "small create+write+close, per file": n_small,
                "small stat, per file": n_small,
                "small open+read+close, per file": n_small,
                "small unlink, per file": n_small,
                "tar -x, per entry": self.params["tar_entries"],
                "rm -rf, per entry": self.params["tar_entries"],
                "git clone, whole clone": 1,
                "create on an idle mount, per create": 20,
            },
            "counts": {},
        }
        try:
            for name in names:
                if name == "efsish":
                    sysobj: System = Efsish(
                        pserver, self.work / "count", self.env, store_url="s3://efsish/counted"
                    )
                else:
                    sysobj = JuiceFS(pserver, self.work / "count", self.env)
                    sysobj.bucket = "juicefs-counted"
                log(f"counting S3 requests per operation: {name}")
                out["counts"][name] = self._count_system(sysobj, proxy, size, n_small)
        finally:
            proxy.close()
        return out

    def _count_system(
        self, sysobj: System, proxy: Any, size: int, n_small: int
    ) -> dict[str, dict[str, float]]:
        sysobj.prepare()
        m = sysobj.mount(sysobj.work / "mnt", sysobj.work / "cache")
        counts: dict[str, dict[str, float]] = {}
        last = [proxy.snapshot()]

        def mark(label: str) -> None:
            now = proxy.snapshot()
            if label != "skip":
                counts[label] = dict(now - last[0])
            last[0] = now

        labels = {
            "small_create": "small create+write+close, per file",
            "small_stat": "small stat, per file",
            "small_read": "small open+read+close, per file",
            "small_delete": "small unlink, per file",
        }
        try:
            time.sleep(0.5)
            mark("skip")
            time.sleep(5.0)
            mark("idle mount, per second")
            idle = counts["idle mount, per second"]
            for k in idle:
                idle[k] /= 5.0
            seq = m.mp / "seq.bin"
            W.seq_write(seq, size, self.pool, lambda: None)
            mark("seq write, per MiB")
            m = sysobj.remount_cold(m)
            drop_caches()
            mark("skip")
            W.seq_read(seq, size)
            mark("cold read, per MiB")
            W.small_files(
                m.mp / "small",
                n_small,
                4096,
                self.pool,
                lambda: None,
                drop_caches,
                lambda ph: mark(labels.get(ph, "skip")),
            )
            mark("skip")
            W.tar_extract(self.tarball, m.mp / "t", lambda: None, 900, [])
            mark("tar -x, per entry")
            W.rm_rf(m.mp / "t", lambda: None, 900)
            mark("rm -rf, per entry")
            W.git_clone(self.git_src, m.mp / "g", lambda: None, 900)
            mark("git clone, whole clone")
            W.create_latency(m.mp / "lat", 20)
            mark("create on an idle mount, per create")
        finally:
            sysobj.umount(m)
        return counts

    # ------------------------------------------------------------------- profile

    def run_profiles(self, out_dir: Path) -> dict[str, Any]:
        """One extra, unrecorded pass of the main workloads on efsish under py-spy."""
        import pyspy_profile as P

        pyspy = P.ensure_py_spy()
        if not pyspy:
            raise RuntimeError("py-spy could not be installed")
        prof_dir = Path(self.args.profile_dir)
        prof_dir.mkdir(parents=True, exist_ok=True)
        fs = Efsish(self.server, self.work / "profile", self.env, store_url="s3://efsish/profile")
        fs.prepare()
        m = fs.mount(fs.work / "mnt", fs.work / "cache")
        out: dict[str, Any] = {}
        seq = m.mp / "seq.bin"
        try:

            def prof(name: str, fn: Any) -> Any:
                assert m.pid
                f = prof_dir / f"{name}.txt"
                t0 = time.perf_counter()
                log(f"profiling efsish: {name}")
                v = P.record(pyspy, m.pid, f, fn)
                wall = time.perf_counter() - t0 - 1.0
                out[name] = P.summarize(f, wall)
                out[name]["daemon_pid"] = m.pid
                return v

            prof("seq_write", lambda: W.seq_write(seq, self.size, self.pool, lambda: None))
            m = fs.remount_cold(m)
            drop_caches()
            prof("cold_read", lambda: W.seq_read(seq, self.size))
            prof(
                "small_files",
                lambda: W.small_files(
                    m.mp / "small",
                    self.args.small_files,
                    4096,
                    self.pool,
                    lambda: None,
                    drop_caches,
                ),
            )
            prof("tar_extract", lambda: W.tar_extract(self.tarball, m.mp / "t", lambda: None, 900))
            prof("rm_rf", lambda: W.rm_rf(m.mp / "t", lambda: None, 900))
            prof("git_clone", lambda: W.git_clone(self.git_src, m.mp / "g", lambda: None, 900))
        finally:
            fs.umount(m)
        log(f"raw py-spy profiles (collapsed stacks, e.g. for speedscope.app) in {prof_dir}")
        return out


def start_seaweedfs(s3server: Any, state: Path) -> Any:
    """The project's test server, with room for this benchmark: the test settings (64
    volumes of 128 MiB) run out of writable volumes once six buckets (SeaweedFS
    collections, each growing 7 volumes at a time) hold a few GiB. Only the volume count
    is raised; everything else (127.0.0.1 only, telemetry off) stays as the module sets."""
    orig = getattr(s3server, "_seaweedfs_cmd", None)
    if orig is None:
        return s3server.start("seaweedfs", state, bucket="efsish")

    def cmd(st: Path, port: int) -> list[str]:
        return ["-volume.max=400" if c.startswith("-volume.max=") else c for c in orig(st, port)]

    s3server._seaweedfs_cmd = cmd
    try:
        return s3server.start("seaweedfs", state, bucket="efsish")
    finally:
        s3server._seaweedfs_cmd = orig


def finalize(results: dict[str, Any]) -> None:
    for wl in results["workloads"].values():
        for r in wl["results"].values():
            if "runs" in r:
                r.update(summarize(r["runs"]))
            else:
                s = r["samples_ms"]
                r["n"] = len(s)
                if s:
                    r["p50"] = percentile(s, 50)
                    r["p95"] = percentile(s, 95)
                    r["max"] = max(s)


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    fuse = run(["fusermount3", "--version"], check=False).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem / 1024**3, 1),
        "kernel": platform.release(),
        "cpu": cpu,
        "os": _os_release(),
        "python": platform.python_version(),
        "fuse": fuse,
        "disk": run(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", "/tmp"], check=False
        ).stdout.strip(),
        "loadavg_at_end": open("/proc/loadavg").read().strip(),
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


# --only: which workload groups to run (default: all).
ONLY_GROUPS = {
    "seq": {"seq_write", "cold_read", "warm_read", "random_read"},
    "small": {"small_files", "small_create", "small_stat", "small_read", "small_unlink"},
    "tar": {"tar_extract", "rm_rf"},
    "git": {"git_clone"},
    "latency": {"create_latency"},
    "twomount": {"visibility"},
    "commit": {"commit_rate"},
    "idle": {"idle_requests"},
}


def selected(a: argparse.Namespace, group: str) -> bool:
    if not a.only:
        return True
    return any(group in ONLY_GROUPS[o] for o in a.only)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/bench/run",
        description="Benchmark efsish against JuiceFS, s3fs-fuse, rclone mount, the local disk "
        "and raw boto3 on one local SeaweedFS server. See docs/BENCHMARKS.md.",
    )
    ap.add_argument(
        "--quick", action="store_true", help="small sizes, 1 run: checks the suite works"
    )
    ap.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated ({','.join(ALL_SYSTEMS)})",
    )
    ap.add_argument("--runs", type=int, default=None, help="repetitions of each workload (3)")
    ap.add_argument("--size", type=int, default=None, help="sequential file size in MiB (512)")
    ap.add_argument("--small-files", type=int, default=None, help="number of small files (1000)")
    ap.add_argument(
        "--vis-samples", type=int, default=None, help="two-mount samples per change (20)"
    )
    ap.add_argument(
        "--latency-samples", type=int, default=None, help="idle create samples per run (100)"
    )
    ap.add_argument(
        "--commit-seconds", type=float, default=None, help="commit-rate duration per N (10)"
    )
    ap.add_argument("--commit-threads", type=int, default=4, help="creating threads per mount (4)")
    ap.add_argument("--commit-mounts", default="1,2,4", help="mount counts for the commit rate")
    ap.add_argument("--no-commit-rate", dest="commit_rate", action="store_false")
    ap.add_argument(
        "--store-rtt",
        type=float,
        default=None,
        metavar="MS",
        help="put a proxy adding MS ms per round trip between every system and the S3 "
        "server (0: the proxy only); it also counts requests for the idle-mount row",
    )
    ap.add_argument(
        "--idle-seconds", type=float, default=60.0, help="idle-mount request count duration"
    )
    ap.add_argument(
        "--small-tree",
        action="store_true",
        help="tar -x a slice of the stdlib (as --quick does) instead of all of it, and git "
        "clone a repacked copy (one pack) of the repository instead of its loose objects",
    )
    ap.add_argument(
        "--only",
        default="",
        help=f"comma-separated workload groups to run ({','.join(ONLY_GROUPS)}; default all); "
        "the commit-rate measurement runs only if 'commit' is among them",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="extra passes: S3 requests per operation (efsish, JuiceFS), efsish under py-spy",
    )
    ap.add_argument(
        "--profile-dir",
        default=str(Path(tempfile.gettempdir()) / "efsish-bench-profiles"),
        help="where the raw py-spy profiles go",
    )
    ap.add_argument(
        "--efsish-throughput-mode",
        default="elastic",
        choices=["elastic", "bursting"],
        help="throughput mode of the efsish filesystems (elastic: the EFS model does not pace)",
    )
    ap.add_argument(
        "--efsish-no-leases",
        action="store_true",
        help="format the efsish filesystems with --no-leases (format 2: per-change commits)",
    )
    ap.add_argument(
        "--efsish-mount-opts",
        default="",
        help="-o options for every efsish mount, e.g. busy_poll=0 (efsish mount --help)",
    )
    ap.add_argument("--git-repo", default=str(REPO), help="repository to clone (this one)")
    ap.add_argument(
        "--slow-limit",
        type=float,
        default=150.0,
        help="a workload whose first run takes longer than this many seconds runs once",
    )
    ap.add_argument("--cmd-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="output dir (docs/bench; --quick: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, caches)")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite results.md/png from results.json"
    )
    a = ap.parse_args(argv)
    a.only = [o for o in a.only.split(",") if o]
    bad = [o for o in a.only if o not in ONLY_GROUPS]
    if bad:
        ap.error(f"--only: unknown group(s) {', '.join(bad)}; choose from {', '.join(ONLY_GROUPS)}")
    if a.only and "commit" not in a.only:
        a.commit_rate = False
    if a.store_rtt is not None and not (0 <= a.store_rtt < 10_000):
        ap.error("--store-rtt: a number of milliseconds from 0 to 10000")
    q = a.quick
    a.runs = a.runs or (1 if q else 3)
    a.size = a.size or (32 if q else 512)
    a.small_files = a.small_files or (200 if q else 1000)
    a.vis_samples = a.vis_samples or (5 if q else 20)
    a.latency_samples = a.latency_samples or (20 if q else 100)
    a.commit_seconds = a.commit_seconds or (3.0 if q else 10.0)
    a.commit_mounts = [int(x) for x in str(a.commit_mounts).split(",")]
    if a.out is None:
        a.out = (
            str(Path(tempfile.gettempdir()) / "efsish-bench-quick")
            if q
            else str(REPO / "docs/bench")
        )
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report_only:
        import report

        report.write(Path(args.out))
        return 0
    if os.geteuid() != 0:
        warn("not root: FUSE mounts need user_allow_other, and the page cache cannot be dropped")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    import systems

    systems.FORMAT_ARGS[:] = ["--throughput-mode", args.efsish_throughput_mode]
    if args.efsish_no_leases:
        systems.FORMAT_ARGS.append("--no-leases")
    if args.efsish_mount_opts:
        systems.MOUNT_OPTS[:] = [args.efsish_mount_opts]
    work = Path(tempfile.mkdtemp(prefix="efsish-bench-"))
    try:
        return Bench(args, work).main()
    except KeyboardInterrupt:
        warn("interrupted; everything started has been stopped")
        return 130
    finally:
        if LIVE_MOUNTS:
            cleanup_mounts()
        still = [mp for mp in mountpoints() if mp.startswith(str(work) + "/")]
        if args.keep or still:
            log(f"work dir kept: {work}" + (f" (still mounted: {still})" if still else ""))
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
