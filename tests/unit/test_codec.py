"""Block checksums: new blocks get a CRC-32; blocks from earlier versions still verify."""

from __future__ import annotations

import hashlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from efsish import codec
from efsish.codec import block_hash, block_matches


def test_new_blocks_use_crc32_and_detect_damage() -> None:
    data = b"x" * 100_000
    h = block_hash(data)
    assert h == f"r{zlib.crc32(data):08x}"
    assert block_matches(data, h)
    assert not block_matches(data[:-1] + b"y", h)
    assert not block_matches(data[:50_000] + b"\\0" + data[50_001:], h)


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
