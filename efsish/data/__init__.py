"""File data: immutable blocks in the store, the on-disk block cache, write buffers."""
