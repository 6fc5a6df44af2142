"""The merge methods ortho-mecha registers with sd-mecha, grouped by theme.

Importing this package registers every method (``import ortho_mecha`` does so as soon as sd-mecha is
imported). :data:`METHOD_OPTIONS` lists each method's keyword options — default, range or allowed
values, help — for up-front plan checks (:func:`validate_options`) and for building controls from data.

- :mod:`.orthogonal`: ``ortho_project`` (ordered Gram–Schmidt), ``ortho_superpose`` (order-free)
- :mod:`.rotation`: ``orthomerge`` (rotations averaged in skew space)
- :mod:`.texture`: ``texture_boost``
- :mod:`.stock`: ``model_stock_rows`` (Model Stock per output row) and ``geometric_median_rows``, behind plans'
  ``model_stock`` and ``geometric_median``, over the deltas a key has
- :mod:`.deltas`: ``scale_delta``, ``read_once`` and the shared helpers
"""

from __future__ import annotations

from collections.abc import Mapping

from ortho_mecha.methods.deltas import (
    ALPHA,
    OptionError,
    OptionSpec,
    OptionValue,
    check_options,
    scale_delta,
)
from ortho_mecha.methods.orthogonal import PROJECT_OPTIONS, SUPERPOSE_OPTIONS, ortho_project, ortho_superpose
from ortho_mecha.methods.rotation import ORTHOMERGE_OPTIONS, orthomerge
from ortho_mecha.methods.stock import MEDIAN_OPTIONS, STOCK_OPTIONS, geometric_median_rows, model_stock_rows
from ortho_mecha.methods.texture import TEXTURE_OPTIONS, texture_boost

METHOD_OPTIONS: dict[str, tuple[OptionSpec, ...]] = {
    "ortho_project": PROJECT_OPTIONS,
    "ortho_superpose": SUPERPOSE_OPTIONS,
    "orthomerge": ORTHOMERGE_OPTIONS,
    "texture_boost": TEXTURE_OPTIONS,
    "model_stock_rows": STOCK_OPTIONS,
    "geometric_median_rows": MEDIAN_OPTIONS,
    "scale_delta": (ALPHA,),
}

# parameters a plan's recipe computes (never a user's option): ortho_superpose's rows' largest coefficient
RECIPE_PARAMETERS: dict[str, dict[str, OptionValue]] = {"ortho_superpose": {"noise_scale": 1.0, "noise_unit": 0.0}}


def validate_options(method: str, options: Mapping[str, OptionValue]) -> dict[str, OptionValue]:
    """Check a method's options before any tensor is read; returns them with defaults filled in.

    Raises :class:`OptionError` for an unknown method, an unknown option or a value out of range.
    """
    if method not in METHOD_OPTIONS:
        raise OptionError(f"unknown ortho-mecha method {method!r}; use one of {', '.join(METHOD_OPTIONS)}")
    return check_options(method, METHOD_OPTIONS[method], options)


__all__ = [
    "METHOD_OPTIONS",
    "RECIPE_PARAMETERS",
    "OptionError",
    "OptionSpec",
    "geometric_median_rows",
    "model_stock_rows",
    "ortho_project",
    "ortho_superpose",
    "orthomerge",
    "scale_delta",
    "texture_boost",
    "validate_options",
]
