"""The write-back buffer against a plain bytearray model: random writes, truncates and
block cuts, then every byte and every dirty range compared — with the threshold above
which appends are kept by reference at its real value and at 8 and 1 bytes, so that the
chunked paths (references, views left by a cut, overwrites inside one chunk) all run."""

from __future__ import annotations

import itertools
import random

import pytest

from efsish.data import dirty as dirty_mod
from efsish.data.dirty import DirtyBuffer

BS = 64


@pytest.mark.parametrize("big", [dirty_mod.BIG_WRITE, 8, 1])
@pytest.mark.parametrize("seed", range(20))
def test_dirty_buffer_matches_a_model(seed: int, big: int, monkeypatch) -> None:
    monkeypatch.setattr(dirty_mod, "BIG_WRITE", big)
    rng = random.Random(seed)
    buf = DirtyBuffer()
    model = bytearray(1024)
    dirty = [False] * 1024
    taken: list[tuple[int, bytes]] = []
    pos = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.5:  # mostly appends, like a sequential writer
            off, n = pos, rng.randint(1, 40)
        elif op < 0.9:
            off, n = rng.randrange(0, 900), rng.randint(1, 100)
        else:
            size = rng.randrange(0, 1000)
            buf.truncate(size)
            for i in range(size, 1024):
                dirty[i] = False
            pos = min(pos, size)
            continue
        n = min(n, 1024 - off)
        data = rng.randbytes(n)
        if rng.random() < 0.3:  # a caller's buffer that changes after the write
            mutable = bytearray(data)
            buf.write(off, mutable)
            mutable[:] = bytes(len(mutable))
        else:
            buf.write(off, data)
        model[off : off + n] = data
        for i in range(off, off + n):
            dirty[i] = True
        pos = off + n
        if rng.random() < 0.2:
            for boff, block in buf.take_full_blocks(BS):
                assert len(block) == BS and isinstance(block, bytes)
                assert block == bytes(model[boff : boff + BS])
                for i in range(boff, boff + BS):
                    dirty[i] = False
                taken.append((boff, block))
        ivs = buf.overlapping(0, 1024)
        assert [iv.off for iv in ivs] == sorted(iv.off for iv in ivs)
        covered = [False] * 1024
        for a, b in itertools.pairwise(ivs):
            assert a.end <= b.off  # sorted, never overlapping
        for iv in ivs:
            assert iv.tobytes() == bytes(model[iv.off : iv.end])
            lo = rng.randrange(iv.off, iv.end)
            hi = rng.randrange(lo, iv.end) + 1
            assert iv.slice(lo, hi) == bytes(model[lo:hi])
            if rng.random() < 0.1:  # joining the chunks into one buffer changes nothing
                assert bytes(iv.buf) == bytes(model[iv.off : iv.end])
            for i in range(iv.off, iv.end):
                covered[i] = True
        assert covered == dirty
        assert buf.nbytes == sum(dirty)


def test_an_overwrite_across_chunks_copies_only_the_chunks_it_touches() -> None:
    """Seven 1 MiB appends, then 8 bytes across the boundary of the 3rd and 4th: those
    two chunks become ours, the other five stay the caller's objects (not one 7 MiB join
    on the event loop, which a database's page writes would repeat after every append)."""
    parts = [bytes([i]) * (1 << 20) for i in range(7)]
    buf = DirtyBuffer()
    for i, p in enumerate(parts):
        buf.write(i << 20, p)
    buf.write((3 << 20) - 4, b"\xff" * 8)
    (iv,) = buf.ivs
    chunks = iv._chunks
    assert len(chunks) == 7
    assert [c is p for c, p in zip(chunks, parts, strict=True)] == [
        True,
        True,
        False,
        False,
        True,
        True,
        True,
    ]
    expected = bytearray(b"".join(parts))
    expected[(3 << 20) - 4 : (3 << 20) + 4] = b"\xff" * 8
    assert iv.tobytes() == bytes(expected) and buf.nbytes == 7 << 20
