"""model_stock_rows and geometric_median_rows called as any sd-mecha recipe calls them: options checked, a bad
element kept to itself."""

import re

import pytest
import torch

from ortho_mecha.methods import OptionError, geometric_median_rows, model_stock_rows

stock = model_stock_rows.__wrapped__
median = geometric_median_rows.__wrapped__
MEDIAN_DEFAULTS = {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}


def deltas() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return tuple(torch.randn(6, 16, generator=gen, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("method", ["stock", "median"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_element_stays_that_element(method: str, bad: float) -> None:
    """The other methods keep NaN/Inf to its elements (the merge repairs those); here one bad element made Model
    Stock's whole output row 0 and the geometric median's whole key NaN."""
    a, b, c = deltas()
    merge = stock if method == "stock" else lambda *d: median(*d, **MEDIAN_DEFAULTS)
    clean = merge(a.clone(), b, c)
    a[2, 5] = bad
    out = merge(a, b, c)
    assert torch.isnan(out).nonzero().tolist() == [[2, 5]]
    other_rows = torch.ones(6, dtype=torch.bool)
    other_rows[2] = False
    if method == "stock":  # per output row: the other rows are as without the bad element
        torch.testing.assert_close(out[other_rows], clean[other_rows], rtol=0, atol=0)
    assert torch.isfinite(out[2, torch.arange(16) != 5]).all()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda *d: stock(*d, cos_eps=2.0), "model_stock_rows: cos_eps=2.0 is out of range; use a value in [0, 0.1]"),
        (lambda *d: stock(*d, cos_eps=-1e-3), "[0, 0.1]"),
        (lambda *d: median(*d, **MEDIAN_DEFAULTS | {"eps": -1.0}), "geometric_median_rows: eps=-1.0 is out of range"),
        (lambda *d: median(*d, **MEDIAN_DEFAULTS | {"maxiter": 0}), "maxiter=0 is out of range; use a value in [1, "),
        (lambda *d: median(*d, **MEDIAN_DEFAULTS | {"maxiter": 2.5}), "maxiter=2.5 is not a whole number"),
        (lambda *d: median(*d, **MEDIAN_DEFAULTS | {"ftol": float("nan")}), "ftol=nan is out of range"),
    ],
)
def test_options_out_of_range_are_refused_naming_method_and_option(call, expected: str) -> None:
    """cos_eps=2 set every merged delta to 0 without a word, a negative one raised torch's own message."""
    with pytest.raises(OptionError, match=re.escape(expected)):
        call(*deltas())


def test_a_whole_number_option_is_handed_on_as_an_int() -> None:
    a, b, c = deltas()
    torch.testing.assert_close(median(a, b, c, **MEDIAN_DEFAULTS | {"maxiter": 7.0}),
                               median(a, b, c, **MEDIAN_DEFAULTS | {"maxiter": 7}), rtol=0, atol=0)
