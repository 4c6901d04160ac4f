"""Block checksums: new blocks get SHA-256-128, blocks from before still verify."""

from __future__ import annotations

import hashlib

from efsish.codec import block_hash, block_matches


def test_new_blocks_use_sha256_and_detect_damage() -> None:
    data = b"x" * 100_000
    h = block_hash(data)
    assert h == "s" + hashlib.sha256(data).hexdigest()[:32]
    assert block_matches(data, h)
    assert not block_matches(data[:-1] + b"y", h)


def test_blocks_written_with_blake2b_still_verify() -> None:
    data = b"older block"
    old = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert block_matches(data, old)
    assert not block_matches(b"older blocK", old)
