"""Two mounts writing in disjoint subtrees (issue 20: each keeps >= 80% of its solo rate).

One filesystem (the default format: leases), two mounts, each through its own
latency-adding store proxy. Each round, on new top-level directories (new domains):
A alone creates --files files of --size bytes (create+write+close, one at a time) in
`/soloA-R`, then B alone in `/soloB-R`, then both at once, A in `/bothA-R` and B in
`/bothB-R`. Each writer is a process of its own, as on separate machines (two threads
of one Python process share its GIL: every system call's return waits for it). A
mount's rate together is reported as a percentage of its own solo rate in the same
round; figures are medians over the rounds. A phase lasts about 4 s at the default
3,000 files, several commit intervals: with 1,000 (about one interval) whether a batch
commit fell inside a phase or after it swung single rounds from 67% to 108%. The
top-level mkdirs are sync changes and are made before the clock starts; the first
create in each directory takes the lease and is timed. Creates are timed until close
returns (the journal has them; the batch commits within commit_interval), like the main
benchmark's small-file row; `--sync` adds an fsync of the directory at the end of each
writer's run, inside its time.

With `--pin`, each mount's daemon (every thread) and each writer of that mount run on
one CPU of their own, CPU 0 for A and CPU 1 for B, in every phase: two one-CPU
machines sharing the store, so that the ratio measures what the mounts cost each other
through the bucket (the log, replaying the other's entries) rather than how two of
them share this machine's CPUs. SeaweedFS and the proxies float.

    scripts/bench/disjoint [--store-rtt 20] [--files 3000] [--rounds 3] [--pin] [--out FILE]

Needs root (FUSE mounts). Starts and stops its own SeaweedFS, proxies and mounts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine_info, start_seaweedfs
from common import cpu_seconds, log, percentile, s3_env
from systems import FORMAT_ARGS, MOUNT_OPTS, Efsish, Server, StoreProxy, stop_everything

BUCKET = "disjoint"


def cleanup_mounts_left(work: Path) -> bool:
    """Whether anything under `work` is still mounted (then it is not removed)."""
    with open("/proc/mounts") as f:
        return any(line.split()[1].startswith(f"{work}/") for line in f)


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def threads(pids: list[int]) -> list[tuple[int, int]]:
    """(pid, tid) of every thread of these processes (those gone meanwhile left out)."""
    out = []
    for pid in pids:
        try:
            out += [(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
    return out


def sched_stats(pids: list[int]) -> list[float]:
    """The scheduler's account of these processes' main threads (where a daemon answers
    FUSE requests), then of their other threads: seconds running, seconds runnable but
    waiting for a CPU, times switched in (/proc/PID/task/TID/schedstat); zeros where
    the kernel keeps no such account."""
    out = [0.0] * 6
    for pid, tid in threads(pids):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait, slices = (int(x) for x in f.read().split()[:3])
        except (OSError, ValueError):
            continue
        i = 0 if tid == pid else 3
        out[i] += run / 1e9
        out[i + 1] += wait / 1e9
        out[i + 2] += slices
    return out


class Meter:
    """Per mount: daemon CPU seconds and store requests (at its proxy) over a phase,
    and the machine's CPU use, so that a slower phase can be told apart as more work
    per create (protocol) or less CPU per second for each mount (sharing 2 CPUs). The
    scheduler's account of the daemons' threads tells where the rest goes: waiting for
    a CPU, or asleep until the next request."""

    def __init__(self, mounts: list[Any], proxies: list[StoreProxy]) -> None:
        self.pids = [m.daemon_pids() for m in mounts]
        self.proxies = proxies

    def start(self) -> None:
        time.sleep(0.3)  # the proxies rewrite their counts 5 times a second
        self.t0 = time.perf_counter()
        self.busy0 = busy_seconds()
        self.cpu0 = [cpu_seconds(p) for p in self.pids]
        self.sched0 = [sched_stats(p) for p in self.pids]
        self.req0 = [p.requests() for p in self.proxies]

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy = busy_seconds() - self.busy0
        cpu = [cpu_seconds(p) - c for p, c in zip(self.pids, self.cpu0, strict=True)]
        sched = [
            [(b - a) / wall for a, b in zip(s0, sched_stats(p), strict=True)]
            for p, s0 in zip(self.pids, self.sched0, strict=True)
        ]
        time.sleep(0.3)
        req = [p.requests() - r for p, r in zip(self.proxies, self.req0, strict=True)]
        keys = ("running", "waiting_for_cpu", "switches_per_s")
        return {
            "wall_s": wall,
            "machine_cpus_busy": busy / wall,
            "daemon_cpu_s": cpu,
            "requests": req,
            # Per daemon, per second of the phase: its main thread, then its others.
            "daemon_main_thread": [dict(zip(keys, s[:3], strict=True)) for s in sched],
            "daemon_other_threads": [dict(zip(keys, s[3:], strict=True)) for s in sched],
        }


def pin_tree(pids: list[int], cpu: int) -> None:
    """Every thread of these processes on `cpu` (threads they start later inherit it)."""
    for _, tid in threads(pids):
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            pass  # gone meanwhile


def tails(secs: list[float]) -> dict[str, float]:
    """Milliseconds of the median, 99th and 99.9th percentile and slowest of `secs`."""
    ms = [x * 1e3 for x in secs]
    return {
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "p99.9": percentile(ms, 99.9),
        "max": max(ms),
    }


def writer(d: Path, n: int, size: int, sync: bool) -> tuple[float, dict[str, float]]:
    """Seconds to create n files of `size` bytes in `d`, one at a time, and the tail of
    a create's time (create+write+close; a stall behind a batch the mount flushes or
    applies shows there)."""
    data = os.urandom(size)
    each = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        each.append(time.perf_counter() - t)
    if sync:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)  # of the directory: waits until the journal is in the log
        finally:
            os.close(fd)
    return time.perf_counter() - t0, tails(each)


def _writer_process(
    i: int, d: Path, n: int, size: int, sync: bool, cpu: int | None, ready: Any, go: Any, out: Any
) -> None:
    """One writer in a process of its own (see run_writers), on `cpu` if given."""
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        ready.release()
        go.wait()
        secs, tail = writer(d, n, size, sync)
        out.put((i, secs, tail, ""))
    except BaseException as e:  # reported to the parent, re-raised there
        out.put((i, 0.0, {}, f"{type(e).__name__}: {e}"))


def run_writers(
    dirs: list[Path],
    n: int,
    size: int,
    sync: bool,
    meter: Meter,
    cpus: list[int | None] | None = None,
) -> tuple[list[float], list[dict[str, float]]]:
    """One writer process per directory (on cpus[i] if given), started together once
    all are ready; each one's own elapsed seconds and tail of a create's time. The
    meter starts once every writer waits for the start."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    where = cpus or [None] * len(dirs)
    procs = [
        ctx.Process(target=_writer_process, args=(i, d, n, size, sync, where[i], ready, go, out))
        for i, d in enumerate(dirs)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a writer process did not start within 60 s")
        meter.start()
        go.set()
        elapsed = [0.0] * len(dirs)
        tail: list[dict[str, float]] = [{} for _ in dirs]
        for _ in procs:
            i, secs, t, err = out.get(timeout=1800)
            if err:
                raise RuntimeError(f"writer in {dirs[i]} failed: {err}")
            elapsed[i], tail[i] = secs, t
        return elapsed, tail
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def main() -> int:
    from efsish.devtools import s3server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--store-rtt", type=float, default=20.0, help="ms added per round trip")
    p.add_argument(
        "--files", type=int, default=3000, help="files each writer creates (3000: ~4 s a phase)"
    )
    p.add_argument("--size", type=int, default=4096, help="bytes per file")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--sync",
        action="store_true",
        help="fsync the directory at the end (the journal reaches the log), timed",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--efsish-mount-opts", default="", help="-o options for both mounts")
    p.add_argument(
        "--pin",
        action="store_true",
        help="mount A and its writers on CPU 0, B and its on CPU 1 (two one-CPU machines)",
    )
    a = p.parse_args()
    if a.pin and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin needs two CPUs")
    cpus: list[int | None] = [None, None]
    if a.pin:
        cpus[:] = sorted(os.sched_getaffinity(0))[:2]
    if a.efsish_mount_opts:
        MOUNT_OPTS[:] = [a.efsish_mount_opts]
    work = Path(tempfile.mkdtemp(prefix="efsish-disjoint."))
    started = datetime.datetime.now().astimezone()
    log(f"work dir {work}; load average {os.getloadavg()}; starting SeaweedFS")
    info = start_seaweedfs(s3server, work / "s3")
    rounds: list[dict[str, Any]] = []
    formatted = ""
    try:
        upstream = Server(info.endpoint, info.access_key, info.secret_key)
        upstream.create_bucket(BUCKET)
        env = s3_env(info.access_key, info.secret_key)
        proxies = [StoreProxy(upstream, a.store_rtt, work / f"proxy-{m}") for m in "ab"]
        fs = [
            Efsish(
                px.server,
                work / m,
                env,
                store_url=f"s3://{BUCKET}/fs",
                bucket=BUCKET,
                format_args=tuple(FORMAT_ARGS),
            )
            for px, m in zip(proxies, "ab", strict=True)
        ]
        fs[0].prepare()
        formatted = fs[0].formatted
        mounts = [
            f.mount(work / m / "mnt", work / m / "cache") for f, m in zip(fs, "ab", strict=True)
        ]
        time.sleep(3.0)  # startup done (sessions, first heartbeats)
        meter = Meter(mounts, proxies)
        if a.pin:
            for pids, cpu in zip(meter.pids, cpus, strict=True):
                assert cpu is not None
                pin_tree(pids, cpu)
            log(f"mount A pinned to CPU {cpus[0]}, B to CPU {cpus[1]}, with their writers")
        for r in range(a.rounds):
            names = [f"soloA-{r}", f"soloB-{r}", f"bothA-{r}", f"bothB-{r}"]
            owner = [0, 1, 0, 1]
            for name, m in zip(names, owner, strict=True):
                (mounts[m].mp / name).mkdir()
            time.sleep(1.5)  # each mount has seen the other's mkdirs
            load = os.getloadavg()[0]
            solo = []
            meters: dict[str, Any] = {}
            for i in range(2):
                secs, tail = run_writers(
                    [mounts[i].mp / names[i]], a.files, a.size, a.sync, meter, [cpus[i]]
                )
                solo += secs
                meters[f"solo{'AB'[i]}"] = {**meter.stop(), "create_ms": tail}
                time.sleep(1.5)  # the solo batch is committed
            both, tail = run_writers(
                [mounts[0].mp / names[2], mounts[1].mp / names[3]],
                a.files,
                a.size,
                a.sync,
                meter,
                cpus,
            )
            meters["together"] = {**meter.stop(), "create_ms": tail}
            rates: dict[str, Any] = {
                "solo_per_s": [a.files / s for s in solo],
                "together_per_s": [a.files / s for s in both],
                "load1": load,
                "phases": meters,
            }
            rates["pct_of_solo"] = [
                100 * t / s
                for t, s in zip(rates["together_per_s"], rates["solo_per_s"], strict=True)
            ]
            rounds.append(rates)
            log(
                f"round {r + 1}/{a.rounds} (load {load:.1f}): solo A {rates['solo_per_s'][0]:.0f}/s"
                f", B {rates['solo_per_s'][1]:.0f}/s; together A "
                f"{rates['together_per_s'][0]:.0f}/s ({rates['pct_of_solo'][0]:.0f}%), B "
                f"{rates['together_per_s'][1]:.0f}/s ({rates['pct_of_solo'][1]:.0f}%)"
            )
            for k, v in meters.items():
                log(
                    f"  {k}: {v['wall_s']:.2f} s, machine {v['machine_cpus_busy']:.2f} CPUs "
                    f"busy, daemon CPU s (A, B) {v['daemon_cpu_s'][0]:.2f}, "
                    f"{v['daemon_cpu_s'][1]:.2f}, store requests (A, B) {v['requests'][0]}, "
                    f"{v['requests'][1]}"
                )
                mt = v["daemon_main_thread"]
                log(
                    "    daemon main threads (A, B): running "
                    f"{mt[0]['running']:.2f}, {mt[1]['running']:.2f}; waiting for a CPU "
                    f"{mt[0]['waiting_for_cpu']:.2f}, {mt[1]['waiting_for_cpu']:.2f}; "
                    f"switched in {mt[0]['switches_per_s']:.0f}, {mt[1]['switches_per_s']:.0f}"
                    " times a second"
                )
                log(
                    "    a create (ms, p50 / p99 / p99.9 / max): "
                    + "; ".join(
                        f"{t['p50']:.2f} / {t['p99']:.1f} / {t['p99.9']:.1f} / {t['max']:.0f}"
                        for t in v["create_ms"]
                    )
                )
            time.sleep(1.5)
    finally:
        stop_everything(s3server, work / "s3")
        if not cleanup_mounts_left(work):
            shutil.rmtree(work, ignore_errors=True)  # the bucket and caches: nothing to keep

    def med(key: str, i: int) -> float:
        return float(statistics.median(r[key][i] for r in rounds))

    out: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench/disjoint", *sys.argv[1:]]),
        "formatted": formatted,
        "store_rtt_ms": a.store_rtt,
        "files": a.files,
        "size": a.size,
        "sync": a.sync,
        "pinned_cpus": cpus if a.pin else None,
        "machine": machine_info(),
        "rounds": rounds,
        "median": {
            k: [med(k, 0), med(k, 1)] for k in ("solo_per_s", "together_per_s", "pct_of_solo")
        },
    }
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    md = out["median"]
    print(
        f"two mounts, disjoint top-level directories, {a.files} x {a.size} B creates each, "
        f"store {a.store_rtt:g} ms away ({formatted}); medians of {a.rounds} rounds"
        + (f"; A on CPU {cpus[0]}, B on CPU {cpus[1]}, each with its writers" if a.pin else "")
    )
    for i, label in enumerate("AB"):
        print(
            f"mount {label}: solo {md['solo_per_s'][i]:.0f}/s, together "
            f"{md['together_per_s'][i]:.0f}/s = {md['pct_of_solo'][i]:.0f}% of solo"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
