"""Merge: run the Mixer's plan as a background job; show the repair report, hashes and output; offer downloads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from ortho_mecha import recipe, security, ui, workspace
from ortho_mecha.merge import job_plan, replaces_an_input, summary

ui.require_app()
st.title("Merge")

plan = st.session_state.get("plan")
merge_job = ui.followed_job(ui.MERGE_URL)
if plan is None and merge_job is not None:  # a reload or a new tab: the plan the job in the URL merged
    with ui.shown_errors():
        plan = ui.restore_merged_plan(merge_job)
if plan is None:
    st.info("Make a plan on the Mixer page first; it is merged here.")
else:
    with st.container(border=True):
        enabled = ", ".join(row.model.stem for row in plan.enabled_rows)
        st.markdown(f"**{plan.method}** of {enabled} on **{plan.base.stem}** → `{workspace.merges_dir()}`")
        left, right = st.columns([2, 1], vertical_alignment="bottom")
        name = left.text_input("Output file name", value=workspace.free_output_name(workspace.merges_dir()),
                               key="merge_name", help="a plain file name; letters, digits, '.', '_', '-' and spaces")
        overwrite = right.checkbox("Replace an existing file", key="merge_overwrite")
        ready = False  # a name that is refused, taken or one of the plan's inputs: said above, and no button
        with ui.shown_errors():
            target = workspace.merges_dir() / security.validate_output_name(name)
            ahead = ui.plan_forecast(plan, target)
            st.caption(f"Dry-run forecast for `{target.name}`: " + " · ".join(ahead.lines()))
            if ahead.fits_disk is False:
                st.warning("Not enough free disk space for the output there; free some space first.")
            taken = target.exists() and not overwrite
            own_input = replaces_an_input(plan, target)
            if own_input:
                st.warning(f"{target.name} is one of the plan's inputs: choose another name.")
            elif taken and ui.written_by_followed(ui.MERGE_URL, target):
                ui.say_just_written(target, replace=True)
            elif taken:
                st.warning(f"{target.name} exists already: choose another name, or tick 'Replace an existing file'.")
            ready = not taken and not own_input
        writing = ui.merging_into(merge_job)
        if writing:
            st.info(f"Merging into `{writing}` (below): the next merge can start when it ends.")
        if st.button("Merge", type="primary", icon=":material/merge:", key="merge_start",
                     disabled=not ready or bool(writing)):
            with ui.shown_errors():
                ui.start_job("merge", workspace.merge_job_params(plan, name, overwrite), ui.MERGE_URL)
                st.rerun()

record = ui.job_panel(ui.MERGE_URL, "merge")
if record is not None and record["state"] == "done":
    report = record["result"]
    st.success(f"written {report['output']}")
    repairs = report["repairs"]
    columns = st.columns(4)
    columns[0].metric("size", f"{report['bytes'] / 2**20:.1f} MiB")
    columns[1].metric("time", f"{report['seconds']:.1f} s")
    columns[2].metric("NaN/Inf keys repaired", len(repairs["nonfinite"]))
    columns[3].metric("keys copied from the base", len(repairs["missing"]) + len(repairs["non_float"]))
    if report.get("survival"):
        st.subheader("Survival of each row")
        st.caption("How much of each row's delta the merge carries along its direction (1: all of it), "
                   "predicted from the analysis before the merge and measured on the output after it.")
        st.dataframe(workspace.survival_frame(report["survival"]), hide_index=True)
    st.subheader("Repair report")
    st.code(summary(report), language=None)
    st.subheader("Input and output hashes (sha256)")
    hashes = pd.DataFrame({"file": [*report["sha256"], f"{report['output']} (output)"],
                           "sha256": [*report["sha256"].values(), report["output_sha256"]]})
    st.dataframe(hashes, hide_index=True)
    with ui.shown_errors():
        merged_plan = job_plan(record["params"])
        stem = Path(report["output"]).stem
        left, right = st.columns(2)
        left.download_button("Download recipe (.mecha)", recipe.recipe_text(merged_plan), f"{stem}.mecha",
                             icon=":material/download:")
        right.download_button("Download script (.py)", recipe.script_text(merged_plan), f"{stem}.py",
                              icon=":material/download:")
