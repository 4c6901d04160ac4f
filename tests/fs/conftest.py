"""In-process filesystem fixtures: Filesystem objects on a shared memory:// store, their
background tasks in the test's nursery (cancelled at teardown)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from efsish.filesystem import Filesystem, Options
from efsish.meta import inodes
from efsish.meta.superblock import Superblock, format_fs
from efsish.store import ObjectStore
from efsish.store.crypt import CryptStore, Keyring, superblock_info
from efsish.store.memory import MemoryStore

TEST_KEYS = Keyring((bytes(range(32)),), "the tests' key")


@pytest.fixture
def encrypted() -> bool:
    """Whether `store` encrypts (store/crypt.py, format 4): no, or, where a module
    overrides this fixture with `params=[False, True]`, both."""
    return False


@pytest.fixture
async def store(encrypted: bool) -> ObjectStore:
    raw = MemoryStore(f"fs-{uuid.uuid4().hex}")
    return CryptStore(raw, TEST_KEYS) if encrypted else raw


@pytest.fixture
def leases() -> bool:
    """The filesystem's format: a lease one (format 3, the default) or, where a test
    overrides this fixture with False, format 2 (every change committed on its own)."""
    return True


@pytest.fixture
async def sb(store: ObjectStore, leases: bool) -> Superblock:
    enc = superblock_info(store.keyring) if isinstance(store, CryptStore) else None
    return await format_fs(store, block_size=64 * 1024, leases=leases, encryption=enc)


FsFactory = Callable[..., Awaitable[Filesystem]]


@pytest.fixture
def make_fs(nursery, tmp_path: Path, store: ObjectStore, sb: Superblock) -> FsFactory:
    counter = [0]

    async def make(
        on: ObjectStore | None = None, sb: Superblock = sb, **opts: object
    ) -> Filesystem:
        counter[0] += 1
        opts.setdefault("cache_dir", tmp_path / f"cache{counter[0]}")
        opts.setdefault("poll_interval", 3600)
        o = Options(**opts)  # type: ignore[arg-type]
        fs = Filesystem(on or store, sb, o)
        await fs.start(nursery)
        return fs

    return make


@pytest.fixture
async def fs(make_fs: FsFactory) -> Filesystem:
    return await make_fs()


@pytest.fixture
def small_inode_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inode ranges of 4 numbers, doubling up to 32 (efsish.meta.inodes), for the model
    tests: claims, inline and ahead, come every few creates, under faults, pauses and
    kills, not once in 1,024."""
    monkeypatch.setattr(inodes, "INO_RANGE", 4)
    monkeypatch.setattr(inodes, "INO_RANGE_MAX", 32)
