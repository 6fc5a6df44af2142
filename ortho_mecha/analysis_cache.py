"""The analysis cache: what one pass computed, kept under the files' fingerprints in diskcache.

Small records, one per pair, so an analysis reads only the pairs it asks for and the cache of a base grows with
the pairs ever analysed, not with their square times the keys in one record that every analysis loads whole:
- H: per pair of files analysed against a base (by fingerprint), their H entry on every key (float64 bytes);
- per analysed delta (a model's fingerprint and its delta-from's): its tensor figures (outlier maxima, noise
  floor, signal; these also depend on ``rank_samples``);
- per pair of analysed deltas: their sign conflict counts.
All are keyed by the tool's version, the engine revision, the base's fingerprint and the mode; H also by the
key list. Adding a model computes one new row and stores its pairs only. A changed file has a new fingerprint
and is simply a new file to the store.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np

from ortho_mecha import __version__
from ortho_mecha.analysis import PassResult, RowStats
from ortho_mecha.cache import open_cache
from ortho_mecha.io import Model

ENGINE_REVISION = 5  # 5: one record per pair (4: one record of every pair per base)
RowSig = tuple[str, str | None]
H_PAIR, ROW, CONFLICTS, BASE = "h", "row", "conflicts", "base"


@dataclass
class Known:
    """The cached part of a requested analysis, and what a pass must still compute."""

    keys: list[str]
    h: np.ndarray  # keys × files × files, NaN where not known; ``h_key`` views it per key
    h_cached: np.ndarray  # files × files: the H entries the cache had
    both: np.ndarray
    agree: np.ndarray
    conflicts_cached: np.ndarray  # rows × rows: the conflict counts the cache had
    stats: list[RowStats | None]
    missing_files: list[int] = field(default_factory=list)
    missing_rows: list[int] = field(default_factory=list)
    h_key: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.h_key = {k: self.h[j] for j, k in enumerate(self.keys)}

    def fill(self, result: PassResult) -> None:
        for key, computed in result.h_key.items():
            target = self.h_key[key]
            np.copyto(target, computed, where=np.isnan(target) & ~np.isnan(computed))
        rows = sorted(result.stats)
        if rows:
            self.both[rows, :] = result.both[rows, :]
            self.both[:, rows] = result.both[:, rows]
            self.agree[rows, :] = result.agree[rows, :]
            self.agree[:, rows] = result.agree[:, rows]
        for r, st in result.stats.items():
            self.stats[r] = st


def _rows_covering(unknown: np.ndarray) -> list[int]:
    """Few rows whose computation (each against all files) fills every unknown entry of a symmetric matrix:
    greedily the row with the most unknown entries left, so a new file costs one row, not the matrix."""
    unknown = unknown.copy()
    rows = []
    while unknown.any():
        r = int(unknown.sum(axis=1).argmax())
        rows.append(r)
        unknown[r, :] = False
        unknown[:, r] = False
    return sorted(rows)


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()[:16]


def _sig_text(sig: RowSig) -> str:
    return sig[0] if sig[1] is None else f"{sig[0]}-{sig[1]}"


def _pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.combinations_with_replacement(range(n), 2))


def _ordered(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


class Store:
    """One base's cached analyses (see the module docstring)."""

    def __init__(self, base_fp: str, exact: bool, rank_samples: int, enabled: bool, base_path: str = "") -> None:
        self.tag = (__version__, ENGINE_REVISION, base_fp, bool(exact))
        self.rank_samples = int(rank_samples)
        self.base_path = base_path
        self.enabled = enabled
        self.cache = open_cache("analysis") if enabled else None

    @classmethod
    def open(cls, base: Model, exact: bool, rank_samples: int, enabled: bool = True) -> Store:
        return cls(base.fingerprint, exact, rank_samples, enabled, str(base.path.absolute()))

    def _h_key(self, digest: str, a: str, b: str) -> tuple:
        return (H_PAIR, *self.tag, digest, *_ordered(a, b))

    def _row_key(self, sig: RowSig) -> tuple:
        return (ROW, *self.tag, self.rank_samples, _sig_text(sig))

    def _conflicts_key(self, a: RowSig, b: RowSig) -> tuple:
        return (CONFLICTS, *self.tag, *_ordered(_sig_text(a), _sig_text(b)))

    def lookup(self, keys: list[str], fps: list[str], sigs: list[RowSig]) -> Known:
        n_files, n_rows = len(fps), len(sigs)
        h = np.full((len(keys), n_files, n_files), np.nan)
        both, agree = np.full((n_rows, n_rows), np.nan), np.full((n_rows, n_rows), np.nan)
        stats: list[RowStats | None] = [None] * n_rows
        h_cached = np.zeros((n_files, n_files), dtype=bool)
        conflicts_cached = np.zeros((n_rows, n_rows), dtype=bool)
        if self.cache is not None:
            digest = _keys_digest(keys)
            with self.cache.transact():  # one transaction: each read's access time is written in it
                for i, j in _pairs(n_files) if keys else []:
                    value = self.cache.get(self._h_key(digest, fps[i], fps[j]))
                    if value is not None and len(value) == 8 * len(keys):
                        h[:, i, j] = h[:, j, i] = np.frombuffer(value, dtype=np.float64)
                        h_cached[i, j] = h_cached[j, i] = True
                stats = [self.cache.get(self._row_key(sig)) for sig in sigs]
                for i, j in _pairs(n_rows):
                    value = self.cache.get(self._conflicts_key(sigs[i], sigs[j]))
                    if value is not None:
                        (both[i, j], agree[i, j]) = (both[j, i], agree[j, i]) = value
                        conflicts_cached[i, j] = conflicts_cached[j, i] = True
        missing_files = _rows_covering(~h_cached) if keys else []
        without_stats = [r for r in range(n_rows) if stats[r] is None]
        unknown = ~conflicts_cached
        unknown[without_stats, :] = False
        unknown[:, without_stats] = False
        missing_rows = sorted(set(without_stats) | set(_rows_covering(unknown)))
        return Known(keys, h, h_cached, both, agree, conflicts_cached, stats, missing_files, missing_rows)

    def save(self, keys: list[str], fps: list[str], sigs: list[RowSig], known: Known) -> None:
        """Store what ``known`` has that the cache did not: new pairs' H entries and conflicts, new rows' figures."""
        if self.cache is None:
            return
        digest = _keys_digest(keys)
        with self.cache.transact():
            self.cache.set((BASE, *self.tag), self.base_path)
            for i, j in _pairs(len(fps)) if keys else []:
                column = known.h[:, i, j]
                if not known.h_cached[i, j] and not np.isnan(column).any():
                    self.cache.set(self._h_key(digest, fps[i], fps[j]), np.ascontiguousarray(column).tobytes())
            for r in known.missing_rows:
                if known.stats[r] is not None:
                    self.cache.set(self._row_key(sigs[r]), known.stats[r])
            for i, j in _pairs(len(sigs)):
                counts = (float(known.both[i, j]), float(known.agree[i, j]))
                if not known.conflicts_cached[i, j] and not np.isnan(counts).any():
                    self.cache.set(self._conflicts_key(sigs[i], sigs[j]), counts)


def cache_summary() -> dict:
    """What the analysis cache holds: per base (its file when known) and mode, the files and the analysed deltas
    it has figures of; records of other versions of the tool; size on disk."""
    cache = open_cache("analysis")
    bases: dict[tuple, dict] = {}
    older = 0
    for key in cache.iterkeys():
        if not isinstance(key, tuple) or len(key) < 5 or key[1:3] != (__version__, ENGINE_REVISION):
            older += 1
            continue
        kind, (base_fp, exact) = key[0], key[3:5]
        entry = bases.setdefault((base_fp, exact), {"base": None, "files": set(), "rows": set()})
        if kind == BASE:
            entry["base"] = cache.get(key)
        elif kind == H_PAIR:
            entry["files"].update(key[-2:])
        elif kind == ROW:
            entry["rows"].add(key[-1])
    records = [
        {"base": found["base"], "base_fingerprint": base_fp, "exact": exact, "files": len(found["files"]),
         "rows": len(found["rows"])}
        for (base_fp, exact), found in bases.items()
    ]
    return {"location": str(cache.directory), "bytes": cache.volume(), "records": records, "older_records": older}
