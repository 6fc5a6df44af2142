"""Chart and table builders: the matrices they pick from a report, cell text up to the limit, the tables."""

from __future__ import annotations

import numpy as np
import pytest

from ortho_mecha import charts
from ortho_mecha.errors import OrthoMechaError


def _report(n: int) -> dict:
    rng = np.random.default_rng(0)
    cos = np.clip(rng.uniform(-1, 1, (n, n)), -1, 1)
    cos = (cos + cos.T) / 2
    np.fill_diagonal(cos, 1.0)
    return {
        "models": [f"/m/{i}.safetensors" for i in range(n)],
        "cos": cos.tolist(),
        "new_info": (1 - cos**2).tolist(),
        "conflict_ratio": np.zeros((n, n)).tolist(),
        "blocks": {"double_blocks.0": {"cos": [[1.0, 0.5], [0.5, 1.0]][:n], "norms": [1.0, 2.0][:n]}},
    }


def test_block_new_information_is_one_minus_cos_squared() -> None:
    matrix = charts.metric_matrix(_report(2), "new_info", "double_blocks.0")
    assert matrix.tolist() == [[0.0, 0.75], [0.75, 0.0]]


def test_conflicts_exist_over_all_keys_only_and_unknown_names_are_refused() -> None:
    with pytest.raises(OrthoMechaError, match="all keys only"):
        charts.metric_matrix(_report(2), "conflict_ratio", "double_blocks.0")
    with pytest.raises(OrthoMechaError, match=r"valid: all keys, double_blocks\.0"):
        charts.metric_matrix(_report(2), "cos", "single_blocks.9")
    with pytest.raises(OrthoMechaError, match="valid: cos, new_info, conflict_ratio"):
        charts.metric_matrix(_report(2), "cosine")


@pytest.mark.parametrize("n", [3, 20, 25, 50])
def test_cell_text_and_tooltips_at_every_size(n: int) -> None:
    """Values in the cells and in tooltips; cells fit the page down to MIN_CELL (50 models: readable, wider)."""
    report = _report(n)
    spec = charts.heatmap(np.asarray(report["cos"]), charts.short_names(report["models"]), charts.METRICS["cos"])
    layers = spec.to_dict()["layer"]
    assert [layer["mark"]["type"] for layer in layers] == ["rect", "text"]
    assert layers[0]["encoding"]["tooltip"][2]["field"] == "value"
    size = spec.to_dict()["width"]["step"]
    assert size == spec.to_dict()["height"]["step"] and size >= charts.MIN_CELL  # square cells, a value fits
    assert n * size <= max(charts.HEATMAP_WIDTH, n * charts.MIN_CELL)
    assert layers[1]["mark"]["fontSize"] * 5 * 0.6 <= size  # "-0.93" in the cell


def test_a_matrix_that_does_not_fit_the_names_is_refused() -> None:
    with pytest.raises(OrthoMechaError, match="does not fit 3 model names"):
        charts.heatmap(np.eye(2), ["a", "b", "c"], charts.METRICS["cos"])


def test_model_map_points_close_together_share_one_label() -> None:
    x = np.array([0.0, 1.0, 0.01, 0.5, 1.0])
    y = np.array([0.0, 1.0, 0.0, 0.5, 1.02])
    labels, groups = charts.map_labels(["a", "b", "a_copy", "c", "b2"], x, y)
    assert labels == ["a +1", "b +1", "", "c", ""]
    assert groups == ["a, a_copy", "b, b2", "a, a_copy", "c", "b, b2"]
    assert charts.map_labels(["only"], np.zeros(1), np.zeros(1)) == (["only"], ["only"])


def test_model_map_labels_are_cut_so_the_plot_keeps_its_width() -> None:
    names = [f"finetune_{i:02d}_painterly_long_name_v3" for i in range(26)]
    report = {"models": [f"/m/{n}.safetensors" for n in names],
              "map": [{"x": 0.0, "y": float(i == 25)} for i in range(26)],
              "quality": {"grade": ["A"] * 26}, "norms": [1.0] * 26}
    spec = charts.model_map(report).to_dict()
    assert spec["layer"][1]["mark"]["limit"] == charts.MAP_LABEL_PX
    labels = [row["label"] for row in spec["datasets"][spec["data"]["name"]]]
    assert labels == [f"{names[0]} +24", *[""] * 24, names[25]]


def test_short_names_tell_equal_stems_apart() -> None:
    assert charts.short_names(["/x/a.safetensors", "/y/a.safetensors", "/y/b.safetensors"]) == ["x/a", "y/a", "b"]


def test_outlier_table_lists_only_models_with_outlier_keys() -> None:
    report = {"models": ["/m/a.safetensors", "/m/b.safetensors"],
              "outliers": {"max_outlier": [3.0, 9.5], "keys": [[], ["k1", "k2"]]}}
    frame = charts.outlier_frame(report)
    assert frame.to_dict("records") == [{"model": "b", "max outlier": 9.5, "outlier keys": "k1, k2"}]


@pytest.mark.parametrize(("metric", "white_at", "black_at"), [
    ("cos", [-1.0, 1.0], [0.0]), ("new_info", [0.0, 0.2], [0.8, 1.0]), ("conflict_ratio", [1.0], [0.0, 0.3])])
def test_cell_text_is_white_only_where_the_scheme_is_dark(metric: str, white_at: list, black_at: list) -> None:
    spec = charts.METRICS[metric]
    chart = charts.heatmap(np.eye(2), ["a", "b"], spec).to_dict()
    test = chart["layer"][1]["encoding"]["color"]["condition"]["test"]

    def white(value: float) -> bool:  # the Vega expression is plain arithmetic on datum.value
        return bool(eval(test.replace("datum.value", repr(value))))

    assert all(white(v) for v in white_at) and not any(white(v) for v in black_at)


def test_lineage_table_names_parents_mixes_and_duplicates() -> None:
    report = {
        "models": [f"/m/{name}.safetensors" for name in ("a", "a2", "ab", "b", "b_copy")],
        "lineage": [
            {"parent": None, "mix": None, "confidence": 0.9, "duplicate_of": None},
            {"parent": "/m/a.safetensors", "mix": None, "confidence": 0.6, "duplicate_of": None},
            {"parent": None, "mix": {"/m/a.safetensors": 0.5, "/m/b.safetensors": 0.5}, "confidence": 0.95,
             "duplicate_of": None},
            {"parent": None, "mix": None, "confidence": 0.01, "duplicate_of": "/m/b_copy.safetensors"},
            {"parent": None, "mix": None, "confidence": 0.01, "duplicate_of": None},
        ],
    }
    frame = charts.lineage_frame(report)
    assert list(frame.columns) == ["model", "parent", "merge of", "duplicate of", "confidence"]
    assert frame["parent"].tolist() == ["base", "a", "base", "base", "base"]
    assert frame["merge of"][2] == "a × 0.50, b × 0.50"
    assert frame["duplicate of"].tolist() == ["", "", "", "b_copy", ""]


def test_quality_table_shows_the_change_and_tables_are_tall_enough() -> None:
    report = {"models": ["/m/a.safetensors", "/m/b.safetensors"], "quality": {"grade": ["A", "D"], "score": [0.7, 0.1]},
              "norms": [1.0, 30.0], "signal": {"effective_rank": [0.1, 0.9], "snr": [50.0, 1.0]},
              "outliers": {"max_outlier": [3.0, 3.0]}, "null": [False, False], "delta_from": [None, None],
              "change": [0.04, 1.3]}
    frame = charts.quality_frame(report)
    assert frame["change %"].tolist() == pytest.approx([4.0, 130.0])
    assert charts.quality_frame({k: v for k, v in report.items() if k != "change"})["change %"].isna().all()
    assert charts.table_height(13) > charts.table_height(10) and charts.table_height(100) == charts.table_height(30)


def test_model_map_leaves_out_models_of_another_lineage() -> None:
    """An unrelated model (change ~1.3 of the base) stretched the map and drew ten fine-tunes as one dot."""
    names = ["a", "b", "stranger"]
    report = {"models": [f"/m/{n}.safetensors" for n in names], "quality": {"grade": ["A", "A", "D"]},
              "norms": [1.0, 1.0, 30.0], "change": [0.05, 0.06, 1.3],
              "map": [{"x": 0.0, "y": 0.0}, {"x": 0.05, "y": 0.1}, {"x": 30.0, "y": 0.0}]}
    assert charts.off_map(report) == [2]
    spec = charts.model_map(report).to_dict()
    rows = spec["datasets"][spec["data"]["name"]]
    assert [row["model"] for row in rows] == ["a", "b"] and [row["label"] for row in rows] == ["a", "b"]
    assert charts.off_map({k: v for k, v in report.items() if k != "change"}) == []  # older reports: all drawn
