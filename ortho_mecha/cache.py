"""Where ortho-mecha keeps its state: analysis results, file hashes and job records, in diskcache.

The location is ``$ORTHO_MECHA_CACHE`` (default ``~/.cache/ortho-mecha``); each concern has its own
sub-cache so clearing analyses does not lose running jobs.
"""

from __future__ import annotations

import os
from pathlib import Path

import diskcache


def cache_dir() -> Path:
    """The cache root: ``$ORTHO_MECHA_CACHE`` or ``~/.cache/ortho-mecha``."""
    configured = os.environ.get("ORTHO_MECHA_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ortho-mecha"


def open_cache(name: str) -> diskcache.Cache:
    """The named sub-cache (``analysis``, ``hashes``, ``jobs``, ...), created on first use."""
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return diskcache.Cache(str(path), size_limit=2**40, eviction_policy="least-recently-used")
