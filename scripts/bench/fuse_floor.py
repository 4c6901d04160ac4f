"""The FUSE floor for scripts/bench/bigdir: a minimal pyfuse3 + trio filesystem (the
stack efsish runs on) that holds one directory `home/big` of N empty files in a dict and
answers every request from memory, with the kernel timeouts efsish uses (1 s).

    python fuse_floor.py MOUNTPOINT N     # serves until unmounted (fusermount3 -u)
"""

from __future__ import annotations

import errno
import stat
import sys
import time
from typing import Any

import pyfuse3
import trio

ROOT, HOME, BIG, FIRST = 1, 2, 3, 10


class Floor(pyfuse3.Operations):
    enable_acl = True  # as efsish: ls asks for system.posix_acl_access

    def __init__(self, n: int) -> None:
        super().__init__()
        self.names = {ROOT: {b"home": HOME}, HOME: {b"big": BIG}, BIG: {}}
        for i in range(n):
            self.names[BIG][b"file-%07d" % i] = FIRST + i
        self.order = {BIG: sorted(self.names[BIG].items(), key=lambda kv: kv[1])}
        self.t = time.time_ns()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = 1.0
        e.st_mode = (stat.S_IFDIR | 0o755) if ino in self.names else (stat.S_IFREG | 0o644)
        e.st_nlink = 2 if ino in self.names else 1
        e.st_blksize = 128 * 1024
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.t
        return e

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        ino = self.names.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attr(inode)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self.order.get(fh) or sorted(self.names[fh].items(), key=lambda kv: kv[1])
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def forget(self, inode_list: Any) -> None:
        pass


def main() -> None:
    mp, n = sys.argv[1], int(sys.argv[2])
    opts = set(pyfuse3.default_options)
    opts.add("fsname=fusefloor")
    pyfuse3.init(Floor(n), mp, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
