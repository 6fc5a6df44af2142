"""Delta Gram algebra: every delta inner product from the Gram H of all files relative to the base.

H is the F×F float64 Gram of ``x_f = W_f − W_C`` over a set of files f (the base C itself is not a row:
``H[C,·] = 0``). A row that takes model ``m`` with delta-from ``b`` has the delta ``x_m − x_b``, so

    <M_a − B_a, M_b − B_b> = H[a,b] − H[a,B_b] − H[B_a,b] + H[B_a,B_b]

which is ``T H Tᵀ`` with ``T[i, m_i] = 1`` and ``T[i, b_i] = −1``. No file is read again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# unit roundoff u of the dtypes models are stored in (safetensors names); a stored weight w is off by up to
# u·|w|, uniformly, so a delta of two stored tensors carries rounding noise of energy about (2/3)·u²·‖W‖².
# bf16's is 2⁻⁸; half of it is used, so that with NOISE_MARGIN a bf16 fine-tune 0.5 % away from its base (its
# delta's energy ~4× the pure rounding noise) is not taken for noise. fp8 bases get no floor (README).
UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-9}
NOISE_MARGIN = 10.0  # a combination of deltas whose energy is under this many times that noise is noise


def noise_floor(base_sq: np.ndarray | float, unit: np.ndarray | float) -> np.ndarray:
    """The energy ``NOISE_MARGIN · (2/3) · u² · ‖W_C‖²`` below which a combination of deltas of weights stored
    with unit roundoff ``u`` (base energy ``‖W_C‖²``) is indistinguishable from their rounding noise.

    ``ortho_superpose`` drops such directions of the delta Gram: fitting them would blow the rows' rounding
    noise up (two fp16 copies of one model differ only by it, and an exact opposite or a merge of other rows
    leaves only it), where in exact arithmetic the direction would not exist at all.
    """
    return NOISE_MARGIN * (2.0 / 3.0) * np.square(unit) * np.asarray(base_sq, dtype=np.float64)


def file_unit(path: str | Path) -> float:
    """The coarsest unit roundoff among a model file's stored float tensors (from its header; 0 for fp8 ones,
    whose rounding no floor covers, as for an fp8 base). Cached per file path, size and modification time: the
    Mixer's recipe asks for every row's on each rerun."""
    real = Path(path).resolve()
    try:
        stat = real.stat()
    except OSError:  # not there (any more): the header read says so
        return _read_unit.__wrapped__(real, 0, 0)
    return _read_unit(real, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _read_unit(path: Path, _size: int, _mtime_ns: int) -> float:
    from ortho_mecha.io import Model

    with Model(path) as model:
        return max((UNIT_ROUNDOFF.get(t.dtype, 0.0) for t in model.tensors.values() if t.is_float), default=0.0)


def noise_unit(base: str | Path, rows: Iterable[str | Path]) -> float:
    """The coarsest unit roundoff of the ``rows``' files when coarser than the ``base`` file's, else 0: fp16 rows
    over an fp32 base carry fp16 rounding noise, which ``ortho_superpose`` cannot read off the base's values
    (its ``noise_unit``)."""
    coarsest = max(map(file_unit, rows), default=0.0)
    return coarsest if coarsest > file_unit(base) else 0.0


def selection_matrix(n_files: int, models: Sequence[int], delta_from: Sequence[int | None]) -> np.ndarray:
    """The rows × files matrix T whose row i picks ``x_{models[i]} − x_{delta_from[i]}`` (None: the base)."""
    if len(models) != len(delta_from):
        raise ValueError(f"{len(models)} models but {len(delta_from)} delta-froms")
    t = np.zeros((len(models), n_files), dtype=np.float64)
    for i, (m, b) in enumerate(zip(models, delta_from, strict=True)):
        t[i, m] += 1.0
        if b is not None:
            t[i, b] -= 1.0
    return t


def delta_gram(h: np.ndarray, models: Sequence[int], delta_from: Sequence[int | None]) -> np.ndarray:
    """G[i, j] = <x_{m_i} − x_{b_i}, x_{m_j} − x_{b_j}> for rows (m_i, b_i) over the file Gram ``h``."""
    t = selection_matrix(h.shape[0], models, delta_from)
    g = t @ h @ t.T
    return (g + g.T) / 2.0


def delta_norms_sq(h: np.ndarray, models: Sequence[int], delta_from: Sequence[int | None]) -> np.ndarray:
    """The diagonal of :func:`delta_gram`, ‖x_m − x_b‖² = H_mm − 2 H_mb + H_bb per row, without the N×N product."""
    m = np.asarray(models, dtype=np.intp)
    norms = h[m, m].astype(np.float64)
    pairs = [(i, b) for i, b in enumerate(delta_from) if b is not None]
    if pairs:
        rows, b = (np.array(x, dtype=np.intp) for x in zip(*pairs, strict=True))
        norms[rows] += h[b, b] - 2.0 * h[m[rows], b]
    return norms


def cosine(g: np.ndarray) -> np.ndarray:
    """cos_ab = G_ab / sqrt(G_aa G_bb); 0 where either delta is zero, 1 on the diagonal of non-zero rows."""
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(c, -1.0, 1.0)


def squared_distances(h: np.ndarray) -> np.ndarray:
    """D_ab = H_aa + H_bb − 2 H_ab: squared distance between files (the base is the origin)."""
    d = np.diag(h)
    return np.clip(d[:, None] + d[None, :] - 2.0 * h, 0.0, None)
