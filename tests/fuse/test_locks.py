"""File locks are local to one mount (README, "Limits"): the documented limit holds, and
every mount says so in its log at startup."""

from __future__ import annotations

import fcntl

from tests.fuse.conftest import Mount


def test_locks_are_per_mount_and_the_log_says_so(mounter) -> None:
    a: Mount = mounter()
    b: Mount = mounter(a.store, fmt=False)
    for m in (a, b):
        assert "file locks (flock, fcntl/lockf) are local to this mount" in m.log(), m.log()
    (a.path / "f").write_text("x")
    with open(a.path / "f", "r+") as fa, open(b.path / "f", "r+") as fb:
        fcntl.flock(fa, fcntl.LOCK_EX)
        # The other mount does not see the lock (as another machine would not).
        fcntl.flock(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Within one mount, locks work as usual.
        with open(a.path / "f", "r+") as fa2:
            try:
                fcntl.flock(fa2, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                raise AssertionError("a second flock on the same mount was granted")


def test_debug_logging_reaches_the_daemon(mounter) -> None:
    """`-o debug` (and `efsish -v mount`) set the daemon's own log level, not only the
    parent's: its log then holds DEBUG lines; without it, none."""
    quiet: Mount = mounter()
    loud: Mount = mounter(quiet.store, "-o", "debug", fmt=False)
    (loud.path / "f").write_text("x")
    assert " DEBUG " in loud.log(), loud.log()
    assert " DEBUG " not in quiet.log(), quiet.log()
