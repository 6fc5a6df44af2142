"""Rotation merge: ``orthomerge``, an orthogonal merge in the spirit of OrthoMerge (arXiv 2602.05943).

Each fine-tune's matrix is explained as a rotation of the base plus a residual; the rotations are
averaged in the Lie algebra (Cayley generators, skew-symmetric) and the residuals averaged as they are.
All linear algebra runs in float64 (or, as an explicit approximation, float32); the result comes back in
the base's dtype.

Per matrix key, with W and the δ_i taken on the smaller side (k × m, k ≤ m): one blocked float64 pass over
the inputs forms every W_i Wᵀ = (W + δ_i) Wᵀ (a single product per block) and the ‖δ_i‖²; the k × k algebra gives
R* and the mean turn T = mean_i (R_i − I); since ρ_i = δ_i − (R_i − I) W, the output
W + alpha (R* W + mean ρ_i − W) is W + alpha ((R* − I − T) W + mean δ_i), written by a second blocked pass.
No float64 copy of a whole key and no per-row product with W beyond the Gram are made.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import functools
import logging
import math
from collections.abc import Iterator, Sequence

import scipy.linalg
import torch
from sd_mecha import Parameter, Return, merge_method
from torch import Tensor

from ortho_mecha.methods.deltas import (
    ALPHA,
    BLOCK_ELEMENTS,
    OptionSpec,
    check_options,
    combine,
    finite_deltas,
    mark_nonfinite,
    nonzero,
    nonzero_indices,
)
from ortho_mecha.methods.parallel import key_at_work, match_threads, spread, spread_groups

logger = logging.getLogger(__name__)

THETA_AGG = OptionSpec(
    "theta_agg",
    "mean",
    "rotation angle of the merge from the rows' angles; 'sum' grows with the number of rows",
    choices=("mean", "median", "max", "sum"),
)
CONFLICT_AWARE = OptionSpec(
    "conflict_aware", False, "zero generator entries whose sign disagrees with the combined direction"
)
DIRECTION_WEIGHT = OptionSpec(
    "direction_weight",
    "theta",
    "how rows weigh in the rotation's direction: by angle, by delta norm, or equally",
    choices=("theta", "magnitude", "equal"),
)
PRECISION = OptionSpec(
    "precision",
    "float64",
    "arithmetic of the Grams and rotations: 'float64' is the method; 'float32' about halves the time, at a "
    "measured error of ~2e-5 of the merged delta on well-conditioned keys, 1e-3 to 1e-1 on square near-singular ones",
    choices=("float64", "float32"),
)
ORTHOMERGE_OPTIONS = (ALPHA, THETA_AGG, CONFLICT_AWARE, DIRECTION_WEIGHT, PRECISION)
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}

# Above this condition number of R + I (a rotation angle near π) the Cayley map is not trusted.
CAYLEY_MAX_COND = 1e6
CAYLEY_MAX_COND_FLOAT32 = 1e3  # precision="float32": its rotation is too coarse to invert R + I beyond this
# The polar factor comes from eigh of MᵀM when its eigenvalue ratio is above this (cond(M) < 1e4);
# its distance to the SVD result grows like 1e-16·cond(M)², measured ≈ 1e-10 at the threshold.
EIGH_MIN_RATIO = 1e-8
EIGH_MIN_RATIO_FLOAT32 = 1e-6  # precision="float32": eigh up to cond(M) 1e3 (the option trades accuracy anyway)


def nearest_rotation(m: Tensor, svd: bool = False) -> Tensor:
    """The proper rotation R (det +1) closest to the square matrix ``m``: U D Vᵀ for m = U Σ Vᵀ.

    D = I, or flips the singular pair of the smallest singular value when det(U Vᵀ) = −1 (Kabsch).
    For a well-conditioned ``m`` the factors come from ``eigh(mᵀm) = V Σ² Vᵀ`` and U = m V Σ⁻¹, which is
    several times cheaper than an SVD and agrees with it to ~1e-16·cond(m)² (≤ 1e-10 here); otherwise
    from the SVD, and straight from it with ``svd=True`` (when ``m`` is known to be ill-conditioned).
    """
    rotation, flip, _ = _polar_factor(m, svd)
    if torch.linalg.slogdet(rotation).sign < 0:
        rotation -= torch.outer(*flip)
    return rotation


def _polar_factor(m: Tensor, svd: bool) -> tuple[Tensor, tuple[Tensor, Tensor], bool]:
    """(U Vᵀ for m = U Σ Vᵀ, (a, b) with U D Vᵀ = U Vᵀ − a bᵀ (D flips the smallest singular pair), whether
    the SVD was used); see :func:`nearest_rotation`.

    torch's LAPACK (MKL), which lets go of the GIL: sd-mecha merges keys on several threads, and scipy's
    ``eigh``, ``svd`` and ``getri`` hold the GIL, so two merge threads ran them one at a time. The symmetric
    products through numpy, whose ``x.T @ x`` is BLAS's ``syrk`` (about half a general product).
    """
    if not svd:
        try:
            eigenvalues, v = torch.linalg.eigh(_symmetric_product(m.T))
        except torch.linalg.LinAlgError:  # did not converge: the SVD below decides
            svd = True
        else:
            ratio = EIGH_MIN_RATIO if m.dtype == torch.float64 else EIGH_MIN_RATIO_FLOAT32
            svd = not eigenvalues[0] > ratio * eigenvalues[-1]
    if svd:
        try:
            u, _, vh = torch.linalg.svd(m)
        except torch.linalg.LinAlgError:  # divide and conquer did not converge: the slower, sturdier driver
            u, _, vh = (torch.from_numpy(x) for x in scipy.linalg.svd(m.numpy(), lapack_driver="gesvd"))
        return u @ vh, (2.0 * u[:, -1], vh[-1]), True
    # U Vᵀ = m V Σ⁻¹ Vᵀ = m (B Bᵀ) with B = V Σ^-½
    flip = (m @ v[:, 0]) * (2.0 / eigenvalues[0].sqrt()), v[:, 0]
    return m @ _symmetric_product(v * eigenvalues**-0.25), flip, False


def _row_terms(gram: Tensor, svd: bool) -> tuple[Tensor, Tensor | None, bool]:
    """(the proper rotation R nearest to ``gram`` (:func:`nearest_rotation`), its Cayley generator A or ``None``
    where R is near π, whether the SVD was used).

    A reflection (det −1) has the eigenvalue −1, so its R + I is singular: a Cayley solve that the free bound of
    :func:`cayley_generator` settles is of a proper rotation, and then the determinant is not needed. That is
    tried first for a float64 polar factor from ``eigh`` (a well-conditioned ``gram``, where a reflection is rare);
    the SVD's (ill-conditioned: about every other one is a reflection) and a float32 one (too far from
    orthogonal to rely on it, ~1e-7·cond²) have their sign checked first. A test plants exact and near
    reflections on both paths.
    """
    rotation, flip, svd = _polar_factor(gram, svd)
    if rotation.dtype == torch.float64 and not svd:
        solved, _, settled = _cayley_solve(rotation)
        if solved is not None and settled:
            return rotation, (solved - solved.T) / 2.0, svd
    if torch.linalg.slogdet(rotation).sign < 0:
        rotation -= torch.outer(*flip)
    return rotation, cayley_generator(rotation), svd


def _symmetric_product(x: Tensor) -> Tensor:
    """x xᵀ, by BLAS's ``syrk`` (numpy's matmul takes that route for a matrix times its own transpose)."""
    a = x.numpy()
    return torch.from_numpy(a @ a.T)


def cayley_generator(rotation: Tensor) -> Tensor | None:
    """A = (R − I)(R + I)⁻¹, made exactly skew; ``None`` when R + I is too ill-conditioned to invert.

    The limit is ``CAYLEY_MAX_COND`` on R + I's condition against the largest norm it can have, 2 / σ_min(R + I)
    (``CAYLEY_MAX_COND_FLOAT32`` for a float32 rotation): R + I is normal with singular values 2|cos(φ/2)| over
    R's rotation angles φ, so ‖R + I‖₂ ≤ 2 and cond(R + I) ≤ 2 / σ_min. The plain condition number does not do:
    where every angle is near π (R ≈ −I), R + I is rounding noise in every direction, whose condition can be
    1–10, and the skew part of a solve against it was taken as the generator (a QA finding: one delta turning
    a key to minus itself did not give its model back). With ‖A‖₂ = tan(φ_max/2), 2 / σ_min = sqrt(1 + ‖A‖₂²)
    ≤ sqrt(1 + ‖A‖_F²): free to compute, this bound settles every rotation not near π; only above it is σ_min
    computed. The bound is taken on A before it is made skew: for a reflection (det −1, eigenvalue −1 along
    some x) the solve blows up as −(2/ε) x xᵀ, which is symmetric and would vanish from the skew part, so a
    reflection is refused too.
    """
    solved, shifted, settled = _cayley_solve(rotation)
    if solved is None:
        return None
    if not settled and not _cayley_limit(rotation.dtype) * float(torch.linalg.matrix_norm(shifted, ord=-2)) >= 2.0:
        return None
    return (solved - solved.T) / 2.0


def _cayley_solve(rotation: Tensor) -> tuple[Tensor | None, Tensor, bool]:
    """((R − I)(R + I)⁻¹ before it is made skew, or None where R + I is singular or the result not finite; R + I;
    whether the free bound of :func:`cayley_generator` settles that R + I is well-conditioned)."""
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype)
    shifted = rotation + eye
    solved, info = torch.linalg.solve_ex(shifted, rotation - eye, left=False)
    bound = float(torch.linalg.matrix_norm(solved))
    if info > 0 or not math.isfinite(bound):  # R + I exactly singular, or as good as
        return None, shifted, False
    return solved, shifted, 1.0 + bound**2 <= _cayley_limit(rotation.dtype) ** 2


def _cayley_limit(dtype: torch.dtype) -> float:
    """The largest 2 / σ_min(R + I) trusted for a rotation of ``dtype`` (:func:`cayley_generator`)."""
    return CAYLEY_MAX_COND if dtype == torch.float64 else CAYLEY_MAX_COND_FLOAT32


def cayley_rotation(generator: Tensor) -> Tensor:
    """R = (I − A)⁻¹(I + A) for a skew A (I − A is never singular)."""
    eye = torch.eye(generator.shape[0], dtype=generator.dtype)
    return torch.linalg.solve(eye - generator, eye + generator)


def _aggregate(thetas: Tensor, how: str) -> Tensor:
    if how == "mean":
        return thetas.mean()
    if how == "median":
        return torch.quantile(thetas, 0.5)
    if how == "max":
        return thetas.max()
    return thetas.sum()


def rotation_terms(
    target_grams: Tensor,
    norms: Tensor,
    theta_agg: str = THETA_AGG.default,
    conflict_aware: bool = CONFLICT_AWARE.default,
    direction_weight: str = DIRECTION_WEIGHT.default,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(R*, mean_i (R_i − I)) from the W_i Wᵀ (n, k, k) and the ‖δ_i‖ of non-zero deltas, in float64.

    ``counts`` (n, integer): how often each delta is listed (a row's repeat), as if listed that many times;
    each listed delta's rotation is worked out once. Default: once each.

    1. R_i: proper rotation nearest to W_i Wᵀ (:func:`nearest_rotation`).
    2. A_i: Cayley generator of R_i; where R_i + I is ill-conditioned, R_i = I and A_i = 0 (the whole delta
       stays in the residual ρ_i = δ_i − (R_i − I) W).
    3. θ_i = ‖A_i‖_F; A* = θ* · S / ‖S‖_F, S = Σ w_i A_i (A* = 0 where S = 0), θ* = agg(θ_i). Only the
       ratios of the w_i matter, as S is normalised; with all θ_i = 0 every A_i is 0, so "theta" weights
       need no equal-weight special case. conflict_aware: entries of A_i whose sign differs from that of
       the unmasked S are zeroed before summing again.
    4. R* = (I − A*)⁻¹(I + A*).
    """
    eye = torch.eye(target_grams.shape[1], dtype=target_grams.dtype)
    if counts is None:
        counts = torch.ones(len(target_grams), dtype=torch.int64)
    # The rows' W_i Wᵀ share W's conditioning: the first row finds out whether the SVD is needed, and the others
    # (at once, see parallel.spread) go straight to it if it was. A rule of the rows alone, so the result does
    # not depend on how many run at once.
    first = _row_terms(target_grams[0], svd=False)
    rows = [first, *spread(functools.partial(_row_terms, svd=first[2]), target_grams[1:])]
    generators = []
    turn = torch.zeros_like(eye)
    for (rotation, generator, _), count in zip(rows, counts.tolist(), strict=True):
        if generator is None:
            logger.debug("rotation near π (R + I ill-conditioned): whole delta kept as residual")
            generators.append(torch.zeros_like(eye))
        else:
            generators.append(generator)
            turn += (rotation - eye) * count
    stacked = torch.stack(generators)
    thetas = torch.linalg.matrix_norm(stacked)
    if direction_weight == "theta":
        weights = thetas
    elif direction_weight == "magnitude":
        weights = norms
    else:
        weights = torch.ones_like(thetas)
    weights = weights * counts
    direction = torch.einsum("i,ijk->jk", weights, stacked)
    if conflict_aware:
        agrees = torch.sign(stacked) == torch.sign(direction)
        direction = torch.einsum("i,ijk->jk", weights, stacked * agrees)
    mean_turn = turn / int(counts.sum())
    norm = torch.linalg.matrix_norm(direction)
    if norm == 0:
        return eye, mean_turn
    generator_star = direction * (_aggregate(thetas.repeat_interleave(counts), theta_agg) / norm)
    return cayley_rotation(generator_star), mean_turn


def merged_rotation(
    base: Tensor,
    deltas: Sequence[Tensor],
    theta_agg: str = THETA_AGG.default,
    conflict_aware: bool = CONFLICT_AWARE.default,
    direction_weight: str = DIRECTION_WEIGHT.default,
) -> tuple[Tensor, Tensor]:
    """(R*, mean ρ_i) for a float64 base matrix (k × m, k ≤ m) and its non-zero deltas of the same shape.

    R* and the ρ_i as in :func:`rotation_terms`; mean ρ_i = mean δ_i − mean(R_i − I) W.
    """
    rotation, mean_turn = rotation_terms(
        torch.stack([(base + delta) @ base.T for delta in deltas]),
        torch.stack([torch.linalg.vector_norm(delta) for delta in deltas]),
        theta_agg,
        conflict_aware,
        direction_weight,
    )
    return rotation, torch.stack(list(deltas)).mean(dim=0) - mean_turn @ base


def _column_blocks(matrix: Tensor, transposed: bool) -> list[slice]:
    """Slices of the m side of an (out, in) ``matrix`` taken on its smaller side k (k × m): BLOCK_ELEMENTS
    elements each, but at least 256 columns, the width from which a float64 product with the block runs at full
    speed."""
    rows = matrix.shape[0]
    columns = matrix[0].numel()
    k, m = (columns, rows) if transposed else (rows, columns)
    step = max(256, BLOCK_ELEMENTS // k)
    return [slice(start, min(m, start + step)) for start in range(0, m, step)]


def _matrix_blocks(
    matrices: Sequence[Tensor], transposed: bool, dtype: torch.dtype, parts: Sequence[slice]
) -> Iterator[tuple[slice, Tensor]]:
    """(m slice, ``dtype`` block (n, k, block width)) of the (out, in) ``matrices`` taken on their smaller side k,
    for each of ``parts`` (from :func:`_column_blocks`).

    Transposed (out > in): blocks of whole rows, copied contiguously and handed out as transposed views.
    One buffer serves every block, so a block is only valid until the next one is drawn.
    """
    out_features = matrices[0].shape[0]
    views = [t.reshape(out_features, -1) for t in matrices]
    k = views[0].shape[1] if transposed else out_features
    widest = max(part.stop - part.start for part in parts)
    buffer = torch.empty((len(views), widest, k) if transposed else (len(views), k, widest), dtype=dtype)
    for part in parts:
        width = part.stop - part.start
        if transposed:
            block = buffer[:, :width]
            for i, view in enumerate(views):
                block[i].copy_(view[part])
            yield part, block.transpose(1, 2)
        else:
            block = buffer[:, :, :width]
            for i, view in enumerate(views):
                block[i].copy_(view[:, part])
            yield part, block


def _grams(base: Tensor, deltas: Sequence[Tensor], transposed: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """([W_1 Wᵀ, W_2 Wᵀ, …] (n, k, k), [‖δ_1‖², ‖δ_2‖², …]) in ``dtype``, W_i = W + δ_i, on the smaller side: one
    product per block and delta. Groups of deltas run at once (:func:`~ortho_mecha.methods.parallel.spread_groups`),
    each over all blocks, so every W_i Wᵀ is summed block by block in the same order whatever the grouping."""
    k = min(base.shape[0], base[0].numel())
    grams = torch.zeros((len(deltas), k, k), dtype=dtype)
    squared = torch.zeros(len(deltas), dtype=dtype)
    parts = _column_blocks(base, transposed)

    def group(rows: range) -> None:
        count = len(rows)
        for _, block in _matrix_blocks([base, *(deltas[i] for i in rows)], transposed, dtype, parts):
            base_block, targets = block[0], block[1:]
            squared[rows.start:rows.stop] += torch.linalg.vector_norm(targets, dim=(1, 2)).square()
            targets += base_block  # the deltas' block becomes the targets' (the buffer is refilled for the next one)
            grams[rows.start:rows.stop].baddbmm_(targets, base_block.T.expand(count, *base_block.T.shape))

    spread_groups(group, range(len(deltas)))
    return grams, squared


def _apply(
    base: Tensor, deltas: Sequence[Tensor], shares: Tensor, correction: Tensor, alpha: float, transposed: bool
) -> Tensor:
    """W + alpha (correction · W + Σ shares_i δ_i) on the smaller side, in blocks of the correction's dtype, in
    the base's dtype. Groups of blocks run at once (:func:`~ortho_mecha.methods.parallel.spread_groups`)."""
    out = torch.empty(base.shape, dtype=base.dtype)
    out_rows = out.view(base.shape[0], -1)
    shares = shares.to(correction.dtype)

    def group(parts: Sequence[slice]) -> None:
        for part, block in _matrix_blocks([base, *deltas], transposed, correction.dtype, parts):
            merged = torch.tensordot(shares, block[1:], dims=1).addmm_(correction, block[0]).mul_(alpha)
            merged.add_(block[0])
            if transposed:
                out_rows[part] = merged.T
            else:
                out_rows[:, part] = merged

    spread_groups(group, _column_blocks(base, transposed))
    return out


@merge_method
def orthomerge(
    base: Parameter(Tensor, "weight"),
    *deltas: Parameter(Tensor, "delta"),
    alpha: Parameter(float) = ALPHA.default,
    theta_agg: Parameter(str) = THETA_AGG.default,
    conflict_aware: Parameter(bool) = CONFLICT_AWARE.default,
    direction_weight: Parameter(str) = DIRECTION_WEIGHT.default,
    precision: Parameter(str) = PRECISION.default,
) -> Return(Tensor, "weight"):
    """Rotation merge: the fine-tunes' rotations of the base, averaged in skew space, plus their mean residual.

    For a matrix key with base W and targets W_i = W + δ_i (conv weights reshaped to [out, in·kh·kw];
    the rotation acts on the smaller side, on the transposes when out > in), see :func:`rotation_terms`
    for R* and ρ_i; ``out = W + alpha · (R* W + mean ρ_i − W)``. 1-D keys: ``W + alpha · mean(δ_i)``.
    Zero deltas are dropped per key; without any delta the base is returned.

    alpha ∈ [0, ∞): 0 returns the base; one delta with alpha 1 returns its model (also when its best
    rotation is a reflection, det −1, or a rotation near π); with one delta the result is linear in alpha.
    theta_agg ∈ {mean, median, max, sum}: n identical deltas equal one for mean/median/max; sum grows
    with n (median of an even count is the midpoint). conflict_aware: sign election in skew space.
    direction_weight ∈ {theta, magnitude, equal}: w_i ∝ θ_i, ∝ ‖δ_i‖ or equal.
    precision ∈ {float64, float32}: float64 is the method; float32 is an approximation (see PRECISION).
    """
    match_threads()
    options = check_options(
        "orthomerge",
        ORTHOMERGE_OPTIONS,
        {
            "alpha": alpha,
            "theta_agg": theta_agg,
            "conflict_aware": conflict_aware,
            "direction_weight": direction_weight,
            "precision": precision,
        },
    )
    if not deltas or options["alpha"] == 0:
        return base
    distinct, counts = _listed_once(deltas)
    clean, bad = finite_deltas(distinct)
    return mark_nonfinite(_orthomerge(base, clean, options, counts), bad)


def _listed_once(deltas: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The distinct delta tensors and how often each is listed: a row of repeat r reaches the method as the
    same tensor r times, and its products and rotation need working out only once."""
    distinct: list[Tensor] = []
    counts: list[int] = []
    for delta in deltas:
        index = next((i for i, seen in enumerate(distinct) if seen is delta), None)
        if index is None:
            distinct.append(delta)
            counts.append(1)
        else:
            counts[index] += 1
    return distinct, torch.tensor(counts, dtype=torch.int64)


def _orthomerge(base: Tensor, deltas: Sequence[Tensor], options: dict, counts: Tensor) -> Tensor:
    """:func:`orthomerge` of finite ``deltas``, the i-th listed ``counts[i]`` times."""
    if base.dim() < 2:
        kept = nonzero(deltas)
        if not kept:
            return base
        return combine(_shares(counts[kept])[None], [deltas[i] for i in kept], base, options["alpha"])
    with key_at_work():
        return _rotation_merge(base, deltas, options, counts)


def _rotation_merge(base: Tensor, deltas: Sequence[Tensor], options: dict, counts: Tensor) -> Tensor:
    """:func:`_orthomerge` of a matrix key."""
    transposed = base.shape[0] > base[0].numel()
    grams, squared = _grams(base, deltas, transposed, PRECISIONS[options["precision"]])
    kept = nonzero_indices(deltas, squared)
    if not kept:
        return base
    kept_counts = counts[kept]
    rotation, mean_turn = rotation_terms(
        grams[kept],
        squared[kept].sqrt(),
        options["theta_agg"],
        options["conflict_aware"],
        options["direction_weight"],
        kept_counts,
    )
    correction = rotation - torch.eye(rotation.shape[0], dtype=rotation.dtype) - mean_turn
    return _apply(base, [deltas[i] for i in kept], _shares(kept_counts), correction, options["alpha"], transposed)


def _shares(counts: Tensor) -> Tensor:
    """Each kept delta's float64 share of the mean over the listed ones: its count over their total."""
    return counts.to(torch.float64) / int(counts.sum())
