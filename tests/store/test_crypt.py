"""Encryption at rest (store/crypt.py): round trips and ranges in plaintext terms,
tampering and wrong keys as errors, objects bound to their path, fresh nonces, keys
from files, commands and the environment, rotation and rekey."""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path

import pytest

from efsish import codec
from efsish.errors import CorruptObject, NotFound, PreconditionFailed
from efsish.meta.superblock import (
    ENCRYPTED_FORMAT_VERSION,
    SUPERBLOCK_KEY,
    format_fs,
    load_superblock,
)
from efsish.retry import retry_transient
from efsish.store.crypt import (
    CHUNK,
    HEADER,
    CryptKeyError,
    CryptStore,
    Keyring,
    UnknownKey,
    key_id,
    load_keyring,
    parse_keys,
    plaintext_size,
    read_key_file,
    rekey,
    superblock_info,
)
from efsish.store.faulty import FaultPlan, FaultyStore
from efsish.store.memory import MemoryStore

K1 = Keyring((b"\x01" * 32,), "key one")
K2 = Keyring((b"\x02" * 32,), "key two")
SIZES = [0, 1, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def fresh() -> tuple[MemoryStore, CryptStore]:
    raw = MemoryStore(f"crypt-{uuid.uuid4().hex}")
    return raw, CryptStore(raw, K1)


def pattern(n: int) -> bytes:
    return (b"plaintext-marker-" * (n // 17 + 1))[:n]


async def test_round_trip_sizes_and_ranges_are_of_the_plaintext() -> None:
    raw, store = fresh()
    for n in SIZES:
        data = pattern(n)
        await store.put(f"data/{n}", data)
        assert await store.get(f"data/{n}") == data
        assert (await store.head(f"data/{n}")).size == n
        stored = await raw.get(f"data/{n}")
        assert plaintext_size(len(stored)) == n
        if n >= 17:
            assert b"plaintext-marker" not in stored
        for a, b in [(0, 1), (n // 2, n // 2 + 4096), (CHUNK - 3, CHUNK + 3), (n - 1, n + 9)]:
            if 0 <= a < n:
                assert await store.get(f"data/{n}", a, b) == data[a:b], (n, a, b)
        if n:
            with pytest.raises(NotFound):
                await store.get(f"data/{n}", n, n + 10)
    sizes = {i.key: i.size async for i in store.list("data/")}
    assert sizes == {f"data/{n}": n for n in SIZES}


async def test_a_ranged_read_fetches_only_its_chunks() -> None:
    raw = MemoryStore(f"crypt-{uuid.uuid4().hex}")
    counted = FaultyStore(raw)
    store = CryptStore(counted, K1)
    data = os.urandom(8 * CHUNK)
    await store.put("data/b", data)
    counted.requests.clear()
    assert (
        await store.get("data/b", 5 * CHUNK + 10, 5 * CHUNK + 4000)
        == data[5 * CHUNK + 10 : 5 * CHUNK + 4000]
    )
    assert counted.calls["get"] == 2  # the header and one chunk, not the 1 MiB object


@pytest.mark.parametrize("where", [0, 5, 12, 30, 40, HEADER, HEADER + 100, -1])
async def test_a_flipped_byte_anywhere_is_an_error_never_data(where: int) -> None:
    raw, store = fresh()
    await store.put("log/0000000000000001", pattern(2 * CHUNK + 7))
    blob = bytearray(await raw.get("log/0000000000000001"))
    blob[where] ^= 0x40
    await raw.put("log/0000000000000001", bytes(blob))
    says = "log/0000000000000001 failed authentication"  # what the mount's log says
    with pytest.raises(CorruptObject, match=says):
        await store.get("log/0000000000000001")
    with pytest.raises(CorruptObject, match=says):
        # A ranged read that covers the damage (the header is in every range's check).
        at = max(0, (where if where >= 0 else len(blob) - 1) - HEADER)
        chunk = min(at // (CHUNK + 16), 2)
        await store.get("log/0000000000000001", chunk * CHUNK, chunk * CHUNK + 10)


async def test_every_flipped_byte_of_an_object_fails_authentication() -> None:
    """Each byte of a small object in turn (header and body), whole and ranged reads: one
    error that names the object and says it failed authentication, never data."""
    raw, store = fresh()
    await store.put("secrets/nudge", b"a small secret object")
    good = await raw.get("secrets/nudge")
    for i in range(len(good)):
        blob = bytearray(good)
        blob[i] ^= 0x01
        await raw.put("secrets/nudge", bytes(blob))
        for rng in [(None, None), (0, 5)]:
            with pytest.raises(CorruptObject, match=r"^secrets/nudge failed authentication"):
                await store.get("secrets/nudge", *rng)


async def test_truncation_at_a_chunk_boundary_is_an_error() -> None:
    raw, store = fresh()
    await store.put("data/t", pattern(3 * CHUNK))
    blob = await raw.get("data/t")
    await raw.put("data/t", blob[: HEADER + 2 * (CHUNK + 16)])
    with pytest.raises(CorruptObject):
        await store.get("data/t")
    with pytest.raises(CorruptObject):
        await store.get("data/t", 2 * CHUNK, 2 * CHUNK + 5)


async def test_an_object_moved_to_another_key_fails() -> None:
    raw, store = fresh()
    await store.put("log/0000000000000001", b"entry one")
    await store.put("log/0000000000000002", b"entry two")
    await raw.put("log/0000000000000002", await raw.get("log/0000000000000001"))
    with pytest.raises(CorruptObject, match="failed authentication"):
        await store.get("log/0000000000000002")
    assert await store.get("log/0000000000000001") == b"entry one"


async def test_nonces_never_repeat_over_many_objects() -> None:
    raw, store = fresh()
    for i in range(2000):
        await store.put(f"h/{i % 3}", b"same plaintext every time")  # rewrites too
        await store.put(f"d/{i}", b"same plaintext every time")
    salts = set()
    blobs = set()
    async for info in raw.list(""):
        blob = await raw.get(info.key)
        salts.add(blob[13:37])
        blobs.add(blob[HEADER:])
    assert len(salts) == len(blobs) == 2003  # fresh per-object key: no two alike


async def test_wrong_key_is_a_clear_error() -> None:
    raw, store = fresh()
    await store.put("data/x", b"secret")
    other = CryptStore(raw, K2)
    with pytest.raises(UnknownKey, match=f"key {key_id(K1.current).hex()}.*add that key"):
        await other.get("data/x")
    plain = MemoryStore(raw.url.removeprefix("memory://"))
    assert b"secret" not in await plain.get("data/x")


async def test_superblock_is_readable_and_names_keys_not_the_key() -> None:
    raw, store = fresh()
    sb = await format_fs(store, leases=False, encryption=superblock_info(K1))
    assert sb.format_version == ENCRYPTED_FORMAT_VERSION and not sb.leases
    text = codec.decode(b"S", await raw.get(SUPERBLOCK_KEY))
    assert key_id(K1.current).hex().encode() in text
    assert base64.b64encode(K1.current) not in text and K1.current not in text
    assert (await load_superblock(CryptStore(raw, K1))).encryption is not None
    with pytest.raises(CryptKeyError, match="is encrypted: give its key with --key-file"):
        await load_superblock(raw)
    with pytest.raises(CryptKeyError, match="wrong key") as e:
        await load_superblock(CryptStore(raw, K2))
    assert "\n" not in str(e.value)


async def test_a_key_for_a_plain_filesystem_is_refused() -> None:
    raw = MemoryStore(f"crypt-{uuid.uuid4().hex}")
    await format_fs(raw)
    with pytest.raises(CryptKeyError, match="not encrypted, but a key was given"):
        await load_superblock(CryptStore(raw, K1))


async def test_rotation_reads_old_objects_writes_new_and_rekey_moves_all() -> None:
    raw, store = fresh()
    await format_fs(store, encryption=superblock_info(K1))
    await store.put("data/old", b"old object")
    both = Keyring((K2.current, K1.current), "rotated")
    rotated = CryptStore(raw, both)
    await load_superblock(rotated)
    assert await rotated.get("data/old") == b"old object"
    await rotated.put("data/new", b"new object")
    assert await rotated.key_id_of("data/new") == key_id(K2.current)
    with pytest.raises(UnknownKey):
        await CryptStore(raw, K1).get("data/new")
    await rotated.put("log/0000000000000001", b"entry")
    assert await rekey(rotated) == (1, 3)  # data/old; the other two use K2 already
    only_new = CryptStore(raw, K2)
    await load_superblock(only_new)  # the superblock names K1, the log shows K2
    assert await only_new.get("data/old") == b"old object"


async def test_put_if_absent_retry_whose_first_try_landed_succeeds() -> None:
    raw = MemoryStore(f"crypt-{uuid.uuid4().hex}")
    flaky = FaultyStore(
        raw, FaultPlan(fail_after=0, ops=frozenset({"put_if_absent"}), lost_answer=True)
    )
    store = CryptStore(flaky, K1)

    async def attempt() -> None:
        flaky.plan.fail_after = None if flaky.calls["put_if_absent"] else 0
        await store.put_if_absent("log/0000000000000001", b"our entry")

    await retry_transient(attempt, "test write")
    assert flaky.calls["put_if_absent"] == 2  # the first landed, its answer was lost
    assert await store.get("log/0000000000000001") == b"our entry"
    with pytest.raises(PreconditionFailed):
        await store.put_if_absent("log/0000000000000001", b"another entry")


def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = base64.b64encode(b"\x07" * 32).decode()
    f = tmp_path / "key"
    k8 = base64.b64encode(b"\x08" * 32).decode()
    f.write_text(f"# efsish key\n\n{k}\n{k8}\n")
    f.chmod(0o600)
    ring = read_key_file(str(f))
    assert ring.keys == (b"\x07" * 32, b"\x08" * 32)
    assert k not in repr(ring)
    f.chmod(0o640)
    with pytest.raises(CryptKeyError, match="chmod 600"):
        read_key_file(str(f))
    with pytest.raises(CryptKeyError, match="line 2: not a key") as e:
        parse_keys(f"{k}\nc2hvcnQ=\n", "key file x")
    assert "c2hvcnQ" not in str(e.value)
    assert load_keyring(None, f"echo {k}", {}) == Keyring((b"\x07" * 32,), "key command output")
    with pytest.raises(CryptKeyError, match="key command failed \\(exit 3\\): nope"):
        load_keyring(None, "echo nope >&2; exit 3", {})
    assert load_keyring(None, None, {"EFSISH_KEY": k}) == Keyring((b"\x07" * 32,), "$EFSISH_KEY")
    assert load_keyring(None, None, {}) is None
    with pytest.raises(CryptKeyError, match="cannot read key file"):
        load_keyring(str(tmp_path / "missing"), None, {})
