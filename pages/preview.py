"""Preview: render a merged model through the user's ComfyUI with the architecture's built-in workflow."""

from __future__ import annotations

import streamlit as st

from ortho_mecha import comfy, ui, workspace
from ortho_mecha.workflows import BUILTIN_ARCHS, MAX_SEED, PreviewSettings

BROWSER_INT_MAX = 2**53 - 1  # the largest whole number a browser number input holds exactly

st.title("Preview")
st.caption(
    "Needs a running ComfyUI: its address in COMFYUI_API (default http://127.0.0.1:8188) and, so the merged "
    "file can be linked into its models folder, its install folder in COMFYUI_DIR. Without COMFYUI_DIR, copy "
    "the merged file into ComfyUI's models folder yourself."
)

merges = workspace.ModelChoices.scan((workspace.merges_dir(),))
if not merges.labels:
    st.info(f"No merged models yet in {workspace.merges_dir()}; merge a plan on the Merge page first.")
    st.stop()

analysis = ui.current_analysis()
analysed_arch = analysis[1]["arch"] if analysis is not None else None
with st.form("preview"):
    url = st.text_input("ComfyUI server", value=comfy.comfy_api())
    left, right = st.columns([2, 1])
    model = left.selectbox("Merged model", merges.labels)
    arch = right.selectbox("Architecture", BUILTIN_ARCHS,
                           index=BUILTIN_ARCHS.index(analysed_arch) if analysed_arch in BUILTIN_ARCHS else 0)
    prompt = st.text_area("Prompt", value="a photo of a red fox in the snow, detailed fur")
    negative = st.text_area("Negative prompt", value="blurry, low quality")
    seed = st.number_input("Seed", min_value=0, max_value=min(MAX_SEED, BROWSER_INT_MAX), value=0, step=1)
    run = st.form_submit_button("Render", type="primary", icon=":material/image:")

if run:
    with ui.shown_errors(), st.spinner("rendering in ComfyUI…"):
        result = comfy.run_preview(
            merges.path(model),
            arch,
            PreviewSettings(prompt=prompt, negative=negative, seed=int(seed)),
            client=comfy.ComfyClient(url),
            comfy=comfy.comfy_dir(),
        )
        st.session_state["preview_images"] = [image.data for image in result.images]
        st.session_state["preview_caption"] = f"{result.model_name} · {result.arch} · seed {result.seed}"
if st.session_state.get("preview_images"):
    images = st.session_state["preview_images"]
    st.image(images, caption=[st.session_state["preview_caption"]] * len(images))
