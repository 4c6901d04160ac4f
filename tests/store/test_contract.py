"""The ObjectStore contract, run against every backend: memory, file, moto, SeaweedFS,
and any endpoint named by EFSISH_TEST_S3_ENDPOINT."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import trio

from efsish.errors import NotFound, PreconditionFailed
from efsish.store import ObjectStore, StoreOptions, open_store
from efsish.store.crypt import Keyring

BACKENDS = [
    "memory",
    "file",
    "moto",
    pytest.param("seaweedfs", marks=pytest.mark.integration),
]
if os.environ.get("EFSISH_TEST_S3_ENDPOINT"):
    BACKENDS.append(pytest.param("env", marks=pytest.mark.integration))
# The encrypting wrapper (store/crypt.py) keeps the contract, in plaintext terms, over a
# backend; not in the cross-process race, whose racers open stores without keys.
CRYPT_BACKENDS = ["crypt-memory", "crypt-moto"]
KEYRING = Keyring((bytes(range(32)),), "a test key")


@dataclass(frozen=True)
class Backend:
    """A fresh, isolated store location for one test, openable from any thread/process."""

    kind: str
    url: str
    options: StoreOptions

    def open(self) -> ObjectStore:
        return open_store(self.url, self.options, create=True)


def _make_backend(request: pytest.FixtureRequest, tmp_path, kind: str | None = None) -> Backend:
    kind = kind or request.param
    if kind.startswith("crypt-"):
        plain = _make_backend(request, tmp_path, kind.removeprefix("crypt-"))
        return Backend(kind, plain.url, replace(plain.options, keyring=KEYRING))
    unique = uuid.uuid4().hex[:12]
    if kind == "memory":
        return Backend(kind, f"memory://contract-{unique}", StoreOptions())
    if kind == "file":
        return Backend(kind, f"file://{tmp_path}/store", StoreOptions())
    target = request.getfixturevalue(f"{kind}_target")
    return Backend(kind, f"s3://{target.bucket}/contract-{unique}", target.options())


@pytest.fixture(params=[*BACKENDS, *CRYPT_BACKENDS])
def backend(request: pytest.FixtureRequest, tmp_path) -> Backend:
    return _make_backend(request, tmp_path)


# memory:// lives inside one process, so it cannot take part in a cross-process race.
@pytest.fixture(params=BACKENDS[1:])
def shared_backend(request: pytest.FixtureRequest, tmp_path) -> Backend:
    return _make_backend(request, tmp_path)


@pytest.fixture
async def store(backend: Backend):
    s = backend.open()
    yield s
    await s.aclose()


async def test_put_get_roundtrip_and_overwrite(store: ObjectStore) -> None:
    await store.put("k", b"hello")
    assert await store.get("k") == b"hello"
    await store.put("k", b"world!")
    assert await store.get("k") == b"world!"
    info = await store.head("k")
    assert info.size == 6 and info.key == "k"


async def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.get("nope")
    with pytest.raises(NotFound):
        await store.get("nope", 0, 10)
    with pytest.raises(NotFound):
        await store.head("nope")


async def test_range_reads_at_the_edges(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    n = len(data)
    await store.put("r", data)
    assert await store.get("r", 0, 1) == data[:1]
    assert await store.get("r", n - 1, n) == data[-1:]
    assert await store.get("r", n - 1) == data[-1:]
    assert await store.get("r", 0, n) == data
    assert await store.get("r", 100, 4196) == data[100:4196]
    assert await store.get("r", n - 10, n + 1000) == data[-10:]  # clipped
    assert await store.get("r", 5, 5) == b""
    assert await store.get("r", None, 3) == data[:3]
    with pytest.raises(NotFound):
        await store.get("r", n)  # starts at the end
    with pytest.raises(NotFound):
        await store.get("r", n + 5, n + 10)
    with pytest.raises(ValueError):
        await store.get("r", 10, 5)


async def test_empty_object(store: ObjectStore) -> None:
    await store.put("empty", b"")
    assert await store.get("empty") == b""
    assert await store.get("empty", 0) == b""
    assert (await store.head("empty")).size == 0
    await store.put_if_absent("empty2", b"")
    assert await store.get("empty2") == b""


async def test_unicode_and_slashes(store: ObjectStore) -> None:
    keys = {
        "dir/ünïcødé/€ 空 file.txt": b"1",
        "a": b"2",
        "a/b": b"3",
        "a/b/c d": b"4",
        "a.d": b"5",
        "a.o/x": b"6",
        "emoji/🦀": b"7",
    }
    for k, v in keys.items():
        await store.put(k, v)
    for k, v in keys.items():
        assert await store.get(k) == v
    listed = [i.key async for i in store.list("")]
    # Across "directories" the order is backend-specific (SeaweedFS walks its tree).
    assert sorted(listed) == sorted(keys)
    assert sorted([i.key async for i in store.list("a/")]) == ["a/b", "a/b/c d"]
    assert [i.key async for i in store.list("emoji/")] == ["emoji/🦀"]


async def test_list_order_is_utf8_byte_order_within_a_level(store: ObjectStore) -> None:
    names = ["a-b", "a.c", "ab", "é", "z", "A", "a0", "a", "00010", "00009", "~"]
    for n in names:
        await store.put(f"lvl/{n}", n.encode())
    expected = sorted((f"lvl/{n}" for n in names), key=lambda k: k.encode())
    assert [i.key async for i in store.list("lvl/")] == expected
    assert [i.key async for i in store.list("lvl/", start_after="lvl/a0")] == [
        k for k in expected if k.encode() > b"lvl/a0"
    ]
    assert [i.key async for i in store.list("lvl/a")] == [
        k for k in expected if k.startswith("lvl/a")
    ]


@pytest.mark.slow
async def test_list_pagination_over_1000_keys(store: ObjectStore) -> None:
    n = 1203
    limiter = trio.CapacityLimiter(32)

    async def put(i: int) -> None:
        async with limiter:
            await store.put(f"log/{i:08d}", str(i).encode())

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(put, i)
    await store.put("other/x", b"x")
    infos = [i async for i in store.list("log/")]
    assert [i.key for i in infos] == [f"log/{i:08d}" for i in range(n)]
    assert infos[7].size == 1
    tail = [i.key async for i in store.list("log/", start_after="log/00001100")]
    assert tail == [f"log/{i:08d}" for i in range(1101, n)]
    partial = [i.key async for i in store.list("log/0000110")]
    assert partial == [f"log/{i:08d}" for i in range(1100, 1110)]


async def test_delete_is_idempotent(store: ObjectStore) -> None:
    await store.delete("never-existed")
    await store.put("d/x", b"1")
    await store.delete("d/x")
    await store.delete("d/x")
    with pytest.raises(NotFound):
        await store.get("d/x")
    assert [i async for i in store.list("d/")] == []


async def test_put_if_absent(store: ObjectStore) -> None:
    await store.put_if_absent("c", b"first")
    with pytest.raises(PreconditionFailed):
        await store.put_if_absent("c", b"second")
    assert await store.get("c") == b"first"
    await store.put_if_absent("c", b"first")  # idempotent retry of the winner
    await store.put("c", b"replaced")  # plain put always replaces
    assert await store.get("c") == b"replaced"


async def test_invalid_keys_are_rejected(store: ObjectStore) -> None:
    for bad in ["", "/abs", "trailing/", "a//b", "a/../b", "./x"]:
        with pytest.raises(ValueError):
            await store.put(bad, b"x")


# ------------------------------------------------------------------ the conditional race

RACERS = 16


def _race_in_threads(backend: Backend, key: str) -> list[str]:
    barrier = threading.Barrier(RACERS)
    results: list[str] = [""] * RACERS

    def run(i: int) -> None:
        async def go() -> str:
            store = backend.open()
            try:
                barrier.wait()
                try:
                    await store.put_if_absent(key, f"writer-{i}".encode())
                    return "won"
                except PreconditionFailed:
                    return "lost"
            finally:
                await store.aclose()

        try:
            results[i] = trio.run(go)
        except Exception as e:  # record, the assertion below reports it
            results[i] = f"error: {e!r}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _race_process(url: str, endpoint: str | None, key: str, i: int, barrier, out) -> None:
    async def go() -> str:
        store = open_store(url, StoreOptions(endpoint=endpoint), create=True)
        try:
            barrier.wait()
            try:
                await store.put_if_absent(key, f"writer-{i}".encode())
                return "won"
            except PreconditionFailed:
                return "lost"
        finally:
            await store.aclose()

    try:
        out.put((i, trio.run(go)))
    except Exception as e:
        out.put((i, f"error: {e!r}"))


def _race_in_processes(backend: Backend, key: str) -> list[str]:
    # Forked from a clean server process that has already imported the stores: a spawned
    # racer spent ~1 s of CPU importing before it could race (16 racers, 2 cores).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["efsish.store.s3", "efsish.store.local", __name__])
    barrier = ctx.Barrier(RACERS)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_race_process,
            args=(backend.url, backend.options.endpoint, key, i, barrier, out),
        )
        for i in range(RACERS)
    ]
    for p in procs:
        p.start()
    results = [""] * RACERS
    for _ in range(RACERS):
        i, r = out.get(timeout=120)
        results[i] = r
    for p in procs:
        p.join(30)
    return results


async def _check_one_winner(backend: Backend, key: str, results: list[str]) -> None:
    assert not [r for r in results if r.startswith("error")], results
    winners = [i for i, r in enumerate(results) if r == "won"]
    assert len(winners) == 1, f"{len(winners)} winners: {results}"
    s = backend.open()
    try:
        assert await s.get(key) == f"writer-{winners[0]}".encode()
    finally:
        await s.aclose()


@pytest.mark.parametrize("rounds", [5])
async def test_race_threads_exactly_one_wins(backend: Backend, rounds: int) -> None:
    for r in range(rounds):
        key = f"race/threads-{r}"
        results = await trio.to_thread.run_sync(_race_in_threads, backend, key)
        await _check_one_winner(backend, key, results)


@pytest.mark.slow
async def test_race_processes_exactly_one_wins(shared_backend: Backend) -> None:
    backend = shared_backend
    race: Callable[[Backend, str], list[str]] = _race_in_processes
    for r in range(3):
        key = f"race/procs-{r}"
        results = await trio.to_thread.run_sync(race, backend, key)
        await _check_one_winner(backend, key, results)


async def test_server_date_is_the_stores_clock(backend: Backend) -> None:
    """An S3 store reports the `Date` of its answers (the lease guard, LEASES.md §7
    (4)): through boto3 (a listing) and through the lean path (a GET); a store on this
    machine has no clock of its own."""
    s = backend.open()
    try:
        assert s.server_date() is None  # nothing answered yet
        _ = [i async for i in s.list("")]
        listed = s.server_date()
        with pytest.raises(NotFound):
            await s.get("nope")
        got = s.server_date()
    finally:
        await s.aclose()
    if backend.kind in ("memory", "file", "crypt-memory"):
        assert listed is None and got is None
    else:
        for d in (listed, got):
            assert d is not None and abs(d - time.time()) < 300, d
