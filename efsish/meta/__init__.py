"""Metadata: the superblock, the log in the bucket, the SQLite view, and checkpoints."""
