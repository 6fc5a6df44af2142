"""The analysis cache: what one pass computed, kept under the files' fingerprints in diskcache.

Two records per base (by its fingerprint, the mode and the tool's version):
- the Gram store: for every file ever analysed against this base, its H entries per key against the
  others it was analysed with (unknown pairs are NaN), so adding a model computes one new row;
- the row store: for every analysed delta (a model's fingerprint and its delta-from's), its tensor
  figures (outlier maxima, noise floor, signal; these also depend on ``rank_samples``) and its sign
  conflict counts against the other rows it was analysed with.
A changed file has a new fingerprint and is simply a new file to the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ortho_mecha import __version__
from ortho_mecha.analysis import PassResult, RowStats
from ortho_mecha.cache import open_cache
from ortho_mecha.io import Model

ENGINE_REVISION = 4  # 4: signal keys are matrices first; a zero delta has no signal figures
RowSig = tuple[str, str | None]


@dataclass
class Known:
    """The cached part of a requested analysis, and what a pass must still compute."""

    h_key: dict[str, np.ndarray]
    both: np.ndarray
    agree: np.ndarray
    stats: list[RowStats | None]
    missing_files: list[int] = field(default_factory=list)
    missing_rows: list[int] = field(default_factory=list)

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


def _take(matrix: np.ndarray, index: list[int | None]) -> np.ndarray:
    """matrix[index][:, index] with None positions (not in the store) as NaN."""
    n = len(index)
    out = np.full((n, n), np.nan)
    have = [i for i, j in enumerate(index) if j is not None]
    src = [index[i] for i in have]
    if have:
        out[np.ix_(have, have)] = matrix[np.ix_(src, src)]
    return out


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


class Store:
    """One base's cached analyses (see the module docstring)."""

    def __init__(self, base_fp: str, exact: bool, rank_samples: int, enabled: bool) -> None:
        tag = (__version__, ENGINE_REVISION, base_fp, bool(exact))
        self.gram_key = ("gram", *tag)
        self.rows_key = ("rows", *tag, int(rank_samples))
        self.enabled = enabled
        self.cache = open_cache("analysis") if enabled else None

    @classmethod
    def open(cls, base: Model, exact: bool, rank_samples: int, enabled: bool = True) -> Store:
        return cls(base.fingerprint, exact, rank_samples, enabled)

    def _get(self, key: tuple) -> dict | None:
        return self.cache.get(key) if self.cache is not None else None

    def lookup(self, keys: list[str], fps: list[str], sigs: list[RowSig]) -> Known:
        n_files, n_rows = len(fps), len(sigs)
        gram = self._get(self.gram_key)
        if gram is not None and gram["keys"] == keys:
            pos = {fp: i for i, fp in enumerate(gram["fps"])}
            index = [pos.get(fp) for fp in fps]
            h_key = {k: _take(gram["h"][j], index) for j, k in enumerate(keys)}
        else:
            h_key = {k: np.full((n_files, n_files), np.nan) for k in keys}
        probe = h_key[keys[0]] if keys else np.zeros((n_files, n_files))
        missing_files = _rows_covering(np.isnan(probe))

        rows = self._get(self.rows_key)
        if rows is not None:
            pos = {sig: i for i, sig in enumerate(rows["sigs"])}
            index = [pos.get(sig) for sig in sigs]
            both, agree = _take(rows["both"], index), _take(rows["agree"], index)
            stats = [None if j is None else rows["stats"][j] for j in index]
        else:
            both, agree = np.full((n_rows, n_rows), np.nan), np.full((n_rows, n_rows), np.nan)
            stats = [None] * n_rows
        without_stats = [r for r in range(n_rows) if stats[r] is None]
        unknown = np.isnan(both)
        unknown[without_stats, :] = False
        unknown[:, without_stats] = False
        missing_rows = sorted(set(without_stats) | set(_rows_covering(unknown)))
        return Known(h_key, both, agree, stats, missing_files, missing_rows)

    def save(self, keys: list[str], fps: list[str], sigs: list[RowSig], known: Known) -> None:
        if self.cache is None:
            return
        with self.cache.transact():
            self._save_gram(keys, fps, known)
            self._save_rows(sigs, known)

    def _save_gram(self, keys: list[str], fps: list[str], known: Known) -> None:
        gram = self._get(self.gram_key)
        if gram is None or gram["keys"] != keys:
            gram = {"keys": keys, "fps": [], "h": np.zeros((len(keys), 0, 0))}
        all_fps = list(gram["fps"]) + [fp for fp in dict.fromkeys(fps) if fp not in gram["fps"]]
        m_old, m = len(gram["fps"]), len(all_fps)
        h = np.full((len(keys), m, m), np.nan)
        h[:, :m_old, :m_old] = gram["h"]
        pos = {fp: i for i, fp in enumerate(all_fps)}
        index = [pos[fp] for fp in fps]
        for j, key in enumerate(keys):
            block = h[j][np.ix_(index, index)]
            np.copyto(block, known.h_key[key], where=~np.isnan(known.h_key[key]))
            h[j][np.ix_(index, index)] = block
        self.cache.set(self.gram_key, {"keys": keys, "fps": all_fps, "h": h})

    def _save_rows(self, sigs: list[RowSig], known: Known) -> None:
        empty = np.zeros((0, 0))
        rows = self._get(self.rows_key) or {"sigs": [], "stats": [], "both": empty, "agree": empty}
        all_sigs = list(rows["sigs"]) + [s for s in dict.fromkeys(sigs) if s not in rows["sigs"]]
        r_old, r = len(rows["sigs"]), len(all_sigs)
        pos = {s: i for i, s in enumerate(all_sigs)}
        index = [pos[s] for s in sigs]
        stats: list[RowStats | None] = list(rows["stats"]) + [None] * (r - r_old)
        for i, st in zip(index, known.stats, strict=True):
            if st is not None:
                stats[i] = st
        merged = {"sigs": all_sigs, "stats": stats}
        for name in ("both", "agree"):
            full = np.full((r, r), np.nan)
            full[:r_old, :r_old] = rows[name]
            block = full[np.ix_(index, index)]
            values = getattr(known, name)
            np.copyto(block, values, where=~np.isnan(values))
            full[np.ix_(index, index)] = block
            merged[name] = full
        self.cache.set(self.rows_key, merged)


def cache_summary() -> dict:
    """What the analysis cache holds: bases, files and rows per base, size on disk."""
    cache = open_cache("analysis")
    entries = []
    for key in cache.iterkeys():
        value = cache.get(key)
        if value is None:
            continue
        kind = key[0]
        count = len(value["fps"]) if kind == "gram" else len(value["sigs"])
        entries.append({"kind": kind, "base_fingerprint": key[3], "exact": key[4], "entries": count})
    return {"location": str(cache.directory), "bytes": cache.volume(), "records": entries}
