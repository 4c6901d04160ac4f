"""A lease mount across restarts and fencing (docs/design/LEASES.md §2, §9, §10): who
this mount is (the client id kept in the cache dir), the proof that the daemon that
used the cache dir last is gone, and the recovery of a fenced journal: what it made,
salvaged from the view before the rebuild, written under
`/.efsish-recovered/<client>-<UTC time>/` with JOURNAL.txt listing every fenced change.

This module owns those files and that salvage. It must not decide when to recover or
adopt (efsish.meta.leases does), hold state, or know POSIX rules beyond the modes and
owners it copies.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from efsish.meta import journal
from efsish.meta.ops import Extent, LRcv, Mk, Op, Write
from efsish.meta.planning import PlanContext, Planner
from efsish.meta.view import ROOT_INO, View

T = TypeVar("T")

RECOVERY_DIR = b".efsish-recovered"
JOURNAL_TXT_MAX = 512 * 1024  # bytes of JOURNAL.txt kept (inline in the log)

# ------------------------------------------------------------------ restarts (§2, §9)


def load_client_id(cache_dir: Path) -> str:
    """The client id kept in the cache dir (LEASES.md §2): a restarted daemon on the
    same cache dir is the same client. Created on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "client_id"
    try:
        cid = path.read_text().strip()
        if cid:
            return cid
    except FileNotFoundError:
        pass
    cid = uuid.uuid4().hex[:16]
    tmp = cache_dir / "client_id.tmp"
    tmp.write_text(cid + "\n")
    os.replace(tmp, path)
    return cid


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not reaped yet, does not)."""
    if pid <= 0:
        return False
    try:
        stat_ = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat_.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _daemon_file(cache_dir: Path) -> Path:
    return cache_dir / "daemon.json"


def old_daemon_dead(cache_dir: Path) -> bool:
    """The cache dir proves the daemon that used it last is gone: the same boot
    and its pid gone (or this process: an in-process restart), under the cache
    dir's lock (LEASES.md §9)."""
    try:
        d: dict[str, Any] = json.loads(_daemon_file(cache_dir).read_text())
    except (OSError, ValueError):
        return False
    pid = int(d.get("pid", 0))
    return d.get("boot_id") == _boot_id() and (pid == os.getpid() or not _pid_alive(pid))


def record_daemon(cache_dir: Path) -> None:
    """Record this daemon (boot and pid) in the cache dir, for the next one's proof."""
    path = _daemon_file(cache_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"boot_id": _boot_id(), "pid": os.getpid()}))
    os.replace(tmp, path)


# -------------------------------------------------------------------- salvage (§10)


@dataclass
class File:
    parts: tuple[bytes, ...]  # the path it had, under the recovery directory
    mode: int
    uid: int
    gid: int
    size: int
    extents: list[Extent]


@dataclass
class Salvage:
    inc: int  # the fenced incarnation
    files: list[File]
    journal: list[str]  # one line per fenced change


def path_of(view: View, ino: int) -> tuple[bytes, ...] | None:
    """The names from the root to `ino` (its first link); None if it is not linked."""
    parts: list[bytes] = []
    cur = ino
    for _ in range(10_000):
        if cur == ROOT_INO:
            return tuple(reversed(parts))
        row = view.db.execute(
            "SELECT parent, name FROM dentries WHERE ino = ? ORDER BY id LIMIT 1", (cur,)
        ).fetchone()
        if row is None:
            return None
        parts.append(bytes(row[1]))
        cur = int(row[0])
    return None


def salvage(view: View, inc: int, bad: set[str] | None = None) -> Salvage:
    """What the journal made, from the view that holds it (before the rebuild): the
    regular files it created or whose data it changed, as they are now, and its ops.
    Extents of `bad` blocks (staged blocks that failed their checksum) are left out:
    those bytes read as zeros, and JOURNAL.txt names them."""
    rows = journal.rows(view)
    lines: list[str] = []
    inos: dict[int, None] = {}
    for r in rows:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.t / 1e9))
        lines.append(f"{r.jseq} {when} {json.dumps(r.op.wire(), sort_keys=True)}")
        if (isinstance(r.op, Mk) and stat.S_ISREG(r.op.mode)) or isinstance(r.op, Write):
            inos[r.op.ino] = None
    files: list[File] = []
    for ino in inos:
        attr = view.getattr(ino)
        parts = path_of(view, ino) if attr is not None else None
        if attr is None or parts is None or not attr.is_reg:
            continue  # removed again by the journal itself
        exts = view.extents(ino)
        if bad:
            exts = [e for e in exts if e.key not in bad]
        files.append(File(parts, attr.mode, attr.uid, attr.gid, attr.size, exts))
    for key in sorted(bad or ()):
        lines.append(f"block {key} failed its checksum after a crash: left out (zeros)")
    return Salvage(inc, files, lines)


def _journal_file(s: Salvage) -> File:
    text = ("\n".join(s.journal) + "\n").encode()
    if len(text) > JOURNAL_TXT_MAX:
        text = text[: JOURNAL_TXT_MAX - 64] + b"\n[... truncated: see the daemon's log]\n"
    exts = [
        Extent(off, len(text[off : off + 16384]), data=text[off : off + 16384])
        for off in range(0, len(text), 16384)
    ]
    return File((b"JOURNAL.txt",), stat.S_IFREG | 0o600, 0, 0, len(text), exts)


class Submit(Protocol):
    """How the recovery's changes are committed (Leases.submit)."""

    async def __call__(self, planner: Planner[T], /) -> T: ...


async def write_recovery(submit: Submit, client: str, s: Salvage) -> str:
    """Write the recovery directory (LEASES.md §10): `lrcv` with the mkdir of
    `/.efsish-recovered/<client>-<UTC time>/` first (a sync entry: it ends the
    fencing), then every file the journal created or changed, at the path it had,
    with its owner and mode, and JOURNAL.txt listing every fenced change. Returns the
    directory's path."""
    inc = s.inc
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{client}-{stamp}".encode()
    path = f"/{RECOVERY_DIR.decode()}/{name.decode()}"
    now = time.time_ns()

    def top(view: View, pc: PlanContext) -> tuple[list[Op], int]:
        ino = view.lookup(ROOT_INO, RECOVERY_DIR)
        if ino is not None:
            return [], ino
        ino = pc.alloc_ino(view)
        return [Mk(ino, ROOT_INO, RECOVERY_DIR, stat.S_IFDIR | 0o711, 0, 0, now)], ino

    rdir = await submit(top)

    def mk_named(view: View, pc: PlanContext) -> tuple[list[Op], int]:
        ino = pc.alloc_ino(view)
        mk = Mk(ino, rdir, name, stat.S_IFDIR | 0o711, 0, 0, now)
        return [mk, LRcv(client, inc, path)], ino

    base = await submit(mk_named)
    dirs: dict[tuple[bytes, ...], int] = {(): base}

    async def ensure(parts: tuple[bytes, ...]) -> int:
        if parts in dirs:
            return dirs[parts]
        parent = await ensure(parts[:-1])

        def mkd(view: View, pc: PlanContext) -> tuple[list[Op], int]:
            found = view.lookup(parent, parts[-1])
            if found is not None:
                return [], found
            ino = pc.alloc_ino(view)
            return [Mk(ino, parent, parts[-1], stat.S_IFDIR | 0o711, 0, 0, now)], ino

        dirs[parts] = await submit(mkd)
        return dirs[parts]

    for f in [*s.files, _journal_file(s)]:
        parent = await ensure(f.parts[:-1])

        def mkf(
            view: View, pc: PlanContext, f: File = f, parent: int = parent
        ) -> tuple[list[Op], None]:
            if view.lookup(parent, f.parts[-1]) is not None:
                return [], None
            ino = pc.alloc_ino(view)
            ops: list[Op] = [Mk(ino, parent, f.parts[-1], f.mode, f.uid, f.gid, now)]
            if f.extents:
                ops.append(Write(ino, tuple(f.extents), f.size, now))
            return ops, None

        await submit(mkf)
    return path
