"""The blocked float64 work behind the merge methods: same results whatever the block size, inputs never
modified, the Gram route of ortho_project against vector Gram–Schmidt, and the small helpers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_mecha.methods import deltas as deltas_module
from ortho_mecha.methods import ortho_project, ortho_superpose, orthomerge, rotation, scale_delta
from ortho_mecha.methods.deltas import combine, gram64, nonzero_indices, row_blocks
from ortho_mecha.methods.orthogonal import gram_schmidt_sum, project_coefficients
from ortho_mecha.methods.rotation import merged_rotation

CALLS = {
    "ortho_project": lambda base, *d: ortho_project.__wrapped__(base, *d),
    "ortho_superpose": lambda base, *d: ortho_superpose.__wrapped__(base, *d),
    "ortho_superpose rows": lambda base, *d: ortho_superpose.__wrapped__(base, *d, granularity="row", alpha=0.7),
    "orthomerge": lambda base, *d: orthomerge.__wrapped__(base, *d),
    "orthomerge options": lambda base, *d: orthomerge.__wrapped__(
        base, *d, alpha=1.3, conflict_aware=True, direction_weight="magnitude", theta_agg="median"
    ),
}
SHAPES = [(6, 700), (700, 6), (9, 4, 3, 3), (300,)]


def family(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    shared = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)
    deltas = [0.02 * torch.randn(shape, generator=gen, dtype=torch.float64) + shared for _ in range(3)]
    return [t.to(dtype) for t in (base, *deltas, torch.zeros(shape, dtype=torch.float64))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CALLS)
def test_results_do_not_depend_on_the_block_size(
    monkeypatch: pytest.MonkeyPatch, name: str, shape: tuple[int, ...]
) -> None:
    base, *deltas = family(3, shape)
    whole = CALLS[name](base, *deltas)
    monkeypatch.setattr(deltas_module, "BLOCK_ELEMENTS", 7)  # many blocks, split rows included
    monkeypatch.setattr(rotation, "BLOCK_ELEMENTS", 7)  # orthomerge: blocks of 256 columns
    torch.testing.assert_close(CALLS[name](base, *deltas), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CALLS)
def test_methods_leave_their_inputs_unchanged(name: str, dtype: torch.dtype) -> None:
    for shape in SHAPES:
        inputs = family(4, shape, dtype)
        copies = [t.clone() for t in inputs]
        CALLS[name](*inputs)
        assert all(torch.equal(t, c) for t, c in zip(inputs, copies, strict=True)), (name, shape)


def test_scale_delta_returns_the_delta_itself_at_one_and_rounds_once_otherwise() -> None:
    delta = torch.tensor([0.1, -3.0, 7.25], dtype=torch.float32)
    assert scale_delta.__wrapped__(delta, 1.0) is delta
    scaled = scale_delta.__wrapped__(delta, 0.37)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, (delta.double() * 0.37).float())
    assert torch.equal(delta, torch.tensor([0.1, -3.0, 7.25], dtype=torch.float32))


def test_project_coefficients_hand_computed() -> None:
    a, b = [1.0, 0.0], [1.0, 1.0]
    # a then b: a + (b − a) = b, so c = (0, 1); b then a: b + (a − b/2) = 0.5 b + a
    for rows, expected in (([a, b], [0.0, 1.0]), ([b, a], [0.5, 1.0])):
        x = torch.tensor(rows, dtype=torch.float64)
        torch.testing.assert_close(project_coefficients(x @ x.T), torch.tensor(expected, dtype=torch.float64))


def test_project_coefficients_refuse_what_the_gram_cannot_resolve() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-4, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert project_coefficients(x @ x.T) is None  # residual 1e-4 of its norm: squared 1e-8 < 1e-6
    x[1, 1] = 1e-2
    assert project_coefficients(x @ x.T) is not None
    assert project_coefficients(torch.zeros(2, 2, dtype=torch.float64)) is None


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    closeness=st.sampled_from([0.0, 0.9, 1 - 1e-3, 1 - 1e-7, 1.0]),
)
def test_project_matches_vector_gram_schmidt(seed: int, closeness: float) -> None:
    # closeness 1 − 1e-7 and 1 (a near copy, a copy) take the vector route, the others the Gram route,
    # whose error grows as a delta nears the span of the earlier ones: 1e-10 of ‖Δ‖ bounds it here
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((4, 500), generator=gen, dtype=torch.float64) * 0.01
    x[2] = closeness * x[0] + (1 - closeness) * x[2]
    base = torch.randn(500, generator=gen, dtype=torch.float64)
    total = gram_schmidt_sum(x)
    error = torch.linalg.vector_norm(ortho_project.__wrapped__(base, *x) - (base + total))
    assert error <= 1e-10 * torch.linalg.vector_norm(total)


def test_nonzero_indices_check_a_zero_squared_norm_on_the_tensor() -> None:
    tiny = torch.full((3,), 1e-170, dtype=torch.float64)  # its square underflows to 0
    deltas = [torch.zeros(3, dtype=torch.float64), tiny, torch.ones(3, dtype=torch.float64)]
    squared = gram64(deltas, 1)[0].diagonal()
    assert squared[1] == 0
    assert nonzero_indices(deltas, squared) == [1, 2]


def test_row_blocks_cover_the_matrix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deltas_module, "BLOCK_ELEMENTS", 10)
    for rows, cols in ((7, 3), (3, 25), (1, 10), (4, 9)):
        seen = torch.zeros(rows, cols, dtype=torch.int64)
        for row_slice, col_slice in row_blocks(rows, cols):
            seen[row_slice, col_slice] += 1
        assert torch.equal(seen, torch.ones_like(seen)), (rows, cols)


def test_combine_hand_computed() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    base = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    per_key = torch.tensor([[2.0, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(combine(per_key, [a, b], base, alpha=0.5), base + 0.5 * (2 * a + 0.1 * b))
    per_row = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = combine(per_row, [a, b])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [30.0, 40.0]], dtype=torch.float64))


def test_orthomerge_is_base_plus_the_merged_rotation_and_mean_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rotation, "BLOCK_ELEMENTS", 7)
    for shape in ((5, 600), (600, 5)):
        base, *deltas = family(8, shape)[:-1]
        transposed = shape[0] > shape[1]
        w, d = (base.T, [x.T for x in deltas]) if transposed else (base, deltas)
        r, residual = merged_rotation(w, d)
        expected = r @ w + residual
        merged = orthomerge.__wrapped__(base, *deltas)
        torch.testing.assert_close(merged.T if transposed else merged, expected, rtol=0, atol=1e-12)
