"""Who was made from whom, from the file Gram H alone: duplicates, parents, merges and a 2-D model map.

H is the F×F float64 Gram of the analysed files relative to the base C (the models first, then any
extra delta-from files); the base is the origin, not a row. Squared distances
``D_ab = H_aa + H_bb − 2 H_ab`` (:func:`ortho_mecha.gram.squared_distances`), ``D_aC = H_aa``.

- :func:`duplicates` — ``D_ab < 0.01 · min(D_aC, D_bC)``: the lower-quality model is the duplicate.
- :func:`parent` — the parent rule (shared with auto-fill and the optimizer, DESIGN §4).
- :func:`lineage` — a parent per model, or, for a model without one, a non-negative mix of other files (with
  the fewest ingredients that fit it as well, :func:`fitted_mix`).
- :func:`model_map` — classical MDS of D to 2-D, the base included as the last point.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
from scipy.optimize import nnls

from ortho_mecha.gram import squared_distances

DUPLICATE_RATIO = 0.01  # D_ab below this fraction of the nearer file's distance to the base: duplicates
PARENT_RATIO = 0.5  # D_MP below this fraction of D_MC (and P nearer the base than M): P is M's parent
MERGE_RESIDUAL = 0.1  # ‖x_M − Σ w_j x_j‖ / ‖x_M‖ below this: M is reported as a merge of those files
WEIGHT_FLOOR = 1e-3  # NNLS weights below this are dropped from a reported mix
MIX_PRUNE = 5e-3  # an ingredient whose removal raises the mix's relative residual by less than this is dropped
# ‖M − C‖ / ‖C‖ above this: M is not a fine-tune of the base C (a fine-tune changes it by a few %; an independently
# trained model of the same shape lies ~√2 of the base's size away)
OTHER_LINEAGE_CHANGE = 1.0

Mixes = dict[int, tuple[dict[int, float], float]]  # model → ({ingredient file: weight}, relative residual)


class LineageItem(TypedDict):
    """One model's lineage.

    ``parent``: file index of its parent, None for the base. ``mix``: for a model without a parent that
    is a non-negative mix of other files, {file index: weight} (the weights' sum need not be 1; what is
    missing to 1 is the base's share), else None. ``confidence`` in [0, 1]: how clearly the evidence
    clears the rule that decided — 1 for an exact copy of its parent or an exact mix, 0 on the rule's
    threshold (for a parent: ``1 − D_MP / (0.5·D_MC)``; for a mix: ``1 − residual / 0.1``; for the base:
    how far the nearest eligible candidate — a file nearer the base — is outside the parent threshold,
    ``1 − 0.5·D_MC / D_MP``, 1 when there is none).
    ``residual``: the mix's relative residual (None without a mix). ``duplicate_of``: the kept model this
    one duplicates, or None.
    """

    parent: int | None
    mix: dict[int, float] | None
    confidence: float
    residual: float | None
    duplicate_of: int | None


def change_from_base(h: np.ndarray, n_models: int, base_norm: float | None) -> list[float | None]:
    """Each model's relative change ‖M − C‖ / ‖C‖ over the analysed keys (None without the base's norm); above
    :data:`OTHER_LINEAGE_CHANGE` the model is of another lineage than the base."""
    if not base_norm:
        return [None] * n_models
    return [math.sqrt(max(float(h[i, i]), 0.0)) / base_norm for i in range(n_models)]


def other_lineage(report: Mapping[str, Any]) -> dict[int, float]:
    """Model index → relative change, for the models of a report (its ``change``, :func:`change_from_base`) that are
    of another lineage than the base (above :data:`OTHER_LINEAGE_CHANGE`); none for a report without ``change``."""
    return {i: c for i, c in enumerate(report.get("change") or ()) if c is not None and c > OTHER_LINEAGE_CHANGE}


def other_lineage_note(change: float) -> str:
    """What a relative change above :data:`OTHER_LINEAGE_CHANGE` means, in a line."""
    return (f"not a fine-tune of this base: its change from it is {100 * change:.0f} % of the base's own size "
            "(a fine-tune changes a few %)")


def duplicates(h: np.ndarray, quality: Sequence[float]) -> dict[int, int]:
    """{duplicate model index: kept model index} over the first ``len(quality)`` files of ``h``.

    Two models are duplicates when ``D_ab < 0.01 · min(D_aC, D_bC)``; duplicates chain into groups, and
    each group keeps its highest-quality model (the first listed on a tie); every other member maps to it.
    """
    n = len(quality)
    h = np.asarray(h, dtype=np.float64)
    d = squared_distances(h[:n, :n])
    norms = np.diag(h)[:n]
    group = list(range(n))  # union-find over duplicate pairs

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for a, b in itertools.combinations(range(n), 2):
        if d[a, b] < DUPLICATE_RATIO * min(norms[a], norms[b]):
            group[root(b)] = root(a)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    found: dict[int, int] = {}
    for group_members in members.values():
        kept = max(group_members, key=lambda i: (quality[i], -i))
        found.update({i: kept for i in group_members if i != kept})
    return found


def parent(h: np.ndarray, i: int, candidates: Iterable[int]) -> int | None:
    """The parent rule: file i's parent is the candidate P nearest to it among those nearer the base than
    i itself (``H_PP < H_ii``), if ``D_iP < 0.5 · D_iC``; otherwise the base (None).

    ``candidates``: file indices allowed as parents (the caller leaves out duplicates; i itself is ignored).
    DESIGN §4 takes the nearest file first and then asks whether it is nearer the base; filtering first
    gives the same parent whenever that reading finds one, and keeps a model's own descendant (further
    from the base, possibly nearer to it than its real parent) from hiding the real parent.
    Ties go to the lower file index, so the result is deterministic.
    """
    h = np.asarray(h, dtype=np.float64)
    own = h[i, i]
    best: int | None = None
    best_d = math.inf
    for p in sorted(set(candidates)):
        if p == i or not h[p, p] < own:
            continue
        d = h[i, i] + h[p, p] - 2.0 * h[i, p]
        if d < best_d:
            best, best_d = p, d
    if best is not None and best_d < PARENT_RATIO * own:
        return best
    return None


def _parent_confidence(h: np.ndarray, i: int, p: int | None, candidates: Iterable[int]) -> float:
    own = h[i, i]
    if own <= 0:
        return 1.0  # a zero delta is the base itself
    if p is not None:
        d = own + h[p, p] - 2.0 * h[i, p]
        return float(np.clip(1.0 - d / (PARENT_RATIO * own), 0.0, 1.0))
    others = [c for c in candidates if c != i and h[c, c] < own]  # the files the rule could have chosen
    if not others:
        return 1.0
    nearest = min(own + h[c, c] - 2.0 * h[i, c] for c in others)
    return float(np.clip(1.0 - PARENT_RATIO * own / nearest, 0.0, 1.0)) if nearest > 0 else 0.0


def nnls_on_gram(h: np.ndarray, target: int, sources: Sequence[int]) -> tuple[np.ndarray, float]:
    """Non-negative w minimising ``‖x_t − Σ_j w_j x_j‖²`` over ``sources``, from H alone; returns (w, relative
    residual ‖x_t − Σ w_j x_j‖ / ‖x_t‖).

    With L Lᵀ the (jittered) Cholesky factor of ``H_ss``, the objective equals ``‖Lᵀ w − L⁻¹ h_st‖²``
    plus a constant, an ordinary NNLS problem of size |sources|.
    """
    own = float(h[target, target])
    if not sources or own <= 0:
        return np.zeros(len(sources)), 1.0
    s = list(sources)
    hss = h[np.ix_(s, s)]
    hst = h[s, target]
    jitter = 1e-12 * max(float(np.trace(hss)) / len(s), own)
    factor = np.linalg.cholesky(hss + jitter * np.eye(len(s)))
    rhs = np.linalg.solve(factor, hst)
    w, _ = nnls(factor.T, rhs)
    residual_sq = own - 2.0 * w @ hst + w @ hss @ w
    return w, math.sqrt(max(residual_sq, 0.0) / own)


def fitted_mix(h: np.ndarray, target: int, sources: Sequence[int],
               accepted_below: float = math.inf) -> tuple[dict[int, float], float]:
    """({file: weight}, relative residual) of the NNLS fit of ``target`` on ``sources`` (:func:`nnls_on_gram`),
    with the fewest ingredients that explain it as well: ingredients are dropped, the lightest first, while the
    fit without them is within ``MIX_PRUNE`` of the residual. NNLS has many equal solutions when the sources are
    dependent (a file and its exact opposite; a file, its fine-tune and a tiny weight on both) and returns
    one of them; the plainest is the one to report. A fit whose residual is not below ``accepted_below`` is
    returned unpruned: pruning never lowers the residual, so the caller refuses it either way (of 200
    unrelated models each took ~150 refits for nothing)."""
    w, residual = nnls_on_gram(h, target, sources)
    mix = {f: float(x) for f, x in zip(sources, w, strict=True) if x > WEIGHT_FLOOR}
    if residual >= accepted_below:
        return mix, residual
    for f in sorted(mix, key=mix.__getitem__):
        if len(mix) < 2:
            break
        kept = [g for g in mix if g != f]
        w_kept, r_kept = nnls_on_gram(h, target, kept)
        if r_kept <= residual + MIX_PRUNE:
            mix = {g: float(x) for g, x in zip(kept, w_kept, strict=True) if x > WEIGHT_FLOOR}
            residual = max(residual, r_kept)
    return mix, residual


def _derived_from(parents: Sequence[int | None], mixes: Mixes) -> dict[int, set[int]]:
    """File → the files it was made from: its parent, or its mix's ingredients."""
    derived_from = {j: {p} for j, p in enumerate(parents) if p is not None}
    for j, (mix, _) in mixes.items():
        derived_from.setdefault(j, set()).update(mix)
    return derived_from


def _descendants(derived_from: dict[int, set[int]], roots: set[int]) -> set[int]:
    """Files derived from any of ``roots``, directly or through other files (``derived_from``: file → the files
    it was made from, its parent or its mix's ingredients)."""
    found: set[int] = set()
    grown = True
    while grown:
        grown = False
        for f, sources in derived_from.items():
            if f not in found and f not in roots and sources & (roots | found):
                found.add(f)
                grown = True
    return found


def _ancestry(parents: Sequence[int | None], mixes: Mixes, f: int) -> set[int]:
    """``f`` and every file it was made from, through parents and mixes' ingredients (a file past the models, an
    extra delta-from file, has neither)."""
    found: set[int] = set()
    stack = [f]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.add(current)
        if current < len(parents) and parents[current] is not None:
            stack.append(parents[current])
        stack += list(mixes.get(current, ({}, 0.0))[0])
    return found


def _break_cycles(h: np.ndarray, m: int, roots: set[int], parents: list[int | None],
                  mixes: Mixes, allowed: Sequence[int]) -> None:
    """Once ``m`` is found to be a mix of files that descend from it (the fit's retry allows them), re-parent,
    until none does, each file an ingredient is made from whose parent is ``m`` (first) or descends from it:
    its new parent is chosen among the files that do not descend from ``m``. Mixes already found stay."""
    while True:
        upstream = set().union(*(_ancestry(parents, mixes, f) for f in mixes[m][0]))
        if m not in upstream:
            return
        below = _descendants(_derived_from(parents, mixes), roots)
        links = sorted((parents[x] not in roots, x) for x in upstream
                       if x < len(parents) and parents[x] is not None and parents[x] in roots | below)
        if not links:  # closed through mixes alone (the fit excludes that): the mix is not reported
            del mixes[m]
            return
        x = links[0][1]
        parents[x] = parent(h, x, [c for c in allowed if c not in roots and c not in below])


def _unrelated(d: np.ndarray, h: np.ndarray, files: Sequence[int]) -> bool:
    """No two of ``files`` are within the parent threshold of each other (``D_ab ≥ 0.5 · max(D_aC, D_bC)``)."""
    return all(d[a, b] >= PARENT_RATIO * max(h[a, a], h[b, b]) for a, b in itertools.combinations(files, 2))


def lineage(h: np.ndarray, n_models: int, quality: Sequence[float]) -> list[LineageItem]:
    """The lineage of each of the first ``n_models`` files (DESIGN §4, "ours: lineage").

    1. Duplicates (:func:`duplicates`) take their kept twin's lineage and are never another's parent.
    2. Every model gets a parent by the parent rule among the other non-duplicate files (models and
       extra delta-from files).
    3. A model without a parent is fitted by non-negative least squares on the other files' deltas,
       leaving out its duplicates and descendants (through parents and through merges already found:
       a merge is never an ingredient of its own ingredient); a relative residual below 0.1 reports it as
       a merge of the files with a positive weight. Models are fitted nearest the base first, since a
       merge averages its ingredients. A merge of files of similar norm sits right at the parent
       threshold of its own ingredients (``D = 0.5·D_C`` for a 0.5/0.5 merge of orthogonal equal deltas),
       so if that fit fails, the fit is retried with the descendants allowed, and accepted only when it
       uses at least two files that are pairwise unrelated by the parent rule (a parent is close to the
       mean of its small fine-tunes, but those sit close together). The retry first allows only the merge's
       own fine-tunes (its ingredients, by the parent rule), then theirs as well (an ingredient may be known
       only through its fine-tune). A file an ingredient is made from whose parent descends from the
       merge then gets its parent again among the files that do not (:func:`_break_cycles`), so no file
       is its own ancestor.
    """
    h = np.asarray(h, dtype=np.float64)
    n_files = len(h)
    if len(quality) != n_models:
        raise ValueError(f"{len(quality)} quality scores for {n_models} models")
    dups = duplicates(h, quality)
    d = squared_distances(h)
    allowed = [f for f in range(n_files) if f not in dups]
    parents: list[int | None] = [parent(h, i, allowed) for i in range(n_models)]
    mixes: Mixes = {}
    # merges average their ingredients, so they sit nearer the base: fit the nearest models first
    for m in sorted(range(n_models), key=lambda i: (h[i, i], i)):
        if m in dups or parents[m] is not None or h[m, m] <= 0:
            continue
        roots = {m} | {j for j, kept in dups.items() if kept == m}
        mixed_from = {j: set(mix) for j, (mix, _) in mixes.items()}
        descendants = _descendants(_derived_from(parents, mixes), roots)
        sources = [f for f in allowed if f not in roots and f not in descendants]
        mix, residual = fitted_mix(h, m, sources, MERGE_RESIDUAL)
        if residual >= MERGE_RESIDUAL or not mix:
            excluded = roots | _descendants(mixed_from, roots)  # a merge is never an ingredient of its ingredient
            children = {j for j in range(n_models) if parents[j] in roots}
            # its own fine-tunes first (an ingredient sits at the merge's parent threshold), then theirs
            for reach in (children, descendants):
                sources = [f for f in allowed if f not in excluded and (f not in descendants or f in reach)]
                mix, residual = fitted_mix(h, m, sources, MERGE_RESIDUAL)
                if residual < MERGE_RESIDUAL and len(mix) >= 2 and _unrelated(d, h, list(mix)):
                    break
            else:
                continue
        mixes[m] = (mix, residual)
        _break_cycles(h, m, roots, parents, mixes, allowed)

    items: list[LineageItem] = []
    for i in range(n_models):
        source = dups.get(i, i)
        if source in mixes:
            mix, residual = mixes[source]
            confidence = float(np.clip(1.0 - residual / MERGE_RESIDUAL, 0.0, 1.0))
            items.append(
                LineageItem(parent=None, mix=mix, confidence=confidence, residual=residual, duplicate_of=dups.get(i))
            )
            continue
        p = parents[source]
        items.append(
            LineageItem(
                parent=p,
                mix=None,
                confidence=_parent_confidence(h, source, p, [c for c in allowed if c != source]),
                residual=None,
                duplicate_of=dups.get(i),
            )
        )
    return items


def model_map(h: np.ndarray) -> np.ndarray:
    """2-D coordinates of every file and the base by classical MDS of the squared distances D.

    Returns (F + 1) × 2: the F files in ``h``'s order, then the base (the origin of H) as the last row.
    Distances in the map approximate ``sqrt(D)`` (exactly when the files span at most a plane through
    the base). Coordinates are centred on the points' mean; each axis is oriented so that its
    largest-magnitude coordinate is positive, so the map is deterministic.
    """
    h = np.asarray(h, dtype=np.float64)
    f = len(h)
    full = np.zeros((f + 1, f + 1))
    full[:f, :f] = h
    d = squared_distances(full)
    centre = np.eye(f + 1) - 1.0 / (f + 1)
    b = -0.5 * centre @ d @ centre
    eigenvalues, eigenvectors = np.linalg.eigh((b + b.T) / 2.0)
    order = np.argsort(eigenvalues)[::-1][:2]
    coords = np.zeros((f + 1, 2))
    for axis, k in enumerate(order):
        column = eigenvectors[:, k] * math.sqrt(max(float(eigenvalues[k]), 0.0))
        if column[np.argmax(np.abs(column))] < 0:
            column = -column
        coords[:, axis] = column
    return coords
