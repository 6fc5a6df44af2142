"""Previews as background jobs (``ortho_mecha.preview_job``) and the Preview page, against the stand-in ComfyUI."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from ortho_mecha import preview_job, ui
from ortho_mecha.comfy import link_name
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.jobs import Cancelled
from ortho_mecha.workflows import PreviewSettings
from tests.comfy_stub import ComfyStub, comfy_stub_fixture  # noqa: F401 - the comfy_stub fixture
from tests.test_app import _app, _errors, _until, workspace  # noqa: F401 - the workspace fixture
from tests.test_comfy import FLUX_KEYS, linked, write_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = PreviewSettings("a lighthouse at dusk", negative="fog", seed=7, steps=4, cfg=2.5, size=(512, 768))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_settings_survive_the_job_parameters() -> None:
    data = preview_job.settings_params(SETTINGS)
    assert data["size"] == [512, 768]
    assert preview_job._settings(data, "preview") == SETTINGS
    with pytest.raises(OrthoMechaError, match="unknown setting"):
        preview_job._settings({**data, "sampler": "euler"}, "preview")



@pytest.mark.parametrize("choice", ["auto", "sd1", None])
def test_the_architecture_field_comes_back_as_the_user_chose_it(tmp_path: Path, choice: str | None) -> None:
    """A render with Architecture "auto" shows "auto" again beside its images, not the family it found (which
    would then apply to the next model of another family); a job of an older version shows its architecture."""
    model = write_model(tmp_path / "m.safetensors")
    params = preview_job.preview_params(model, "sd1", SETTINGS, "http://127.0.0.1:8188", None, choice=choice)
    assert params["arch"] == "sd1"
    assert preview_job.page_fields(params)["pv_arch"] == (choice or "sd1")
    params.pop("arch_choice")
    assert preview_job.page_fields(params)["pv_arch"] == "sd1"

def test_connect_checks_address_folder_and_server(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    assert preview_job.connect(comfy_stub.url + "/", str(comfy_stub.root)) == (comfy_stub.url, str(comfy_stub.root))
    assert preview_job.connect(comfy_stub.url, "  ") == (comfy_stub.url, None)
    with pytest.raises(OrthoMechaError, match="not reachable"):
        preview_job.connect(closed_port_url(), "")
    with pytest.raises(OrthoMechaError, match="must start with http"):
        preview_job.connect("127.0.0.1:8188", "")
    with pytest.raises(OrthoMechaError, match="not a ComfyUI folder"):
        preview_job.connect(comfy_stub.url, str(tmp_path))


def test_preview_job_saves_images_beside_a_merge(
    comfy_stub: ComfyStub, workspace: Path  # noqa: F811
) -> None:
    model = write_model(workspace / "merges" / "mix.safetensors")
    params = preview_job.preview_params(model, "sd1", SETTINGS, comfy_stub.url, str(comfy_stub.root))
    messages: list[str] = []
    result = preview_job.run_job(params, lambda info: messages.append(info["message"]))
    assert [Path(p).name for p in result["images"]] == ["mix_seed7_001.png"]
    assert Path(result["images"][0]).read_bytes().startswith(PNG_SIGNATURE)
    assert Path(result["images"][0]).parent == model.parent
    assert result["seed"] == 7 and result["arch"] == "sd1"
    sent = comfy_stub.received[-1]["prompt"]
    sampler = next(node["inputs"] for node in sent.values() if node["class_type"] == "KSampler")
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (7, 4, 2.5)
    assert linked(comfy_stub.root, model) == []  # the link is gone again
    assert messages[0].startswith("sending mix.safetensors")


def test_preview_job_saves_images_of_another_model_in_the_workspace(
    comfy_stub: ComfyStub, workspace: Path  # noqa: F811
) -> None:
    """The images of a model in ComfyUI's models folder were written there, beside it (QA7 finding 4): into a
    folder that is ComfyUI's, or read-only, which fails only after the render."""
    model = write_model(comfy_stub.root / "models" / "checkpoints" / "theirs.safetensors")
    before = sorted((comfy_stub.root / "models").rglob("*"))
    params = preview_job.preview_params(model, "sd1", SETTINGS, comfy_stub.url, str(comfy_stub.root))
    result = preview_job.run_job(params, lambda info: None)
    assert [Path(p).parent for p in result["images"]] == [workspace / "previews"]
    assert Path(result["images"][0]).name == "theirs_seed7_001.png"
    assert sorted((comfy_stub.root / "models").rglob("*")) == before


def test_preview_job_renders_with_an_uploaded_workflow(
    comfy_stub: ComfyStub, workspace: Path  # noqa: F811
) -> None:
    from tests.test_comfy import user_graph

    model = write_model(workspace / "merges" / "mix.safetensors")
    graph = user_graph(seed=["prim", 0]) | {"prim": {"class_type": "PrimitiveInt", "inputs": {"value": 3}}}
    upload = json.dumps(graph).encode()
    with pytest.raises(OrthoMechaError, match=r"mine\.json: .*not valid JSON"):
        preview_job.user_workflow(b"{nope", "mine.json")
    with pytest.raises(OrthoMechaError, match=r"mine\.json"):  # a mark that names no input of the workflow
        preview_job.user_workflow(upload, "mine.json", {"seed": "nowhere.seed"})
    own = preview_job.user_workflow(upload, "mine.json", {"prompt": "pos.text", "seed": " "}, keep_own=False)
    settings = PreviewSettings("a red fox", negative="blurry", seed=11)
    with pytest.raises(OrthoMechaError, match="steps, CFG, size, text encoders and VAE come from your own workflow"):
        preview_job.preview_params(model, "sd1", SETTINGS, comfy_stub.url, str(comfy_stub.root), own)
    kept = preview_job.preview_params(model, "sd1", settings, comfy_stub.url, str(comfy_stub.root),
                                      preview_job.user_workflow(upload, "mine.json", {"prompt": "pos.text"}))
    assert (kept["settings"]["negative"], kept["settings"]["seed"]) == (None, None)  # the workflow keeps its own
    params = preview_job.preview_params(model, "sd1", settings, comfy_stub.url, str(comfy_stub.root), own)
    assert params["settings"]["negative"] == "blurry" and params["marks"]["prompt"] == "pos.text"
    json.dumps(params)  # a job's parameters are plain JSON
    result = preview_job.run_job(params, lambda info: None)
    sent = comfy_stub.received[-1]["prompt"]
    assert sent["ckpt"]["inputs"]["ckpt_name"] == link_name(model)
    assert sent["pos"]["inputs"]["text"] == "a red fox" and sent["prim"]["inputs"]["value"] == 11
    assert sent["neg"]["inputs"]["text"] == "blurry"
    assert [Path(p).name for p in result["images"]] == ["mix_seed11_001.png"]


def assert_interrupted(stub: ComfyStub) -> None:
    """The stand-in's one prompt was running and was interrupted (not left to finish)."""
    deadline = time.monotonic() + 10
    while not stub.history and time.monotonic() < deadline:
        time.sleep(0.05)
    (prompt_id, entry), = stub.history.items()
    assert stub.interrupts == [{"prompt_id": prompt_id}]
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_cancelling_a_preview_job_cancels_the_prompt_in_comfyui(tmp_path: Path) -> None:
    stub = ComfyStub(tmp_path / "ComfyUI", delay=60.0)
    stub.add_standard_files()
    stub.start()
    try:
        model = write_model(tmp_path / "merges" / "slow.safetensors")
        params = preview_job.preview_params(model, "sd1", SETTINGS, stub.url, str(stub.root))
        def progress(info: dict) -> None:
            if "in ComfyUI" in info["message"] and not info["message"].startswith("sending"):
                raise Cancelled("cancel requested")

        with pytest.raises(Cancelled):
            preview_job.run_job(params, progress)
        assert_interrupted(stub)
        assert linked(stub.root, model) == []
    finally:
        stub.stop()


def test_cancelling_a_sweep_job_cancels_its_prompt_in_comfyui(tmp_path: Path) -> None:
    """The sweep's preview ran on in ComfyUI after its job was cancelled, blocking the queue (QA7 finding 1)."""
    from tests.test_sweep import write_plan

    stub = ComfyStub(tmp_path / "ComfyUI", delay=60.0)
    stub.add_standard_files()
    stub.start()
    try:
        out = tmp_path / "sweep"
        out.mkdir()
        params = {"plan": str(write_plan(tmp_path)), "alphas": [1.0], "out": str(out), "arch": "sdxl",
                  "settings": preview_job.settings_params(SETTINGS), "api": stub.url, "comfy_dir": str(stub.root)}

        def progress(info: dict) -> None:
            if info.get("message", "").endswith("running"):
                raise Cancelled("cancel requested")

        with pytest.raises(Cancelled):
            preview_job.sweep_job(params, progress)
        assert_interrupted(stub)
    finally:
        stub.stop()


def test_sweep_parameters_are_checked_before_the_job(tmp_path: Path, make_family) -> None:
    from ortho_mecha.plan import plan_from_dict

    paths = make_family(members=["base", "anime"])
    plan = plan_from_dict({"base": str(paths["base"]), "method": "ortho_superpose",
                           "rows": [{"model": str(paths["anime"])}]}, tmp_path)
    ws = tmp_path / "ws"
    params = preview_job.sweep_params(plan, "first try", "1, 0.5", "sdxl", SETTINGS, "http://127.0.0.1:1", None,
                                      True, workspace_dir=ws)
    folder = ws / "merges" / "sweeps" / "first try"
    assert params["alphas"] == [1.0, 0.5] and params["out"] == str(folder) and params["compare"] is True
    assert (folder / "first try.json").is_file()
    with pytest.raises(OrthoMechaError, match="between 0 and 2"):
        preview_job.sweep_params(plan, "x", "3", "sdxl", SETTINGS, "http://h", None, False, workspace_dir=ws)
    with pytest.raises(OrthoMechaError, match=r"sweep name '\.\./up' may only use letters"):
        preview_job.sweep_params(plan, "../up", "1", "sdxl", SETTINGS, "http://h", None, False, workspace_dir=ws)
    with pytest.raises(OrthoMechaError, match="the sweep needs a name"):
        preview_job.sweep_params(plan, " ", "1", "sdxl", SETTINGS, "http://h", None, False, workspace_dir=ws)
    (folder / "first try_sweep.png").write_bytes(PNG_SIGNATURE)
    with pytest.raises(OrthoMechaError, match="done already"):
        preview_job.sweep_params(plan, "first try", "1", "sdxl", SETTINGS, "http://h", None, False, workspace_dir=ws)


def _page(monkeypatch: pytest.MonkeyPatch, stub: ComfyStub) -> AppTest:
    monkeypatch.setenv("COMFYUI_API", stub.url)
    monkeypatch.setenv("COMFYUI_DIR", str(stub.root))
    at = _app()
    at.switch_page(ui.PAGES[3].path).run()
    assert not at.exception and not _errors(at)
    return at


def test_preview_page_renders_a_merge_in_the_background(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    write_model(workspace / "merges" / "tiny.safetensors")
    write_model(workspace / "models" / "an input.safetensors")  # any model can be previewed, to compare with
    at = _page(monkeypatch, comfy_stub)
    assert at.text_input(key="pv_api").value == comfy_stub.url
    assert at.selectbox(key="pv_model").options == ["merges/tiny.safetensors", "models/an input.safetensors"]
    at.selectbox(key="pv_arch").set_value("sd1")
    at.button(key="pv_render").click().run()
    assert not _errors(at)
    assert len(at.query_params["preview"]) == 32
    _until(at, lambda a: a.get("image"), "the preview images")
    assert not _errors(at)
    assert (workspace / "merges" / "tiny_seed0_001.png").read_bytes().startswith(PNG_SIGNATURE)
    assert any("tiny_seed0_001.png" in caption.value for caption in at.caption)


def test_a_preview_link_shows_the_settings_that_made_its_images(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A reload, a second tab or a colleague opening ?preview=<id> sees the prompt, seed and size of the render,
    not the page's defaults beside its images."""
    write_model(workspace / "merges" / "first.safetensors")
    write_model(workspace / "merges" / "second.safetensors")
    at = _page(monkeypatch, comfy_stub)
    typed = {"pv_prompt": "a watercolor cat on a roof", "pv_negative": "text, watermark", "pv_size": "512x768"}
    at.selectbox(key="pv_model").set_value("merges/second.safetensors")
    at.selectbox(key="pv_arch").set_value("sd1")
    at.number_input(key="pv_seed").set_value(1234)
    for key, text in typed.items():
        (at.text_area if key != "pv_size" else at.text_input)(key=key).set_value(text)
    at.button(key="pv_render").click().run()
    job_id = at.query_params["preview"]
    _until(at, lambda a: a.get("image"), "the preview images")

    other = _app()
    other.query_params["preview"] = job_id
    other.switch_page(ui.PAGES[3].path).run()
    assert not other.exception and not _errors(other)
    assert {key: (other.text_area if key != "pv_size" else other.text_input)(key=key).value for key in typed} == typed
    assert other.number_input(key="pv_seed").value == 1234 and other.selectbox(key="pv_arch").value == "sd1"
    assert other.selectbox(key="pv_model").value == "merges/second.safetensors"
    assert other.get("image")


def test_preview_page_renders_with_an_uploaded_workflow(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    from tests.test_comfy import user_graph

    write_model(workspace / "merges" / "tiny.safetensors")
    at = _page(monkeypatch, comfy_stub)
    uploader = next(widget for widget in at.get("file_uploader") if "Workflow" in widget.label)
    uploader.set_value(("ui.json", b'{"nodes": [], "links": []}', "application/json")).run()
    assert any("ui.json: this is a UI-format workflow" in error for error in _errors(at))
    uploader = next(widget for widget in at.get("file_uploader") if "Workflow" in widget.label)
    uploader.set_value(("mine.json", json.dumps(user_graph(seed=5)).encode(), "application/json")).run()
    assert not _errors(at)
    assert any("mine.json: 7 nodes" in caption.value for caption in at.caption)
    at.text_input(key="pv_vae").set_value("ae.safetensors").run()
    at.button(key="pv_render").click().run()
    assert any("text encoders and VAE come from your own workflow" in error for error in _errors(at))
    at.text_input(key="pv_vae").set_value("").run()
    at.button(key="pv_render").click().run()
    assert not _errors(at)
    _until(at, lambda a: a.get("image"), "the preview images")
    sent = comfy_stub.received[-1]["prompt"]
    assert sent["ckpt"]["inputs"]["ckpt_name"] == link_name(workspace / "merges" / "tiny.safetensors")
    assert sent["ks"]["inputs"]["scheduler"] == "karras"


@pytest.mark.parametrize(("field", "text", "node", "inputs", "expected"), [
    ("pv_vae", " ae.safetensors ", "VAELoader", ("vae_name",), ("ae.safetensors",)),
    ("pv_size", "640 x 384", "EmptyLatentImage", ("width", "height"), (640, 384)),
])
def test_preview_page_passes_its_fields_to_the_workflow(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    field: str, text: str, node: str, inputs: tuple[str, ...], expected: tuple,
) -> None:
    write_model(workspace / "merges" / "tiny.safetensors")
    at = _page(monkeypatch, comfy_stub)
    at.selectbox(key="pv_arch").set_value("sd1")
    at.text_input(key=field).set_value(text).run()
    at.button(key="pv_render").click().run()
    assert not _errors(at)
    _until(at, lambda a: a.get("image"), "the preview images")
    sent = comfy_stub.received[-1]["prompt"]
    assert [tuple(n["inputs"][name] for name in inputs) for n in sent.values() if n["class_type"] == node] == [
        expected]


def test_the_page_checks_its_size_and_file_fields(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    write_model(workspace / "merges" / "tiny.safetensors")
    at = _page(monkeypatch, comfy_stub)
    at.text_input(key="pv_size").set_value("big").run()
    assert any("size 'big' is not WIDTHxHEIGHT" in error for error in _errors(at))
    assert at.button(key="pv_render").disabled
    assert preview_job.file_list(" a.safetensors, ,b.safetensors ") == ("a.safetensors", "b.safetensors")


def test_the_page_warns_when_the_model_is_of_another_architecture(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    flux = write_model(workspace / "merges" / "fluxy.safetensors", FLUX_KEYS)
    assert preview_job.arch_note(flux, "flux1") is None
    assert preview_job.arch_note(flux, "auto") == preview_job.ArchNote("Architecture: flux1, from its keys", False)
    mismatch = preview_job.arch_note(flux, "sdxl")
    assert mismatch.warning and "has the keys of flux1, but Architecture is sdxl" in mismatch.text
    custom = write_model(workspace / "other" / "custom.safetensors")
    assert preview_job.arch_note(custom, "sdxl") is None
    unknown = preview_job.arch_note(custom, "auto")
    assert unknown.warning and "custom.safetensors: its keys match none" in unknown.text
    assert preview_job.page_arch("auto", flux) == "flux1" and preview_job.page_arch("chroma-flow", custom) == "chroma"
    assert preview_job.page_arch("auto", custom, workflow=True) == "custom"  # the user's own workflow renders it
    with pytest.raises(OrthoMechaError, match="choose one under Architecture, or use your own workflow"):
        preview_job.page_arch("auto", custom)
    at = _page(monkeypatch, comfy_stub)
    assert at.selectbox(key="pv_arch").value == "auto"
    assert "Architecture: flux1, from its keys" in [c.value for c in at.caption]
    at.selectbox(key="pv_arch").set_value("sd1").run()
    assert any("fluxy.safetensors has the keys of flux1, but Architecture is sd1" in w.value for w in at.warning)
    at.selectbox(key="pv_arch").set_value("flux1").run()
    assert not at.warning
    at.text_input(key="pv_vae").set_value("flux2-vae.safetensors").run()  # Flux.2's VAE for a Flux.1 model
    named = PreviewSettings("", vae="flux2-vae.safetensors")
    assert [w.value for w in at.warning] == preview_job.file_doubts(flux, "flux1", named)
    assert "the VAE 'flux2-vae.safetensors' is named like another model's file" in at.warning[0].value


def test_preview_page_says_when_comfyui_is_down(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    write_model(workspace / "merges" / "tiny.safetensors")
    at = _page(monkeypatch, comfy_stub)
    at.text_input(key="pv_api").set_value(closed_port_url()).run()
    at.button(key="pv_render").click().run()
    assert not at.exception
    errors = _errors(at)
    assert len(errors) == 1 and "is not reachable" in errors[0]
    assert "preview" not in at.query_params  # no job was queued


def test_preview_page_names_a_missing_node(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    write_model(workspace / "merges" / "tiny.safetensors")
    comfy_stub.missing_classes.add("CheckpointLoaderSimple")
    at = _page(monkeypatch, comfy_stub)
    at.selectbox(key="pv_arch").set_value("sd1")
    at.button(key="pv_render").click().run()
    _until(at, lambda a: _errors(a), "the failed preview")
    assert "has no node 'CheckpointLoaderSimple'" in _errors(at)[0]
    assert "Alpha sweep" in [tab.label for tab in at.tabs]  # the rest of the page keeps working
    at.text_area(key="pv_prompt").set_value("another").run()
    assert not at.exception

