"""The metadata log's format: one typed definition of every op and of a log entry, and
their encoding in the bucket.

An *op* is one small, deterministic change of the replicated metadata; a *log entry*
(`log/<seq>`) is a batch of ops with the writer's transaction id, client id and time.
Planners (efsish.filesystem, efsish.gc, efsish.meta.log) build ops with the classes
here; `View.apply_op` gives them their meaning.

The encoding (a JSON object per op, its kind under "o", short keys) is permanent: every
entry that any efsish ever wrote must still decode, and an efsish that predates a field
must still read entries that carry it (optional fields are appended, never renamed).
`tests/meta/test_ops.py` keeps samples of every op as written by earlier versions.
`decode_op` turns anything malformed into CorruptObject with a readable reason, so a
damaged or foreign entry stops the mount cleanly, never half-applied.

This module must not touch SQLite, the store or the clock.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from efsish.errors import CorruptObject

Wire = dict[str, Any]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


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


Op = Mk | Ln | Rm | Mv | SetAttr | Write | SetXattr | RemoveXattr | ClaimInodes | BlocksDeleted

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
        raise CorruptObject(f"unknown operation {kind!r} in the metadata log")
    try:
        return fn(d)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CorruptObject(f"malformed {kind!r} operation in the metadata log: {e!r}") from None


# ------------------------------------------------------------------------- log entries


@dataclass
class LogEntry:
    """One object `log/<seq>`: a batch of ops committed together by one mount."""

    tx: str  # unique per entry: a retried PUT that landed is recognised as ours
    client: str  # the writer's client id (its heartbeat is clients/<client>)
    t: int  # the writer's wall-clock time, ns (recorded with garbage blocks)
    ops: list[Op] = field(default_factory=list)

    def wire(self) -> Wire:
        return {
            "tx": self.tx,
            "client": self.client,
            "t": self.t,
            "ops": [o.wire() for o in self.ops],
        }

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
        return cls(str(d.get("tx", "")), str(d.get("client", "")), t, [decode_op(o) for o in ops])
