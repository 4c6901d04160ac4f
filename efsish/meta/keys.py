"""The names of the metadata log's objects in the bucket: `log/<seq>` and
`checkpoints/<seq>`, the position written as 16 decimal digits.

This module owns how those keys are spelt and parsed; every other module (the log
client, checkpoints, gc, fsck) builds and reads them here. It must not do I/O.
"""

from __future__ import annotations

LOG_PREFIX = "log/"
CKPT_PREFIX = "checkpoints/"


def log_key(seq: int) -> str:
    return f"{LOG_PREFIX}{seq:016d}"


def ckpt_key(seq: int) -> str:
    return f"{CKPT_PREFIX}{seq:016d}"


def seq_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


def parse_seq(key: str, prefix: str) -> int | None:
    """The position in a key made by log_key (prefix LOG_PREFIX) or ckpt_key (CKPT_PREFIX),
    or None for any other key under that prefix (another filesystem nested in this
    prefix, a stray object): such keys are never read as ours nor deleted."""
    digits = key[len(prefix) :] if key.startswith(prefix) else ""
    if not (digits.isascii() and digits.isdigit()):
        return None
    seq = int(digits)
    return seq if key == f"{prefix}{seq:016d}" else None
