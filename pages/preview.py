"""Preview: render a merged model through the user's ComfyUI, or sweep a plan's alpha, as background jobs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import streamlit as st

from ortho_mecha import comfy, preview_job, security, ui, workspace
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.workflows import BUILTIN_ARCHS, DEFAULT_ALPHAS, MAX_SEED, PreviewSettings

BROWSER_INT_MAX = 2**53 - 1  # the largest whole number a browser number input holds exactly
MIXER_PLAN = "the Mixer's plan"

ui.require_app()
st.title("Preview")

models = ui.model_choices().with_folder(workspace.merges_dir())  # a merge, or any model to compare it with
served_here = not security.is_lan_address(st.get_option("server.address"))
# The fields start as the job in the URL ran (a reload, a second tab, a colleague see what made its images).
for url_name in (ui.PREVIEW_URL, ui.SWEEP_URL):
    job_id = ui.followed_job(url_name)
    if job_id and (st.session_state.get(f"fields_from_{url_name}") != job_id or "pv_prompt" not in st.session_state):
        with contextlib.suppress(OrthoMechaError):  # a job that cannot be read is said by its panel below
            params = ui.job_record(url_name, job_id)["params"]
            st.session_state.update(preview_job.page_fields(params, models))
            if served_here:
                st.session_state.update(pv_api=params["api"], pv_dir=params.get("comfy_dir") or "")
        st.session_state[f"fields_from_{url_name}"] = job_id
for key, default in (("pv_api", comfy.comfy_api()), ("pv_dir", os.environ.get("COMFYUI_DIR", "")), ("pv_seed", 0),
                     ("pv_prompt", "a photo of a red fox in the snow, detailed fur"),
                     ("pv_negative", "blurry, low quality"), ("sw_alphas", DEFAULT_ALPHAS), ("sw_name", "sweep")):
    st.session_state.setdefault(key, default)

with st.container(border=True):
    st.markdown("**ComfyUI**")
    left, right = st.columns(2)
    api = left.text_input("Server address (COMFYUI_API)", key="pv_api", disabled=not served_here)
    folder = right.text_input(
        "ComfyUI folder (COMFYUI_DIR)", key="pv_dir",
        placeholder="e.g. /opt/ComfyUI", help="the folder holding ComfyUI's models/: the model is linked into it "
        "for the render and unlinked afterwards; leave empty to copy the model into ComfyUI's models folder yourself",
        disabled=not served_here,
    )
    if not served_here:
        st.caption("Shared on the network: the address and folder are the server's COMFYUI_API and COMFYUI_DIR.")
    api, folder = preview_job.comfy_settings(st.get_option("server.address"), api, folder)

with st.container(border=True):
    st.markdown("**Render settings**")
    arch_column, seed_column, steps_column, cfg_column, size_column = st.columns([2, 2, 1, 1, 1.2])
    arch = arch_column.selectbox("Architecture", [preview_job.AUTO_ARCH, *BUILTIN_ARCHS], key="pv_arch",
                                 help="picks the built-in workflow; auto: the one the model's keys are those of "
                                      "(for a sweep, the plan's base)")
    seed = seed_column.number_input("Seed", min_value=0, max_value=min(MAX_SEED, BROWSER_INT_MAX), step=1,
                                    key="pv_seed")
    steps = steps_column.number_input("Steps", min_value=1, max_value=200, value=None, step=1, key="pv_steps",
                                      placeholder="default", help="empty: the architecture's default")
    cfg = cfg_column.number_input("CFG", min_value=0.0, max_value=30.0, value=None, step=0.5, key="pv_cfg",
                                  placeholder="default", help="empty: the architecture's default")
    size_text = size_column.text_input("Size", key="pv_size", placeholder="default",
                                       help="WIDTHxHEIGHT, e.g. 768x1024 (smaller renders faster); empty: the "
                                            "architecture's default (1024x1024, SD1.5 512x512)")
    prompt = st.text_area("Prompt", key="pv_prompt", height=80)
    negative = st.text_area("Negative prompt", key="pv_negative", height=68)
    clip_column, vae_column = st.columns(2)
    clip = clip_column.text_input("Text encoder file(s)", key="pv_clip", placeholder="auto: from what ComfyUI lists",
                                  help="file names as ComfyUI lists them, separated by commas (two for Flux.1: "
                                       "clip_l and t5xxl; none for SD1.5/SDXL checkpoints, which hold theirs); "
                                       "empty: picked for the architecture")
    vae = vae_column.text_input("VAE file", key="pv_vae", placeholder="auto: from what ComfyUI lists",
                                help="a file name as ComfyUI lists it; empty: picked for the architecture")
size, size_ok = None, False
with ui.shown_errors():
    size, size_ok = preview_job.page_size(size_text), True
settings = PreviewSettings(prompt=prompt, negative=negative, seed=int(seed),
                           steps=None if steps is None else int(steps), cfg=cfg, size=size,
                           clip=preview_job.file_list(clip), vae=vae.strip() or None)

one, sweep = st.tabs(["One model", "Alpha sweep"])

with one:
    if not models.labels:
        st.info(f"No model files under the model folders or in {workspace.merges_dir()}; merge a plan on the Merge "
                "page first.")
    else:
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        if latest := ui.latest_merge(models):  # the merge just made, not the first name in the folders
            st.session_state.setdefault("pv_model", latest)
        model = left.selectbox("Model", models.labels, key="pv_model",
                               help="a merge, or any model under the model folders (its base or an input, say)")
        with st.expander("Your own workflow (optional)", icon=":material/account_tree:"):
            st.caption('A workflow exported from ComfyUI with "Save (API)", or an image ComfyUI saved (it holds the '
                       "workflow that made it). The model and prompt (and, unless it keeps its own, the negative "
                       "prompt and seed) go where it takes them: found by ortho-mecha, or the NODE.INPUT you mark "
                       "(e.g. 4.ckpt_name; several prompt, negative or seed inputs comma-separated, e.g. "
                       "6.text,15.text for a refiner's too). Architecture, steps, CFG, size, text encoders and VAE "
                       "above do not apply to it.")
            uploaded = st.file_uploader("Workflow (API format .json, or a PNG ComfyUI saved)", type=["json", "png"],
                                        key="pv_workflow")
            mark_columns = st.columns(len(preview_job.MARK_ROLES))
            marks = {role: column.text_input(f"{role} input", key=f"pv_mark_{role}", placeholder="detected")
                     for role, column in zip(preview_job.MARK_ROLES, mark_columns, strict=True)}
            keep_own = st.checkbox("Keep the workflow's own seed and negative prompt", value=True, key="pv_keep_own",
                                   help="unticked: the Seed and Negative prompt above replace them")
            own = None
            if uploaded is not None:
                with ui.shown_errors():
                    own = preview_job.user_workflow(uploaded.getvalue(), uploaded.name, marks, keep_own)
                    st.caption(f"{uploaded.name}: {len(own.graph)} nodes; it will be used for this render.")
        if uploaded is None:  # the built-in workflow of the chosen architecture
            with ui.shown_errors():
                if note := preview_job.arch_note(models.path(model), arch):
                    (st.warning if note.warning else st.caption)(note.text)
                for doubt in preview_job.file_doubts(models.path(model), arch, settings):
                    st.warning(doubt)
        if right.button("Render", type="primary", icon=":material/image:", key="pv_render", width="stretch",
                        disabled=not size_ok):  # a size that cannot be read says why above
            with ui.shown_errors():
                if uploaded is not None and own is None:
                    raise OrthoMechaError(f"{uploaded.name}: fix the workflow (see above) or remove it")
                server, comfy_folder = ui.connect_comfy(api, folder)
                render_arch = preview_job.page_arch(arch, models.path(model), workflow=own is not None)
                params = preview_job.preview_params(models.path(model), render_arch, settings, server, comfy_folder,
                                                    own, choice=arch)
                ui.start_job("preview", params, ui.PREVIEW_URL, heavy=False)
                st.rerun()
    record = ui.job_panel(ui.PREVIEW_URL, "preview")
    if record is not None and record["state"] == "done":
        result = record["result"]
        caption = f"{Path(result['model']).name} · {result['arch']} · seed {result['seed']}"
        with ui.shown_errors():
            st.image(result["images"], caption=[caption] * len(result["images"]))
        st.caption("saved as " + ", ".join(f"`{path}`" for path in result["images"]))

with sweep:
    st.caption("Merges the plan at each global alpha (into merges/sweeps/NAME/), previews every merge with the same "
               "seed and lays the images out in one grid; optionally the base and each model too.")
    plans = ([MIXER_PLAN] if "plan" in st.session_state else []) + workspace.list_presets()
    if not plans:
        st.info("Make a plan on the Mixer page (or save one as a preset) to sweep it.")
    else:
        source_column, alphas_column, name_column = st.columns([2, 1, 1])
        source = source_column.selectbox("Plan", plans, key="sw_plan", help="the Mixer's current plan or a preset")
        alphas = alphas_column.text_input("Alphas", key="sw_alphas",
                                          help="global alphas from 0 to 2, separated by commas")
        name = name_column.text_input("Sweep name", key="sw_name",
                                      help="the folder merges/sweeps/NAME/ gets the merges, images and grid")
        compare = st.checkbox("Also preview the base and each model", key="sw_compare")
        swept = form_ok = None
        with ui.shown_errors():
            preview_job.check_sweep_form(alphas, name)
            form_ok = True
        with ui.shown_errors():
            swept = (st.session_state["plan"] if source == MIXER_PLAN  # (files left out are warned on the Mixer)
                     else workspace.load_preset(source, workspace.ModelChoices.scan()))
            if note := preview_job.arch_note(swept.base, arch, keys="the base's keys"):
                (st.warning if note.warning else st.caption)(note.text)
            for doubt in preview_job.file_doubts(swept.base, arch, settings):
                st.warning(doubt)
        if st.button("Run the sweep", type="primary", icon=":material/view_column:", key="sw_start",
                     disabled=swept is None or not form_ok or not size_ok):  # what cannot be run says why above
            with ui.shown_errors():
                server, comfy_folder = ui.connect_comfy(api, folder)
                sweep_arch = preview_job.page_arch(arch, swept.base)
                params = preview_job.sweep_params(swept, name, alphas, sweep_arch, settings, server, comfy_folder,
                                                  compare, choice=arch)
                ui.start_job("sweep", params, ui.SWEEP_URL)
                st.rerun()
    record = ui.job_panel(ui.SWEEP_URL, "sweep")
    if record is not None and record["state"] == "done":
        result = record["result"]
        with ui.shown_errors():
            st.image(result["grid"], caption=" · ".join(cell["label"] for cell in result["cells"]))
        st.caption(f"grid saved as `{result['grid']}`")
