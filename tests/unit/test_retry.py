"""retry_transient (efsish.retry) driven directly on trio's MockClock (autojump): it
repeats the same call on TransientStoreError only, gives up after its attempts with the
last error, and waits on the trio clock (virtual seconds, cancellable)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from efsish.errors import (
    CorruptObject,
    NotFound,
    PermanentStoreError,
    PreconditionFailed,
    StoreConfigError,
    TransientStoreError,
    WriteConflict,
)
from efsish.retry import ATTEMPTS, retry_transient


class Calls:
    """An idempotent store call that fails with `errors` in turn, then returns "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.n = 0
        self.at: list[float] = []  # trio time of each call

    async def __call__(self) -> str:
        self.n += 1
        self.at.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_a_call_that_succeeds_is_made_once_without_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    call = Calls()
    t0 = trio.current_time()
    assert await retry_transient(call, "put") == "done"
    assert call.n == 1 and trio.current_time() == t0


@pytest.mark.parametrize("error", [TransientStoreError("503 slow down"), WriteConflict("409")])
async def test_transient_errors_repeat_the_same_call_until_it_succeeds(
    autojump_clock: trio.testing.MockClock, error: TransientStoreError
) -> None:
    call = Calls(error, TransientStoreError("timeout"), TransientStoreError("reset"))
    assert await retry_transient(call, "put") == "done"
    assert call.n == 4
    pauses = [b - a for a, b in zip(call.at, call.at[1:], strict=False)]
    assert all(0.05 <= p <= 2.0 for p in pauses), pauses


async def test_it_gives_up_after_its_attempts_with_the_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors = [TransientStoreError(f"try {i}") for i in range(ATTEMPTS + 3)]
    call = Calls(*errors)
    with pytest.raises(TransientStoreError) as e:
        await retry_transient(call, "put")
    assert call.n == ATTEMPTS
    assert e.value is errors[ATTEMPTS - 1]  # the last one, not the first


@pytest.mark.parametrize("attempts", [1, 2, 3])
async def test_attempts_counts_every_call(
    autojump_clock: trio.testing.MockClock, attempts: int
) -> None:
    call = Calls(*(TransientStoreError("x") for _ in range(5)))
    with pytest.raises(TransientStoreError):
        await retry_transient(call, "put", attempts=attempts)
    assert call.n == attempts


@pytest.mark.parametrize(
    "error",
    [
        PreconditionFailed("412"),
        PermanentStoreError("access denied"),
        StoreConfigError("no such bucket"),
        NotFound("gone"),
        CorruptObject("bad envelope"),
        ValueError("a bug"),
    ],
)
async def test_other_errors_are_never_retried(
    autojump_clock: trio.testing.MockClock, error: Exception
) -> None:
    call = Calls(error)
    t0 = trio.current_time()
    with pytest.raises(type(error)) as e:
        await retry_transient(call, "put")
    assert e.value is error and call.n == 1 and trio.current_time() == t0


@pytest.mark.parametrize("first", [True, False])
async def test_a_precondition_failure_after_transient_errors_ends_the_retries(
    autojump_clock: trio.testing.MockClock, first: bool
) -> None:
    """E.g. a PUT whose first try landed although it reported an error: the retry's 412
    is the caller's to judge at once (the log client reads the entry back)."""
    transient = [TransientStoreError("timeout")] * (1 if first else 3)
    call = Calls(*transient, PreconditionFailed("412"))
    with pytest.raises(PreconditionFailed):
        await retry_transient(call, "put")
    assert call.n == len(transient) + 1


async def test_the_waits_are_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    """All attempts fail: the pauses add up to virtual seconds (0.05 s at least each,
    2 s at most; a time.sleep would not move the mock clock), and they can be
    cancelled."""
    call = Calls(*(TransientStoreError("x") for _ in range(ATTEMPTS)))
    t0 = trio.current_time()
    with pytest.raises(TransientStoreError):
        await retry_transient(call, "put")
    elapsed = trio.current_time() - t0
    assert 0.05 * (ATTEMPTS - 1) <= elapsed <= 2.0 * (ATTEMPTS - 1), elapsed

    call = Calls(*(TransientStoreError("x") for _ in range(ATTEMPTS)))
    with trio.move_on_after(0.01) as scope:  # shorter than the first pause
        await retry_transient(call, "put")
    assert scope.cancelled_caught and call.n == 1
