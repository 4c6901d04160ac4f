"""Bad input under a live mount: corrupt or missing blocks, a truncated log entry and
foreign objects give EIO to the caller, a readable message in the log and from fsck,
and never crash the daemon or return wrong data."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from efsish.meta.log import log_key
from efsish.procs import pid_alive
from tests.fuse.conftest import Mount, efsish


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
