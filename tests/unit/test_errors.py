"""efsish.errors.to_errno: the one rule mapping exceptions to the errno a caller sees."""

from __future__ import annotations

import errno

import pytest

from efsish.errors import (
    CorruptObject,
    FsError,
    NotFound,
    PermanentStoreError,
    PreconditionFailed,
    StoreConfigError,
    TransientStoreError,
    WriteConflict,
    to_errno,
)


def test_a_filesystem_error_keeps_its_errno() -> None:
    assert to_errno(FsError("exists", errno.EEXIST)) == errno.EEXIST
    assert to_errno(FsError("no space")) == errno.EIO


def test_an_os_error_keeps_its_errno() -> None:
    assert to_errno(OSError(errno.ENOSPC, "disk full")) == errno.ENOSPC
    assert to_errno(OSError("no errno")) == errno.EIO


@pytest.mark.parametrize(
    "exc",
    [
        NotFound("data/x"),  # a missing block is lost data, never ENOENT
        CorruptObject("bad"),
        TransientStoreError("timeout"),
        WriteConflict("409"),
        PermanentStoreError("denied"),
        StoreConfigError("no bucket"),
        PreconditionFailed("lost"),
        RuntimeError("bug"),
    ],
)
def test_everything_else_is_eio(exc: BaseException) -> None:
    assert to_errno(exc) == errno.EIO
