"""Fixtures for real FUSE mounts: each mount is an `efsish mount` daemon (a separate
process), always unmounted and stopped by PID in teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from efsish.mount import _registry_file
from efsish.store.crypt import new_key_line


def efsish(
    *args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the efsish CLI as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "efsish", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"efsish {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class Mount:
    """One live mount of a store."""

    store: str
    path: Path
    cache_dir: Path
    pid: int
    key_file: Path | None = None  # the key of an encrypted filesystem

    def log(self) -> str:
        p = self.cache_dir / "efsish.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def key_args(self) -> list[str]:
        """What every efsish command that opens this store needs: its key, if any."""
        return ["--key-file", str(self.key_file)] if self.key_file else []


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def force_unmount(path: Path, pid: int | None) -> None:
    """Last-resort cleanup: fusermount3 -u, then -z, then kill the daemon by PID."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def format_args(fs_format: int) -> list[str]:
    """`efsish format` arguments for a filesystem of this format (3: the default)."""
    return ["--no-leases"] if fs_format == 2 else []


def write_key(path: Path) -> Path:
    """A new key file at `path`, as `efsish keygen` writes it (without its start-up)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_line() + "\n")
    return path


ALL_VARIANTS = pytest.mark.parametrize(
    "variant",
    [(2, False), (3, False), (3, True)],
    ids=["format2", "format3", "format3-encrypted"],
    indirect=True,
    scope="module",
)
"""`pytestmark = ALL_VARIANTS` runs every test of a module (each must use `mounter`) on a
format-2, a lease (format-3) and an encrypted lease filesystem."""


@pytest.fixture(scope="module")
def variant(request: pytest.FixtureRequest) -> tuple[int, bool]:
    """(format, encrypted) of the filesystems `mounter` formats: (3, False) unless the
    module parametrizes it (ALL_VARIANTS). Module-scoped, as `encrypted` is."""
    fmt, enc = getattr(request, "param", (3, False))
    return int(fmt), bool(enc)


@pytest.fixture
def fs_format(variant: tuple[int, bool]) -> int:
    """The format of the filesystems `mounter` formats: 3 (leases, the default). A module
    whose tests run in both modes overrides it with `params=[2, 3]`."""
    return variant[0]


@pytest.fixture(scope="module")
def encrypted(variant: tuple[int, bool]) -> bool:
    """Whether `mounter` and `shared_mount` format encrypted filesystems (format 4, with
    a key file of the test's): no. A module whose tests also run encrypted overrides it
    with `params`. Module-scoped, as `shared_mount` is."""
    return variant[1]


@pytest.fixture
def mounter(tmp_path: Path, fs_format: int, encrypted: bool) -> Iterator[Callable[..., Mount]]:
    """mounter(store=None, *opts) -> Mount. Formats a fresh file:// store (of
    `fs_format`; encrypted if `encrypted`) when none is given; with `encrypted` every
    mount gets the key (--key-file, Mount.key_file). Everything mounted is unmounted
    (and its daemon stopped) in teardown."""
    mounts: list[Mount] = []
    key = write_key(tmp_path / "efsish.key") if encrypted else None
    key_args = ["--key-file", str(key)] if key else []

    def mount(store: str | None = None, *opts: str, fmt: bool = True) -> Mount:
        n = len(mounts)
        if store is None:
            store = f"file://{tmp_path}/store{n}"
            if fmt:
                enc = ["--encrypt", *key_args] if key else []
                efsish("format", store, "--block-size", "1M", *format_args(fs_format), *enc)
        mp = tmp_path / f"mnt{n}-{uuid.uuid4().hex[:6]}"
        mp.mkdir()
        cache = tmp_path / f"cache{n}"
        efsish("mount", store, str(mp), "--cache-dir", str(cache), *key_args, *opts)
        reg = json.loads(_registry_file(str(mp)).read_text())
        m = Mount(store, mp, cache, int(reg["pid"]), key)
        mounts.append(m)
        return m

    yield mount
    for m in reversed(mounts):
        if is_mounted(m.path):
            res = efsish("umount", str(m.path), check=False, timeout=60)
            if res.returncode != 0:
                print(f"umount {m.path} failed: {res.stderr}")
        force_unmount(m.path, m.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(m.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


@pytest.fixture
def mnt(mounter: Callable[..., Mount]) -> Mount:
    """A single fresh mount on a file:// store."""
    return mounter()


def stop_mount(m: Mount) -> None:
    """`efsish umount`, then the last-resort cleanup, then wait for the daemon to exit."""
    if is_mounted(m.path):
        res = efsish("umount", str(m.path), check=False, timeout=60)
        if res.returncode != 0:
            print(f"umount {m.path} failed: {res.stderr}")
    force_unmount(m.path, m.pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(m.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory, encrypted: bool) -> Iterator[Mount]:
    """One mount shared by every test of a module (each test works in its own `work`
    directory): mounting and unmounting per test would dominate the runtime. Encrypted
    if `encrypted`."""
    base = tmp_path_factory.mktemp("shared")
    store = f"file://{base}/store"
    key = write_key(base / "efsish.key") if encrypted else None
    key_args = ["--key-file", str(key)] if key else []
    efsish("format", store, "--block-size", "1M", *(["--encrypt", *key_args] if key else []))
    mp = base / "mnt"
    mp.mkdir()
    cache = base / "cache"
    efsish("mount", store, str(mp), "--cache-dir", str(cache), *key_args)
    reg = json.loads(_registry_file(str(mp)).read_text())
    m = Mount(store, mp, cache, int(reg["pid"]), key)
    try:
        yield m
    finally:
        stop_mount(m)


@pytest.fixture
def work(shared_mount: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the module's shared mount, named after the test."""
    name = str(request.node.name).replace("[", "_").replace("]", "")[:200]
    d: Path = shared_mount.path / name
    d.mkdir()
    return d
