"""The mount(8) helper (mount/mount.efsish): `mount -t efsish STORE DIR -o ...` and an
fstab line, through the real mount(8) and umount(8).

The helpers are installed as /sbin/mount.efsish and /sbin/umount.fuse.efsish for the
duration of each test (whatever was there before is put back). Each mount is cleaned up
in a finally: fusermount3 -u, then -z, then the daemon is killed by the PID in its
registry file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from efsish.mount import _registry_file
from tests.fuse.conftest import efsish, force_unmount, is_mounted
from tests.fuse.helpers import poll

ROOT = Path(__file__).resolve().parents[2]
HELPERS = {
    Path("/sbin/mount.efsish"): ROOT / "mount" / "mount.efsish",
    Path("/sbin/umount.fuse.efsish"): ROOT / "mount" / "umount.efsish",
}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) with a helper needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="no mount(8)"),
]


def _efsish_bin() -> str:
    cand = ROOT / ".venv" / "bin" / "efsish"
    if cand.exists():
        return str(cand)
    found = shutil.which("efsish", path=str(Path(sys.executable).parent))
    assert found, "no efsish executable next to the test interpreter"
    return found


def helper_env() -> dict[str, str]:
    """The environment mount(8) passes on to the helper: the efsish to run, and no
    /etc/default/efsish of the machine running the tests."""
    return {
        **os.environ,
        "EFSISH_BIN": _efsish_bin(),
        "EFSISH_DEFAULTS": "/nonexistent/efsish-defaults",
    }


def run(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, env=helper_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def helpers() -> Iterator[None]:
    """Install the helpers as symlinks in /sbin; restore what was there afterwards. A lock
    keeps two test runs on one machine from swapping the links under each other."""
    saved: list[tuple[Path, str | None, Path | None]] = []  # (link, old target, backup)
    lock = open("/run/lock/efsish-mount-helper-test.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        for link, target in HELPERS.items():
            old: str | None = None
            backup: Path | None = None
            if link.is_symlink():
                old = os.readlink(link)
                link.unlink()
            elif link.exists():
                backup = link.with_name(link.name + ".efsish-test-backup")
                link.rename(backup)
            saved.append((link, old, backup))
            link.symlink_to(target)
        yield
    finally:
        for link, old, backup in saved:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            if old is not None:
                link.symlink_to(old)
            elif backup is not None:
                backup.rename(link)
        lock.close()


def mount_line(mp: Path) -> list[str] | None:
    """The /proc/mounts fields for mountpoint mp, or None."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mp):
                return fields
    return None


def daemon_pid(mp: Path) -> int | None:
    reg = _registry_file(os.path.realpath(mp))
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads(reg.read_text())["pid"])
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    return False


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


@contextlib.contextmanager
def cleanup(mp: Path) -> Iterator[None]:
    """Whatever happens, leave nothing mounted at mp and no daemon running for it."""
    pids: set[int] = set()

    def remember() -> None:
        pid = daemon_pid(mp)
        if pid is not None:
            pids.add(pid)

    try:
        yield
    finally:
        remember()
        force_unmount(mp, None)
        for pid in pids:
            if not wait_gone(pid, timeout=5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def new_store(tmp_path: Path, name: str = "store") -> str:
    store = f"file://{tmp_path}/{name}"
    efsish("format", store, "--block-size", "1M")
    return store


def check_live(mp: Path, store: str) -> None:
    fields = mount_line(mp)
    assert fields is not None, f"{mp} is not in /proc/mounts"
    assert fields[2] == "fuse.efsish", fields
    assert fields[0] == f"efsish:{store}", fields
    assert "allow_other" in fields[3], fields


def test_mount_t_efsish_and_umount(helpers: None, tmp_path: Path) -> None:
    store = new_store(tmp_path)
    mp = tmp_path / "home"
    mp.mkdir()
    cache = tmp_path / "cache"
    with cleanup(mp):
        run("mount", "-t", "efsish", store, str(mp), "-o", f"cache_dir={cache},_netdev")
        check_live(mp, store)
        pid = daemon_pid(mp)
        assert pid is not None and alive(pid)
        assert cache.is_dir() and (cache.stat().st_mode & 0o077) == 0, "cache dir not 0700"
        (mp / "alice").mkdir(mode=0o700)
        data = os.urandom(300_000)
        (mp / "alice" / "notes.bin").write_bytes(data)
        assert (mp / "alice" / "notes.bin").read_bytes() == data

        # umount(8) runs /sbin/umount.fuse.efsish -> `efsish umount`: it returns only once
        # the daemon has flushed everything and exited.
        run("umount", str(mp))
        assert mount_line(mp) is None
        assert not alive(pid), "umount returned before the daemon finished"
        assert daemon_pid(mp) is None, "registry file left behind"

        # Everything is in the store: a second mount (another cache) sees it.
        run("mount", "-t", "efsish", store, str(mp), "-o", f"cache_dir={tmp_path}/cache2")
        check_live(mp, store)
        assert (mp / "alice" / "notes.bin").read_bytes() == data
        assert (mp / "alice").stat().st_mode & 0o777 == 0o700
        run("umount", str(mp))
        assert mount_line(mp) is None
    assert efsish("fsck", store, "-q").returncode == 0


def test_fstab_line(helpers: None, tmp_path: Path) -> None:
    store = new_store(tmp_path)
    mp = tmp_path / "home"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# efsish test fstab\n"
        f"{store}  {mp}  efsish  _netdev,cache_dir={tmp_path}/cache,poll_interval=0.5  0 0\n"
    )
    with cleanup(mp):
        run("mount", "-T", str(fstab), str(mp))
        check_live(mp, store)
        (mp / "f").write_text("from fstab\n")
        assert (mp / "f").read_text() == "from fstab\n"
        pid = daemon_pid(mp)
        assert pid is not None
        run("umount", str(mp))
        assert mount_line(mp) is None
        assert not alive(pid)

        # mount -a with the alternative fstab mounts it too (and -f only pretends).
        run("mount", "-f", "-T", str(fstab), str(mp))
        assert mount_line(mp) is None
        run("mount", "-a", "-T", str(fstab), "-t", "efsish")
        check_live(mp, store)
        assert (mp / "f").read_text() == "from fstab\n"
        run("umount", str(mp))
        assert mount_line(mp) is None


def test_bare_umount_syscall_still_flushes(helpers: None, tmp_path: Path) -> None:
    """`umount -i` (no helper: the plain umount(2) that umount(8) also uses for mounts
    without a utab entry) returns at once; the daemon still flushes, then exits."""
    store = new_store(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    with cleanup(mp):
        run("mount", "-t", "efsish", store, str(mp), "-o", f"cache_dir={tmp_path}/c1")
        data = os.urandom(2_500_000)
        (mp / "big").write_bytes(data)
        pid = daemon_pid(mp)
        assert pid is not None
        run("umount", "-i", str(mp))
        assert mount_line(mp) is None
        assert wait_gone(pid, timeout=60), "daemon did not exit after umount(2)"
        run("mount", "-t", "efsish", store, str(mp), "-o", f"cache_dir={tmp_path}/c2")
        assert (mp / "big").read_bytes() == data
        run("umount", str(mp))
    assert efsish("fsck", store, "-q").returncode == 0


def test_helper_errors_and_flags(helpers: None, tmp_path: Path) -> None:
    store = new_store(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cache = f"cache_dir={tmp_path}/cache"
    with cleanup(mp):
        # An unknown option is an error naming it, and nothing is mounted...
        res = run("mount", "-t", "efsish", store, str(mp), "-o", f"{cache},bogus", check=False)
        assert res.returncode != 0
        assert "bogus" in res.stderr
        assert mount_line(mp) is None
        # ...unless -s (sloppy) asks to ignore it.
        run("mount", "-s", "-t", "efsish", store, str(mp), "-o", f"{cache},bogus,noatime")
        check_live(mp, store)
        run("umount", str(mp))

        # A store that holds no filesystem: mount failure (32), one line.
        res = run("mount", "-t", "efsish", f"file://{tmp_path}/empty", str(mp), check=False)
        assert res.returncode == 32, res
        assert "format" in res.stderr
        assert mount_line(mp) is None

        # Not a store URL at all.
        res = run("mount", "-t", "efsish", "/dev/sda1", str(mp), check=False)
        assert res.returncode != 0
        assert "not an efsish store" in res.stderr

        # -f -v: prints the command it would run, mounts nothing.
        res = run("mount", "-f", "-v", "-t", "efsish", store, str(mp), "-o", f"{cache},ro")
        assert "would run" in res.stderr and "--cache-dir" in res.stderr
        assert mount_line(mp) is None

        # A mount still in use is refused like umount(2) would ("target is busy"), not
        # detached lazily under its users; once they are gone it unmounts.
        # (The helper checks with fuser, from psmisc, which scripts/bootstrap installs.)
        if shutil.which("fuser"):
            run("mount", "-t", "efsish", store, str(mp), "-o", f"{cache},_netdev")
            user = subprocess.Popen(["sleep", "60"], cwd=mp)
            try:
                res = run("umount", str(mp), check=False)
                assert res.returncode != 0
                assert "busy" in res.stderr
                check_live(mp, store)
            finally:
                user.kill()
                user.wait()
            run("umount", str(mp))
            assert mount_line(mp) is None

        # ro reaches the daemon.
        run("mount", "-t", "efsish", store, str(mp), "-o", f"{cache},ro")
        assert "ro" in mount_line(mp)[3].split(",")  # type: ignore[index]
        with pytest.raises(OSError):
            (mp / "x").write_text("no")
        run("umount", str(mp))
        assert not is_mounted(mp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bdi_readahead_kb(mp: Path) -> int:
    fields = mount_line(mp)
    assert fields is not None
    with open("/proc/self/mountinfo") as f:
        dev = [ln.split()[2] for ln in f if ln.split()[4] == str(mp)][-1]
    return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())


def test_helper_passes_every_option_efsish_knows(helpers: None, tmp_path: Path) -> None:
    """The helper accepts exactly the options of `efsish mount -o` (one table): -s drops
    only unknown ones, never readahead or prometheus_port; bad values and options meant
    for other filesystems are errors that name them."""
    store = new_store(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    cache = f"cache_dir={tmp_path}/cache"
    port = free_port()
    with cleanup(mp):
        opts = f"{cache},bogus,readahead=2M,prometheus_port={port},noatime"
        run("mount", "-s", "-t", "efsish", store, str(mp), "-o", opts)
        check_live(mp, store)
        assert poll(lambda: bdi_readahead_kb(mp) == 2048), bdi_readahead_kb(mp)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"BurstCreditBalance" in r.read()
        run("umount", str(mp))
        assert mount_line(mp) is None

        for bad, word in [
            ("attr_timeout=-5", "attr_timeout"),
            ("poll_interval=nan", "poll_interval"),
            ("poll_interval=inf", "poll_interval"),
            ("cache_size=-1G", "cache_size"),
            ("readahead=-1", "readahead"),
            ("prometheus_port=0", "prometheus_port"),
            ("bg", "bg"),
        ]:
            res = run("mount", "-t", "efsish", store, str(mp), "-o", f"{cache},{bad}", check=False)
            assert res.returncode == 1, (bad, res)
            assert word in res.stderr, (bad, res.stderr)
            assert mount_line(mp) is None, bad
        # A bad value of a known option is an error even with -s.
        res = run(
            "mount",
            "-s",
            "-t",
            "efsish",
            store,
            str(mp),
            "-o",
            f"{cache},attr_timeout=-5",
            check=False,
        )
        assert res.returncode == 1 and "attr_timeout" in res.stderr, res
        assert mount_line(mp) is None
