"""The efsish daemon's memory under heavy workloads: the figure behind "memory stays
bounded" in docs/ARCHITECTURE.md.

Starts SeaweedFS (127.0.0.1), formats and mounts efsish on it, and runs one workload
after another, each on a cold mount: two writers of --size MiB at once (1 MiB writes,
fsync), three cold sequential readers at once, 2,000 random 4 KiB reads, 5,000 small
files (create, stat, read, unlink). Before each workload the daemon's peak-RSS counter
is reset (/proc/PID/clear_refs), and after it VmHWM is read: the peak of that workload
alone. Prints a markdown table; everything started is stopped in a `finally`.

    .venv/bin/python scripts/bench/memory.py [--size 800]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import KiB, MiB, drop_caches, kill_pid, log
from systems import Efsish, Mount, Server, cleanup_mounts

from efsish.devtools import s3server


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def in_threads(fns: list[Callable[[], None]]) -> None:
    """Run `fns` at once, each in a thread; re-raise the first error."""
    with ThreadPoolExecutor(len(fns)) as ex:
        for f in [ex.submit(fn) for fn in fns]:
            f.result()


def write_file(path: Path, size_mib: int, seed: int) -> None:
    block = random.Random(seed).randbytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size_mib):
            os.write(fd, block[i % 7 :] + block[: i % 7])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass


def random_reads(path: Path, n: int) -> None:
    size = path.stat().st_size
    rng = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for _ in range(n):
            os.pread(fd, 4 * KiB, rng.randrange(size // (4 * KiB)) * 4 * KiB)
    finally:
        os.close(fd)


def small_files(d: Path, n: int) -> None:
    d.mkdir()
    data = os.urandom(4 * KiB)
    for i in range(n):
        (d / f"f{i}").write_bytes(data)
    for i in range(n):
        os.stat(d / f"f{i}")
    for i in range(n):
        (d / f"f{i}").read_bytes()
    for i in range(n):
        os.unlink(d / f"f{i}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=800, help="MiB per writer (default 800)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="efsish-memory-"))
    info = s3server.start("seaweedfs", work / "s3", bucket="efsish")
    rows: list[tuple[str, float, int, int]] = []
    try:
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=info.access_key,
            AWS_SECRET_ACCESS_KEY=info.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        env.pop("AWS_ENDPOINT_URL", None)
        fs = Efsish(Server(info.endpoint, info.access_key, info.secret_key), work, env)
        fs.prepare()
        m: Mount = fs.mount(work / "mnt", work / "cache")
        mp = m.mp
        workloads: list[tuple[str, Callable[[], None]]] = [
            (
                f"two writers of {args.size} MiB at once",
                lambda: in_threads(
                    [
                        lambda: write_file(mp / "a", args.size, 1),
                        lambda: write_file(mp / "b", args.size, 2),
                    ]
                ),
            ),
            (
                "three cold sequential readers at once",
                lambda: in_threads(
                    [
                        lambda: read_file(mp / "a"),
                        lambda: read_file(mp / "b"),
                        lambda: read_file(mp / "a"),
                    ]
                ),
            ),
            ("2,000 cold random 4 KiB reads", lambda: random_reads(mp / "b", 2000)),
            ("5,000 small files: create, stat, read, unlink", lambda: small_files(mp / "s", 5000)),
        ]
        for label, fn in workloads:
            m = fs.remount_cold(m)
            drop_caches()
            assert m.pid is not None
            Path(f"/proc/{m.pid}/clear_refs").write_text("5")  # reset VmHWM
            log(f"{label} ...")
            t0 = time.monotonic()
            fn()
            dt = time.monotonic() - t0
            rows.append(
                (label, dt, status_kib(m.pid, "VmHWM") // 1024, status_kib(m.pid, "VmRSS") // 1024)
            )
            log(f"  {dt:.1f} s, peak RSS {rows[-1][2]} MiB")
        fs.umount(m)
    finally:
        cleanup_mounts()
        kill_pid(info.pid, group=True)
    print(
        "\n| workload (each on a cold mount) | seconds | daemon peak RSS (MiB) | RSS after (MiB) |"
    )
    print("|---|---|---|---|")
    for label, dt, hwm, rss in rows:
        print(f"| {label} | {dt:.1f} | {hwm} | {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
