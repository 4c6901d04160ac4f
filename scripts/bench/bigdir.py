"""A big directory on one lease mount of a file:// store: `ls -la`, `find -ls` and random
lstat, each with cold kernel caches, for one or more sizes; prints per-entry µs so that
sizes can be compared (linear time: the same µs per entry at every size).

    scripts/bench/bigdir [--sizes 20000,50000] [--lstats 5000] [--profile DIR] [--json FILE]
                         [--floor]

Needs root (drops the kernel caches, mounts FUSE). Each size gets its own filesystem; the
entries are made with `os.mknod` (empty files); each timing runs on a fresh daemon that
holds the lease on /home (its reads need no request to the store), with the kernel's
caches dropped: neither the kernel nor the daemon holds anything of the entries.
`--profile DIR` records a py-spy profile of the daemon during each step (installs py-spy
into the venv). `--floor` also times the same steps on fuse_floor.py, a pyfuse3 + trio
filesystem answering everything from a dict: what the FUSE stack itself costs."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, log

Step = Callable[[], None]

EFSISH = [str(PYTHON), "-m", "efsish"]
if os.environ.get("EFSISH_BENCH_SRC"):
    # A/B runs: the efsish package from another source tree (e.g. a `git archive` of the
    # base commit), ahead of the venv's editable install.
    EFSISH = [
        str(PYTHON),
        "-c",
        "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path "
        "if 'editable' not in repr(f)]; sys.path.insert(0, sys.argv.pop(1)); "
        "runpy.run_module('efsish', run_name='__main__')",
        os.environ["EFSISH_BENCH_SRC"],
    ]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def daemon_pid(mp: Path) -> int | None:
    """The pid of the efsish daemon serving `mp` (from its command line)."""
    out = run("pgrep", "-f", f"mount .* {mp} ", check=False).stdout.split()
    return int(out[0]) if out else None


def mount(store: str, mp: Path, cache: Path) -> None:
    run(*EFSISH, "mount", store, str(mp), "--cache-dir", str(cache))


def umount(mp: Path) -> None:
    if run(*EFSISH, "umount", str(mp), check=False).returncode != 0:
        run("fusermount3", "-uz", str(mp), check=False)


def timed(name: str, fn: Any, prof: Path | None, mp: Path, remount: Any = None) -> float:
    if remount is not None:
        remount()
    drop_caches()
    if prof is not None:
        from pyspy_profile import ensure_py_spy, record

        pid = daemon_pid(mp)
        spy = ensure_py_spy()
        if pid is not None and spy is not None:
            t0 = time.perf_counter()
            record(spy, pid, prof / f"{name}.txt", fn, rate=250)
            return time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sample_names(n: int, lstats: int) -> list[str]:
    """The names the lstat step reads: `lstats` of the `n` entries, the same every run."""
    return [f"file-{i:07d}" for i in random.Random(1).sample(range(n), min(lstats, n))]


def steps(d: Path, names: list[str]) -> tuple[Step, Step, Step]:
    """The timed steps on the big directory `d`: `ls -la`, `find -ls`, and an lstat of
    each of `names`."""

    def ls() -> None:
        with open(os.devnull, "w") as null:
            subprocess.run(["ls", "-la", str(d)], check=True, stdout=null)

    def find() -> None:
        with open(os.devnull, "w") as null:
            subprocess.run(["find", str(d), "-ls"], check=True, stdout=null)

    def stats() -> None:
        for name in names:
            os.lstat(d / name)

    return ls, find, stats


def bench_size(work: Path, n: int, lstats: int, prof: Path | None) -> dict[str, Any]:
    store = f"file://{work}/store-{n}"
    mp, cache = work / f"mnt-{n}", work / f"cache-{n}"
    mp.mkdir()
    run(*EFSISH, "format", store, "--leases")
    mount(store, mp, cache)
    try:
        d = mp / "home" / "big"
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        for i in range(n):
            os.mknod(d / f"file-{i:07d}")
        create = time.perf_counter() - t0

        def remount() -> None:
            """A fresh daemon (nothing of the directory in its memory) holding the lease
            on /home (a change there takes it), proven valid: the reads that follow are
            answered from the view, with no request to the store."""
            umount(mp)
            mount(store, mp, cache)
            (d / ".lease").touch()
            os.unlink(d / ".lease")
            time.sleep(3)

        names = sample_names(n, lstats)
        ls, find, stats = steps(d, names)

        p = None
        if prof is not None:
            p = prof / str(n)
            p.mkdir(parents=True, exist_ok=True)
        out = {
            "entries": n,
            "create_s": create,
            "ls_la_s": timed("ls-la", ls, p, mp, remount),
            "find_ls_s": timed("find-ls", find, p, mp, remount),
            "lstat_s": timed("lstat", stats, p, mp, remount),
            # The same names again, the kernel's caches dropped but not the daemon's
            # memory: every lstat is a FUSE lookup answered with no SQLite read (the
            # floor of the request path).
            "lstat_warm_s": timed("lstat-warm", stats, p, mp),
            "lstats": len(names),
        }
    finally:
        umount(mp)
    return out


def bench_floor(work: Path, n: int, lstats: int) -> dict[str, Any]:
    """The same steps on fuse_floor.py (every answer from a dict): the FUSE floor."""
    mp = work / f"floor-{n}"
    mp.mkdir()
    floor = Path(__file__).resolve().parent / "fuse_floor.py"
    proc = subprocess.Popen([str(PYTHON), str(floor), str(mp), str(n)])
    try:
        while not os.path.ismount(mp):
            if proc.poll() is not None:
                raise RuntimeError("fuse_floor.py did not mount")
            time.sleep(0.05)
        d = mp / "home" / "big"
        names = sample_names(n, lstats)
        ls, find, stats = steps(d, names)

        return {
            "entries": n,
            "ls_la_s": timed("ls-la", ls, None, mp),
            "find_ls_s": timed("find-ls", find, None, mp),
            "lstat_s": timed("lstat", stats, None, mp),
            "lstats": len(names),
        }
    finally:
        run("fusermount3", "-u", str(mp), check=False)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            run("fusermount3", "-uz", str(mp), check=False)
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,50000")
    ap.add_argument("--lstats", type=int, default=5000)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--floor", action="store_true", help="also time fuse_floor.py (answers from a dict)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bigdir: needs root (drops the kernel caches); run it with sudo", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="efsish-bigdir."))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            log(f"{n} entries")
            r = bench_size(work, n, args.lstats, args.profile)
            rows.append(r)
            print(
                f"{n:>8} entries: create {r['create_s']:.1f} s; "
                f"ls -la {r['ls_la_s']:.2f} s ({r['ls_la_s'] / n * 1e6:.0f} µs/entry); "
                f"find -ls {r['find_ls_s']:.2f} s ({r['find_ls_s'] / n * 1e6:.0f} µs/entry); "
                f"lstat {r['lstat_s'] / r['lstats'] * 1e6:.0f} µs each, "
                f"{r['lstat_warm_s'] / r['lstats'] * 1e6:.0f} µs with the daemon warm",
                flush=True,
            )
            if args.floor:
                f = bench_floor(work, n, args.lstats)
                r["floor"] = f
                print(
                    f"{n:>8} entries, FUSE floor: "
                    f"ls -la {f['ls_la_s'] / n * 1e6:.0f} µs/entry; "
                    f"find -ls {f['find_ls_s'] / n * 1e6:.0f} µs/entry; "
                    f"lstat {f['lstat_s'] / f['lstats'] * 1e6:.0f} µs each",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
