"""Filesystems must not nest: format refuses a prefix inside or above another filesystem
(each one's gc would take the other's objects for garbage), and mount says what a prefix
without a filesystem holds and what to do."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from efsish.errors import EfsishError
from efsish.meta.superblock import (
    AlreadyFormatted,
    NotFormatted,
    format_fs,
    load_superblock,
)
from efsish.store import ObjectStore, StoreOptions, open_store
from efsish.store.local import LocalStore
from efsish.store.memory import MemoryStore

At = Callable[[str], ObjectStore]


@pytest.fixture(params=["memory", "file", "s3"])
def at(request: pytest.FixtureRequest, tmp_path: Path) -> At:
    """at(REL) -> the store at prefix REL of one fresh bucket (memory, moto S3) or
    directory tree (file)."""
    name = f"nest-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        return lambda rel: MemoryStore(f"{name}/{rel}".rstrip("/"))
    if request.param == "file":
        return lambda rel: LocalStore(tmp_path / rel, create=True)
    target = request.getfixturevalue("moto_target")
    prefix = f"s3://{target.bucket}/{name}"
    return lambda rel: open_store(f"{prefix}/{rel}".rstrip("/"), StoreOptions(target.endpoint))


async def keys(store: ObjectStore) -> list[str]:
    return [i.key async for i in store.list("")]


async def test_format_refuses_a_prefix_inside_or_above_a_filesystem(at: At) -> None:
    home = at("home")
    await format_fs(home)
    for rel in ("home/data/x", "home/data", "home/sub", "home/a/b/c"):
        inner = at(rel)
        with pytest.raises(AlreadyFormatted) as e:
            await format_fs(inner)
        assert f"inside the efsish filesystem {home.url}:" in str(e.value)
        assert await keys(inner) == []  # nothing was written there
    # Above it: the prefix is not empty, and the message names the filesystem below.
    with pytest.raises(EfsishError, match=r"encloses the efsish (filesystem|store) .*home"):
        await format_fs(at(""))
    # Next to it (a name that merely starts with the same letters is not inside).
    for rel in ("home2", "homework/x"):
        await format_fs(at(rel))
    assert (await load_superblock(home)).block_size == 4 * 1024 * 1024


async def test_mount_says_what_a_prefix_without_a_filesystem_holds(at: At) -> None:
    home = at("home")
    await format_fs(home)
    with pytest.raises(NotFormatted, match=f"inside the efsish filesystem {re.escape(home.url)};"):
        await load_superblock(at("home/data"))
    photos = at("photos")
    await photos.put("b.jpg", b"...")
    await photos.put("a.jpg", b"...")
    with pytest.raises(NotFormatted) as e:
        await load_superblock(photos)
    msg = str(e.value)
    assert "holds 2 object(s) (e.g. 'a.jpg') but no efsish filesystem" in msg, msg
    assert "choose an empty prefix" in msg and "remove those objects" in msg
    with pytest.raises(NotFormatted, match="run `efsish format"):
        await load_superblock(at("empty"))
