"""The ComfyUI client against the stand-in server: runs, failures, model linking, the ``preview`` command."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import save_file

from ortho_mecha.arch import FLUX_KEY
from ortho_mecha.comfy import (
    LINK_USERS,
    ComfyClient,
    ImageRef,
    PreviewImage,
    Problem,
    Progress,
    combo_options,
    comfy_api,
    describe_problem,
    describe_prompt_error,
    find_problems,
    link_model,
    link_name,
    model_linked,
    run_preview,
    save_images,
    wait_for,
)
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.workflows import PreviewSettings, arch_spec, build_workflow, find_bindings, resolve
from tests.comfy_stub import ComfyStub, comfy_stub_fixture  # noqa: F401 - the comfy_stub fixture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = PreviewSettings("a lighthouse at dusk", seed=7)


FLUX_KEYS = {FLUX_KEY: (128,), "img_in.weight": (8, 64)}  # what makes a header read as Flux.1
ZIMAGE_KEYS = {"cap_embedder.1.weight": (3840, 1), "noise_refiner.0.attention.k_norm.weight": (4,)}  # bare
# an SD1.5-style full checkpoint, as CheckpointLoaderSimple loads: the prefixed UNet (> 5 keys), text encoder, VAE
SD_CHECKPOINT_KEYS = {
    **{f"model.diffusion_model.input_blocks.{i}.0.weight": (4, 4, 3, 3) for i in range(6)},
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,),
    "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3),
}


def write_model(path: Path, keys: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A small real safetensors file (the stand-in server never loads it; the client reads its header)."""
    keys = keys or SD_CHECKPOINT_KEYS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.full(shape, 0.5, np.float16) for k, shape in keys.items()}, str(path))
    return path


def linked(root: Path, model: Path, folder: str = "checkpoints") -> list[str]:
    """The entries for ``model`` (any tag) in ``root``'s ComfyUI ``models/<folder>``."""
    path = root / "models" / folder
    return sorted(p.name for p in path.iterdir() if p.name.startswith(f"{model.stem}.")) if path.is_dir() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def client_for(stub: ComfyStub, timeout: float = 5.0) -> ComfyClient:
    return ComfyClient(stub.url, timeout=timeout)


def preview(stub: ComfyStub, model: Path, arch: str = "sd1", **kwargs: object):
    kwargs.setdefault("comfy", stub.root)
    kwargs.setdefault("poll_interval", 0.01)
    kwargs.setdefault("time_limit", 60.0)  # a stand-in that stops answering fails the test, not the suite's clock
    return run_preview(model, arch, kwargs.pop("settings", SETTINGS), client=client_for(stub), **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# /object_info parsing and the pre-flight check


def test_combo_options_reads_both_encodings() -> None:
    assert combo_options([["a.safetensors", "b.safetensors"], {"tooltip": "x"}]) == ["a.safetensors", "b.safetensors"]
    assert combo_options(["COMBO", {"multiselect": False, "options": ["euler", "heun"]}]) == ["euler", "heun"]
    assert combo_options([[], {}]) == []
    assert combo_options(["INT", {"default": 20}]) is None
    assert combo_options(["MODEL"]) is None


def test_find_problems_names_each_problem(comfy_stub: ComfyStub) -> None:
    info = comfy_stub.object_info()
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent.safetensors"}},
        "2": {"class_type": "NoSuchNodeXYZ", "inputs": {}},
        "3": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "eulerx"}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["99", 0]}},
    }
    assert find_problems(graph, info) == [
        Problem("missing_class", "2", "NoSuchNodeXYZ"),
        Problem("not_in_list", "1", "CheckpointLoaderSimple", "ckpt_name", "absent.safetensors", ()),
        Problem("not_in_list", "3", "KSamplerSelect", "sampler_name", "eulerx", tuple(combo_options(
            info["KSamplerSelect"]["input"]["required"]["sampler_name"]))),
        Problem("missing_input", "4", "VAEDecode", "vae"),
        Problem("dangling_link", "4", "VAEDecode", "samples", "99"),
    ]  # fmt: skip


def test_find_problems_names_every_number_comfyui_refuses(comfy_stub: ComfyStub) -> None:
    """As ComfyUI validates an INT or FLOAT literal: converted with int() or float(), then held to min and max;
    every such problem is named, not only the first."""
    comfy_stub.add_file("checkpoints", "placeholder.safetensors")
    info = comfy_stub.object_info()
    graph = user_graph()
    graph["lat"]["inputs"].update(width=8, height=99999)
    graph["ks"]["inputs"].update(steps="many", cfg=-1.0)
    problems = {(p.node, p.input): p for p in find_problems(graph, info)}
    assert {key: problem.kind for key, problem in problems.items()} == {
        ("lat", "width"): "below_min", ("lat", "height"): "above_max",
        ("ks", "steps"): "not_a_number", ("ks", "cfg"): "below_min",
    }  # fmt: skip
    assert describe_problem(problems["lat", "width"], "http://x", "", own_workflow=True) == (
        "node lat (EmptyLatentImage) input 'width' is 8, below its minimum of 16 in this ComfyUI")
    assert describe_problem(problems["ks", "steps"], "http://x", "", own_workflow=True) == (
        "node ks (KSampler) input 'steps' is 'many', which is not a whole number")
    graph["lat"]["inputs"].update(width="512", height=512.0)  # ComfyUI converts these
    graph["ks"]["inputs"].update(steps=2, cfg=5)
    assert find_problems(graph, info) == []


def test_a_comfyui_lacking_nodes_and_files_is_told_all_of_them_at_once(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.missing_classes = {"ModelSamplingAuraFlow"}
    (comfy_stub.root / "models" / "vae" / "ae.safetensors").unlink()
    with pytest.raises(OrthoMechaError, match=r"has no node 'ModelSamplingAuraFlow' \(the built-in workflow uses "
                       r"it\).*; ComfyUI at http://[0-9.:]+ lacks files the built-in zimage workflow needs: "
                       r"a VAE like ae"):
        preview(comfy_stub, write_model(tmp_path / "m.safetensors", ZIMAGE_KEYS), "zimage")
    assert comfy_stub.received == []


def test_find_problems_checks_only_what_comfyui_runs(comfy_stub: ComfyStub) -> None:
    """ComfyUI validates the output nodes and what they depend on; a node feeding nothing (here a LoRA loader
    naming a file it lacks) is not run, so not refused. A node class it lacks is refused anywhere."""
    info = comfy_stub.object_info()
    graph = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "absent-vae.safetensors"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "unused-absent.safetensors"}},
    }
    assert [(p.kind, p.node) for p in find_problems(graph, info)] == [("not_in_list", "2")]
    graph["6"] = {"class_type": "NoSuchNodeXYZ", "inputs": {}}
    assert [(p.kind, p.node) for p in find_problems(graph, info)] == [("missing_class", "6"), ("not_in_list", "2")]


def test_stub_lists_files_like_comfyui(comfy_stub: ComfyStub) -> None:
    comfy_stub.add_file("unet", "legacy.safetensors")
    comfy_stub.add_file("diffusion_models", "sub/inner.sft")
    comfy_stub.add_file("diffusion_models", "notes.txt")
    client = client_for(comfy_stub)
    assert client.models("diffusion_models") == ["legacy.safetensors", "sub/inner.sft"]
    unet = client.node_info("UNETLoader")["input"]["required"]["unet_name"]
    assert unet[0] == ["legacy.safetensors", "sub/inner.sft"]
    assert client.node_info("NoSuchNodeXYZ") is None
    assert client.object_info()["VAELoader"]["input"]["required"]["vae_name"][0][-1] == "pixel_space"
    assert client.system_stats()["system"]["comfyui_version"] == "0.33.0"


# --------------------------------------------------------------------------------------------------
# Whole runs


def test_sd1_preview_end_to_end_writes_pngs(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "merged.safetensors")
    before = sha256(model)
    seen: list[Progress] = []
    result = preview(comfy_stub, model, progress=seen.append)
    assert result.model_name == link_name(model) and re.fullmatch(r"merged\.[0-9a-f]{8}\.safetensors", link_name(model))
    assert result.link is not None and result.link.method == "hardlink" and result.link.created
    assert linked(comfy_stub.root, model) == []  # unlinked again
    assert sha256(model) == before
    assert [image.ref.kind for image in result.images] == ["output"]
    assert result.images[0].data.startswith(PNG_SIGNATURE)
    assert Image.open(io.BytesIO(result.images[0].data)).size == (8, 8)
    sent = comfy_stub.received[-1]
    assert len(sent["client_id"]) == 32 and sent["prompt"] == result.graph
    assert all(p.prompt_id == result.prompt_id and p.state in ("pending", "running") for p in seen)

    out = tmp_path / "out"
    first = save_images(result.images, out, "merged_seed7")
    second = save_images(result.images, out, "merged_seed7")
    assert [p.name for p in first + second] == ["merged_seed7_001.png", "merged_seed7_002.png"]
    assert first[0].read_bytes() == result.images[0].data


@pytest.mark.parametrize("arch", ["flux1", "flux2-klein", "chroma", "zimage"])
def test_dit_previews_end_to_end(arch: str, comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / f"{arch}.safetensors", {"txt_in.weight": (2, 7680), "img_in.weight": (2, 4)})
    result = preview(comfy_stub, model, arch)
    assert result.resolved is not None and result.resolved.vae in ("ae.safetensors", "flux2-vae.safetensors")
    assert len(result.images) == 1 and result.images[0].data.startswith(PNG_SIGNATURE)
    assert comfy_stub.history[result.prompt_id]["status"]["status_str"] == "success"


def test_model_facts_come_from_the_file(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.add_file("text_encoders", "qwen_3_8b_fp8mixed.safetensors")
    nine_b = write_model(tmp_path / "klein9b.safetensors", {"model.diffusion_model.txt_in.weight": (2, 12288)})
    assert preview(comfy_stub, nine_b, "flux2-klein").resolved.text_encoders == ("qwen_3_8b_fp8mixed.safetensors",)
    schnell = write_model(tmp_path / "schnell.safetensors", {"img_in.weight": (2, 64)})
    assert preview(comfy_stub, schnell, "flux1").resolved.steps == 4
    diffusers_dev = {"x_embedder.weight": (2, 64), "time_text_embed.guidance_embedder.linear_1.weight": (2, 4)}
    dev = write_model(tmp_path / "dev_diffusers.safetensors", diffusers_dev)
    assert preview(comfy_stub, dev, "flux1").resolved.steps > 4  # its guidance input in diffusers' name: dev


def user_graph(seed: object = 1, output: dict | None = None) -> dict:
    """An SD1.5 API-format workflow of the user's: its own negative text and seed (or a link to a PrimitiveInt),
    ending in ``output`` (default: SaveImage)."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "placeholder.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "karras",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "show": output or {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "mine"}},
    }  # fmt: skip


def test_user_workflow_end_to_end(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "mine.safetensors")
    graph = user_graph(output={"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}})
    settings_ = PreviewSettings("new prompt", negative="new negative", seed=42)
    result = preview(comfy_stub, model, "custom", workflow=graph, settings=settings_)
    sent = comfy_stub.received[-1]["prompt"]
    assert sent["ckpt"]["inputs"]["ckpt_name"] == link_name(model)
    assert (sent["pos"]["inputs"]["text"], sent["neg"]["inputs"]["text"]) == ("new prompt", "new negative")
    assert sent["ks"]["inputs"]["seed"] == 42 and sent["ks"]["inputs"]["scheduler"] == "karras"
    assert [image.ref.kind for image in result.images] == ["temp"]
    assert graph["ckpt"]["inputs"]["ckpt_name"] == "placeholder.safetensors"
    with pytest.raises(OrthoMechaError, match=r"--steps, --clip cannot be applied to your own workflow"):
        preview(comfy_stub, model, "custom", workflow=graph, settings=PreviewSettings("p", steps=3, clip=("a",)))


def test_user_workflow_keeps_what_is_not_given(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    """No --negative, no --seed: the workflow's own negative text and seed are sent unchanged."""
    model = write_model(tmp_path / "mine.safetensors")
    result = preview(comfy_stub, model, "custom", workflow=user_graph(seed=123), settings=PreviewSettings("new"))
    sent = comfy_stub.received[-1]["prompt"]
    assert (sent["pos"]["inputs"]["text"], sent["neg"]["inputs"]["text"]) == ("new", "text, watermark")
    assert sent["ks"]["inputs"]["seed"] == 123 and result.seed == 123


def test_user_workflow_seed_from_a_primitive_node(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    """A seed input linked to a PrimitiveInt is set on that node; a seed with no place to go is an error."""
    model = write_model(tmp_path / "mine.safetensors")
    graph = user_graph(seed=["seed", 0])
    graph["seed"] = {"class_type": "PrimitiveInt", "inputs": {"value": 219670278747233}}
    result = preview(comfy_stub, model, "custom", workflow=graph, settings=PreviewSettings("new", seed=42))
    sent = comfy_stub.received[-1]["prompt"]
    assert sent["seed"]["inputs"]["value"] == 42 and sent["ks"]["inputs"]["seed"] == ["seed", 0] and result.seed == 42
    graph["seed"] = {"class_type": "PrimitiveInt", "inputs": {"value": ["ckpt", 0]}}  # no number to set anywhere
    with pytest.raises(OrthoMechaError, match=r"no seed input that ortho-mecha can find.*--set-seed"):
        preview(comfy_stub, model, "custom", workflow=graph, settings=PreviewSettings("new", seed=42))


def test_a_user_workflows_missing_file_is_told_to_be_fixed_in_the_workflow(comfy_stub: ComfyStub,
                                                                            tmp_path: Path) -> None:
    graph = user_graph()
    graph["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "their_vae.safetensors"}}
    graph["dec"]["inputs"]["vae"] = ["vae", 0]
    with pytest.raises(OrthoMechaError, match=r"VAE 'their_vae\.safetensors' is not in ComfyUI's vae list .*; put it "
                       r"in ComfyUI's models/vae, or set node vae \(VAELoader\)'s vae_name to one it has in your "
                       r"workflow") as caught:  # fmt: skip
        preview(comfy_stub, write_model(tmp_path / "m.safetensors"), "custom", workflow=graph)
    assert "--vae" not in str(caught.value)  # refused with --workflow


def test_link_is_removed_when_comfyui_fails_after_linking(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "merged.safetensors")
    comfy_stub.object_info_fails_after = 1  # the file lists, asked again once the model is linked, fail
    with pytest.raises(OrthoMechaError, match=r"answered 500 to GET /object_info"):
        preview(comfy_stub, model)
    assert linked(comfy_stub.root, model) == []
    assert model.is_file()


def test_a_page_that_is_not_comfyuis_answer_is_named(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.prompt_answer = b"<html><body>Sign in to continue</body></html>"
    with pytest.raises(OrthoMechaError, match=r"at http://127\.0\.0\.1:\d+ sent something that is not JSON for POST "
                       r"/prompt; is that address a ComfyUI server\?"):
        preview(comfy_stub, write_model(tmp_path / "m.safetensors"))


def test_a_model_comfyui_lists_in_a_subfolder_is_found_without_comfy_dir(comfy_stub: ComfyStub) -> None:
    comfy_stub.add_standard_files()
    model = write_model(comfy_stub.root / "models" / "unet" / "flux" / "mine.safetensors", {"img_in.weight": (2, 4)})
    result = preview(comfy_stub, model, "flux1", comfy=None)
    assert result.model_name == "flux/mine.safetensors" and result.link is None
    assert comfy_stub.received[-1]["prompt"]["1"]["inputs"]["unet_name"] == "flux/mine.safetensors"


def test_flux2_dev_gets_guidance_not_cfg(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    """Flux.2 dev (guidance_in, Mistral-width txt_in): FluxGuidance 4 into BasicGuider, as its template."""
    comfy_stub.add_file("text_encoders", "mistral_3_small_flux2_bf16.safetensors")
    keys = {"txt_in.weight": (2, 15360), "guidance_in.in_layer.weight": (2, 4)}
    model = write_model(tmp_path / "dev.safetensors", keys)
    result = preview(comfy_stub, model, "flux2-klein")
    sent = comfy_stub.received[-1]["prompt"]
    classes = {node["class_type"]: node["inputs"] for node in sent.values()}
    assert classes["FluxGuidance"]["guidance"] == 4.0 and "BasicGuider" in classes and "CFGGuider" not in classes
    assert classes["CLIPLoader"]["clip_name"] == "mistral_3_small_flux2_bf16.safetensors"
    assert result.resolved is not None and result.resolved.guided


def test_a_model_of_another_architecture_is_refused(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    flux = write_model(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.norm.key_norm.weight": (4,),
                                                        "img_in.weight": (2, 4)})
    with pytest.raises(OrthoMechaError, match=r"flux\.safetensors: its keys are those of a flux1 model, not sd1"):
        preview(comfy_stub, flux, "sd1")
    # Chroma Radiance reads as custom, but no latent workflow runs it: forcing --arch chroma is refused too
    radiance = write_model(tmp_path / "radiance.safetensors", {"double_blocks.0.img_attn.norm.key_norm.weight": (4,),
                                                                "img_in_patch.weight": (2, 3, 2, 2),
                                                                "distilled_guidance_layer.norms.0.scale": (4,)})
    with pytest.raises(OrthoMechaError, match=r"radiance\.safetensors: its keys are those of a pixel-space model "
                                              r"\(Chroma Radiance.*your own workflow"):
        preview(comfy_stub, radiance, "chroma")
    assert not comfy_stub.received


def test_custom_arch_needs_a_workflow(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    with pytest.raises(OrthoMechaError, match=r"'custom' has no built-in ComfyUI workflow"):
        preview(comfy_stub, write_model(tmp_path / "m.safetensors"), "custom")


# --------------------------------------------------------------------------------------------------
# Failures: each one clear message


def test_server_down(tmp_path: Path) -> None:
    client = ComfyClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(OrthoMechaError, match=r"ComfyUI at http://127\.0\.0\.1:\d+ is not reachable \(connection "
                       r"refused\); start ComfyUI, or point ortho-mecha at it \(COMFYUI_API, --api, or the "
                       r"Preview page's server address\)"):  # fmt: skip
        run_preview(write_model(tmp_path / "m.safetensors"), "sd1", SETTINGS, client=client)


def test_slow_server_times_out(comfy_stub: ComfyStub) -> None:
    comfy_stub.answer_delay = 30
    with pytest.raises(OrthoMechaError, match=r"did not answer GET /object_info within 0\.2 s"):
        client_for(comfy_stub, timeout=0.2).object_info()


def test_job_over_the_time_limit_is_interrupted(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.delay = 60
    with pytest.raises(OrthoMechaError, match=r"did not finish prompt [-0-9a-f]{36} within 0\.1 s, so it was "
                       r"cancelled; allow more time with --timeout") as caught:  # fmt: skip
        preview(comfy_stub, model := write_model(tmp_path / "m.safetensors"), time_limit=0.1)
    prompt_id = re.search(r"prompt ([-0-9a-f]{36})", str(caught.value)).group(1)
    assert comfy_stub.interrupts == [{"prompt_id": prompt_id}]
    assert linked(comfy_stub.root, model) == []  # unlinked after failure


def test_pending_job_over_the_time_limit_leaves_the_queue(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.delay = 60
    model = write_model(tmp_path / "m.safetensors")
    link_model(model, comfy_stub.root, "checkpoints")
    client_for(comfy_stub).queue_prompt(build_workflow("sd1", link_name(model), resolve(arch_spec("sd1"), SETTINGS)))
    seen: list[Progress] = []
    with pytest.raises(OrthoMechaError, match=r"did not finish .*cancelled; it never started: 1 job\(s\) of "
                       "ComfyUI's queue were still ahead of it; allow more time") as caught:
        preview(comfy_stub, model, time_limit=0.05, progress=seen.append)
    prompt_id = re.search(r"prompt ([-0-9a-f]{36})", str(caught.value)).group(1)
    assert seen and {(p.state, p.ahead) for p in seen} == {("pending", 1)}
    assert prompt_id not in [item[1] for item in comfy_stub.pending]
    assert comfy_stub.interrupts == []  # the job ahead (someone else's) was left alone


def test_server_gone_mid_job(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.mode = "die"
    with pytest.raises(OrthoMechaError, match=r"stopped answering while prompt [-0-9a-f]{36} was queued or running "
                       r"\(connection (refused|dropped)\)"):  # fmt: skip
        preview(comfy_stub, write_model(tmp_path / "m.safetensors"), time_limit=30)


def test_execution_error_reports_comfyuis_exception(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.mode = "error"
    model = write_model(tmp_path / "broken.safetensors", {"txt_in.weight": (2, 7680)})
    with pytest.raises(OrthoMechaError, match=r"failed running node 1 \(UNETLoader\): RuntimeError: ERROR: Could not "
                       r"detect model type of: .*broken\.[0-9a-f]{8}\.safetensors$"):  # fmt: skip
        preview(comfy_stub, model, "zimage")


def test_unknown_node(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    comfy_stub.missing_classes = {"ModelSamplingAuraFlow"}
    with pytest.raises(OrthoMechaError, match=r"has no node 'ModelSamplingAuraFlow' \(the built-in workflow uses "
                       r"it\); install the custom node that provides it, or update ComfyUI"):  # fmt: skip
        preview(comfy_stub, write_model(tmp_path / "m.safetensors", ZIMAGE_KEYS), "zimage")
    comfy_stub.missing_classes = {"CLIPLoader"}
    with pytest.raises(OrthoMechaError, match=r"has no node 'CLIPLoader' \(the built-in workflow uses it\)"):
        preview(comfy_stub, write_model(tmp_path / "m.safetensors", ZIMAGE_KEYS), "zimage")


def test_missing_model_without_comfy_dir(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.safetensors", {"txt_in.weight": (2, 7680)})
    expected = (
        r"^model 'm\.safetensors' is not in ComfyUI's diffusion_models list \(ComfyUI at http://127\.0\.0\.1:\d+\); "
        r"set COMFYUI_DIR so ortho-mecha can link it, or copy it to <ComfyUI folder>/models/diffusion_models$"
    )
    with pytest.raises(OrthoMechaError, match=expected):
        preview(comfy_stub, model, "chroma", comfy=None)
    assert comfy_stub.received == []  # refused before queueing


@pytest.mark.parametrize("listed", ["m.safetensors", "flux/m.safetensors"])
def test_a_file_comfyui_lists_under_the_models_name_is_not_taken_for_it_without_comfy_dir(
    comfy_stub: ComfyStub, tmp_path: Path, listed: str
) -> None:
    """ComfyUI's own m.safetensors (or flux/m.safetensors, for a model in elsewhere/diffusion_models/flux/) was
    rendered in place of the user's file, silently (QA7 finding 3): ComfyUI lists no sizes, so nothing tells
    they are the same file."""
    model = write_model(tmp_path / "elsewhere" / "diffusion_models" / "flux" / "m.safetensors",
                        {"txt_in.weight": (2, 7680)})
    comfy_stub.add_file("diffusion_models", listed, b"another model")
    with pytest.raises(OrthoMechaError, match=rf"^{re.escape(str(model))}: ComfyUI at http://127\.0\.0\.1:\d+ lists "
                       rf"a '{listed}' in its diffusion_models folder, but this file does not lie in a ComfyUI "
                       r"models/diffusion_models folder, so that may be another file: set COMFYUI_DIR"):
        preview(comfy_stub, model, "chroma", comfy=None)
    assert comfy_stub.received == []
    assert preview(comfy_stub, model, "chroma").link is not None  # with COMFYUI_DIR: linked, under its own name


def test_comfy_dir_of_another_install(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    other = tmp_path / "OtherComfy"
    (other / "models").mkdir(parents=True)
    model = write_model(tmp_path / "m.safetensors")
    with pytest.raises(OrthoMechaError, match=r"is linked as .*OtherComfy/models/checkpoints/m\.[0-9a-f]{8}\."
                       r"safetensors, yet ComfyUI does not list it: is COMFYUI_DIR"):  # fmt: skip
        preview(comfy_stub, model, comfy=other)
    assert linked(other, model) == []


def test_missing_text_encoder(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.safetensors", ZIMAGE_KEYS)
    expected = (
        r"text encoder 'umt5\.safetensors' is not in ComfyUI's text_encoders list \(it has: clip_l\.safetensors, "
        r"qwen_3_4b\.safetensors, t5xxl_fp16\.safetensors\)"
    )
    with pytest.raises(OrthoMechaError, match=expected):
        preview(comfy_stub, model, "zimage", settings=PreviewSettings("p", clip=("umt5.safetensors",)))
    (comfy_stub.root / "models" / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    with pytest.raises(OrthoMechaError, match=r"the built-in zimage workflow needs: a text encoder like qwen_3_4b"):
        preview(comfy_stub, model, "zimage")
    (comfy_stub.root / "models" / "vae" / "ae.safetensors").unlink()  # all that is missing, named at once
    with pytest.raises(OrthoMechaError, match=r"needs: a text encoder like qwen_3_4b\.safetensors .*; a VAE like ae\."):
        preview(comfy_stub, model, "zimage")


def test_refusals_from_post_prompt_are_readable(comfy_stub: ComfyStub) -> None:
    client = client_for(comfy_stub)
    with pytest.raises(OrthoMechaError, match=r"has no node 'NoSuchNodeXYZ' \(workflow node 1\)"):
        client.queue_prompt({"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}})
    graph = build_workflow("sd1", "nope.safetensors", resolve(arch_spec("sd1"), SETTINGS))
    graph["5"]["inputs"]["sampler_name"] = "fastest"
    with pytest.raises(OrthoMechaError) as caught:
        client.queue_prompt(graph)
    assert str(caught.value) == (
        f"ComfyUI at {comfy_stub.url} refused the workflow: node 1 (CheckpointLoaderSimple): Value not in list: "
        "ckpt_name: 'nope.safetensors' not in []; node 5 (KSampler): Value not in list: sampler_name: 'fastest' not "
        "in (list of length 44)"
    )
    with pytest.raises(OrthoMechaError, match=r"it has no output node; add a SaveImage or PreviewImage node"):
        client.queue_prompt({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 8}}})


def test_describe_prompt_error_on_comfyuis_own_envelope() -> None:
    payload = json.loads(
        '{"error":{"type":"prompt_outputs_failed_validation","message":"Prompt outputs failed validation","details":'
        '"","extra_info":{}},"node_errors":{"4":{"errors":[{"type":"value_not_in_list","message":"Value not in list",'
        '"details":"ckpt_name: \'does_not_exist.safetensors\' not in [\'x.safetensors\']","extra_info":{"input_name":'
        '"ckpt_name","input_config":[["x.safetensors"],{"tooltip":"The name of the checkpoint (model) to load."}],'
        '"received_value":"does_not_exist.safetensors"}}],"dependent_outputs":["9"],"class_type":'
        '"CheckpointLoaderSimple"}}}'
    )
    assert describe_prompt_error(payload, "http://h:1") == (
        "ComfyUI at http://h:1 refused the workflow: node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name: "
        "'does_not_exist.safetensors' not in ['x.safetensors']"
    )
    no_prompt = {"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                           "extra_info": {}}, "node_errors": {}}  # fmt: skip
    assert describe_prompt_error(no_prompt, "u").endswith("No prompt provided (No prompt provided)")


def test_view_of_a_missing_image(comfy_stub: ComfyStub) -> None:
    with pytest.raises(OrthoMechaError, match=r"listed the image gone\.png but /view answered 404"):
        client_for(comfy_stub).view(ImageRef("9", "gone.png", "", "output"))


def test_address_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_API", "http://10.0.0.5:8188/")
    assert comfy_api() == "http://10.0.0.5:8188"
    assert comfy_api("http://other:1") == "http://other:1"
    monkeypatch.delenv("COMFYUI_API")
    assert comfy_api() == "http://127.0.0.1:8188"
    with pytest.raises(OrthoMechaError, match="must start with http:// or https://"):
        ComfyClient("127.0.0.1:8188")


# --------------------------------------------------------------------------------------------------
# Linking the model into ComfyUI's folder


def test_link_and_unlink_leave_the_source_untouched(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "merge.safetensors")
    before = sha256(model)
    entry = comfy_stub.root / "models" / "diffusion_models" / link_name(model)
    with model_linked(model, comfy_stub.root, "diffusion_models") as link:
        assert (link.name, link.path, link.method, link.created) == (entry.name, entry, "hardlink", True)
        assert os.path.samefile(entry, model)  # a file of ComfyUI's own folder: a container mounting it reads it
        assert entry.name in client_for(comfy_stub).models("diffusion_models")
        assert link_model(model, comfy_stub.root, "diffusion_models").created is False  # reused
    assert not entry.exists() and not entry.is_symlink()
    assert model.is_file() and sha256(model) == before


def test_previews_of_one_model_share_its_link_and_the_last_one_removes_it(comfy_stub: ComfyStub,
                                                                         tmp_path: Path) -> None:
    model = write_model(tmp_path / "merge.safetensors")
    entry = comfy_stub.root / "models" / "checkpoints" / link_name(model)
    with model_linked(model, comfy_stub.root, "checkpoints") as first:
        assert first.created
        with model_linked(model, comfy_stub.root, "checkpoints") as second:
            assert not second.created and second.path == entry
        assert entry.is_file()  # the first preview still renders with it
    assert not entry.exists() and model.is_file()
    assert not (entry.parent / LINK_USERS / entry.name).exists()  # nor its bookkeeping
    assert client_for(comfy_stub).models("checkpoints") == []  # the bookkeeping files are no models


def test_a_link_stays_while_a_preview_in_another_process_uses_it(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "merge.safetensors")
    entry = comfy_stub.root / "models" / "checkpoints" / link_name(model)
    users = entry.parent / LINK_USERS / entry.name
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with model_linked(model, comfy_stub.root, "checkpoints"):
            (users / f"preview-{other.pid}-0000").touch()  # another process previewing the same model
            (users / "preview-999999999-0000").touch()  # a killed one's
        assert entry.is_file()
        assert sorted(p.name for p in users.iterdir()) == ["made-by-ortho-mecha", f"preview-{other.pid}-0000"]
    finally:
        other.kill()
        other.wait()
    with model_linked(model, comfy_stub.root, "checkpoints") as again:  # once it is gone, the next preview
        assert not again.created
    assert not entry.exists() and model.is_file()  # ... removes the link ortho-mecha made


def test_a_model_written_again_under_its_name_is_sent_under_a_new_name(comfy_stub: ComfyStub,
                                                                       tmp_path: Path) -> None:
    """ComfyUI keeps a loaded model while the loader's file name is unchanged: a re-merge must not reuse it."""
    model = write_model(tmp_path / "merge.safetensors")
    first = preview(comfy_stub, model).model_name
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))  # written again
    second = preview(comfy_stub, model).model_name
    sent = [prompt["prompt"]["1"]["inputs"]["ckpt_name"] for prompt in comfy_stub.received[-2:]]
    assert sent == [first, second] and first != second
    assert second == link_name(model) and linked(comfy_stub.root, model) == []


def test_a_killed_previews_link_goes_with_the_next_preview_in_that_folder(comfy_stub: ComfyStub,
                                                                          tmp_path: Path) -> None:
    killed = write_model(tmp_path / "killed.safetensors")
    folder = comfy_stub.root / "models" / "checkpoints"
    with model_linked(killed, comfy_stub.root, "checkpoints") as link:
        users = folder / LINK_USERS / link.name
        (users / "preview-999999999-0000").touch()  # a preview whose process is gone, as after kill -9
        for entry in users.glob(f"preview-{os.getpid()}-*"):
            entry.unlink()  # this process "dies" too: its finally finds no record of itself
        with model_linked(write_model(tmp_path / "other.safetensors"), comfy_stub.root, "checkpoints"):
            assert linked(comfy_stub.root, killed) == []  # removed: no live preview used it
    assert sorted(p.name for p in folder.iterdir()) == [LINK_USERS]
    assert killed.is_file()


def test_a_comfyui_with_only_the_older_unet_folder_gets_its_links_there(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    models = comfy_stub.root / "models"
    (models / "diffusion_models").rmdir()
    (models / "unet").mkdir(exist_ok=True)
    model = write_model(tmp_path / "flux.safetensors", FLUX_KEYS)
    with model_linked(model, comfy_stub.root, "diffusion_models") as link:
        assert link.path.parent == models / "unet"
    assert not (models / "diffusion_models").exists()


def test_a_kept_link_and_a_users_own_link_are_never_removed(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "merge.safetensors")
    entry = comfy_stub.root / "models" / "checkpoints" / link_name(model)
    with model_linked(model, comfy_stub.root, "checkpoints", keep_link=True):
        pass
    with model_linked(model, comfy_stub.root, "checkpoints"):
        pass
    assert entry.is_file()  # kept: the user's from then on
    other = write_model(tmp_path / "own.safetensors")
    own = entry.with_name("own.safetensors")
    own.symlink_to(other)
    with model_linked(other, comfy_stub.root, "checkpoints") as link:
        assert link.path != own  # ortho-mecha's own link, under the tagged name
    assert own.is_symlink()


@pytest.mark.parametrize("refused", [("link",), ("link", "symlink")])
def test_symbolic_link_or_copy_where_hard_links_are_not_possible(
    refused: tuple[str, ...],
    comfy_stub: ComfyStub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    for name in refused:  # refused: another file system (hard links), some network shares, Windows without rights
        monkeypatch.setattr(os, name, refuse)
    model = write_model(tmp_path / "merge.safetensors")
    before = sha256(model)
    with model_linked(model, comfy_stub.root, "checkpoints") as link:
        assert link.method == ("symlink" if refused == ("link",) else "copy") and link.name == link_name(model)
        assert sha256(link.path) == before and link.path.is_symlink() == (link.method == "symlink")
        assert link_model(model, comfy_stub.root, "checkpoints").method == link.method  # recognised again
    assert not link.path.exists() and sha256(model) == before


def test_a_comfyui_that_cannot_follow_the_symbolic_link_gets_a_copy(
    comfy_stub: ComfyStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hard links cannot cross file systems; a ComfyUI in a container (or on another machine) lists the symbolic
    link made instead but cannot open it: the preview copies the model over the link and runs again."""
    def other_file_system(*_: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", other_file_system)
    comfy_stub.mode = "container"
    model = write_model(tmp_path / "merge.safetensors")
    before = sha256(model)
    result = preview(comfy_stub, model)
    assert result.link is not None and (result.link.method, result.link.created) == ("copy", True)
    assert [p["prompt"]["1"]["inputs"]["ckpt_name"] for p in comfy_stub.received] == [link_name(model)] * 2
    assert linked(comfy_stub.root, model) == [] and sha256(model) == before
    assert not [p for p in (comfy_stub.root / "models" / "checkpoints").iterdir() if "partial" in p.name]

def test_a_different_file_of_the_same_name_is_never_replaced(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    model = write_model(tmp_path / "merge.safetensors")
    theirs = comfy_stub.add_file("checkpoints", link_name(model), b"someone else's model")
    with pytest.raises(OrthoMechaError, match=r"already has a different 'merge\.[0-9a-f]{8}\.safetensors'.*rename"):
        preview(comfy_stub, model)
    assert theirs.read_bytes() == b"someone else's model"


def test_a_model_already_in_comfyuis_folder_is_used_in_place(comfy_stub: ComfyStub) -> None:
    model = write_model(comfy_stub.root / "models" / "checkpoints" / "merges" / "m.safetensors")
    link = link_model(model, comfy_stub.root, "checkpoints")
    assert (link.name, link.method, link.created) == ("merges/m.safetensors", "in place", False)
    result = preview(comfy_stub, model)
    assert result.model_name == "merges/m.safetensors" and model.is_file()


def test_a_model_in_a_subfolder_of_comfy_dir_is_sent_as_a_windows_comfyui_lists_it(comfy_stub: ComfyStub,
                                                                                   tmp_path: Path) -> None:
    """A ComfyUI on Windows (or COMFYUI_DIR=/mnt/c/... under WSL) lists ``merges\\m.safetensors``: the model was sent
    as ``merges/m.safetensors`` and refused as "linked as ..., yet ComfyUI does not list it" (QA7 finding 2)."""
    comfy_stub.backslash = True
    model = write_model(comfy_stub.root / "models" / "checkpoints" / "merges" / "m.safetensors")
    result = preview(comfy_stub, model)
    assert result.model_name == "merges\\m.safetensors"
    assert comfy_stub.received[-1]["prompt"]["1"]["inputs"]["ckpt_name"] == "merges\\m.safetensors"
    other = tmp_path / "OtherComfy"  # not the server's folder: nothing is linked, so nothing is said to be
    elsewhere = write_model(other / "models" / "checkpoints" / "m.safetensors")
    with pytest.raises(OrthoMechaError, match=r"it lies in ComfyUI's folder as .*OtherComfy/models/checkpoints/m\."
                       r"safetensors, yet ComfyUI does not list it: is COMFYUI_DIR"):
        preview(comfy_stub, elsewhere, comfy=other)


def test_a_symlinked_model_whose_file_is_in_comfyuis_folder_is_never_deleted(
    comfy_stub: ComfyStub,
    tmp_path: Path,
) -> None:
    real = write_model(comfy_stub.root / "models" / "checkpoints" / "m.safetensors")
    alias = tmp_path / "m.safetensors"
    alias.symlink_to(real)
    assert link_model(alias, comfy_stub.root, "checkpoints").method == "in place"
    with model_linked(alias, comfy_stub.root, "checkpoints"):
        pass
    assert real.is_file()


@settings(max_examples=20, deadline=None)
@given(existing=st.sets(st.integers(1, 6), max_size=5), count=st.integers(1, 4))
def test_save_images_never_overwrites(tmp_path_factory: pytest.TempPathFactory, existing: set[int], count: int) -> None:
    out = tmp_path_factory.mktemp("out")
    for n in existing:
        (out / f"m_{n:03d}.png").write_bytes(b"old")
    images = [PreviewImage(PNG_SIGNATURE + bytes([i]), ImageRef("9", f"x_{i}.png", "", "output")) for i in range(count)]
    written = save_images(images, out, "m")
    assert len(set(written)) == count
    assert all(int(p.stem.split("_")[1]) not in existing for p in written)
    assert [p.read_bytes() for p in written] == [image.data for image in images]
    assert all((out / f"m_{n:03d}.png").read_bytes() == b"old" for n in existing)


@pytest.mark.parametrize("failing", ["fsync", "open"])
def test_an_image_that_cannot_be_written_leaves_no_half_file_and_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A disk that filled up mid-write left a truncated s_001.png under its name, and the error named no file
    (QA7 finding 5)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "s_001.png").write_bytes(b"old")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, full)
    image = PreviewImage(PNG_SIGNATURE + bytes(100), ImageRef("9", "x.png", "", "output"))
    with pytest.raises(OrthoMechaError, match=rf"^{re.escape(str(out / 's_002.png'))}: cannot write.*No space left"):
        save_images([image], out, "s")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["s_001.png"] and (out / "s_001.png").read_bytes() == b"old"


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_preview_writes_pngs(
    comfy_stub: ComfyStub,
    tmp_path: Path,
    cli: Callable,
    digests: Callable,
) -> None:
    model = write_model(tmp_path / "merged.safetensors", {"txt_in.weight": (2, 7680)})
    before = digests(model)
    argv = ["preview", model, "--arch", "zimage-base", "--prompt", "a fox", "--seed", "3", "--steps", "8", "--cfg",
            "1", "--size", "512x768", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out",
            tmp_path / "out"]  # fmt: skip
    result = cli(*argv)
    assert result.code == 0, result.err
    paths = [Path(line) for line in result.out.splitlines()]
    assert [p.name for p in paths] == ["merged_seed3_001.png"]
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    assert "zimage 512x768, 8 steps, cfg 1, seed 3; text encoders/VAE: qwen_3_4b.safetensors, ae.safetensors" in (
        result.err
    )
    sent = comfy_stub.received[-1]["prompt"]
    assert any(node["class_type"] == "ConditioningZeroOut" for node in sent.values())  # turbo settings
    again = cli(*argv)
    assert [Path(line).name for line in again.out.splitlines()] == ["merged_seed3_002.png"]
    assert digests(model) == before


def test_cli_preview_detects_the_architecture_when_arch_is_not_given(
    comfy_stub: ComfyStub, tmp_path: Path, cli: Callable, cli_error: Callable
) -> None:
    flux = write_model(tmp_path / "flux.safetensors", FLUX_KEYS)
    place = ["--prompt", "a fox", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", tmp_path / "out"]
    result = cli("preview", flux, *place)
    assert result.code == 0, result.err
    assert "architecture flux1 (detected from flux.safetensors" in result.err
    assert any(node["class_type"] == "UNETLoader" for node in comfy_stub.received[-1]["prompt"].values())
    unknown = write_model(tmp_path / "custom.safetensors")  # a UNet key, no cross-attention: no built-in architecture
    assert "give --arch, or your own workflow" in cli_error("preview", unknown, *place)
    # Flux.1 in diffusers' layout: UNETLoader converts it to its Flux.1, so the Flux.1 workflow (here dev: guidance)
    diffusers = write_model(tmp_path / "flux_diffusers.safetensors", {
        "x_embedder.weight": (8, 64), "context_embedder.weight": (8, 4096), "transformer_blocks.0.attn.to_q.weight":
        (8, 8), "time_text_embed.guidance_embedder.linear_1.weight": (8, 256)})
    result = cli("preview", diffusers, *place)
    assert result.code == 0, result.err
    assert "architecture flux1 (detected from flux_diffusers.safetensors" in result.err
    sent = comfy_stub.received[-1]["prompt"]
    bfl = write_model(tmp_path / "flux_dev.safetensors", FLUX_KEYS | {"guidance_in.in_layer.weight": (8, 256)})
    assert cli("preview", bfl, *place).code == 0
    same = comfy_stub.received[-1]["prompt"]
    for prompt in (sent, same):  # the files' own names apart, the BFL dev file's workflow
        for node in prompt.values():
            if node["class_type"] in ("UNETLoader", "SaveImage"):
                node["inputs"].pop("unet_name" if node["class_type"] == "UNETLoader" else "filename_prefix")
    assert sent == same


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_an_sd_unet_on_its_own_is_loaded_beside_text_encoder_and_vae_files(
    comfy_stub: ComfyStub, tmp_path: Path, cli: Callable, cli_error: Callable, arch: str, prefix: str
) -> None:
    """An SD1.5/SDXL file holding only the UNet (prefixed or bare) cannot go through CheckpointLoaderSimple: the
    built-in workflow loads it with UNETLoader beside the CLIP and VAE files a checkpoint would hold (COMFYUI.md),
    and says which it lacks; a full checkpoint keeps the checkpoint loader."""
    context = 768 if arch == "sd1" else 2048
    keys = {f"{prefix}input_blocks.{i}.0.weight": (4, 4, 3, 3) for i in range(6)}
    keys[f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (8, context)
    if arch == "sdxl":
        keys[f"{prefix}label_emb.0.0.weight"] = (8, 16)
    unet = write_model(tmp_path / f"{arch}_unet.safetensors", keys)
    place = ["--arch", arch, "--prompt", "a fox", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root,
             "--out", tmp_path / "out"]
    vae = "vae-ft-mse-840000-ema-pruned.safetensors" if arch == "sd1" else "sdxl_vae.safetensors"
    assert f"a VAE like {vae}" in cli_error("preview", unet, *place)
    comfy_stub.add_file("vae", vae)
    comfy_stub.add_file("text_encoders", "clip_g.safetensors")
    result = cli("preview", unet, *place)
    assert result.code == 0, result.err
    nodes = {node["class_type"]: node["inputs"] for node in comfy_stub.received[-1]["prompt"].values()}
    assert nodes["UNETLoader"]["unet_name"] == link_name(unet) and "CheckpointLoaderSimple" not in nodes
    assert nodes["VAELoader"]["vae_name"] == vae
    if arch == "sd1":
        assert (nodes["CLIPLoader"]["clip_name"], nodes["CLIPLoader"]["type"]) == ("clip_l.safetensors",
                                                                                   "stable_diffusion")
    else:
        loader = nodes["DualCLIPLoader"]
        assert (loader["clip_name1"], loader["clip_name2"], loader["type"]) == ("clip_l.safetensors",
                                                                                "clip_g.safetensors", "sdxl")
    full = cli("preview", write_model(tmp_path / "full.safetensors"), *place[2:], "--arch", "sd1")
    assert full.code == 0, full.err
    assert any(node["class_type"] == "CheckpointLoaderSimple" for node in comfy_stub.received[-1]["prompt"].values())


def test_an_sd_checkpoint_lacking_its_vae_or_a_text_encoder_gets_those_files(
    comfy_stub: ComfyStub, tmp_path: Path, cli: Callable, cli_error: Callable
) -> None:
    """A "no-VAE" SD1.5 checkpoint went to CheckpointLoaderSimple alone, whose missing VAE a real ComfyUI refuses
    only once the prompt runs ("VAE is invalid: None"); an SDXL checkpoint without CLIP-G likewise its CLIP. Now the
    VAE file is loaded beside the checkpoint, and a checkpoint short of a text encoder loads like a UNet alone."""
    place = ["--prompt", "a fox", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", tmp_path / "out"]
    no_vae = {k: v for k, v in SD_CHECKPOINT_KEYS.items() if not k.startswith("first_stage_model.")}
    model = write_model(tmp_path / "no_vae.safetensors", no_vae)
    assert "a VAE like vae-ft-mse-840000-ema-pruned.safetensors" in cli_error("preview", model, "--arch", "sd1",
                                                                              *place)  # named before anything is sent
    comfy_stub.add_file("vae", "vae-ft-mse-840000-ema-pruned.safetensors")
    assert cli("preview", model, "--arch", "sd1", *place).code == 0
    nodes = {node["class_type"]: node["inputs"] for node in comfy_stub.received[-1]["prompt"].values()}
    assert nodes["CheckpointLoaderSimple"]["ckpt_name"] == link_name(model)
    assert nodes["VAELoader"]["vae_name"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    decode = next(n for n in comfy_stub.received[-1]["prompt"].values() if n["class_type"] == "VAEDecode")
    assert comfy_stub.received[-1]["prompt"][decode["inputs"]["vae"][0]]["class_type"] == "VAELoader"
    sdxl = {f"model.diffusion_model.input_blocks.{i}.0.weight": (4, 4, 3, 3) for i in range(6)} | {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,),  # CLIP-L only: no CLIP-G
        "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3)}
    comfy_stub.add_file("vae", "sdxl_vae.safetensors")
    comfy_stub.add_file("text_encoders", "clip_g.safetensors")
    assert cli("preview", write_model(tmp_path / "no_clip_g.safetensors", sdxl), "--arch", "sdxl", *place).code == 0
    nodes = {node["class_type"]: node["inputs"] for node in comfy_stub.received[-1]["prompt"].values()}
    assert "CheckpointLoaderSimple" not in nodes and "UNETLoader" in nodes
    assert (nodes["DualCLIPLoader"]["clip_name1"], nodes["DualCLIPLoader"]["clip_name2"]) == (
        "clip_l.safetensors", "clip_g.safetensors")


def test_cli_preview_with_a_user_workflow(comfy_stub: ComfyStub, tmp_path: Path, cli: Callable) -> None:
    graph = build_workflow("sdxl", "x.safetensors", resolve(arch_spec("sdxl"), SETTINGS))
    bindings = find_bindings(graph)
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(graph), encoding="utf-8")
    model = write_model(tmp_path / "m.safetensors")
    place = ["--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", tmp_path]
    seed = ["--set-seed", str(bindings.seed)]
    result = cli("preview", model, "--arch", "sdxl", "--prompt", "owl", "--workflow", workflow, *seed, *place)
    assert result.code == 0, result.err
    assert comfy_stub.received[-1]["prompt"][bindings.prompt.node]["inputs"]["text"] == "owl"


def test_a_named_file_of_another_model_is_warned_on_the_cli(comfy_stub: ComfyStub, tmp_path: Path,
                                                            cli: Callable) -> None:
    """Klein 9B (txt_in 12288 wide) takes Qwen3-8B: naming Qwen3-4B is said before ComfyUI fails on a shape."""
    model = write_model(tmp_path / "klein9b.safetensors", {"txt_in.weight": (2, 12288), "img_in.weight": (2, 4)})
    place = ["--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", tmp_path / "out"]
    result = cli("preview", model, "--arch", "flux2-klein", "--prompt", "p", "--clip", "qwen_3_4b.safetensors", *place)
    assert ("WARNING: the text encoder 'qwen_3_4b.safetensors' is named like another model's file, not one this "
            "flux2-klein model takes (it takes one like qwen_3_8b_fp8mixed.safetensors)") in result.err


def test_cli_preview_errors_are_one_line(comfy_stub: ComfyStub, tmp_path: Path, cli_error: Callable) -> None:
    model = write_model(tmp_path / "m.safetensors")
    common = ["--prompt", "p", "--out", tmp_path / "out"]
    down = f"http://127.0.0.1:{free_port()}"
    assert "is not reachable (connection refused)" in cli_error("preview", model, "--arch", "sd1", "--api", down,
                                                                 *common)  # fmt: skip
    assert "'custom' has no built-in ComfyUI workflow" in cli_error(
        "preview", model, "--arch", "custom", "--api", comfy_stub.url, *common
    )
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}), encoding="utf-8")
    assert "Save (API)" in cli_error("preview", model, "--arch", "sd1", "--workflow", ui, *common)
    assert "--set-model applies only to your own workflow" in cli_error(
        "preview", model, "--arch", "sd1", "--set-model", "1.ckpt_name", *common
    )
    assert "--alphas, --compare apply only to an alpha sweep (--plan PLAN.json)" in cli_error(
        "preview", model, "--arch", "sd1", "--alphas", "0,2", "--compare", *common
    )  # they were ignored without a word
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": str(model), "method": "ortho_superpose", "rows": []}), encoding="utf-8")
    assert "--set-… are not supported with --plan" in cli_error("preview", "--plan", plan, "--set-seed", "3.seed",
                                                                *common)
    assert "size '12' is not WIDTHxHEIGHT" in cli_error("preview", model, "--arch", "sd1", "--size", "12", *common)
    assert "no such model file" in cli_error("preview", tmp_path / "absent.safetensors", "--arch", "sd1", "--api",
                                             comfy_stub.url, *common)  # fmt: skip
    comfy_stub.mode = "error"
    assert "failed running node 1 (CheckpointLoaderSimple)" in cli_error(
        "preview", model, "--arch", "sd1", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, *common
    )
    assert not (tmp_path / "out").exists()  # made for the preview, removed again when it failed
    comfy_stub.mode = "ok"
    (tmp_path / "a-file").write_text("mine")
    received = len(comfy_stub.received)
    assert "cannot create the output folder" in cli_error(
        "preview", model, "--arch", "sd1", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--prompt", "p",
        "--out", tmp_path / "a-file" / "out")
    assert len(comfy_stub.received) == received  # refused before rendering


# --------------------------------------------------------------------------------------------------
# The stand-in speaks ComfyUI's shapes (COMFYUI.md §3)


def test_stub_http_shapes(comfy_stub: ComfyStub, tmp_path: Path) -> None:
    url = comfy_stub.url
    assert requests.get(f"{url}/prompt").json() == {"exec_info": {"queue_remaining": 0}}
    no_prompt = requests.post(f"{url}/prompt", json={"client_id": "x"})
    assert no_prompt.status_code == 400 and no_prompt.headers["Content-Type"] == "application/json; charset=utf-8"
    assert no_prompt.json() == {
        "error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                  "extra_info": {}},
        "node_errors": {},
    }  # fmt: skip
    broken = requests.post(f"{url}/prompt", data=b"{not json")
    assert broken.status_code == 500 and broken.text.startswith("500 Internal Server Error")
    unknown = requests.post(f"{url}/prompt", json={"prompt": {"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}}})
    assert unknown.json()["error"] == {
        "type": "missing_node_type", "message": "Node 'NoSuchNodeXYZ' not found. The custom node may not be installed.",
        "details": "Node ID '#1'", "extra_info": {"node_id": "1", "class_type": "NoSuchNodeXYZ",
                                                  "node_title": "NoSuchNodeXYZ"},
    }  # fmt: skip
    small = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": "abc", "batch_size": 1}},
             "2": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}  # fmt: skip
    errors = requests.post(f"{url}/prompt", json={"prompt": small}).json()["node_errors"]
    assert [e["type"] for e in errors["1"]["errors"]] == ["value_smaller_than_min", "invalid_input_type"]
    assert errors["1"]["dependent_outputs"] == ["3"] and errors["1"]["class_type"] == "EmptyLatentImage"
    assert errors["2"]["errors"][0]["details"] == "vae, received_type(LATENT) mismatch input_type(VAE)"
    assert requests.get(f"{url}/history/not-a-uuid").json() == {}
    assert requests.get(f"{url}/view", params={"filename": "none.png"}).status_code == 404
    assert requests.get(f"{url}/object_info/NoSuchNodeXYZ").json() == {}
    assert requests.get(f"{url}/models").json() == ["checkpoints", "diffusion_models", "text_encoders", "vae", "loras"]

    write_model(comfy_stub.root / "models" / "checkpoints" / "m.safetensors")
    graph = build_workflow("sd1", "m.safetensors", resolve(arch_spec("sd1"), SETTINGS))
    queued = requests.post(f"{url}/prompt", json={"prompt": graph, "client_id": "abc"}).json()
    assert set(queued) == {"prompt_id", "number", "node_errors"} and queued["number"] == 4  # every parsed POST counts
    entry = wait_for(client_for(comfy_stub), queued["prompt_id"], poll_interval=0.01)
    number, prompt_id, prompt, extra, outputs = entry["prompt"]
    assert (number, prompt_id, prompt, extra["client_id"], outputs) == (4, queued["prompt_id"], graph, "abc", ["7"])
    assert entry["outputs"] == {"7": {"images": [{"filename": "m_00001_.png", "subfolder": "ortho-mecha",
                                                  "type": "output"}]}}  # fmt: skip
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["meta"]["7"] == {"node_id": "7", "display_node": "7", "parent_node": None, "real_node_id": "7"}


def test_an_sft_model_is_read_as_safetensors_and_a_models_folder_as_comfy_dir_is_explained(
    comfy_stub: ComfyStub, tmp_path: Path, cli: Callable, cli_error: Callable
) -> None:
    sft = write_model(tmp_path / "flux.safetensors", FLUX_KEYS).rename(tmp_path / "flux.sft")  # an early Flux name
    place = ["--prompt", "a fox", "--api", comfy_stub.url, "--out", tmp_path / "out"]
    result = cli("preview", sft, "--comfy-dir", comfy_stub.root, *place)
    assert result.code == 0, result.err
    assert "architecture flux1 (detected from flux.sft" in result.err
    models = comfy_stub.root / "models"
    assert f"is ComfyUI's models folder itself; set COMFYUI_DIR (or --comfy-dir) to the folder that holds it: " \
           f"{comfy_stub.root}" in cli_error("preview", sft, "--arch", "flux1", "--comfy-dir", models, *place)


def test_an_all_in_one_flux_checkpoint_is_loaded_whole_from_checkpoints(comfy_stub: ComfyStub, tmp_path: Path,
                                                                        cli: Callable) -> None:
    """flux_schnell.json's layout (COMFYUI.md): the diffusion model under its prefix, the text encoders and VAE
    beside it; CheckpointLoaderSimple gives all three, no separate text encoder or VAE files are needed."""
    keys = {f"model.diffusion_model.{key}": shape for key, shape in FLUX_KEYS.items()}
    keys |= {f"model.diffusion_model.single_blocks.{i}.linear1.weight": (4, 4) for i in range(5)}
    keys |= {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (4,),
             "vae.decoder.conv_in.weight": (4, 4, 3, 3)}
    model = write_model(tmp_path / "flux1-schnell-aio.safetensors", keys)
    result = cli("preview", model, "--prompt", "a fox", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root,
                 "--out", tmp_path / "out")
    assert result.code == 0, result.err
    assert "architecture flux1" in result.err and "text encoders/VAE: from the checkpoint" in result.err
    sent = comfy_stub.received[-1]["prompt"]
    classes = [node["class_type"] for node in sent.values()]
    assert "CheckpointLoaderSimple" in classes and not {"UNETLoader", "DualCLIPLoader", "VAELoader"} & set(classes)
    loader = next(node for node in sent.values() if node["class_type"] == "CheckpointLoaderSimple")
    assert loader["inputs"]["ckpt_name"] == link_name(model)  # linked into checkpoints/, where that loader looks
    sampler = next(node["inputs"] for node in sent.values() if node["class_type"] == "KSampler")
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (4, 1.0, "euler")  # schnell: no guidance_in


def test_an_option_the_builtin_workflow_needs_asks_for_a_newer_comfyui() -> None:
    old = Problem("not_in_list", "2", "CLIPLoader", "type", "flux2", ("stable_diffusion", "sdxl"))
    builtin = describe_problem(old, "http://x", "")
    assert "the built-in workflow sets node 2 (CLIPLoader) input 'type' to 'flux2'" in builtin
    assert "update ComfyUI" in builtin and "choose one of" not in builtin
    assert "choose one of: stable_diffusion, sdxl" in describe_problem(old, "http://x", "", own_workflow=True)


def test_a_password_in_the_server_address_is_not_shown(cli_error: Callable, tmp_path: Path) -> None:
    client = ComfyClient("http://me:s3cret@127.0.0.1:9")
    assert (client.base_url, client.address) == ("http://me:***@127.0.0.1:9", "http://me:s3cret@127.0.0.1:9")
    error = cli_error("preview", write_model(tmp_path / "m.safetensors"), "--arch", "sd1", "--prompt", "x",
                      "--api", "http://me:s3cret@127.0.0.1:9", "--out", tmp_path / "out")
    assert "s3cret" not in error and "http://me:***@127.0.0.1:9" in error


def test_a_negative_prompt_without_effect_is_said(comfy_stub: ComfyStub, tmp_path: Path, cli: Callable) -> None:
    """Flux.1 runs at cfg 1, where ComfyUI samples without the negative prompt: a negative given is said to do
    nothing there, and not once the cfg is raised."""
    flux = write_model(tmp_path / "flux.safetensors", FLUX_KEYS)
    place = ["--prompt", "a fox", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", tmp_path / "out"]
    said = "the negative prompt has no effect at cfg 1"
    assert said in cli("preview", flux, *place, "--negative", "blurry").err
    assert said not in cli("preview", flux, *place, "--negative", "blurry", "--cfg", "3.5").err
    assert said not in cli("preview", flux, *place).err


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path: Path) -> None:
    """``timeout`` or systemd stop a preview with SIGTERM: its prompt is interrupted in ComfyUI, the model's link
    leaves ComfyUI's folder and no empty output folder stays (all three were left), with the shell's status 143."""
    stub = ComfyStub(tmp_path / "ComfyUI", delay=60.0)
    stub.add_standard_files()
    stub.start()
    try:
        model = write_model(tmp_path / "slow.safetensors", ZIMAGE_KEYS)
        out = tmp_path / "out"
        run = subprocess.Popen(
            [sys.executable, "-m", "ortho_mecha", "preview", str(model), "--arch", "zimage", "--prompt", "a fox",
             "--api", stub.url, "--comfy-dir", str(stub.root), "--out", str(out)],
            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
        deadline = time.monotonic() + 60
        while not stub.received and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert stub.received, run.stderr.read() if run.stderr else ""
        time.sleep(0.5)  # the prompt is running
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 143
        assert "ortho-mecha: terminated" in (run.stderr.read() if run.stderr else "")
        assert len(stub.interrupts) == 1
        assert linked(stub.root, model, "diffusion_models") == [] and not out.exists()
    finally:
        stub.stop()
