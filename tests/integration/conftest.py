"""Integration tests reuse the real-mount fixtures."""

from tests.fuse.conftest import encrypted, fs_format, mnt, mounter, variant

__all__ = ["encrypted", "fs_format", "mnt", "mounter", "variant"]
