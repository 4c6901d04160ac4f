"""The materialised view of the metadata log: SQLite tables and the one function that
applies a logged operation to them.

Every change to the filesystem's metadata is an *op* (efsish.meta.ops: one typed class
per kind) inside a log entry. apply_entry() and apply_op() are the only code that
mutates the replicated tables, and they are deterministic: they never read the clock,
randomness or anything local, so every mount that applies the same log prefix holds the
same tables. An entry with a lease header is also judged by the lease protocol
(docs/design/LEASES.md §4) and fenced, not applied, when it breaks it. Planners (in
efsish.filesystem) validate a request against the view and emit ops; the committer
applies those same ops through apply_op().

This module is synchronous (sqlite3) and must only be called from worker threads that
the async layer (efsish.meta.log) serialises. It must not import trio or pyfuse3. The
judgement of lease-era entries lives in efsish.meta.leasing; what stays here (the
schema, the queries and the namespace ops, ~700 lines) shares the same tables and reads
best in one place.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efsish.errors import CorruptObject, EfsishError
from efsish.meta import leasing
from efsish.meta.domains import DEFAULT_LEASE_DEPTH
from efsish.meta.leasing import (
    FENCE_NO_HEADER,
    LEASE_FORMAT,
    PRE_LEASE_FORMAT,
    Fencing,
    Holder,
)
from efsish.meta.ops import (
    BlocksDeleted,
    ClaimInodes,
    Extent,
    Fmt,
    LAcq,
    LAdopt,
    LDirty,
    LFlush,
    Ln,
    LogEntry,
    LRcv,
    LRec,
    LRel,
    LTko,
    Mk,
    Mv,
    Op,
    RemoveXattr,
    Rm,
    Sess,
    SetAttr,
    SetXattr,
    Write,
)

__all__ = [
    "FIRST_FREE_INO",
    "LEASE_FORMAT",
    "ROOT_INO",
    "ApplyResult",
    "Attr",
    "Extent",
    "Fencing",
    "Holder",
    "Op",
    "View",
]

ROOT_INO = 1
FIRST_FREE_INO = 2
# SQLite checkpoints the WAL inside the COMMIT that crosses its threshold and, with
# synchronous=NORMAL, syncs the WAL and the database there: at its default (1,000 frames;
# a change writes about 14) every ~70th change waited 5-10 ms. A mount checkpoints in the
# background instead (`checkpoint_wal`, MetaLog.keep_wal); WAL_AUTOCHECKPOINT is the
# backstop for a view nobody checkpoints (efsish gc, fsck). WAL_SIZE_LIMIT 0 truncates
# the WAL once a checkpoint has emptied it: a COMMIT that overwrote the frames of the
# previous round in place took 0.7-0.9 ms instead of 0.04 ms (ext4 on a virtual disk).
WAL_AUTOCHECKPOINT = 131_072
WAL_SIZE_LIMIT = 0

SCHEMA = """
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    rdev INTEGER NOT NULL DEFAULT 0,
    atime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    target BLOB
);
CREATE TABLE IF NOT EXISTS dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries (ino);
CREATE INDEX IF NOT EXISTS dentries_parent_id ON dentries (parent, id);
CREATE TABLE IF NOT EXISTS extents (
    ino INTEGER NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL,
    key TEXT,
    koff INTEGER NOT NULL DEFAULT 0,
    bsize INTEGER NOT NULL DEFAULT 0,
    hash TEXT,
    data BLOB,
    crcs TEXT,
    PRIMARY KEY (ino, off)
);
CREATE INDEX IF NOT EXISTS extents_key ON extents (key);
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
);
CREATE TABLE IF NOT EXISTS garbage (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    t INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value
);
-- The lease tables (docs/design/LEASES.md §4), replicated like the rest. A view or a
-- checkpoint from before leases gains them, empty, when it is opened.
CREATE TABLE IF NOT EXISTS sessions (
    client TEXT PRIMARY KEY,       -- newest incarnation of each client
    inc INTEGER NOT NULL,
    started_seq INTEGER NOT NULL,
    dirty_seq INTEGER              -- set by ldirty: the client has journal rows
);
CREATE TABLE IF NOT EXISTS leases (
    domain INTEGER PRIMARY KEY,    -- the domain root's inode number
    holder_client TEXT,            -- NULL: FREE (a tombstone; rows are never deleted)
    holder_inc INTEGER,
    epoch INTEGER NOT NULL         -- log position of the row's last change
);
CREATE TABLE IF NOT EXISTS recalls (
    domain INTEGER NOT NULL,
    rid TEXT NOT NULL,
    by_client TEXT NOT NULL,
    by_inc INTEGER NOT NULL,
    want TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (domain, rid)
);
CREATE TABLE IF NOT EXISTS fenced (
    client TEXT NOT NULL,
    inc INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,    -- its journaled entries are refused from here on
    reason TEXT NOT NULL,
    rcv_seq INTEGER,               -- ... until its lrcv at this position
    path TEXT,
    PRIMARY KEY (client, inc, first_seq)
);
CREATE TABLE IF NOT EXISTS shares (  -- LEASES.md §17: who shares the top for reading
    client TEXT NOT NULL,
    inc INTEGER NOT NULL,
    seq INTEGER NOT NULL,          -- the lshr's position
    PRIMARY KEY (client, inc)
);
"""


@dataclass
class Attr:
    """An inode's attributes as the view holds them (times in nanoseconds)."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime: int
    mtime: int
    ctime: int
    version: int
    target: bytes | None = None

    def copy(self) -> Attr:
        """A copy (what the memo hands out: callers may change it). Four times as fast
        as dataclasses.replace, which goes through __init__ field by field: every lookup,
        getattr and listed entry makes one."""
        new = object.__new__(Attr)
        new.__dict__.update(self.__dict__)
        return new

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass
class ApplyResult:
    """What applying ops changed, for cache invalidation and open-unlinked files."""

    inodes: set[int] = field(default_factory=set)  # attrs or data changed
    data: set[int] = field(default_factory=set)  # file contents changed
    entries: set[tuple[int, bytes]] = field(default_factory=set)  # (parent, name) changed
    freed: dict[int, tuple[Attr, list[Extent]]] = field(default_factory=dict)
    xattrs: set[int] = field(default_factory=set)  # extended attributes changed
    created: set[int] = field(default_factory=set)  # new inodes (no xattrs yet)
    created_dirs: set[int] = field(default_factory=set)  # new directories (empty when made)
    leases: set[int] = field(default_factory=set)  # domains whose lease or recalls changed
    # Incarnations whose share of the top began or ended (LEASES.md §17), and of those
    # the ones a change of the top revoked, with that op's (writer client, position).
    shares: set[Holder] = field(default_factory=set)
    revoked: set[Holder] = field(default_factory=set)
    revoker: tuple[str, int] | None = None
    # Set when the entry was fenced: it changed nothing (the fields above are empty).
    fenced: Fencing | None = None

    def merge(self, other: ApplyResult) -> None:
        self.inodes |= other.inodes
        self.data |= other.data
        self.entries |= other.entries
        self.freed.update(other.freed)
        self.xattrs |= other.xattrs
        self.created |= other.created
        self.created_dirs |= other.created_dirs
        self.leases |= other.leases
        self.shares |= other.shares
        self.revoked |= other.revoked
        self.revoker = other.revoker or self.revoker


_ATTR_COLS = "ino, mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, version, target"
# The writer keeps at most this many directory parents (`keep_rows`; ~100 bytes each),
# forgetting them all when full, as the memo does.
KEPT_PARENTS = 200_000
# ... and at most this many files made since (`_born`; ~150 bytes each).
KEPT_BORN = 100_000


class View:
    """A SQLite materialised view. One writer connection applies ops; readers use their
    own View objects on the same file (WAL mode) and see only committed state."""

    def __init__(
        self, path: Path | str, *, readonly: bool = False, lease_depth: int = DEFAULT_LEASE_DEPTH
    ) -> None:
        self.path = str(path)
        # The depth of the domain roots (the superblock's; every mount uses the same).
        self.lease_depth = lease_depth
        # Never through a symlink: the daemon runs as root, and SQLite follows them.
        for p in (self.path, *(self.path + s for s in ("-wal", "-shm", "-journal"))):
            if os.path.islink(p):
                raise EfsishError(f"metadata view file {p} is a symlink; remove it")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        # Position and time of the entry being applied: recorded with garbage blocks.
        self.cur_seq = 0
        self.cur_t = 0
        # Rows a change reads again and again (the parents of the directories above it,
        # the leases of its domains, the journal counter), kept in memory once
        # `keep_rows` is called: only on the connection that writes them, emptied at
        # every rollback and changed wherever this class changes those rows.
        self._parents: dict[int, int] | None = None
        self._leases: dict[int, tuple[Holder | None, int]] | None = None
        self._meta: dict[str, Any] | None = None
        # Files a Mk of this connection made, kept while no op has changed their links:
        # ino -> (its one parent, no extents yet). A file's layout at close, the op
        # after its create, then needs neither its parents nor its extents read, to
        # find its domain (leasing) or to punch its old layout (`_op_w`): 4 of the 9
        # statements another mount's create takes to replay.
        self._born: dict[int, tuple[int, bool]] | None = None
        self.db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(extents)")}
            if "crcs" not in cols:  # a view or checkpoint from before ranged reads
                self.db.execute("ALTER TABLE extents ADD COLUMN crcs TEXT")

    def close(self) -> None:
        self.db.close()

    def keep_rows(self) -> None:
        """Keep the rows a change reads most in memory (see __init__). Only for the
        writer: no other connection may change the view's tables."""
        self._parents, self._leases, self._meta, self._born = {}, {}, {}, {}

    def _dentries_change(self, *inos: int | None) -> None:
        """The dentries of `inos` are about to change: their kept parents go."""
        for kept in (self._parents, self._born):
            if kept is not None:
                for ino in inos:
                    if ino is not None:
                        kept.pop(ino, None)

    def born_parent(self, ino: int) -> int | None:
        """The one parent of file `ino` if a Mk of this connection made it and no op
        changed its links since (its domain is that directory's), else None: ask the
        tables."""
        kept = self._born
        born = None if kept is None else kept.get(ino)
        return None if born is None else born[0]

    def _forget_rows(self) -> None:
        for kept in (self._parents, self._leases, self._meta, self._born):
            if kept is not None:
                kept.clear()

    # ------------------------------------------------------------------ transactions

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        self._forget_rows()
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def savepoint(self, name: str) -> None:
        self.db.execute(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        self.db.execute(f"RELEASE {name}")

    def rollback_to(self, name: str) -> None:
        self._forget_rows()
        self.db.execute(f"ROLLBACK TO {name}")
        self.db.execute(f"RELEASE {name}")

    # --------------------------------------------------------------------- meta keys

    def get_meta(self, key: str, default: Any = None) -> Any:
        kept = self._meta
        if kept is not None and key in kept:
            return kept[key]
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        if kept is not None:
            kept[key] = row[0]
        return row[0]

    def set_meta(self, key: str, value: Any) -> None:
        # An UPDATE in place where the key exists (every change sets a counter or the
        # position): REPLACE would delete and re-insert the row, rewriting the key's
        # index page too, one more page in the WAL per commit.
        kept = self._meta
        if kept is not None:
            kept.pop(key, None)
        if not self.db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key)).rowcount:
            self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        if kept is not None and type(value) in (int, str):  # as SQLite gives them back
            kept[key] = value

    @property
    def applied_seq(self) -> int:
        return int(self.get_meta("applied_seq", 0))

    def initialised(self) -> bool:
        return self.get_meta("fs_uuid") is not None

    def init_root(
        self, fs_uuid: str, t: int, uid: int = 0, gid: int = 0, mode: int = 0o755
    ) -> None:
        """Create the root directory in an empty view (state before log entry 1)."""
        self.db.execute(
            f"INSERT INTO inodes ({_ATTR_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (ROOT_INO, stat.S_IFDIR | mode, uid, gid, 2, 0, 0, t, t, t, 0, None),
        )
        self.set_meta("fs_uuid", fs_uuid)
        self.set_meta("applied_seq", 0)
        self.set_meta("next_ino", FIRST_FREE_INO)

    # ----------------------------------------------------------------------- queries

    def getattr(self, ino: int) -> Attr | None:
        row = self.db.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
        return Attr(*row) if row else None

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute(
            "SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return int(row[0]) if row else None

    def parent_of(self, ino: int) -> int | None:
        """The parent of a directory (directories have exactly one dentry)."""
        if ino == ROOT_INO:
            return ROOT_INO
        kept = self._parents
        if kept is not None and ino in kept:
            return kept[ino]
        row = self.db.execute(
            "SELECT parent FROM dentries WHERE ino = ? LIMIT 1", (ino,)
        ).fetchone()
        if row is None:
            return None
        if kept is not None:
            if len(kept) >= KEPT_PARENTS:
                kept.clear()
            kept[ino] = int(row[0])
        return int(row[0])

    def is_empty_dir(self, ino: int) -> bool:
        return (
            self.db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)).fetchone()
            is None
        )

    def readdir(self, ino: int, after_id: int, limit: int) -> list[tuple[int, bytes, int]]:
        """(cursor id, name, ino) of entries after `after_id`, in a stable order."""
        rows = self.db.execute(
            "SELECT id, name, ino FROM dentries WHERE parent = ? AND id > ? ORDER BY id LIMIT ?",
            (ino, after_id, limit),
        ).fetchall()
        return [(int(r[0]), bytes(r[1]), int(r[2])) for r in rows]

    def extents(
        self, ino: int, start: int = 0, end: int | None = None, limit: int | None = None
    ) -> list[Extent]:
        """The extents of `ino` overlapping [start, end), in order (the first `limit`)."""
        q = "SELECT off, len, key, koff, bsize, hash, data, crcs FROM extents WHERE ino = ?"
        args: list[Any] = [ino]
        if end is not None:
            q += " AND off < ?"
            args.append(end)
        q += " AND off + len > ? ORDER BY off"
        args.append(start)
        if limit is not None:
            q += " LIMIT ?"
            args.append(limit)
        return [
            Extent(
                r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]) if r[6] is not None else None, r[7]
            )
            for r in self.db.execute(q, args)
        ]

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.db.execute(
            "SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name)
        ).fetchone()
        return bytes(row[0]) if row else None

    def listxattr(self, ino: int) -> list[bytes]:
        rows = self.db.execute("SELECT name FROM xattrs WHERE ino = ? ORDER BY name", (ino,))
        return [bytes(r[0]) for r in rows]

    def stats(self) -> tuple[int, int]:
        """(number of inodes, bytes of file data)."""
        n, size = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN mode & 61440 = 32768 THEN size END), 0) "
            "FROM inodes"
        ).fetchone()
        return int(n), int(size)

    def is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory `anc` is `ino` or one of its ancestors."""
        seen = 0
        cur: int | None = ino
        while cur is not None and seen < 100000:
            if cur == anc:
                return True
            if cur == ROOT_INO:
                return False
            cur = self.parent_of(cur)
            seen += 1
        return False

    # ------------------------------------------------------------------ applying ops

    def apply_entry(self, seq: int, entry: LogEntry, res: ApplyResult) -> None:
        """Apply every op of log entry `seq` and record the new applied position.

        An entry without a lease header applies as it always has: an op that does not
        fit is CorruptObject (the mount stops at that position). A lease-era entry is
        judged by LEASES.md §4 instead: if it breaks the protocol or an op fails, it
        is *fenced* (`res.fenced` says why): it changes nothing but the fencing record,
        the same on every replayer, and the next entry applies."""
        if seq != self.applied_seq + 1:
            raise CorruptObject(
                f"log entry {seq} applied out of order (view at {self.applied_seq})"
            )
        self.cur_seq, self.cur_t = seq, entry.t
        if entry.leased:
            leasing.apply_leased_entry(self, seq, entry, res)
        elif self.log_format >= LEASE_FORMAT:
            res.fenced = Fencing(
                FENCE_NO_HEADER, f"an entry without a lease header after fmt({LEASE_FORMAT})"
            )
        else:
            for op in entry.ops:
                self.apply_op(op, res)
        self.set_meta("applied_seq", seq)

    # ----------------------------------------------------------------- lease queries

    @property
    def log_format(self) -> int:
        return int(self.get_meta("log_format", PRE_LEASE_FORMAT))

    def lease(self, d: int) -> tuple[Holder | None, int]:
        """(holder or None for FREE, epoch) of domain `d` (FREE at 0 without a row)."""
        kept = self._leases
        if kept is not None and d in kept:
            return kept[d]
        row = self.db.execute(
            "SELECT holder_client, holder_inc, epoch FROM leases WHERE domain = ?", (d,)
        ).fetchone()
        if row is None:
            out: tuple[Holder | None, int] = (None, 0)
        else:
            out = ((str(row[0]), int(row[1])) if row[0] is not None else None, int(row[2]))
        if kept is not None:
            kept[d] = out
        return out

    def set_lease(self, d: int, holder: Holder | None, epoch: int) -> None:
        """Domain `d` is held by `holder` (None: FREE) from `epoch` on."""
        c, i = holder if holder is not None else (None, None)
        self.db.execute(
            "INSERT OR REPLACE INTO leases (domain, holder_client, holder_inc, epoch) "
            "VALUES (?, ?, ?, ?)",
            (d, c, i, epoch),
        )
        if self._leases is not None:
            self._leases[d] = (holder, epoch)

    def session(self, client: str) -> tuple[int, int, int | None] | None:
        """(newest incarnation, its sess position, dirty position) of `client`."""
        row = self.db.execute(
            "SELECT inc, started_seq, dirty_seq FROM sessions WHERE client = ?", (client,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), row[2])

    def shares(self) -> set[Holder]:
        """The incarnations that share the top for reading (LEASES.md §17)."""
        return {(str(c), int(i)) for c, i in self.db.execute("SELECT client, inc FROM shares")}

    def recall(self, d: int, rid: str) -> tuple[str, int, str, int] | None:
        """(by_client, by_inc, want, position) of open recall `rid` of domain `d`."""
        row = self.db.execute(
            "SELECT by_client, by_inc, want, seq FROM recalls WHERE domain = ? AND rid = ?",
            (d, rid),
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), str(row[2]), int(row[3]))

    def open_fencing(self, client: str, inc: int) -> int | None:
        """The first fenced position of incarnation `inc` of `client` if its journaled
        entries are refused now (fenced, no lrcv since), else None."""
        row = self.db.execute(
            "SELECT first_seq FROM fenced WHERE client = ? AND inc = ? AND rcv_seq IS NULL",
            (client, inc),
        ).fetchone()
        return None if row is None else int(row[0])

    def apply_op(self, op: Op, res: ApplyResult) -> None:
        """Apply one op. An op that does not fit the tables (a missing entry, a name
        that exists) means the log and this view disagree: CorruptObject."""
        try:
            match op:
                case Mk():
                    self._op_mk(op, res)
                case Ln():
                    self._op_ln(op, res)
                case Rm():
                    self._remove_entry(op.parent, op.name, op.t, res)
                case Mv():
                    self._op_mv(op, res)
                case SetAttr():
                    self._op_attr(op, res)
                case Write():
                    self._op_w(op, res)
                case SetXattr():
                    self._op_xs(op, res)
                case RemoveXattr():
                    self._op_xr(op, res)
                case ClaimInodes():
                    self.set_meta("next_ino", op.start + op.n)
                case BlocksDeleted():
                    for key in op.keys:  # gc deleted them from the store: forget them
                        self.db.execute("DELETE FROM garbage WHERE key = ?", (key,))
                case (
                    Sess()
                    | LAcq()
                    | LRec()
                    | LFlush()
                    | LRel()
                    | LTko()
                    | LAdopt()
                    | LRcv()
                    | LDirty()
                    | Fmt()
                ):
                    raise CorruptObject(
                        f"lease operation {op.wire()['o']!r} in an entry without a lease header"
                    )
                case _:
                    raise CorruptObject(f"not a metadata log op: {op!r}")
        except (KeyError, TypeError, ValueError) as e:
            kind = op.wire()["o"] if hasattr(op, "wire") else type(op).__name__
            raise CorruptObject(f"{kind!r} operation does not apply to the view: {e}") from None

    def _touch(self, ino: int, t: int, mtime: bool = True) -> None:
        if mtime:
            self.db.execute("UPDATE inodes SET mtime = ?, ctime = ? WHERE ino = ?", (t, t, ino))
        else:
            self.db.execute("UPDATE inodes SET ctime = ? WHERE ino = ?", (t, ino))

    def _add_nlink(self, ino: int, delta: int) -> None:
        self.db.execute("UPDATE inodes SET nlink = nlink + ? WHERE ino = ?", (delta, ino))

    def _maybe_free(self, ino: int, res: ApplyResult) -> None:
        attr = self.getattr(ino)
        if attr is None:
            return
        if attr.nlink > 0 and not (attr.is_dir and attr.nlink <= 1):
            return
        extents = self.extents(ino)
        res.freed[ino] = (attr, extents)
        for table in ("inodes", "extents", "xattrs"):
            self.db.execute(f"DELETE FROM {table} WHERE ino = ?", (ino,))
        self._collect_garbage({e.key for e in extents if e.key is not None})
        res.inodes.add(ino)

    def _collect_garbage(self, keys: set[str]) -> None:
        """Record blocks that no extent references any more (deleted later by gc)."""
        for key in keys:
            if self.db.execute("SELECT 1 FROM extents WHERE key = ? LIMIT 1", (key,)).fetchone():
                continue
            self.db.execute(
                "INSERT OR IGNORE INTO garbage (key, seq, t) VALUES (?, ?, ?)",
                (key, self.cur_seq, self.cur_t),
            )

    def garbage(self) -> list[tuple[str, int, int]]:
        return [(r[0], r[1], r[2]) for r in self.db.execute("SELECT key, seq, t FROM garbage")]

    def referenced_keys(self) -> set[str]:
        return {
            r[0] for r in self.db.execute("SELECT DISTINCT key FROM extents WHERE key IS NOT NULL")
        }

    def _remove_entry(self, parent: int, name: bytes, t: int, res: ApplyResult) -> None:
        ino = self.lookup(parent, name)
        if ino is None:
            raise ValueError(f"no entry {name!r} in {parent}")
        attr = self.getattr(ino)
        self._dentries_change(ino)
        self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        if attr is not None and attr.is_dir:
            self._add_nlink(parent, -1)
            self.db.execute("UPDATE inodes SET nlink = 0, ctime = ? WHERE ino = ?", (t, ino))
        else:
            self.db.execute(
                "UPDATE inodes SET nlink = nlink - 1, ctime = ? WHERE ino = ?", (t, ino)
            )
        self._touch(parent, t)
        res.entries.add((parent, name))
        res.inodes.update((parent, ino))
        self._maybe_free(ino, res)

    def _op_mk(self, op: Mk, res: ApplyResult) -> None:
        ino, parent, name, t, mode, target = op.ino, op.parent, op.name, op.t, op.mode, op.target
        nlink = 2 if stat.S_ISDIR(mode) else 1
        self.db.execute(
            f"INSERT INTO inodes ({_ATTR_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                ino,
                mode,
                op.uid,
                op.gid,
                nlink,
                len(target) if target is not None else 0,
                op.rdev,
                t,
                t,
                t,
                0,
                target,
            ),
        )
        self.db.execute(
            "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino)
        )
        if stat.S_ISDIR(mode):
            self._add_nlink(parent, 1)
            res.created_dirs.add(ino)
        elif self._born is not None:
            if len(self._born) >= KEPT_BORN:
                self._born.clear()
            self._born[ino] = (parent, True)
        self._touch(parent, t)
        res.entries.add((parent, name))
        res.inodes.update((parent, ino))
        res.created.add(ino)

    def _op_ln(self, op: Ln, res: ApplyResult) -> None:
        ino, parent, name, t = op.ino, op.parent, op.name, op.t
        self._dentries_change(ino)
        self.db.execute(
            "INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino)
        )
        self._add_nlink(ino, 1)
        self._touch(ino, t, mtime=False)
        self._touch(parent, t)
        res.entries.add((parent, name))
        res.inodes.update((parent, ino))

    def _op_mv(self, op: Mv, res: ApplyResult) -> None:
        sp, dp, t = op.src_parent, op.dst_parent, op.t
        sn, dn = op.src_name, op.dst_name
        src = self.lookup(sp, sn)
        if src is None:
            raise ValueError("rename source missing")
        src_attr = self.getattr(src)
        dst = self.lookup(dp, dn)
        self._dentries_change(src, dst)
        if op.exchange:  # RENAME_EXCHANGE
            if dst is None:
                raise ValueError("exchange target missing")
            dst_attr = self.getattr(dst)
            self.db.execute(
                "UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", (dst, sp, sn)
            )
            self.db.execute(
                "UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", (src, dp, dn)
            )
            if sp != dp and src_attr and dst_attr and src_attr.is_dir != dst_attr.is_dir:
                delta = 1 if src_attr.is_dir else -1
                self._add_nlink(dp, delta)
                self._add_nlink(sp, -delta)
            self._touch(src, t, mtime=False)
            self._touch(dst, t, mtime=False)
            res.inodes.update((src, dst))
        else:
            if dst is not None:
                self._remove_entry(dp, dn, t, res)
            self.db.execute(
                "UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
                (dp, dn, sp, sn),
            )
            if src_attr is not None and src_attr.is_dir and sp != dp:
                self._add_nlink(sp, -1)
                self._add_nlink(dp, 1)
            self._touch(src, t, mtime=False)
            res.inodes.add(src)
        self._touch(sp, t)
        self._touch(dp, t)
        res.entries.update(((sp, sn), (dp, dn)))
        res.inodes.update((sp, dp))

    def _op_attr(self, op: SetAttr, res: ApplyResult) -> None:
        ino = op.ino
        sets: list[str] = []
        args: list[Any] = []
        for col in ("mode", "uid", "gid", "atime", "mtime", "ctime"):
            v = getattr(op, col)
            if v is not None:
                sets.append(f"{col} = ?")
                args.append(v)
        if op.size is not None:
            size = op.size
            self._laid_out(ino)
            self._collect_garbage(self._punch(ino, size, None))  # holes read as zeros
            sets.append("size = ?")
            args.append(size)
            sets.append("version = version + 1")
            res.data.add(ino)
        if sets:
            self.db.execute(f"UPDATE inodes SET {', '.join(sets)} WHERE ino = ?", (*args, ino))
        res.inodes.add(ino)

    def _punch(self, ino: int, start: int, end: int | None) -> set[str]:
        """Remove the file range [start, end) from the layout (end None = to infinity)."""
        removed: set[str] = set()
        for e in self.extents(ino, start, end):
            self.db.execute("DELETE FROM extents WHERE ino = ? AND off = ?", (ino, e.off))
            if e.key is not None:
                removed.add(e.key)
            if e.off < start:
                self._insert_extent(ino, e.slice(e.off, start))
            if end is not None and e.end > end:
                self._insert_extent(ino, e.slice(end, e.end))
        return removed

    def _insert_extent(self, ino: int, e: Extent) -> None:
        if e.len <= 0:
            return
        self.db.execute(
            "INSERT INTO extents (ino, off, len, key, koff, bsize, hash, data, crcs) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (ino, e.off, e.len, e.key, e.koff, e.bsize, e.hash, e.data, e.crcs),
        )

    def _laid_out(self, ino: int) -> None:
        """File `ino`'s layout changes: a kept file no longer has none."""
        born = None if self._born is None else self._born.get(ino)
        if born is not None and born[1]:
            assert self._born is not None
            self._born[ino] = (born[0], False)

    def _op_w(self, op: Write, res: ApplyResult) -> None:
        ino, t = op.ino, op.t
        born = None if self._born is None else self._born.get(ino)
        if born is None and self.getattr(ino) is None:
            return  # the file was removed before this write was committed
        # A kept file without extents: only this op's earlier extents can overlap one.
        empty = born is not None and born[1]
        self._laid_out(ino)
        removed: set[str] = set()
        laid = 0  # the end of this op's extents so far
        for e in op.extents:
            if not empty or e.off < laid:
                removed |= self._punch(ino, e.off, e.end)
            laid = max(laid, e.end)
            self._insert_extent(ino, e)
            if e.key is not None:
                self.db.execute("DELETE FROM garbage WHERE key = ?", (e.key,))
        self._collect_garbage(removed)
        self.db.execute(
            "UPDATE inodes SET size = ?, mtime = ?, ctime = ?, version = version + 1 WHERE ino = ?",
            (op.size, t, t, ino),
        )
        res.inodes.add(ino)
        res.data.add(ino)

    def _op_xs(self, op: SetXattr, res: ApplyResult) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?, ?, ?)",
            (op.ino, op.name, op.value),
        )
        self._touch(op.ino, op.t, mtime=False)
        res.inodes.add(op.ino)
        res.xattrs.add(op.ino)

    def _op_xr(self, op: RemoveXattr, res: ApplyResult) -> None:
        self.db.execute("DELETE FROM xattrs WHERE ino = ? AND name = ?", (op.ino, op.name))
        self._touch(op.ino, op.t, mtime=False)
        res.inodes.add(op.ino)
        res.xattrs.add(op.ino)


def checkpoint_wal(path: str | Path) -> tuple[int, int]:
    """Copy what the WAL of the view at `path` holds into the database file, without
    waiting for its readers or its writer (a PASSIVE checkpoint, on a connection of its
    own, in a worker thread): (frames in the WAL, frames checkpointed)."""
    if os.path.islink(str(path)):
        raise EfsishError(f"metadata view file {path} is a symlink; remove it")
    if not os.path.exists(path):
        return 0, 0  # (connecting would create an empty database)
    db = sqlite3.connect(f"file:{path}", uri=True, isolation_level=None)
    try:
        _busy, frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(frames), int(done)
    finally:
        db.close()
