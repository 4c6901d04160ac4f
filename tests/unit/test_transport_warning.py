"""The mount's warning for a filesystem whose names and data would cross the network in
the clear: plain http to another machine, not encrypted at rest."""

from __future__ import annotations

import pytest

from efsish.mount import transport_warning
from efsish.store.crypt import CryptStore, Keyring
from efsish.store.memory import MemoryStore
from efsish.store.s3 import S3Store


@pytest.mark.parametrize(
    "endpoint, encrypted, warns",
    [
        ("http://10.1.2.3:9000", False, True),
        ("http://minio.example:9000", False, True),
        ("http://10.1.2.3:9000", True, False),  # encrypted at rest: nothing readable
        ("https://minio.example:9000", False, False),
        ("http://127.0.0.1:8333", False, False),  # loopback never leaves the machine
        ("http://127.8.9.10:8333", False, False),
        ("http://[::1]:8333", False, False),
        ("http://localhost:8333", False, False),
    ],
)
async def test_plain_http_warns_unless_encrypted_or_loopback(
    endpoint: str, encrypted: bool, warns: bool
) -> None:
    store = S3Store("s3://bucket/fs", endpoint=endpoint)
    try:
        warning = transport_warning(store, encrypted)
        assert (warning is not None) == warns
        if warning:
            assert endpoint in warning and "--encrypt" in warning and "\n" not in warning
        wrapped = CryptStore(store, Keyring((b"k" * 32,), "test"))
        assert (transport_warning(wrapped, encrypted) is not None) == warns
    finally:
        await store.aclose()


def test_local_stores_never_warn() -> None:
    assert transport_warning(MemoryStore("x"), False) is None
