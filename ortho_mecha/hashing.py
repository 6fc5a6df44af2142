"""Full sha256 of input files, cached by fingerprint so an unchanged file is hashed once.

The cache (``open_cache("hashes")``) is keyed by the resolved path, size and mtime in nanoseconds: a
rewritten or touched file gets a new key and is hashed again. A file that changes while it is being
hashed is not cached.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

from ortho_mecha.cache import CacheUnusable, open_cache
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import file_stamp

logger = logging.getLogger(__name__)

CHUNK = 16 * 2**20
_warned: list[bool] = []  # whether this process said it hashes without the cache


def _fingerprint(path: Path) -> tuple[str, str, int, int]:
    return ("sha256", str(path), *file_stamp(path))


def sha256_file(path: str | Path) -> str:
    """The full lowercase hex sha256 of ``path`` (from the cache when the file is unchanged)."""
    path = Path(path).resolve()
    try:
        key = _fingerprint(path)
    except OSError as exc:
        raise OrthoMechaError(f"cannot hash: {exc.strerror or exc}", path) from exc
    cached = _cached(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as fh:
        while size := fh.readinto(buffer):
            digest.update(buffer[:size])
    value = digest.hexdigest()
    if _fingerprint(path) == key:
        _remember(key, value)
    else:
        logger.warning("%s changed while it was hashed; its hash is not cached", path)
    return value


def _cached(key: tuple[str, str, int, int]) -> str | None:
    """The cached hash of ``key``; None when there is none, or the cache cannot be read (then the file is hashed:
    the cache only saves time)."""
    try:
        with open_cache("hashes") as cache:
            cached = cache.get(key)
    except (CacheUnusable, sqlite3.DatabaseError) as error:
        if not _warned:
            logger.warning("hashing without the cache: %s", error)
            _warned.append(True)  # once per process, not per file
        return None
    return cached if isinstance(cached, str) else None


def _remember(key: tuple[str, str, int, int], value: str) -> None:
    try:
        with open_cache("hashes") as cache:
            cache.set(key, value)
    except (CacheUnusable, sqlite3.DatabaseError) as error:
        logger.debug("hash not cached: %s", error)
