"""Rotation merge: ``orthomerge``, an orthogonal merge in the spirit of OrthoMerge (arXiv 2602.05943).

Each fine-tune's matrix is explained as a rotation of the base plus a residual; the rotations are
averaged in the Lie algebra (Cayley generators, skew-symmetric) and the residuals averaged as they are.
All linear algebra runs in float64; the result comes back in the base's dtype.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import logging
from collections.abc import Sequence

import torch
from sd_mecha import Parameter, Return, merge_method
from torch import Tensor

from ortho_mecha.methods.deltas import ALPHA, OptionSpec, add_to_base, check_options, nonzero, stack_float64

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
ORTHOMERGE_OPTIONS = (ALPHA, THETA_AGG, CONFLICT_AWARE, DIRECTION_WEIGHT)

# Above this condition number of R + I (a rotation angle near π) the Cayley map is not trusted.
CAYLEY_MAX_COND = 1e6
# The polar factor comes from eigh of MᵀM when its eigenvalue ratio is above this (cond(M) < 1e4);
# its distance to the SVD result grows like 1e-16·cond(M)², measured ≈ 1e-10 at the threshold.
EIGH_MIN_RATIO = 1e-8


def nearest_rotation(m: Tensor) -> Tensor:
    """The proper rotation R (det +1) closest to the square matrix ``m``: U D Vᵀ for m = U Σ Vᵀ.

    D = I, or flips the singular pair of the smallest singular value when det(U Vᵀ) = −1 (Kabsch).
    For a well-conditioned ``m`` the factors come from ``eigh(mᵀm) = V Σ² Vᵀ`` and U = m V Σ⁻¹, which is
    several times cheaper than an SVD and agrees with it to ~1e-16·cond(m)² (≤ 1e-10 here); otherwise
    from the SVD.
    """
    eigenvalues, v = torch.linalg.eigh(m.T @ m)
    if eigenvalues[0] > EIGH_MIN_RATIO * eigenvalues[-1]:
        u = (m @ v) / eigenvalues.sqrt()
        smallest = 0
    else:
        u, _, vh = torch.linalg.svd(m)
        v = vh.T
        smallest = -1
    rotation = u @ v.T
    if torch.linalg.slogdet(rotation).sign < 0:
        rotation = rotation - 2.0 * torch.outer(u[:, smallest], v[:, smallest])
    return rotation


def cayley_generator(rotation: Tensor) -> Tensor | None:
    """A = (R − I)(R + I)⁻¹, made exactly skew; ``None`` when R + I is too ill-conditioned to invert.

    R + I is normal with singular values 2|cos(φ/2)| over R's rotation angles φ, and ‖A‖₂ = tan(φ_max/2),
    so cond(R + I) ≤ sqrt(1 + ‖A‖₂²) ≤ sqrt(1 + ‖A‖_F²). The Frobenius bound is what is checked against
    ``CAYLEY_MAX_COND``: free to compute, and on the safe side.
    """
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
    solution, info = torch.linalg.solve_ex((rotation + eye).T, (rotation - eye).T)
    generator = solution.T
    generator = (generator - generator.T) / 2.0
    theta = torch.linalg.matrix_norm(generator)
    if int(info) != 0 or not torch.isfinite(theta) or 1.0 + float(theta) ** 2 > CAYLEY_MAX_COND**2:
        return None
    return generator


def cayley_rotation(generator: Tensor) -> Tensor:
    """R = (I − A)⁻¹(I + A) for a skew A, computed as I + 2 (I − A)⁻¹ A (I − A is never singular)."""
    eye = torch.eye(generator.shape[0], dtype=generator.dtype, device=generator.device)
    return eye + 2.0 * torch.linalg.solve(eye - generator, generator)


def _aggregate(thetas: Tensor, how: str) -> Tensor:
    if how == "mean":
        return thetas.mean()
    if how == "median":
        return torch.quantile(thetas, 0.5)
    if how == "max":
        return thetas.max()
    return thetas.sum()


def merged_rotation(
    base: Tensor,
    deltas: Sequence[Tensor],
    theta_agg: str = THETA_AGG.default,
    conflict_aware: bool = CONFLICT_AWARE.default,
    direction_weight: str = DIRECTION_WEIGHT.default,
) -> tuple[Tensor, Tensor]:
    """(R*, mean ρ_i) for a float64 base matrix (k × m, k ≤ m) and its non-zero deltas of the same shape.

    1. R_i: proper rotation nearest to W_i Wᵀ (:func:`nearest_rotation`), ρ_i = W_i − R_i W.
    2. A_i: Cayley generator of R_i; where R_i + I is ill-conditioned, R_i = I, A_i = 0, ρ_i = δ_i.
    3. θ_i = ‖A_i‖_F; A* = θ* · S / ‖S‖_F, S = Σ w_i A_i (A* = 0 where S = 0), θ* = agg(θ_i). Only the
       ratios of the w_i matter, as S is normalised; with all θ_i = 0 every A_i is 0, so "theta" weights
       need no equal-weight special case. conflict_aware: entries of A_i whose sign differs from that of
       the unmasked S are zeroed before summing again.
    4. R* = (I − A*)⁻¹(I + A*).
    """
    eye = torch.eye(base.shape[0], dtype=base.dtype, device=base.device)
    base_gram = base @ base.T
    generators = []
    residual_sum = torch.zeros_like(base)
    for delta in deltas:
        rotation = nearest_rotation(base_gram + delta @ base.T)
        generator = cayley_generator(rotation)
        if generator is None:
            logger.debug("rotation near π (R + I ill-conditioned): whole delta kept as residual")
            generators.append(torch.zeros_like(eye))
            residual_sum += delta
        else:
            generators.append(generator)
            residual_sum += delta - (rotation - eye) @ base
    stacked = torch.stack(generators)
    thetas = torch.linalg.matrix_norm(stacked)
    if direction_weight == "theta":
        weights = thetas
    elif direction_weight == "magnitude":
        weights = torch.stack([torch.linalg.vector_norm(d) for d in deltas])
    else:
        weights = torch.ones_like(thetas)
    direction = torch.einsum("i,ijk->jk", weights, stacked)
    if conflict_aware:
        agrees = torch.sign(stacked) == torch.sign(direction)
        direction = torch.einsum("i,ijk->jk", weights, stacked * agrees)
    norm = torch.linalg.matrix_norm(direction)
    if norm == 0:
        return eye, residual_sum / len(deltas)
    generator_star = direction * (_aggregate(thetas, theta_agg) / norm)
    return cayley_rotation(generator_star), residual_sum / len(deltas)


@merge_method
def orthomerge(
    base: Parameter(Tensor, "weight"),
    *deltas: Parameter(Tensor, "delta"),
    alpha: Parameter(float) = ALPHA.default,
    theta_agg: Parameter(str) = THETA_AGG.default,
    conflict_aware: Parameter(bool) = CONFLICT_AWARE.default,
    direction_weight: Parameter(str) = DIRECTION_WEIGHT.default,
) -> Return(Tensor, "weight"):
    """Rotation merge: the fine-tunes' rotations of the base, averaged in skew space, plus their mean residual.

    For a matrix key with base W and targets W_i = W + δ_i (conv weights reshaped to [out, in·kh·kw];
    the rotation acts on the smaller side, on the transposes when out > in), see :func:`merged_rotation`
    for R* and ρ_i; ``out = W + alpha · (R* W + mean ρ_i − W)``. 1-D keys: ``W + alpha · mean(δ_i)``.
    Zero deltas are dropped per key; without any delta the base is returned.

    alpha ∈ [0, ∞): 0 returns the base; one delta with alpha 1 returns its model (also when its best
    rotation is a reflection, det −1, or a rotation near π); with one delta the result is linear in alpha.
    theta_agg ∈ {mean, median, max, sum}: n identical deltas equal one for mean/median/max; sum grows
    with n (median of an even count is the midpoint). conflict_aware: sign election in skew space.
    direction_weight ∈ {theta, magnitude, equal}: w_i ∝ θ_i, ∝ ‖δ_i‖ or equal.
    """
    options = check_options(
        "orthomerge",
        ORTHOMERGE_OPTIONS,
        {
            "alpha": alpha,
            "theta_agg": theta_agg,
            "conflict_aware": conflict_aware,
            "direction_weight": direction_weight,
        },
    )
    kept = nonzero(deltas)
    if not kept or options["alpha"] == 0:
        return base
    if base.dim() < 2:
        return add_to_base(base, stack_float64(kept, 1).mean(dim=0), options["alpha"])
    matrices = stack_float64([base, *kept], base.shape[0])
    transposed = matrices.shape[1] > matrices.shape[2]
    if transposed:
        matrices = matrices.transpose(1, 2)
    w = matrices[0]
    rotation, residual = merged_rotation(
        w, list(matrices[1:]), options["theta_agg"], options["conflict_aware"], options["direction_weight"]
    )
    merged_delta = rotation @ w - w + residual
    return add_to_base(base, merged_delta.T if transposed else merged_delta, options["alpha"])
