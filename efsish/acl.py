"""POSIX ACLs in their Linux xattr form (system.posix_acl_access / _default).

The kernel enforces ACLs (efsish mounts with FUSE_POSIX_ACL); the filesystem keeps the
mode in step with an access ACL and, on create, derives the new inode's ACLs from its
directory's default ACL as POSIX.1e says and Linux does (posix_acl_create_masq).

A value is a 4-byte header (version 2) and 8-byte entries: tag, permissions (rwx) and
a uid/gid (for named users and groups), little-endian, sorted by tag then id.
"""

from __future__ import annotations

import struct

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 1, 2, 4, 8, 0x10, 0x20
_HEADER = b"\x02\0\0\0"
_ENTRY = struct.Struct("<HHI")


def valid(value: bytes) -> bool:
    """Whether `value` has the form of an ACL (header, whole entries)."""
    return len(value) >= 4 and (len(value) - 4) % 8 == 0 and value[:4] == _HEADER


def entries(value: bytes) -> list[list[int]] | None:
    """The [tag, perm, id] entries of an ACL with the three base entries, else None."""
    if not valid(value):
        return None
    out = [list(_ENTRY.unpack_from(value, i)) for i in range(4, len(value), 8)]
    if not {USER_OBJ, GROUP_OBJ, OTHER} <= {e[0] for e in out}:
        return None
    return out


def encode(ents: list[list[int]]) -> bytes:
    return _HEADER + b"".join(_ENTRY.pack(*e) for e in ents)


def parse_acl(value: bytes) -> tuple[int, bool] | None:
    """(permission bits, minimal?) of an access ACL, or None if malformed. The group
    bits are the mask's when there is one; minimal: nothing beyond the mode."""
    ents = entries(value)
    if ents is None:
        return None
    perms = {tag: perm & 7 for tag, perm, _ in ents if tag not in (USER, GROUP)}
    minimal = len(perms) == len(ents) and MASK not in perms
    group = perms.get(MASK, perms[GROUP_OBJ])
    return (perms[USER_OBJ] << 6) | (group << 3) | perms[OTHER], minimal


def inherit(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """(mode, access ACL) of an inode created with `mode` in a directory whose default
    ACL is `default`: the ACL's owner, group class (the mask, or the owning group when
    there is no mask) and other entries keep only the permissions the mode grants, and
    the mode only those they grant. The access ACL is None when it says no more than
    the mode (it is then not stored), or when `default` is malformed (the mode stays)."""
    ents = entries(default)
    if ents is None:
        return mode, None
    perm = mode & 0o777
    extended = False
    group_class = None
    for e in ents:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= (perm >> 6) | ~7
            perm &= (e[1] << 6) | ~0o700
        elif tag == OTHER:
            e[1] &= perm | ~7
            perm &= e[1] | ~0o007
        elif tag == GROUP_OBJ:
            group_class = group_class or e
        elif tag == MASK:
            group_class, extended = e, True
        else:
            extended = True
    assert group_class is not None  # entries() checked the base entries
    group_class[1] &= (perm >> 3) | ~7
    perm &= (group_class[1] << 3) | ~0o070
    return (mode & ~0o777) | perm, encode(ents) if extended else None
