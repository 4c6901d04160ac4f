"""Checkpoints: `checkpoints/<seq>` holds the SQLite view as of log position <seq>
(SQLite's backup of the file, in a `C` envelope), so that a new mount loads it and
replays only the tail of the log, and gc can trim the log below it.

This module owns the checkpoint object: finding the newest, taking a snapshot of a
view, uploading it, and verifying and installing a downloaded one as the view's file.
It holds no state and takes no locks: its caller (efsish.meta.log) decides when to
checkpoint, runs the SQLite work in the writer's worker thread under the writer lock,
and closes and reopens its connections around an install. It must not write anything
else to the bucket, and never installs a file that is not the named position of this
filesystem.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

from efsish import codec
from efsish.errors import CorruptObject, PreconditionFailed
from efsish.meta.keys import CKPT_PREFIX, ckpt_key, parse_seq
from efsish.meta.view import View
from efsish.store import ObjectStore


async def newest(store: ObjectStore) -> str | None:
    """The key of the newest checkpoint in the bucket, or None."""
    found: str | None = None
    async for info in store.list(CKPT_PREFIX):
        if parse_seq(info.key, CKPT_PREFIX) is not None:
            found = info.key
    return found


def decode(blob: bytes, what: str) -> bytes:
    """The SQLite file inside a downloaded checkpoint (CorruptObject if damaged)."""
    return codec.decode(b"C", blob, what)


def install(data: bytes, seq: int, what: str, db_path: Path, fs_uuid: str) -> None:
    """Make `data` (from `decode`) the view's file at `db_path`, once it proves to be
    position `seq` of filesystem `fs_uuid`. No connection to `db_path` may be open."""
    tmp = Path(str(db_path) + ".ckpt")
    tmp.write_bytes(data)
    check = sqlite3.connect(tmp)
    try:
        row = check.execute("SELECT value FROM meta WHERE key='applied_seq'").fetchone()
        fsu = check.execute("SELECT value FROM meta WHERE key='fs_uuid'").fetchone()
    finally:
        check.close()
    if row is None or int(row[0]) != seq or fsu is None or fsu[0] != fs_uuid:
        raise CorruptObject(f"{what}: checkpoint does not match its name or filesystem")
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    os.replace(tmp, db_path)


def snapshot(view: View, scratch_dir: Path) -> tuple[int, bytes]:
    """A copy of `view`'s committed state and the position it is at (a worker thread,
    with no transaction of the writer open). `scratch_dir` holds the copy briefly."""
    fd, tmp = tempfile.mkstemp(dir=scratch_dir, suffix=".snap")
    os.close(fd)
    try:
        dst = sqlite3.connect(tmp)
        try:
            view.db.backup(dst)
        finally:
            dst.close()
        return view.applied_seq, Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


async def upload(store: ObjectStore, seq: int, data: bytes) -> None:
    """PUT `data` (from `snapshot`) as checkpoints/<seq>; another mount's checkpoint of
    the same position is as good."""
    try:
        await store.put_if_absent(ckpt_key(seq), codec.encode(b"C", data))
    except PreconditionFailed:
        pass  # another mount checkpointed the same position
