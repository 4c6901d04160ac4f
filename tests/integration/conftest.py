"""Integration tests reuse the real-mount fixtures."""

from tests.fuse.conftest import mnt, mounter

__all__ = ["mnt", "mounter"]
