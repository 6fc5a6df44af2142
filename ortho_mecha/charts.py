"""Charts and tables of an analysis report for the dashboard: pure functions from report data to Altair/pandas.

Nothing here imports streamlit. Heatmaps carry their values in cell text and in tooltips; their cells
shrink to fit a page, down to ``MIN_CELL`` pixels, where a value and a row label stay readable (50 models:
a matrix about 1,200 pixels wide, scrolled sideways).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import short_names

MIN_CELL = 24  # pixels: a cell still holds its value ("-0.93" at 7 px) and a row label fits beside it
ALL_KEYS = "all keys"
HEATMAP_WIDTH = 620  # pixels the matrix may take at most
BARS_HEIGHT = 440  # pixels of a grouped bar chart with its legends above and below


@dataclass(frozen=True)
class Metric:
    """A pairwise figure the heatmaps show: its report field, colour domain and scheme."""

    name: str
    title: str
    domain: tuple[float, float]
    scheme: str
    per_block: bool
    help: str
    dark_at: str = "ends"  # where the scheme's colours are dark (white text there): "ends", "high" or "low"


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("cos", "cosine similarity", (-1.0, 1.0), "redblue", True,
               "cos of the two deltas: 1 same direction, 0 unrelated, −1 opposite"),
        Metric("new_info", "new information", (0.0, 1.0), "viridis", True,
               "1 − cos²: how much of one delta the other does not already carry", dark_at="low"),
        Metric("conflict_ratio", "conflict ratio", (0.0, 1.0), "orangered", False,
               "share of the elements both change where they change them in opposite directions (all keys only)",
               dark_at="high"),
    )
}
INTERFERENCE = Metric("interference", "interference", (-0.5, 0.5), "redblue", False,
                      "share of the rows' own energy their overlap adds to a plain sum (negative: they cancel)")


def blocks_of(report: Mapping[str, Any]) -> list[str]:
    """The choices of the block select box: all keys, then the report's blocks in order."""
    return [ALL_KEYS, *report.get("blocks", {})]


def metric_matrix(report: Mapping[str, Any], metric: str, block: str = ALL_KEYS) -> np.ndarray:
    """The N×N matrix of ``metric`` over all keys or one block of the report."""
    if metric not in METRICS:
        raise OrthoMechaError(f"unknown figure {metric!r}; valid: {', '.join(METRICS)}")
    if block == ALL_KEYS:
        return np.asarray(report[metric], dtype=np.float64)
    if block not in report.get("blocks", {}):
        raise OrthoMechaError(f"no block {block!r} in the analysis; valid: {', '.join(blocks_of(report))}")
    if not METRICS[metric].per_block:
        raise OrthoMechaError(f"the {METRICS[metric].title} is counted over all keys only; choose '{ALL_KEYS}'")
    cos = np.asarray(report["blocks"][block]["cos"], dtype=np.float64)
    return cos if metric == "cos" else 1.0 - cos**2


def heatmap(matrix: np.ndarray, labels: Sequence[str], spec: Metric, title: str = "") -> alt.LayerChart:
    """A labelled heatmap of a square matrix: colour by value, value in each cell, and tooltip."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    if matrix.shape != (n, n):
        raise OrthoMechaError(f"a {matrix.shape} matrix does not fit {n} model names")
    rows, cols = np.indices((n, n))
    frame = pd.DataFrame({
        "row": np.asarray(labels, dtype=object)[rows.ravel()],
        "column": np.asarray(labels, dtype=object)[cols.ravel()],
        "value": matrix.ravel(),
    })
    cell = max(MIN_CELL, min(48, HEATMAP_WIDTH // max(n, 1)))
    order = list(labels)
    base = alt.Chart(frame, title=title or spec.title).encode(
        x=alt.X("column:N", sort=order, title=None, axis=alt.Axis(labelAngle=-45, labelLimit=160, labelOverlap=False)),
        y=alt.Y("row:N", sort=order, title=None, axis=alt.Axis(labelLimit=160)),
    )
    rects = base.mark_rect().encode(
        color=alt.Color("value:Q", title=spec.name, scale=alt.Scale(domain=list(spec.domain), scheme=spec.scheme)),
        tooltip=[alt.Tooltip("row:N", title="model"), alt.Tooltip("column:N", title="against"),
                 alt.Tooltip("value:Q", title=spec.title, format=".3f")],
    )
    low, high = spec.domain
    middle, spread = (low + high) / 2, (high - low) / 2
    # Text black on pale cells, white on dark ones; where the scheme is dark depends on its shape.
    strong = {
        "ends": f"abs(datum.value - {middle}) > {0.55 * spread}",  # diverging: dark at both ends
        "high": f"datum.value > {low + 0.6 * (high - low)}",
        "low": f"datum.value < {low + 0.45 * (high - low)}",  # viridis: purple at the low end, yellow at the top
    }[spec.dark_at]
    text = base.mark_text(fontSize=max(7, min(12, cell // 4))).encode(
        text=alt.Text("value:Q", format=".2f"),
        color=alt.condition(strong, alt.value("white"), alt.value("black")),
    )
    return alt.layer(rects, text).properties(width=alt.Step(cell), height=alt.Step(cell))


MAP_LABEL_PX = 160  # the model map's point labels are cut (with …) at this width


def off_map(report: Mapping[str, Any]) -> list[int]:
    """The models the model map leaves out: those of another lineage than the base (their distance, about the
    base's own size, squeezed every fine-tune into one dot)."""
    from ortho_mecha.lineage import other_lineage

    return list(other_lineage(report))


def model_map(report: Mapping[str, Any]) -> alt.LayerChart:
    """The 2-D model map (classical MDS of the lineage distances), points coloured by quality grade; models of
    another lineage (:func:`off_map`) are left out, and the axes fit the points drawn, with room at the edges."""
    left_out = set(off_map(report))
    drawn = [i for i in range(len(report["models"])) if i not in left_out]
    names = [short_names(report["models"])[i] for i in drawn]
    points = [report["map"][i] for i in drawn]
    frame = pd.DataFrame({
        "model": names,
        "x": [p["x"] for p in points],
        "y": [p["y"] for p in points],
        "grade": [report["quality"]["grade"][i] for i in drawn],
        "norm": [report["norms"][i] for i in drawn],
    })
    frame["label"], frame["near"] = map_labels(names, frame["x"].to_numpy(), frame["y"].to_numpy())
    scale = alt.Scale(zero=False, padding=24)  # no clipped dots at the edges
    base = alt.Chart(frame, title="model map (distances between models)").encode(
        x=alt.X("x:Q", title=None, axis=alt.Axis(labels=False), scale=scale),
        y=alt.Y("y:Q", title=None, axis=alt.Axis(labels=False), scale=scale),
    )
    dots = base.mark_circle(size=140).encode(
        color=alt.Color("grade:N", sort=["A+", "A", "B", "C", "D"]),
        tooltip=["model:N", "grade:N", alt.Tooltip("norm:Q", format=".4g", title="delta norm"),
                 alt.Tooltip("near:N", title="drawn together")],
    )
    # Long names are cut (with …) at MAP_LABEL_PX: the chart's layout counts its texts, so a long one squeezed
    # the plot to nothing.
    text = base.mark_text(dx=8, align="left", limit=MAP_LABEL_PX).encode(text="label:N")
    return alt.layer(dots, text).properties(width=560, height=420)


def map_labels(
    names: Sequence[str], x: np.ndarray, y: np.ndarray, near: float = 0.04
) -> tuple[list[str], list[str]]:
    """(labels, groups) of the model map's points: models within ``near`` × the map's extent of one another
    (duplicates, near-copies) share one label on the first of them, its name and "+k" for the k others, which
    get none, so no two labels are drawn over each other there. ``groups`` names every model of each point's
    group (for its tooltip)."""
    extent = float(max(np.ptp(x), np.ptp(y))) if len(names) else 0.0
    radius = near * (extent or 1.0)
    labels = [""] * len(names)
    groups = [""] * len(names)
    grouped = np.zeros(len(names), dtype=bool)
    for i in range(len(names)):
        if grouped[i]:
            continue
        group = np.nonzero(~grouped & (np.hypot(x - x[i], y - y[i]) <= radius))[0]
        grouped[group] = True
        labels[i] = names[i] if len(group) == 1 else f"{names[i]} +{len(group) - 1}"
        for j in group:
            groups[j] = ", ".join(names[m] for m in group)
    return labels, groups


def quality_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model: grade, score, delta norm, signal, outlier score, survival, null and stale flags."""
    return pd.DataFrame({
        "model": short_names(report["models"]),
        "grade": report["quality"]["grade"],
        "score": report["quality"]["score"],
        "delta norm": report["norms"],
        # ‖M − base‖ ÷ ‖base‖ in %: a fine-tune changes a few %, over 100 % is another lineage (reports before: none)
        "change %": [None if c is None else 100.0 * c for c in report.get("change") or [None] * len(report["models"])],
        "effective rank": report["signal"]["effective_rank"],
        "SNR": report["signal"]["snr"],
        "max outlier": report["outliers"]["max_outlier"],
        "survival": report.get("survival", [None] * len(report["models"])),
        "null delta": report["null"],
        "delta from": ["base" if d is None else Path(d).stem for d in report["delta_from"]],
    })


TABLE_ROW_PX = 35  # a st.dataframe row (and its header), in pixels
TABLE_MAX_ROWS = 30  # the tallest table shown whole; a longer one scrolls


def table_height(rows: int) -> int:
    """A st.dataframe height that shows ``rows`` rows whole, up to :data:`TABLE_MAX_ROWS` (its default height showed
    ten and scrolled the rest in a page with room to spare)."""
    return (min(rows, TABLE_MAX_ROWS) + 1) * TABLE_ROW_PX + 3


LINEAGE_HELP = (
    "parent: the file the model's delta is nearest to (the base when no file is nearer than half the way); "
    "merge of: the files whose deltas, weighted, explain it (what the weights miss of 1 is the base's share); "
    "duplicate of: a model it copies (and then its twin's parent or mix, with the twin's confidence). Confidence: "
    "how clearly the evidence clears the rule that decided the parent or mix, 1 for an exact parent's copy or an "
    "exact mix, 0 on the rule's threshold. A low confidence beside 'the base' means another "
    "file nearer the base lies about half the way to the model (often a merge made from it): the base still won."
)


def lineage_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model: its parent, or the merge it is explained by, the model it duplicates, and the
    confidence (:data:`LINEAGE_HELP`)."""
    rows = []
    for name, item in zip(short_names(report["models"]), report["lineage"], strict=True):
        mix = item.get("mix")
        duplicate = item.get("duplicate_of")
        rows.append({
            "model": name,
            "parent": "base" if item["parent"] is None else Path(item["parent"]).stem,
            "merge of": ", ".join(f"{Path(f).stem} × {w:.2f}" for f, w in mix.items()) if mix else "",
            "duplicate of": Path(duplicate).stem if duplicate else "",
            "confidence": item["confidence"],
        })
    return pd.DataFrame(rows)


def outlier_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model with outlier keys (changed far more than the model's typical key)."""
    rows = [
        {"model": name, "max outlier": score, "outlier keys": ", ".join(keys)}
        for name, score, keys in zip(
            short_names(report["models"]),
            report["outliers"]["max_outlier"],
            report["outliers"]["keys"],
            strict=True,
        )
        if keys
    ]
    return pd.DataFrame(rows, columns=["model", "max outlier", "outlier keys"])



def survival_bars(rows: pd.DataFrame, title: str = "predicted survival per row and method") -> alt.LayerChart:
    """Grouped bars of survival (a :class:`~ortho_mecha.compare.Comparison`'s ``rows``): one group per row, one
    bar per method; the current method outlined in black, estimates pale (the "prediction" legend and the
    tooltip say which); a dashed rule at 1 (the row's whole delta survives)."""
    missing = {"method", "row", "survival", "basis", "current"} - set(rows.columns)
    if missing:
        raise OrthoMechaError(f"a survival table needs the columns {', '.join(sorted(missing))}")
    labels = list(dict.fromkeys(rows["row"]))
    short = dict(zip(labels, short_names(labels), strict=True))
    frame = rows.assign(row=[short[label] for label in rows["row"]],
                        prediction=[f"{basis}{' (current)' if now else ''}"
                                    for basis, now in zip(rows["basis"], rows["current"], strict=True)])
    methods = list(dict.fromkeys(frame["method"]))
    base = alt.Chart(frame, title=title)
    bars = base.mark_bar().encode(
        x=alt.X("row:N", sort=list(dict.fromkeys(frame["row"])), title=None,
                axis=alt.Axis(labelAngle=-30, labelOverlap=False, labelLimit=160)),
        xOffset=alt.XOffset("method:N", sort=methods),
        y=alt.Y("survival:Q", title="survival"),
        color=alt.Color("method:N", sort=methods, scale=alt.Scale(scheme="tableau10"),
                        legend=alt.Legend(orient="bottom", columns=4)),
        opacity=alt.Opacity("basis:N", title="prediction", legend=alt.Legend(orient="top"),
                            scale=alt.Scale(domain=["exact", "estimate"], range=[1.0, 0.4])),
        stroke=alt.condition("datum.current", alt.value("black"), alt.value(None)),
        strokeWidth=alt.condition("datum.current", alt.value(2), alt.value(0)),
        tooltip=[alt.Tooltip("row:N"), alt.Tooltip("method:N"), alt.Tooltip("survival:Q", format=".3f"),
                 alt.Tooltip("prediction:N")],
    )
    full = alt.Chart(pd.DataFrame({"survival": [1.0]})).mark_rule(strokeDash=[4, 4], color="grey").encode(
        y="survival:Q"
    )
    # Streamlit fits the whole chart, legends included, into this height (and the page's width when stretched).
    return alt.layer(bars, full).properties(height=BARS_HEIGHT)
