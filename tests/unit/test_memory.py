"""The daemon's malloc setting (efsish.mount.limit_malloc_arenas); its effect on RSS is
measured by scripts/bench/memory.py, not asserted here."""

from __future__ import annotations

import platform

import pytest

from efsish.mount import limit_malloc_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_arenas_can_be_limited_here() -> None:
    assert limit_malloc_arenas(8) is True
