"""Small pieces every merge method shares: option specs and their checks, float64 stacking, ``scale_delta``.

Each option of a method is an :class:`OptionSpec` — default, bounds or allowed values, help — so the
signature's default, the check run on every key and the Mixer's widget all come from one place
(:data:`ortho_mecha.methods.METHOD_OPTIONS`). A bad value raises :class:`OptionError`, which is both an
:class:`~ortho_mecha.errors.OrthoMechaError` (the CLI and dashboard print it as one line) and a
``ValueError``.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import dataclasses
import difflib
from collections.abc import Mapping, Sequence

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
        if not (low_ok and high_ok):
            raise OptionError(f"{method}: {self.name}={value!r} is out of range; use a value in {self.range_text()}")
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


def nonzero(deltas: Sequence[Tensor]) -> list[Tensor]:
    """The deltas that are not exactly zero: a zero delta has no direction and carries nothing."""
    return [d for d in deltas if bool(torch.any(d != 0))]


def stack_float64(tensors: Sequence[Tensor], rows: int) -> Tensor:
    """Stack same-shaped tensors as float64 with shape (n, rows, elements per row)."""
    return torch.stack([t.to(torch.float64).reshape(rows, -1) for t in tensors])


def add_to_base(base: Tensor, total: Tensor, alpha: float) -> Tensor:
    """base + alpha · total in float64 (``total`` reshaped to the base's shape), returned in the base's dtype."""
    return (base.to(torch.float64) + alpha * total.reshape(base.shape)).to(base.dtype)


@merge_method
def scale_delta(
    delta: Parameter(Tensor, "delta"),
    alpha: Parameter(float) = ALPHA.default,
) -> Return(Tensor, "delta"):
    """alpha · δ: a row's strength (times its repeat count) applied to its delta.

    ``alpha`` ≥ 0; 0 gives a zero delta, 1 returns δ unchanged. Computed in float64, returned in δ's dtype.
    """
    alpha = ALPHA.check("scale_delta", alpha)
    return (delta.to(torch.float64) * alpha).to(delta.dtype)
