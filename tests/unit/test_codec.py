"""Block checksums: new blocks get a CRC-32C (format 2) or a CRC-32 (format 1); blocks
from earlier versions still verify."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google_crc32c
import pytest

from efsish import codec
from efsish.codec import block_hash, block_matches
from efsish.errors import CorruptObject


@pytest.mark.parametrize(
    "algorithm, expected",
    [
        ("crc32c", lambda d: f"k{google_crc32c.value(d):08x}"),
        ("crc32", lambda d: f"r{zlib.crc32(d):08x}"),
    ],
)
def test_block_checksums_detect_damage(algorithm: str, expected: Any) -> None:
    data = os.urandom(100_000)
    h = block_hash(data, algorithm)
    assert h == expected(data)
    assert block_matches(data, h)
    assert not block_matches(data[:-1] + b"y", h)
    assert not block_matches(data[:50_000] + bytes([data[50_000] ^ 1]) + data[50_001:], h)
    assert block_hash(data) == block_hash(data, "crc32c")  # the default for new blocks
    with pytest.raises(ValueError):
        block_hash(data, "md5")


def test_blocks_written_by_earlier_versions_still_verify() -> None:
    data = b"older block"
    # Old hashes are bare hex: whatever digit they start with, they are not a CRC.
    for i in range(200):
        d = b"%d" % i
        old = hashlib.blake2b(d, digest_size=16).hexdigest()
        assert block_matches(d, old)
    for old in (
        hashlib.blake2b(data, digest_size=16).hexdigest(),
        "s" + hashlib.sha256(data).hexdigest()[:32],
    ):
        assert block_matches(data, old)
        assert not block_matches(b"older blocK", old)


def test_encoding_from_many_threads_at_once() -> None:
    """Objects are encoded on the event loop and in worker threads at the same time; a
    shared zstd compressor broke under that ("Src size is incorrect")."""
    payloads = [os.urandom(64) * (i % 50 + 1) for i in range(400)]

    def work(chunk: list[bytes]) -> list[bytes]:
        return [codec.encode(b"L", p) for p in chunk]

    with ThreadPoolExecutor(8) as pool:
        blobs = [b for part in pool.map(work, [payloads[i::8] for i in range(8)]) for b in part]
    expected = [p for i in range(8) for p in payloads[i::8]]
    assert [codec.decode(b"L", b) for b in blobs] == expected


def test_log_entry_json_round_trips_what_orjson_refuses() -> None:
    """Log entries are written with orjson where it can and with the standard library
    where it cannot (a name that is not UTF-8 becomes a str with lone surrogates; an
    int beyond 64 bits); both read back alike, and what older versions wrote (ASCII
    with escapes) and will read (json.loads) agree with it."""
    from efsish.meta.ops import name_to_json

    cases: list[Any] = [
        {"o": "mk", "name": name_to_json(b"plain"), "t": 1},
        {"o": "mk", "name": name_to_json("été-日本".encode()), "t": 2},
        {"o": "mk", "name": name_to_json(b"raw-\xff\xfe"), "t": 3},  # not UTF-8
        {"o": "mk", "big": 1 << 70, "claims": {5: 7}},
    ]
    for obj in cases:
        want = json.loads(json.dumps(obj))  # int keys become strings, as in the bucket
        blob = codec.encode_json(b"L", obj)
        assert codec.decode_json(b"L", blob) == want
        assert json.loads(codec.decode(b"L", blob)) == want  # an older efsish reads it
        old = codec.encode(b"L", json.dumps(obj, separators=(",", ":")).encode())
        assert codec.decode_json(b"L", old) == want  # what an older efsish wrote
        assert codec.loads(codec.dumps(obj).decode()) == want
    with pytest.raises(CorruptObject, match="not valid JSON"):
        codec.decode_json(b"L", codec.encode(b"L", b'{"o": "mk",'))


def test_an_object_takes_the_same_bytes_whoever_writes_it() -> None:
    """The journal sizes an entry by the bytes of its rows' ops as stored: an op must
    take the same bytes in an entry that the standard library writes (because another
    op in it has a name that is not UTF-8) as when orjson wrote it alone."""
    from efsish.meta.ops import name_to_json

    utf8 = {"o": "mk", "name": name_to_json(("日本語" * 25).encode()), "t": 1}
    raw = {"o": "mk", "name": name_to_json(b"raw-\xff\xfe"), "t": 2}
    both = codec.dumps([utf8, raw])
    assert len(both) == len(codec.dumps(utf8)) + len(codec.dumps(raw)) + 3
    assert both == b"[" + codec.dumps(utf8) + b"," + codec.dumps(raw) + b"]"
    assert codec.loads(both) == [utf8, raw]
