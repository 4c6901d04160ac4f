"""efsish.meta.accesspoints: the typed definition, its encoded form, and its objects in
the bucket (conditional create, list, delete, fsck)."""

from __future__ import annotations

import json
import uuid

import pytest
import zstandard

from efsish import codec
from efsish.errors import CorruptObject, EfsishError, UsageError
from efsish.meta import accesspoints as aps
from efsish.meta.accesspoints import AccessPoint, CreationInfo
from efsish.store.memory import MemoryStore


def _store() -> MemoryStore:
    return MemoryStore(f"ap-{uuid.uuid4().hex}")


AP = AccessPoint(
    id="fsap-0123456789abcdef0",
    root="/home/alice",
    uid=1001,
    gid=1001,
    secondary_gids=(10, 20),
    creation=CreationInfo(uid=1001, gid=1002, mode=0o700),
    name="alice",
    created=1700000000.5,
)


def test_encoded_form_is_an_envelope_of_kind_A_with_every_field() -> None:
    blob = aps.encode(AP)
    assert blob.startswith(codec.MAGIC + b"A")
    payload = zstandard.ZstdDecompressor().decompress(blob[len(codec.MAGIC) + 17 :])
    assert json.loads(payload) == {
        "v": 1,
        "id": "fsap-0123456789abcdef0",
        "root": "/home/alice",
        "uid": 1001,
        "gid": 1001,
        "groups": [10, 20],
        "name": "alice",
        "created": 1700000000.5,
        "create": {"uid": 1001, "gid": 1002, "mode": 0o700},
    }
    assert aps.decode(blob) == AP
    plain = AccessPoint(id=AP.id, root="/", uid=0, gid=0)
    assert aps.decode(aps.encode(plain)) == plain
    assert plain.components == [] and AP.components == [b"home", b"alice"]


def test_damaged_or_foreign_objects_are_refused() -> None:
    with pytest.raises(CorruptObject, match="expected a access point"):
        aps.decode(codec.encode_json(b"N", {"key": "00"}))
    for bad in (
        {"v": 2},
        {"v": 1, "id": "fsap-x", "root": "/", "uid": 1, "gid": 1},
        {"v": 1, "id": AP.id, "root": "/a/../b", "uid": 1, "gid": 1},
        {"v": 1, "id": AP.id, "root": "/a", "uid": -1, "gid": 1},
        {"v": 1, "id": AP.id, "root": "/a", "uid": 1, "gid": 1, "create": {"mode": 0o7777}},
    ):
        with pytest.raises(CorruptObject):
            aps.decode(codec.encode_json(b"A", bad))


def test_make_checks_and_normalises() -> None:
    ap = aps.make("//home/./alice/", 1001, 1001, (20, 10, 20))
    assert ap.root == "/home/alice" and ap.secondary_gids == (10, 20)
    assert aps.ID_RE.fullmatch(ap.id)
    for root in ("home/alice", "/home/../etc", "/" + "x" * 256):
        with pytest.raises(UsageError):
            aps.make(root, 1, 1)
    with pytest.raises(UsageError):
        aps.make("/a", 1, 2**32)
    with pytest.raises(UsageError):
        aps.make("/a", 1, 1, creation=CreationInfo(1, 1, 0o10000))
    with pytest.raises(UsageError):
        aps.key_of("../superblock")


async def test_create_list_load_delete_and_never_overwrite() -> None:
    store = _store()
    a = aps.make("/home/alice", 1001, 1001)
    b = aps.make("/srv/www", 33, 33, creation=CreationInfo(33, 33, 0o755), name="www")
    await aps.create(store, a)
    await aps.create(store, b)
    assert [x.id for x in await aps.list_all(store)] == [a.id, b.id]
    assert await aps.load(store, b.id) == b
    clash = AccessPoint(id=a.id, root="/", uid=0, gid=0)
    with pytest.raises(EfsishError, match="already exists"):
        await aps.create(store, clash)
    assert await aps.load(store, a.id) == a  # not overwritten
    await aps.delete(store, a.id)
    assert [x.id for x in await aps.list_all(store)] == [b.id]
    with pytest.raises(EfsishError, match="no access point"):
        await aps.load(store, a.id)
    with pytest.raises(EfsishError, match="no access point"):
        await aps.delete(store, a.id)


async def test_fsck_knows_the_prefix_and_checks_the_objects() -> None:
    from efsish.meta.superblock import format_fs
    from tests.fs.helpers import fsck

    store = _store()
    await format_fs(store)
    ap = aps.make("/home/alice", 1001, 1001)
    await aps.create(store, ap)
    code, out = await fsck(store)
    assert code == 0, out
    assert aps.PREFIX not in out
    await store.put(aps.key_of("fsap-00000000000000000"), b"garbage")
    code, out = await fsck(store)
    assert code != 0 and "fsap-00000000000000000" in out
