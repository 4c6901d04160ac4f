"""Planning: turning a batch of planners into one log entry, in the writer's worker
thread, inside the transaction the committer opened on the view.

A planner (efsish.filesystem, efsish.gc) validates its request against the view and
returns ops; `plan_batch` runs each in a savepoint of its own, so a planner that fails
with an FsError affects only its caller (its ops and any inode numbers it took are
undone), applies the ops of the rest, and encodes them as one entry whose bytes are
checked to decode before anyone can PUT them.

This module owns that step. It must not do I/O beyond the view it is given, commit or
roll back the transaction (the committer, efsish.meta.log, does), touch trio, or know
POSIX rules.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from efsish import codec
from efsish.errors import FsError
from efsish.meta.inodes import InodeRange
from efsish.meta.ops import LogEntry, Op
from efsish.meta.view import ApplyResult, View

T = TypeVar("T")


class PlanContext:
    """Handed to planners: allocates inode numbers from ranges claimed through the log.

    A planner may set `after` to compute its result from the view once its ops are
    applied (e.g. the new inode's attributes), saving the caller a read afterwards."""

    def __init__(self, inodes: InodeRange) -> None:
        self._inodes = inodes
        self.extra: list[Op] = []
        self.now_ns = time.time_ns()
        self.after: Callable[[View], Any] | None = None

    def alloc_ino(self, view: View) -> int:
        ino, claim = self._inodes.take(view)
        if claim is not None:
            self.extra.append(claim)
        return ino


Planner = Callable[[View, PlanContext], tuple[list[Op], T]]
# Each planner's result, or the FsError it failed with.
Outcome = tuple[Any, BaseException | None]


class Plan(NamedTuple):
    seq: int  # the log position the entry is for
    blob: bytes | None  # the encoded entry; None if no planner produced ops
    res: ApplyResult  # what applying its ops changed
    outcomes: list[Outcome]  # one per planner, in order


def plan_batch(
    view: View, planners: Sequence[Planner[Any]], inodes: InodeRange, client_id: str
) -> Plan:
    """Run `planners` against `view` (in an open transaction) and encode their ops as
    the entry for the next position. Raises what a planner raises other than FsError."""
    seq = view.applied_seq + 1
    t_entry = time.time_ns()
    view.cur_seq, view.cur_t = seq, t_entry
    res = ApplyResult()
    ops: list[Op] = []
    outcomes: list[Outcome] = []
    for planner in planners:
        ctx = PlanContext(inodes)
        saved = inodes.save()
        view.savepoint("p")
        try:
            pops, result = planner(view, ctx)
            for op in pops:
                view.apply_op(op, res)
            if ctx.after is not None:
                result = ctx.after(view)
        except FsError as e:
            view.rollback_to("p")
            inodes.restore(saved)
            outcomes.append((None, e))
            continue
        view.release("p")
        ops.extend(ctx.extra)
        ops.extend(pops)
        outcomes.append((result, None))
    if not ops:
        return Plan(seq, None, res, outcomes)
    entry = LogEntry(uuid.uuid4().hex, client_id, t_entry, ops)
    blob = codec.encode_json(b"L", entry.wire())
    # A log entry is shared and permanent: one that does not decode would stop every
    # mount at this position. Check the bytes before they can be PUT.
    codec.decode(b"L", blob, "the log entry being written")
    return Plan(seq, blob, res, outcomes)
