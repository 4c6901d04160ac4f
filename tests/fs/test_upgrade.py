"""`efsish upgrade` (efsish.upgrade, LEASES.md §14): a format-2 filesystem becomes a
lease one in place; mounts of an efsish that does not know format 3 stop it; a
format-2 mount still running when it lands makes no more changes; an efsish that knows
only format 2 refuses the result."""

from __future__ import annotations

import errno
import io
import os
import time
import uuid

import pytest
import trio

from efsish import codec
from efsish.errors import EfsishError, FsError
from efsish.meta import heartbeat, superblock
from efsish.meta.keys import LOG_PREFIX
from efsish.meta.ops import LogEntry
from efsish.meta.superblock import format_fs, load_superblock
from efsish.meta.view import ROOT_INO
from efsish.store import ObjectStore
from efsish.store.memory import MemoryStore
from efsish.upgrade import CLAIM_KEY, UpgradeRefused, upgrade_fs
from tests.fs.conftest import FsFactory
from tests.fs.helpers import ROOT, fsck, read_file, write_file


@pytest.fixture
def leases() -> bool:
    return False  # the filesystem to upgrade: format 2


async def entries(store: ObjectStore) -> list[LogEntry]:
    out = []
    async for info in store.list(LOG_PREFIX):
        out.append(LogEntry.unwire(codec.decode_json(b"L", await store.get(info.key))))
    return out


async def test_upgrade_in_place_stops_a_format_2_mount_and_serves_leases(
    store: ObjectStore, make_fs: FsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_fs()  # format 2, running while the upgrade lands
    assert a.leases is None
    home = (await a.mkdir(ROOT_INO, b"home", 0o755, ROOT)).ino
    ino = await write_file(a, home, b"before", b"format 2")
    await a.write_heartbeat()  # this efsish knows format 3: no refusal
    out = io.StringIO()
    sb = await upgrade_fs(store, settle=0, out=out)
    assert "upgraded" in out.getvalue() and "remount them" in out.getvalue()
    assert sb.leases and (await load_superblock(store)).format_version == 3
    assert [e.ops[0].wire()["o"] for e in await entries(store)][-1] == "fmt"
    with pytest.raises(Exception, match="upgrade-3"):
        await store.get(CLAIM_KEY)  # the claim is gone
    # A, behind the fmt entry, loses the race for its position, catches up, and then
    # refuses the change: the entry it would write is fenced on every mount.
    n = len(await entries(store))
    with pytest.raises(FsError) as e:
        await write_file(a, home, b"after", b"never")
    assert e.value.errno == errno.EROFS
    assert "upgraded to format 3 (leases)" in str(e.value)
    assert len(await entries(store)) == n
    assert await read_file(a, ino) == b"format 2"  # it still reads
    # A new mount runs the lease protocol on the same tree.
    b = await make_fs(sb=sb)
    assert b.leases is not None
    assert await read_file(b, (await b.lookup(home, b"before")).ino) == b"format 2"
    await write_file(b, home, b"leased", b"format 3")
    await b.fsyncdir()
    assert b.leases.state.held
    # Upgrading again changes nothing.
    out = io.StringIO()
    assert (await upgrade_fs(store, settle=0, out=out)).format_version == 3
    assert "already at format 3" in out.getvalue()
    code, report = await fsck(store)
    assert code == 0, report
    # An efsish that knows only format 2 refuses it with a clear message.
    monkeypatch.setattr(superblock, "NEWEST_FORMAT", 2)
    with pytest.raises(EfsishError, match="formatted by a newer efsish \\(format 3\\); upgrade"):
        await load_superblock(store)


async def test_upgrade_refuses_while_an_older_efsish_is_mounted() -> None:
    store = MemoryStore(f"up-{uuid.uuid4().hex}")
    await format_fs(store, block_size=64 * 1024, leases=False)
    # A heartbeat as an efsish from before formats were in heartbeats writes it.
    old = heartbeat.Heartbeat("old1", time.time_ns(), host="h1", mountpoint="/home")
    await heartbeat.write(store, old)
    with pytest.raises(UpgradeRefused, match="1 live mount\\(s\\) run an efsish that does not"):
        await upgrade_fs(store, settle=0, out=io.StringIO())
    assert (await load_superblock(store)).format_version == 2
    assert not [e async for e in store.list(LOG_PREFIX)]
    # --force upgrades anyway.
    sb = await upgrade_fs(store, settle=0, force=True, out=io.StringIO())
    assert sb.format_version == 3 and (await load_superblock(store)).leases


async def test_an_older_mount_that_appears_meanwhile_puts_the_superblock_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryStore(f"up-{uuid.uuid4().hex}")
    await format_fs(store, block_size=64 * 1024, leases=False)

    async def sleep(_: float) -> None:  # an old efsish mounts during the settle time
        await heartbeat.write(store, heartbeat.Heartbeat("old2", time.time_ns()))

    monkeypatch.setattr(trio, "sleep", sleep)
    with pytest.raises(UpgradeRefused):
        await upgrade_fs(store, out=io.StringIO())
    assert (await load_superblock(store)).format_version == 2
    with pytest.raises(Exception, match="upgrade-3"):
        await store.get(CLAIM_KEY)
    assert not [e async for e in store.list(LOG_PREFIX)]


async def test_an_interrupted_upgrade_is_resumed(store: ObjectStore, make_fs: FsFactory) -> None:
    """A claim left by an upgrade that stopped after rewriting the superblock: the next
    run finishes it (fmt committed once), with the claim's parameters."""
    sb2 = await load_superblock(store)
    await upgrade_fs(store, settle=0, lease_depth=2, out=io.StringIO())
    # Simulate the stop: the claim back, the fmt entry not written yet.
    fmt_keys = [i.key async for i in store.list(LOG_PREFIX)]
    await store.delete(fmt_keys[-1])
    from dataclasses import asdict

    new = await load_superblock(store)
    await store.put(CLAIM_KEY, codec.encode_json(b"S", {"old": asdict(sb2), "new": asdict(new)}))
    out = io.StringIO()
    sb = await upgrade_fs(store, settle=0, out=out)
    assert "resuming" in out.getvalue() and sb.lease_depth == 2
    assert [e.ops[0].wire()["o"] for e in await entries(store)].count("fmt") == 1
    fs = await make_fs(sb=sb)
    d = (await fs.mkdir(ROOT_INO, b"a", 0o755, ROOT)).ino
    await write_file(fs, d, b"f", os.urandom(10))
    await fs.fsyncdir()
    code, report = await fsck(store)
    assert code == 0, report
