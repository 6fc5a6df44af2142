"""Survival of each row in a merge: predicted from the analysis before, measured on the output after.

A row's survival is ``<Δ_out, δ_i> / ‖δ_i‖²`` for its raw delta ``δ_i = M_i − B_i``: 1 means the merge
carries the row's whole delta along its direction. The prediction comes from the rows' per-key Grams
(:func:`metrics.predicted_survival`, exact for linear methods, ``ortho_project`` and key-wise
``ortho_superpose``; rows with block alphas weigh each key by its group's alpha). The measurement adds
the merged file to the same cached analysis: the pass only computes its one new Gram row, and
``<Δ_out, δ_i>`` follows from H by the delta identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ortho_mecha import blocks
from ortho_mecha.analysis import Analysis, Progress, analyse
from ortho_mecha.gram import selection_matrix
from ortho_mecha.metrics import predicted_survival, survival_label
from ortho_mecha.plan import Plan


def _row_files(plan: Plan, extra: list[Path]) -> tuple[list[Path], list[tuple[int, int | None]]]:
    """Every file the rows use (row models first, then delta-froms and extras) and each row's (model, from)."""
    rows = [r for r in plan.rows if r.enabled]
    models = list(dict.fromkeys(r.model.resolve() for r in rows))
    froms = [r.delta_from.resolve() for r in rows if r.delta_from is not None]
    files = models + [f for f in dict.fromkeys([*froms, *(p.resolve() for p in extra)]) if f not in models]
    index = {f: i for i, f in enumerate(files)}
    pairs = [(index[r.model.resolve()], None if r.delta_from is None else index[r.delta_from.resolve()]) for r in rows]
    return files, pairs


def _weights(plan: Plan, keys: list[str]) -> tuple[np.ndarray, list[int]]:
    """Each enabled row's weight for :func:`predicted_survival`, per key of ``keys`` when a row has block alphas."""
    rows = [r for r in plan.rows if r.enabled]
    alphas = np.asarray([float(r.alpha) for r in rows])
    if any(r.block_alphas for r in rows):
        alphas = blocks.key_alphas(keys, blocks.base_layout(plan.base), alphas, [r.block_alphas for r in rows])
    if plan.spec.repeat == "list":
        return alphas, [int(r.repeat) for r in rows]
    return alphas * np.asarray([r.repeat for r in rows]), [1] * len(rows)


def _rows(plan: Plan, extra: list[Path], progress: Progress | None) -> tuple[Analysis, np.ndarray, np.ndarray]:
    """The analysis of every file the plan (and ``extra``) uses, each file a row of H against the base; the
    rows' selection matrix T; and the rows' per-key delta Grams T H_k Tᵀ."""
    files, pairs = _row_files(plan, extra)
    result = analyse(plan.base, files, progress=progress)
    by_path = {Path(f).resolve(): i for i, f in enumerate(result.files)}
    models = [by_path[files[m]] for m, _ in pairs]
    froms = [None if b is None else by_path[files[b]] for _, b in pairs]
    t = selection_matrix(len(result.files), models, froms)
    return result, t, np.stack([t @ h @ t.T for h in result.h_key.values()])


def _predicted(plan: Plan, result: Analysis, per_key: np.ndarray) -> np.ndarray:
    weights, repeats = _weights(plan, list(result.h_key))
    return predicted_survival(per_key, plan.method, weights, dict(plan.options), repeats, result.noise_floors,
                              result.rotation_shares)


def predict(plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
    """Predicted survival of each enabled row of ``plan`` (no merge; a cached analysis reads nothing)."""
    result, _, per_key = _rows(plan, [], progress)
    return {"predicted": _predicted(plan, result, per_key).tolist(), "label": _label(plan)}


def _label(plan: Plan) -> str:
    """How the prediction was made (:func:`~ortho_mecha.metrics.survival_label`); the texture boost, added after
    the method, is not in it (the measured survival after a merge is)."""
    label = survival_label(plan.method, plan.options)
    return f"{label}, before the texture boost" if plan.texture is not None else label


def measure(plan: Plan, output: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Measured survival of each enabled row in the merged ``output``, beside the prediction."""
    output = Path(output).resolve()
    result, t, per_key = _rows(plan, [output], progress)
    out_index = [Path(f).resolve() for f in result.files].index(output)
    h = result.h
    own = np.diag(t @ h @ t.T)
    along = t @ h[:, out_index]
    return {
        "rows": [str(r.model) for r in plan.rows if r.enabled],
        "predicted": _predicted(plan, result, per_key).tolist(),
        "measured": np.where(own > 0, along / np.where(own > 0, own, 1.0), 0.0).tolist(),
        "label": _label(plan),
    }
