"""A first real mount: files, directories, and data survive a remount."""

from __future__ import annotations

import os

from tests.fuse.conftest import Mount, efsish, is_mounted


def test_write_read_remount(mounter) -> None:
    m: Mount = mounter()
    (m.path / "d").mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (m.path / "d" / "f").write_bytes(data)
    assert (m.path / "d" / "f").read_bytes() == data
    efsish("umount", str(m.path))
    assert not is_mounted(m.path)
    m2 = mounter(m.store)
    assert (m2.path / "d" / "f").read_bytes() == data
    assert efsish("fsck", m.store, "-q").returncode == 0
    efsish("umount", str(m2.path))
    # The largest requests libfuse could agree with the kernel: 1 MiB writes and reads
    # (the write above was one write() of 3 MiB; the read goes through 1 MiB readahead).
    mib = 1024 * 1024
    assert f"write {mib} bytes" in m.log(), m.log()[-500:]
    assert f"largest FUSE requests: read {mib}," in m2.log(), m2.log()[-500:]
