"""Where ortho-mecha keeps its state: analysis results, file hashes and job records, in diskcache.

The location is ``$ORTHO_MECHA_CACHE`` (default ``~/.cache/ortho-mecha``); each concern has its own
sub-cache so clearing analyses does not lose running jobs.
"""

from __future__ import annotations

import os
from pathlib import Path

import diskcache

from ortho_mecha.errors import OrthoMechaError


def cache_dir() -> Path:
    """The cache root: ``$ORTHO_MECHA_CACHE`` or ``~/.cache/ortho-mecha``."""
    configured = os.environ.get("ORTHO_MECHA_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ortho-mecha"


def open_cache(name: str) -> diskcache.Cache:
    """The named sub-cache (``analysis``, ``hashes``, ``jobs``, ...), created on first use."""
    path = cache_dir() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        return diskcache.Cache(str(path), size_limit=2**40, eviction_policy="least-recently-used")
    except OSError as exc:
        raise OrthoMechaError(
            f"cannot use the cache folder ({exc.strerror or exc}); set ORTHO_MECHA_CACHE to a writable folder "
            "(analyse --no-cache runs without it)", path
        ) from exc


CLEARED = ("analysis", "hashes")


def cli_cache(args) -> int:
    """``ortho-mecha cache show|clear``: what the cache holds, or empty it (jobs are kept)."""
    if args.action == "clear":
        for name in CLEARED:
            with open_cache(name) as cache:
                cache.clear()
        print(f"cleared {', '.join(CLEARED)} under {cache_dir()}")
        return 0
    from ortho_mecha.analysis_cache import cache_summary

    summary = cache_summary()
    print(f"cache: {cache_dir()} ({summary['bytes'] / 2**20:.1f} MiB of analyses)")
    for record in summary["records"]:
        mode = "exact" if record["exact"] else "default"
        print(f"  {record['kind']}: base {record['base_fingerprint'][:12]} ({mode}), {record['entries']} entries")
    return 0
