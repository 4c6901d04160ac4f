"""Retries of store requests that are safe to repeat, in one place.

`retry_transient` repeats an idempotent store call (the same bytes to the same new key)
while it fails with TransientStoreError, with exponentially growing, jittered pauses on
the trio clock (tenacity). Used for log entries and data blocks; boto3's own retries sit
below it, per HTTP request. It must not retry anything else: a PreconditionFailed or a
permanent error (access denied, missing bucket) is the caller's to handle at once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity
import trio

from efsish.errors import TransientStoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 6  # the pauses add up to ~2-3 s (0.1 s doubling, at most 2 s each)


async def retry_transient(
    call: Callable[[], Awaitable[T]], what: str, attempts: int = ATTEMPTS
) -> T:
    """`await call()`, repeated on TransientStoreError up to `attempts` times in all."""
    try:
        return await call()  # the first try outside tenacity, which costs ~13 us a call
    except TransientStoreError as e:
        if attempts <= 1:
            raise
        log.warning("%s failed (%s); retrying", what, e)
    await trio.sleep(random.uniform(0.05, 0.2))

    def warn(state: tenacity.RetryCallState) -> None:
        e = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s); retrying", what, e)

    async for attempt in tenacity.AsyncRetrying(
        sleep=trio.sleep,
        stop=tenacity.stop_after_attempt(attempts - 1),
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=2.0, min=0.05),
        retry=tenacity.retry_if_exception_type(TransientStoreError),
        before_sleep=warn,
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")
