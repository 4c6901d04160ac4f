"""What a change costs the daemon under a held lease (issue 20: metadata at local speed):
worker-thread hops per change, counted in process. A hop (trio.to_thread) is the
largest part of the CPU a journaled change costs, so the counts are pinned here."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import trio

from efsish.filesystem import Filesystem
from efsish.meta.view import ROOT_INO
from tests.fs.conftest import FsFactory
from tests.fs.helpers import ROOT


class Hops:
    """Counts the worker-thread hops (trio.to_thread.run_sync) by the function run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by: Counter[str] = Counter()
        real = trio.to_thread.run_sync

        async def counted(fn: Any, *args: Any, **kw: Any) -> Any:
            self.by[getattr(fn, "__qualname__", repr(fn))] += 1
            return await real(fn, *args, **kw)

        monkeypatch.setattr(trio.to_thread, "run_sync", counted)

    def take(self) -> Counter[str]:
        out, self.by = self.by, Counter()
        return out


async def create(fs: Filesystem, d: int, name: bytes) -> int:
    fh, attr = await fs.create(d, name, 0o644, os.O_WRONLY, ROOT)
    await fs.write(fh, 0, b"x" * 100)
    await fs.release(fh)
    return attr.ino


async def test_a_journaled_create_or_unlink_costs_one_hop_per_commit(
    make_fs: FsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a held lease, the kernel's lookup before an unlink and the lease domains
    of the directory and of a new file come from memory: an unlink is one hop (its
    journaled commit), a create+write+close two (the create, the layout at close)."""
    fs = await make_fs(commit_interval=3600)
    d = (await fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)).ino
    for i in range(3):  # takes the lease, walks the tree
        await create(fs, d, b"w%d" % i)
    assert fs.leases is not None and d in fs.leases.state.held
    hops = Hops(monkeypatch)
    for i in range(10):
        await create(fs, d, b"f%d" % i)
    assert hops.take() == {"MetaLog._plan_local": 20}
    for i in range(10):
        await fs.lookup(d, b"f%d" % i)
        await fs.unlink(d, b"f%d" % i)
    assert hops.take() == {"MetaLog._plan_local": 10}
    assert fs.meta.journal_rows > 0  # all of it journaled, none of it committed yet
