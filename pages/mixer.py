"""Mixer: edit the merge plan — rows, block alphas, method and its options, texture, a checkpoint's text
encoders — see its predicted figures, compare methods, save presets, extract a LoRA."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ortho_mecha import charts, recipe, ui, workspace
from ortho_mecha.methods.texture import BETA, TEXTURE_MODE
from ortho_mecha.plan import ALPHA_RANGE, METHODS, REPEAT_RANGE
from ortho_mecha.workspace import BASE_LABEL

ui.require_app()
st.title("Mixer")

choices = ui.model_choices()
if not choices.labels:
    st.info("No model files under the allowed folders; add some, then analyse them on the Analyse page.")
    st.stop()
analysis = ui.current_analysis(choices)
if analysis is not None:
    ui.say_if_changed(analysis[1], None)

if "mix" not in st.session_state:
    ui.set_mix(ui.first_mix(choices, analysis))
elif (analysis is not None and not st.session_state["mix"]["rows"]
      and st.session_state["mix"].get("analysis") != st.session_state.get("analysis_job")):
    ui.set_mix(ui.first_mix(choices, analysis))  # an empty table starts from an analysis made since
mix = st.session_state["mix"]

with st.container(border=True):
    presets = workspace.list_presets()
    left, middle = st.columns([2, 1], vertical_alignment="bottom")
    chosen = left.selectbox("Preset", presets, index=None, placeholder="saved plans", key="mix_preset")
    if middle.button("Load", disabled=chosen is None):
        with ui.shown_errors():
            ui.set_mix(workspace.table_from_plan(workspace.load_preset(chosen, choices), choices))
            st.rerun()


labels = choices.labels
base = st.selectbox("Base model", labels, index=labels.index(mix["base"]) if mix["base"] in labels else 0,
                    key=f"mix_base_{mix['version']}")
if broken := workspace.unreadable([choices.path(base)]):  # one message, and no plan on a base merge cannot read
    st.error(f"{broken.popitem()[1]}: choose another base model")
    st.stop()
caption_column, fill_column, optimize_column = st.columns([2, 1, 1], vertical_alignment="bottom")
caption_column.caption("One row per model: its delta is alpha × (model − delta-from). Add rows at the bottom, "
                       "delete by selecting a row's left edge.")
fill = fill_column.button("Auto-fill", icon=":material/format_list_bulleted:", key="mix_autofill",
                          disabled=analysis is None, width="stretch",
                          help="each model's parent as its delta-from, redundant rows off, very new ones twice (the "
                               "reasons go to 'info'); the method, its options, the texture and block alphas stay")
optimize = optimize_column.button("Optimize rows", icon=":material/auto_fix_high:", key="mix_optimize",
                                  disabled=analysis is None, width="stretch",
                                  help="the auto-fill, then a search for the delta-froms that make the rows most "
                                       "orthogonal (the reasons go to 'info'); the method, its options, the "
                                       "texture and block alphas stay")
if fill or optimize:
    with ui.shown_errors():
        proposed = workspace.optimized_mix(analysis[1], mix["method"], mix, choices, search=optimize)
        ui.set_mix(proposed, notice=workspace.mix_changes(mix, proposed, "Optimize rows" if optimize else "Auto-fill"))
        st.rerun()
ui.show_mix_notice()
edited = st.data_editor(
    workspace.table_frame(mix["rows"]),
    key=f"mix_rows_{mix['version']}",
    num_rows="dynamic",
    hide_index=True,
    column_config={
        "enabled": st.column_config.CheckboxColumn("enabled", default=True),
        "model": st.column_config.SelectboxColumn("model", options=labels, required=True, width="large"),
        "delta_from": st.column_config.SelectboxColumn(
            "delta-from", options=[BASE_LABEL, *(label for label in labels if label != base)], default=BASE_LABEL,
            required=True, width="medium"
        ),
        "alpha": st.column_config.NumberColumn(
            "alpha", min_value=ALPHA_RANGE[0], max_value=ALPHA_RANGE[1], step=0.05, default=1.0, format="%.2f",
            help=f"the row's weight, {ALPHA_RANGE[0]:g} to {ALPHA_RANGE[1]:g} (outside: the nearest end)",
        ),
        "repeat": st.column_config.NumberColumn(
            "repeat", min_value=REPEAT_RANGE[0], max_value=REPEAT_RANGE[1], step=1, default=1,
            help=f"list the row this many times, {REPEAT_RANGE[0]} to {REPEAT_RANGE[1]}",
        ),
        "block_alphas": st.column_config.TextColumn(
            "block alphas", width="medium", default="",
            help="per block group: group=alpha, … (set them under Block alphas)",
        ),
        "info": st.column_config.TextColumn("info", width="large", default=""),
    },
)
rows = edited.to_dict("records")
with ui.shown_errors():
    if lora := workspace.lora_labels(rows, choices):
        st.caption(f"LoRA rows ({', '.join(lora)}): the delta is the LoRA's product, always from the base.")

method_column, texture_column = st.columns(2)
with method_column, st.container(border=True):
    method_names = list(METHODS)
    method = st.selectbox("Method", method_names, index=method_names.index(mix["method"]),
                          key=f"mix_method_{mix['version']}", help=METHODS[mix["method"]].summary)
    st.caption(METHODS[method].summary)
    # each method keeps its own settings while another is tried (its widgets are gone meanwhile)
    by_method = mix.setdefault("options_by_method", {mix["method"]: mix["options"]})
    options = {spec.name: ui.option_widget(spec, by_method.get(method, {}).get(spec.name),
                                           f"mix_{mix['version']}_{method}")
               for spec in METHODS[method].options}
    by_method[method] = options
with texture_column, st.container(border=True):
    texture_now = mix["texture"] or {}
    texture_model = st.selectbox("Texture model", labels, index=labels.index(texture_now["model"])
                                 if texture_now.get("model") in labels else None, placeholder="none",
                                 key=f"mix_texture_{mix['version']}", help="adds fine detail from this model's delta")
    texture_alpha = st.slider("Texture alpha", BETA.minimum or 0.0, 0.5, float(texture_now.get("alpha", 0.2)),
                              step=0.01, key=f"mix_texture_alpha_{mix['version']}")
    texture_mode = st.selectbox("Texture mode", TEXTURE_MODE.choices,
                                index=TEXTURE_MODE.choices.index(texture_now.get("mode", "add")),
                                key=f"mix_texture_mode_{mix['version']}", help=TEXTURE_MODE.help)
texture = {"model": texture_model, "alpha": texture_alpha, "mode": texture_mode} if texture_model else None

chosen_components = ui.components_panel(mix, choices, base)
mix.update(base=base, rows=rows, method=method, options=options, texture=texture, components=chosen_components)

st.subheader("Block alphas")
ui.block_alphas_panel(mix, rows, choices, base)

st.subheader("Predicted figures")
predicted = st.container()  # filled once the plan below is known to be valid

st.subheader("Plan")
plan = None
st.session_state.pop("plan", None)  # the Merge and Preview pages take the plan shown here, or none
if not rows:
    st.info("Add a row per model to the table above (or analyse models first: the Mixer starts from the analysis).")
else:
    with ui.shown_errors():
        plan = workspace.plan_from_table(base, rows, method, options, texture, choices, chosen_components)
        st.session_state["plan"] = plan
        ui.check_plan_inputs(plan)  # a row merge would refuse (another architecture, say): said here already
    if plan is not None:
        ui.remember_mix(plan)

with predicted:
    if analysis is None:
        st.info("Analyse the models first (Analyse page): survival and interference are predicted from the analysis.")
    elif rows and plan is None:
        st.info("The plan has a problem (see Plan below); figures are predicted for a plan that can be merged.")
    else:
        with ui.shown_errors():
            figures = ui.mix_figures(analysis, mix, choices)
            if figures is not None:
                ui.say_lost_rows(figures.survival)
                st.dataframe(figures.survival, hide_index=True)
                ui.say_repeat_scales(method, figures.survival)
                if len(figures.labels) > 1:
                    names = charts.short_names(figures.labels)
                    st.altair_chart(charts.heatmap(figures.interference, names, charts.INTERFERENCE,
                                                   "row interference"), width="content")
if plan is not None:
    save_column, name_column = st.columns([1, 2], vertical_alignment="bottom")
    name = name_column.text_input("Preset name", value=chosen or "", placeholder="my-mix", key="mix_preset_name")
    overwrite = name_column.checkbox("Replace a preset of that name")
    if save_column.button("Save preset", icon=":material/save:", key="mix_save"):
        with ui.shown_errors():
            path = workspace.save_preset(name, plan, overwrite=overwrite)
            st.success(f"saved {path}")
    with ui.shown_errors():
        stem = Path(name or "plan").stem
        recipe_tab, script_tab, json_tab = st.tabs(["Recipe (.mecha)", "Script (.py)", "Plan (.json)"])
        with recipe_tab:
            mecha = recipe.recipe_text(plan)
            st.download_button("Download recipe", mecha, f"{stem}.mecha", icon=":material/download:")
            st.code(mecha, language=None)
        with script_tab:
            script = recipe.script_text(plan)
            st.download_button("Download script", script, f"{stem}.py", icon=":material/download:")
            st.code(script, language="python")
        with json_tab:
            text = plan.to_json()
            st.download_button("Download plan", text, f"{stem}.json", icon=":material/download:")
            st.code(text, language="json")

with st.expander("Compare methods", icon=":material/compare_arrows:"):
    if analysis is None:
        st.info("Analyse the models first (Analyse page): the comparison is predicted from the analysis.")
    else:
        with ui.shown_errors():
            ui.method_comparison(analysis, mix, choices)

lora_open = ui.job_in_url(ui.LORA_URL) is not None
with st.expander("Extract LoRA", icon=":material/compress:", expanded=lora_open), ui.shown_errors():
    ui.extract_lora_panel(choices.with_folder(workspace.merges_dir()), base)
