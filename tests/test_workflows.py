"""The built-in ComfyUI workflows and the user's own: structure, defaults, file choice, bindings.

Every built-in graph is checked against the stand-in server's realistic /object_info and queued
through its POST /prompt validation (tests/comfy_stub.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ortho_mecha.comfy import ComfyClient, combo_options, find_problems, input_spec
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.workflows import (
    BUILTIN_ARCHS,
    QWEN3_4B,
    SPECS,
    T5XXL,
    ModelFacts,
    PreviewSettings,
    Target,
    apply_bindings,
    arch_spec,
    build_workflow,
    find_bindings,
    load_workflow,
    named_file_doubts,
    parse_size,
    pick_file,
    resolve,
)
from tests.comfy_stub import ComfyStub, comfy_stub_fixture  # noqa: F401 - the comfy_stub fixture

TEXT_ENCODERS = ["clip_l.safetensors", "t5xxl_fp16.safetensors", "qwen_3_4b.safetensors"]
VAES = ["ae.safetensors", "flux2-vae.safetensors", "pixel_space"]
SETTINGS = PreviewSettings(prompt="a red fox in snow")

# The node classes of each family's official template (COMFYUI.md, "Official template graphs").
EXPECTED_CLASSES = {
    "sd1": {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"},
    "sdxl": {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSamplerAdvanced", "VAEDecode",
             "SaveImage"},
    "flux1": {"UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "ConditioningZeroOut",
              "EmptySD3LatentImage", "KSampler", "VAEDecode", "SaveImage"},
    "flux2-klein": {"UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "CFGGuider", "KSamplerSelect",
                    "Flux2Scheduler", "RandomNoise", "EmptyFlux2LatentImage", "SamplerCustomAdvanced", "VAEDecode",
                    "SaveImage"},
    "chroma": {"UNETLoader", "CLIPLoader", "T5TokenizerOptions", "ModelSamplingAuraFlow", "VAELoader",
               "CLIPTextEncode", "CFGGuider", "KSamplerSelect", "BasicScheduler", "RandomNoise",
               "EmptySD3LatentImage", "SamplerCustomAdvanced", "VAEDecode", "SaveImage"},
    "zimage": {"UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingAuraFlow", "CLIPTextEncode",
               "EmptySD3LatentImage", "KSampler", "VAEDecode", "SaveImage"},
}  # fmt: skip


NO_FACTS = ModelFacts()


def built(arch: str, settings: PreviewSettings = SETTINGS, facts: ModelFacts = NO_FACTS) -> dict:
    resolved = resolve(arch_spec(arch), settings, TEXT_ENCODERS, VAES, facts)
    return build_workflow(arch, "merged.safetensors", resolved)


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [node for node in graph.values() if node["class_type"] == class_type]


def one(graph: dict, class_type: str) -> dict:
    found = nodes_of(graph, class_type)
    assert len(found) == 1, f"{len(found)} {class_type} nodes"
    return found[0]["inputs"]


# --------------------------------------------------------------------------------------------------
# Built-in graphs against the stand-in server


@pytest.mark.parametrize("arch", BUILTIN_ARCHS)
def test_builtin_workflow_validates_and_is_accepted(arch: str, comfy_stub: ComfyStub) -> None:
    comfy_stub.add_file(SPECS[arch].model_folder, "merged.safetensors")
    info = comfy_stub.object_info()
    graph = built(arch)
    assert {node["class_type"] for node in graph.values()} == EXPECTED_CLASSES[arch]
    assert find_problems(graph, info) == []
    prompt_id = ComfyClient(comfy_stub.url, timeout=5).queue_prompt(graph)
    assert comfy_stub.received[-1]["prompt"] == graph
    assert len(prompt_id) == 36


@pytest.mark.parametrize("arch", BUILTIN_ARCHS)
def test_builtin_workflow_links_point_at_outputs_of_the_right_type(arch: str, comfy_stub: ComfyStub) -> None:
    info = comfy_stub.object_info()
    graph = built(arch)
    for node in graph.values():
        spec = info[node["class_type"]]["input"]
        wanted = {**spec["required"], **spec.get("optional", {})}
        for name, value in node["inputs"].items():
            assert name in wanted, f"{node['class_type']} has no input {name}"
            if isinstance(value, list):
                source = info[graph[value[0]]["class_type"]]
                assert source["output"][value[1]] == wanted[name][0]


def test_model_loader_and_name_per_family() -> None:
    assert one(built("sd1"), "CheckpointLoaderSimple") == {"ckpt_name": "merged.safetensors"}
    assert one(built("flux1"), "UNETLoader") == {"unet_name": "merged.safetensors", "weight_dtype": "default"}
    assert SPECS["sdxl"].model_folder == "checkpoints"
    assert {SPECS[a].model_folder for a in ("flux1", "flux2-klein", "chroma", "zimage")} == {"diffusion_models"}


def test_template_defaults() -> None:
    z = built("zimage")
    assert one(z, "ModelSamplingAuraFlow")["shift"] == 3.0
    k = one(z, "KSampler")
    assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (25, 4.0, "res_multistep", "simple")
    assert one(z, "CLIPLoader") == {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"}
    assert one(z, "EmptySD3LatentImage") == {"width": 1024, "height": 1024, "batch_size": 1}

    c = built("chroma")
    assert one(c, "CLIPLoader") == {"clip_name": "t5xxl_fp16.safetensors", "type": "chroma"}
    assert one(c, "T5TokenizerOptions")["min_padding"] == 0
    assert one(c, "ModelSamplingAuraFlow")["shift"] == 1.0
    assert one(c, "CFGGuider")["cfg"] == 3.5
    assert {k: v for k, v in one(c, "BasicScheduler").items() if k != "model"} == {
        "scheduler": "beta", "steps": 26, "denoise": 1.0,
    }  # fmt: skip
    assert one(c, "KSamplerSelect") == {"sampler_name": "euler"}

    f2 = built("flux2-klein")
    assert one(f2, "CLIPLoader") == {"clip_name": "qwen_3_4b.safetensors", "type": "flux2"}
    assert one(f2, "VAELoader") == {"vae_name": "flux2-vae.safetensors"}
    assert one(f2, "Flux2Scheduler") == {"steps": 20, "width": 1024, "height": 1024}
    assert one(f2, "CFGGuider")["cfg"] == 5.0

    f1 = built("flux1")
    assert one(f1, "DualCLIPLoader") == {
        "clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
    }  # fmt: skip
    k = one(f1, "KSampler")
    assert (k["steps"], k["cfg"], k["sampler_name"], k["scheduler"]) == (20, 1.0, "euler", "simple")

    sdxl = one(built("sdxl"), "KSamplerAdvanced")
    assert (sdxl["steps"], sdxl["cfg"], sdxl["start_at_step"], sdxl["end_at_step"]) == (25, 8.0, 0, 10000)
    assert one(built("sd1"), "EmptyLatentImage") == {"width": 512, "height": 512, "batch_size": 1}


def test_overrides_reach_every_node_that_uses_them() -> None:
    settings = PreviewSettings("p", seed=1234, steps=4, cfg=1.0, size=(768, 512))
    f2 = built("flux2-klein", settings)
    assert one(f2, "Flux2Scheduler") == {"steps": 4, "width": 768, "height": 512}
    assert one(f2, "EmptyFlux2LatentImage") == {"width": 768, "height": 512, "batch_size": 1}
    assert one(f2, "RandomNoise") == {"noise_seed": 1234}
    assert one(f2, "CFGGuider")["cfg"] == 1.0
    sdxl = one(built("sdxl", settings), "KSamplerAdvanced")
    assert (sdxl["noise_seed"], sdxl["steps"], sdxl["cfg"]) == (1234, 4, 1.0)


def test_negative_prompt_node_per_family() -> None:
    def texts(graph: dict) -> list[str]:
        return sorted(node["inputs"]["text"] for node in nodes_of(graph, "CLIPTextEncode"))

    # Families whose templates encode a negative always do, empty when none is given.
    for arch in ("sd1", "sdxl", "chroma"):
        assert texts(built(arch)) == ["", "a red fox in snow"]
        assert not nodes_of(built(arch), "ConditioningZeroOut")
    # Flux.1 at cfg 1 zeroes it like its template; a given negative is encoded.
    assert texts(built("flux1")) == ["a red fox in snow"]
    zero = one(built("flux1"), "ConditioningZeroOut")
    assert built("flux1")[zero["conditioning"][0]]["class_type"] == "CLIPTextEncode"
    assert texts(built("flux1", PreviewSettings("p", negative="blurry"))) == ["blurry", "p"]
    # Klein / Z-Image: base defaults (cfg > 1) encode an empty negative; distilled settings (cfg 1) zero it.
    assert texts(built("zimage")) == ["", "a red fox in snow"]
    assert nodes_of(built("flux2-klein", PreviewSettings("p", steps=4, cfg=1.0)), "ConditioningZeroOut")
    assert nodes_of(built("zimage", PreviewSettings("p", steps=8, cfg=1.0)), "ConditioningZeroOut")


def test_checkpoint_families_decode_with_the_checkpoint_vae_unless_one_is_named() -> None:
    graph = built("sd1")
    decode = one(graph, "VAEDecode")
    assert graph[decode["vae"][0]]["class_type"] == "CheckpointLoaderSimple" and decode["vae"][1] == 2
    graph = built("sdxl", PreviewSettings("p", vae="sdxl_vae.safetensors"))
    assert one(graph, "VAELoader") == {"vae_name": "sdxl_vae.safetensors"}


# --------------------------------------------------------------------------------------------------
# Architectures, settings, file choice


def test_aliases_and_custom() -> None:
    assert arch_spec("chroma-flow") is SPECS["chroma"]
    assert arch_spec("zimage-base") is SPECS["zimage"]
    with pytest.raises(OrthoMechaError, match=r"no built-in ComfyUI workflow.*--workflow.*Save \(API\)"):
        arch_spec("custom")
    with pytest.raises(OrthoMechaError, match=r"unknown architecture 'sd3'.*sd1, sdxl"):
        arch_spec("sd3")


def test_settings_are_checked() -> None:
    with pytest.raises(OrthoMechaError, match="width 1000 does not fit flux1: use a multiple of 16"):
        built("flux1", PreviewSettings("p", size=(1000, 1024)))
    assert one(built("sd1", PreviewSettings("p", size=(520, 512))), "EmptyLatentImage")["width"] == 520
    with pytest.raises(OrthoMechaError, match="steps must be between 1 and 10000, got 0"):
        built("sd1", PreviewSettings("p", steps=0))
    with pytest.raises(OrthoMechaError, match="seed must be between 0 and"):
        built("sd1", PreviewSettings("p", seed=-1))
    with pytest.raises(OrthoMechaError, match="flux1 takes 2 --clip, but --clip was given 1 time"):
        built("flux1", PreviewSettings("p", clip=("t5xxl_fp16.safetensors",)))
    with pytest.raises(OrthoMechaError, match="sd1 takes no text encoder files"):
        built("sd1", PreviewSettings("p", clip=("clip_l.safetensors",)))


def test_parse_size() -> None:
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size(" 512 X 512 ") == (512, 512)
    with pytest.raises(OrthoMechaError, match="'1024' is not WIDTHxHEIGHT"):
        parse_size("1024")


@given(st.integers(1, 99999), st.integers(1, 99999))
def test_parse_size_round_trips(width: int, height: int) -> None:
    assert parse_size(f"{width}x{height}") == (width, height)


def test_pick_file_prefers_earlier_patterns_then_shorter_names() -> None:
    options = ["t5/t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp16.safetensors"]
    assert pick_file(options, T5XXL) == "t5xxl_fp16.safetensors"
    assert pick_file(["t5xxl_fp8_e4m3fn_scaled.safetensors"], T5XXL) == "t5xxl_fp8_e4m3fn_scaled.safetensors"
    assert pick_file(["qwen_3_4b_fp8_mixed.safetensors", "qwen_3_4b.safetensors"], QWEN3_4B) == "qwen_3_4b.safetensors"
    assert pick_file(["clip_l.safetensors"], QWEN3_4B) is None


@given(st.lists(st.sampled_from([*TEXT_ENCODERS, "t5xxl_fp8.sft", "x/t5xxl_fp16.safetensors", "other.bin"])))
def test_pick_file_returns_an_option_exactly_when_one_matches(options: list[str]) -> None:
    chosen = pick_file(options, T5XXL)
    assert (chosen is None) == (not any("t5xxl" in o for o in options))
    assert chosen is None or chosen in options


def test_missing_text_encoder_or_vae_names_what_to_get() -> None:
    with pytest.raises(OrthoMechaError, match=r"zimage workflow needs: a text encoder like qwen_3_4b\.safetensors"):
        resolve(arch_spec("zimage"), SETTINGS, ["clip_l.safetensors"], VAES)
    with pytest.raises(OrthoMechaError, match=r"flux2-klein workflow needs: a VAE like flux2-vae.safetensors[^;]*\. "
                                              r"Put them in ComfyUI's models/vae, or .*--vae"):  # only that folder
        resolve(arch_spec("flux2-klein"), SETTINGS, TEXT_ENCODERS, ["ae.safetensors"])
    with pytest.raises(OrthoMechaError, match=r"a text encoder like clip_l.*; a text encoder like t5xxl.*; a VAE"):
        resolve(arch_spec("flux1"), SETTINGS, [], [])  # a fresh ComfyUI: everything it lacks, in one message


def test_klein_text_encoder_follows_the_model_size() -> None:
    both = ["qwen_3_4b.safetensors", "qwen_3_8b_fp8mixed.safetensors"]
    spec = arch_spec("flux2-klein")
    assert resolve(spec, SETTINGS, both, VAES, ModelFacts(text_dim=7680)).text_encoders == ("qwen_3_4b.safetensors",)
    assert resolve(spec, SETTINGS, both, VAES, ModelFacts(text_dim=12288)).text_encoders == (
        "qwen_3_8b_fp8mixed.safetensors",
    )
    assert resolve(spec, SETTINGS, both[1:], VAES).text_encoders == ("qwen_3_8b_fp8mixed.safetensors",)
    with pytest.raises(OrthoMechaError, match=r"Klein 4B or 9B.*--clip"):
        resolve(spec, SETTINGS, both, VAES)
    with pytest.raises(OrthoMechaError, match="takes 1234 features"):
        resolve(spec, SETTINGS, both, VAES, ModelFacts(text_dim=1234))
    named = replace(SETTINGS, clip=("my_llm.safetensors",))  # what that message asks for: used as given
    assert resolve(spec, named, both, VAES, ModelFacts(text_dim=1234)).text_encoders == ("my_llm.safetensors",)


def test_flux1_schnell_gets_four_steps() -> None:
    assert one(built("flux1", facts=ModelFacts(guidance=False)), "KSampler")["steps"] == 4
    assert one(built("flux1", facts=ModelFacts(guidance=True)), "KSampler")["steps"] == 20


def test_flux1_dev_cfg_is_its_guidance_and_the_sampler_stays_at_cfg_1() -> None:
    """--cfg on Flux.1 dev set the KSampler's true CFG (twice the sampling, the negative switched on) while the
    distilled guidance stayed at ComfyUI's hidden 3.5; now it is the FluxGuidance, as on Flux.2 dev."""
    dev = ModelFacts(guidance=True)
    default = built("flux1", facts=dev)
    assert one(default, "FluxGuidance")["guidance"] == 3.5 and one(default, "KSampler")["cfg"] == 1.0
    assert nodes_of(default, "ConditioningZeroOut")
    chosen = built("flux1", PreviewSettings("p", cfg=2.5), facts=dev)
    assert one(chosen, "FluxGuidance")["guidance"] == 2.5 and one(chosen, "KSampler")["cfg"] == 1.0
    schnell = built("flux1", PreviewSettings("p", cfg=2.0), facts=ModelFacts(guidance=False))
    assert not nodes_of(schnell, "FluxGuidance") and one(schnell, "KSampler")["cfg"] == 2.0


# --------------------------------------------------------------------------------------------------
# The user's own workflow


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_ui_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    ui = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler", "widgets_values": [0, "randomize"]}], "links": []}
    with pytest.raises(OrthoMechaError, match=r"UI-format workflow.*Save \(API\)"):
        load_workflow(write(tmp_path / "ui.json", ui))
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(OrthoMechaError, match="not valid JSON"):
        load_workflow(tmp_path / "bad.json")
    with pytest.raises(OrthoMechaError, match="node '1' has no 'class_type'"):
        load_workflow(write(tmp_path / "odd.json", {"1": {"inputs": {}}}))


def test_a_workflow_is_read_from_a_bom_file_a_prompt_body_or_a_comfyui_png(tmp_path: Path) -> None:
    from PIL import Image, PngImagePlugin

    graph = built("sd1")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(graph).encode())  # as Windows editors save it
    assert load_workflow(bom) == graph
    assert load_workflow(write(tmp_path / "body.json", {"client_id": "x", "prompt": graph})) == graph
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("prompt", json.dumps(graph))  # what ComfyUI's SaveImage writes, beside a UI-format 'workflow'
    chunks.add_text("workflow", json.dumps({"nodes": [], "links": []}))
    Image.new("RGB", (8, 8)).save(tmp_path / "render.png", pnginfo=chunks)
    assert load_workflow(tmp_path / "render.png") == graph
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(OrthoMechaError, match=r"plain.png: this PNG holds no ComfyUI workflow"):
        load_workflow(tmp_path / "plain.png")
    numbered = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": [1, 0]}}}  # as a script may write a link
    assert load_workflow(write(tmp_path / "numbered.json", numbered))["2"]["inputs"]["images"] == ["1", 0]
    (tmp_path / "blob.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(OrthoMechaError, match="neither JSON text nor a PNG"):
        load_workflow(tmp_path / "blob.json")


def test_bindings_are_detected_in_each_builtin_graph() -> None:
    for arch in BUILTIN_ARCHS:
        graph = built(arch)
        bindings = find_bindings(graph)
        assert graph[bindings.model.node]["class_type"] in ("UNETLoader", "CheckpointLoaderSimple")
        assert graph[bindings.prompt.node]["inputs"]["text"] == "a red fox in snow"
        assert bindings.seed is not None and bindings.seed.input in ("seed", "noise_seed")
    assert find_bindings(built("flux1")).negative is None  # ConditioningZeroOut: no negative text
    chroma = built("chroma")
    assert chroma[find_bindings(chroma).negative.node]["inputs"]["text"] == ""


def test_apply_bindings_writes_the_values_into_a_copy() -> None:
    graph = built("sd1")
    bindings = find_bindings(graph)
    settings = PreviewSettings("an owl", negative="lowres", seed=99)
    out = apply_bindings(graph, bindings, "other.safetensors", settings)
    assert out[bindings.model.node]["inputs"]["ckpt_name"] == "other.safetensors"
    assert out[bindings.prompt.node]["inputs"]["text"] == "an owl"
    assert out[bindings.negative.node]["inputs"]["text"] == "lowres"
    assert out[bindings.seed.node]["inputs"]["seed"] == 99
    assert graph[bindings.model.node]["inputs"]["ckpt_name"] == "merged.safetensors"  # the input is untouched
    with pytest.raises(OrthoMechaError, match=r"no negative prompt input.*--set-negative"):
        apply_bindings(built("flux1"), find_bindings(built("flux1")), "m.safetensors", settings)


def test_ambiguous_and_explicit_bindings() -> None:
    graph = built("sd1")
    graph["90"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "refiner.safetensors"}}
    with pytest.raises(OrthoMechaError, match=r"several model loaders \(1\.ckpt_name, 90\.ckpt_name\).*--set-model"):
        find_bindings(graph)
    assert find_bindings(graph, model="90.ckpt_name").model == Target("90", "ckpt_name")
    with pytest.raises(OrthoMechaError, match="no node '77'"):
        find_bindings(graph, model="77.ckpt_name")
    with pytest.raises(OrthoMechaError, match=r"node 90 \(CheckpointLoaderSimple\) has no input 'unet_name'"):
        find_bindings(graph, model="90.unet_name")
    with pytest.raises(OrthoMechaError, match="is linked to node"):
        find_bindings(graph, model="90.ckpt_name", seed="5.model")
    with pytest.raises(OrthoMechaError, match=r"is not NODE\.INPUT"):
        find_bindings(graph, model="ckpt_name")


def test_several_seeds_matter_only_when_a_seed_is_given() -> None:
    """A base + refiner workflow has two seed inputs: without a seed of the user's both keep their values."""
    graph = built("sdxl")
    sampler = next(n for n, node in graph.items() if node["class_type"] == "KSamplerAdvanced")
    graph["refine"] = {"class_type": "KSamplerAdvanced", "inputs": {**graph[sampler]["inputs"], "noise_seed": 5}}
    bindings = find_bindings(graph)
    assert bindings.seed is None and set(bindings.several) == {"seed"}
    out = apply_bindings(graph, bindings, "m.safetensors", PreviewSettings("an owl"))
    assert out["refine"]["inputs"]["noise_seed"] == 5 and out[sampler]["inputs"] == {
        **graph[sampler]["inputs"], "noise_seed": graph[sampler]["inputs"]["noise_seed"]}
    with pytest.raises(OrthoMechaError, match=rf"several seed inputs \({sampler}\.noise_seed, refine\.noise_seed\); "
                                              r"say which to use with --set-seed NODE\.INPUT, or several"):
        apply_bindings(graph, bindings, "m.safetensors", PreviewSettings("an owl", seed=3))
    marked = find_bindings(graph, seed="refine.noise_seed")
    assert apply_bindings(graph, marked, "m", PreviewSettings("an owl", seed=3))["refine"]["inputs"]["noise_seed"] == 3
    both = apply_bindings(graph, find_bindings(graph, seed=f"{sampler}.noise_seed, refine.noise_seed"), "m",
                          PreviewSettings("an owl", seed=3))
    assert both["refine"]["inputs"]["noise_seed"] == both[sampler]["inputs"]["noise_seed"] == 3


def test_a_refiners_prompts_take_the_text_when_marked_too(caplog: pytest.LogCaptureFixture) -> None:
    """An SDXL base + refiner workflow has two positive and two negative encoders: marks may list both."""
    graph = built("sdxl")
    encoders = {n: node for n, node in graph.items() if node["class_type"] == "CLIPTextEncode"}
    refined = {f"r{n}": json.loads(json.dumps(node)) for n, node in encoders.items()}
    graph |= refined
    sampler = next(n for n, node in graph.items() if node["class_type"] == "KSamplerAdvanced")
    positive, negative = graph[sampler]["inputs"]["positive"][0], graph[sampler]["inputs"]["negative"][0]
    graph["refine"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **graph[sampler]["inputs"], "positive": [f"r{positive}", 0], "negative": [f"r{negative}", 0]}}
    with pytest.raises(OrthoMechaError, match="several positive prompts"):
        apply_bindings(graph, find_bindings(graph), "m", PreviewSettings("an owl"))
    with caplog.at_level(logging.WARNING):
        find_bindings(graph, prompt=f"{positive}.text")
    assert f"--set-prompt: r{positive}.text keep(s) the workflow's own value" in caplog.text
    bindings = find_bindings(graph, prompt=f"{positive}.text,r{positive}.text",
                             negative=f"{negative}.text,r{negative}.text")
    out = apply_bindings(graph, bindings, "m", PreviewSettings("an owl", negative="lowres"))
    assert out[positive]["inputs"]["text"] == out[f"r{positive}"]["inputs"]["text"] == "an owl"
    assert out[negative]["inputs"]["text"] == out[f"r{negative}"]["inputs"]["text"] == "lowres"
    with pytest.raises(OrthoMechaError, match=r"--set-prompt 'nowhere\.text': the workflow has no node 'nowhere'"):
        find_bindings(graph, prompt=f"{positive}.text,nowhere.text")


def test_one_text_encoder_feeding_both_sides_needs_marks() -> None:
    graph = built("sd1")
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")
    sampler["inputs"]["negative"] = sampler["inputs"]["positive"]
    with pytest.raises(OrthoMechaError, match="feed both the positive and the negative"):
        find_bindings(graph)


def test_workflow_without_a_loader_asks_for_a_mark() -> None:
    graph = {"1": {"class_type": "UnetLoaderGGUF", "inputs": {"gguf_name": "x.gguf"}}}
    with pytest.raises(OrthoMechaError, match=r"no model loader.*--set-model"):
        find_bindings(graph)


def test_combo_spec_of_the_stub_uses_both_encodings(comfy_stub: ComfyStub) -> None:
    info = comfy_stub.object_info()
    legacy = input_spec(info, "KSampler", "sampler_name")
    v3 = input_spec(info, "KSamplerSelect", "sampler_name")
    assert isinstance(legacy[0], list) and v3[0] == "COMBO"
    assert combo_options(legacy) == combo_options(v3) and len(combo_options(v3)) == 44


def test_named_files_of_another_model_are_doubted_and_others_trusted() -> None:
    def doubts(arch: str, facts: ModelFacts | None = None, **named: object) -> list[str]:
        return named_file_doubts(arch_spec(arch), PreviewSettings("p", **named), facts or ModelFacts())

    assert doubts("zimage", vae="flux2-vae.safetensors") == [
        "the VAE 'flux2-vae.safetensors' is named like another model's file, not one this zimage model takes (it "
        "takes one like ae.safetensors); ComfyUI will likely fail with a shape mismatch"]
    assert "it takes one like sdxl_vae.safetensors" in doubts("sdxl", vae="ae.safetensors")[0]
    assert len(doubts("flux1", clip=("qwen_3_4b.safetensors", "clip_l.safetensors"))) == 1
    assert doubts("flux1", clip=("t5xxl_fp8_e4m3fn.safetensors", "clip_l.safetensors")) == []  # either order
    assert doubts("sdxl", vae="sdxl_vae.safetensors") == []  # SDXL's own
    assert doubts("flux2-klein", clip=("my_encoder.safetensors",)) == []
    assert doubts("flux2-klein", clip=("qwen_3_4b.safetensors",)) == []  # 4B or 9B: not known without txt_in
    assert len(doubts("flux2-klein", ModelFacts(text_dim=12288), clip=("qwen_3_4b.safetensors",))) == 1
