"""The metadata log's format: one typed definition of every op and of a log entry, and
their encoding in the bucket.

An *op* is one small, deterministic change of the replicated metadata; a *log entry*
(`log/<seq>`) is a batch of ops with the writer's transaction id, client id and time.
Planners (efsish.filesystem, efsish.gc, efsish.meta.log) build ops with the classes
here; `View.apply_op` gives them their meaning. The lease ops (sess, lacq, lrec, ...)
and an entry's lease header are the lease protocol's (docs/design/LEASES.md §4); only
`View.apply_entry` applies them.

The encoding (a JSON object per op, its kind under "o", short keys) is permanent: every
entry that any efsish ever wrote must still decode, and an efsish that predates a field
must still read entries that carry it (optional fields are appended, never renamed).
`tests/meta/test_ops.py` keeps samples of every op as written by earlier versions.
`decode_op` turns anything malformed into CorruptObject with a readable reason, so a
damaged or foreign entry stops the mount cleanly, never half-applied.

This module must not touch SQLite, the store or the clock. It is long (~680 lines)
because it is the whole permanent format in one place: every op, lease op and the
entry header, each next to its encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pybase64

from efsish.errors import CorruptObject

Wire = dict[str, Any]


# Inline file data rides in ops as base64 (a 4 KiB file: 5.5 KB of it). pybase64 gives
# the standard library's results, errors included, with SIMD: 0.3 us to encode and
# 1.5 us to decode 4 KiB here, against 6.5 and 16 us; a journaled file's data is
# encoded when it is answered and again when its batch is flushed, and decoded by the
# flush and by every mount that applies the batch.
def b64(data: bytes) -> str:
    return pybase64.b64encode_as_string(data)


def unb64(s: str) -> bytes:
    return pybase64.b64decode(s)


def name_to_json(name: bytes) -> str:
    """File names are bytes; the log keeps them as str (undecodable bytes escaped)."""
    return name.decode("utf-8", "surrogateescape")


def name_from_json(s: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"a name must be a string, not {type(s).__name__}")
    return s.encode("utf-8", "surrogateescape")


@dataclass
class Extent:
    """A piece of a file: [off, off+len) maps to block `key` at `koff`, or inline data.

    Encoded as a list: [off, len, None, base64 data] for inline bytes, or
    [off, len, key, koff, bsize, hash] plus, for blocks that have them, the chunk
    checksums as a seventh element (an efsish without ranged reads ignores it)."""

    off: int
    len: int
    key: str | None = None
    koff: int = 0
    bsize: int = 0
    hash: str | None = None
    data: bytes | None = None
    # The block's chunk checksums (codec.chunk_crcs), if it has them: for ranged reads.
    crcs: str | None = None

    @property
    def end(self) -> int:
        return self.off + self.len

    def to_json(self) -> list[Any]:
        if self.key is None:
            return [self.off, self.len, None, b64(self.data or b"")]
        j: list[Any] = [self.off, self.len, self.key, self.koff, self.bsize, self.hash]
        if self.crcs:
            j.append(self.crcs)
        return j

    @classmethod
    def from_json(cls, j: list[Any]) -> Extent:
        if j[2] is None:
            return cls(int(j[0]), int(j[1]), data=unb64(j[3]))
        crcs = str(j[6]) if len(j) > 6 and j[6] else None
        return cls(int(j[0]), int(j[1]), str(j[2]), int(j[3]), int(j[4]), j[5], crcs=crcs)

    def slice(self, start: int, end: int) -> Extent:
        """The part of this extent covering file range [start, end)."""
        s, e = max(start, self.off), min(end, self.end)
        d = s - self.off
        if self.key is None:
            return Extent(s, e - s, data=(self.data or b"")[d : d + (e - s)])
        return Extent(s, e - s, self.key, self.koff + d, self.bsize, self.hash, crcs=self.crcs)


# ----------------------------------------------------------------------------- the ops


@dataclass(frozen=True)
class Mk:
    """Create inode `ino` (file, directory, symlink, device, fifo) as `name` in `parent`."""

    ino: int
    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    t: int
    rdev: int = 0
    target: bytes | None = None  # a symlink's target

    def wire(self) -> Wire:
        return {
            "o": "mk",
            "ino": self.ino,
            "p": self.parent,
            "name": name_to_json(self.name),
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "rdev": self.rdev,
            "t": self.t,
            "tgt": b64(self.target) if self.target is not None else None,
        }

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Mk:
        tgt = d.get("tgt")
        return cls(
            ino=int(d["ino"]),
            parent=int(d["p"]),
            name=name_from_json(d["name"]),
            mode=int(d["mode"]),
            uid=int(d["uid"]),
            gid=int(d["gid"]),
            t=int(d["t"]),
            rdev=int(d.get("rdev", 0)),
            target=unb64(tgt) if tgt is not None else None,
        )


@dataclass(frozen=True)
class Ln:
    """A new hard link `name` in `parent` to the existing inode `ino`."""

    ino: int
    parent: int
    name: bytes
    t: int

    def wire(self) -> Wire:
        return {
            "o": "ln",
            "ino": self.ino,
            "p": self.parent,
            "name": name_to_json(self.name),
            "t": self.t,
        }

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Ln:
        return cls(int(d["ino"]), int(d["p"]), name_from_json(d["name"]), int(d["t"]))


@dataclass(frozen=True)
class Rm:
    """Remove the entry `name` from `parent` (unlink or rmdir); the inode is freed when
    its last link goes."""

    parent: int
    name: bytes
    t: int

    def wire(self) -> Wire:
        return {"o": "rm", "p": self.parent, "name": name_to_json(self.name), "t": self.t}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Rm:
        return cls(int(d["p"]), name_from_json(d["name"]), int(d["t"]))


@dataclass(frozen=True)
class Mv:
    """Rename `src_parent/src_name` to `dst_parent/dst_name`, replacing what is there, or
    swapping the two with `exchange` (RENAME_EXCHANGE)."""

    src_parent: int
    src_name: bytes
    dst_parent: int
    dst_name: bytes
    t: int
    exchange: bool = False

    def wire(self) -> Wire:
        d: Wire = {
            "o": "mv",
            "sp": self.src_parent,
            "sn": name_to_json(self.src_name),
            "dp": self.dst_parent,
            "dn": name_to_json(self.dst_name),
            "t": self.t,
        }
        if self.exchange:
            d["x"] = True
        return d

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Mv:
        return cls(
            int(d["sp"]),
            name_from_json(d["sn"]),
            int(d["dp"]),
            name_from_json(d["dn"]),
            int(d["t"]),
            exchange=bool(d.get("x", False)),
        )


ATTR_FIELDS = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")


@dataclass(frozen=True)
class SetAttr:
    """Change some attributes of `ino`; None leaves one as it is. A new `size` truncates
    or extends the layout (a hole reads as zeros)."""

    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: int | None = None
    mtime: int | None = None
    ctime: int | None = None

    def changes(self) -> dict[str, int]:
        return {k: v for k in ATTR_FIELDS if (v := getattr(self, k)) is not None}

    def wire(self) -> Wire:
        return {"o": "attr", "ino": self.ino, **self.changes()}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> SetAttr:
        return cls(int(d["ino"]), **{k: int(d[k]) for k in ATTR_FIELDS if k in d})


@dataclass(frozen=True)
class Write:
    """New layout pieces of file `ino` (each replaces the range it covers), its new size,
    and the time of the write (mtime and ctime)."""

    ino: int
    extents: tuple[Extent, ...]
    size: int
    t: int

    def wire(self) -> Wire:
        return {
            "o": "w",
            "ino": self.ino,
            "ext": [e.to_json() for e in self.extents],
            "size": self.size,
            "t": self.t,
        }

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Write:
        ext = tuple(Extent.from_json(j) for j in d["ext"])
        return cls(int(d["ino"]), ext, int(d["size"]), int(d["t"]))


@dataclass(frozen=True)
class SetXattr:
    """Set extended attribute `name` of `ino` to `value`."""

    ino: int
    name: bytes
    value: bytes
    t: int

    def wire(self) -> Wire:
        return {
            "o": "xs",
            "ino": self.ino,
            "name": name_to_json(self.name),
            "v": b64(self.value),
            "t": self.t,
        }

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> SetXattr:
        return cls(int(d["ino"]), name_from_json(d["name"]), unb64(d["v"]), int(d["t"]))


@dataclass(frozen=True)
class RemoveXattr:
    """Remove extended attribute `name` of `ino`."""

    ino: int
    name: bytes
    t: int

    def wire(self) -> Wire:
        return {"o": "xr", "ino": self.ino, "name": name_to_json(self.name), "t": self.t}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> RemoveXattr:
        return cls(int(d["ino"]), name_from_json(d["name"]), int(d["t"]))


@dataclass(frozen=True)
class ClaimInodes:
    """The writer claims inode numbers [start, start+n) for its creates."""

    start: int
    n: int

    def wire(self) -> Wire:
        return {"o": "ino", "start": self.start, "n": self.n}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> ClaimInodes:
        return cls(int(d["start"]), int(d["n"]))


@dataclass(frozen=True)
class BlocksDeleted:
    """gc deleted these garbage blocks from the store: every view forgets them."""

    keys: tuple[str, ...]

    def wire(self) -> Wire:
        return {"o": "gc", "keys": list(self.keys)}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> BlocksDeleted:
        keys = d["keys"]
        if not isinstance(keys, list):
            raise TypeError("keys must be a list")
        return cls(tuple(str(k) for k in keys))


# ------------------------------------------------------------------------ lease ops
#
# Leases, recalls, incarnations and fencing (docs/design/LEASES.md §2–§4). They change
# only the lease tables of the view, and only inside an entry with a lease header
# (LogEntry.leased): apply needs the writer's client and incarnation to judge them.

WANTS = ("r", "w")


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError(f"{what} must be a non-empty string, not {v!r}")
    return v


@dataclass(frozen=True)
class Sess:
    """Incarnation `inc` of `client` starts; the client's older incarnations are fenced
    from here on. Written by the incarnation itself (the entry's client and inc)."""

    client: str
    inc: int

    def wire(self) -> Wire:
        return {"o": "sess", "c": self.client, "inc": self.inc}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Sess:
        return cls(_str(d["c"], "client"), int(d["inc"]))


@dataclass(frozen=True)
class LAcq:
    """Grant domain `domain` (its root's inode number) to the entry's writer; valid only
    if the domain is FREE."""

    domain: int

    def wire(self) -> Wire:
        return {"o": "lacq", "d": self.domain}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LAcq:
        return cls(int(d["d"]))


@dataclass(frozen=True)
class LRec:
    """The writer recalls `domain` from its holder: `want` is "r" (flush what you
    answered) or "w" (give it up); `rid` names the recall."""

    domain: int
    rid: str
    want: str

    def wire(self) -> Wire:
        return {"o": "lrec", "d": self.domain, "rid": self.rid, "want": self.want}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LRec:
        want = str(d["want"])
        if want not in WANTS:
            raise ValueError(f"want is {want!r}, not one of {WANTS}")
        return cls(int(d["d"]), _str(d["rid"], "rid"), want)


@dataclass(frozen=True)
class LFlush:
    """The holder answers read recall `rid` of `domain`: everything it answered before
    it saw the recall is in the log at or before this entry. It keeps the domain."""

    domain: int
    rid: str

    def wire(self) -> Wire:
        return {"o": "lflush", "d": self.domain, "rid": self.rid}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LFlush:
        return cls(int(d["d"]), _str(d["rid"], "rid"))


@dataclass(frozen=True)
class LRel:
    """The holder gives `domain` up, answering recall `rid` if given: to FREE, or, with
    `to`, to the writer of write recall `rid` (who must be client `to`) in one step."""

    domain: int
    rid: str | None = None
    to: str | None = None

    def wire(self) -> Wire:
        d: Wire = {"o": "lrel", "d": self.domain}
        if self.rid is not None:
            d["rid"] = self.rid
        if self.to is not None:
            d["to"] = self.to
        return d

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LRel:
        rid, to = d.get("rid"), d.get("to")
        return cls(
            int(d["d"]),
            _str(rid, "rid") if rid is not None else None,
            _str(to, "to") if to is not None else None,
        )


@dataclass(frozen=True)
class LTko:
    """Takeover: the writer takes `domain` after its recall `rid` went unanswered for
    the takeover wait (LEASES.md §7; the wait is the writer's to keep, apply checks that
    the recall is the writer's and still open)."""

    domain: int
    rid: str

    def wire(self) -> Wire:
        return {"o": "ltko", "d": self.domain, "rid": self.rid}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LTko:
        return cls(int(d["d"]), _str(d["rid"], "rid"))


@dataclass(frozen=True)
class LAdopt:
    """A new incarnation of the holder's client takes over its older incarnation's
    lease on `domain` (LEASES.md §9)."""

    domain: int

    def wire(self) -> Wire:
        return {"o": "ladopt", "d": self.domain}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LAdopt:
        return cls(int(d["d"]))


@dataclass(frozen=True)
class LRcv:
    """Fenced incarnation `inc` of `client` wrote what apply refused to the recovery
    directory `path`; its journaled entries apply again after this entry."""

    client: str
    inc: int
    path: str

    def wire(self) -> Wire:
        return {"o": "lrcv", "c": self.client, "inc": self.inc, "path": self.path}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LRcv:
        return cls(_str(d["c"], "client"), int(d["inc"]), str(d["path"]))


@dataclass(frozen=True)
class LDirty:
    """Incarnation `inc` of `client` has (`dirty`) or no longer has journal rows: gc
    spares the staged blocks of a dirty client (LEASES.md §9)."""

    client: str
    inc: int
    dirty: bool = True

    def wire(self) -> Wire:
        d: Wire = {"o": "ldirty", "c": self.client, "inc": self.inc}
        if not self.dirty:
            d["clean"] = True
        return d

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LDirty:
        return cls(_str(d["c"], "client"), int(d["inc"]), not bool(d.get("clean", False)))


@dataclass(frozen=True)
class LShr:
    """The entry's writer starts (`on`) or stops sharing the top for reading: while its
    row is in the view, any change of the top ends it (LEASES.md §17). `inc`, with
    `on=False`: end the share of that older incarnation of the writer's client instead
    (its daemon is proven dead)."""

    on: bool = True
    inc: int | None = None

    def wire(self) -> Wire:
        d: Wire = {"o": "lshr"}
        if not self.on:
            d["off"] = True
        if self.inc is not None:
            d["inc"] = self.inc
        return d

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> LShr:
        inc = d.get("inc")
        return cls(not bool(d.get("off", False)), int(inc) if inc is not None else None)


@dataclass(frozen=True)
class Fmt:
    """The filesystem's log format becomes `version` (3: leases); from this entry on,
    entries without a lease header are fenced (LEASES.md §14)."""

    version: int

    def wire(self) -> Wire:
        return {"o": "fmt", "v": self.version}

    @classmethod
    def unwire(cls, d: Mapping[str, Any]) -> Fmt:
        return cls(int(d["v"]))


NamespaceOp = (
    Mk | Ln | Rm | Mv | SetAttr | Write | SetXattr | RemoveXattr | ClaimInodes | BlocksDeleted
)
LeaseOp = Sess | LAcq | LRec | LFlush | LRel | LTko | LAdopt | LRcv | LDirty | LShr | Fmt
LEASE_OPS = (Sess, LAcq, LRec, LFlush, LRel, LTko, LAdopt, LRcv, LDirty, LShr, Fmt)
Op = NamespaceOp | LeaseOp

_DECODERS: dict[str, Callable[[Mapping[str, Any]], Op]] = {
    "mk": Mk.unwire,
    "ln": Ln.unwire,
    "rm": Rm.unwire,
    "mv": Mv.unwire,
    "attr": SetAttr.unwire,
    "w": Write.unwire,
    "xs": SetXattr.unwire,
    "xr": RemoveXattr.unwire,
    "ino": ClaimInodes.unwire,
    "gc": BlocksDeleted.unwire,
    "sess": Sess.unwire,
    "lacq": LAcq.unwire,
    "lrec": LRec.unwire,
    "lflush": LFlush.unwire,
    "lrel": LRel.unwire,
    "ltko": LTko.unwire,
    "ladopt": LAdopt.unwire,
    "lrcv": LRcv.unwire,
    "ldirty": LDirty.unwire,
    "lshr": LShr.unwire,
    "fmt": Fmt.unwire,
}


def encode_op(op: Op) -> Wire:
    return op.wire()


def decode_op(d: Any) -> Op:
    """The op a log entry holds; CorruptObject if it is not one this efsish knows."""
    if not isinstance(d, Mapping):
        raise CorruptObject(f"a metadata log op must be an object, not {type(d).__name__}")
    kind = d.get("o")
    fn = _DECODERS.get(str(kind))
    if fn is None:
        raise CorruptObject(
            f"unknown operation {kind!r} in the metadata log (written by a newer efsish? "
            "upgrade this one)"
        )
    try:
        return fn(d)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CorruptObject(f"malformed {kind!r} operation in the metadata log: {e!r}") from None


# ------------------------------------------------------------------------- log entries

SYNC = "sync"
JOURNALED = "journaled"
KINDS = (SYNC, JOURNALED)


@dataclass
class LogEntry:
    """One object `log/<seq>`: a batch of ops committed together by one mount.

    An entry written under the lease protocol (LEASES.md §4) also carries a *lease
    header*: the writer's incarnation `inc`, its `kind` (sync: planned against the log
    head; journaled: answered locally under a lease and flushed later), the journal
    range `batch` it holds, and `claims`, the epoch of each domain it changes. Apply
    fences (applies nothing of) a lease-era entry that breaks the protocol. An entry
    without the header encodes exactly as before leases existed."""

    tx: str  # unique per entry: a retried PUT that landed is recognised as ours
    client: str  # the writer's client id (its heartbeat is clients/<client>)
    t: int  # the writer's wall-clock time, ns (recorded with garbage blocks)
    ops: list[Op] = field(default_factory=list)
    inc: int | None = None  # the writer's incarnation (lease header)
    kind: str | None = None  # SYNC or JOURNALED (lease header)
    batch: tuple[int, int] | None = None  # [jseq_first, jseq_last] of a journaled flush
    claims: dict[int, int] | None = None  # {domain: epoch} the ops were planned under

    @property
    def leased(self) -> bool:
        """True for an entry with a lease header (a lease-era entry)."""
        return self.kind is not None

    @property
    def journaled(self) -> bool:
        return self.kind == JOURNALED

    def wire(self) -> Wire:
        d: Wire = {
            "tx": self.tx,
            "client": self.client,
            "t": self.t,
            "ops": [o.wire() for o in self.ops],
        }
        if self.kind is not None:
            d["inc"] = self.inc
            d["kind"] = self.kind
            if self.batch is not None:
                d["batch"] = list(self.batch)
            if self.claims:
                d["claims"] = {str(k): v for k, v in sorted(self.claims.items())}
        return d

    @classmethod
    def unwire(cls, d: Any) -> LogEntry:
        if not isinstance(d, Mapping):
            raise CorruptObject("a metadata log entry must be an object")
        ops = d.get("ops", [])
        if not isinstance(ops, list):
            raise CorruptObject("a metadata log entry's ops must be a list")
        try:
            t = int(d.get("t", 0))
        except (TypeError, ValueError):
            raise CorruptObject(f"a metadata log entry's time is {d.get('t')!r}") from None
        entry = cls(str(d.get("tx", "")), str(d.get("client", "")), t, [decode_op(o) for o in ops])
        if any(k in d for k in ("inc", "kind", "batch", "claims")):
            try:
                entry.inc, entry.kind, entry.batch, entry.claims = _unwire_header(d)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CorruptObject(
                    f"malformed lease header in a metadata log entry: {e!r}"
                ) from None
        return entry


def _unwire_header(
    d: Mapping[str, Any],
) -> tuple[int, str, tuple[int, int] | None, dict[int, int] | None]:
    kind = d["kind"]
    if kind not in KINDS:
        raise ValueError(f"kind is {kind!r}, not one of {KINDS}")
    inc = d["inc"]
    if not isinstance(inc, int) or isinstance(inc, bool):
        raise TypeError(f"inc is {inc!r}")
    batch: tuple[int, int] | None = None
    if d.get("batch") is not None:
        first, last = d["batch"]
        batch = (int(first), int(last))
    claims: dict[int, int] | None = None
    if d.get("claims") is not None:
        claims = {int(k): int(v) for k, v in d["claims"].items()}
    return inc, str(kind), batch, claims
