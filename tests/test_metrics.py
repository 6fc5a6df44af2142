"""Quality, survival (plain and predicted) and interference from the delta Gram, against hand-computed values and
against merged vectors formed explicitly (numpy, and the registered methods' own tensor code)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_mecha import metrics


def gram(vectors: np.ndarray) -> np.ndarray:
    return vectors @ vectors.T


def measured_survival(merged: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """<Δ_out, δ_i> / ‖δ_i‖², formed from the vectors themselves."""
    return deltas @ merged / np.einsum("ij,ij->i", deltas, deltas)


def superpose_numpy(deltas: np.ndarray, rcond: float = 1e-6) -> np.ndarray:
    """DESIGN §5 written independently: min-norm least squares of G c = diag(G) by an SVD pseudo-inverse."""
    g = gram(deltas)
    c = np.linalg.pinv(g, rcond=rcond, hermitian=True) @ np.diag(g)
    return deltas.T @ c


def project_numpy(deltas: np.ndarray) -> np.ndarray:
    """δ_1 + Σ_{i>1} (δ_i − proj_{span(δ_1..δ_{i−1})} δ_i), by least squares against the earlier rows."""
    total = deltas[0].copy()
    for i in range(1, len(deltas)):
        earlier = deltas[:i].T
        coef, *_ = np.linalg.lstsq(earlier, deltas[i], rcond=None)
        total += deltas[i] - earlier @ coef
    return total


# -- quality ---------------------------------------------------------------------------------------


def test_quality_hand_computed() -> None:
    # focus 0.8, SNR 100 → 1, survival 50 % → bonus 0.1, outlier 10 → penalty 0.1: 0.32 + 0.4 + 0.1 − 0.1
    # focus 0.5, SNR 10 → 0.5, survival 30 % → 0, outlier 3 → 0: 0.2 + 0.2
    # focus 0.0, SNR 1e4 → 1 (clamped), survival 90 % → 0.2 (capped), outlier 50 → 0.15 (capped): 0.4 + 0.2 − 0.15
    scores, grades = metrics.quality(
        [0.2, 0.5, 1.0], [100.0, 10.0, 1e4], [0.5, 0.3, 0.9], [10.0, 3.0, 50.0], [False] * 3
    )
    np.testing.assert_allclose(scores, [0.72, 0.40, 0.45], atol=1e-12)
    assert grades == ["A", "C", "C"]


def test_quality_clamps_to_unit_interval() -> None:
    scores, grades = metrics.quality([0.0, 1.0], [1e4, 0.5], [1.0, -1.0], [0.0, 100.0], [False, False])
    np.testing.assert_allclose(scores, [1.0, 0.0])
    assert grades == ["A+", "D"]


def test_null_delta_scores_zero_and_grade_d() -> None:
    scores, grades = metrics.quality([0.0], [1e4], [1.0], [0.0], [True])
    assert scores[0] == 0.0 and grades == ["D"]


@pytest.mark.parametrize(
    ("score", "expected"),
    [(0.81, "A+"), (0.80, "A"), (0.65, "A"), (0.6499, "B"), (0.50, "B"), (0.35, "C"), (0.3499, "D"), (0.0, "D")],
)
def test_grade_thresholds(score: float, expected: str) -> None:
    assert metrics.grade(score) == expected


# -- plain survival --------------------------------------------------------------------------------


def test_survival_plain_orthogonal_pair_and_zero_row() -> None:
    g = np.diag([4.0, 9.0, 0.0])
    np.testing.assert_allclose(metrics.survival_plain(g), [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])


def test_survival_plain_leaves_out_excluded_rows_from_the_sum() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    direction = (u[0] + u[1]) / np.linalg.norm(u[0] + u[1])
    np.testing.assert_allclose(metrics.survival_plain(gram(x), include=[True, True, False]), u @ direction)


# -- predicted survival ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_predicted_survival_of_linear_methods_matches_the_merged_vector(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 64)) + 0.5 * rng.standard_normal(64)  # overlapping deltas
    w = rng.uniform(0.2, 2.0, 4)
    g = gram(x)
    added = 0.7 * (w @ x)
    np.testing.assert_allclose(
        metrics.predicted_survival(g, "add_difference", w, {"alpha": 0.7}), measured_survival(added, x), atol=1e-9
    )
    averaged = (w @ x) / w.sum()
    np.testing.assert_allclose(
        metrics.predicted_survival(g, "weighted_sum", w), measured_survival(averaged, x), atol=1e-9
    )


@pytest.mark.parametrize("seed", range(4))
def test_predicted_survival_of_orthogonal_methods_matches_the_merged_vector(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 64)) + 0.8 * rng.standard_normal(64)
    w = rng.uniform(0.2, 2.0, 4)
    w[2] = 0.0  # a disabled row contributes nothing but still has a survival
    g = gram(x)
    weighted = w[:, None] * x
    superposed = 1.3 * superpose_numpy(weighted[w > 0])
    predicted = metrics.predicted_survival(g, "ortho_superpose", w, {"alpha": 1.3})
    np.testing.assert_allclose(predicted, measured_survival(superposed, x), atol=1e-6)
    np.testing.assert_allclose(predicted[w > 0], 1.3 * w[w > 0], atol=1e-6)  # each keeps its own magnitude
    projected = project_numpy(weighted[w > 0])
    np.testing.assert_allclose(
        metrics.predicted_survival(g, "ortho_project", w), measured_survival(projected, x), atol=1e-6
    )


def test_predicted_survival_agrees_with_the_registered_methods() -> None:
    torch = pytest.importorskip("torch")
    from ortho_mecha.methods.orthogonal import gram_schmidt_sum, superpose

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 40)) + rng.standard_normal(40)
    x[2] = x[0] + x[1]  # dependent: rcond drops an eigenvalue, Gram–Schmidt a direction
    w = np.array([1.0, 2.0, 1.0])
    deltas = [torch.from_numpy(wi * xi) for wi, xi in zip(w, x, strict=True)]
    merged = superpose(deltas, 1, 1e-6).numpy()
    np.testing.assert_allclose(
        metrics.predicted_survival(gram(x), "ortho_superpose", w), measured_survival(merged, x), atol=1e-6
    )
    merged = gram_schmidt_sum(torch.stack(deltas)).numpy()
    np.testing.assert_allclose(
        metrics.predicted_survival(gram(x), "ortho_project", w), measured_survival(merged, x), atol=1e-6
    )


def test_predicted_survival_per_key_grams_merges_each_key_on_its_own() -> None:
    rng = np.random.default_rng(3)
    keys = [rng.standard_normal((3, 20)) + rng.standard_normal(20), rng.standard_normal((3, 30))]
    w = np.array([1.0, 0.5, 1.5])
    stack = np.stack([gram(k) for k in keys])
    merged = [superpose_numpy(w[:, None] * k) for k in keys]
    along = sum(k @ m for k, m in zip(keys, merged, strict=True))
    own = sum(np.einsum("ij,ij->i", k, k) for k in keys)
    np.testing.assert_allclose(metrics.predicted_survival(stack, "ortho_superpose", w), along / own, atol=1e-6)


def test_superpose_counts_identical_deltas_once_and_cancels_opposite_ones() -> None:
    a = np.array([[3.0, 4.0, 0.0]])
    identical = gram(np.vstack([a, a]))
    np.testing.assert_allclose(metrics.predicted_survival(identical, "ortho_superpose", [1.0, 1.0]), [1.0, 1.0])
    opposite = gram(np.vstack([a, -a]))
    np.testing.assert_allclose(metrics.predicted_survival(opposite, "ortho_superpose", [1.0, 1.0]), [0.0, 0.0])


@settings(max_examples=40, deadline=None)
@given(
    norms=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=6),  # condition number of G ≤ 1e4 < 1/rcond
    seed=st.integers(0, 2**16),
)
def test_orthogonal_rows_survive_in_full_under_ortho_superpose(norms: list[float], seed: int) -> None:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((12, len(norms))))
    x = q.T * np.array(norms)[:, None]
    survival = metrics.predicted_survival(gram(x), "ortho_superpose", np.ones(len(norms)))
    np.testing.assert_allclose(survival, 1.0, atol=1e-9)


def test_orthomerge_estimate_is_labelled_and_exact_for_one_or_identical_rows() -> None:
    assert metrics.survival_label("orthomerge") == "estimate"
    assert metrics.survival_label("ortho_superpose") == "exact"
    a = np.array([[1.0, 2.0, 2.0]])
    np.testing.assert_allclose(metrics.predicted_survival(gram(a), "orthomerge", [1.0]), [1.0])
    three = gram(np.vstack([a, a, a]))
    for agg in ("mean", "median", "max"):
        np.testing.assert_allclose(
            metrics.predicted_survival(three, "orthomerge", [1.0] * 3, {"theta_agg": agg}), [1.0] * 3
        )
    np.testing.assert_allclose(
        metrics.predicted_survival(three, "orthomerge", [1.0] * 3, {"theta_agg": "sum"}), [3.0] * 3
    )


def test_superpose_at_granularity_row_is_estimated_by_the_per_key_formula() -> None:
    x = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    row = {"granularity": "row"}
    assert metrics.survival_label("ortho_superpose", row) == "estimate"
    assert metrics.survival_label("ortho_superpose", {"granularity": "key"}) == "exact"
    np.testing.assert_allclose(metrics.predicted_survival(gram(x), "ortho_superpose", [1.0, 1.0], row),
                               metrics.predicted_survival(gram(x), "ortho_superpose", [1.0, 1.0]))


def test_rotation_share_is_the_tangent_spaces_share_of_a_key() -> None:
    assert metrics.rotation_share((64,)) == 0.0  # a bias: a plain mean
    assert metrics.rotation_share((8, 8)) == 7 / 16  # square: about half
    assert metrics.rotation_share((4, 8, 3, 3)) == 3 / 144  # conv: 4 × 72
    assert metrics.rotation_share((40, 10)) == 9 / 80  # the smaller side rotates


def test_orthomerge_estimate_mixes_rotation_and_mean_by_the_rotation_share() -> None:
    g = np.eye(3)  # three orthogonal unit deltas
    rotation = metrics.predicted_survival(g, "orthomerge", [1.0] * 3)
    mean = metrics.predicted_survival(g, "orthomerge", [1.0] * 3, rotation_shares=0.0)
    np.testing.assert_allclose(rotation, [1 / np.sqrt(3)] * 3)
    np.testing.assert_allclose(mean, [1 / 3] * 3)
    mixed = metrics.predicted_survival(g, "orthomerge", [1.0] * 3, rotation_shares=0.25)
    np.testing.assert_allclose(mixed, 0.25 * rotation + 0.75 * mean)
    one = metrics.predicted_survival(np.eye(1), "orthomerge", [1.0], rotation_shares=0.1)
    np.testing.assert_allclose(one, [1.0])  # one row is returned in full whatever the share


def test_listed_methods_take_repeats_as_copies() -> None:
    x = np.eye(2) * np.array([[2.0], [1.0]])
    # row 0 listed twice outweighs row 1 (2 ≥ 1): the geometric median is row 0's point (the mean was (2δ_0 + δ_1)/3)
    survival = metrics.predicted_survival(gram(x), "geometric_median", [1.0, 1.0], repeats=[2, 1])
    np.testing.assert_allclose(survival, [1.0, 0.0], atol=1e-5)


def test_geometric_median_is_sd_mechas_median_on_each_keys_gram() -> None:
    """Key by key, the prediction is what the merge computes (Weiszfeld on a key's Gram = Weiszfeld on its tensors),
    with repeats as copies and a row at alpha 0 or with a zero delta on a key left out of that key, as the merge
    leaves it out. The keys differ (row 1 is large on the second), so one median of their summed Gram would not do."""
    from ortho_mecha.methods.stock import geometric_median_rows

    rng = np.random.default_rng(7)
    keys = rng.normal(size=(2, 4, 300))
    keys[1, 1] *= 20.0
    keys[0, 3] = 0.0
    alphas, repeats = np.array([1.0, 0.7, 0.0, 1.3]), np.array([1, 3, 1, 2])
    coefficients = metrics.merged_coefficients(np.stack([gram(key) for key in keys]), "geometric_median", alphas,
                                               repeats=repeats)
    for deltas, found in zip(keys, coefficients, strict=True):
        listed = [torch.from_numpy(alpha * delta) for alpha, delta, r in zip(alphas, deltas, repeats, strict=True)
                  for _ in range(r)]
        merged = geometric_median_rows.__wrapped__(*listed).numpy()
        np.testing.assert_allclose(found @ deltas, merged, rtol=0, atol=1e-6 * np.abs(merged).max())
    assert coefficients[0, 2] == 0 and coefficients[0, 3] == 0 and coefficients[1, 2] == 0 and coefficients[1, 3]
    assert metrics.survival_label("geometric_median") == "exact"


def test_ties_and_dare_estimates_follow_their_entrywise_steps() -> None:
    """Closed forms for Gaussian entries (the estimate's model): TIES of two independent rows keeps an entry only
    where the two signs agree (a tie elects sign 0), there their mean: survival 1/4 + 1/(2π) each. A listed copy
    of a row is that row again (TIES of identical rows is the row); DARE drops each copy on its own, so n copies
    keep an entry with probability 1 − pⁿ, rescaled by 1/(1 − p)."""
    ties = metrics.predicted_survival(np.eye(2), "ties", [1.0, 1.0])
    np.testing.assert_allclose(ties, [0.25 + 1 / (2 * math.pi)] * 2, rtol=0.03)
    np.testing.assert_allclose(metrics.predicted_survival(np.eye(2), "ties", [1.0, 1.0], repeats=[3, 0]),
                               [1.0, 0.0], atol=1e-9)
    dare = metrics.predicted_survival(np.eye(2), "dare", [1.0, 1.0], {"probability": 0.5}, repeats=[3, 0])
    np.testing.assert_allclose(dare, [(1 - 0.5**3) / 0.5, 0.0], rtol=0.03, atol=1e-9)
    unscaled = metrics.predicted_survival(np.eye(2), "dare", [1.0, 1.0], {"probability": 0.5, "rescale": False},
                                          repeats=[3, 0])
    np.testing.assert_allclose(unscaled, dare / 2, rtol=1e-9)
    halved = metrics.predicted_survival(np.eye(2), "ties", [2.0, 2.0], {"alpha": 0.5})
    np.testing.assert_allclose(halved, ties, rtol=1e-9)  # both scale with their input
    # k = 1/2 keeps |x| ≥ m, m the median of |x|: an entry the other row lost is kept whole (its sign alone elects),
    # one both kept is their mean where the signs agree: E[x²; |x| ≥ m]/2 + (E[x²; |x| ≥ m]/4 + E[|x|; |x| ≥ m]²/2)/2
    normal = statistics.NormalDist()
    m = normal.inv_cdf(0.75)
    second, first = 2 * (m * normal.pdf(m) + 0.25), 2 * normal.pdf(m)
    trimmed = metrics.predicted_survival(np.eye(2), "ties", [1.0, 1.0], {"k": 0.5})
    np.testing.assert_allclose(trimmed, [second / 2 + (second / 4 + first**2 / 2) / 2] * 2, rtol=0.03)


def test_unknown_method_and_option_are_errors() -> None:
    g = np.eye(2)
    with pytest.raises(ValueError, match="known"):
        metrics.predicted_survival(g, "slerp", [1.0, 1.0])
    with pytest.raises(ValueError, match="theta_agg"):
        metrics.predicted_survival(g, "orthomerge", [1.0, 1.0], {"theta_agg": "mode"})


# -- interference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_interference_sums_to_the_excess_energy_of_a_plain_sum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 30)) + rng.standard_normal(30)
    w = rng.uniform(0.1, 2.0, 4)
    inter = metrics.interference(gram(x), w)
    own = np.sum((w[:, None] * x) ** 2)
    assert np.all(np.diag(inter) == 0)
    np.testing.assert_allclose(np.linalg.norm(w @ x) ** 2, own * (1 + inter.sum()), rtol=1e-10)


def test_interference_of_orthogonal_rows_is_zero_and_opposite_rows_negative() -> None:
    np.testing.assert_allclose(metrics.interference(np.diag([1.0, 4.0]), [1.0, 1.0]), 0.0)
    inter = metrics.interference(np.array([[1.0, -1.0], [-1.0, 1.0]]), [1.0, 1.0])
    np.testing.assert_allclose(inter, [[0.0, -0.5], [-0.5, 0.0]])
