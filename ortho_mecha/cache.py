"""Where ortho-mecha keeps its state: analysis results, file hashes and job records, in diskcache.

The location is ``$ORTHO_MECHA_CACHE`` (default ``~/.cache/ortho-mecha``); each concern has its own
sub-cache so clearing analyses does not lose running jobs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import diskcache

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.progress import counted


def cache_dir() -> Path:
    """The cache root: ``$ORTHO_MECHA_CACHE`` or ``~/.cache/ortho-mecha``."""
    configured = os.environ.get("ORTHO_MECHA_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ortho-mecha"


class CacheUnusable(OrthoMechaError):
    """A sub-cache's database cannot be opened or read: corrupt (a crash, a bad disk, a sync tool) or read-only."""

    def __init__(self, error: sqlite3.DatabaseError, path: Path | None = None) -> None:
        where = path or cache_dir()
        # a database this user may not write (another user's, a read-only mount) is fine: it must not be cleared
        self.read_only = "readonly" in str(error) or not os.access(where, os.W_OK)
        if self.read_only:
            message = ("the cache cannot be written here (another user's, or read-only); set ORTHO_MECHA_CACHE to a "
                       "folder of yours (analyse --no-cache runs without it)")
        else:
            message = (f"the cache database is unusable ({error}); `ortho-mecha cache clear` removes it (analyses "
                       "and file hashes are then computed again), or set ORTHO_MECHA_CACHE to another folder "
                       "(analyse --no-cache runs without it)")
        super().__init__(message, where)


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
    except sqlite3.DatabaseError as exc:
        raise CacheUnusable(exc, path) from exc


CLEARED = ("analysis", "hashes")


def cli_cache(args) -> int:
    """``ortho-mecha cache show|clear [--stale]``: what the cache holds, or empty it (jobs are kept), or with
    ``--stale`` remove only the analyses no analysis can use again. A sub-cache whose database cannot be opened or
    read is removed whole."""
    if args.stale and args.action != "clear":
        raise OrthoMechaError("--stale goes with clear: ortho-mecha cache clear --stale")
    if cache_dir().exists() and not cache_dir().is_dir():
        raise OrthoMechaError("is not a folder: set ORTHO_MECHA_CACHE to a folder (it is made if missing)", cache_dir())
    if not cache_dir().is_dir():  # looking, or clearing nothing, makes no folder
        print(f"cache: {cache_dir()} (empty: nothing analysed yet)")
        return 0
    if args.action == "clear" and args.stale:
        return _clear_stale()
    if args.action == "clear":
        for name in CLEARED:
            try:
                with open_cache(name) as cache:
                    cache.clear()
            except CacheUnusable as error:
                if error.read_only:
                    raise
                _remove(name)
            except sqlite3.DatabaseError:
                _remove(name)
        print(f"cleared {', '.join(CLEARED)} under {cache_dir()}")
        return 0
    from ortho_mecha.analysis_cache import cache_summary

    summary = cache_summary()
    if not summary["records"] and not summary["older_records"]:
        print(f"cache: {cache_dir()} (empty: nothing analysed yet)")
        return 0
    print(f"cache: {cache_dir()} ({summary['bytes'] / 2**20:.1f} MiB of analyses)")
    stale = bool(summary["older_records"])
    for record in summary["records"]:
        mode = "exact" if record["exact"] else "default"
        base = record["base_fingerprint"][:12]
        if record["base"]:
            now = _base_now(record["base"], record["base_fingerprint"])  # (reads the file's header and samples)
            stale = stale or bool(now)
            base = f"{record['base']} ({base}{now})"
        print(f"  base {base}, {mode}: {counted(record['files'], 'file')}, {counted(record['rows'], 'analysed delta')}")
    if summary["older_records"]:
        print(f"  {counted(summary['older_records'], 'record')} of another version of ortho-mecha "
              "('ortho-mecha cache clear' removes them)")
    if stale:
        print("  'ortho-mecha cache clear --stale' removes only what no analysis can use again")
    return 0


def _clear_stale() -> int:
    """``cache clear --stale``: the analysis records of bases gone or changed, and of other versions, removed."""
    from ortho_mecha.analysis_cache import clear_stale

    removed, bases = clear_stale()
    said = f" (analyses against {', '.join(bases)}: gone or changed since)" if bases else ""
    print(f"removed {counted(removed, 'stale record')} under {cache_dir()}{said}; file hashes and the other "
          "analyses are kept")
    return 0


def _base_now(path: str, fingerprint: str) -> str:
    """'' when the base file at ``path`` is still the one of ``fingerprint``, else what became of it (said beside
    the record: its figures serve the old file only)."""
    from ortho_mecha.io import fingerprint_now

    now = fingerprint_now(path)
    if now is None:
        return "; no such file now"
    return "" if now == fingerprint else "; the file has changed since"


def _remove(name: str) -> None:
    """Remove the sub-cache ``name`` whose database cannot be read (corrupt), or say that it cannot be."""
    shutil.rmtree(cache_dir() / name, ignore_errors=True)
    if (cache_dir() / name).exists():
        raise OrthoMechaError("the cache database is unusable and cannot be removed; remove the folder yourself",
                              cache_dir() / name)
