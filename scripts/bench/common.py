"""Helpers shared by the benchmark modules: logging, subprocesses, processes by PID,
the S3 client environment, mount detection, page-cache dropping, CPU accounting and statistics."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from efsish.procs import pid_alive

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
MiB = 1024 * 1024
KiB = 1024

_t0 = time.monotonic()


def log(msg: str) -> None:
    el = time.monotonic() - _t0
    print(f"[bench {el:7.1f}s] {msg}", flush=True)


def warn(msg: str) -> None:
    log(f"WARNING: {msg}")


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = 600,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; on failure raise with the output attached."""
    res = subprocess.run(
        [str(c) for c in cmd],
        env=env,
        timeout=timeout,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(str(c) for c in cmd)} exited {res.returncode}: "
            f"{(res.stderr or res.stdout).strip()[-1500:]}"
        )
    return res


def s3_env(access_key: str, secret_key: str) -> dict[str, str]:
    """This process's environment with the S3 server's credentials, and without what
    would send an AWS SDK elsewhere (the caller's endpoint or profile, instance
    metadata)."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    env.pop("AWS_ENDPOINT_URL", None)
    env.pop("AWS_PROFILE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


alive = pid_alive  # one implementation, shared with the daemon


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_pid(pid: int, *, group: bool = False, timeout: float = 10.0) -> None:
    """SIGTERM the process (or its process group, for sessions we started), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            reap(pid)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reap(pid)
            if not alive(pid):
                return
            time.sleep(0.05)


def mountpoints() -> set[str]:
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            out.add(mp.encode().decode("unicode_escape"))
    return out


def is_mounted(mp: os.PathLike[str] | str) -> bool:
    return os.path.realpath(mp) in mountpoints()


def wait_mounted(mp: Path, proc: subprocess.Popen[bytes] | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mp):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before the mount was live")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: {mp} not mounted after {timeout:.0f}s")


def force_unmount(mp: Path) -> None:
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
    if is_mounted(mp):
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)


_drop_warned = False


def drop_caches() -> bool:
    """sync, then drop the kernel's page, dentry and inode caches (needs root)."""
    global _drop_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if not _drop_warned:
            warn(f"cannot drop the kernel caches ({e}); cold reads may be warm")
            _drop_warned = True
        return False


def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if not alive(p):
            continue
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User+system CPU seconds consumed so far by these processes (threads included)."""
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "median": statistics.median(v),
        "min": v[0],
        "max": v[-1],
        "mean": statistics.fmean(v),
        "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
    }


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    v = sorted(values)
    k = max(1, math.ceil(p / 100 * len(v))) - 1
    return v[min(k, len(v) - 1)]


def human_s(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def eprint(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)
