"""ortho_project, ortho_superpose and scale_delta on plain tensors: hand-computed cases and seeded properties."""

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_mecha.methods import OptionError, ortho_project, ortho_superpose, scale_delta
from ortho_mecha.methods.orthogonal import gram_schmidt_sum, superpose

project = ortho_project.__wrapped__
superpose_method = ortho_superpose.__wrapped__

SHAPES = [(8, 4, 3, 3), (6, 10), (10, 6), (6,)]


def randn(generator: torch.Generator, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=generator, dtype=torch.float64)


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a * b))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# --- ortho_project -------------------------------------------------------------------------------------


def test_project_hand_computed() -> None:
    base = torch.tensor([10.0, 20.0], dtype=torch.float64)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(project(base, a, b), torch.tensor([11.0, 21.0], dtype=torch.float64))
    # order matters: b first keeps all of b, a adds only its part orthogonal to b
    torch.testing.assert_close(project(base, b, a), torch.tensor([11.5, 20.5], dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_project_one_delta_reproduces_model(gen: torch.Generator, shape: tuple[int, ...]) -> None:
    base, delta = randn(gen, shape), randn(gen, shape, 0.01)
    torch.testing.assert_close(project(base, delta), base + delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_project_two_rows_formula(gen: torch.Generator, shape: tuple[int, ...]) -> None:
    base, a, b = randn(gen, shape), randn(gen, shape, 0.01), randn(gen, shape, 0.01)
    b = b + 0.5 * a  # overlapping on purpose
    expected = base + a + (b - inner(b, a) / inner(a, a) * a)
    torch.testing.assert_close(project(base, a, b), expected, rtol=0, atol=1e-12)


def test_project_matches_qr_reference(gen: torch.Generator) -> None:
    # for independent deltas the sum of Gram–Schmidt residuals is Q·diag(R) of X = Q R (columns = deltas)
    x = randn(gen, (4, 50))
    x[2] += 0.9 * x[0]
    q, r = np.linalg.qr(x.numpy().T)
    expected = (q * np.diag(r)).sum(axis=1)
    np.testing.assert_allclose(gram_schmidt_sum(x).numpy(), expected, rtol=0, atol=1e-12)


def test_project_duplicates_and_zero_deltas(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (6, 10)), randn(gen, (6, 10), 0.01), randn(gen, (6, 10), 0.01)
    zero = torch.zeros_like(a)
    reference = project(base, a, b)
    torch.testing.assert_close(project(base, zero, a, zero, b, zero), reference, rtol=0, atol=0)
    # a duplicate (exactly in the span) adds nothing and does not disturb later rows
    torch.testing.assert_close(project(base, a, a, b), reference, rtol=0, atol=1e-12)
    assert project(base, zero) is base
    assert project(base) is base


def test_project_alpha(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (6, 10)), randn(gen, (6, 10), 0.01), randn(gen, (6, 10), 0.01)
    assert project(base, a, b, alpha=0.0) is base
    full = project(base, a, b) - base
    torch.testing.assert_close(project(base, a, b, alpha=0.3) - base, 0.3 * full, rtol=0, atol=1e-12)


# --- ortho_superpose -----------------------------------------------------------------------------------


def test_superpose_hand_computed() -> None:
    base = torch.zeros(2, dtype=torch.float64)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # G = [[1, 1], [1, 2]], diag = (1, 2) -> c = (0, 1): b alone already has a's full magnitude along a
    torch.testing.assert_close(superpose_method(base, a, b), b)
    torch.testing.assert_close(superpose_method(base, b, a), b)


@pytest.mark.parametrize("granularity", ["key", "row"])
@pytest.mark.parametrize("shape", SHAPES)
def test_superpose_one_delta_reproduces_model(gen: torch.Generator, shape: tuple[int, ...], granularity: str) -> None:
    base, delta = randn(gen, shape), randn(gen, shape, 0.01)
    out = superpose_method(base, delta, granularity=granularity)
    torch.testing.assert_close(out, base + delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("granularity", ["key", "row"])
def test_superpose_orthogonal_deltas_add_in_full(gen: torch.Generator, granularity: str) -> None:
    base = randn(gen, (6, 10))
    a = randn(gen, (6, 10), 0.01)
    b = torch.zeros_like(a)
    b[:, 5:] = randn(gen, (6, 5), 0.01)
    a[:, 5:] = 0.0  # disjoint supports: orthogonal per key and per row
    out = superpose_method(base, a, b, granularity=granularity)
    torch.testing.assert_close(out, base + a + b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_superpose_opposite_deltas_cancel(gen: torch.Generator, dtype: torch.dtype) -> None:
    base = randn(gen, (6, 10)).to(dtype)
    a = randn(gen, (6, 10), 0.01).to(dtype)
    torch.testing.assert_close(superpose_method(base, a, -a), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(superpose_method(base, a, -a, granularity="row"), base, rtol=0, atol=1e-6)


def test_superpose_identical_deltas_count_once(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (8, 4, 3, 3)), randn(gen, (8, 4, 3, 3), 0.01), randn(gen, (8, 4, 3, 3), 0.01)
    once = superpose_method(base, a, b)
    torch.testing.assert_close(superpose_method(base, a, a, b, a), once, rtol=0, atol=1e-12)
    torch.testing.assert_close(superpose_method(base, a, a, a), base + a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["key", "row"])
def test_superpose_stored_copies_opposites_and_merges_fit_no_rounding_noise(gen: torch.Generator,
                                                                           stored: torch.dtype,
                                                                           granularity: str) -> None:
    """Models stored in fp16/bf16: a copy, an exact opposite and a 0.5/0.5 merge of two rows differ from the exact
    relation only by rounding. Those directions are rounding noise (below ``gram.noise_floor``) and are dropped:
    the copy counts once, the opposite cancels, the merge row acts as the exact 0.5/0.5 merge — no row's noise is
    blown up."""
    def stored_as(t: torch.Tensor) -> torch.Tensor:
        return t.to(stored).to(torch.float32)

    base = stored_as(randn(gen, (64, 48)))
    a_model, b_model = stored_as(base + randn(gen, (64, 48), 0.02)), stored_as(base + randn(gen, (64, 48), 0.02))
    a, b = a_model - base, b_model - base
    copy = stored_as(a_model + randn(gen, (64, 48), 1e-6)) - base
    opposite = stored_as(base - a) - base
    merge = stored_as(base + 0.5 * a + 0.5 * b) - base
    plain = superpose_method(base, a, b, granularity=granularity)
    exact_merge = superpose_method(base, a, b, 0.5 * a + 0.5 * b, granularity=granularity)  # the relation exact
    scale = float((plain - base).norm())
    for rows, expected in (((a, copy, b), plain), ((a, b, merge), exact_merge), ((a, opposite), base)):
        out = superpose_method(base, *rows, granularity=granularity)
        assert float((out - expected).norm()) < 0.05 * scale, [float(r.norm()) for r in rows]
    blown = superpose(list((a, opposite)), 1, 1e-6)  # no floor (the method before): fits the rounding noise
    assert float(blown.norm()) > 5 * float(a.norm())


def test_superpose_floor_scales_with_the_rows_scale(gen: torch.Generator) -> None:
    """A real bf16 delta (0.6 % of the weights' RMS) scaled by 0.5, beside a larger row, is below the stored
    inputs' rounding floor, but its rounding noise was scaled with it: with noise_scale 0.5 it is kept."""
    base = torch.randn((64, 64), generator=gen, dtype=torch.float64).to(torch.bfloat16).to(torch.float64)

    def tuned(rms: float) -> torch.Tensor:
        noise = torch.randn((64, 64), generator=gen, dtype=torch.float64)
        return (base * (1 + rms * noise)).to(torch.bfloat16).to(torch.float64) - base

    half, other = 0.5 * tuned(0.006), 0.5 * tuned(0.05)

    def share(merged: torch.Tensor) -> float:  # how much of the small row the merge carries along it
        return float(((merged - base) * half).sum() / half.square().sum())

    assert abs(share(superpose_method(base, half, other))) < 0.05  # as if unscaled: under the floor, dropped
    assert share(superpose_method(base, half, other, noise_scale=0.5)) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="noise_scale"):
        superpose_method(base, half, noise_scale=-1.0)
    with pytest.raises(ValueError, match="noise_unit"):
        superpose_method(base, half, noise_unit=float("nan"))


def test_superpose_keeps_a_lone_row_under_the_floor(gen: torch.Generator) -> None:
    """The floor drops directions that would blow rounding noise up; the largest one never does, so one row
    with alpha 1 returns its model however small its delta (it merged to the base when under the floor)."""
    base = torch.randn((64, 64), generator=gen, dtype=torch.float64).to(torch.float16).to(torch.float64)
    model = (base * (1 + 1e-3 * torch.randn((64, 64), generator=gen, dtype=torch.float64))).to(torch.float16)
    delta = model.to(torch.float64) - base
    assert torch.allclose(superpose_method(base, delta), base + delta, rtol=0, atol=1e-12)
    copy = delta + 1e-7 * torch.randn((64, 64), generator=gen, dtype=torch.float64)  # its fp16 twin, say
    assert torch.allclose(superpose_method(base, delta, copy), base + (delta + copy) / 2, rtol=0, atol=1e-9)


def test_storage_unit_is_read_off_the_values(gen: torch.Generator) -> None:
    from ortho_mecha.gram import UNIT_ROUNDOFF
    from ortho_mecha.methods.orthogonal import storage_unit

    values = randn(gen, (5, 7))
    assert storage_unit(values.to(torch.bfloat16).to(torch.float32)) == UNIT_ROUNDOFF["BF16"]
    assert storage_unit(values.to(torch.float16).to(torch.float32)) == UNIT_ROUNDOFF["F16"]
    assert storage_unit(values.to(torch.float32)) == UNIT_ROUNDOFF["F32"]
    assert storage_unit(values) == UNIT_ROUNDOFF["F64"]
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):  # no floor, as the analysis and its prediction have it
        assert storage_unit(values.to(fp8).to(torch.float32)) == 0.0


def test_superpose_zero_deltas_and_alpha(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (10, 6)), randn(gen, (10, 6), 0.01), randn(gen, (10, 6), 0.01)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(superpose_method(base, zero, a, zero, b), superpose_method(base, a, b))
    assert superpose_method(base, zero, zero) is base
    assert superpose_method(base, a, b, alpha=0.0) is base
    full = superpose_method(base, a, b) - base
    torch.testing.assert_close(superpose_method(base, a, b, alpha=1.5) - base, 1.5 * full, rtol=0, atol=1e-12)


def test_superpose_rows_match_one_solve_per_row(gen: torch.Generator) -> None:
    deltas = [randn(gen, (5, 4, 3, 3), 0.01) for _ in range(3)]
    deltas[2][1] = deltas[0][1]  # one row with a duplicate, solved on its own
    batched = superpose(deltas, rows=5, rcond=1e-6)
    for row in range(5):
        expected = superpose([d[row] for d in deltas], rows=1, rcond=1e-6)
        torch.testing.assert_close(batched[row], expected, rtol=0, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=4),
    overlap=st.floats(min_value=-0.9, max_value=0.9),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    granularity=st.sampled_from(["key", "row"]),
)
def test_superpose_keeps_each_delta_magnitude(n: int, overlap: float, seed: int, granularity: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = randn(gen, (6, 12))
    shared = randn(gen, (6, 12), 0.01)
    deltas = [randn(gen, (6, 12), 0.01) + overlap * shared for _ in range(n)]
    merged = superpose_method(base, *deltas, granularity=granularity) - base
    dims = (1,) if granularity == "row" else (0, 1)
    for delta in deltas:
        torch.testing.assert_close(
            torch.sum(merged * delta, dim=dims), torch.sum(delta * delta, dim=dims), rtol=1e-9, atol=1e-15
        )


# --- scale_delta and options ---------------------------------------------------------------------------


def test_scale_delta(gen: torch.Generator) -> None:
    delta = randn(gen, (6, 10)).to(torch.float32)
    scaled = scale_delta.__wrapped__(delta, alpha=2.5)
    assert scaled.dtype == torch.float32
    torch.testing.assert_close(scaled, 2.5 * delta)
    assert not torch.any(scale_delta.__wrapped__(delta, 0.0))


def test_output_keeps_input_dtype(gen: torch.Generator) -> None:
    base, a = randn(gen, (6, 10)).to(torch.bfloat16), randn(gen, (6, 10), 0.1).to(torch.bfloat16)
    assert project(base, a).dtype == torch.bfloat16
    assert superpose_method(base, a, granularity="row").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda b, d: superpose_method(b, d, granularity="col"), "'key', 'row'"),
        (lambda b, d: superpose_method(b, d, rcond=0.0), "(0, 1)"),
        (lambda b, d: superpose_method(b, d, rcond=1.0), "(0, 1)"),
        (lambda b, d: superpose_method(b, d, alpha=-0.5), "[0, inf)"),
        (lambda b, d: project(b, d, alpha=-1.0), "[0, inf)"),
        (lambda b, d: scale_delta.__wrapped__(d, alpha=-1.0), "[0, inf)"),
        (lambda b, d: scale_delta.__wrapped__(d, alpha=float("inf")), "[0, inf)"),
        (lambda b, d: project(b, d, alpha=float("nan")), "[0, inf)"),
    ],
)
def test_invalid_options_raise_with_allowed_values(call: Callable[..., torch.Tensor], expected: str) -> None:
    base = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(OptionError, match=re.escape(expected)):
        call(base, torch.ones(3, dtype=torch.float64))
