"""Write-back buffer for one file on one mount: dirty byte ranges not yet uploaded.

Intervals are kept sorted and non-overlapping; appends extend the last interval in place
(amortised O(1)), overwrites inside an interval are slice assignments, and only truly
overlapping writes merge. This module is pure data structure: no I/O, no trio.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class Interval:
    off: int
    buf: bytearray

    @property
    def end(self) -> int:
        return self.off + len(self.buf)


class DirtyBuffer:
    """Sorted, non-overlapping dirty intervals of a file."""

    def __init__(self) -> None:
        self.ivs: list[Interval] = []
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self.ivs)

    def _starts(self) -> list[int]:
        return [iv.off for iv in self.ivs]

    def write(self, off: int, data: bytes) -> None:
        if not data:
            return
        end = off + len(data)
        ivs = self.ivs
        # Fast path: append to, or overwrite within, the last interval.
        if ivs:
            last = ivs[-1]
            if last.off <= off <= last.end:
                if end >= last.end:
                    inside = last.end - off
                    last.buf[off - last.off :] = data[:inside]
                    last.buf += data[inside:]
                    self.nbytes += end - (off + inside)
                else:
                    last.buf[off - last.off : end - last.off] = data
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
            ivs.insert(i, Interval(off, bytearray(data)))
            self.nbytes += len(data)
            return
        new_off = min(off, touching[0].off)
        new_end = max(end, touching[-1].end)
        buf = bytearray(new_end - new_off)
        for iv in touching:
            buf[iv.off - new_off : iv.end - new_off] = iv.buf
            self.nbytes -= len(iv.buf)
        buf[off - new_off : end - new_off] = data
        ivs[i:j] = [Interval(new_off, buf)]
        self.nbytes += len(buf)

    def truncate(self, size: int) -> None:
        keep: list[Interval] = []
        for iv in self.ivs:
            if iv.off >= size:
                self.nbytes -= len(iv.buf)
                continue
            if iv.end > size:
                self.nbytes -= iv.end - size
                del iv.buf[size - iv.off :]
            keep.append(iv)
        self.ivs = keep

    def take_all(self) -> list[Interval]:
        ivs, self.ivs, self.nbytes = self.ivs, [], 0
        return ivs

    def take_full_blocks(self, block_size: int) -> list[tuple[int, bytes]]:
        """Cut whole blocks (block_size bytes) from the front of large intervals: (offset,
        bytes) each, copied once out of the buffer (deleting from the front of a
        bytearray moves no bytes)."""
        out: list[tuple[int, bytes]] = []
        for iv in self.ivs:
            while len(iv.buf) >= 2 * block_size:
                with memoryview(iv.buf) as view:
                    out.append((iv.off, bytes(view[:block_size])))
                del iv.buf[:block_size]
                iv.off += block_size
                self.nbytes -= block_size
        return out

    def overlapping(self, start: int, end: int) -> list[Interval]:
        return [iv for iv in self.ivs if iv.off < end and iv.end > start]
