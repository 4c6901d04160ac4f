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
the async layer (efsish.meta.log) serialises. It must not import trio or pyfuse3.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efsish.errors import CorruptObject, EfsishError
from efsish.meta import domains
from efsish.meta.domains import DEFAULT_LEASE_DEPTH, TOP, Domain
from efsish.meta.ops import (
    LEASE_OPS,
    BlocksDeleted,
    ClaimInodes,
    Extent,
    Fmt,
    LAcq,
    LAdopt,
    LDirty,
    LeaseOp,
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
    "NewerFormat",
    "Op",
    "View",
]

ROOT_INO = 1
FIRST_FREE_INO = 2

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
"""

# The log format from which entries carry a lease header (set by a fmt op).
LEASE_FORMAT = 3
PRE_LEASE_FORMAT = 2

Holder = tuple[str, int]  # (client, incarnation)


class NewerFormat(CorruptObject):
    """The log says the filesystem uses a format this efsish does not know: stop."""


@dataclass(frozen=True)
class Fencing:
    """Why apply refused a lease-era entry (it changed nothing but the fencing record).

    `rule` is one of the FENCE_* names (LEASES.md §4's conditions)."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


# Condition 1: the writer's incarnation is older than its client's newest `sess`.
FENCE_SUPERSEDED = "superseded"
# Condition 1 / per-incarnation fencing: a journaled entry of an incarnation that has a
# fenced journaled entry and no `lrcv` since.
FENCE_INCARNATION = "incarnation-fenced"
# Condition 2: journaled, and a domain an op touches is not held by the writer.
FENCE_NOT_HELD = "not-held"
# Condition 3: sync, and a domain an op touches is held by someone else.
FENCE_HELD_ELSEWHERE = "held-elsewhere"
# Conditions 2 and 3: a held domain the writer holds, claimed at another epoch (or not).
FENCE_EPOCH = "epoch"
# Condition 4: an op failed to apply (or broke the protocol: a lease op that is not
# valid where it stands).
FENCE_OP_FAILED = "op-failed"
# §14: an entry without a lease header after fmt(3).
FENCE_NO_HEADER = "no-header"


class _Fence(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.fencing = Fencing(rule, reason)


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


_ATTR_COLS = "ino, mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, version, target"


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
        self.db.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(extents)")}
            if "crcs" not in cols:  # a view or checkpoint from before ranged reads
                self.db.execute("ALTER TABLE extents ADD COLUMN crcs TEXT")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ transactions

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def savepoint(self, name: str) -> None:
        self.db.execute(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        self.db.execute(f"RELEASE {name}")

    def rollback_to(self, name: str) -> None:
        self.db.execute(f"ROLLBACK TO {name}")
        self.db.execute(f"RELEASE {name}")

    # --------------------------------------------------------------------- meta keys

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

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
        row = self.db.execute(
            "SELECT parent FROM dentries WHERE ino = ? LIMIT 1", (ino,)
        ).fetchone()
        return int(row[0]) if row else None

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

    def extents(self, ino: int, start: int = 0, end: int | None = None) -> list[Extent]:
        q = "SELECT off, len, key, koff, bsize, hash, data, crcs FROM extents WHERE ino = ?"
        args: list[Any] = [ino]
        if end is not None:
            q += " AND off < ?"
            args.append(end)
        q += " AND off + len > ? ORDER BY off"
        args.append(start)
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
            self._apply_leased_entry(seq, entry, res)
        elif self.log_format >= LEASE_FORMAT:
            res.fenced = Fencing(
                FENCE_NO_HEADER, f"an entry without a lease header after fmt({LEASE_FORMAT})"
            )
        else:
            for op in entry.ops:
                self.apply_op(op, res)
        self.set_meta("applied_seq", seq)

    def _apply_leased_entry(self, seq: int, entry: LogEntry, res: ApplyResult) -> None:
        """Apply a lease-era entry, in a savepoint: all of it, or (fenced) none of it."""
        r = ApplyResult()
        self.savepoint("lease_entry")
        try:
            self._check_incarnation(entry)
            for op in entry.ops:
                self.apply_leased_op(op, entry, r)
        except NewerFormat:
            self.rollback_to("lease_entry")
            raise
        except _Fence as f:
            fencing = f.fencing
        except (CorruptObject, sqlite3.IntegrityError) as e:
            fencing = Fencing(FENCE_OP_FAILED, str(e))
        else:
            self.release("lease_entry")
            res.merge(r)
            return
        self.rollback_to("lease_entry")
        res.fenced = fencing
        # What survives of an incarnation is a prefix of what it answered: every later
        # journaled entry of it is fenced too, until its lrcv.
        if (
            entry.journaled
            and entry.inc is not None
            and self.open_fencing(entry.client, entry.inc) is None
        ):
            self.db.execute(
                "INSERT INTO fenced (client, inc, first_seq, reason) VALUES (?, ?, ?, ?)",
                (entry.client, entry.inc, seq, str(fencing)),
            )

    def _check_incarnation(self, entry: LogEntry) -> None:
        """Fencing condition 1 (and per-incarnation fencing of journaled entries)."""
        if entry.inc is None:
            raise _Fence(FENCE_OP_FAILED, "a lease header without an incarnation")
        newest = self.session(entry.client)
        if newest is not None and entry.inc < newest[0]:
            raise _Fence(
                FENCE_SUPERSEDED,
                f"incarnation {entry.inc} of {entry.client} is older than its newest, {newest[0]}",
            )
        if entry.journaled:
            first = self.open_fencing(entry.client, entry.inc)
            if first is not None:
                raise _Fence(
                    FENCE_INCARNATION,
                    f"incarnation {entry.inc} of {entry.client} is fenced since entry {first}",
                )

    def apply_leased_op(self, op: Op, entry: LogEntry, res: ApplyResult) -> None:
        """Apply one op of lease-era `entry`, first checking every domain it touches
        against the state just before it (LEASES.md §4). Raises _Fence or
        CorruptObject when the entry must be fenced."""
        try:
            if isinstance(op, LEASE_OPS):
                self._apply_lease_op(op, entry, res)
                return
            if isinstance(op, ClaimInodes) and entry.journaled:
                raise CorruptObject("an inode claim in a journaled entry")
            touched, movers = self._touches(op)
            for d in sorted(x for x in touched if x is not TOP):
                self._check_domain(d, entry)
            roots_before = self._roots_in(movers)
            self.apply_op(op, res)
            roots_after = self._roots_in(movers)
            # Domain roots that appear or go (mkdir, rmdir, a directory moved to another
            # depth): their rows become FREE at this position, so epochs only grow.
            for d in sorted(roots_before ^ roots_after):
                self._set_holder(d, None, res)
        except (KeyError, TypeError, ValueError) as e:
            kind = op.wire()["o"]
            raise CorruptObject(f"{kind!r} operation does not apply to the view: {e}") from None

    def _roots_in(self, dirs: list[int]) -> set[int]:
        """The domain roots in the subtrees of those of `dirs` that are directories."""
        roots: set[int] = set()
        for d in dirs:
            attr = self.getattr(d)
            if attr is not None and attr.is_dir:
                roots |= domains.roots_in(self, d)
        return roots

    def _touches(self, op: Op) -> tuple[set[Domain], list[int]]:
        """The domains `op` changes rows of (computed before it applies), and the
        directories whose subtrees may gain or lose domain roots by it."""
        dom = domains.domain_of_dir
        of = domains.domains_of_inode
        movers: list[int] = []
        match op:
            case Mk():
                return {dom(self, op.parent)}, [op.ino] if stat.S_ISDIR(op.mode) else []
            case Ln():
                return {dom(self, op.parent)} | of(self, op.ino), []
            case Rm():
                touched = {dom(self, op.parent)}
                target = self.lookup(op.parent, op.name)
                if target is None:
                    return touched, []
                return touched | of(self, target), [target]
            case Mv():
                touched = {dom(self, op.src_parent), dom(self, op.dst_parent)}
                src = self.lookup(op.src_parent, op.src_name)
                dst = self.lookup(op.dst_parent, op.dst_name)
                moves = [(src, op.dst_parent)]
                if op.exchange:
                    moves.append((dst, op.src_parent))
                elif dst is not None:
                    touched |= of(self, dst)  # a replaced target
                    movers.append(dst)
                for ino, to_parent in moves:
                    if ino is None:
                        continue
                    touched |= of(self, ino)
                    attr = self.getattr(ino)
                    if attr is not None and attr.is_dir:
                        movers.append(ino)
                        old = domains.depth(self, ino)
                        if domains.depth(self, to_parent) + 1 != old:
                            # A directory moved to another depth: every domain root in
                            # its subtree stops being one (and others may start).
                            touched |= set(domains.roots_in(self, ino))
                return touched, movers
            case SetAttr() | Write() | SetXattr() | RemoveXattr():
                return of(self, op.ino), []
            case _:
                return set(), []

    def _check_domain(self, d: int, entry: LogEntry) -> None:
        """Fencing conditions 2 and 3 for one domain an op of `entry` touches."""
        holder, epoch = self.lease(d)
        me = (entry.client, entry.inc)
        if holder is None:
            if entry.journaled:
                raise _Fence(
                    FENCE_NOT_HELD, f"domain {d} is FREE: a journaled entry needs its lease"
                )
            return
        if holder != me:
            rule = FENCE_NOT_HELD if entry.journaled else FENCE_HELD_ELSEWHERE
            raise _Fence(rule, f"domain {d} is held by {holder[0]}/{holder[1]}")
        claimed = (entry.claims or {}).get(d)
        if claimed != epoch:
            raise _Fence(FENCE_EPOCH, f"domain {d} is at epoch {epoch}; the entry claims {claimed}")

    def _apply_lease_op(self, op: LeaseOp, entry: LogEntry, res: ApplyResult) -> None:
        assert entry.inc is not None
        me: Holder = (entry.client, entry.inc)
        kind = op.wire()["o"]

        def invalid(why: str) -> CorruptObject:
            return CorruptObject(f"{kind!r} is not valid here: {why}")

        def need_lease_format() -> None:
            if self.log_format < LEASE_FORMAT:
                raise invalid(f"the log is not at format {LEASE_FORMAT} yet (no fmt op)")

        match op:
            case Sess():
                if (op.client, op.inc) != me:
                    raise invalid("an incarnation starts in an entry of its own")
                newest = self.session(op.client)
                if newest is not None and op.inc <= newest[0]:
                    raise invalid(f"{op.client} is already at incarnation {newest[0]}")
                self.db.execute(
                    "INSERT INTO sessions (client, inc, started_seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (client) DO UPDATE SET inc = excluded.inc, "
                    "started_seq = excluded.started_seq",
                    (op.client, op.inc, self.cur_seq),
                )
            case LAcq():
                need_lease_format()
                if not domains.is_domain_root(self, op.domain):
                    raise invalid(f"{op.domain} is not a domain root")
                holder, _ = self.lease(op.domain)
                if holder is not None:
                    raise invalid(f"domain {op.domain} is held by {holder[0]}/{holder[1]}")
                self._set_holder(op.domain, me, res)
            case LRec():
                holder, _ = self.lease(op.domain)
                if holder is None or holder == me:
                    raise invalid(f"domain {op.domain} is not held by another mount")
                if self.recall(op.domain, op.rid) is not None:
                    raise invalid(f"recall {op.rid} of {op.domain} exists")
                self.db.execute(
                    "INSERT INTO recalls (domain, rid, by_client, by_inc, want, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (op.domain, op.rid, me[0], me[1], op.want, self.cur_seq),
                )
                res.leases.add(op.domain)
            case LFlush():
                self._check_domain(op.domain, entry)
                rec = self.recall(op.domain, op.rid)
                if rec is None or rec[2] != "r":
                    raise invalid(f"no open read recall {op.rid} of {op.domain}")
                self.db.execute(
                    "DELETE FROM recalls WHERE domain = ? AND rid = ?", (op.domain, op.rid)
                )
                res.leases.add(op.domain)
            case LRel():
                self._check_domain(op.domain, entry)
                new: Holder | None = None
                if op.rid is not None:
                    rec = self.recall(op.domain, op.rid)
                    if rec is None:
                        raise invalid(f"no open recall {op.rid} of {op.domain}")
                    if op.to is not None:
                        if rec[2] != "w" or rec[0] != op.to:
                            raise invalid(f"recall {op.rid} is not a write recall by {op.to}")
                        need_lease_format()
                        new = (rec[0], rec[1])
                elif op.to is not None:
                    raise invalid("a handover names the write recall it answers")
                self._set_holder(op.domain, new, res)
            case LTko():
                need_lease_format()
                holder, _ = self.lease(op.domain)
                if holder is None or holder == me:
                    raise invalid(f"domain {op.domain} is not held by another mount")
                rec = self.recall(op.domain, op.rid)
                if rec is None or (rec[0], rec[1]) != me:
                    raise invalid(f"no open recall {op.rid} of {op.domain} by the writer")
                self._set_holder(op.domain, me, res)
            case LAdopt():
                need_lease_format()
                holder, epoch = self.lease(op.domain)
                if holder is None or holder[0] != me[0] or holder[1] >= me[1]:
                    raise invalid(f"domain {op.domain} is not held by an older incarnation")
                claimed = (entry.claims or {}).get(op.domain)
                if claimed != epoch:
                    raise _Fence(
                        FENCE_EPOCH,
                        f"domain {op.domain} is at epoch {epoch}; the entry claims {claimed}",
                    )
                self._set_holder(op.domain, me, res)
            case LRcv():
                first = self.open_fencing(op.client, op.inc)
                if first is None:  # recovered from a takeover it met in its catch-up
                    self.db.execute(
                        "INSERT INTO fenced (client, inc, first_seq, reason) VALUES (?,?,?,?)",
                        (op.client, op.inc, self.cur_seq, "recovered (no entry was fenced)"),
                    )
                    first = self.cur_seq
                self.db.execute(
                    "UPDATE fenced SET rcv_seq = ?, path = ? "
                    "WHERE client = ? AND inc = ? AND first_seq = ?",
                    (self.cur_seq, op.path, op.client, op.inc, first),
                )
            case LDirty():
                newest = self.session(op.client)
                if newest is None or op.inc > newest[0]:
                    raise invalid(f"{op.client} has no incarnation {op.inc}")
                self.db.execute(
                    "UPDATE sessions SET dirty_seq = ? WHERE client = ?",
                    (self.cur_seq if op.dirty else None, op.client),
                )
            case Fmt():
                if op.version > LEASE_FORMAT:
                    raise NewerFormat(
                        f"the metadata log is at format {op.version}, newer than this "
                        "efsish knows; upgrade efsish"
                    )
                if op.version != LEASE_FORMAT or self.log_format >= op.version:
                    raise invalid(f"the log is at format {self.log_format}")
                self.set_meta("log_format", op.version)

    def _set_holder(self, d: int, holder: Holder | None, res: ApplyResult) -> None:
        """Domain `d` changes hands (None: FREE) at this position: a new epoch, and its
        open recalls, made against the old holder, are closed."""
        c, i = holder if holder is not None else (None, None)
        self.db.execute(
            "INSERT OR REPLACE INTO leases (domain, holder_client, holder_inc, epoch) "
            "VALUES (?, ?, ?, ?)",
            (d, c, i, self.cur_seq),
        )
        self.db.execute("DELETE FROM recalls WHERE domain = ?", (d,))
        res.leases.add(d)

    # ----------------------------------------------------------------- lease queries

    @property
    def log_format(self) -> int:
        return int(self.get_meta("log_format", PRE_LEASE_FORMAT))

    def lease(self, d: int) -> tuple[Holder | None, int]:
        """(holder or None for FREE, epoch) of domain `d` (FREE at 0 without a row)."""
        row = self.db.execute(
            "SELECT holder_client, holder_inc, epoch FROM leases WHERE domain = ?", (d,)
        ).fetchone()
        if row is None:
            return None, 0
        holder = (str(row[0]), int(row[1])) if row[0] is not None else None
        return holder, int(row[2])

    def session(self, client: str) -> tuple[int, int, int | None] | None:
        """(newest incarnation, its sess position, dirty position) of `client`."""
        row = self.db.execute(
            "SELECT inc, started_seq, dirty_seq FROM sessions WHERE client = ?", (client,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), row[2])

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
        self._touch(parent, t)
        res.entries.add((parent, name))
        res.inodes.update((parent, ino))
        res.created.add(ino)

    def _op_ln(self, op: Ln, res: ApplyResult) -> None:
        ino, parent, name, t = op.ino, op.parent, op.name, op.t
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

    def _op_w(self, op: Write, res: ApplyResult) -> None:
        ino, t = op.ino, op.t
        if self.getattr(ino) is None:
            return  # the file was removed before this write was committed
        removed: set[str] = set()
        for e in op.extents:
            removed |= self._punch(ino, e.off, e.end)
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
