"""Model Stock (Jang et al. 2024) and the geometric median over the deltas a key really has.

sd-mecha's ``model_stock`` takes the cosine over a tensor's last axis: for a conv weight that is the kernel's
width, one element for a 1×1 conv (every ``proj_in``/``skip_connection`` of an SD1.5 or SDXL UNet), where the
cosine is ±1 and the scale ``t`` divides by zero (written as ±3.4e38). ``model_stock_rows`` is the same formula
over each output row of the weight, the conv kernels flattened as everywhere else in ortho-mecha.

Both methods check their options as the others do and keep a NaN or Inf element of a delta to that element, as
:func:`~ortho_mecha.methods.deltas.finite_deltas` does for the others (a bad element made Model Stock's whole row 0
and the median's whole key NaN). They leave out a delta that is zero on the key, as ``orthomerge`` does: a row at
alpha 0 there (a block alpha of 0: "structure from A" leaves A's out blocks alone) is absent from that key, as in
a weighted sum and TIES. Counted, a zero delta has cosine 0 with the others, so Model Stock's t fell to 0 and the
key kept the base, and the geometric median took the origin as a point, halving the other row.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import itertools

import torch
from sd_mecha import Parameter, Return, merge_method
from sd_mecha.extensions import merge_methods
from torch import Tensor

from ortho_mecha.methods.deltas import OptionSpec, check_options, finite_deltas, mark_nonfinite

COS_EPS = OptionSpec("cos_eps", 1e-6, "cosine similarity epsilon", minimum=0.0, maximum=0.1)
STOCK_OPTIONS = (COS_EPS,)
MEDIAN_OPTIONS = (
    OptionSpec("eps", 1e-6, "smallest distance in the Weiszfeld weights", minimum=0.0, maximum=1.0),
    OptionSpec("maxiter", 100, "most Weiszfeld iterations", minimum=1, maximum=10_000),
    OptionSpec("ftol", 1e-20, "relative change of the objective that stops the iterations", minimum=0.0, maximum=1.0),
)


def _present(deltas: tuple[Tensor, ...]) -> list[Tensor]:
    """The deltas that are not zero everywhere on this key."""
    return [delta for delta in deltas if bool(delta.any())]


@merge_method
def model_stock_rows(
    *deltas: Parameter(Tensor, "delta"),
    cos_eps: Parameter(float) = 1e-6,
) -> Return(Tensor, "delta"):
    """Δ = t · mean_i δ_i, with ``t = k·c / (1 + (k − 1)·c)`` per output row, c the mean cosine of consecutive
    deltas over the row (conv kernels flattened: [out, in·kh·kw]; a 1-D or 0-d key is one row), k the number
    of deltas. Where ``1 + (k − 1)·c ≤ cos_eps`` (the deltas cancel on that row) t = 0. On 2-D keys this is
    sd-mecha's ``model_stock`` (cosine over the last axis), up to that guard. A delta that is zero on the key is
    left out (k counts the others); with none left, Δ = 0. cos_eps ∈ [0, 0.1].
    """
    cos_eps = check_options("model_stock_rows", STOCK_OPTIONS, {"cos_eps": cos_eps})["cos_eps"]
    clean, bad = finite_deltas(deltas)
    return mark_nonfinite(_stock(clean, cos_eps), bad)


def _stock(deltas: list[Tensor], cos_eps: float) -> Tensor:
    """:func:`model_stock_rows` of finite deltas."""
    present = _present(deltas)
    if not present:
        return torch.zeros_like(deltas[0])
    deltas = present
    count = len(deltas)
    shape = deltas[0].shape
    rows = [delta.reshape(shape[0] if delta.dim() > 1 else 1, -1) for delta in deltas]
    cosines = [torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=cos_eps) for a, b in itertools.pairwise(rows)]
    cos = torch.stack(cosines).mean(dim=0) if cosines else torch.ones(rows[0].shape[0], dtype=rows[0].dtype)
    denominator = 1 + (count - 1) * cos
    t = torch.where(denominator > cos_eps, count * cos / denominator.clamp_min(cos_eps), torch.zeros_like(cos))
    mean = torch.stack(rows).mean(dim=0)
    return (t.unsqueeze(-1) * mean).reshape(shape)


@merge_method
def geometric_median_rows(
    *deltas: Parameter(Tensor, "delta"),
    eps: Parameter(float) = 1e-6,
    maxiter: Parameter(int) = 100,
    ftol: Parameter(float) = 1e-20,
) -> Return(Tensor, "delta"):
    """Δ = argmin_m Σ_i ‖δ_i − m‖ over the deltas not zero on the key (sd-mecha's ``geometric_median``: Weiszfeld
    iterations from the mean, distances clamped below at ``eps``, stopped after ``maxiter`` or when the objective
    moves by less than ``ftol`` of itself); Δ = 0 where every delta is zero. eps ∈ [0, 1], maxiter an integer in
    [1, 10000], ftol ∈ [0, 1].
    """
    options = check_options("geometric_median_rows", MEDIAN_OPTIONS, {"eps": eps, "maxiter": maxiter, "ftol": ftol})
    clean, bad = finite_deltas(deltas)
    present = _present(clean)
    if not present:
        return mark_nonfinite(torch.zeros_like(clean[0]), bad)
    return mark_nonfinite(merge_methods.resolve("geometric_median").__wrapped__(*present, **options), bad)
