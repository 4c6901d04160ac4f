"""An encrypted filesystem on a real mount: `efsish keygen`, `format --encrypt`, mounts
with --key-file and -o key_file=, nothing readable in the bucket, one-line errors for a
missing or wrong key, and a damaged block read as EIO with a line in the daemon's log."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from efsish import codec
from tests.fuse.conftest import Mount, efsish, is_mounted, stop_mount

pytestmark = pytest.mark.fuse

NAME = "payroll-secret-2025.csv"
CONTENTS = b"alice,123456,highly-confidential-salary\n" * 3000  # ~120 KiB


def bucket_bytes(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_encrypted_mount_round_trip_and_nothing_readable_in_the_bucket(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    key = tmp_path / "fs.key"
    efsish("keygen", str(key))
    assert (key.stat().st_mode & 0o777) == 0o600
    root = tmp_path / "store"
    store = f"file://{root}"
    out = efsish("format", store, "--block-size", "1M", "--encrypt", "--key-file", str(key))
    assert "encrypted" in out.stdout

    # No key, a wrong key: one line each, nothing mounted.
    mp = tmp_path / "mnt-nokey"
    mp.mkdir()
    for extra, says in [
        ([], "is encrypted: give its key with --key-file"),
        (["--key-file", str(tmp_path / "other.key")], "wrong key"),
    ]:
        if extra:
            efsish("keygen", extra[1])
        res = efsish(
            "mount", store, str(mp), "--cache-dir", str(tmp_path / "c0"), *extra, check=False
        )
        assert res.returncode == 1, res
        assert len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr
        assert not is_mounted(mp)
    res = efsish("fsck", store, check=False)
    assert res.returncode == 1 and "is encrypted" in res.stderr, res.stderr

    m = mounter(store, "--key-file", str(key), fmt=False)
    d = m.path / "finance"
    d.mkdir()
    (d / NAME).write_bytes(CONTENTS)
    assert (d / NAME).read_bytes() == CONTENTS
    stop_mount(m)

    objects = bucket_bytes(root)
    assert any(k.startswith("objects/data.d/") for k in objects), sorted(objects)
    for path, blob in objects.items():
        for secret in (NAME.encode(), b"finance", b"highly-confidential-salary"):
            assert secret not in blob and secret not in path.encode(), (path, secret)
        if path not in ("objects/superblock.o", "efsish-local-store"):
            assert not blob.startswith(codec.MAGIC), path

    # Another mount, with the key as an fstab option, reads it back; fsck agrees.
    m2 = mounter(store, "-o", f"key_file={key}", fmt=False)
    assert (m2.path / "finance" / NAME).read_bytes() == CONTENTS
    stop_mount(m2)
    efsish("fsck", store, "--verify-data", "-q", "--key-file", str(key))


def test_a_flipped_byte_in_a_block_is_eio_and_the_daemon_log_names_it(
    mounter: Callable[..., Mount], tmp_path: Path
) -> None:
    key = tmp_path / "fs.key"
    efsish("keygen", str(key))
    root = tmp_path / "store"
    store = f"file://{root}"
    efsish("format", store, "--block-size", "1M", "--encrypt", "--key-file", str(key))
    m = mounter(store, "--key-file", str(key), fmt=False)
    (m.path / NAME).write_bytes(CONTENTS)
    stop_mount(m)
    (block,) = (root / "objects" / "data.d").iterdir()
    blob = bytearray(block.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    block.write_bytes(bytes(blob))

    m2 = mounter(store, "--key-file", str(key), fmt=False)  # a fresh cache: the bucket's bytes
    with pytest.raises(OSError) as e:
        (m2.path / NAME).read_bytes()
    assert e.value.errno == errno.EIO
    name = "data/" + block.name.removesuffix(".o")
    assert f"ERROR efsish.store.crypt: {name} failed authentication" in m2.log(), m2.log()
