"""Object stores: the interface, and open_store() which picks a backend from a URL.

  s3://BUCKET[/PREFIX]   any S3-compatible endpoint, through boto3
  file:///ABS/PATH       a local directory (the embedded default)
  memory://NAME          in-process, for tests

This package must not know anything about the filesystem built on top of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from efsish.errors import StoreConfigError
from efsish.store.base import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from efsish.store.crypt import Keyring

__all__ = ["ObjectInfo", "ObjectStore", "StoreOptions", "open_store"]

from dataclasses import dataclass


@dataclass(frozen=True)
class StoreOptions:
    """Backend options that come from the command line or mount options."""

    endpoint: str | None = None
    region: str | None = None
    path_style: bool = True
    verify_tls: bool = True
    concurrency: int = 32
    # The keys of an encrypted filesystem (store/crypt.py): objects are encrypted and
    # authenticated on their way through this store. Shown by repr only as key ids.
    keyring: Keyring | None = None


def open_store(
    url: str, options: StoreOptions | None = None, *, create: bool = False
) -> ObjectStore:
    """Return the ObjectStore for `url`; raise StoreConfigError for a malformed URL.

    `create` lets a file:// store create its directory (only `efsish format` does).
    With `options.keyring`, the store encrypts (store/crypt.py)."""
    opts = options or StoreOptions()
    store = _open_backend(url, opts, create)
    if opts.keyring is None:
        return store
    from efsish.store.crypt import CryptStore

    return CryptStore(store, opts.keyring)


def _open_backend(url: str, opts: StoreOptions, create: bool) -> ObjectStore:
    if url.startswith("s3://"):
        from efsish.store.s3 import S3Store

        return S3Store(
            url,
            endpoint=opts.endpoint,
            region=opts.region,
            path_style=opts.path_style,
            verify_tls=opts.verify_tls,
            concurrency=opts.concurrency,
        )
    if url.startswith("file://"):
        from efsish.store.local import LocalStore

        path = url[len("file://") :]
        if not path.startswith("/"):
            raise StoreConfigError(
                f"{url}: a file:// store needs an absolute path, e.g. file:///var/lib/efsish"
            )
        return LocalStore(path, concurrency=opts.concurrency, create=create)
    if url.startswith("memory://"):
        from efsish.store.memory import MemoryStore

        return MemoryStore(url[len("memory://") :])
    raise StoreConfigError(
        f"unsupported store URL {url!r}: use s3://BUCKET[/PREFIX] or file:///ABS/PATH"
    )
