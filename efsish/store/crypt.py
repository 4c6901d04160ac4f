"""Client-side encryption at rest: an ObjectStore wrapper that encrypts and authenticates
every object except the superblock, and the keys it uses.

An encrypted filesystem's objects (data blocks, log entries, checkpoints, heartbeats,
the throughput ledger and config, secrets/nudge, anything efsish writes but the
superblock) are stored as

    header  "EFSX", scheme 1, key id (8 bytes), salt (24 random bytes), plaintext size (8)
    chunk i AES-256-GCM(object key, nonce = i as 12 bytes, plaintext[i*128K:(i+1)*128K],
                        associated data = header + object path), i = 0 .. max(1, ceil)-1

- **Nonces never repeat, with no shared counter.** Each object gets its own key,
  HKDF-SHA256(master key, salt, "efsish object key v1"), from a fresh 192-bit random salt,
  so its chunk numbers are safe nonces: a (key, nonce) pair could repeat only if two
  objects drew the same salt (a birthday bound of 2^-64 after 2^64 objects). Nothing
  depends on counters, clocks or coordination between mounts, so any number of mounts,
  restarts and retries may encrypt at once. (A retried PUT re-encrypts with a new salt;
  put_if_absent compares plaintexts, so a retry whose first try landed still succeeds.)
- **Each object is bound to its path.** The path under the filesystem's prefix and the
  whole header (scheme, key id, salt, size) are associated data of every chunk: an
  object copied or replayed under another key, truncated, extended, or with chunks
  swapped fails authentication. A copy of the whole prefix elsewhere stays readable.
- **Chunks of 128 KiB** (codec.CRC_CHUNK, the kernel's usual read) keep the lean ranged
  reads of data blocks: a small random read GETs the header and only the chunks it
  needs (two GETs at once), and each chunk is authenticated on its own. Authentication
  failure is CorruptObject (EIO on a mount, after one more GET, as a block checksum
  failure), never data; whatever byte is damaged, its message (logged as an error) is
  "<path> failed authentication: ...". Blocks keep their CRC-32C in the (encrypted) log.
- **Keys**: 32 random bytes, base64, one per line; the first encrypts new objects, all
  decrypt, chosen by the key id in the header (HMAC-SHA256 of a constant, 8 bytes: it
  names a key without revealing it). The superblock stays readable: it says the
  filesystem is encrypted, the scheme, and the key ids it was formatted with.

This module must not know what the objects mean; it knows only that "superblock" stays
in the clear.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import struct
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from efsish.errors import CorruptObject, EfsishError, NotFound, PreconditionFailed
from efsish.store.base import ObjectInfo, ObjectStore, clip_range, range_past_end

log = logging.getLogger(__name__)

SCHEME = 1
ALGORITHM = "AES-256-GCM, per-object key HKDF-SHA256(192-bit salt), 128 KiB chunks"
MAGIC = b"EFSX"
PLAIN_KEYS = frozenset({"superblock"})  # the one object that stays readable
PROBE_PREFIX = ".efsish-probe/"  # the inner store's check() probes, never ours
CHUNK = 128 * 1024
TAG = 16
_HEAD = struct.Struct(">4sB8s24sQ")
HEADER = _HEAD.size  # 45 bytes
KEY_BYTES = 32
ENV_VAR = "EFSISH_KEY"
KEY_COMMAND_TIMEOUT = 60.0
INLINE_BYTES = 1024 * 1024  # larger objects are encrypted in a worker thread


class CryptKeyError(EfsishError):
    """A key could not be loaded, or is not this filesystem's."""


class UnknownKey(CorruptObject):
    """An object is encrypted with a key this mount was not given (reading it again
    will not help)."""


def key_id(key: bytes) -> bytes:
    """The 8-byte id of a key: names it in headers and the superblock, reveals nothing."""
    return hmac.new(key, b"efsish key id v1", hashlib.sha256).digest()[:8]


@dataclass(frozen=True)
class Keyring:
    """The keys of one filesystem: keys[0] encrypts, every key decrypts."""

    keys: tuple[bytes, ...]
    source: str  # "key file /etc/efsish.key", "key_command", "$EFSISH_KEY"

    def __post_init__(self) -> None:
        assert self.keys and all(len(k) == KEY_BYTES for k in self.keys)

    def __repr__(self) -> str:  # never the keys themselves
        return f"Keyring({', '.join(self.ids())} from {self.source})"

    @property
    def current(self) -> bytes:
        return self.keys[0]

    def ids(self) -> list[str]:
        return [key_id(k).hex() for k in self.keys]

    def by_id(self) -> dict[bytes, bytes]:
        return {key_id(k): k for k in self.keys}


def new_key_line() -> str:
    """A new random key as a key-file line (base64 of 32 bytes)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_keys(text: str, source: str) -> Keyring:
    """Keys from key-file text: base64 keys separated by newlines, blanks or commas;
    lines starting with # are comments. Errors never quote the text."""
    keys: list[bytes] = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("#"):
            continue
        for token in re.split(r"[\s,]+", line.strip()):
            if not token:
                continue
            try:
                key = base64.b64decode(token, validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != KEY_BYTES:
                raise CryptKeyError(
                    f"{source}, line {n}: not a key (each key is 32 random bytes in "
                    "base64, e.g. from `efsish keygen FILE`)"
                )
            if key not in keys:
                keys.append(key)
    if not keys:
        raise CryptKeyError(f"{source} holds no key; make one with `efsish keygen FILE`")
    return Keyring(tuple(keys), source)


def read_key_file(path: str) -> Keyring:
    """Keys from a file that only its owner may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CryptKeyError(f"cannot read key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise CryptKeyError(f"key file {path} is not a regular file")
        if mode & 0o077:
            raise CryptKeyError(
                f"key file {path} is accessible to group or others (mode "
                f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
            )
        text = f.read(1 << 16).decode(errors="replace")
    return parse_keys(text, f"key file {path}")


def run_key_command(command: str) -> Keyring:
    """Keys from the standard output of `sh -c command` (a secret manager, KMS)."""
    try:
        res = subprocess.run(
            ["/bin/sh", "-c", command],
            capture_output=True,
            timeout=KEY_COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise CryptKeyError(f"key command did not finish in {KEY_COMMAND_TIMEOUT:.0f} s") from None
    if res.returncode != 0:
        why = res.stderr.decode(errors="replace").strip().splitlines()
        raise CryptKeyError(
            f"key command failed (exit {res.returncode})" + (f": {why[-1]}" if why else "")
        )
    return parse_keys(res.stdout.decode(errors="replace"), "key command output")


def load_keyring(
    key_file: str | None = None,
    key_command: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Keyring | None:
    """The keys named by --key-file / -o key_file, else --key-command / -o key_command,
    else $EFSISH_KEY (base64, several separated by commas), else None."""
    if key_file and key_command:
        raise CryptKeyError("give either a key file or a key command, not both")
    if key_file:
        return read_key_file(key_file)
    if key_command:
        return run_key_command(key_command)
    if environ.get(ENV_VAR):
        return parse_keys(environ[ENV_VAR], f"${ENV_VAR}")
    return None


def superblock_info(keyring: Keyring) -> dict[str, Any]:
    """What the superblock of a filesystem formatted with `keyring` says about it."""
    return {"scheme": SCHEME, "algorithm": ALGORITHM, "key_ids": keyring.ids()[:1]}


def plaintext_size(stored: int) -> int:
    """The size of the plaintext of an encrypted object of `stored` bytes."""
    if stored < HEADER + TAG:
        return stored  # not one of ours; reported as it is
    chunks = -(-(stored - HEADER) // (CHUNK + TAG))
    return stored - HEADER - TAG * chunks


def _chunks(size: int) -> int:
    return max(1, -(-size // CHUNK))


def _object_key(master: bytes, salt: bytes) -> AESGCM:
    okm = HKDF(hashes.SHA256(), KEY_BYTES, salt, b"efsish object key v1").derive(master)
    return AESGCM(okm)


def _nonce(i: int) -> bytes:
    return i.to_bytes(12, "big")


def encrypt(keyring: Keyring, path: str, data: bytes) -> bytes:
    """The stored form of `data` at `path` (see the module docstring)."""
    header = _HEAD.pack(MAGIC, SCHEME, key_id(keyring.current), os.urandom(24), len(data))
    aead = _object_key(keyring.current, header[13:37])
    ad = header + path.encode()
    mv = memoryview(data)
    out = [header]
    for i in range(_chunks(len(data))):
        out.append(aead.encrypt(_nonce(i), mv[i * CHUNK : (i + 1) * CHUNK], ad))
    return b"".join(out)


@dataclass(frozen=True)
class _Header:
    raw: bytes
    kid: bytes
    salt: bytes
    size: int


def _parse_header(path: str, blob: bytes) -> _Header:
    if len(blob) < HEADER or not blob.startswith(MAGIC):
        raise CorruptObject(
            f"{path} failed authentication: not an encrypted efsish object, in an encrypted "
            "filesystem (tampered with, or damaged): refused"
        )
    _magic, scheme, kid, salt, size = _HEAD.unpack_from(blob)
    if scheme != SCHEME:
        raise CorruptObject(
            f"{path} failed authentication: it names encryption scheme {scheme}, unknown "
            "to this efsish (damaged, or written by a newer efsish: upgrade efsish)"
        )
    return _Header(bytes(blob[:HEADER]), kid, salt, size)


def _aead_for(keyring: Keyring, path: str, h: _Header) -> AESGCM:
    key = keyring.by_id().get(h.kid)
    if key is None:
        raise UnknownKey(
            f"{path} failed authentication: it is encrypted with key {h.kid.hex()}, which "
            f"is not among the keys given ({', '.join(keyring.ids())}): add that key to "
            "the key file (if no key has that id, the object is tampered with or damaged)"
        )
    return _object_key(key, h.salt)


def decrypt_chunks(
    keyring: Keyring, path: str, h: _Header, body: bytes | memoryview, first: int
) -> bytes:
    """The plaintext of the chunks from `first` on in `body` (whole stored chunks, the
    last possibly the object's short one); CorruptObject if any fails authentication."""
    aead = _aead_for(keyring, path, h)
    ad = h.raw + path.encode()
    mv = memoryview(body)
    out = []
    n = _chunks(h.size)
    step = CHUNK + TAG
    for j, i in enumerate(range(0, len(mv), step)):
        if first + j >= n:
            raise CorruptObject(
                f"{path} failed authentication: longer than its encrypted size says "
                "(tampered with, or damaged)"
            )
        try:
            out.append(aead.decrypt(_nonce(first + j), mv[i : i + step], ad))
        except InvalidTag:
            raise CorruptObject(
                f"{path} failed authentication (chunk {first + j}): tampered with, damaged, "
                "or moved from another key"
            ) from None
    return b"".join(out)


def decrypt(keyring: Keyring, path: str, blob: bytes) -> bytes:
    """The plaintext of the stored object `blob` at `path`."""
    h = _parse_header(path, blob)
    n = _chunks(h.size)
    if len(blob) != HEADER + h.size + TAG * n:
        raise CorruptObject(
            f"{path} failed authentication: truncated or extended (tampered with, or damaged)"
        )
    return decrypt_chunks(keyring, path, h, memoryview(blob)[HEADER:], 0)


def _read_again_or_raise(attempt: int, e: CorruptObject) -> None:
    """After a read that failed authentication: on the second attempt, or for a key the
    keyring lacks (reading again cannot help), log and raise it; else log that it is
    read once more."""
    if attempt == 2 or isinstance(e, UnknownKey):
        log.error("%s", e)
        raise e
    log.warning("%s; reading it again", e)


class CryptStore(ObjectStore):
    """Encrypts on the way in, authenticates and decrypts on the way out (see above).
    Ranges and sizes are of the plaintext, as the ObjectStore contract says."""

    def __init__(self, inner: ObjectStore, keyring: Keyring) -> None:
        self.inner = inner
        self.keyring = keyring
        self.url = inner.url
        self._limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))

    def __repr__(self) -> str:
        return f"CryptStore({self.inner.url}, {self.keyring!r})"

    @staticmethod
    def _plain(key: str) -> bool:
        return key in PLAIN_KEYS or key.startswith(PROBE_PREFIX)

    async def _run(self, fn: Any, key: str, data: bytes) -> bytes:
        """fn(keyring, key, data) on the event loop, or in a worker thread for a large
        object (AES-GCM runs at several GB/s and releases the GIL)."""
        if len(data) <= INLINE_BYTES:
            out: bytes = fn(self.keyring, key, data)
            return out
        return await trio.to_thread.run_sync(fn, self.keyring, key, data, limiter=self._limiter)

    async def _get_verified(self, key: str) -> bytes:
        """GET and decrypt `key`; an object that fails authentication is read once more
        (a GET carries no checksum: damage on the way) before it is CorruptObject."""
        for attempt in (1, 2):
            blob = await self.inner.get(key)
            try:
                data: bytes = await self._run(decrypt, key, blob)
                return data
            except CorruptObject as e:
                _read_again_or_raise(attempt, e)
        raise AssertionError("unreachable")

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if self._plain(key):
            return await self.inner.get(key, start, end)
        if end is None or (start or 0) >= end:
            data = await self._get_verified(key)
            if start is None and end is None:
                return data
            if range_past_end(len(data), start):
                raise NotFound(key)
            s, e = clip_range(len(data), start, end)
            return data[s:e]
        return await self._get_range(key, start or 0, end)

    async def _get_range(self, key: str, start: int, end: int) -> bytes:
        """Plaintext [start, end): the header and the chunks that hold it, GET at once."""
        first, last = start // CHUNK, (end - 1) // CHUNK
        step = CHUNK + TAG
        lo, hi = HEADER + first * step, HEADER + (last + 1) * step
        for attempt in (1, 2):
            got: dict[str, bytes] = {}
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(self._fetch_into, got, "head", key, 0, HEADER)
                    n.start_soon(self._fetch_into, got, "body", key, lo, hi)
            except BaseExceptionGroup as eg:  # callers expect a StoreError, as from get()
                exc = eg.exceptions[0]
                if isinstance(exc, Exception) and not isinstance(exc, BaseExceptionGroup):
                    raise exc from None
                raise
            if not got["head"]:
                raise NotFound(key)
            h = _parse_header(key, got["head"])
            if range_past_end(h.size, start):
                raise NotFound(key)
            n_chunks = _chunks(h.size)
            last = min(last, n_chunks - 1)
            want = sum(min(CHUNK, h.size - i * CHUNK) + TAG for i in range(first, last + 1))
            try:
                if first >= n_chunks:
                    return b""
                if len(got["body"]) != want:
                    raise CorruptObject(
                        f"{key} failed authentication: truncated (tampered with, or damaged)"
                    )
                plain = decrypt_chunks(self.keyring, key, h, got["body"], first)
                base = first * CHUNK
                return plain[start - base : min(end, h.size) - base]
            except CorruptObject as e:
                _read_again_or_raise(attempt, e)
        raise AssertionError("unreachable")

    async def _fetch_into(self, got: dict[str, bytes], name: str, key: str, a: int, b: int) -> None:
        try:
            got[name] = await self.inner.get(key, a, b)
        except NotFound:
            got[name] = b""  # a range past the end, or no object: decided by the header

    async def put(self, key: str, data: bytes) -> None:
        if self._plain(key):
            return await self.inner.put(key, data)
        blob = await self._run(encrypt, key, data)
        await self.inner.put(key, blob)

    async def put_if_absent(self, key: str, data: bytes) -> None:
        if self._plain(key):
            return await self.inner.put_if_absent(key, data)
        blob = await self._run(encrypt, key, data)
        try:
            await self.inner.put_if_absent(key, blob)
        except PreconditionFailed:
            # Idempotent for equal plaintexts: a retry encrypts anew, so the bytes of a
            # first try that landed differ from ours though they say the same thing.
            try:
                there = await self._get_verified(key)
            except (CorruptObject, NotFound):
                raise PreconditionFailed(key) from None
            if there != bytes(data):
                raise
            log.debug("%s already holds our plaintext (a retried write had landed)", key)

    async def head(self, key: str) -> ObjectInfo:
        info = await self.inner.head(key)
        if self._plain(key):
            return info
        return ObjectInfo(info.key, plaintext_size(info.size), info.etag)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def list(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix, start_after):
            if self._plain(info.key):
                yield info
            else:
                yield ObjectInfo(info.key, plaintext_size(info.size), info.etag)

    def enclosing(self) -> Sequence[ObjectStore]:
        return self.inner.enclosing()

    def endpoint_host(self) -> str | None:
        return self.inner.endpoint_host()

    def server_date(self) -> float | None:
        return self.inner.server_date()

    def endpoint_url(self) -> str | None:
        return self.inner.endpoint_url()

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def key_id_of(self, key: str) -> bytes:
        """The key id in the header of the stored object `key` (one small ranged GET)."""
        return _parse_header(key, await self.inner.get(key, 0, HEADER)).kid


async def check_keys(store: ObjectStore, encryption: Any) -> None:
    """Raise CryptKeyError in one line unless `store` can read the filesystem whose
    superblock says `encryption`: keys for an encrypted one, none for a plain one, and
    a key that is this filesystem's (listed in its superblock, or the key of the first
    log entry or checkpoint, after rotation and `efsish rekey`)."""
    crypt = store if isinstance(store, CryptStore) else None
    if encryption is None:
        if crypt is not None:
            raise CryptKeyError(
                f"{store.url} is not encrypted, but a key was given ({crypt.keyring.source}); "
                f"drop it (unset ${ENV_VAR}) to use this filesystem"
            )
        return
    if not isinstance(encryption, dict) or encryption.get("scheme") != SCHEME:
        raise CryptKeyError(
            f"{store.url} uses an encryption scheme this efsish does not know; upgrade efsish"
        )
    if crypt is None:
        raise CryptKeyError(
            f"{store.url} is encrypted: give its key with --key-file FILE "
            f"(-o key_file=FILE), -o key_command=CMD, or ${ENV_VAR}"
        )
    ours = set(crypt.keyring.ids())
    known = [str(k) for k in encryption.get("key_ids", [])]
    if ours & set(known):
        return
    for prefix in ("log/", "checkpoints/"):
        async for info in crypt.inner.list(prefix):
            try:
                kid = (await crypt.key_id_of(info.key)).hex()
            except (CorruptObject, NotFound):
                break
            if kid in ours:
                return
            known.append(kid)
            break
    raise CryptKeyError(
        f"wrong key for {store.url}: {crypt.keyring.source} holds key(s) "
        f"{', '.join(sorted(ours))}, the filesystem uses {', '.join(dict.fromkeys(known))}; "
        "give the right key file"
    )


async def rekey(store: CryptStore) -> tuple[int, int]:
    """Rewrite every object not encrypted with the current key (the first one) with it;
    return (rewritten, objects). Readers holding both keys read either copy."""
    current = key_id(store.keyring.current)
    rewritten = total = 0
    async for info in store.inner.list(""):
        if store._plain(info.key):
            continue
        total += 1
        try:
            if await store.key_id_of(info.key) == current:
                continue
        except NotFound:
            continue  # deleted meanwhile (gc)
        try:
            data = await store._get_verified(info.key)
        except NotFound:
            continue
        await store.put(info.key, data)
        rewritten += 1
    return rewritten, total
