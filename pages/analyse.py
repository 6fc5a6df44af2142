"""Analyse: pick a base and models from the allowed folders, run the analysis as a job, show its report."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ortho_mecha import charts, jobs, progress, ui, workspace
from ortho_mecha.workspace import BASE_LABEL

ui.require_app()
st.title("Analyse")

with ui.shown_errors():
    demo = workspace.ensure_demo()
choices = ui.model_choices()
if not choices.labels:
    st.info(
        "No .safetensors files under the allowed folders "
        f"({', '.join(str(r) for r in choices.roots)}); put models there or set ORTHO_MECHA_ROOTS."
    )
    st.stop()

# Back from another page (which drops this page's URL): follow the analysis this session followed here.
ui.followed_job(ui.ANALYSIS_URL)
# First visit in this session: follow the newest analysis (or start one on the demo models).
if ui.job_in_url(ui.ANALYSIS_URL) is None and not st.session_state.get("analyse_visited"):
    with ui.shown_errors():
        recent = [r for r in jobs.list_jobs() if r["kind"] == "analyse" and r["state"] in ("queued", "running", "done")
                  and choices.holds(r["params"]["base"], *r["params"]["models"])]  # files the user can pick
        if recent:
            st.query_params[ui.ANALYSIS_URL] = recent[0]["id"]
        elif "base" in demo:
            others = [str(path) for name, path in demo.items() if name != "base"]
            ui.start_job("analyse", {"base": str(demo["base"]), "models": others, "delta_from": {}}, ui.ANALYSIS_URL)
st.session_state["analyse_visited"] = True

# Widgets start from the analysis the URL shows, when its files are still under the roots.
job_id = ui.followed_job(ui.ANALYSIS_URL)
# (Streamlit forgets a page's widget values once another page is shown: they start from the analysis again.)
# None for an id naming no job of its kind: the job panel says so
params = ui.job_params(ui.ANALYSIS_URL, job_id) if job_id else None
if params and (st.session_state.get("analyse_widgets_from") != job_id or "an_base" not in st.session_state):
    with ui.shown_errors():
        st.session_state["an_base"] = choices.label(params["base"])
        st.session_state["an_models"] = [choices.label(m) for m in params["models"]]
        for model, other in (params.get("delta_from") or {}).items():
            st.session_state[f"an_df_{choices.label(model)}"] = choices.label(other)
    st.session_state["analyse_widgets_from"] = job_id

with st.container(border=True):
    left, right = st.columns([1, 2])
    st.session_state.setdefault("an_base", choices.default_base())
    base = left.selectbox("Base model", choices.labels, key="an_base")
    models = right.multiselect(
        "Models to analyse", [label for label in choices.labels if label != base], key="an_models"
    )
    with st.expander("Delta-from per model (default: the base)"):
        st.caption("A model's delta is taken against its delta-from: a fine-tune of a fine-tune against its parent.")
        delta_from = {}
        for model in models:
            options = [BASE_LABEL, *(label for label in choices.labels if label not in (model, base))]
            chosen = st.selectbox(model, options, key=f"an_df_{model}")
            if chosen != BASE_LABEL:
                delta_from[model] = chosen
    if st.button("Analyse", type="primary", icon=":material/play_arrow:", disabled=not models):
        with ui.shown_errors():
            ui.start_job("analyse", workspace.analysis_params(choices, base, models, delta_from), ui.ANALYSIS_URL)
            st.rerun()

record = ui.job_panel(ui.ANALYSIS_URL, "analysis")
ui.left_out_warnings((record or {}).get("params", {}).get("left_out", []))  # kept with the job: shown with its report
if record is None or record["state"] != "done":
    st.stop()
ui.remember_analysis(record)
report = record["result"]
ui.say_if_changed(report, record["params"])
ui.say_other_lineage(report)
names = charts.short_names(report["models"])

read = progress.read_text(report)
st.caption(
    f"{report['arch']} · base {Path(report['base']).name} · {len(names)} models · {report['keys']} keys · {read}"
)

similarity, quality, lineage, model_map, outliers, validation = st.tabs(
    ["Similarity", "Quality", "Lineage", "Model map", "Outliers", "Validation"]
)
with similarity:
    block = st.selectbox("Keys", charts.blocks_of(report), help="all keys, or one block of the model")
    if len(names) * charts.MIN_CELL > charts.HEATMAP_WIDTH:
        st.caption("Many models: the matrices are wider than the page; scroll them sideways.")
    for tab, metric in zip(st.tabs([m.title for m in charts.METRICS.values()]), charts.METRICS.values(), strict=True):
        with tab:
            st.caption(metric.help)
            if block != charts.ALL_KEYS and not metric.per_block:
                st.info(f"The {metric.title} is counted over all keys only; choose '{charts.ALL_KEYS}'.")
                continue
            with ui.shown_errors():
                matrix = charts.metric_matrix(report, metric.name, block)
                st.altair_chart(charts.heatmap(matrix, names, metric, f"{metric.title} · {block}"),
                                width="content")
with quality:
    st.dataframe(
        charts.quality_frame(report),
        hide_index=True,
        height=charts.table_height(len(names)),
        column_config={"score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0, format="%.2f"),
                       "change %": st.column_config.NumberColumn("change %", format="%.1f",
                                                                 help="‖model − base‖ ÷ ‖base‖: a fine-tune changes "
                                                                      "a few %; over 100 % is another lineage"),
                       "max outlier": st.column_config.NumberColumn(
                           "max outlier", help="the largest element change against the key's typical one (Gaussian "
                           "noise ≈ 3; above 5 lowers the score); keys changed far more than the model's other keys "
                           "are listed on the Outliers tab")},
    )
    st.caption("Grades: A+ > 0.80, A 0.65–0.80, B 0.50–0.65, C 0.35–0.50, D < 0.35; a null delta is graded D.")
with lineage:
    st.caption(charts.LINEAGE_HELP)
    st.dataframe(charts.lineage_frame(report), hide_index=True, height=charts.table_height(len(names)))
with model_map:
    if away := charts.off_map(report):
        st.caption("Left out, of another lineage than the base: " + ", ".join(names[i] for i in away))
    st.altair_chart(charts.model_map(report), width="content")
with outliers:
    frame = charts.outlier_frame(report)
    if frame.empty:
        st.success("No outlier keys: every key changed about as much as the model's typical key.")
    else:
        st.dataframe(frame, hide_index=True)
with validation:
    for check in report["validation"]["models"]:
        notes = check.get("notes") or ["matches the base"]
        st.markdown(f"**{Path(check.get('path', '')).name or 'model'}**: " + "; ".join(notes))
    with st.expander("Full validation report"):
        st.json(report["validation"])
