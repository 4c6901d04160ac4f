"""Envelope for every metadata object efsish writes (superblock, log entries, checkpoints).

An envelope is: MAGIC, a one-byte kind, a 16-byte BLAKE2b checksum of the payload, and the
payload compressed with zstd. decode() verifies all of it and raises CorruptObject with a
readable reason, so a damaged or foreign object is never silently used. Data blocks are
not wrapped: their checksums live in the metadata that references them.

This module must not know what the payloads mean.
"""

from __future__ import annotations

import hashlib
import json
import threading
import zlib
from typing import Any

import google_crc32c
import orjson
import zstandard

from efsish.errors import CorruptObject

MAGIC = b"EFSISH\x01"
KINDS = {
    b"S": "superblock",
    b"L": "log",
    b"C": "checkpoint",
    b"H": "heartbeat",
    b"T": "throughput",
    b"N": "nudge key",  # secrets/nudge, owned by efsish.meta.nudge
    b"A": "access point",  # accesspoints/<id>, owned by efsish.meta.accesspoints
}
_HDR = len(MAGIC) + 1 + 16

# zstandard's (de)compressor objects are not thread-safe, and objects are encoded both on
# the event loop (heartbeats) and in worker threads (log entries, checkpoints): sharing
# one made concurrent compressions fail ("Src size is incorrect") and could produce
# garbage. One compressor per thread.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=3)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    # Made once per thread: constructing one costs more than decompressing a log entry.
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


BLOCK_CHECKSUMS = ("crc32c", "crc32")
"""Checksums a filesystem can record for its data blocks (the superblock says which)."""


def block_hash(data: bytes, algorithm: str = "crc32c") -> str:
    """Checksum recorded in the metadata for every data block, with a prefix that is not
    a hex digit (so that it cannot be mistaken for an older bare-hex hash):

    - "k" + CRC-32C (Castagnoli) in hex: filesystems formatted since format 2. The same
      checksum S3 verifies on upload (x-amz-checksum-crc32c); google-crc32c computes it
      with the CPU's CRC instruction at ~16 GB/s here, 8x zlib's CRC-32.
    - "r" + CRC-32 (zlib) in hex: format-1 filesystems keep writing these, so that
      older efsish versions still mounting them can verify every block.

    A 32-bit CRC detects every burst error up to 32 bits and random damage with
    probability 1 - 2^-32, the class of checksum S3, btrfs and HDFS use for data. It is
    not a defence against someone who can write the bucket (they can rewrite the log
    too). Blocks written by earlier versions carry "s" + SHA-256-128 or a bare
    BLAKE2b-128; `block_matches` accepts all of them."""
    if algorithm == "crc32c":
        return f"k{google_crc32c.value(bytes(data)):08x}"
    if algorithm == "crc32":
        return f"r{zlib.crc32(data):08x}"
    raise ValueError(f"unknown block checksum {algorithm!r}")


# Blocks larger than this also get a CRC-32C per CRC_CHUNK bytes, recorded beside the
# block's checksum, so that a random read can GET (and verify) only the chunks it needs.
# 128 KiB: the kernel's usual read request; 32 checksums (256 hex digits) per 4 MiB block.
CRC_CHUNK = 128 * 1024


def chunk_crcs(data: bytes) -> str | None:
    """The CRC-32C of each CRC_CHUNK of `data`, as 8 hex digits each; None for a block
    of one chunk or less (it is always read whole)."""
    if len(data) <= CRC_CHUNK:
        return None
    mv = memoryview(data)
    return "".join(
        f"{google_crc32c.value(bytes(mv[i : i + CRC_CHUNK])):08x}"
        for i in range(0, len(data), CRC_CHUNK)
    )


def chunks_match(data: bytes, crcs: str, first: int) -> bool:
    """True if `data`, the block's bytes from chunk `first` on (whole chunks, the last one
    possibly the block's short tail), matches its recorded chunk checksums."""
    mv = memoryview(data)
    for n, i in enumerate(range(0, len(data), CRC_CHUNK)):
        want = crcs[(first + n) * 8 : (first + n) * 8 + 8]
        if len(want) != 8 or f"{google_crc32c.value(bytes(mv[i : i + CRC_CHUNK])):08x}" != want:
            return False
    return True


def block_matches(data: bytes, hash_: str) -> bool:
    """True if `data` is the block whose recorded checksum is `hash_`."""
    if hash_.startswith("k"):
        return block_hash(data, "crc32c") == hash_
    if hash_.startswith("r"):
        return block_hash(data, "crc32") == hash_
    if hash_.startswith("s"):
        return "s" + hashlib.sha256(data).hexdigest()[:32] == hash_
    return hashlib.blake2b(data, digest_size=16).hexdigest() == hash_


def encode(kind: bytes, payload: bytes) -> bytes:
    assert kind in KINDS
    return MAGIC + kind + checksum(payload) + _compressor().compress(payload)


def decode(kind: bytes, blob: bytes, what: str = "object", max_size: int = 1 << 31) -> bytes:
    if len(blob) < _HDR or not blob.startswith(MAGIC):
        raise CorruptObject(f"{what}: not an efsish object (bad magic or truncated)")
    if blob[len(MAGIC) : len(MAGIC) + 1] != kind:
        got = KINDS.get(blob[len(MAGIC) : len(MAGIC) + 1], "unknown")
        raise CorruptObject(f"{what}: expected a {KINDS[kind]}, found a {got} object")
    digest = blob[len(MAGIC) + 1 : _HDR]
    try:
        payload = _decompressor().decompress(blob[_HDR:], max_output_size=max_size)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"{what}: compressed payload is damaged ({e})") from None
    if checksum(payload) != digest:
        raise CorruptObject(f"{what}: checksum mismatch (object is corrupt)")
    return payload


def dumps(obj: Any) -> bytes:
    """`obj` as compact JSON in UTF-8, for objects of ints, strs, lists, dicts, bools
    and None (log ops and entries). orjson writes it 5-10x faster than the standard
    library; what orjson refuses (a str with lone surrogates, i.e. a file name that is
    not UTF-8, or an int beyond 64 bits) the standard library writes, alike but for
    each lone surrogate, which becomes its escape (backslashreplace writes exactly
    JSON's \\udcXX), so that an object takes the same bytes whichever wrote it (the
    journal sizes entries by the rows' bytes). Not for floats: orjson writes NaN and
    infinities as null."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "backslashreplace")


def loads(data: bytes | str) -> Any:
    """JSON as `dumps` or the standard library wrote it: orjson reads it, and what
    orjson refuses (escaped lone surrogates, ints beyond 64 bits, NaN) the standard
    library reads. ValueError if neither can."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def encode_json(kind: bytes, obj: Any) -> bytes:
    """A JSON object in an envelope. Log entries (kind L: ops, no floats) are written
    by `dumps`; the rest, which may carry floats, by the standard library."""
    if kind == b"L":
        return encode(kind, dumps(obj))
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode())


def decode_json(kind: bytes, blob: bytes, what: str = "object") -> Any:
    payload = decode(kind, blob, what)
    try:
        return loads(payload)
    except ValueError as e:
        raise CorruptObject(f"{what}: payload is not valid JSON ({e})") from None
