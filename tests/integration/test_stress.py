"""Randomised, seeded stress test: several mounts of one filesystem on the real S3
server run mixed operations at once; the final tree, seen from every mount, must equal
a model, and fsck must be clean.

Each mount works in its own subtree (so the model is exact) and, between rounds, all
mounts contend for the same names (exactly one create wins; renames into one target;
mkdir -p of one path), which the model also predicts. It runs on a lease (format-3, the
default) filesystem with ROUNDS rounds and on a format-2 one with half of them, to keep
the suite's time."""

from __future__ import annotations

import errno
import os
import random
import threading
import uuid
from pathlib import Path

import pytest

from tests.fuse.conftest import efsish, format_args

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

MOUNTS = 3
ROUNDS = 4
OPS_PER_ROUND = 40


@pytest.fixture(params=[2, 3], ids=["format2", "format3"])
def fs_format(request: pytest.FixtureRequest) -> int:
    """Every test here runs on a format-2 and on a lease (format-3) filesystem."""
    return int(request.param)


def random_ops(rng: random.Random, root: Path, model: dict[str, bytes | None], n: int) -> None:
    """Apply n random operations under root, mirrored into model (path -> data, None=dir)."""
    for _ in range(n):
        files = [p for p, v in model.items() if v is not None]
        dirs = [""] + [p for p, v in model.items() if v is None]
        op = rng.choice(
            [
                "create",
                "create",
                "write",
                "append",
                "mkdir",
                "rename",
                "unlink",
                "rmdir",
                "truncate",
            ]
        )
        if op in ("create", "mkdir"):
            parent = rng.choice(dirs)
            name = f"{op[0]}{rng.randrange(10**6)}"
            rel = f"{parent}/{name}" if parent else name
            if rel in model:
                continue
            if op == "mkdir":
                (root / rel).mkdir()
                model[rel] = None
            else:
                data = rng.randbytes(rng.choice([0, 10, 3000, 70000, 1_500_000]))
                (root / rel).write_bytes(data)
                model[rel] = data
        elif op in ("write", "append", "truncate") and files:
            rel = rng.choice(files)
            old = model[rel] or b""
            if op == "write":
                off = rng.randrange(len(old) + 1)
                patch = rng.randbytes(rng.randrange(1, 5000))
                with open(root / rel, "r+b") as f:
                    f.seek(off)
                    f.write(patch)
                new = bytearray(old)
                new[off : off + len(patch)] = patch
                model[rel] = bytes(new)
            elif op == "append":
                extra = rng.randbytes(rng.randrange(1, 20000))
                with open(root / rel, "ab") as f:
                    f.write(extra)
                model[rel] = old + extra
            else:
                size = rng.randrange(len(old) + 100)
                os.truncate(root / rel, size)
                model[rel] = old[:size] + bytes(max(0, size - len(old)))
        elif op == "rename" and files:
            rel = rng.choice(files)
            parent = rng.choice(dirs)
            dst = f"{parent}/r{rng.randrange(10**6)}" if parent else f"r{rng.randrange(10**6)}"
            if dst in model:
                continue
            os.rename(root / rel, root / dst)
            model[dst] = model.pop(rel)
        elif op == "unlink" and files:
            rel = rng.choice(files)
            os.unlink(root / rel)
            del model[rel]
        elif op == "rmdir" and len(dirs) > 1:
            rel = rng.choice(dirs[1:])
            if any(p.startswith(rel + "/") for p in model):
                continue
            os.rmdir(root / rel)
            del model[rel]


def snapshot(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        for d in dirnames:
            out[str(base / d) if str(base) != "." else d] = None
        for f in filenames:
            rel = str(base / f) if str(base) != "." else f
            out[rel] = (Path(dirpath) / f).read_bytes()
    return out


def test_randomised_stress_matches_model(mounter, seaweedfs_target, fs_format: int) -> None:
    seed = int(os.environ.get("EFSISH_STRESS_SEED", "20261125"))
    store = f"s3://{seaweedfs_target.bucket}/stress-{uuid.uuid4().hex[:8]}"
    ep = ("--endpoint", seaweedfs_target.endpoint)
    efsish("format", store, *ep, "--block-size", "1M", *format_args(fs_format))
    mounts = [mounter(store, *ep, fmt=False) for _ in range(MOUNTS)]
    models: list[dict[str, bytes | None]] = [{} for _ in mounts]
    for i, m in enumerate(mounts):
        (m.path / f"m{i}").mkdir()
    shared: dict[str, bytes | None] = {}
    for rnd in range(ROUNDS if fs_format == 3 else ROUNDS // 2):
        errors: list[BaseException] = []

        def work(i: int, rnd: int = rnd, errors: list[BaseException] = errors) -> None:
            try:
                rng = random.Random(seed * 1000 + rnd * 10 + i)
                random_ops(rng, mounts[i].path / f"m{i}", models[i], OPS_PER_ROUND)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(MOUNTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, f"seed {seed} round {rnd}: {errors[0]!r}"
        # Contention: every mount creates the same name with O_EXCL; exactly one wins.
        results: list[int] = [0] * MOUNTS
        barrier = threading.Barrier(MOUNTS)

        def excl(
            i: int,
            rnd: int = rnd,
            barrier: threading.Barrier = barrier,
            results: list[int] = results,
        ) -> None:
            barrier.wait()
            try:
                fd = os.open(mounts[i].path / f"race{rnd}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, f"winner {i}".encode())
                os.close(fd)
                results[i] = 1
            except OSError as e:
                results[i] = -(e.errno or 0)

        threads = [threading.Thread(target=excl, args=(i,)) for i in range(MOUNTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(results) == [-errno.EEXIST] * (MOUNTS - 1) + [1], results
        shared[f"race{rnd}"] = f"winner {results.index(1)}".encode()
        # mkdir -p of one path from every mount at once: all succeed, one directory.
        threads = [
            threading.Thread(
                target=os.makedirs,
                args=(mounts[i].path / f"p{rnd}" / "a" / "b",),
                kwargs={"exist_ok": True},
            )
            for i in range(MOUNTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        shared.update({f"p{rnd}": None, f"p{rnd}/a": None, f"p{rnd}/a/b": None})
    expected: dict[str, bytes | None] = dict(shared)
    for i, model in enumerate(models):
        expected[f"m{i}"] = None
        expected.update({f"m{i}/{k}": v for k, v in model.items()})
    for m in mounts:
        got = snapshot(m.path)
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
        assert not (missing or extra or wrong), (
            f"seed {seed}: mount {m.path}: missing {missing[:5]}, extra {extra[:5]}, "
            f"wrong content {wrong[:5]}"
        )
    res = efsish("fsck", store, *ep, "-q", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
