"""The analysis cache: what one pass computed, kept under the files' fingerprints in diskcache.

One record per computed row, so an analysis reads the records of its own files only, and a base's cache grows
with the rows ever computed against it (one keys × M × M record that every analysis loaded whole made a 2-model
analysis against a 200-model history cost 0.8 GiB):
- H: per file whose row was computed against a base (by fingerprint), its H entries on every key (float64
  bytes) against each file it was analysed with, by that file's fingerprint;
- per analysed delta (a model's fingerprint and its delta-from's): its tensor figures (outlier maxima, noise
  floor, signal; these also depend on ``rank_samples``), and its sign conflict counts against the deltas it
  was analysed with.
Every key is text made of the kind, the tool's version, the engine revision, the base's fingerprint and the
mode, and for H the key list's digest ("h|VERSION|REVISION|BASE|MODE|KEYS|FILE"; diskcache would pickle a
tuple key on every read). An entry is known when either file's record holds the other. Adding a model computes
its row and writes its record only. A changed file has a new fingerprint and is simply a new file to the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from ortho_mecha import __version__
from ortho_mecha.analysis import PassResult, RowStats
from ortho_mecha.cache import open_cache
from ortho_mecha.io import Model, fingerprint_now

ENGINE_REVISION = 5  # 5: one record per computed row (4: one record of every pair per base)
RowSig = tuple[str, str | None]
H_ROW, ROW, CONFLICTS, BASE = "h", "row", "conflicts", "base"


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


def _fill(records: list[dict], ids: list[str], put: Callable[[int, int, object], bool]) -> np.ndarray:
    """Which pairs the row ``records`` (id → value, one record per row, {} where none) know, each put by
    ``put(i, j, value)`` (which says whether it took the value) at (i, j) and (j, i)."""
    known = np.zeros((len(ids), len(ids)), dtype=bool)
    for i, record in enumerate(records):
        for j, other in enumerate(ids) if record else ():
            value = record.get(other)
            if value is not None and not known[i, j] and put(i, j, value):
                known[i, j] = known[j, i] = True
    return known


def _kept(r: int, n: int, computed: Collection[int]) -> list[int]:
    """The others row ``r``'s record takes among ``n``: a pair of two ``computed`` rows goes in the first one's
    record only (:func:`_fill` finds it from either side)."""
    return [j for j in range(n) if not (j < r and j in computed)]


class Store:
    """One base's cached analyses (see the module docstring)."""

    def __init__(self, base_fp: str, exact: bool, rank_samples: int, enabled: bool, base_path: str = "") -> None:
        self.tag = f"{__version__}|{ENGINE_REVISION}|{base_fp}|{'exact' if exact else 'default'}"
        self.rank_samples = int(rank_samples)
        self.base_path = base_path
        self.cache = open_cache("analysis") if enabled else None

    @classmethod
    def open(cls, base: Model, exact: bool, rank_samples: int, enabled: bool = True) -> Store:
        return cls(base.fingerprint, exact, rank_samples, enabled, str(base.path.absolute()))

    def _h_key(self, digest: str, fp: str) -> str:
        return f"{H_ROW}|{self.tag}|{digest}|{fp}"

    def _row_key(self, sig: RowSig) -> str:
        return f"{ROW}|{self.tag}|{self.rank_samples}|{_sig_text(sig)}"

    def _conflicts_key(self, sig: RowSig) -> str:
        return f"{CONFLICTS}|{self.tag}|{_sig_text(sig)}"

    def _records(self, record_keys: list[str]) -> list[dict]:
        assert self.cache is not None
        return [self.cache.get(key) or {} for key in record_keys]

    def lookup(self, keys: list[str], fps: list[str], sigs: list[RowSig]) -> Known:
        n_files, n_rows = len(fps), len(sigs)
        h = np.full((len(keys), n_files, n_files), np.nan)
        both, agree = np.full((n_rows, n_rows), np.nan), np.full((n_rows, n_rows), np.nan)
        stats: list[RowStats | None] = [None] * n_rows
        h_cached = np.zeros((n_files, n_files), dtype=bool)
        conflicts_cached = np.zeros((n_rows, n_rows), dtype=bool)

        def put_h(i: int, j: int, value: object) -> bool:
            if not isinstance(value, bytes) or len(value) != 8 * len(keys):
                return False
            h[:, i, j] = h[:, j, i] = np.frombuffer(value, dtype=np.float64)
            return True

        def put_counts(i: int, j: int, value: object) -> bool:
            (both[i, j], agree[i, j]) = (both[j, i], agree[j, i]) = value
            return True

        if self.cache is not None:
            with self.cache.transact():  # one transaction: each read's access time is written in it
                if keys:
                    digest = _keys_digest(keys)
                    h_cached = _fill(self._records([self._h_key(digest, fp) for fp in fps]), fps, put_h)
                texts = [_sig_text(sig) for sig in sigs]
                conflicts_cached = _fill(self._records([self._conflicts_key(sig) for sig in sigs]), texts, put_counts)
                stats = [self.cache.get(self._row_key(sig)) for sig in sigs]
        missing_files = _rows_covering(~h_cached) if keys else []
        without_stats = [r for r in range(n_rows) if stats[r] is None]
        unknown = ~conflicts_cached
        unknown[without_stats, :] = False
        unknown[:, without_stats] = False
        missing_rows = sorted(set(without_stats) | set(_rows_covering(unknown)))
        return Known(keys, h, h_cached, both, agree, conflicts_cached, stats, missing_files, missing_rows)

    def save(self, keys: list[str], fps: list[str], sigs: list[RowSig], known: Known) -> None:
        """Store the rows the pass computed: each computed file's H entries against every file of this analysis, and
        each computed delta's figures and conflict counts against every delta (added to its record; a pair of two
        computed rows in one of them, :func:`_kept`)."""
        if self.cache is None:
            return
        texts = [_sig_text(sig) for sig in sigs]
        h_rows, stat_rows = set(known.missing_files), set(known.missing_rows)
        with self.cache.transact():
            self.cache.set(f"{BASE}|{self.tag}", self.base_path)
            if keys:
                digest = _keys_digest(keys)
                for r in known.missing_files:
                    columns = {fps[j]: known.h[:, r, j].tobytes() for j in _kept(r, len(fps), h_rows)
                               if not np.isnan(known.h[:, r, j]).any()}
                    self._add_to(self._h_key(digest, fps[r]), columns)
            for r in known.missing_rows:
                counts = {texts[j]: (float(known.both[r, j]), float(known.agree[r, j]))
                          for j in _kept(r, len(texts), stat_rows)
                          if not (np.isnan(known.both[r, j]) or np.isnan(known.agree[r, j]))}
                self._add_to(self._conflicts_key(sigs[r]), counts)
                if known.stats[r] is not None:
                    self.cache.set(self._row_key(sigs[r]), known.stats[r])

    def _add_to(self, key: str, entries: dict) -> None:
        """The record ``key`` with ``entries`` added (a row computed again, against files its record lacked)."""
        assert self.cache is not None
        record = self.cache.get(key) or {}
        self.cache.set(key, record | entries)


def _current(key: object) -> list[str] | None:
    """A record key's parts ([kind, version, revision, base fingerprint, mode, …]) when it is of this version of
    the tool, else None."""
    parts = key.split("|") if isinstance(key, str) else []
    return parts if parts[1:3] == [__version__, str(ENGINE_REVISION)] and len(parts) >= 5 else None


def clear_stale() -> tuple[int, list[str]]:
    """Remove the records no analysis can use again: of another version of the tool, and of bases whose file is
    gone or has changed since (their figures are of the file as it was). Returns (records removed, the base
    files whose records went). Records of a base whose file is not known are kept."""
    cache = open_cache("analysis")
    keys = list(cache.iterkeys())
    gone: dict[str, str] = {}  # base fingerprint → its file
    for key in keys:
        parts = _current(key)
        if parts and parts[0] == BASE and (path := cache.get(key)) and fingerprint_now(path) != parts[3]:
            gone[parts[3]] = path
    removed = 0
    with cache.transact():
        for key in keys:
            parts = _current(key)
            if (parts is None or parts[3] in gone) and cache.delete(key):
                removed += 1
    return removed, sorted(set(gone.values()))


def cache_summary() -> dict:
    """What the analysis cache holds: per base (its file when known) and mode, the files and the analysed deltas
    it has figures of; records of other versions of the tool; size on disk."""
    cache = open_cache("analysis")
    bases: dict[tuple, dict] = {}
    older = 0
    for key in cache.iterkeys():
        parts = _current(key)
        if parts is None:
            older += 1
            continue
        kind, base_fp, exact = parts[0], parts[3], parts[4] == "exact"
        entry = bases.setdefault((base_fp, exact), {"base": None, "files": set(), "rows": set()})
        if kind == BASE:
            entry["base"] = cache.get(key)
        elif kind == H_ROW:
            entry["files"].add(parts[-1])
        elif kind == ROW:
            entry["rows"].add(parts[-1])
    records = [
        {"base": found["base"], "base_fingerprint": base_fp, "exact": exact, "files": len(found["files"]),
         "rows": len(found["rows"])}
        for (base_fp, exact), found in bases.items()
    ]
    return {"location": str(cache.directory), "bytes": cache.volume(), "records": records, "older_records": older}
