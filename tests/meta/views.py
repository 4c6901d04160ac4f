"""Helpers of the metadata tests: applying ops to a view directly."""

from __future__ import annotations

from efsish.meta.ops import Op
from efsish.meta.view import ApplyResult, View

T0 = 1_700_000_000_000_000_000  # a wall-clock time in ns, for op timestamps


def apply(view: View, *ops: Op) -> ApplyResult:
    """Apply `ops` to `view` in one transaction; what they changed."""
    res = ApplyResult()
    view.begin()
    for op in ops:
        view.apply_op(op, res)
    view.commit()
    return res
