"""Every merge method side by side for the same rows: predicted survival, interference and merged size, from G.

The Mixer's rows give per-key delta Grams ``G_k`` (rows × rows, :func:`ortho_mecha.workspace.row_gram`);
every method of :data:`ortho_mecha.plan.METHODS` turns the rows into a merged delta
``Δ_k = Σ_i a_ki δ_ik`` whose coefficients ``a`` come from :func:`ortho_mecha.metrics.merged_coefficients`
(exact for ``weighted_sum``, ``add_difference``, ``ortho_superpose`` at granularity ``key``, ``ortho_project``
and ``geometric_median``; an estimate for the others — :func:`ortho_mecha.metrics.survival_label`). From ``a`` and
``G`` alone, with no file read:

- survival of row i: ``s_i = Σ_k (G_k a_k)_i / Σ_k (G_k)_ii`` (1: the merge carries the row's whole delta
  along its direction; 0: none of it; above 1: more than it, e.g. when rows double count one change);
- interference: ``Σ_i cos²(Δ, δ_i) − 1 = Σ_i s_i² ‖δ_i‖² / ‖Δ‖² − 1`` — how many rows beyond one carry
  the merged direction: 0 when the rows split it without overlap (orthogonal rows, whatever the method),
  ``n − 1`` when n rows all carry it (they double count one change), negative when the merge points where
  rows cancel (it is made of their differences). It depends on the merged delta only, not on how it is
  written as a combination of dependent rows; for two rows of equal weighted norm at cosine c under
  ``add_difference`` it is c, the Mixer's row interference summed over the pair. Not defined (NaN) when
  the merged delta is zero;
- norm ratio: ``‖Δ‖ / sqrt(Σ_i ‖w_i δ_i‖²)`` with ``‖Δ‖² = Σ_k a_kᵀ G_k a_k`` and ``w_i = α_i r_i`` the
  row's weight in the Mixer: 1 when the merge is as large as the weighted rows laid side by side at right
  angles (orthogonal rows under ``add_difference``), below 1 when it averages or cancels them, above 1 when
  it adds overlapping rows in full.

Each method is predicted at its default options, except the Mixer's current method, at the user's. A
method that needs more rows than there are (``model_stock`` needs two) is listed with a note and no
figures. ``ortho_superpose`` at granularity ``row`` solves per output row of each matrix, which the kept
per-key Grams cannot see: it is predicted at granularity ``key`` and marked as an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ortho_mecha import metrics
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.gram import cosine
from ortho_mecha.plan import METHODS

ROW_COLUMNS = ("method", "row", "survival", "basis", "current")
# a merged delta whose energy is below this fraction of the weighted rows' counts as zero (float64 rounding of G)
ZERO_ENERGY = 1e-12
SUMMARY_COLUMNS = (
    "method", "basis", "options", "mean survival", "min survival", "interference", "norm ratio", "current", "note",
)


def row_weights(method: str, alphas: Sequence[float], repeats: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """(weights, listed repeats) as :func:`ortho_mecha.metrics.predicted_survival` takes them for ``method``:
    ``α_i r_i`` and None where a repeat scales the row, ``α_i`` and ``r_i`` where it lists the row r_i times."""
    alphas, counts = np.asarray(alphas, dtype=np.float64), np.asarray(repeats, dtype=np.float64)
    if METHODS[method].repeat == "list":
        return alphas, counts
    return alphas * counts, None


@dataclass(frozen=True)
class Comparison:
    """The methods side by side: a tidy per-row table, a per-method summary and the rows' own figures."""

    rows: pd.DataFrame  # ROW_COLUMNS: one line per (method, row)
    summary: pd.DataFrame  # SUMMARY_COLUMNS: one line per method
    orthogonality: float  # mean over pairs of rows of 1 − cos² (DESIGN §4); 1 for a single row
    row_interference: float  # Σ_{i≠j} metrics.interference(G, α r): the rows' overlap in a plain sum

    def survival_table(self) -> pd.DataFrame:
        """Survival with one line per row and one column per method (methods in :data:`METHODS` order)."""
        order = list(dict.fromkeys(self.rows["method"]))
        rows = list(dict.fromkeys(self.rows["row"]))
        wide = self.rows.pivot(index="row", columns="method", values="survival").reindex(index=rows, columns=order)
        wide.columns.name = None
        return wide.reset_index()


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in options.items())


def _unique(labels: Sequence[str]) -> list[str]:
    """The labels with a second, third… use of one numbered (a model may be a row twice, from two delta-froms)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _figures(key_grams: np.ndarray, coefficients: np.ndarray, reference: float) -> tuple[np.ndarray, float, float]:
    """(survival per row, interference, norm ratio) of the merged delta with per-key ``coefficients``."""
    survival = metrics.survival_of(key_grams, coefficients)
    energy = max(float(np.einsum("kij,ki,kj->", key_grams, coefficients, coefficients)), 0.0)  # ‖Δ‖²
    own = np.diagonal(key_grams, axis1=-2, axis2=-1).sum(axis=0)  # ‖δ_i‖²
    if reference <= 0 or energy <= ZERO_ENERGY * reference:
        return survival, math.nan, 0.0
    interference = float((survival**2 * own).sum()) / energy - 1.0
    return survival, interference, math.sqrt(energy / reference)


def compare_methods(
    key_grams: np.ndarray,
    labels: Sequence[str],
    alphas: Sequence[float],
    repeats: Sequence[int],
    current: str,
    options: Mapping[str, Any],
    floors: np.ndarray | float = 0.0,
    rotation_shares: np.ndarray | float = 1.0,
) -> Comparison:
    """Every method of :data:`METHODS` on the same rows (module docstring for the figures).

    ``key_grams``: the rows' per-key delta Grams (keys, n, n) — or one Gram (n, n); ``labels``, ``alphas``,
    ``repeats``: each row's name, alpha and repeat (``alphas`` (keys, n) with block alphas: each row's alpha per
    key); ``current``/``options``: the Mixer's method and its options (other methods take their defaults);
    ``floors``: per key, ``ortho_superpose``'s rounding-noise floor
    (:attr:`ortho_mecha.analysis.Analysis.noise_floors`); ``rotation_shares``: per key, what ``orthomerge``'s
    rotation carries (:attr:`ortho_mecha.analysis.Analysis.rotation_shares`).
    """
    if current not in METHODS:
        raise OrthoMechaError(f"unknown method {current!r}; valid: {', '.join(METHODS)}")
    grams = np.asarray(key_grams, dtype=np.float64)
    grams = grams[None] if grams.ndim == 2 else grams
    n = len(labels)
    alphas = np.asarray(alphas, dtype=np.float64)
    if grams.shape[1:] != (n, n) or alphas.shape not in ((n,), (len(grams), n)) or len(repeats) != n:
        raise ValueError(f"{n} rows need (keys, {n}, {n}) Grams, {n} alphas (or keys × {n}) and {n} repeats, got "
                         f"{grams.shape}, {alphas.shape}, {len(repeats)}")
    labels = _unique(labels)
    total = grams.sum(axis=0)
    # each row's weight on each key: a block alpha scales the row's delta on its group's keys only
    weights = np.broadcast_to(alphas * np.asarray(repeats, dtype=np.float64), (len(grams), n))
    weighted = np.einsum("kij,ki,kj->ij", grams, weights, weights)  # the Gram of the weighted deltas
    reference = float(np.trace(weighted))  # Σ_i ‖w_i δ_i‖²
    per_row: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for name, spec in METHODS.items():
        chosen = {**spec.defaults(), **dict(options)} if name == current else spec.defaults()
        line = {"method": name, "options": _options_text(chosen), "current": name == current, "note": ""}
        if n < spec.min_rows:
            summary.append(line | {"basis": "not predicted", "mean survival": math.nan, "min survival": math.nan,
                                   "interference": math.nan, "norm ratio": math.nan,
                                   "note": f"needs at least {spec.min_rows} rows"})
            continue
        basis = metrics.survival_label(name, chosen)
        if chosen.get("granularity") == "row":
            line["note"] = "granularity 'row' predicted per key"
        w, listed = row_weights(name, alphas, repeats)
        coefficients = metrics.merged_coefficients(grams, name, w, chosen, listed, floors, rotation_shares)
        survival, interference, ratio = _figures(grams, coefficients, reference)
        if math.isnan(interference):
            line["note"] = "; ".join(filter(None, [line["note"], "the merged delta is zero"]))
        per_row += [{"method": name, "row": label, "survival": float(value), "basis": basis, "current": name == current}
                    for label, value in zip(labels, survival, strict=True)]
        summary.append(line | {"basis": basis, "mean survival": float(survival.mean()),
                               "min survival": float(survival.min()), "interference": interference,
                               "norm ratio": ratio})
    cos = cosine(total)
    pairs = np.triu_indices(n, k=1)
    orthogonality = float((1.0 - cos[pairs] ** 2).mean()) if n > 1 else 1.0
    return Comparison(
        rows=pd.DataFrame(per_row, columns=list(ROW_COLUMNS)),
        summary=pd.DataFrame(summary, columns=list(SUMMARY_COLUMNS)),
        orthogonality=orthogonality,
        row_interference=float(metrics.interference(weighted, np.ones(n)).sum()),
    )


def compare_rows(rows: Any, method: str, options: Mapping[str, Any]) -> Comparison:
    """:func:`compare_methods` for the Mixer's :class:`~ortho_mecha.workspace.RowGram`."""
    per_key = rows.key_alphas()  # with block alphas, as the Mixer's predicted figures take them
    return compare_methods(rows.key_grams, rows.labels, rows.alphas if per_key is None else per_key, rows.repeats,
                           method, options, rows.floors, rows.rotation_shares)
