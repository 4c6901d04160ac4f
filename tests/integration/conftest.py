"""Integration tests reuse the real-mount fixtures."""

from tests.fuse.conftest import fs_format, mnt, mounter

__all__ = ["fs_format", "mnt", "mounter"]
