"""What holds up a create while another mount writes: two processes, each an in-process
lease mount of one file store with --store-rtt ms added to every call, creating --files
4 KiB files in a directory of its own. Mount A times each create and traces the spans of
its metadata log (applying another's entry, catch-ups, PUTs, flushes, commits, recorded
flushes); for each of its slowest creates it prints the spans that overlapped it.

    .venv/bin/python scripts/bench/stalls.py [--store-rtt 20] [--files 3000] [--show 10]

No FUSE, no root; a temporary directory holds the store and both cache dirs. What it
finds is in docs/BENCHMARKS.md ("two mounts cost each other less").
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from efsish.filesystem import Filesystem, Options
from efsish.meta import log as metalog
from efsish.meta.superblock import format_fs, load_superblock
from efsish.posix.rules import Ctx
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.local import LocalStore

TRACED = ("_apply_remote", "_catch_up_locked", "_put_entry", "_commit_batch", "_record_flushed")
Span = tuple[float, float, str]


def trace(spans: list[Span]) -> None:
    """Record the start, end and name of every call of the TRACED MetaLog methods."""

    def wrap(name: str, orig: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.monotonic()
            try:
                return await orig(self, *args, **kwargs)
            finally:
                spans.append((t, time.monotonic(), name))

        return traced

    for name in TRACED:
        setattr(metalog.MetaLog, name, wrap(name, getattr(metalog.MetaLog, name)))
    orig_flush = metalog.MetaLog.flush

    async def flush(self: Any, extra: Any = None) -> None:
        t = time.monotonic()
        try:
            await orig_flush(self, extra)
        finally:
            spans.append((t, time.monotonic(), "flush"))

    setattr(metalog.MetaLog, "flush", flush)  # noqa: B010


async def writer(root: Path, who: str, files: int, rtt: float, show: int) -> None:
    spans: list[Span] = []
    if who == "a":
        trace(spans)
    raw = LocalStore(str(root / "store"), create=True)
    if who == "a":
        await format_fs(raw, block_size=4 << 20, leases=True)
        (root / "formatted").touch()
    while not (root / "formatted").exists():  # noqa: ASYNC110 (made by the other process)
        await trio.sleep(0.05)
    sb = await load_superblock(raw)
    store = FaultyStore(raw, FaultPlan(latency=rtt / 1000))
    ctx = Ctx(0, 0)
    async with trio.open_nursery() as nursery:
        fs = Filesystem(store, sb, Options(cache_dir=root / f"cache-{who}"))
        await fs.start(nursery)
        d = (await fs.mkdir(1, who.encode(), 0o755, ctx)).ino
        await fs.create(d, b"first", 0o644, 0, ctx)  # takes the domain
        (root / f"ready-{who}").touch()
        while not all((root / f"ready-{x}").exists() for x in "ab"):  # noqa: ASYNC110 (as above)
            await trio.sleep(0.01)
        data = b"x" * 4096
        took: list[tuple[float, float, int]] = []
        t0 = time.monotonic()
        for i in range(files):
            ts = time.monotonic()
            fh, _ = await fs.create(d, b"f%d" % i, 0o644, 0, ctx)
            await fs.write(fh, 0, data)
            await fs.flush(fh)
            await fs.release(fh)
            took.append((time.monotonic() - ts, ts, i))
        wall = time.monotonic() - t0
        slow = sum(1 for t, _, _ in took if t > 0.015)
        print(
            f"mount {who}: {files} creates in {wall:.2f} s ({files / wall:.0f}/s); {slow} > 15 ms"
        )
        if who == "a":
            for t, ts, i in sorted(took, reverse=True)[:show]:
                te = ts + t
                over = [
                    f"{name} +{(s0 - ts) * 1e3:.0f} ({(s1 - s0) * 1e3:.0f} ms)"
                    for s0, s1, name in spans
                    if s1 > ts and s0 < te and s1 - s0 > 0.002
                ]
                print(f"  create {i}: {t * 1e3:.0f} ms; during it: {', '.join(over[:12])}")
        await trio.sleep(1.5)  # the other mount's last flush
        nursery.cancel_scope.cancel()


def run(root: str, who: str, files: int, rtt: float, show: int) -> None:
    trio.run(writer, Path(root), who, files, rtt, show)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--store-rtt", type=float, default=20.0, help="ms added to every store call")
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--show", type=int, default=10, help="how many of A's slowest creates")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="efsish-stalls.")
    try:
        procs = [
            multiprocessing.Process(target=run, args=(root, w, a.files, a.store_rtt, a.show))
            for w in "ab"
        ]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join()
        return max(pr.exitcode or 0 for pr in procs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
