"""The workloads, as plain functions over a directory (a mountpoint or a local dir), plus
the raw-boto3 equivalents. Each returns wall-clock seconds (or a dict of them, or a list
of latency samples); `drain` is called inside the timed region after writes so that
systems which upload in the background (rclone) are timed until the data is stored."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import KiB, MiB

Drain = Callable[[], None]
_POOL_MIB = 64


class DataPool:
    """Incompressible data without paying for os.urandom inside the timed loops: chunk i
    is a 1 MiB window of a random pool at an offset that differs for every i."""

    def __init__(self) -> None:
        self.buf = os.urandom((_POOL_MIB + 1) * MiB)
        self.mv = memoryview(self.buf)

    def chunk(self, i: int, n: int = MiB) -> memoryview:
        off = (i * (MiB + 4099)) % (_POOL_MIB * MiB)
        return self.mv[off : off + n]

    def small(self, i: int, n: int) -> bytes:
        off = (i * 7919 * 64) % (_POOL_MIB * MiB)
        return bytes(self.mv[off : off + n])


def _write_all(fd: int, mv: memoryview | bytes) -> None:
    mv = memoryview(mv)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def seq_write(path: Path, size: int, pool: DataPool, drain: Drain) -> float:
    """Write `size` bytes in 1 MiB write() calls, fsync, close; seconds."""
    n = size // MiB
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(n):
            _write_all(fd, pool.chunk(i))
        os.fsync(fd)
    finally:
        os.close(fd)
    drain()
    return time.perf_counter() - t0


def seq_read(path: Path, size: int) -> float:
    """Read the whole file with 1 MiB read() calls; seconds. Checks the length."""
    buf = bytearray(MiB)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            total += n
    dt = time.perf_counter() - t0
    if total != size:
        raise RuntimeError(f"read {total} bytes of {path}, expected {size}")
    return dt


RANDOM_READS = 200


def random_reads(path: Path, size: int, pool: DataPool, seed: int = 5) -> float:
    """RANDOM_READS preads of 4 KiB at 4 KiB-aligned random offsets (the same for every
    system), with POSIX_FADV_RANDOM (no kernel readahead, as a database asks); each
    read's bytes are checked against what seq_write wrote. Seconds."""
    rng = random.Random(seed)
    offs = [rng.randrange(size // (4 * KiB)) * 4 * KiB for _ in range(RANDOM_READS)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t0 = time.perf_counter()
        got = [os.pread(fd, 4 * KiB, off) for off in offs]
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    for off, data in zip(offs, got, strict=True):
        i, o = divmod(off, MiB)
        if data != bytes(pool.chunk(i)[o : o + 4 * KiB]):
            raise RuntimeError(f"{path}: 4 KiB at {off} differs from what was written")
    return dt


def verify_content(path: Path, size: int, pool: DataPool) -> None:
    """The first and last MiB must be what seq_write wrote (untimed)."""
    n = size // MiB
    with open(path, "rb") as f:
        if f.read(MiB) != bytes(pool.chunk(0)):
            raise RuntimeError(f"{path}: first MiB differs from what was written")
        f.seek((n - 1) * MiB)
        if f.read(MiB) != bytes(pool.chunk(n - 1)):
            raise RuntimeError(f"{path}: last MiB differs from what was written")


def small_files(
    d: Path,
    n: int,
    size: int,
    pool: DataPool,
    drain: Drain,
    drop: Callable[[], object],
    hook: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """n files of `size` bytes: create(+write+close), stat, read, delete; each timed.
    The kernel's caches are dropped before stat and before read. hook(phase), if given,
    is called before the first phase and after each one (request counting)."""
    os.mkdir(d)
    drain()
    hook = hook or (lambda phase: None)
    hook("start")
    names = [str(d / f"f{i:05d}") for i in range(n)]
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    for i, p in enumerate(names):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(fd, pool.small(i, size))
        os.close(fd)
    drain()
    out["small_create"] = time.perf_counter() - t0
    hook("small_create")

    drop()
    hook("drop")
    t0 = time.perf_counter()
    for p in names:
        os.stat(p)
    out["small_stat"] = time.perf_counter() - t0
    hook("small_stat")

    drop()
    hook("drop")
    t0 = time.perf_counter()
    for p in names:
        with open(p, "rb", buffering=0) as f:
            data = f.read()
        if len(data) != size:
            raise RuntimeError(f"{p}: read {len(data)} bytes, expected {size}")
    out["small_read"] = time.perf_counter() - t0
    hook("small_read")
    if data != pool.small(n - 1, size):
        raise RuntimeError(f"{names[-1]}: content differs from what was written")

    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    drain()
    out["small_delete"] = time.perf_counter() - t0
    hook("small_delete")
    os.rmdir(d)
    return out


def _sh(cmd: list[str], timeout: float) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-800:]}")


ATTR_ERRORS = ("Cannot change ownership", "Cannot change mode", "Cannot utime", "Exiting with")


def tar_extract(
    tarball: Path, dest: Path, drain: Drain, timeout: float, notes: list[str] | None = None
) -> float:
    """tar -x as root (owners, modes and times restored). If the only errors are failures
    to set attributes (s3fs on SeaweedFS cannot chmod/chown directories), the time still
    counts and the first error goes to `notes`."""
    os.mkdir(dest)
    drain()
    t0 = time.perf_counter()
    cmd = ["tar", "-xf", str(tarball), "-C", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        real = [x for x in lines if x.startswith("tar:") and not any(e in x for e in ATTR_ERRORS)]
        if notes is None or not lines or real:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-800:]}")
        notes.append(f"tar reported {len(lines)} attribute errors, e.g. {lines[0].strip()!r}")
    drain()
    return time.perf_counter() - t0


def rm_rf(dest: Path, drain: Drain, timeout: float) -> float:
    t0 = time.perf_counter()
    _sh(["rm", "-rf", str(dest)], timeout)
    drain()
    return time.perf_counter() - t0


def git_clone(src: Path, dest: Path, drain: Drain, timeout: float) -> float:
    t0 = time.perf_counter()
    _sh(["git", "clone", "-q", "--no-hardlinks", str(src), str(dest)], timeout)
    drain()
    return time.perf_counter() - t0


def create_latency(d: Path, n: int, gap: float = 0.02) -> list[float]:
    """Seconds of open(O_CREAT|O_EXCL)+close for n new empty files, one at a time with
    `gap` seconds of idleness before each, so no other request is in flight."""
    os.mkdir(d)
    out = []
    for i in range(n):
        time.sleep(gap)
        p = str(d / f"e{i:05d}")
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------ two mounts


def _poll(cond: Callable[[], bool], poll: float, timeout: float) -> float | None:
    t0 = time.perf_counter()
    while True:
        try:
            if cond():
                return time.perf_counter() - t0
        except OSError:
            pass
        if time.perf_counter() - t0 > timeout:
            return None
        time.sleep(poll)


def _content(i: int, version: int, size: int = 4 * KiB) -> bytes:
    head = f"sample {i} version {version}\n".encode()
    return head + b"x" * (size - len(head))


def _write_file(p: Path, data: bytes) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _read(p: Path) -> bytes:
    with open(p, "rb", buffering=0) as f:
        return f.read()


def visibility(
    a: Path, b: Path, samples: int, *, poll: float = 0.01, timeout: float = 10.0, seed: int = 1
) -> dict[str, list[float | None]]:
    """a and b are the same directory seen through two mounts. For each sample: a file
    created on a, renamed on a, rewritten (same size, new bytes) on a; seconds until b
    sees each change (None = not seen within `timeout`). b looks first at what is about
    to change (a failed lookup, the old name, the old content), so that its caches hold
    the old state as they would in real use."""
    rng = random.Random(seed)
    os.mkdir(a)
    if _poll(lambda: b.is_dir(), poll, timeout) is None:
        raise RuntimeError(f"{b} never appeared on the second mount")
    out: dict[str, list[float | None]] = {"vis_create": [], "vis_rename": [], "vis_rewrite": []}
    for i in range(samples):
        ca, cb = a / f"c{i}", b / f"c{i}"
        ra, rb = a / f"r{i}", b / f"r{i}"
        # create
        os.path.exists(cb)
        _write_file(ca, _content(i, 1))
        out["vis_create"].append(_poll(lambda: cb.exists(), poll, timeout))  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.2))
        # rename
        os.path.exists(rb)
        os.path.exists(cb)
        os.rename(ca, ra)
        out["vis_rename"].append(
            _poll(lambda: rb.exists() and not cb.exists(), poll, timeout)  # noqa: B023
        )
        time.sleep(rng.uniform(0.0, 0.2))
        # rewrite: b has read the old content first
        new = _content(i, 2)
        _poll(lambda: _read(rb) == _content(i, 1), poll, timeout)  # noqa: B023
        _write_file(ra, new)
        out["vis_rewrite"].append(_poll(lambda: _read(rb) == new, poll, timeout))  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.2))
    return out


# ----------------------------------------------------------------------- raw boto3


def boto3_seq_write(
    client: Any, bucket: str, prefix: str, size: int, pool: DataPool, block: int, conc: int
) -> float:
    """PUT `size` bytes as block-sized objects, `conc` at a time (efsish's layout)."""
    nblocks = (size + block - 1) // block
    per = block // MiB

    def put(j: int) -> None:
        body = b"".join(bytes(pool.chunk(j * per + k)) for k in range(per))
        client.put_object(Bucket=bucket, Key=f"{prefix}/{j:06d}", Body=body)

    with ThreadPoolExecutor(conc) as ex:  # warm up: connections and service model, untimed
        list(
            ex.map(lambda j: client.put_object(Bucket=bucket, Key=f"w/{j}", Body=b"x"), range(conc))
        )
    bodies_ready = time.perf_counter()  # joining chunks is part of the client's work
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(put, range(nblocks)))
    return time.perf_counter() - bodies_ready


def boto3_seq_read(
    client: Any, bucket: str, prefix: str, size: int, block: int, conc: int
) -> float:
    nblocks = (size + block - 1) // block
    got = [0] * nblocks
    lock = threading.Lock()

    def get(j: int) -> None:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{j:06d}")["Body"].read()
        with lock:
            got[j] = len(body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(get, range(nblocks)))
    dt = time.perf_counter() - t0
    if sum(got) != nblocks * block:
        raise RuntimeError(f"boto3 GET returned {sum(got)} bytes, expected {nblocks * block}")
    return dt


def boto3_small(
    client: Any, bucket: str, prefix: str, n: int, size: int, pool: DataPool
) -> dict[str, float]:
    """PUT / HEAD / GET / DELETE of n small objects, one at a time: the round-trip floor
    that a filesystem doing one request per operation would hit."""
    keys = [f"{prefix}/f{i:05d}" for i in range(n)]
    out = {}
    client.put_object(Bucket=bucket, Key=f"{prefix}/warmup", Body=b"")  # untimed
    client.head_object(Bucket=bucket, Key=f"{prefix}/warmup")
    client.get_object(Bucket=bucket, Key=f"{prefix}/warmup")["Body"].read()
    client.delete_object(Bucket=bucket, Key=f"{prefix}/warmup")
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        client.put_object(Bucket=bucket, Key=k, Body=pool.small(i, size))
    out["small_create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in keys:
        client.head_object(Bucket=bucket, Key=k)
    out["small_stat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in keys:
        client.get_object(Bucket=bucket, Key=k)["Body"].read()
    out["small_read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in keys:
        client.delete_object(Bucket=bucket, Key=k)
    out["small_delete"] = time.perf_counter() - t0
    return out


def boto3_create_latency(
    client: Any, bucket: str, prefix: str, n: int, gap: float = 0.02
) -> list[float]:
    """A conditional PUT (If-None-Match: *) of a small object, as efsish's log commit."""
    out = []
    body = b"x" * 300
    for i in range(n):
        time.sleep(gap)
        t0 = time.perf_counter()
        client.put_object(Bucket=bucket, Key=f"{prefix}/c{i:05d}", Body=body, IfNoneMatch="*")
        out.append(time.perf_counter() - t0)
    return out


def boto3_delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
