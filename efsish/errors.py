"""Every error type efsish raises, and the one rule that maps them to errno.

Store errors describe what went wrong talking to the object store; filesystem errors carry
the POSIX errno a caller must see. This module must not import pyfuse3 or any backend.
"""

from __future__ import annotations

import errno


class EfsishError(Exception):
    """Base of all efsish errors. str(e) is a one-line message meant for a human."""


class UsageError(EfsishError):
    """Invalid command-line input or option; the message says what to fix."""


# --------------------------------------------------------------------------- store errors


class StoreError(EfsishError):
    """Base of every object-store error."""


class NotFound(StoreError):
    """The key does not exist (or the byte range starts past its end)."""


class PreconditionFailed(StoreError):
    """A conditional create lost: another writer created the key first."""


class TransientStoreError(StoreError):
    """The store did not answer correctly after all retries; trying later may work."""


class WriteConflict(TransientStoreError):
    """409 ConditionalRequestConflict: another conditional write to the same key was in
    flight at the server. Retry after a short pause."""


class PermanentStoreError(StoreError):
    """The store refused the request; retrying will not help (e.g. access denied)."""


class StoreConfigError(PermanentStoreError):
    """The store cannot be used as configured: wrong credentials, missing bucket,
    unreachable endpoint, malformed URL. The message says what to fix."""


class CorruptObject(StoreError):
    """An object read back failed its checksum or could not be parsed."""


# ---------------------------------------------------------------------- filesystem errors


class FsError(EfsishError):
    """A filesystem operation failed with a POSIX errno."""

    errno: int = errno.EIO

    def __init__(self, message: str = "", err: int | None = None) -> None:
        super().__init__(message or errno.errorcode.get(err or self.errno, "EIO"))
        if err is not None:
            self.errno = err


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE caller sees for any exception: an FsError's own errno (POSIX
    outcomes are raised where they are decided, e.g. EEXIST in a planner), an OSError's
    errno, and EIO for everything else. Store errors are EIO on purpose: a block or log
    entry that should exist and is missing is lost data, not ENOENT, and a corrupt,
    refused or unanswered request is an I/O error to the caller."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
