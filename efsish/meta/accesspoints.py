"""Access points: a root directory and a POSIX identity that every request through a
mount made with `-o access_point=ID` uses, as EFS access points do.

This module owns the typed definition and its objects in the bucket,
`accesspoints/<id>` (an envelope of kind A; encrypted with everything else on an
encrypted filesystem): creation is conditional (an existing access point is never
overwritten), deletion removes the object. Ids look like EFS's: `fsap-` and 17 hex
digits. What a mount does with one (the root mapping and the enforced identity) is in
efsish.access.
"""

from __future__ import annotations

import functools
import posixpath
import re
import secrets
import time
from dataclasses import dataclass

from efsish import codec
from efsish.errors import CorruptObject, EfsishError, NotFound, PreconditionFailed, UsageError
from efsish.retry import retry_transient
from efsish.store import ObjectStore

PREFIX = "accesspoints/"
KIND = b"A"
ID_RE = re.compile(r"fsap-[0-9a-f]{17}")
NAME_MAX = 255  # bytes of one path component, as in the filesystem
ID_MAX = 0xFFFFFFFF  # uids and gids are 32-bit on Linux (-1 means "unchanged")


@dataclass(frozen=True)
class CreationInfo:
    """Owner and mode of the root directory when a mount finds it missing."""

    uid: int
    gid: int
    mode: int  # permission bits only (0o7777 at most)


@dataclass(frozen=True)
class AccessPoint:
    id: str
    root: str  # an absolute, normalised path ("/" for the filesystem's root)
    uid: int
    gid: int
    secondary_gids: tuple[int, ...] = ()
    creation: CreationInfo | None = None
    name: str = ""
    created: float = 0.0  # wall time of `access-point create`, for listings

    @property
    def components(self) -> list[bytes]:
        """The root's path components, as the filesystem's names."""
        return [c.encode("utf-8", "surrogateescape") for c in self.root.split("/") if c]

    def describe(self) -> str:
        groups = ",".join(str(g) for g in self.secondary_gids) or "-"
        create = (
            f"{self.creation.uid}:{self.creation.gid} {self.creation.mode:04o}"
            if self.creation
            else "-"
        )
        return (
            f"{self.id}  {self.name or '-'}  root={self.root}  uid={self.uid} gid={self.gid}"
            f" groups={groups}  create={create}"
        )


def new_id() -> str:
    return "fsap-" + secrets.token_hex(9)[:17]


def key_of(ap_id: str) -> str:
    if not ID_RE.fullmatch(ap_id):
        raise UsageError(
            f"invalid access point id {ap_id!r} (ids look like fsap-0123456789abcdef0)"
        )
    return PREFIX + ap_id


def _check_id(value: int, what: str) -> int:
    if not 0 <= value < ID_MAX:
        raise UsageError(f"{what} {value} is out of range (0 to {ID_MAX - 1})")
    return value


def normalise_root(path: str) -> str:
    """`path` as an absolute path without "." or ".." components or repeated slashes;
    UsageError if it is relative, climbs, or has a component too long for a name."""
    if not path.startswith("/"):
        raise UsageError(f"access point root {path!r} must be an absolute path, e.g. /home/alice")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise UsageError(f"access point root {path!r} may not contain '..'")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UsageError(f"access point root {path!r}: a component is over {NAME_MAX} bytes")
        if "\0" in p:
            raise UsageError("access point root may not contain NUL")
    return posixpath.join("/", *parts)


def make(
    root: str,
    uid: int,
    gid: int,
    secondary_gids: tuple[int, ...] = (),
    creation: CreationInfo | None = None,
    name: str = "",
) -> AccessPoint:
    """A new access point with a fresh id, every field checked (UsageError)."""
    for g in secondary_gids:
        _check_id(g, "secondary gid")
    if creation is not None:
        _check_id(creation.uid, "create owner uid")
        _check_id(creation.gid, "create owner gid")
        if not 0 <= creation.mode <= 0o7777:
            raise UsageError(f"create mode {creation.mode:o} is not a permission mode (0 to 7777)")
    if len(name.encode()) > 256:
        raise UsageError("access point name is over 256 bytes")
    return AccessPoint(
        id=new_id(),
        root=normalise_root(root),
        uid=_check_id(uid, "uid"),
        gid=_check_id(gid, "gid"),
        secondary_gids=tuple(sorted(set(secondary_gids))),
        creation=creation,
        name=name,
        created=time.time(),
    )


# ---------------------------------------------------------------------------- encoding


def encode(ap: AccessPoint) -> bytes:
    doc: dict[str, object] = {
        "v": 1,
        "id": ap.id,
        "root": ap.root,
        "uid": ap.uid,
        "gid": ap.gid,
        "groups": list(ap.secondary_gids),
        "name": ap.name,
        "created": ap.created,
    }
    if ap.creation is not None:
        c = ap.creation
        doc["create"] = {"uid": c.uid, "gid": c.gid, "mode": c.mode}
    return codec.encode_json(KIND, doc)


def _int(d: dict[str, object], k: str, what: str) -> int:
    v = d.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < ID_MAX:
        raise CorruptObject(f"{what}: field {k!r} is not a valid id")
    return v


def decode(blob: bytes, what: str = "access point") -> AccessPoint:
    d = codec.decode_json(KIND, blob, what)
    if not isinstance(d, dict) or d.get("v") != 1:
        raise CorruptObject(f"{what}: not a version-1 access point (upgrade efsish?)")
    ap_id, root, name = d.get("id"), d.get("root"), d.get("name", "")
    if not isinstance(ap_id, str) or not ID_RE.fullmatch(ap_id):
        raise CorruptObject(f"{what}: bad id")
    if not isinstance(root, str) or not isinstance(name, str):
        raise CorruptObject(f"{what}: bad root or name")
    try:
        if normalise_root(root) != root:
            raise UsageError(root)
    except UsageError:
        raise CorruptObject(f"{what}: root {root!r} is not a normalised absolute path") from None
    groups = d.get("groups", [])
    if not isinstance(groups, list):
        raise CorruptObject(f"{what}: bad secondary gids")
    gids = tuple(_int({"g": g}, "g", what) for g in groups)
    creation = None
    c = d.get("create")
    if c is not None:
        if not isinstance(c, dict):
            raise CorruptObject(f"{what}: bad creation info")
        mode = c.get("mode")
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise CorruptObject(f"{what}: bad create mode")
        creation = CreationInfo(_int(c, "uid", what), _int(c, "gid", what), mode)
    created = d.get("created", 0.0)
    return AccessPoint(
        id=ap_id,
        root=root,
        uid=_int(d, "uid", what),
        gid=_int(d, "gid", what),
        secondary_gids=gids,
        creation=creation,
        name=name,
        created=float(created) if isinstance(created, (int, float)) else 0.0,
    )


# ------------------------------------------------------------------------------ store


async def create(store: ObjectStore, ap: AccessPoint) -> None:
    """Store a new access point; never overwrites one (an id collision is an error)."""
    put = functools.partial(store.put_if_absent, key_of(ap.id), encode(ap))
    try:
        await retry_transient(put, f"creation of access point {ap.id}")
    except PreconditionFailed:
        raise EfsishError(f"access point {ap.id} already exists; run the command again") from None


async def load(store: ObjectStore, ap_id: str) -> AccessPoint:
    key = key_of(ap_id)
    try:
        blob = await retry_transient(lambda: store.get(key), f"read of {key}")
    except NotFound:
        raise EfsishError(
            f"no access point {ap_id} in this filesystem (see `efsish access-point list STORE`)"
        ) from None
    ap = decode(blob, key)
    if ap.id != ap_id:
        raise CorruptObject(f"{key}: holds access point {ap.id}, not {ap_id}")
    return ap


async def list_all(store: ObjectStore) -> list[AccessPoint]:
    """Every access point, oldest first; damaged objects raise CorruptObject."""
    out = []
    async for info in store.list(PREFIX):
        if ID_RE.fullmatch(info.key[len(PREFIX) :]):
            out.append(await load(store, info.key[len(PREFIX) :]))
    return sorted(out, key=lambda a: (a.created, a.id))


async def delete(store: ObjectStore, ap_id: str) -> None:
    """Remove an access point (mounts made with it keep it until they unmount)."""
    try:
        await load(store, ap_id)  # an error naming it if there is none
    except CorruptObject:
        pass  # a damaged one can be deleted too
    await retry_transient(lambda: store.delete(key_of(ap_id)), f"deletion of {ap_id}")
