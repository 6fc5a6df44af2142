"""Every method side by side (ortho_mecha.compare) on planted Grams, against metrics and against a real merge."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ortho_mecha import charts, compare, metrics, workspace
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.merge import merge_plan
from ortho_mecha.plan import METHODS
from tests.modelgen import write_family_files

LINEAR_LIKE = ("add_difference", "ortho_superpose", "ortho_project")


def survival(result: compare.Comparison, method: str) -> np.ndarray:
    return result.rows.loc[result.rows["method"] == method, "survival"].to_numpy()


def summary(result: compare.Comparison, method: str) -> pd.Series:
    return result.summary.set_index("method").loc[method]


def test_orthogonal_rows_by_hand() -> None:
    # Three orthogonal deltas of squared norms 4, 1, 9; weights α r = 1, 0.5, 2 (the last row listed twice).
    g = np.diag([4.0, 1.0, 9.0])
    result = compare.compare_methods(g, ["a", "b", "c"], [1.0, 0.5, 1.0], [1, 1, 2], "ortho_superpose", {})
    weights = np.array([1.0, 0.5, 2.0])
    for method in LINEAR_LIKE:  # each row survives at its own weight; nothing overlaps
        np.testing.assert_allclose(survival(result, method), weights, atol=1e-12)
        assert summary(result, method)["norm ratio"] == pytest.approx(1.0)
    np.testing.assert_allclose(survival(result, "weighted_sum"), weights / 3.5, atol=1e-12)
    assert summary(result, "weighted_sum")["norm ratio"] == pytest.approx(1 / 3.5)
    # geometric median of a, b, c, c: c's two copies outweigh the unit pull of a and b together (|u_a + u_b| < 2),
    # so the median is c's point (Weiszfeld's 100 steps end within 3e-3 of it, as in the merge)
    np.testing.assert_allclose(survival(result, "geometric_median"), [0.0, 0.0, 1.0], atol=3e-3)
    # Model Stock: listed a, b, c, c; consecutive cosines 0, 0, 1 → mean 1/3, t = 4·(1/3) / (1 + 3·(1/3)) = 2/3.
    np.testing.assert_allclose(survival(result, "model_stock"), weights / 4 * 2 / 3, atol=1e-12)
    assert (result.summary["interference"].abs() < 1e-12).all()
    assert result.orthogonality == pytest.approx(1.0) and result.row_interference == pytest.approx(0.0)
    assert summary(result, "ortho_superpose")["min survival"] == pytest.approx(0.5)
    assert summary(result, "ortho_superpose")["mean survival"] == pytest.approx(3.5 / 3)


def test_orthogonal_unit_rows_rotation_and_model_stock() -> None:
    result = compare.compare_methods(np.eye(3), ["a", "b", "c"], [1.0] * 3, [1] * 3, "orthomerge", {})
    # orthomerge: the mean angle (1) along the normalised sum of the three unit deltas → 1/√3 each.
    np.testing.assert_allclose(survival(result, "orthomerge"), [1 / math.sqrt(3)] * 3)
    assert summary(result, "orthomerge")["norm ratio"] == pytest.approx(1 / math.sqrt(3))
    # Model Stock pulls unrelated fine-tunes back to the base: cos 0 → t = 0.
    np.testing.assert_allclose(survival(result, "model_stock"), [0.0] * 3)
    assert summary(result, "model_stock")["note"] == "the merged delta is zero"
    assert math.isnan(summary(result, "model_stock")["interference"])
    assert list(result.summary.loc[result.summary["current"], "method"]) == ["orthomerge"]


def test_identical_rows_count_once_except_in_a_plain_sum() -> None:
    n = 3
    result = compare.compare_methods(np.full((n, n), 4.0), ["a", "b", "c"], [1.0] * n, [1] * n, "ties", {})
    np.testing.assert_allclose(survival(result, "add_difference"), [n] * n)
    assert summary(result, "add_difference")["norm ratio"] == pytest.approx(math.sqrt(n))
    for method in ("weighted_sum", "ortho_superpose", "ortho_project", "orthomerge", "geometric_median", "model_stock",
                   "ties"):
        np.testing.assert_allclose(survival(result, method), [1.0] * n, atol=1e-9, err_msg=method)
    # DARE gives each identical copy its own dropout: an entry survives if any copy keeps it, then / (1 − p)
    np.testing.assert_allclose(survival(result, "dare"), [(1 - 0.9**n) / 0.1] * n, rtol=0.03)
    assert summary(result, "ortho_superpose")["norm ratio"] == pytest.approx(1 / math.sqrt(n))
    # Every method points along the one delta, which all n rows carry: interference n − 1 whatever the
    # coefficients (ortho_project writes it −δ + δ + δ, ortho_superpose δ/3 + δ/3 + δ/3).
    np.testing.assert_allclose(result.summary["interference"], [n - 1] * len(METHODS))
    assert result.orthogonality == pytest.approx(0.0)
    assert result.row_interference == pytest.approx(n - 1)


def test_opposite_rows_cancel_except_in_order_dependent_projection() -> None:
    g = np.array([[1.0, -1.0], [-1.0, 1.0]])
    result = compare.compare_methods(g, ["a", "b"], [1.0, 1.0], [1, 1], "ortho_project", {})
    np.testing.assert_allclose(survival(result, "ortho_project"), [1.0, -1.0])  # δ, then −δ projected away
    assert summary(result, "ortho_project")["interference"] == pytest.approx(1.0)
    for method in ("add_difference", "weighted_sum", "ortho_superpose", "orthomerge", "geometric_median",
                   "model_stock"):
        np.testing.assert_allclose(survival(result, method), [0.0, 0.0], atol=1e-12, err_msg=method)
        assert summary(result, method)["norm ratio"] == 0.0
    assert result.row_interference == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", range(4))
def test_every_method_matches_metrics_on_per_key_grams(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(5, 4, 30))  # keys × rows × elements, rows partly aligned
    x[:, 1] += 0.8 * x[:, 0]
    grams = np.einsum("kie,kje->kij", x, x)
    alphas, repeats = [1.0, 0.7, 1.3, 0.5], [1, 2, 1, 3]
    options = {"alpha": 0.6, "theta_agg": "max", "direction_weight": "equal"}
    result = compare.compare_methods(grams, list("abcd"), alphas, repeats, "orthomerge", options)
    assert summary(result, "orthomerge")["options"] == "alpha=0.6, theta_agg=max, conflict_aware=False, " \
        "direction_weight=equal, precision=float64"
    for name, spec in METHODS.items():
        chosen = {**spec.defaults(), **options} if name == "orthomerge" else spec.defaults()
        w, listed = compare.row_weights(name, alphas, repeats)
        expected = metrics.predicted_survival(grams, name, w, chosen, listed)
        np.testing.assert_allclose(survival(result, name), expected, rtol=1e-12, err_msg=name)
        assert set(result.rows.loc[result.rows["method"] == name, "basis"]) == {metrics.survival_label(name)}
        # ‖Δ‖ and the interference from the coefficients' merged vector, per key
        a = metrics.merged_coefficients(grams, name, w, chosen, listed)
        merged = np.einsum("ki,kie->ke", a, x)
        energy = float((merged**2).sum())
        reference = float(sum((wi * x[:, i]) ** 2 for i, wi in enumerate(np.multiply(alphas, repeats))).sum())
        assert summary(result, name)["norm ratio"] == pytest.approx(math.sqrt(energy / reference), rel=1e-9)
        cos2 = [float((merged * x[:, i]).sum()) ** 2 / (energy * float((x[:, i] ** 2).sum())) for i in range(4)]
        assert summary(result, name)["interference"] == pytest.approx(sum(cos2) - 1.0, rel=1e-9, abs=1e-12)
    table = result.survival_table()
    assert list(table.columns) == ["row", *METHODS] and list(table["row"]) == list("abcd")


def test_the_current_method_takes_the_users_options_the_others_their_defaults() -> None:
    result = compare.compare_methods(np.eye(2), ["a", "b"], [1.0, 1.0], [1, 1], "add_difference", {"alpha": 0.5})
    np.testing.assert_allclose(survival(result, "add_difference"), [0.5, 0.5])
    np.testing.assert_allclose(survival(result, "ortho_superpose"), [1.0, 1.0])
    assert set(result.rows.loc[result.rows["current"], "method"]) == {"add_difference"}


def test_row_granularity_is_an_estimate_and_too_few_rows_are_not_predicted() -> None:
    result = compare.compare_methods(np.eye(1), ["a"], [1.0], [1], "ortho_superpose", {"granularity": "row"})
    line = summary(result, "ortho_superpose")
    assert line["basis"] == "estimate" and "granularity 'row'" in line["note"]
    assert "granularity=row" in line["options"]
    stock = summary(result, "model_stock")
    assert stock["basis"] == "not predicted" and stock["note"] == "needs at least 2 rows"
    assert "model_stock" not in set(result.rows["method"])


def test_a_model_used_twice_gets_two_row_names_and_bad_input_is_refused() -> None:
    result = compare.compare_methods(np.eye(2), ["a", "a"], [1.0, 1.0], [1, 1], "ties", {})
    assert list(result.survival_table()["row"]) == ["a", "a (2)"]
    with pytest.raises(OrthoMechaError, match="unknown method 'nope'"):
        compare.compare_methods(np.eye(2), ["a", "b"], [1.0, 1.0], [1, 1], "nope", {})
    with pytest.raises(ValueError, match="2 rows need"):
        compare.compare_methods(np.eye(3), ["a", "b"], [1.0, 1.0], [1, 1], "ties", {})


def test_survival_chart_groups_methods_and_marks_current_and_estimates() -> None:
    result = compare.compare_methods(np.eye(2), ["x/a.safetensors", "x/b.safetensors"], [1.0, 1.0], [1, 1],
                                     "ties", {})
    spec = charts.survival_bars(result.rows).to_dict()
    bars = spec["layer"][0]["encoding"]
    assert bars["xOffset"]["field"] == "method" and bars["y"]["field"] == "survival"
    assert bars["opacity"]["scale"] == {"domain": ["exact", "estimate"], "range": [1.0, 0.4]}
    assert bars["stroke"]["condition"]["test"] == "datum.current"
    values = next(iter(spec["datasets"].values()))
    assert {v["row"] for v in values} == {"a", "b"}
    assert {v["prediction"] for v in values if v["method"] == "ties"} == {"estimate (current)"}
    with pytest.raises(OrthoMechaError, match="basis"):
        charts.survival_bars(result.rows.drop(columns="basis"))


def test_exact_figures_match_a_real_merge(tmp_path: Path) -> None:
    """ortho_superpose's and add_difference's survival and merged norm from the analysis equal those measured on
    the merged files."""
    from ortho_mecha import evaluate
    from ortho_mecha.analysis import analyse

    members = ["base", "anime", "photo", "anime_v2"]
    paths = write_family_files(tmp_path / "models", "custom", "fp32", members=members)
    choices = workspace.ModelChoices.scan([tmp_path / "models"])
    rows = [
        {"enabled": True, "model": "anime.safetensors", "delta_from": workspace.BASE_LABEL, "alpha": 1.0, "repeat": 1},
        {"enabled": True, "model": "photo.safetensors", "delta_from": workspace.BASE_LABEL, "alpha": 0.8, "repeat": 2},
        {"enabled": True, "model": "anime_v2.safetensors", "delta_from": "anime.safetensors", "alpha": 1.0,
         "repeat": 1},
    ]
    models = [paths[m] for m in members[1:]]
    gram = workspace.row_gram(analyse(paths["base"], models), rows, choices)
    result = compare.compare_rows(gram, "ortho_superpose", {"alpha": 0.9})
    weighted = float((np.square([1.0, 1.6, 1.0]) * np.diag(gram.gram)).sum())  # Σ ‖α_i r_i δ_i‖²
    for method, options in (("ortho_superpose", {"alpha": 0.9}), ("add_difference", {})):
        plan = workspace.plan_from_table("base.safetensors", rows, method, options, None, choices)
        plan = replace(plan, output_dtype="fp32", merge_dtype="fp64")
        out = tmp_path / f"{method}.safetensors"
        merge_plan(plan, out)
        measured = np.array(evaluate.measure(plan, out)["measured"])
        np.testing.assert_allclose(survival(result, method), measured, atol=0.02, err_msg=method)
        merged = analyse(paths["base"], [*models, out])  # the rows are cached: only the output is read
        at = [Path(f).resolve() for f in merged.files].index(out.resolve())
        norm = math.sqrt(merged.h[at, at] / weighted)  # ‖out − base‖ / sqrt(Σ ‖α_i r_i δ_i‖²)
        assert summary(result, method)["norm ratio"] == pytest.approx(norm, rel=0.01), method
    assert summary(result, "add_difference")["mean survival"] > summary(result, "weighted_sum")["mean survival"]


def test_block_alphas_are_compared_as_they_are_merged() -> None:
    """Compare methods took each row's plain alpha where block alphas set it per key (2.000 shown where the Mixer's
    figures, and the merge, gave 0.92): two orthogonal rows, each kept on one of two equal keys."""
    grams = np.stack([np.eye(2), np.eye(2)])  # per key: unit deltas a, b, orthogonal
    per_key = np.array([[1.0, 0.0], [0.0, 1.0]])  # a on key 0 only ("structure"), b on key 1 only ("style")
    result = compare.compare_methods(grams, ["a", "b"], per_key, [1, 1], "add_difference", {})
    np.testing.assert_allclose(survival(result, "add_difference"), [0.5, 0.5], atol=1e-12)  # half of each delta
    np.testing.assert_allclose(survival(result, "ortho_superpose"), [0.5, 0.5], atol=1e-12)
    assert summary(result, "add_difference")["norm ratio"] == pytest.approx(1.0)
    plain = compare.compare_methods(grams, ["a", "b"], [1.0, 1.0], [1, 1], "add_difference", {})
    np.testing.assert_allclose(survival(plain, "add_difference"), [1.0, 1.0], atol=1e-12)
