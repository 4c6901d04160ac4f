"""Helpers for the real-mount tests: libc calls Python lacks, running code as another
user, and snapshots of a directory tree for comparing a mount with local disk."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import pickle
import stat
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def renameat2(old: str | Path, new: str | Path, flags: int) -> None:
    """renameat2(AT_FDCWD, old, AT_FDCWD, new, flags); raises OSError like os.rename."""
    f = _libc.renameat2
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if f(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old), None, str(new))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str | Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(AT_FDCWD, path, [atime, mtime], 0) with (sec, nsec) pairs, so that
    UTIME_NOW / UTIME_OMIT can be passed as nsec."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    f = _libc.utimensat
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
    if f(AT_FDCWD, os.fsencode(path), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def run_as(
    uid: int,
    gid: int,
    fn: Callable[..., Any],
    *args: Any,
    cwd: str | Path | None = None,
    umask: int = 0o022,
    groups: list[int] | None = None,
) -> Any:
    """Run fn(*args) in a forked child with the given credentials; return its result.
    An OSError raised in the child is re-raised here (with its errno). cwd is entered
    while still root, so relative paths work even when the parents of the mountpoint are
    not searchable by the user."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            if cwd is not None:
                os.chdir(cwd)
            os.setgroups(groups or [])
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            try:
                out: tuple[str, Any] = ("ok", fn(*args))
            except OSError as e:
                out = ("oserror", (e.errno, e.strerror, e.filename))
            except BaseException as e:
                out = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    assert raw, f"child exited without a result (status {status})"
    kind, val = pickle.loads(raw)
    if kind == "ok":
        return val
    if kind == "oserror":
        raise OSError(val[0], val[1], val[2])
    raise AssertionError(f"child failed: {val}")


def expect_errno(err: int | tuple[int, ...], fn: Callable[..., Any], *args: Any) -> OSError:
    """Call fn(*args) and assert it fails with one of the given errnos."""
    errs = (err,) if isinstance(err, int) else err
    try:
        fn(*args)
    except OSError as e:
        assert e.errno in errs, (
            f"{getattr(fn, '__name__', fn)}{args}: expected "
            f"{[errno.errorcode[x] for x in errs]}, got {errno.errorcode.get(e.errno or 0)} ({e})"
        )
        return e
    raise AssertionError(
        f"{getattr(fn, '__name__', fn)}{args}: expected "
        f"{[errno.errorcode[x] for x in errs]}, but it succeeded"
    )


def poll(cond: Callable[[], Any], timeout: float = 3.0, interval: float = 0.05) -> Any:
    """Poll cond() until truthy or timeout; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xattrs(p: Path) -> dict[str, bytes]:
    """user.* extended attributes of p (not following symlinks)."""
    out = {}
    for name in os.listxattr(p, follow_symlinks=False):
        if name.startswith("user."):
            out[name] = os.getxattr(p, name, follow_symlinks=False)
    return out


def snapshot(
    root: Path, *, times: bool = True, owners: bool = True, with_xattrs: bool = True
) -> dict[str, dict[str, Any]]:
    """Everything observable about the tree under root, keyed by relative path: type,
    permission bits, size, content digest, symlink target, hard-link group (the first
    path of each inode, in sorted order), nlink, mtime, owner and user xattrs."""
    out: dict[str, dict[str, Any]] = {}
    first_path: dict[int, str] = {}
    paths = sorted(
        [root, *(Path(dp) / n for dp, dns, fns in os.walk(root) for n in dns + fns)],
        key=lambda p: str(p.relative_to(root)),
    )
    for p in paths:
        rel = str(p.relative_to(root))
        st = os.lstat(p)
        e: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "perm": stat.S_IMODE(st.st_mode)}
        if stat.S_ISREG(st.st_mode):
            e["size"] = st.st_size
            e["digest"] = file_digest(p)
            e["nlink"] = st.st_nlink
            e["linkgroup"] = first_path.setdefault(st.st_ino, rel)
        elif stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
            e["size"] = st.st_size
        elif stat.S_ISDIR(st.st_mode):
            e["nlink"] = st.st_nlink
            e["entries"] = sorted(os.listdir(p))
        if times and rel != ".":
            e["mtime_ns"] = st.st_mtime_ns
        if owners:
            e["owner"] = (st.st_uid, st.st_gid)
        if with_xattrs and not stat.S_ISLNK(st.st_mode):
            e["xattrs"] = xattrs(p)
        out[rel] = e
    return out


def assert_same_tree(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    """Compare two snapshots with a readable message listing every difference."""
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            diffs.append(f"only in second: {k}")
        elif k not in b:
            diffs.append(f"only in first: {k}")
        else:
            for f in sorted(set(a[k]) | set(b[k])):
                if a[k].get(f) != b[k].get(f):
                    diffs.append(f"{k}: {f}: {a[k].get(f)!r} != {b[k].get(f)!r}")
    assert not diffs, "trees differ:\n" + "\n".join(diffs[:50])
