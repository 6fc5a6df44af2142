"""Model Stock (Jang et al. 2024) as mergekit and sd-mecha approximate it, per output row of every kind of key.

sd-mecha's ``model_stock`` takes the cosine over a tensor's last axis: for a conv weight that is the kernel's
width, one element for a 1×1 conv (every ``proj_in``/``skip_connection`` of an SD1.5 or SDXL UNet), where the
cosine is ±1 and the scale ``t`` divides by zero (written as ±3.4e38). This is the same formula over each output
row of the weight, the conv kernels flattened as everywhere else in ortho-mecha.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import itertools

import torch
from sd_mecha import Parameter, Return, merge_method
from torch import Tensor


@merge_method
def model_stock_rows(
    *deltas: Parameter(Tensor, "delta"),
    cos_eps: Parameter(float) = 1e-6,
) -> Return(Tensor, "delta"):
    """Δ = t · mean_i δ_i, with ``t = k·c / (1 + (k − 1)·c)`` per output row, c the mean cosine of consecutive
    deltas over the row (conv kernels flattened: [out, in·kh·kw]; a 1-D or 0-d key is one row), k the number
    of deltas. Where ``1 + (k − 1)·c ≤ cos_eps`` (the deltas cancel on that row) t = 0. On 2-D keys this is
    sd-mecha's ``model_stock`` (cosine over the last axis), up to that guard.
    """
    count = len(deltas)
    shape = deltas[0].shape
    rows = [delta.reshape(shape[0] if delta.dim() > 1 else 1, -1) for delta in deltas]
    cosines = [torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=cos_eps) for a, b in itertools.pairwise(rows)]
    cos = torch.stack(cosines).mean(dim=0) if cosines else torch.ones(rows[0].shape[0], dtype=rows[0].dtype)
    denominator = 1 + (count - 1) * cos
    t = torch.where(denominator > cos_eps, count * cos / denominator.clamp_min(cos_eps), torch.zeros_like(cos))
    mean = torch.stack(rows).mean(dim=0)
    return (t.unsqueeze(-1) * mean).reshape(shape)
