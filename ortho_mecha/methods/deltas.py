"""Small pieces every merge method shares: option specs and their checks, blocked float64 work, ``scale_delta``.

Each option of a method is an :class:`OptionSpec` — default, bounds or allowed values, help — so the
signature's default, the check run on every key and the Mixer's widget all come from one place
(:data:`ortho_mecha.methods.METHOD_OPTIONS`). A bad value raises :class:`OptionError`, which is both an
:class:`~ortho_mecha.errors.OrthoMechaError` (the CLI and dashboard print it as one line) and a
``ValueError``.

Large keys are worked on in float64 blocks of about :data:`BLOCK_ELEMENTS` elements per tensor
(:func:`float64_blocks`): sums and products are as accurate as on whole float64 copies, but the float64
temporaries stay a few MB per merge thread whatever the size of the key, and stay in cache.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import dataclasses
import difflib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from sd_mecha import Parameter, Return, merge_method
from torch import Tensor

from ortho_mecha.errors import OrthoMechaError

OptionValue = float | str | bool


class OptionError(OrthoMechaError, ValueError):
    """An option value outside its allowed values or range."""


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One keyword option of a merge method: its default and what values it accepts.

    ``choices`` lists the allowed strings of a string option; ``minimum``/``maximum`` bound a number,
    inclusive unless ``exclusive`` says otherwise.
    """

    name: str
    default: OptionValue
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False

    def check(self, method: str, value: OptionValue) -> OptionValue:
        """Return ``value`` if it is allowed, else raise :class:`OptionError` saying what is."""
        if self.choices:
            if value not in self.choices:
                nearest = difflib.get_close_matches(str(value), self.choices, n=1)
                hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
                allowed = ", ".join(repr(c) for c in self.choices)
                raise OptionError(f"{method}: {self.name}={value!r} is not allowed; use one of {allowed}{hint}")
            return value
        if isinstance(self.default, bool):
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise OptionError(f"{method}: {self.name}={value!r} is not allowed; use true or false")
        try:
            number = float(value)
        except (TypeError, ValueError):
            message = f"{method}: {self.name}={value!r} is not a number; use a value in {self.range_text()}"
            raise OptionError(message) from None
        low_ok = self.minimum is None or (number > self.minimum if self.exclusive else number >= self.minimum)
        high_ok = self.maximum is None or (number < self.maximum if self.exclusive else number <= self.maximum)
        if not (low_ok and high_ok and math.isfinite(number)):
            raise OptionError(f"{method}: {self.name}={value!r} is out of range; use a value in {self.range_text()}")
        if isinstance(self.default, int):  # a count: a whole number, handed on as an int
            if not number.is_integer():
                raise OptionError(f"{method}: {self.name}={value!r} is not a whole number; use one in "
                                  f"{self.range_text()}")
            return int(number)
        return number

    def range_text(self) -> str:
        """The allowed interval, e.g. ``[0, inf)`` or ``(0, 1)``."""
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        left = "(" if self.exclusive or self.minimum is None else "["
        right = ")" if self.exclusive or self.maximum is None else "]"
        return f"{left}{low}, {high}{right}"


ALPHA = OptionSpec("alpha", 1.0, "strength of the merged delta: 0 returns the base, 1 the full merge", minimum=0.0)


def check_options(
    method: str, specs: Sequence[OptionSpec], values: Mapping[str, OptionValue]
) -> dict[str, OptionValue]:
    """Check ``values`` against ``specs``; unknown names are an error, missing ones take the default."""
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise OptionError(f"{method}: unknown option(s) {', '.join(unknown)}; the options are {', '.join(by_name)}")
    return {name: spec.check(method, values.get(name, spec.default)) for name, spec in by_name.items()}


# Elements per tensor in one float64 block: 64 Ki elements, 512 KiB in float64.
BLOCK_ELEMENTS = 1 << 16


def finite_deltas(deltas: Sequence[Tensor]) -> tuple[list[Tensor], Tensor | None]:
    """The deltas with their NaN/Inf elements zeroed, and the mask of where any delta had one (None: nowhere).

    The methods that mix elements (a Gram, a rotation) would turn one bad element into a whole bad key;
    with :func:`mark_nonfinite` only those elements stay bad, for the merge's repair to put the base there.
    """
    bad: Tensor | None = None
    clean = []
    for delta in deltas:
        if delta.is_floating_point() and not bool(torch.isfinite(delta.sum())):  # cheap: one pass, no mask
            mask = ~torch.isfinite(delta)
            if bool(mask.any()):  # (else only the sum overflowed)
                bad = mask if bad is None else bad | mask
                delta = torch.where(mask, torch.zeros((), dtype=delta.dtype), delta)
        clean.append(delta)
    return clean, bad


def mark_nonfinite(out: Tensor, bad: Tensor | None) -> Tensor:
    """``out`` with NaN where an input delta had NaN/Inf (:func:`finite_deltas`), so the merge repairs and
    counts exactly those elements."""
    if bad is None:
        return out
    return torch.where(bad, torch.full((), float("nan"), dtype=out.dtype), out)


def nonzero(deltas: Sequence[Tensor]) -> list[int]:
    """Indices of the deltas that are not exactly zero: a zero delta has no direction and carries nothing."""
    return [i for i, d in enumerate(deltas) if bool(torch.any(d != 0))]


def nonzero_indices(deltas: Sequence[Tensor], squared_norms: Tensor) -> list[int]:
    """Indices of the deltas that are not exactly zero, given their float64 squared norms.

    A squared norm above 0 settles it; one of 0 is checked on the tensor itself (a float64 value below
    ~1e-154 squares to 0), so the answer is exactly :func:`nonzero`'s without a pass over every delta.
    """
    return [i for i, d in enumerate(deltas) if squared_norms[i] > 0 or bool(torch.any(d != 0))]


def stack_float64(tensors: Sequence[Tensor], rows: int) -> Tensor:
    """Stack same-shaped tensors as float64 with shape (n, rows, elements per row)."""
    return torch.stack([t.to(torch.float64).reshape(rows, -1) for t in tensors])


def row_blocks(rows: int, cols: int) -> Iterator[tuple[slice, slice]]:
    """(row slice, column slice) blocks covering a rows × cols matrix: whole rows, several per block when
    they are short, otherwise one row cut into pieces; about :data:`BLOCK_ELEMENTS` elements each."""
    if cols >= BLOCK_ELEMENTS:
        for row in range(rows):
            for start in range(0, cols, BLOCK_ELEMENTS):
                yield slice(row, row + 1), slice(start, min(cols, start + BLOCK_ELEMENTS))
        return
    step = max(1, BLOCK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step)), slice(0, cols)


def float64_blocks(tensors: Sequence[Tensor], rows: int) -> Iterator[tuple[slice, slice, Tensor]]:
    """Same-shaped tensors viewed as (rows, cols), block by block as (row slice, column slice, block).

    ``block`` is float64 (block rows, n, block columns), block[:, i] tensor i's part; one buffer serves
    every block, so a block is only valid until the next one is drawn.
    """
    views = [t.reshape(rows, -1) for t in tensors]
    buffer = None
    for row_slice, col_slice in row_blocks(rows, views[0].shape[1]):
        if buffer is None:  # the first block is the largest
            shape = (row_slice.stop - row_slice.start, len(views), col_slice.stop - col_slice.start)
            buffer = torch.empty(shape, dtype=torch.float64)
        block = buffer[: row_slice.stop - row_slice.start, :, : col_slice.stop - col_slice.start]
        for i, view in enumerate(views):
            block[:, i].copy_(view[row_slice, col_slice])
        yield row_slice, col_slice, block


def gram64(tensors: Sequence[Tensor], rows: int) -> Tensor:
    """Float64 Gram matrices (rows, n, n) of same-shaped tensors viewed as (rows, cols): one per row, or one
    for the whole tensor with ``rows`` = 1. Formed block by block (:func:`float64_blocks`)."""
    gram = torch.zeros((rows, len(tensors), len(tensors)), dtype=torch.float64)
    for row_slice, _, block in float64_blocks(tensors, rows):
        gram[row_slice] += block @ block.transpose(1, 2)
    return gram


def combine(
    coefficients: Tensor,
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    alpha: float = 1.0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``base + alpha · Σ_i c[r, i] · t_i[r]`` for each row r of the tensors viewed as (rows, cols).

    ``coefficients`` is (rows, n) float64 (rows = 1: one set for the whole tensor). Summed in float64 block by
    block and rounded once to ``dtype``: by default the base's dtype, or float64 without a base (then the
    result is the plain sum).
    """
    rows = coefficients.shape[0]
    if dtype is None:
        dtype = torch.float64 if base is None else base.dtype
    out = torch.empty(tensors[0].shape, dtype=dtype)
    out_rows = out.view(rows, -1)
    if rows == 1:  # one coefficient per tensor: accumulate into a float64 block, no stacked copy
        weights = (alpha * coefficients[0]).tolist()
        views = [t.reshape(1, -1) for t in tensors]
        base_row = None if base is None else base.reshape(1, -1)
        for _, col_slice in row_blocks(1, out_rows.shape[1]):
            if base_row is None:
                total = torch.zeros(col_slice.stop - col_slice.start, dtype=torch.float64)
            else:
                total = base_row[0, col_slice].to(torch.float64, copy=True)
            for weight, view in zip(weights, views, strict=True):
                total.add_(view[0, col_slice], alpha=weight)
            out_rows[0, col_slice] = total
        return out
    inputs = list(tensors) if base is None else [base, *tensors]
    for row_slice, col_slice, block in float64_blocks(inputs, rows):
        deltas = block if base is None else block[:, 1:]
        total = (coefficients[row_slice].unsqueeze(1) @ deltas).squeeze(1)
        out_rows[row_slice, col_slice] = total if base is None else block[:, 0] + alpha * total
    return out


def add_to_base(base: Tensor, total: Tensor, alpha: float) -> Tensor:
    """base + alpha · total in float64 (``total`` reshaped to the base's shape), returned in the base's dtype."""
    return (base.to(torch.float64) + alpha * total.reshape(base.shape)).to(base.dtype)


@merge_method
def read_once(model: Parameter(Tensor, "weight")) -> Return(Tensor, "weight"):
    """The model's tensor unchanged, read once per key however many nodes use it.

    sd-mecha evaluates a model node once per consumer (each time read and cast again), while the output of
    a merge node is computed once per key and handed to every consumer; the recipes wrap each model in this.
    """
    return model


@merge_method
def scale_delta(
    delta: Parameter(Tensor, "delta"),
    alpha: Parameter(float) = ALPHA.default,
) -> Return(Tensor, "delta"):
    """alpha · δ: a row's strength (times its repeat count) applied to its delta.

    ``alpha`` ≥ 0; 0 gives a zero delta, 1 returns δ unchanged. Computed in float64, returned in δ's dtype.
    """
    alpha = ALPHA.check("scale_delta", alpha)
    if alpha == 1:
        return delta
    return combine(torch.tensor([[alpha]], dtype=torch.float64), [delta], dtype=delta.dtype)
