"""The write budget: the count follows the buffers and the uploads through every
transition, and a writer over the limit waits (relieving the pressure each time round)
until an upload ends."""

from __future__ import annotations

import trio
import trio.testing

from efsish.data.budget import WriteBudget
from efsish.data.dirty import DirtyBuffer


def test_the_count_follows_buffers_and_uploads() -> None:
    budget, a, b = WriteBudget(1000), DirtyBuffer(), DirtyBuffer()
    budget.write(a, 0, b"x" * 100)
    budget.write(a, 50, b"y" * 100)  # overlaps 50 bytes: the buffer grew by 50
    budget.write(b, 0, b"z" * 30)
    assert budget.held == 150 + 30 == a.nbytes + b.nbytes
    blocks = budget.take_full_blocks(a, 64)  # bytes leave the buffer for uploads
    assert [len(x) for _, x in blocks] == [64] and budget.held == 86 + 30
    for _, block in blocks:
        budget.upload_started(len(block))
    assert budget.held == 150 + 30
    assert [len(iv) for iv in budget.take_all(a)] == [86] and budget.held == 64 + 30
    budget.drop(b)  # its file went away
    assert budget.held == 64


async def test_a_writer_over_the_limit_waits_for_an_upload_to_end() -> None:
    budget, buf = WriteBudget(100), DirtyBuffer()
    budget.write(buf, 0, b"x" * 150)
    relieved: list[int] = []

    def relieve() -> None:  # as the writer's caller does: upload the buffers as they are
        relieved.append(budget.held)
        for iv in budget.take_all(buf):
            budget.upload_started(len(iv))

    done = trio.Event()

    async def writer() -> None:
        await budget.wait_for_room(relieve)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert relieved == [150] and not done.is_set() and budget.held == 150
        await budget.upload_finished(150)
        await done.wait()
    assert budget.held == 0
