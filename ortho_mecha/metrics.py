"""Figures of merit from the delta Gram G and the per-model signal figures: survival, quality, interference.

Everything here is plain numpy on G (rows × rows, from :func:`ortho_mecha.gram.delta_gram`), so the Mixer
recomputes it instantly when a row's delta-from, alpha or repeat changes; no file is read.

- :func:`survival_plain` — the seed tool's survival in a plain average of unit deltas (DESIGN §4).
- :func:`quality` — the seed tool's quality score and grade (DESIGN §4).
- :func:`predicted_survival` — ``<Δ_out, δ_i> / ‖δ_i‖²`` under a merge method and row weights, exact for
  the linear methods, ``ortho_superpose``, ``ortho_project`` and ``geometric_median``, an estimate for the others
  (:func:`survival_label` says which).
- :func:`merged_coefficients` — the merged delta as a combination of the rows' deltas, behind the survival.
- :func:`interference` — how much each pair of rows overlaps, as a share of the rows' own energy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.special

from ortho_mecha.gram import cosine

# Grades, best first: (grade, the score it must exceed, or reach when inclusive)
GRADES: tuple[tuple[str, float, bool], ...] = (
    ("A+", 0.80, False),
    ("A", 0.65, True),
    ("B", 0.50, True),
    ("C", 0.35, True),
)
LOWEST_GRADE = "D"

# methods whose predicted survival is exact (given the same G the method sees)
EXACT_METHODS = ("weighted_sum", "add_difference", "ortho_superpose", "ortho_project", "geometric_median")
# methods predicted by an estimate from G: element-wise or rotation methods G cannot see exactly
ESTIMATED_METHODS = ("orthomerge", "ties", "dare", "model_stock")
# worked out key by key from each key's own Gram, as these methods merge (orthomerge from a block group's summed Gram)
KEYWISE_METHODS = ("ties", "dare", "model_stock", "geometric_median")
THETA_AGG = ("mean", "median", "max", "sum")
DIRECTION_WEIGHTS = ("theta", "magnitude", "equal")

# ortho_project's Gram–Schmidt drops a residual below 1e-12 of its delta's norm (float64 vectors); in the
# coefficient space of G squared norms are compared, and G itself carries ~1e-16 relative rounding, so a
# residual whose squared norm is below this fraction of its delta's counts as lying in the span.
SPAN_TOLERANCE_SQ = 1e-12
DEFAULT_RCOND = 1e-6  # ortho_superpose's default (ortho_mecha.methods.orthogonal.RCOND)


def _as_gram(g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, dtype=np.float64)
    if g.ndim < 2 or g.shape[-1] != g.shape[-2]:
        raise ValueError(f"a delta Gram must be square (…, n, n), got shape {g.shape}")
    return g


def survival_plain(g: np.ndarray, include: Sequence[bool] | None = None) -> np.ndarray:
    """Survival of each row in a plain average of unit deltas: ``<u_i, Σu / ‖Σu‖>`` with ``u_i = δ_i / ‖δ_i‖``.

    The sum runs over the rows with a non-zero delta (and, when ``include`` is given, only those marked
    True — pass ``not null`` to leave out deltas that are rounding noise). A row outside the sum still
    gets its survival (how much of its direction the average carries); 0 where ``Σu = 0`` or the row's
    delta is zero. Values lie in [−1, 1]; the seed tool shows them as percent.
    """
    g = _as_gram(g)
    cos = cosine(g)
    members = np.diag(g) > 0
    if include is not None:
        members &= np.asarray(include, dtype=bool)
    along = cos[:, members].sum(axis=1)  # <u_i, Σu>
    total = float(cos[np.ix_(members, members)].sum())  # ‖Σu‖²
    if total <= 0:
        return np.zeros(len(g))
    return np.where(np.diag(g) > 0, along / math.sqrt(total), 0.0)


def grade(score: float) -> str:
    """A+ > 0.80, A 0.65–0.80, B 0.50–0.65, C 0.35–0.50, D < 0.35."""
    for name, bound, inclusive in GRADES:
        if score > bound or (inclusive and score == bound):
            return name
    return LOWEST_GRADE


def quality(
    effective_rank: Sequence[float],
    snr: Sequence[float],
    survival: Sequence[float],
    max_outlier: Sequence[float],
    null: Sequence[bool],
) -> tuple[np.ndarray, list[str]]:
    """The seed tool's quality score per model and its grade (DESIGN §4).

    ``score = 0.40·focus + 0.40·SNR_norm + survival_bonus − outlier_penalty``, clamped to [0, 1], with
    focus = 1 − effective rank, SNR_norm = clamp(log10(SNR)/2, 0, 1),
    survival_bonus = min(0.2, max(0, (survival% − 30)/200)) (``survival`` as a fraction, e.g. from
    :func:`survival_plain`; 100× is the percent), outlier_penalty = min(0.15, max(0, (max_outlier − 5)/50)).
    A null delta (below its inputs' rounding noise) scores 0 and is graded D.
    """
    rank = np.asarray(effective_rank, dtype=np.float64)
    ratio = np.asarray(snr, dtype=np.float64)
    surv = np.asarray(survival, dtype=np.float64)
    outlier = np.asarray(max_outlier, dtype=np.float64)
    is_null = np.asarray(null, dtype=bool)
    if not rank.shape == ratio.shape == surv.shape == outlier.shape == is_null.shape:
        raise ValueError("quality needs one effective rank, SNR, survival, max outlier and null flag per model")
    focus = 1.0 - rank
    with np.errstate(divide="ignore"):
        snr_norm = np.clip(np.log10(np.where(ratio > 0, ratio, 1.0)) / 2.0, 0.0, 1.0)
    bonus = np.minimum(0.2, np.maximum(0.0, (100.0 * surv - 30.0) / 200.0))
    penalty = np.minimum(0.15, np.maximum(0.0, (outlier - 5.0) / 50.0))
    scores = np.clip(0.40 * focus + 0.40 * snr_norm + bonus - penalty, 0.0, 1.0)
    scores = np.where(is_null, 0.0, scores)
    return scores, [grade(float(s)) for s in scores]


# -- predicted survival ----------------------------------------------------------------------------------


def survival_label(method: str, options: Mapping[str, Any] | None = None) -> str:
    """``"exact"`` when :func:`predicted_survival` is exact for ``method`` with ``options`` (given the G the
    method sees, i.e. per-key Grams for per-key methods), ``"estimate"`` otherwise: ``ortho_superpose`` at
    granularity ``row`` (each matrix row superposed on its own) is predicted by its per-key formula."""
    if method == "ortho_superpose" and (options or {}).get("granularity", "key") != "key":
        return "estimate"
    if method in EXACT_METHODS:
        return "exact"
    if method in ESTIMATED_METHODS:
        return "estimate"
    raise ValueError(
        f"no survival prediction for method {method!r}; known: {', '.join(EXACT_METHODS + ESTIMATED_METHODS)}"
    )


def superpose_coefficients(g: np.ndarray, rcond: float = DEFAULT_RCOND, floor: np.ndarray | float = 0.0) -> np.ndarray:
    """Minimum-norm least-squares c of ``G c = diag(G)`` over the last two axes (DESIGN §5), as ``ortho_superpose``
    solves it (the method calls this): c = V Λ⁺ Vᵀ diag(G) from G = V Λ Vᵀ, with eigenvalues at or below
    ``rcond · λmax``, at or below ``floor`` (per Gram: the inputs' rounding noise,
    :func:`ortho_mecha.gram.noise_floor`) and non-positive ones dropped. λmax itself is never dropped by the
    floor: the floor keeps rounding noise from being blown up by a small eigenvalue, and the largest divides
    by itself (one row, or a plan of small rows, is merged, not replaced by the base). A zero G gets c = 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(g)
    floor = np.asarray(floor, dtype=np.float64)[..., None]
    top = np.arange(eigenvalues.shape[-1]) == eigenvalues.shape[-1] - 1
    keep = (eigenvalues > rcond * eigenvalues[..., -1:]) & ((eigenvalues > floor) | top) & (eigenvalues > 0)
    inverse = np.where(keep, 1.0 / np.where(keep, eigenvalues, 1.0), 0.0)
    target = np.diagonal(g, axis1=-2, axis2=-1)
    projected = np.einsum("...ji,...j->...i", eigenvectors, target)
    return np.einsum("...ij,...j->...i", eigenvectors, inverse * projected)


def gram_schmidt_coefficients(g: np.ndarray) -> np.ndarray:
    """Coefficients a with ``Σ_i a_i δ_i = δ_1 + Σ_{i>1} (δ_i − proj_{span(δ_1..δ_{i−1})} δ_i)`` for one Gram G.

    Sequential Gram–Schmidt in coefficient space (inner product ``aᵀ G b``), with one re-orthogonalisation
    pass like ``ortho_project``. Zero deltas and deltas whose residual is (numerically) in the span add
    nothing to the basis; their residual still adds to the sum, as in the method.
    """
    n = len(g)
    basis: list[np.ndarray] = []  # coefficient vectors of orthonormal directions
    total = np.zeros(n)
    for i in range(n):
        if g[i, i] <= 0:
            continue
        residual = np.zeros(n)
        residual[i] = 1.0
        for _ in range(2):
            for q in basis:
                residual = residual - (q @ g @ residual) * q
        total += residual
        norm_sq = float(residual @ g @ residual)
        if norm_sq > SPAN_TOLERANCE_SQ * g[i, i]:
            basis.append(residual / math.sqrt(norm_sq))
    return total


def _output_coefficients(g: np.ndarray, method: str, w: np.ndarray, options: Mapping[str, Any],
                         floors: np.ndarray | float = 0.0) -> np.ndarray:
    """Coefficients a (per Gram in the batch) with ``Δ_out = Σ_i a_i δ_i`` for the raw row deltas δ_i."""
    alpha = float(options.get("alpha", 1.0))
    if method == "add_difference":
        return np.broadcast_to(alpha * w, g.shape[:-1]).copy()
    if method == "weighted_sum":
        total = w.sum(axis=-1, keepdims=True)
        share = np.where(total != 0, w / np.where(total != 0, total, 1.0), 0.0)
        return np.broadcast_to(alpha * share, g.shape[:-1]).copy()
    gw = g * w[..., :, None] * w[..., None, :]  # Gram of the weighted deltas w_i δ_i
    if method == "ortho_superpose":
        # (at granularity 'row' the per-key formula is an estimate: per-row Grams are not kept)
        # the method's floor scales with the rows' largest coefficient, as their rounding noise did
        scaled = np.asarray(floors, dtype=np.float64) * np.max(np.abs(w), axis=-1) ** 2
        return alpha * w * superpose_coefficients(gw, float(options.get("rcond", DEFAULT_RCOND)), scaled)
    if method == "ortho_project":
        flat = gw.reshape(-1, *gw.shape[-2:])
        return alpha * w * np.stack([gram_schmidt_coefficients(one) for one in flat]).reshape(g.shape[:-1])
    raise ValueError(f"method {method!r} is not predicted exactly")


def _rotation_estimate(
    g: np.ndarray, alphas: np.ndarray, repeats: np.ndarray, options: Mapping[str, Any]
) -> np.ndarray:
    """An estimate of ``orthomerge``'s Δ_out coefficients from one Gram (a set of keys' sum): a rotation moves
    each weight along its delta with magnitude θ_i ≈ ‖δ_i‖ (small rotations), the merged rotation has magnitude
    agg(θ_i) along the normalised weighted sum of the generators; estimated as
    ``agg(‖α_i δ_i‖) · normalise(Σ v_i α_i δ_i)`` with rows listed r_i times and v_i the direction weights (θ and
    magnitude both ∝ ‖α_i δ_i‖ here): the rotation's part. The rest of each delta (the residual ρ_i) is averaged;
    :func:`merged_coefficients` mixes the two by each key's rotation share. Exact for one row and for identical
    rows; ``conflict_aware`` is not visible in G."""
    alpha = float(options.get("alpha", 1.0))
    agg = options.get("theta_agg", "mean")
    weight_rule = options.get("direction_weight", "theta")
    if agg not in THETA_AGG:
        raise ValueError(f"theta_agg {agg!r} is not one of {', '.join(THETA_AGG)}")
    if weight_rule not in DIRECTION_WEIGHTS:
        raise ValueError(f"direction_weight {weight_rule!r} is not one of {', '.join(DIRECTION_WEIGHTS)}")
    norms = np.abs(alphas) * np.sqrt(np.clip(np.diag(g), 0.0, None))
    rows = (repeats > 0) & (norms > 0)
    if not rows.any():
        return np.zeros(len(g))
    thetas = np.repeat(norms[rows], repeats[rows].astype(int))
    magnitude = {"mean": np.mean, "median": np.median, "max": np.max, "sum": np.sum}[agg](thetas)
    v = np.where(rows, 1.0 if weight_rule == "equal" else norms, 0.0) * repeats
    direction = v * alphas / np.where(norms > 0, norms, 1.0)  # Σ v_i · unit(α_i δ_i), in raw-delta coefficients
    size_sq = float(direction @ g @ direction)
    if size_sq <= 0:
        return np.zeros(len(g))
    return alpha * magnitude * direction / math.sqrt(size_sq)


def _keywise_coefficients(
    grams: np.ndarray, method: str, alphas: np.ndarray, repeats: np.ndarray, options: Mapping[str, Any]
) -> np.ndarray:
    """Δ_out's coefficients (K, n) for ``ties``, ``dare``, ``geometric_median`` and ``model_stock``, worked out key
    by key as the methods merge: each key's own Gram ``grams[k]`` and the rows' alphas on it ``alphas[k]``, rows
    listed ``repeats`` times. A delta with one outlier key weighs on that key only; from the Gram summed over the
    keys, its energy there reached every key's sign election, median or cosine (a QA finding: TIES 1.5–2× high).

    - ``ties``, ``dare``: entry by entry (:func:`_entrywise_along`), sampled; the keys sharing one set of alphas
      (all keys, or a block group's) then get one set of coefficients, the least-squares fit of the sampled merge
      on the sampled entries of all their keys (each key weighed by its energy): a few dozen samples per key are
      enough for a sum over keys, and a per-key fit on so few would add its noise to the merged norm.
    - ``geometric_median``: sd-mecha's Weiszfeld iterations run on each key's Gram (:func:`_weiszfeld`).
    - ``model_stock``: the mean scaled by Model Stock's ``t = k·cos / (1 + (k − 1)·cos)``, cos the mean cosine of
      consecutive listed deltas on the key (the method takes it per output row, which G cannot see).
    A delta that is zero on a key (alpha 0 there, or no change) is left out of that key, as the merge leaves it."""
    listed = np.where((alphas != 0) & (np.diagonal(grams, axis1=-2, axis2=-1) > 0), repeats, 0.0)
    if method in ("ties", "dare"):
        along, moments = _entrywise_along(grams, method, alphas, listed, options)
        coefficients = np.zeros(alphas.shape)
        for _, members in _weight_groups(alphas):
            rows = listed[members].any(axis=0)
            total = moments[members].sum(axis=0)[np.ix_(rows, rows)]
            sampled = along[members][:, rows].sum(axis=0)
            coefficients[np.ix_(members, rows)] = np.linalg.pinv(total, rcond=1e-10, hermitian=True) @ sampled
    elif method == "geometric_median":
        coefficients = alphas * _weiszfeld(alphas[:, :, None] * grams * alphas[:, None, :], listed, options)
    else:
        coefficients = np.stack([_stock_coefficients(*key, float(options.get("cos_eps", 1e-6)))
                                 for key in zip(grams, alphas, listed, strict=True)])
    return float(options.get("alpha", 1.0)) * coefficients


def _weight_groups(per_key: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(weights, mask of the keys that have them) for each distinct row of ``per_key`` (keys × rows): the keys of
    one block group, or all keys without block alphas."""
    zones, zone_of = np.unique(per_key, axis=0, return_inverse=True)
    for z, zone in enumerate(zones):
        yield zone, zone_of.ravel() == z


def _stock_coefficients(g: np.ndarray, alphas: np.ndarray, listed: np.ndarray, cos_eps: float) -> np.ndarray:
    """Model Stock on one key: ``t · mean`` of the listed deltas α_i δ_i, t from their consecutive cosines."""
    count = float(listed.sum())
    if count == 0:
        return np.zeros(len(g))
    order = np.repeat(np.arange(len(g)), listed.astype(int))
    cos = cosine(g)
    mean_cos = float(np.mean([cos[a, b] for a, b in itertools.pairwise(order)])) if count > 1 else 1.0
    denominator = 1.0 + (count - 1.0) * mean_cos
    t = count * mean_cos / denominator if denominator > cos_eps else 0.0
    return t * alphas * listed / count


def _weiszfeld(points: np.ndarray, copies: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
    """Per key (``points`` (K, n, n), ``copies`` (K, n)), the geometric median of points p_i listed ``copies[i]``
    times, as coefficients b with median Σ b_i p_i, from the points' Gram alone (‖p_i − m‖² = P_ii − 2 (P b)_i +
    bᵀ P b): sd-mecha's ``geometric_median`` run in coefficient space — from the mean, weights
    copies_i / max(‖p_i − m‖, eps), at most ``maxiter`` steps, a key stopping when its objective moves by at most
    ``ftol`` of itself. A zero point is left out, as the merge leaves out a zero delta."""
    eps = float(options.get("eps", 1e-6))
    maxiter = int(options.get("maxiter", 100))
    ftol = float(options.get("ftol", 1e-20))
    own = np.diagonal(points, axis1=-2, axis2=-1)
    copies = np.where(own > 0, copies, 0.0)
    total = copies.sum(axis=-1, keepdims=True)
    present = total[:, 0] > 0
    coefficients = np.where(present[:, None], copies / np.where(total > 0, total, 1.0), 0.0)

    def distances(b: np.ndarray) -> np.ndarray:
        spread = own - 2.0 * np.einsum("kij,kj->ki", points, b) + np.einsum("ki,kij,kj->k", b, points, b)[:, None]
        return np.sqrt(np.clip(spread, 0.0, None))

    objective = (copies * distances(coefficients)).sum(axis=-1)
    active = present.copy()
    for _ in range(max(0, maxiter)):
        if not active.any():
            break
        weights = copies[active] / np.maximum(distances(coefficients)[active], eps)
        coefficients[active] = weights / weights.sum(axis=-1, keepdims=True)
        previous, objective = objective, (copies * distances(coefficients)).sum(axis=-1)
        active &= ~(np.abs(previous - objective) <= ftol * objective)
    return coefficients


ENTRY_SAMPLES = 1 << 16  # entries drawn for the ties and dare estimate over all keys: a few % sampling error
KEY_SAMPLES = 64  # at least this many on every key with a delta


def _sample_counts(grams: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Entries drawn on each key: :data:`ENTRY_SAMPLES` shared by the keys' largest share of a row's weighted
    energy (the keys that carry most of some row are sampled most), at least :data:`KEY_SAMPLES`, rounded up
    to a power of two so keys of one count are drawn together; 0 on a key without a delta."""
    energy = np.diagonal(grams, axis1=-2, axis2=-1) * alphas**2
    totals = energy.sum(axis=0)
    share = (energy / np.where(totals > 0, totals, 1.0)).max(axis=-1)
    wanted = np.maximum(ENTRY_SAMPLES * share / max(float(share.sum()), 1e-300), KEY_SAMPLES)
    counts = 2 ** np.ceil(np.log2(wanted))
    return np.where(energy.sum(axis=-1) > 0, np.minimum(counts, ENTRY_SAMPLES), 0).astype(int)


def _listed_copies(listed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each key's row counts ``listed`` (K, n): the row index of every listed copy, padded to the longest
    key's list (K, copies), and a mask of the real copies."""
    counts = listed.astype(int)
    widest = max(int(counts.sum(axis=1).max(initial=0)), 1)
    ends = np.cumsum(counts, axis=1)
    slots = np.arange(widest)
    rows = (ends[:, :, None] <= slots[None, None, :]).sum(axis=1)  # copies listed before each slot's row ends
    valid = slots[None, :] < ends[:, -1:]
    return np.where(valid, rows, 0), valid


def _entrywise_along(
    grams: np.ndarray, method: str, alphas: np.ndarray, listed: np.ndarray, options: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """sd-mecha's ``ties_sum`` (``ties``) or ``ties_sum_with_dropout`` (``dare``) of the listed rows on each key,
    estimated from its Gram alone: they work entry by entry, so each entry's raw deltas are modelled as a
    Gaussian vector with the key's Gram as covariance (both methods scale with their input, so the Gram's scale
    does not matter), and a fixed-seed sample of entries (:func:`_sample_counts`) goes through the method's
    steps: DARE's dropout (each listed copy its own mask), each listed delta's top-k entries by magnitude (the
    Gaussian's quantile at the key's share k, after the dropout), the sign election (by counted signs, or by
    summed values with ``vote_sgn``), the mean of the agreeing entries, DARE's rescale by 1/(1 − p). Returns, per
    key and row, the sampled ``<Δ_k, δ_ik>`` (K, n) and the sampled Gram (K, n, n), in the Gram's units (0 for a
    row not listed). The rows' own distributions (heavy tails, sparsity) and DELLA's magnitude-ranked drop rates
    are not in G, which is why this is an estimate."""
    rng = np.random.default_rng(0)
    keys, n = grams.shape[:2]
    dropped = float(options.get("probability", 0.9)) if method == "dare" else 0.0
    kept = float(options.get("k", 1.0)) / (1.0 - dropped)  # the share of the not-dropped entries top-k keeps
    quantile = float(scipy.special.ndtri(1.0 - kept / 2.0)) if kept < 1.0 else 0.0  # of |N(0, 1)|
    counts = _sample_counts(grams, alphas)
    along = np.zeros((keys, n))
    moments = np.zeros((keys, n, n))
    for count in np.unique(counts[counts > 0]):
        at = np.flatnonzero(counts == count)
        trace = np.trace(grams[at], axis1=-2, axis2=-1)
        covariance = grams[at] / trace[:, None, None]
        eigenvalues, vectors = np.linalg.eigh(covariance)
        root = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None, :]
        entries = np.einsum("ksj,kij->ksi", rng.standard_normal((len(at), count, n)), root)
        rows, valid = _listed_copies(listed[at])  # (keys, copies): the row of each listed copy, and which are real
        scale = np.take_along_axis(alphas[at], rows, axis=1) * valid
        values = np.take_along_axis(entries, rows[:, None, :], axis=2) * scale[:, None, :]
        std = np.sqrt(np.clip(np.take_along_axis(np.diagonal(covariance, axis1=1, axis2=2), rows, axis=1), 0.0, None))
        bounds = (quantile * std * np.abs(scale))[:, None, :]
        if dropped:
            values *= rng.random(values.shape) >= dropped
        values *= np.abs(values) >= bounds
        signs = np.sign(values)
        elected = np.sign((values if options.get("vote_sgn", False) else signs).sum(axis=-1, keepdims=True))
        agree = signs == elected
        agreeing = agree.sum(axis=-1)
        merged = np.where(agreeing > 0, (values * agree).sum(axis=-1) / np.maximum(agreeing, 1), 0.0)
        if dropped and options.get("rescale", True):
            merged /= 1.0 - dropped
        present = listed[at] > 0  # a row not listed takes no part (and no share of the sampling noise)
        sampled = np.einsum("ksi,ks->ki", entries, merged) / count  # E[x Δ(x)] for the unit-trace covariance
        along[at] = np.where(present, sampled * trace[:, None], 0.0)
        moments[at] = np.einsum("ksi,ksj->kij", entries, entries) * (trace / count)[:, None, None]
    return along, moments


def merged_coefficients(
    g: np.ndarray,
    method: str,
    weights: Sequence[float],
    options: Mapping[str, Any] | None = None,
    repeats: Sequence[int] | None = None,
    floors: np.ndarray | float = 0.0,
    rotation_shares: np.ndarray | float = 1.0,
) -> np.ndarray:
    """Coefficients a with ``Δ_out = Σ_i a_i δ_i`` (per key for a stack of Grams: shape ``g.shape[:-1]``).

    Arguments as :func:`predicted_survival`, which is ``Σ_k (G_k a_k)_i / Σ_k (G_k)_ii``; exact or an
    estimate as :func:`survival_label` says. ``ties``, ``dare``, ``geometric_median`` and ``model_stock`` are
    estimated key by key, as they merge (:func:`_keywise_coefficients`); for ``orthomerge`` one set of
    coefficients, from the Gram summed over the keys that share the same weights (all keys, or a block group's),
    serves those keys.
    """
    g = _as_gram(g)
    options = dict(options or {})
    w = np.asarray(weights, dtype=np.float64)
    n = g.shape[-1]
    if w.shape != (n,) and not (g.ndim == 3 and w.shape == g.shape[:-1]):
        raise ValueError(f"weights of shape {w.shape} for {n} rows and Grams of shape {g.shape}")
    if survival_label(method) == "exact" and method not in KEYWISE_METHODS:  # ortho_superpose 'row' too, estimated
        return _output_coefficients(g, method, w, options, floors)
    reps = np.ones(n) if repeats is None else np.asarray(repeats, dtype=np.float64)
    if reps.shape != (n,):
        raise ValueError(f"{len(reps)} repeats for {n} rows")
    keyed = g.reshape(-1, n, n)
    if method in KEYWISE_METHODS:
        per_key = np.broadcast_to(w, keyed.shape[:-1]).astype(np.float64)
        return _keywise_coefficients(keyed, method, per_key, reps, options).reshape(g.shape[:-1])
    coefficients = np.zeros(keyed.shape[:-1])
    shares = np.broadcast_to(np.asarray(rotation_shares, dtype=np.float64), keyed.shape[:1])
    alpha = float(options.get("alpha", 1.0))
    for zone, members in _weight_groups(np.broadcast_to(w, keyed.shape[:-1])):  # a block group shares one estimate
        listed = np.where(zone != 0, reps, 0.0)
        rotated = _rotation_estimate(keyed[members].sum(axis=0), zone, listed, options)
        # the rotation carries a key's share of each delta, the mean the rest
        mean = alpha * zone * listed / max(float(listed.sum()), 1.0)
        share = shares[members, None]
        coefficients[members] = share * rotated + (1.0 - share) * mean
    return coefficients.reshape(g.shape[:-1])


def rotation_share(shape: Sequence[int]) -> float:
    """The share of a delta's energy that ``orthomerge``'s rotation carries on a key of ``shape`` (conv kernels
    flattened to out × rest), for a delta with no preferred direction: the rotations' tangent space
    {A W : A skew, k × k} has k(k − 1)/2 of the k·m dimensions of the k × m (k ≤ m) matrix, and the best
    rotation (Procrustes) is, to first order, the delta's projection on it; 0 for 1-D keys (a plain mean)."""
    if len(shape) < 2:
        return 0.0
    rows, rest = int(shape[0]), math.prod(int(d) for d in shape[1:])
    k, m = min(rows, rest), max(rows, rest)
    return (k - 1) / (2 * m) if m else 0.0


def predicted_survival(
    g: np.ndarray,
    method: str,
    weights: Sequence[float] | np.ndarray,
    options: Mapping[str, Any] | None = None,
    repeats: Sequence[int] | None = None,
    floors: np.ndarray | float = 0.0,
    rotation_shares: np.ndarray | float = 1.0,
) -> np.ndarray:
    """Predicted survival ``<Δ_out, δ_i> / ‖δ_i‖²`` of each row's raw delta δ_i = M_i − B_i in the merge.

    ``g``: the rows' delta Gram (n, n), or a stack of per-key Grams (k, n, n) — then each key is merged on
    its own, as the methods do, and the survival is ``Σ_k <Δ_k, δ_ik> / Σ_k ‖δ_ik‖²``.
    ``weights``: each row's weight (n,), or per key (k, n) for per-key Grams (block alphas): α_i · r_i for
    the methods that scale a row by its repeat (all but ``orthomerge``, ``ties``, ``dare``, ``model_stock``,
    ``geometric_median``, which list a row r_i times: for those pass α_i as the weight and r_i as
    ``repeats``); 0 for a disabled row. ``options``: the
    method's options (``alpha``, ``rcond``, ``theta_agg``, ``direction_weight``; others are ignored).
    ``floors``: per key (or one number), the inputs' rounding-noise energy below which ``ortho_superpose``
    drops a direction (:attr:`ortho_mecha.analysis.Analysis.noise_floors`); 0 keeps every direction.
    ``rotation_shares``: per key (or one number), the share of a delta ``orthomerge``'s rotation carries
    (:func:`rotation_share` of the key's shape; :attr:`ortho_mecha.analysis.Analysis.rotation_shares`); the
    rest is averaged. 1 treats every key as all rotation.

    1 means the merge carries the row's whole delta along its direction, 0.5 half of it, 2 twice it.
    Exact (:func:`survival_label`) for ``weighted_sum``, ``add_difference``, ``ortho_superpose`` (at
    granularity ``key``), ``ortho_project`` and ``geometric_median`` (sd-mecha's Weiszfeld iterations need only
    each key's Gram); an estimate for the others. A row with a zero delta gets 0.
    With per-key weights the exact methods stay exact (each key merged with its own weights); ``ties``,
    ``dare``, ``model_stock`` and ``geometric_median`` are estimated key by key, ``orthomerge`` per set of keys
    sharing the same weights (a block group) on that set's summed Gram (:func:`merged_coefficients`).
    """
    g = _as_gram(g)
    return survival_of(g, merged_coefficients(g, method, weights, options, repeats, floors, rotation_shares))


def survival_of(g: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``Σ_k (G_k a_k)_i / Σ_k (G_k)_ii`` for the merged delta ``Δ_k = Σ_i a_ki δ_ik`` (one Gram or a stack);
    0 for a row with a zero delta."""
    g = _as_gram(g)
    n = g.shape[-1]
    along = np.einsum("...ij,...j->...i", g, coefficients).reshape(-1, n).sum(axis=0)  # Σ_k <Δ_k, δ_ik>
    own = np.diagonal(g, axis1=-2, axis2=-1).reshape(-1, n).sum(axis=0)
    return np.where(own > 0, along / np.where(own > 0, own, 1.0), 0.0)


def interference(g: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Pairwise interference of the weighted rows: ``I_ij = w_i w_j G_ij / Σ_k w_k² G_kk`` (0 on the diagonal).

    What it means: adding the weighted deltas plainly gives ``‖Σ w_i δ_i‖² = Σ_k ‖w_k δ_k‖² · (1 + Σ_{i≠j} I_ij)``,
    so ``I_ij + I_ji`` is the share of the rows' own energy that the overlap of rows i and j adds to a
    plain sum (positive: they double count the same change; negative: they cancel each other). 0 for
    orthogonal rows, which is what ``ortho_superpose`` achieves for every pair.
    """
    g = _as_gram(g)
    w = np.asarray(weights, dtype=np.float64)
    weighted = g * w[:, None] * w[None, :]
    own = float(np.trace(weighted))
    out = weighted / own if own > 0 else np.zeros_like(weighted)
    np.fill_diagonal(out, 0.0)
    return out
