"""py-spy profiles of the efsish daemon during a workload, and their summary."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import PYTHON, VENV_BIN, log, warn


def ensure_py_spy() -> str | None:
    exe = VENV_BIN / "py-spy"
    if exe.exists():
        return str(exe)
    log("installing py-spy into the venv (pip)")
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "py-spy"], capture_output=True)
    return str(exe) if exe.exists() else shutil.which("py-spy")


def record(
    pyspy: str, pid: int, out: Path, fn: Callable[[], Any], rate: int = 100, idle: bool = False
) -> Any:
    """Run fn() while py-spy samples pid into `out` (collapsed stacks); return fn()'s value."""
    cmd = [pyspy, "record", "--pid", str(pid), "--format", "raw", "--threads", "--nonblocking"]
    cmd += ["--rate", str(rate), "-o", str(out)]
    if idle:
        cmd.append("--idle")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # let it attach
    try:
        return fn()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            warn("py-spy did not stop on SIGINT")


_LINE = re.compile(r"^(.*) (\d+)$")
_THREAD = re.compile(r"^thread \(\d+\): ?(.*)$")


def _func(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)'."""
    m = re.match(r"^(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    parts = m.group(2).split("/")
    return f"{m.group(1)} ({'/'.join(parts[-2:])})"


def _thread_group(name: str) -> str:
    return re.sub(r"\d+", "N", name) or "?"


# Leaves where a thread waits rather than computes (epoll, idle worker threads, locks,
# socket reads). py-spy's own idle detection is unreliable in --nonblocking mode.
_IDLE_LEAVES = (
    ("get_events", "_io_epoll"),
    ("_work", "_thread_cache"),
    ("wait", "threading.py"),
    ("wait_woken", "_wakeup_socketpair"),
    ("do_poll", "util/wait.py"),
    ("readinto", "socket.py"),
)
# (substring of a frame's file, category): the deepest matching frame decides.
_CATEGORIES = (
    ("botocore/", "S3 client (botocore, urllib3, http.client)"),
    ("urllib3/", "S3 client (botocore, urllib3, http.client)"),
    ("http/client.py", "S3 client (botocore, urllib3, http.client)"),
    ("meta/view.py", "SQLite view (meta/view.py)"),
    ("data/cache.py", "block cache: disk I/O and verify (data/cache.py)"),
    ("codec.py", "codec: BLAKE2b, zstd, JSON (codec.py)"),
    ("json/", "codec: BLAKE2b, zstd, JSON (codec.py)"),
    ("throttle.py", "EFS throttle and metering"),
    ("pacer.py", "EFS throttle and metering"),
    ("metering.py", "EFS throttle and metering"),
    ("pyfuse3", "pyfuse3"),
    ("trio/", "trio: scheduling, thread hand-offs"),
    ("meta/log.py", "metadata log (meta/log.py)"),
    ("dirty.py", "write buffer (data/dirty.py)"),
    ("filesystem.py", "filesystem logic and FUSE adapter"),
    ("fuse_ops.py", "filesystem logic and FUSE adapter"),
    ("store/", "S3 client (botocore, urllib3, http.client)"),
)


def _category(frames: list[str]) -> str:
    leaf = frames[-1]
    fname = leaf.split(" (")[0].split(".")[-1]
    for name, where in _IDLE_LEAVES:
        if fname == name and where in leaf:
            return "idle"
    for f in reversed(frames):
        m = re.search(r"\(([^()]*):\d+\)$", f)
        path = m.group(1) if m else ""
        for key, cat in _CATEGORIES:
            if key in path:
                return cat
    return "other"


def summarize(raw: Path, wall_s: float, rate: int = 100, top: int = 15) -> dict[str, Any]:
    cats: Counter[str] = Counter()
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, n = m.group(1), int(m.group(2))
        frames = stack.split(";")
        tm = _THREAD.match(frames[0])
        if tm:
            threads[_thread_group(tm.group(1))] += n
            frames = frames[1:]
        if frames and not frames[0].endswith(")"):
            frames = frames[1:]  # a thread name without frames info
        if not frames:
            continue
        total += n
        cat = _category(frames)
        cats[cat] += n
        if cat == "idle":
            continue
        selfc[_func(frames[-1])] += n
        for f in {_func(f) for f in frames}:
            incl[f] += n
    busy = total - cats["idle"]
    pct = (lambda c: round(100.0 * c / busy, 1)) if busy else (lambda c: 0.0)
    roots = (
        "main (efsish/cli.py)",
        "_mount (efsish/cli.py)",
        "mount (efsish/mount.py)",
        "_run_daemon (efsish/mount.py)",
        "_daemon_main (efsish/mount.py)",
    )
    return {
        "samples": total,
        "busy_samples": busy,
        "wall_s": wall_s,
        "busy_threads_avg": busy / (wall_s * rate) if wall_s else None,
        "categories": {k: pct(v) for k, v in cats.most_common() if k != "idle"},
        "threads": {k: round(100.0 * v / total, 1) for k, v in threads.most_common(8)},
        "self": [(f, pct(c)) for f, c in selfc.most_common(top)],
        "inclusive": [
            (f, pct(c))
            for f, c in incl.most_common(400)
            if ("efsish/" in f or "(store/" in f or "(meta/" in f or "(data/" in f)
            and f not in roots
        ][:top],
    }
