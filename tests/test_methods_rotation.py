"""orthomerge on plain tensors: Procrustes with det −1, Cayley fallback, aggregation and option properties."""

import math
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_mecha.methods import OptionError, orthomerge, parallel
from ortho_mecha.methods import rotation as rotation_module
from ortho_mecha.methods.rotation import (
    EIGH_MIN_RATIO,
    cayley_generator,
    cayley_rotation,
    merged_rotation,
    nearest_rotation,
)

merge = orthomerge.__wrapped__

SHAPES = [(8, 4, 3, 3), (40, 2, 3, 3), (6, 10), (10, 6), (6,)]


def randn(generator: torch.Generator, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=generator, dtype=torch.float64)


def skew(generator: torch.Generator, k: int, scale: float) -> torch.Tensor:
    a = randn(generator, (k, k), scale)
    return a - a.T


def plane_rotation(k: int, angle: float, i: int = 0, j: int = 1) -> torch.Tensor:
    r = torch.eye(k, dtype=torch.float64)
    r[i, i] = r[j, j] = math.cos(angle)
    r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
    return r


def kabsch_reference(m: np.ndarray) -> np.ndarray:
    """Proper rotation nearest to m from numpy's SVD (independent of the code under test)."""
    u, _, vt = np.linalg.svd(m)
    d = np.ones(m.shape[0])
    d[-1] = np.sign(np.linalg.det(u @ vt))
    return (u * d) @ vt


def assert_rotation(r: torch.Tensor) -> None:
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    torch.testing.assert_close(r.T @ r, eye, rtol=0, atol=1e-10)
    assert float(torch.linalg.det(r)) == pytest.approx(1.0, abs=1e-9)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(99)


# --- building blocks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [10.0, 1e6])  # eigh path, then the SVD path
@pytest.mark.parametrize("reflect", [False, True])
def test_nearest_rotation_matches_kabsch(gen: torch.Generator, cond: float, reflect: bool) -> None:
    q1, _ = torch.linalg.qr(randn(gen, (7, 7)))
    q2, _ = torch.linalg.qr(randn(gen, (7, 7)))
    m = q1 @ torch.diag(torch.logspace(0, -math.log10(cond), 7, dtype=torch.float64)) @ q2.T
    if reflect != (float(torch.linalg.det(m)) < 0):
        m[0] = -m[0]
    assert (cond**-2 > EIGH_MIN_RATIO) == (cond == 10.0)
    r = nearest_rotation(m)
    assert_rotation(r)
    np.testing.assert_allclose(r.numpy(), kabsch_reference(m.numpy()), rtol=0, atol=1e-9)


def test_cayley_round_trip(gen: torch.Generator) -> None:
    a = skew(gen, 6, 0.4)
    r = cayley_rotation(a)
    assert_rotation(r)
    torch.testing.assert_close(cayley_generator(r), a, rtol=0, atol=1e-12)


def test_cayley_refuses_rotation_by_pi() -> None:
    assert cayley_generator(plane_rotation(5, math.pi)) is None
    assert cayley_generator(plane_rotation(5, math.pi - 1e-9)) is None
    assert cayley_generator(plane_rotation(5, 3.0)) is not None


@pytest.mark.parametrize("dtype, limit", [(torch.float64, 1e6), (torch.float32, 1e3)])
def test_cayley_limit_is_on_the_condition_of_r_plus_i(dtype: torch.dtype, limit: float) -> None:
    """DESIGN.md's rule: fall back where cond(R + I) > limit. One plane rotated by φ has cond(R + I) =
    1/cos(φ/2) but ‖A‖_F = √2 tan(φ/2), so the cheap Frobenius bound alone would refuse from cond ≈ limit/√2."""
    def turned(cond: float) -> torch.Tensor:
        return plane_rotation(5, 2 * math.acos(1 / cond)).to(dtype)

    assert cayley_generator(turned(0.85 * limit)) is not None
    assert cayley_generator(turned(1.2 * limit)) is None


# --- one delta reproduces its model ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_one_delta_reproduces_model(gen: torch.Generator, shape: tuple[int, ...]) -> None:
    base, delta = randn(gen, shape), randn(gen, shape, 0.05)
    torch.testing.assert_close(merge(base, delta), base + delta, rtol=0, atol=1e-10)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("angle", [0.3, 2.5, 3.1], ids=["small", "large", "near pi"])
def test_one_rotated_target_reproduces_model(gen: torch.Generator, angle: float, transpose: bool) -> None:
    base = randn(gen, (5, 9))
    target = plane_rotation(5, angle, 1, 3) @ plane_rotation(5, angle / 2, 0, 2) @ base + randn(gen, (5, 9), 0.01)
    if transpose:
        base, target = base.T.contiguous(), target.T.contiguous()
    torch.testing.assert_close(merge(base, target - base), target, rtol=0, atol=1e-9)


def test_rotation_by_pi_falls_back_to_residual(gen: torch.Generator) -> None:
    base = randn(gen, (5, 9))
    target = plane_rotation(5, math.pi, 1, 3) @ base
    assert cayley_generator(nearest_rotation(target @ base.T)) is None
    torch.testing.assert_close(merge(base, target - base), target, rtol=0, atol=1e-9)
    # as a row of a merge it brings no rotation (θ = 0) and its whole delta into the residual mean
    small = randn(gen, (5, 9), 0.05)
    rotation, residual = merged_rotation(base, [target - base, small], theta_agg="max")
    alone, small_residual = merged_rotation(base, [small])
    torch.testing.assert_close(rotation, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(residual, (target - base + small_residual) / 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 50), (4, 40), (50, 2)])
def test_a_key_turned_to_minus_itself_reproduces_its_model(gen: torch.Generator, shape: tuple[int, int]) -> None:
    """R = −I (every plane turned by π, a proper rotation for an even side): R + I is rounding noise in every
    direction, whose plain condition number can be small; its generator was taken from that noise (a QA finding:
    61 of 200 random 2 × 50 keys came out neither the model nor the base)."""
    for _ in range(20):
        base = randn(gen, shape)
        torch.testing.assert_close(merge(base, -2.0 * base), -base, rtol=0, atol=1e-9)
    square = 3.0 * torch.linalg.qr(randn(gen, (6, 6)))[0]
    torch.testing.assert_close(merge(square, -2.0 * square), -square, rtol=0, atol=1e-9)


def test_reflected_target_reproduces_model(gen: torch.Generator) -> None:
    base = randn(gen, (5, 9))
    reflection = torch.diag(torch.tensor([-1.0, 1, 1, 1, 1], dtype=torch.float64))
    target = reflection @ base
    # the best orthogonal map is the reflection (det −1); the proper rotation nearest to it is used instead
    assert_rotation(nearest_rotation(target @ base.T))
    torch.testing.assert_close(merge(base, target - base), target, rtol=0, atol=1e-9)



@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-3])
@pytest.mark.parametrize("svd", [False, True])
def test_the_cayley_step_refuses_a_reflection(gen: torch.Generator, noise: float, svd: bool) -> None:
    """The float64 rows try the Cayley step before the determinant: it must refuse a reflection (det −1), whose
    solve blows up symmetrically and would pass if only the skew part were looked at."""
    base = randn(gen, (6, 11))
    normal = torch.ones(6, dtype=torch.float64) / 6**0.5
    reflection = torch.eye(6, dtype=torch.float64) - 2.0 * torch.outer(normal, normal)
    target = reflection @ base + randn(gen, (6, 11), noise)
    polar, _, _ = rotation_module._polar_factor(target @ base.T, svd)
    assert float(torch.linalg.det(polar)) == pytest.approx(-1.0)
    assert cayley_generator(polar) is None
    torch.testing.assert_close(merge(base, target - base), target, rtol=0, atol=1e-9)

# --- aggregation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta_agg", ["mean", "median", "max"])
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_deltas_equal_one(gen: torch.Generator, shape: tuple[int, ...], theta_agg: str) -> None:
    base, delta = randn(gen, shape), randn(gen, shape, 0.05)
    once = merge(base, delta, theta_agg=theta_agg)
    torch.testing.assert_close(merge(base, delta, delta, delta, theta_agg=theta_agg), once, rtol=0, atol=1e-10)


def test_sum_grows_with_copies(gen: torch.Generator) -> None:
    base, delta = randn(gen, (5, 9)), randn(gen, (5, 9), 0.05)
    one, _ = merged_rotation(base, [delta], theta_agg="sum")
    three, _ = merged_rotation(base, [delta] * 3, theta_agg="sum")
    torch.testing.assert_close(cayley_generator(three), 3 * cayley_generator(one), rtol=0, atol=1e-10)
    assert not torch.allclose(merge(base, delta, delta, delta, theta_agg="sum"), base + delta)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (6,)])
@pytest.mark.parametrize("options", [
    {"theta_agg": "median"}, {"theta_agg": "sum"}, {"theta_agg": "max", "direction_weight": "equal"},
    {"conflict_aware": True, "direction_weight": "magnitude"}, {"precision": "float32"},
])
def test_a_repeated_row_is_worked_out_once_with_the_result_of_listing_it(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], options: dict
) -> None:
    """A row of repeat r reaches orthomerge as one tensor listed r times: its rotation is computed once, and the
    result is that of r separate equal copies."""
    base = randn(gen, shape)
    a, b, c = (randn(gen, shape, 0.05) for _ in range(3))
    copies = merge(base, a, a.clone(), b, c, c.clone(), c.clone(), **options)
    calls = []
    original = rotation_module._polar_factor
    monkeypatch.setattr(rotation_module, "_polar_factor", lambda m, svd: calls.append(m) or original(m, svd))
    listed = merge(base, a, a, b, c, c, c, **options)
    tolerance = 1e-6 if options.get("precision") == "float32" else 1e-12  # float32 sums in another order
    torch.testing.assert_close(listed, copies, rtol=0, atol=tolerance)
    assert len(calls) == (3 if len(shape) > 1 else 0)
    assert not torch.allclose(listed, merge(base, a, b, c, **options))  # the counts matter


def _rotated_targets(gen: torch.Generator, generators: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and deltas whose targets are exact rotations of it, so every A_i is known."""
    base = randn(gen, (generators[0].shape[0], 7))
    return base, [cayley_rotation(a) @ base - base for a in generators]


@pytest.mark.parametrize("direction_weight", ["theta", "magnitude", "equal"])
@pytest.mark.parametrize("theta_agg", ["mean", "median", "max", "sum"])
@pytest.mark.parametrize("conflict_aware", [False, True])
def test_step3_direction_and_angle(
    gen: torch.Generator, direction_weight: str, theta_agg: str, conflict_aware: bool
) -> None:
    generators = [skew(gen, 4, s) for s in (0.05, 0.1, 0.2)]
    base, deltas = _rotated_targets(gen, generators)
    a = np.stack([g.numpy() for g in generators])
    thetas = np.linalg.norm(a, axis=(1, 2))
    weights = {
        "theta": thetas,
        "magnitude": np.array([np.linalg.norm(d.numpy()) for d in deltas]),
        "equal": np.ones(3),
    }[direction_weight]
    direction = np.einsum("i,ijk->jk", weights, a)
    if conflict_aware:
        direction = np.einsum("i,ijk->jk", weights, a * (np.sign(a) == np.sign(direction)))
    angle = {"mean": np.mean, "median": np.median, "max": np.max, "sum": np.sum}[theta_agg](thetas)
    expected = angle * direction / np.linalg.norm(direction)

    rotation, residual = merged_rotation(base, deltas, theta_agg, conflict_aware, direction_weight)
    assert_rotation(rotation)
    np.testing.assert_allclose(cayley_generator(rotation).numpy(), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-10)


def test_conflict_aware_masks_disagreeing_entries(gen: torch.Generator) -> None:
    a1 = torch.zeros(3, 3, dtype=torch.float64)
    a1[0, 1], a1[0, 2] = 0.2, 0.1
    a2 = torch.zeros(3, 3, dtype=torch.float64)
    a2[0, 1], a2[0, 2] = 0.2, -0.3
    a1, a2 = a1 - a1.T, a2 - a2.T
    base, deltas = _rotated_targets(gen, [a1, a2])
    rotation, _ = merged_rotation(base, deltas, "mean", True, "equal")
    # equal weights: sum has (0.4, -0.2); a1's +0.1 at (0, 2) disagrees and is dropped
    masked = torch.zeros(3, 3, dtype=torch.float64)
    masked[0, 1], masked[0, 2] = 0.4, -0.3
    masked = masked - masked.T
    theta = (torch.linalg.matrix_norm(a1) + torch.linalg.matrix_norm(a2)) / 2
    torch.testing.assert_close(cayley_generator(rotation), theta * masked / torch.linalg.matrix_norm(masked))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=4),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    scale=st.floats(min_value=1e-3, max_value=1.0),
    conflict_aware=st.booleans(),
)
def test_merged_rotation_is_proper(n: int, seed: int, scale: float, conflict_aware: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = randn(gen, (6, 11))
    deltas = [randn(gen, (6, 11), scale) for _ in range(n)]
    rotation, _ = merged_rotation(base, deltas, "max", conflict_aware, "magnitude")
    assert_rotation(rotation)


# --- keys, alpha, zero deltas, dtypes, options ------------------------------------------------------------


def test_vector_keys_take_the_mean(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (6,)), randn(gen, (6,), 0.1), randn(gen, (6,), 0.1)
    torch.testing.assert_close(merge(base, a, b, alpha=0.5), base + 0.5 * (a + b) / 2)


def test_zero_deltas_are_dropped(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (6, 10)), randn(gen, (6, 10), 0.05), randn(gen, (6, 10), 0.05)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(merge(base, zero, a, b, zero), merge(base, a, b), rtol=0, atol=0)
    assert merge(base, zero, zero) is base
    vector, small = randn(gen, (10,)), randn(gen, (10,), 0.05)
    torch.testing.assert_close(merge(vector, torch.zeros_like(small), small), vector + small)


def test_alpha_endpoints_and_linearity(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (8, 4, 3, 3)), randn(gen, (8, 4, 3, 3), 0.05), randn(gen, (8, 4, 3, 3), 0.05)
    assert merge(base, a, b, alpha=0.0) is base
    torch.testing.assert_close(merge(base, a, alpha=0.4), base + 0.4 * a, rtol=0, atol=1e-10)
    two = merge(base, a, b) - base
    torch.testing.assert_close(merge(base, a, b, alpha=2.0) - base, 2.0 * two, rtol=0, atol=1e-10)


def test_two_different_rows_rotate(gen: torch.Generator) -> None:
    base, a, b = randn(gen, (6, 10)), randn(gen, (6, 10), 0.05), randn(gen, (6, 10), 0.05)
    rotation, residual = merged_rotation(base, [a, b])
    torch.testing.assert_close(merge(base, a, b), rotation @ base + residual, rtol=0, atol=1e-12)
    assert not torch.allclose(merge(base, a, b), base + (a + b) / 2)


def test_output_keeps_input_dtype(gen: torch.Generator) -> None:
    base, a = randn(gen, (6, 10)).float(), randn(gen, (6, 10), 0.05).float()
    out = merge(base, a)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, base + a)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"theta_agg": "avg"}, "'mean', 'median', 'max', 'sum'"),
        ({"theta_agg": "maen"}, "did you mean 'mean'"),
        ({"direction_weight": "norm"}, "'theta', 'magnitude', 'equal'"),
        ({"alpha": -0.1}, "[0, inf)"),
    ],
)
def test_invalid_options_raise_with_allowed_values(options: dict, expected: str) -> None:
    base = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(OptionError, match=re.escape(expected)):
        merge(base, base, **options)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (16, 8, 3, 3)])
def test_float32_precision_stays_near_the_method_on_well_conditioned_keys(gen: torch.Generator,
                                                                          shape: tuple[int, ...]) -> None:
    """precision="float32" (the explicit approximation): on well-conditioned keys, fp32 inputs, the merged
    delta is within 1e-4 (rms) of the float64 method's; the option's help states ~2e-5 measured on SDXL sizes."""
    base = randn(gen, shape, 0.02).float()
    deltas = [randn(gen, shape, 0.002).float() for _ in range(3)]
    exact = merge(base, *deltas)
    fast = merge(base, *deltas, precision="float32")
    error = torch.linalg.vector_norm(fast - exact) / torch.linalg.vector_norm(exact - base)
    assert 0 < error < 1e-4
    assert fast.dtype == base.dtype


@pytest.mark.parametrize("gap", [1e-8, 1e-5, 1e-4])
def test_float32_precision_reproduces_a_model_rotated_near_pi(gen: torch.Generator, gap: float) -> None:
    """One delta with alpha 1 reproduces its model under float32 too: its coarser rotation is not trusted as far
    toward π, where the whole delta goes into the residual (it was off by 28 % of the delta at π − 1e-8)."""
    base = randn(gen, (12, 40)).float()
    target = (plane_rotation(12, math.pi - gap, 1, 3) @ base.double()).float()
    out = merge(base, target - base, precision="float32")
    error = torch.linalg.vector_norm(out - target) / torch.linalg.vector_norm(target - base)
    assert error < 1e-5


def test_precision_option_is_checked() -> None:
    base = torch.ones(4, 4)
    with pytest.raises(OptionError, match="precision"):
        merge(base, base, precision="float16")


def test_nearest_rotation_takes_the_svd_when_eigh_fails(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    m = randn(gen, (6, 6))
    expected = nearest_rotation(m, svd=True)

    def fails(_: torch.Tensor) -> None:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    torch.testing.assert_close(nearest_rotation(m), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(40, 700), (700, 40), (24, 20, 3, 3), (32, 32, 3, 3)])
def test_the_result_does_not_depend_on_how_steps_are_spread(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]
) -> None:
    """Rows, their products and the output's column blocks may run at once on several threads; every step
    computes what it would alone, so the bytes are the same for 1, 2 or 3 workers, with torch at one thread as
    in a merge on several threads (the only case where steps are spread) and on new threads."""
    base = randn(gen, shape).double()  # float64 out: a last-bit difference inside is not rounded away
    deltas = [randn(gen, shape, 0.05).double() for _ in range(5)]
    results = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(parallel, "_pool", None)
    try:
        for count in (1, 2, 3):
            monkeypatch.setattr(parallel, "workers", lambda count=count: count)
            results.append(merge(base, *deltas, deltas[1], theta_agg="median"))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    assert not torch.equal(results[0], base)


def test_a_thread_runs_torch_at_the_count_it_is_set_to() -> None:
    """torch.set_num_threads holds for the calling thread's MKL only, and a product's bits hang on its thread count:
    sd-mecha's merge threads and the pool's ran MKL at its own count (all cores, fewer when the machine was busy),
    so the same plan merged twice under load differed by 1 ulp on a conv key. A merge method matches its thread on
    entry, and the pool each step."""
    matrices = torch.randn(2, 32, 288, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = matrices[0] @ matrices[1].T
        with ThreadPoolExecutor(1) as pool:
            there = pool.submit(lambda: (parallel.match_threads(), matrices[0] @ matrices[1].T)[1]).result()
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(here, there)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_spread_groups_cover_the_items_in_order(monkeypatch: pytest.MonkeyPatch, count: int, length: int) -> None:
    monkeypatch.setattr(parallel, "workers", lambda: count)
    groups = parallel.spread_groups(list, range(length))
    assert [item for group in groups for item in group] == list(range(length))
    assert len(groups) == min(count, length) and all(groups)
