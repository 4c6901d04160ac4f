"""Wiring for `efsish mount` and `efsish umount`: checks, daemonising, the trio nursery,
signals, and the registry of running mounts.

Every error that can be found before the mount is live (bad store, not formatted,
missing or non-empty mountpoint, bad option) is reported by the parent process as one
line with a non-zero exit; the daemon signals readiness through a pipe only once the
FUSE mount is live. SIGTERM/SIGINT flush everything, then unmount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import ipaddress
import json
import logging
import logging.handlers
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import trio
import trio.lowlevel

from efsish.errors import EfsishError, UsageError
from efsish.filesystem import Filesystem, Options
from efsish.meta import accesspoints
from efsish.meta.superblock import load_superblock
from efsish.options import MountConfig
from efsish.procs import pid_alive, start_time
from efsish.store import ObjectStore, open_store

log = logging.getLogger(__name__)

#: Logged at every mount (and in README, "Limits"): the kernel keeps flock and fcntl
#: locks of a FUSE mount that does not implement them, so they are local to the mount.
LOCKS_NOTE = (
    "file locks (flock, fcntl/lockf) are local to this mount: processes using another "
    "mount of this filesystem (another machine, or another mount on this one) do not see them"
)


def default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/efsish")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "efsish"


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/efsish")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/efsish-{os.geteuid()}"
    return Path(base) / "efsish"


def _registry_file(mountpoint: str) -> Path:
    h = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / f"mount-{h}.json"


def stats_file(mountpoint: str) -> Path:
    """Where a mount publishes its EFS metrics once a second (read by `efsish stats`)."""
    return _registry_file(mountpoint).with_suffix(".stats.json")


def _mountinfo_unescape(field: str) -> str:
    """A path as /proc/self/mountinfo writes it, with octal escapes (\\040) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: str) -> tuple[str, str] | None:
    """(device major:minor, filesystem type) of the newest mount on the absolute `path`,
    or None. Reads /proc/self/mountinfo, never the mount itself: the mount of a daemon
    that died answers every stat() with ENOTCONN, and a live daemon may not be serving."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            parts = fields.split()
            if len(parts) > 4 and _mountinfo_unescape(parts[4]) == path:
                found = (parts[2], tail.split()[0] if tail else "")
    return found


def set_kernel_readahead(mountpoint: str, nbytes: int) -> None:
    """Set the kernel's readahead for the FUSE mount at `mountpoint` (best effort; needs
    root). The kernel starts FUSE mounts at 128 KiB, so a sequential reader sends one
    128 KiB request at a time; 1 MiB lets it send 1 MiB requests, a quarter of the
    round trips through the daemon. Reads /proc/self/mountinfo, never the mount itself
    (the daemon is not serving requests yet)."""
    target = os.path.abspath(mountpoint)
    try:
        found = mount_at(target)
        if found is None:
            return
        dev = found[0]
        Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(nbytes // 1024))
        log.debug("kernel readahead of %s (bdi %s) set to %d KiB", target, dev, nbytes // 1024)
    except OSError as e:
        log.debug("could not set the kernel readahead of %s: %s", target, e)


def _refuse_foreign(path: Path, what: str) -> None:
    """Refuse a directory the daemon keeps its cache or log in (or creates them in) that
    another user owns or that group or others may write: whoever can write there can
    read every user's cached names and data, plant a symlink the daemon (root) writes
    through, or poison the metadata view it serves."""
    st = os.stat(path)
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is not a directory; give a directory")
    if st.st_uid not in (euid, 0):
        raise UsageError(
            f"{what} {path} is owned by uid {st.st_uid}, not by uid {euid} or root; "
            f"remove it (`rm -rf {path}`: it is only a cache) or `chown -R {euid} {path}`"
        )
    if st.st_mode & 0o022:
        raise UsageError(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run `chmod go-w {path}` or use another one"
        )


def private_dir(path: Path, what: str) -> Path:
    """Create `path` (0700, with missing parents) and return it with symlinks resolved,
    after checking that it, and the existing directory mount creates into, belong to
    this user (or root) and that nobody else may write to them (`_refuse_foreign`)."""
    real = Path(os.path.realpath(path))
    missing = []
    p = real
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    if missing:
        _refuse_foreign(p, f"{what} parent")
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
    _refuse_foreign(real, what)
    return real


def open_log(path: Path) -> io.TextIOWrapper:
    """Open the daemon's log for appending, never through a symlink (O_NOFOLLOW) and only
    if it is a regular file of this user (or root) with no other name (a hard link to
    another file would make the daemon append to that file)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(
                f"log file {path} is a symlink; efsish writes its log only to a regular "
                f"file: remove it (`rm {path}`) or give another log=FILE"
            ) from None
        raise UsageError(f"cannot open the log file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in (os.geteuid(), 0):
        os.close(fd)
        raise UsageError(
            f"log file {path} is not a regular file of uid {os.geteuid()} with one link; "
            f"remove it (`rm {path}`) or give another log=FILE"
        )
    os.set_blocking(fd, True)
    return open(fd, "a", encoding="utf-8", errors="backslashreplace")


class _LogHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that opens its file (also after each rotation) with
    `open_log`: never through a symlink."""

    def _open(self) -> io.TextIOWrapper:
        return open_log(Path(self.baseFilename))


def lock_cache_dir(cache_dir: Path, fs_uuid: str, mountpoint: str) -> int:
    """Take the lock of filesystem `fs_uuid`'s part of `cache_dir` and return its fd,
    which the daemon holds until it exits (flock: the kernel drops it when the process
    dies, even by kill -9). Two mounts of one filesystem sharing a cache dir would share
    one metadata view and block cache; the second is refused here, in one line that
    names the mount that has it. Mounts of different filesystems may share a cache dir
    (each has its own part of it)."""
    path = cache_dir / f"{fs_uuid}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = "another efsish mount"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(os.pread(fd, 4096, 0))
            holder = f"the efsish mount at {doc['mountpoint']} (pid {int(doc['pid'])})"
        os.close(fd)
        raise UsageError(
            f"cache dir {cache_dir} is in use by {holder}; give this mount its own -o cache_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "mountpoint": mountpoint}).encode(), 0)
    return fd


def _check_mountpoint(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"mountpoint {path} does not exist: create it with `mkdir -p {path}`")
    if not p.is_dir():
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point")
    if any(p.iterdir()):
        raise UsageError(f"mountpoint {path} is not empty")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: install fuse3 and load the fuse module")


def transport_warning(store: ObjectStore, encrypted: bool) -> str | None:
    """A warning for a filesystem that is not encrypted at rest and whose requests go
    over plain http to another machine: names and data cross the network in the clear."""
    url = store.endpoint_url()
    if encrypted or url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"the endpoint {url} is plain http and this filesystem is not encrypted: file names "
        "and data cross the network in the clear; use https, or a filesystem made with "
        "`efsish format --encrypt`"
    )


async def _preflight(cfg: MountConfig) -> list[str]:
    """Check the store and the superblock (and the keys); return warnings for the user."""
    async with open_store(cfg.store_url, cfg.store_options) as store:
        if not cfg.ro:  # check() writes a probe; a read-only mount writes nothing
            await store.check()
        sb = await load_superblock(store)
        warning = transport_warning(store, sb.encryption is not None)
    return [warning] if warning else []


def mount(cfg: MountConfig) -> int:
    """Check everything, then run the daemon (in the background unless foreground).

    No threads or trio run may exist in this process before fork(): a forked child would
    inherit a thread cache whose threads do not exist. So the child does the store checks
    and reports any error back through a pipe, which the parent prints."""
    _check_mountpoint(cfg.mountpoint)
    cfg.cache_dir = private_dir(cfg.cache_dir, "cache dir")
    if cfg.cache_dir.stat().st_uid == os.geteuid():
        os.chmod(cfg.cache_dir, 0o700)  # it holds names and data of every user
    if cfg.log_file is None:
        cfg.log_file = cfg.cache_dir / "efsish.log"
    elif not cfg.log_file.parent.exists():
        private_dir(cfg.log_file.parent, "log dir")
    open_log(cfg.log_file).close()  # refuse a bad log file here, in one line
    if cfg.foreground:
        _setup_logging(cfg, to_stderr=True)
        return _run_daemon(cfg, ready_fd=None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become the daemon
        os.close(r)
        os.closerange(3, w)
        os.closerange(w + 1, 1024)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        code = 1
        try:
            _setup_logging(cfg, to_stderr=False)
            code = _run_daemon(cfg, ready_fd=w)
        except UsageError as e:
            _report(w, f"USAGE {e}")
        except EfsishError as e:
            _report(w, f"ERR {e}")
            log.error("mount failed: %s", e)
        except BaseException as e:
            _report(w, f"ERR unexpected error: {e!r}; see {cfg.log_file}")
            log.exception("daemon failed")
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        lines = pipe.read().decode(errors="replace").strip().splitlines()
    for line in lines:
        if line.startswith("WARN "):
            print(f"efsish: warning: {line[5:]}", file=sys.stderr)
    msg = lines[-1] if lines else ""
    if msg.startswith("OK"):
        return 0
    os.waitpid(pid, 0)
    if msg.startswith("USAGE "):
        raise UsageError(msg[6:])
    if msg.startswith("ERR "):
        raise EfsishError(msg[4:])
    raise EfsishError(f"the mount daemon exited before the mount was live; see {cfg.log_file}")


def _report(fd: int | None, msg: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, msg.encode())
        os.close(fd)


def _setup_logging(cfg: MountConfig, to_stderr: bool) -> None:
    root = logging.getLogger()
    root.setLevel(cfg.log_level)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    assert cfg.log_file is not None
    fh = _LogHandler(cfg.log_file, maxBytes=10 << 20, backupCount=3)
    fh.setFormatter(fmt)
    root.handlers = [fh]
    if to_stderr:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8


def limit_malloc_arenas(n: int = 2) -> bool:
    """Keep glibc to `n` malloc arenas (it makes up to 8 per core, one per thread that
    contends). Every worker thread that touched a 4 MiB block left it freed in an arena
    of its own, which glibc keeps: the daemon's peak RSS under two 800 MiB writers was
    751 MiB with the default and 514 with 2 arenas, three cold readers 432 -> 284, random
    reads 521 -> 288, with the same throughput (docs/ARCHITECTURE.md, memory bound). A
    fixed mmap threshold cut RSS further but cold reads by 30% (fresh pages for every
    block): not used. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False


def _run_daemon(cfg: MountConfig, ready_fd: int | None) -> int:
    limit_malloc_arenas()
    try:
        trio.run(_daemon_main, cfg, ready_fd)
    except BaseExceptionGroup as eg:
        # An error raised in the daemon's nursery before the mount was live: one line.
        if len(eg.exceptions) == 1 and isinstance(eg.exceptions[0], EfsishError):
            raise eg.exceptions[0] from None
        raise
    return 0


async def _daemon_main(cfg: MountConfig, ready_fd: int | None) -> None:
    import pyfuse3

    from efsish.access import AccessPointFs, open_root
    from efsish.fuse_ops import FuseOps, adapt_busy_poll, busy_poll, fuse_options, poll_metrics

    # Resolve the path before mounting: once mounted, stat() of the mountpoint would wait
    # for this very daemon.
    mountpoint = os.path.realpath(cfg.mountpoint)  # noqa: ASYNC240 - before the loop serves
    for warning in await _preflight(cfg):
        log.warning("%s", warning)
        if ready_fd is not None:
            os.write(ready_fd, f"WARN {warning}\n".encode())
    store = open_store(cfg.store_url, cfg.store_options)
    sb = await load_superblock(store)
    # The access point is read before anything starts: an unknown id is one line.
    ap = await accesspoints.load(store, cfg.access_point) if cfg.access_point else None
    lock_fd = lock_cache_dir(cfg.cache_dir, sb.fs_uuid, mountpoint)  # for the daemon's life
    fs = Filesystem(
        store,
        sb,
        Options(
            cache_dir=cfg.cache_dir,
            cache_bytes=cfg.cache_bytes,
            poll_interval=cfg.poll_interval,
            mountpoint=mountpoint,
            stats_file=stats_file(mountpoint),
            prometheus_port=cfg.prometheus_port,
            atime=cfg.atime,
            read_only=cfg.ro,
            commit_interval=cfg.commit_interval,
            sync=cfg.sync,
            nudge=cfg.nudge,
            cache_locked=True,  # lock_cache_dir above, held for the daemon's life
        ),
    )
    registry = _registry_file(mountpoint)
    async with trio.open_nursery() as nursery:
        await fs.start(nursery)
        served: Filesystem | AccessPointFs = fs
        if ap is not None:
            try:
                served = AccessPointFs(fs, ap, await open_root(fs, ap, read_only=cfg.ro))
            except EfsishError:
                with trio.CancelScope(shield=True):
                    await fs.shutdown()
                raise
            log.info("access point %s: root %s, every request as uid %d", ap.id, ap.root, ap.uid)
        ops = FuseOps(served, attr_timeout=cfg.attr_timeout, entry_timeout=cfg.attr_timeout)
        if not busy_poll(cfg.busy_poll_us):
            log.warning(
                "busy_poll: this pyfuse3 cannot poll the FUSE device, so every request "
                "waits through trio; efsish's scripts/bootstrap installs a patched one"
            )
        fs.metering.extra.append(poll_metrics)
        pyfuse3.init(
            ops,
            mountpoint,
            fuse_options(
                allow_other=cfg.allow_other and os.geteuid() == 0,
                fsname=f"efsish:{cfg.store_url}",
                ro=cfg.ro,
                kernel_permissions=ap is None,
            ),
        )

        async def readahead_after_init() -> None:
            await ops.initialized.wait()
            await trio.lowlevel.checkpoint()  # the INIT reply has been written by now
            set_kernel_readahead(mountpoint, cfg.readahead)

        nursery.start_soon(readahead_after_init)
        registry.parent.mkdir(parents=True, exist_ok=True)
        registry.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "start": start_time(os.getpid()),
                    "mountpoint": mountpoint,
                    "store": cfg.store_url,
                    "cache_dir": str(cfg.cache_dir),
                    "client": fs.meta.client_id,
                    "log": str(cfg.log_file),
                }
            )
        )
        log.info("mounted %s on %s (client %s)", cfg.store_url, cfg.mountpoint, fs.meta.client_id)
        log.info(LOCKS_NOTE)
        nursery.start_soon(ops.invalidation_worker)
        nursery.start_soon(adapt_busy_poll, cfg.busy_poll_us)
        stopping = trio.Event()

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: flushing and unmounting", signum)
                    stopping.set()
                    await fs.shutdown()
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        _report(ready_fd, "OK")
        try:
            await pyfuse3.main()
        finally:
            if not stopping.is_set():
                with trio.CancelScope(shield=True):
                    await fs.shutdown()
            nursery.cancel_scope.cancel()
    try:
        pyfuse3.close(unmount=True)
    finally:
        registry.unlink(missing_ok=True)
        stats_file(mountpoint).unlink(missing_ok=True)
        with trio.CancelScope(shield=True):
            await fs.meta.aclose()
            await store.aclose()
        os.close(lock_fd)
        log.info(
            "unmounted %s (largest FUSE requests: read %d, write %d bytes)",
            mountpoint,
            ops.largest_read,
            ops.largest_write,
        )


def _daemon_of(reg: Path, mountpoint: str) -> int | None:
    """The PID of the live efsish daemon that the registry file `reg` names for
    `mountpoint`, or None. A daemon killed with -9 leaves its registry file behind and
    its PID may belong to any process by now: the PID counts only if that process started
    when the registry says (its identity), runs `efsish mount`, and the file is about
    this mountpoint."""
    try:
        entry = json.loads(reg.read_text())
        pid = int(entry["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if entry.get("mountpoint") not in (None, mountpoint) or not pid_alive(pid):
        return None
    if entry.get("start") is not None and entry["start"] != start_time(pid):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    runs_efsish = any(os.path.basename(a) == b"efsish" for a in argv[:3])
    return pid if runs_efsish and b"mount" in argv else None


def umount(mountpoint: str, timeout: float = 120.0) -> int:
    """Flush and unmount: SIGTERM the daemon and wait; fall back to fusermount3 -u.
    Only the efsish daemon of this mountpoint is ever signalled, and only an efsish
    mount is ever unmounted; a stale registry file is removed."""
    mp = os.path.abspath(mountpoint)  # no stat(): the daemon may be stuck
    reg = _registry_file(mp)
    pid = _daemon_of(reg, mp)
    if pid is None and reg.exists():
        reg.unlink(missing_ok=True)
        stats_file(mp).unlink(missing_ok=True)
    if pid is not None:
        # A normal (not lazy) unmount first: a busy mount must stay mounted and usable.
        res = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
        if res.returncode != 0 and "busy" in res.stderr.lower():
            raise EfsishError(
                f"{mountpoint}: target is busy (a process has a file or its working "
                "directory there); close it and retry, e.g. find it with `fuser -vm "
                f"{mountpoint}`"
            )
        if res.returncode != 0:
            os.kill(pid, signal.SIGTERM)  # let the daemon flush and unmount itself
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (pid_alive(pid) or os.path.ismount(mp)):
            time.sleep(0.05)
        if pid_alive(pid):
            raise EfsishError(f"the daemon (pid {pid}) did not exit within {timeout:.0f}s")
        return 0
    found = mount_at(mp)
    if found is None:
        raise UsageError(f"{mountpoint} is not mounted")
    if found[1] != "fuse.efsish":
        raise UsageError(f"{mountpoint} is not an efsish mount ({found[1]}); use umount(8)")
    # An efsish mount whose daemon is gone (killed, crashed): detach it.
    res = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if res.returncode != 0:
        raise EfsishError(f"fusermount3 -u {mp} failed: {res.stderr.strip()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `efsish mount`")
