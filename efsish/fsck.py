"""`efsish fsck STORE`: rebuild the metadata from the bucket and check every invariant.

It replays the newest checkpoint and the whole log tail into a scratch view (never the
cache of a live mount), then checks the namespace (every entry points to an inode, link
counts, every directory reachable from the root exactly once), file layouts, and that
every referenced block exists with the right size (and, with --verify-data, checksum).
It only reads; it must never modify the store.
"""

from __future__ import annotations

import logging
import stat
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import trio
from tqdm import tqdm

from efsish.codec import block_matches, chunks_match
from efsish.data.blocks import DATA_PREFIX
from efsish.errors import CorruptObject, EfsishError, NotFound
from efsish.meta import accesspoints, heartbeat, nudge
from efsish.meta.keys import CKPT_PREFIX, LOG_PREFIX
from efsish.meta.log import MetaLog
from efsish.meta.superblock import SUPERBLOCK_KEY, load_superblock
from efsish.meta.view import ROOT_INO, View
from efsish.store import ObjectStore

# A referenced block: its size, checksum and chunk checksums (codec.chunk_crcs).
Block = tuple[int, str | None, str | None]

log = logging.getLogger(__name__)

KNOWN_PREFIXES = (
    LOG_PREFIX,
    CKPT_PREFIX,
    DATA_PREFIX,
    heartbeat.PREFIX,
    nudge.PREFIX,
    accesspoints.PREFIX,
    "throttle/",
    ".efsish-probe/",
)


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


def check_namespace(view: View, rep: Report) -> dict[str, Block]:
    """Check the tables; return the referenced blocks {key: (size, hash)}."""
    db = view.db
    inodes = {r[0]: (r[1], r[2]) for r in db.execute("SELECT ino, mode, nlink FROM inodes")}
    children: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
    refs: dict[int, int] = defaultdict(int)
    for parent, name, ino in db.execute("SELECT parent, name, ino FROM dentries"):
        children[parent].append((bytes(name), ino))
        refs[ino] += 1
        if ino not in inodes:
            rep.error(f"entry {bytes(name)!r} in directory {parent} points to missing inode {ino}")
        if parent not in inodes:
            rep.error(f"entry {bytes(name)!r} lives in missing directory {parent}")
        elif not stat.S_ISDIR(inodes[parent][0]):
            rep.error(f"entry {bytes(name)!r} lives in non-directory {parent}")
        if len(bytes(name)) > 255 or b"/" in bytes(name) or not name:
            rep.error(f"invalid name {bytes(name)!r} in directory {parent}")
    if ROOT_INO not in inodes or not stat.S_ISDIR(inodes[ROOT_INO][0]):
        rep.error("the root directory is missing")
    for ino, (mode, nlink) in inodes.items():
        if stat.S_ISDIR(mode):
            subdirs = sum(
                1 for _, c in children.get(ino, []) if c in inodes and stat.S_ISDIR(inodes[c][0])
            )
            want = 2 + subdirs
            if ino != ROOT_INO and refs[ino] != 1:
                rep.error(f"directory {ino} has {refs[ino]} names (must be exactly 1)")
        else:
            want = refs[ino]
        if ino != ROOT_INO and refs[ino] == 0:
            rep.error(f"inode {ino} has no name (orphan)")
        if nlink != want:
            rep.error(f"inode {ino} has nlink {nlink}, expected {want}")
    # Reachability: every directory exactly once from the root; detects cycles.
    seen = {ROOT_INO}
    stack = [ROOT_INO]
    while stack:
        d = stack.pop()
        for _, c in children.get(d, []):
            if c in inodes and stat.S_ISDIR(inodes[c][0]):
                if c in seen:
                    rep.error(f"directory {c} is reachable twice (cycle or extra link)")
                    continue
                seen.add(c)
                stack.append(c)
    unreachable = [i for i, (m, _) in inodes.items() if stat.S_ISDIR(m) and i not in seen]
    for d in unreachable:
        rep.error(f"directory {d} is not reachable from the root (cycle?)")
    # Layouts.
    blocks: dict[str, Block] = {}
    sizes = {r[0]: r[1] for r in db.execute("SELECT ino, size FROM inodes")}
    prev: dict[int, int] = {}
    for ino, off, ln, key, koff, bsize, h, data, crcs in db.execute(
        "SELECT ino, off, len, key, koff, bsize, hash, data, crcs FROM extents ORDER BY ino, off"
    ):
        if ino not in inodes:
            rep.error(f"layout of missing inode {ino}")
            continue
        if ln <= 0:
            rep.error(f"inode {ino}: empty extent at {off}")
        if prev.get(ino, 0) > off:
            rep.error(f"inode {ino}: overlapping extents at {off}")
        prev[ino] = off + ln
        if off + ln > sizes.get(ino, 0):
            rep.warn(f"inode {ino}: extent at {off} extends past the file size (ignored)")
        if key is None:
            if data is None or len(data) != ln:
                rep.error(f"inode {ino}: inline extent at {off} has the wrong length")
        else:
            if koff < 0 or koff + ln > bsize:
                rep.error(f"inode {ino}: extent at {off} points outside block {key}")
            old = blocks.get(key)
            if old is not None and (old[:2] != (bsize, h) or (crcs and old[2] and crcs != old[2])):
                rep.error(f"block {key} is referenced with different sizes/checksums")
            blocks[key] = (bsize, h, crcs or (old[2] if old else None))
    rep.stats.update(inodes=len(inodes), entries=sum(refs.values()), blocks=len(blocks))
    return blocks


async def run_fsck(
    store: ObjectStore,
    *,
    verify_data: bool = False,
    progress: bool = True,
    out: TextIO | None = None,
) -> int:
    stream = out or sys.stdout
    rep = Report()
    sb = await load_superblock(store)
    with tempfile.TemporaryDirectory(prefix="efsish-fsck-") as tmp:
        meta = MetaLog(store, sb, Path(tmp) / "fsck.db", client_id="fsck")
        try:
            await meta.open()
        except EfsishError as e:
            rep.error(f"metadata log cannot be replayed: {e}")
            # Still report what else is in the prefix (foreign objects...).
            await _check_objects(store, None, rep, False, progress)
        else:
            rep.stats["log_head"] = meta.applied_seq
            blocks = await trio.to_thread.run_sync(check_namespace, meta.reader, rep)
            await _check_objects(store, blocks, rep, verify_data, progress)
        finally:
            try:
                await meta.aclose()
            except Exception:
                pass
    for w in rep.warnings:
        print(f"warning: {w}", file=stream)
    for err in rep.errors:
        print(f"error: {err}", file=stream)
    summary = ", ".join(f"{k} {v}" for k, v in rep.stats.items())
    if rep.errors:
        print(f"fsck: {len(rep.errors)} error(s) in {store.url} ({summary})", file=stream)
        return 1
    print(f"fsck: {store.url} is clean ({summary})", file=stream)
    return 0


async def _check_objects(
    store: ObjectStore,
    blocks: dict[str, Block] | None,
    rep: Report,
    verify_data: bool,
    progress: bool,
) -> None:
    present: dict[str, int] = {}
    async for info in store.list(""):
        if info.key == SUPERBLOCK_KEY:
            continue
        if info.key.startswith(DATA_PREFIX):
            present[info.key] = info.size
        elif info.key.startswith(LOG_PREFIX) or info.key.startswith(CKPT_PREFIX):
            tail = info.key.rsplit("/", 1)[1]
            if not tail.isdigit() or len(tail) != 16:
                rep.warn(f"foreign object {info.key!r} in the log/checkpoint area")
        elif info.key.startswith(accesspoints.PREFIX):
            try:
                accesspoints.decode(await store.get(info.key), info.key)
            except CorruptObject as e:
                rep.error(f"{e} (delete it with `efsish access-point delete`, or the object)")
        elif not info.key.startswith(KNOWN_PREFIXES):
            rep.warn(f"foreign object {info.key!r} (not written by efsish)")
    if blocks is None:  # the metadata could not be rebuilt: nothing to compare with
        rep.stats["objects"] = len(present)
        return
    bar = tqdm(
        total=len(blocks),
        desc="checking blocks",
        unit="blk",
        disable=not progress or not sys.stderr.isatty(),
    )
    limiter = trio.CapacityLimiter(16)

    async def check(key: str, size: int, h: str | None, crcs: str | None) -> None:
        async with limiter:
            if key not in present:
                rep.error(f"block {key} is missing from the store")
            elif present[key] != size:
                rep.error(f"block {key} has {present[key]} bytes, expected {size}")
            elif verify_data:
                try:
                    data = await store.get(key)
                except NotFound:
                    rep.error(f"block {key} vanished during the check")
                except CorruptObject as e:  # an encrypted block that fails authentication
                    rep.error(f"block {key} is corrupt: {e}")
                else:
                    if h is not None and not block_matches(data, h):
                        rep.error(f"block {key} fails its checksum (corrupt)")
                    elif crcs and not chunks_match(data, crcs, 0):
                        rep.error(f"block {key} does not match its chunk checksums")
        bar.update(1)

    async with trio.open_nursery() as n:
        for key, (size, h, crcs) in blocks.items():
            n.start_soon(check, key, size, h, crcs)
    bar.close()
    unref = len(set(present) - set(blocks))
    if unref:
        rep.warn(f"{unref} unreferenced block(s) (garbage; removed by `efsish gc`)")
    rep.stats["objects"] = len(present)
