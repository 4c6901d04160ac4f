"""Fill a directory of a mounted filesystem from another client, without FUSE.

`python -m tests.fuse.filler STORE DIR N PREFIX CACHE_DIR [KEY_FILE]` opens STORE (an
encrypted one with the key in KEY_FILE) in-process as a second client (its own cache dir
and client id), creates N empty files named by `entry_names` (the names
tests.fuse.test_posix._fill_dir creates through FUSE) in DIR, a path from the
filesystem's root, with 64 creates in flight, so group commit puts many creates in each
log entry, and exits.

For tests of large directories whose subject is listing them through a mount, not
creating them: through FUSE the kernel serialises creates in one directory, and 20,000
of them take minutes. A mount sees these entries as it sees any other client's. This
module must only be used by tests."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import trio

from efsish.filesystem import Ctx, Filesystem, Options
from efsish.meta.superblock import load_superblock
from efsish.meta.view import ROOT_INO
from efsish.store import StoreOptions, open_store
from efsish.store.crypt import load_keyring

ROOT = Ctx(0, 0)
IN_FLIGHT = 64


def entry_names(n: int, prefix: str) -> list[str]:
    return [f"{prefix}-{i:06d}-{'x' * (i % 40)}" for i in range(n)]


async def fill(
    store_url: str, directory: str, names: list[str], cache_dir: Path, key_file: str | None
) -> None:
    opts = StoreOptions(keyring=load_keyring(key_file))
    async with open_store(store_url, opts) as store:
        sb = await load_superblock(store)
        fs = Filesystem(store, sb, Options(cache_dir=cache_dir, poll_interval=3600))
        async with trio.open_nursery() as nursery:
            await fs.start(nursery)
            ino = ROOT_INO
            for part in Path(directory).parts:
                ino = (await fs.lookup(ino, part.encode())).ino
            todo = iter(names)

            async def worker() -> None:
                for name in todo:
                    await fs.mknod(ino, name.encode(), stat.S_IFREG | 0o644, ROOT)

            async with trio.open_nursery() as workers:
                for _ in range(IN_FLIGHT):
                    workers.start_soon(worker)
            await fs.shutdown()
            nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    store_url, directory, n, prefix, cache, *key_file = argv
    names = entry_names(int(n), prefix)
    trio.run(fill, store_url, directory, names, Path(cache), key_file[0] if key_file else None)


if __name__ == "__main__":
    main(sys.argv[1:])
