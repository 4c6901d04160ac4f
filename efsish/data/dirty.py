"""Write-back buffer for one file on one mount: dirty byte ranges not yet uploaded.

Intervals are kept sorted and non-overlapping. An interval is a list of chunks: a large
append (a FUSE write of 64 KiB or more, e.g. 1 MiB of a sequential writer) is kept as the
caller's own bytes object, not copied, and cutting a whole block off the front joins the
chunks it spans into one new bytes object, so each byte of a sequential write is copied
once here (it used to be twice: into a growing bytearray, then out of it). Small appends
go into a bytearray chunk of our own; overwrites are slice assignments into the chunks
they touch; only writes that bridge intervals merge them. This module is pure data
structure: no I/O, no trio.
"""

from __future__ import annotations

import bisect

Chunk = bytes | bytearray | memoryview
BIG_WRITE = 64 * 1024  # appends this large are kept by reference, not copied


class Interval:
    """Dirty bytes [off, end) of a file, as a list of chunks in order."""

    __slots__ = ("_chunks", "_len", "off")

    def __init__(self, off: int, data: Chunk, *, owned: bool = False) -> None:
        """`data` is kept as it is if it is ours (`owned`) or a large immutable bytes
        object; anything else is copied (a caller's bytearray may change later)."""
        self.off = off
        keep = owned or (isinstance(data, bytes) and len(data) >= BIG_WRITE)
        self._chunks: list[Chunk] = [data if keep else bytearray(data)]
        self._len = len(data)

    def __len__(self) -> int:
        return self._len

    @property
    def end(self) -> int:
        return self.off + self._len

    @property
    def buf(self) -> bytearray:
        """The bytes as one writable buffer (the chunks are joined into it, once)."""
        c = self._chunks
        if len(c) != 1 or not isinstance(c[0], bytearray):
            self._chunks = c = [bytearray().join(c)]
        b = c[0]
        assert isinstance(b, bytearray)
        return b

    def tobytes(self) -> bytes:
        return b"".join(self._chunks)

    def slice(self, start: int, end: int) -> bytes:
        """The bytes at file offsets [start, end) (inside the interval), copied once."""
        out: list[memoryview] = []
        pos = self.off
        for c in self._chunks:
            n = len(c)
            if pos + n > start and pos < end:
                out.append(memoryview(c)[max(start - pos, 0) : min(end - pos, n)])
            pos += n
            if pos >= end:
                break
        return b"".join(out)

    def append(self, data: Chunk) -> None:
        last = self._chunks[-1] if self._chunks else None
        if len(data) >= BIG_WRITE and isinstance(data, bytes):
            self._chunks.append(data)  # immutable: safe to keep as it is
        elif isinstance(last, bytearray) and len(last) < BIG_WRITE:
            last += data
        else:
            self._chunks.append(bytearray(data))
        self._len += len(data)

    def overwrite(self, off: int, data: Chunk) -> None:
        """Write `data` at file offset `off`, inside the interval, chunk by chunk: only
        the chunks it touches are made writable (copied if they are not ours), never the
        whole interval (up to two blocks) for a write that crosses a chunk boundary."""
        end = off + len(data)
        assert self.off <= off and end <= self.end
        with memoryview(data) as src:
            pos = self.off
            for i, c in enumerate(self._chunks):
                n = len(c)
                if pos + n > off:
                    if pos >= end:
                        break
                    if not isinstance(c, bytearray):
                        c = self._chunks[i] = bytearray(c)
                    lo, hi = max(off, pos), min(end, pos + n)
                    c[lo - pos : hi - pos] = src[lo - off : hi - off]
                pos += n

    def take_front(self, n: int) -> bytes:
        """Remove the first n bytes (n <= len) and return them as one bytes object."""
        out: list[Chunk] = []
        need = n
        chunks = self._chunks
        while need:
            c = chunks[0]
            if len(c) <= need:
                out.append(c)
                need -= len(c)
                chunks.pop(0)
            else:
                v = memoryview(c)
                out.append(v[:need])
                chunks[0] = v[need:]  # the rest of a chunk stays, as a view
                need = 0
        data = out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)
        self.off += n
        self._len -= n
        return data

    def truncate(self, size: int) -> None:
        """Keep the first `size` bytes."""
        if size < self._len:
            del self.buf[size:]
            self._len = size


class DirtyBuffer:
    """Sorted, non-overlapping dirty intervals of a file."""

    def __init__(self) -> None:
        self.ivs: list[Interval] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.ivs)

    def _starts(self) -> list[int]:
        return [iv.off for iv in self.ivs]

    def write(self, off: int, data: Chunk) -> None:
        """Record `data` at `off`. A large bytes object is kept as it is (bytes cannot
        change); any other buffer is copied."""
        if not data:
            return
        end = off + len(data)
        ivs = self.ivs
        # Fast paths: append to, or overwrite within one chunk of, the last interval.
        if ivs:
            last = ivs[-1]
            if off == last.end:
                last.append(data)
                self.nbytes += len(data)
                return
            if last.off <= off < last.end < end:  # rewrites the tail, then appends
                inside = last.end - off
                with memoryview(data) as view:
                    last.overwrite(off, view[:inside])
                    last.append(bytes(view[inside:]))
                self.nbytes += end - (off + inside)
                return
            if last.off <= off and end <= last.end:
                last.overwrite(off, data)
                return
        starts = self._starts()
        i = bisect.bisect_right(starts, off) - 1
        if i >= 0 and ivs[i].end < off:
            i += 1
        i = max(i, 0)
        j = i
        while j < len(ivs) and ivs[j].off <= end:
            j += 1
        touching = ivs[i:j]
        if not touching:
            ivs.insert(i, Interval(off, data))
            self.nbytes += len(data)
            return
        if len(touching) == 1 and touching[0].off <= off and end <= touching[0].end:
            touching[0].overwrite(off, data)
            return
        new_off = min(off, touching[0].off)
        new_end = max(end, touching[-1].end)
        buf = bytearray(new_end - new_off)
        for iv in touching:
            buf[iv.off - new_off : iv.end - new_off] = iv.buf
            self.nbytes -= len(iv)
        buf[off - new_off : end - new_off] = data
        ivs[i:j] = [Interval(new_off, buf, owned=True)]
        self.nbytes += len(buf)

    def truncate(self, size: int) -> None:
        keep: list[Interval] = []
        for iv in self.ivs:
            if iv.off >= size:
                self.nbytes -= len(iv)
                continue
            if iv.end > size:
                self.nbytes -= iv.end - size
                iv.truncate(size - iv.off)
            keep.append(iv)
        self.ivs = keep

    def take_all(self) -> list[Interval]:
        ivs, self.ivs, self.nbytes = self.ivs, [], 0
        return ivs

    def take_full_blocks(self, block_size: int) -> list[tuple[int, bytes]]:
        """Cut whole blocks (block_size bytes) from the front of large intervals, leaving
        at least one block in each: (offset, bytes) each, copied at most once."""
        out: list[tuple[int, bytes]] = []
        for iv in self.ivs:
            while len(iv) >= 2 * block_size:
                off = iv.off
                out.append((off, iv.take_front(block_size)))
                self.nbytes -= block_size
        return out

    def overlapping(self, start: int, end: int) -> list[Interval]:
        return [iv for iv in self.ivs if iv.off < end and iv.end > start]
