"""Bad input under a live mount: corrupt or missing blocks, a truncated log entry and
foreign objects give EIO to the caller, a readable message in the log and from fsck,
and never crash the daemon or return wrong data. Bad mount options are refused before
anything is mounted."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from efsish.meta.keys import log_key
from efsish.mount import _registry_file
from efsish.options import MountConfig, apply_mount_options
from efsish.procs import pid_alive
from efsish.store import StoreOptions
from tests.fuse.conftest import Mount, efsish, force_unmount, is_mounted


def objects(store: str) -> Path:
    return Path(store[len("file://") :]) / "objects"


def block_files(store: str) -> list[Path]:
    return sorted((objects(store) / "data.d").glob("*.o"))


def test_corrupt_and_missing_blocks(mounter) -> None:
    m: Mount = mounter()
    data = os.urandom(3 * 1024 * 1024)  # three 1 MiB blocks
    (m.path / "f").write_bytes(data)
    blocks = block_files(m.store)
    assert len(blocks) == 3
    blocks[0].write_bytes(os.urandom(1024 * 1024))  # same size, wrong content
    blocks[1].unlink()
    fresh = mounter(m.store, fmt=False)  # empty block cache: must read the store
    with open(fresh.path / "f", "rb") as f, pytest.raises(OSError) as e:
        f.read()
    assert e.value.errno == errno.EIO
    assert pid_alive(fresh.pid)
    (fresh.path / "other").write_text("still works")
    assert (fresh.path / "other").read_text() == "still works"
    log = fresh.log()
    assert "missing" in log or "corrupt" in log or "checksum" in log, log[-2000:]
    res = efsish("fsck", m.store, "-q", check=False)
    assert res.returncode == 1
    assert "missing from the store" in res.stdout


def test_truncated_log_entry_and_foreign_objects(mounter) -> None:
    m: Mount = mounter()
    (m.path / "before").write_text("committed")
    objs = objects(m.store)
    # A foreign object in the prefix is reported by fsck but does not break anything.
    (objs / "photo.jpg.o").write_bytes(b"\xff\xd8 not efsish")
    seqs = sorted(int(p.name[:-2]) for p in (objs / "log.d").glob("*.o"))
    bad = objs / "log.d" / f"{log_key(seqs[-1] + 1).split('/')[1]}.o"
    bad.write_bytes(b"EFSISH\x01L" + b"\0" * 5)  # a truncated entry at the head
    with pytest.raises(OSError) as e:
        (m.path / "after").write_text("x")
    assert e.value.errno == errno.EIO
    assert pid_alive(m.pid)
    assert (m.path / "before").read_text() == "committed"  # what was applied still reads
    assert "cannot apply the metadata log" in m.log()
    res = efsish("fsck", m.store, "-q", check=False)
    assert res.returncode == 1
    assert "cannot be replayed" in res.stdout and "truncated" in res.stdout
    assert "foreign object 'photo.jpg'" in res.stdout


@pytest.mark.parametrize(
    "option",
    [
        "attr_timeout=-5",
        "attr_timeout=nan",
        "attr_timeout=inf",
        "poll_interval=-1",
        "poll_interval=0",
        "poll_interval=nan",
        "poll_interval=inf",
        "cache_size=-5G",
        "cache_size=inf",
        "cache_size=nan",
        "readahead=-1",
        "readahead=inf",
        "prometheus_port=-1",
        "attr_timeout",
        "ro=1",
        "nudge",
        "nudge=bogus",
        "nudge=0.0.0.0:7000",
        "nudge=127.0.0.1:70000",
    ],
)
def test_bad_mount_option_values_are_refused(tmp_path: Path, option: str) -> None:
    store = f"file://{tmp_path}/store"
    efsish("format", store, "--block-size", "1M")
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        res = efsish(
            "mount", store, str(mp), "--cache-dir", f"{tmp_path}/c", "-o", option, check=False
        )
        assert res.returncode == 2, res
        line = res.stderr.strip()
        assert len(line.splitlines()) == 1 and option.partition("=")[0] in line, line
        assert "Traceback" not in res.stderr
        assert not is_mounted(mp)
    finally:
        reg = _registry_file(str(mp))
        pid = int(json.loads(reg.read_text())["pid"]) if reg.exists() else None
        if is_mounted(mp):
            efsish("umount", str(mp), check=False)
        force_unmount(mp, pid)


def test_the_nudge_option_is_parsed_and_kept() -> None:
    def parsed(*opts: str) -> MountConfig:
        cfg = MountConfig("memory://x", "/mnt", StoreOptions(), Path("/tmp/c"))
        apply_mount_options(cfg, list(opts))
        return cfg

    assert parsed().nudge == "auto"
    for value in ("off", "auto", "192.0.2.1:7000", "[::1]:0", "host.example:7000"):
        assert parsed(f"nudge={value}").nudge == value
