"""texture_boost on plain tensors: add and orthogonal modes, beta range, options."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_mecha.methods import OptionError, texture_boost

boost = texture_boost.__wrapped__


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_add_mode_adds_beta_texture() -> None:
    merged, base, texture = vec(2.0, 3.0), vec(1.0, 3.0), vec(1.0, 1.0)
    torch.testing.assert_close(boost(merged, base, texture, beta=0.25), vec(2.25, 3.25))


def test_orthogonal_mode_adds_only_the_new_part() -> None:
    merged, base, texture = vec(2.0, 3.0), vec(1.0, 3.0), vec(1.0, 1.0)
    # merged − base = (1, 0): only the texture's (0, 1) part is new
    torch.testing.assert_close(boost(merged, base, texture, beta=0.5, mode="orthogonal"), vec(2.0, 3.5))


def test_orthogonal_mode_where_the_merge_left_the_key_unchanged() -> None:
    base, texture = vec(1.0, 3.0), vec(1.0, -2.0)
    torch.testing.assert_close(boost(base.clone(), base, texture, beta=0.5, mode="orthogonal"), vec(1.5, 2.0))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**31 - 1), beta=st.floats(min_value=0.01, max_value=0.5))
def test_orthogonal_boost_is_orthogonal_to_the_merged_delta(seed: int, beta: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn((8, 4, 3, 3), generator=gen, dtype=torch.float64)
    merged = base + 0.01 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    texture = 0.01 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    out = boost(merged, base, texture, beta=beta, mode="orthogonal")
    added = out - merged
    assert float(torch.sum(added * (merged - base))) == pytest.approx(0.0, abs=1e-16)
    # what was dropped is parallel to the merged delta
    dropped = beta * texture - added
    cos = torch.sum(dropped * (merged - base)) / (dropped.norm() * (merged - base).norm())
    assert abs(float(cos)) == pytest.approx(1.0, abs=1e-9)


def test_beta_zero_returns_merged_and_dtype_is_kept() -> None:
    merged, base, texture = vec(2.0, 3.0).half(), vec(1.0, 3.0).half(), vec(1.0, 1.0).half()
    assert boost(merged, base, texture, beta=0.0) is merged
    assert boost(merged, base, texture, beta=0.5).dtype == torch.float16


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"beta": 0.6}, "[0, 0.5]"),
        ({"beta": -0.1}, "[0, 0.5]"),
        ({"mode": "orthogonl"}, "'add', 'orthogonal' (did you mean 'orthogonal'?)"),
    ],
)
def test_invalid_options_raise_with_allowed_values(options: dict, expected: str) -> None:
    with pytest.raises(OptionError, match=re.escape(expected)):
        boost(vec(1.0), vec(1.0), vec(1.0), **options)


def test_orthogonal_mode_keeps_a_bad_element_to_itself() -> None:
    """The projection sums over the key: one NaN in the merge (or Inf in the texture) made every element NaN, so the
    merge's repair put the base on the whole key."""
    gen = torch.Generator().manual_seed(2)
    merged, base, texture = (torch.randn(8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    merged[2, 2] = float("nan")
    texture[3, 3] = float("inf")
    out = boost(merged, base, texture, beta=0.3, mode="orthogonal")
    assert torch.isnan(out).nonzero().tolist() == [[2, 2], [3, 3]]
