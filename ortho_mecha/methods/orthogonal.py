"""Orthogonal combinations of deltas: ``ortho_project`` (ordered Gram–Schmidt) and ``ortho_superpose`` (order-free).

Both take the base in weight space and the rows' deltas in delta space (build each with
``scale_delta(subtract(model, delta_from), alpha)``) and return weights. Arithmetic is float64 whatever
the merge dtype; the result comes back in the base's dtype.

Both work from the deltas' Gram matrix: one blocked float64 pass forms it, the n × n algebra gives each
delta's coefficient, a second pass sums ``base + alpha · Σ c_i δ_i`` (see :mod:`.deltas`), so no float64
copy of a whole key is ever made. ``ortho_project`` falls back to vector Gram–Schmidt for a key where a
delta lies (nearly) in the span of the earlier ones, which the Gram cannot resolve.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from sd_mecha import Parameter, Return, merge_method
from torch import Tensor

from ortho_mecha.gram import UNIT_ROUNDOFF, noise_floor
from ortho_mecha.methods.deltas import (
    ALPHA,
    OptionSpec,
    add_to_base,
    check_options,
    combine,
    finite_deltas,
    gram64,
    mark_nonfinite,
    nonzero_indices,
    stack_float64,
)
from ortho_mecha.methods.parallel import match_threads
from ortho_mecha.metrics import superpose_coefficients

logger = logging.getLogger(__name__)

# A delta whose Gram–Schmidt residual is below this fraction of its own norm lies in the span of the
# earlier deltas (exactly so in float64): the residual is rounding noise and must not become a direction.
SPAN_TOLERANCE = 1e-12
# ortho_project takes the Gram route only where every delta keeps at least this fraction of its squared norm
# against the earlier ones (residual ≥ 1e-3 of its norm). The route's error grows like 1e-16 / that fraction
# (cond(G) ≈ 4 / fraction); measured against vector Gram–Schmidt on float32 deltas near the threshold:
# ≤ 1e-11 of ‖Δ‖, far below float32 rounding.
PROJECT_GRAM_MIN = 1e-6

GRANULARITY = OptionSpec(
    "granularity", "key", "solve once per key, or once per output row of each matrix", choices=("key", "row")
)
RCOND = OptionSpec(
    "rcond",
    1e-6,
    "eigenvalues of the delta Gram below rcond·λmax count as zero (dependent deltas)",
    minimum=0.0,
    maximum=1.0,
    exclusive=True,
)

PROJECT_OPTIONS = (ALPHA,)
SUPERPOSE_OPTIONS = (ALPHA, GRANULARITY, RCOND)


def gram_schmidt_sum(deltas: Tensor) -> Tensor:
    """δ_1 + Σ_{i>1} (δ_i − proj_{span(δ_1..δ_{i−1})} δ_i) for the rows of ``deltas`` (n, N), in order.

    Classical Gram–Schmidt with one re-orthogonalisation pass ("twice is enough"), so the basis stays
    orthonormal to rounding even for nearly parallel deltas. Zero rows and rows already in the span add
    nothing and do not extend the basis.
    """
    basis = torch.empty_like(deltas)
    size = 0
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        norm = torch.linalg.vector_norm(delta)
        if norm == 0:
            continue
        residual = delta
        if size:
            q = basis[:size]
            for _ in range(2):
                residual = residual - q.T @ (q @ residual)
        total += residual
        residual_norm = torch.linalg.vector_norm(residual)
        if residual_norm > SPAN_TOLERANCE * norm:
            basis[size] = residual / residual_norm
            size += 1
    return total


def project_coefficients(gram: Tensor) -> Tensor | None:
    """c with Σ_i c_i δ_i = :func:`gram_schmidt_sum` of the deltas, from their (n, n) float64 Gram alone.

    G = L Lᵀ (Cholesky, in row order) gives orthonormal rows Q = L⁻¹ X and residuals r_i = L_ii q_i, so
    Σ r_i = dᵀ L⁻¹ X with d = diag(L): c solves Lᵀ c = d. ``None`` when a delta keeps less than
    ``PROJECT_GRAM_MIN`` of its squared norm against the earlier ones (nearly or exactly in their span,
    zero deltas included): the Gram cannot tell such a residual from rounding, vector Gram–Schmidt can.
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    pivots = torch.diagonal(factor)
    if int(info) != 0 or bool(torch.any(pivots * pivots < PROJECT_GRAM_MIN * torch.diagonal(gram))):
        return None
    return torch.linalg.solve_triangular(factor.T, pivots.unsqueeze(1), upper=True).squeeze(1)


def _coefficients(gram: Tensor, rcond: float, floor: np.ndarray | float = 0.0) -> Tensor:
    """:func:`ortho_mecha.metrics.superpose_coefficients` (the Mixer's prediction solves the same system) of a
    CPU float64 ``gram`` batch (..., n, n)."""
    return torch.from_numpy(superpose_coefficients(gram.numpy(), rcond, floor))


def storage_unit(base: Tensor) -> float:
    """The unit roundoff of the dtype ``base``'s values were stored in: the coarsest of bf16, fp16 and fp32 in
    which every value is exactly representable (as after loading such a file into the merge dtype), else
    float64's. A base whose values all fit fp8 gets none (0: no floor), as the analysis gives an fp8 base."""
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        if torch.equal(base, base.to(fp8).to(base.dtype)):
            return 0.0
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")):
        if torch.equal(base, base.to(dtype).to(base.dtype)):
            return UNIT_ROUNDOFF[name]
    return UNIT_ROUNDOFF["F64"]


def superpose(deltas: Sequence[Tensor], rows: int, rcond: float) -> Tensor:
    """Σ_i c_i δ_i with c from :func:`_coefficients`, solved independently for each of ``rows`` rows.

    ``rows`` = 1 solves once for the whole tensor; ``rows`` = out-features solves per output row (all
    rows at once, as a batch of n × n problems). Returns a float64 tensor shaped like the deltas.
    """
    return combine(_coefficients(gram64(deltas, rows), rcond), deltas)


@merge_method
def ortho_project(
    base: Parameter(Tensor, "weight"),
    *deltas: Parameter(Tensor, "delta"),
    alpha: Parameter(float) = ALPHA.default,
) -> Return(Tensor, "weight"):
    """Orthogonal projection in row order (the seed tool's method).

    Per key, with the deltas flattened, ``Δ = δ_1 + Σ_{i>1} (δ_i − proj_{span(δ_1..δ_{i−1})} δ_i)``
    (sequential Gram–Schmidt, float64) and ``out = base + alpha · Δ``. For two rows:
    ``base + δ_A + (δ_B − proj_{δ_A} δ_B)``. Order-dependent by definition: the first row keeps all of
    its delta, later rows only what is new.

    alpha ∈ [0, ∞): 0 returns the base, 1 the full combination; one delta with alpha 1 returns its model.
    Zero deltas are ignored; without any delta the base is returned.
    """
    match_threads()
    options = check_options("ortho_project", PROJECT_OPTIONS, {"alpha": alpha})
    if not deltas or options["alpha"] == 0:
        return base
    clean, bad = finite_deltas(deltas)
    return mark_nonfinite(_project(base, clean, options["alpha"]), bad)


def _project(base: Tensor, deltas: Sequence[Tensor], alpha: float) -> Tensor:
    gram = gram64(deltas, 1)[0]
    kept = nonzero_indices(deltas, torch.diagonal(gram))
    if not kept:
        return base
    deltas = [deltas[i] for i in kept]
    coefficients = project_coefficients(gram[kept][:, kept])
    if coefficients is None:
        logger.debug("a delta lies (nearly) in the span of the earlier ones: vector Gram–Schmidt for this key")
        return add_to_base(base, gram_schmidt_sum(stack_float64(deltas, 1).squeeze(1)), alpha)
    return combine(coefficients.unsqueeze(0), deltas, base, alpha)


@merge_method
def ortho_superpose(
    base: Parameter(Tensor, "weight"),
    *deltas: Parameter(Tensor, "delta"),
    alpha: Parameter(float) = ALPHA.default,
    granularity: Parameter(str) = GRANULARITY.default,
    rcond: Parameter(float) = RCOND.default,
    noise_scale: Parameter(float) = 1.0,
    noise_unit: Parameter(float) = 0.0,
) -> Return(Tensor, "weight"):
    """Order-free orthogonal superposition: every delta keeps exactly its own magnitude along its direction.

    With X the stacked deltas and G = X Xᵀ: ``out = base + alpha · Xᵀ c``, c the minimum-norm
    least-squares solution of ``G c = diag(G)``, from the eigendecomposition of G with eigenvalues below
    ``rcond · λmax`` dropped, and those below the rounding noise of the stored inputs
    (:func:`ortho_mecha.gram.noise_floor`; the storage dtype is read off the base's values). Whenever no
    eigenvalue is dropped, ``<Δ, δ_i> = ‖δ_i‖²`` for every i: orthogonal deltas add in full, partial
    overlaps are not double counted, identical deltas count once and opposite deltas cancel (also when
    stored in fp16, where they differ by rounding).

    alpha ∈ [0, ∞): 0 returns the base; one delta with alpha 1 returns its model.
    granularity: ``"key"`` solves once per key; ``"row"`` once per output row of each matrix (conv
    weights: per output channel), batched; 1-D keys are always solved per key.
    rcond ∈ (0, 1), default 1e-6 (exactly opposite deltas stored in fp32 reach about 1e-11).
    noise_scale ≥ 0: the largest factor the deltas were scaled by before this method (a plan's row alphas,
    per key with block alphas; what ``ortho-mecha recipe`` passes): their rounding noise was scaled with them,
    so the floor is ``noise_scale²`` times the stored inputs'. Default 1: unscaled deltas.
    noise_unit ≥ 0: the unit roundoff of the rows' stored dtype when it is coarser than the base's (fp16 rows
    over an fp32 base: their rounding noise is fp16's, which the base's values cannot tell; what
    ``ortho-mecha recipe`` passes then). The floor takes the coarser of it and the base's. Default 0: the base's.
    """
    match_threads()
    options = check_options(
        "ortho_superpose", SUPERPOSE_OPTIONS, {"alpha": alpha, "granularity": granularity, "rcond": rcond}
    )
    for name, value in (("noise_scale", noise_scale), ("noise_unit", noise_unit)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"ortho_superpose: {name} must be a finite number ≥ 0, got {value}")
    if not deltas or options["alpha"] == 0:
        return base
    clean, bad = finite_deltas(deltas)
    return mark_nonfinite(_superpose(base, clean, options, noise_scale, noise_unit), bad)


def _superpose(base: Tensor, deltas: Sequence[Tensor], options: dict, noise_scale: float, noise_unit: float) -> Tensor:
    rows = base.shape[0] if options["granularity"] == "row" and base.dim() >= 2 else 1
    gram = gram64(deltas, rows)
    kept = nonzero_indices(deltas, torch.diagonal(gram, dim1=1, dim2=2).sum(dim=0))
    if not kept:
        return base
    base_sq = base.to(torch.float64).reshape(rows, -1).square().sum(dim=1)  # per solve: ‖W_C‖² of its part
    floor = noise_floor(base_sq.numpy(), max(storage_unit(base), noise_unit)) * noise_scale**2
    coefficients = _coefficients(gram[:, kept][:, :, kept], options["rcond"], floor)
    return combine(coefficients, [deltas[i] for i in kept], base, options["alpha"])
