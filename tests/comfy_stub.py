"""A stand-in ComfyUI server for the preview tests: the real endpoints and payload shapes, no torch.

Speaks what ComfyUI 0.33 speaks (``/work/shared/COMFYUI.md``): ``/object_info`` with the real node
classes and input specs of the official templates — legacy ``[[options], {...}]`` combos for the
``nodes.py`` classes, V3 ``["COMBO", {"options": [...]}]`` for the ``comfy_extras`` ones — with the file
lists read from its own ``models/`` folder on every request (so a linked model shows up);
``POST /prompt`` with ComfyUI's validation and its 400 envelopes; a worker that "executes" a queued
prompt after ``delay`` seconds and writes one small real PNG per SaveImage/PreviewImage node;
``/history``, ``/queue``, ``/interrupt``, ``/view``, ``/system_stats``, ``/models``.

Modes: ``ok``; ``error`` (the model loader fails as ComfyUI reports it in the history); ``die`` (the
server goes away as soon as a job starts). ``answer_delay`` makes every answer slow.
"""

from __future__ import annotations

import copy
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]  # fmt: skip
CLIP_TYPES = [
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos", "lumina2", "wan",
    "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis", "longcat_image",
    "cogvideox", "lens", "pixeldit", "ideogram4", "boogu", "krea2", "joyimage", "mage", "minimax",
]  # fmt: skip
DUAL_CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15",
                   "kandinsky5", "kandinsky5_image", "ltxv", "newbie", "ace"]  # fmt: skip
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MODEL_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
# ComfyUI folder name → the directories under models/ it lists (new name first, then the legacy one)
FOLDERS = {
    "checkpoints": ["checkpoints"],
    "diffusion_models": ["diffusion_models", "unet"],
    "text_encoders": ["text_encoders", "clip"],
    "vae": ["vae"],
    "loras": ["loras"],
}
LINK_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "NOISE", "GUIDER", "SAMPLER", "SIGMAS"}
LOADERS = ("CheckpointLoaderSimple", "UNETLoader")
STANDARD_FILES = {
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "qwen_3_4b.safetensors"],
    "vae": ["ae.safetensors", "flux2-vae.safetensors"],
}


# --------------------------------------------------------------------------------------------------
# /object_info: the node classes of the official templates, as a real server describes them


class Files:
    """A file-list combo, filled from the stub's models folder when /object_info is asked."""

    def __init__(self, folder: str, tooltip: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.folder, self.tooltip, self.extra = folder, tooltip, extra


def INT(default: int, lo: int, hi: int, step: int = 1, **opts: Any) -> list[Any]:
    return ["INT", {"default": default, "min": lo, "max": hi, "step": step, **opts}]


def FLOAT(default: float, lo: float, hi: float, step: float, **opts: Any) -> list[Any]:
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **opts}]


def STRING(**opts: Any) -> list[Any]:
    return ["STRING", opts]


def BOOLEAN(default: bool) -> list[Any]:
    return ["BOOLEAN", {"default": default}]


def legacy(options: list[str], **opts: Any) -> list[Any]:
    return [options, opts]


def v3combo(options: list[str], **opts: Any) -> list[Any]:
    return ["COMBO", {"multiselect": False, "options": options, **opts}]


SEED = INT(0, 0, MAX_SEED, control_after_generate=True)
STEPS = INT(20, 1, 10000)
CFG = FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01)
DENOISE = FLOAT(1.0, 0.0, 1.0, 0.01)
BATCH = INT(1, 1, 4096)
DEVICE = {"device": legacy(["default", "cpu"], advanced=True)}


def node(
    name: str,
    module: str,
    category: str,
    required: dict[str, Any],
    outputs: list[str],
    *,
    optional: dict[str, Any] | None = None,
    output_names: list[str] | None = None,
    output_node: bool = False,
    v3: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input": {"required": required, **({"optional": optional} if optional else {})},
        "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": output_names or outputs,
        "name": name,
        "display_name": name,
        "description": "",
        "python_module": module,
        "category": category,
        "output_node": output_node,
    }
    if v3:
        spec.update(
            output_tooltips=[None] * len(outputs), output_matchtypes=None, deprecated=False, experimental=False,
            dev_only=False, api_node=False, price_badge=None, essentials_category=None,
        )  # fmt: skip
    return spec


def _node_classes() -> dict[str, dict[str, Any]]:
    flux, sampler, sd3 = "comfy_extras.nodes_flux", "comfy_extras.nodes_custom_sampler", "comfy_extras.nodes_sd3"
    size16 = INT(1024, 16, 16384, 16)
    classes = [
        node("CheckpointLoaderSimple", "nodes", "loaders",
             {"ckpt_name": Files("checkpoints", "The name of the checkpoint (model) to load.")},
             ["MODEL", "CLIP", "VAE"]),
        node("UNETLoader", "nodes", "advanced/loaders",
             {"unet_name": Files("diffusion_models"), "weight_dtype": legacy(WEIGHT_DTYPES, advanced=True)}, ["MODEL"]),
        node("DualCLIPLoader", "nodes", "advanced/loaders",
             {"clip_name1": Files("text_encoders"), "clip_name2": Files("text_encoders"),
              "type": legacy(DUAL_CLIP_TYPES)}, ["CLIP"], optional=DEVICE),
        node("CLIPLoader", "nodes", "advanced/loaders",
             {"clip_name": Files("text_encoders"), "type": legacy(CLIP_TYPES)}, ["CLIP"], optional=DEVICE),
        node("VAELoader", "nodes", "loaders", {"vae_name": Files("vae", extra=("pixel_space",))}, ["VAE"]),
        node("CLIPTextEncode", "nodes", "conditioning",
             {"text": STRING(multiline=True, dynamicPrompts=True), "clip": ["CLIP"]}, ["CONDITIONING"]),
        node("FluxGuidance", flux, "advanced/conditioning/flux",
             {"conditioning": ["CONDITIONING"], "guidance": FLOAT(3.5, 0.0, 100.0, 0.1)}, ["CONDITIONING"], v3=True),
        node("ConditioningZeroOut", "nodes", "advanced/conditioning", {"conditioning": ["CONDITIONING"]},
             ["CONDITIONING"]),
        node("EmptyLatentImage", "nodes", "latent",
             {"width": INT(512, 16, 16384, 8), "height": INT(512, 16, 16384, 8), "batch_size": BATCH}, ["LATENT"]),
        node("EmptySD3LatentImage", sd3, "latent/sd3", {"width": size16, "height": size16, "batch_size": BATCH},
             ["LATENT"], v3=True),
        node("EmptyFlux2LatentImage", flux, "latent", {"width": size16, "height": size16, "batch_size": BATCH},
             ["LATENT"], v3=True),
        node("EmptyChromaRadianceLatentImage", "comfy_extras.nodes_chroma_radiance", "latent/chroma_radiance",
             {"width": size16, "height": size16, "batch_size": BATCH}, ["LATENT"], v3=True),
        node("Flux2Scheduler", flux, "sampling/custom_sampling/schedulers",
             {"steps": INT(20, 1, 4096), "width": INT(1024, 1, 16384), "height": INT(1024, 1, 16384)}, ["SIGMAS"],
             v3=True),
        node("KSampler", "nodes", "sampling",
             {"model": ["MODEL"], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": legacy(SAMPLERS),
              "scheduler": legacy(SCHEDULERS), "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
              "latent_image": ["LATENT"], "denoise": DENOISE}, ["LATENT"]),
        node("KSamplerAdvanced", "nodes", "sampling",
             {"model": ["MODEL"], "add_noise": legacy(["enable", "disable"]), "noise_seed": SEED, "steps": STEPS,
              "cfg": CFG, "sampler_name": legacy(SAMPLERS), "scheduler": legacy(SCHEDULERS),
              "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
              "start_at_step": INT(0, 0, 10000), "end_at_step": INT(10000, 0, 10000),
              "return_with_leftover_noise": legacy(["disable", "enable"])}, ["LATENT"]),
        node("SamplerCustomAdvanced", sampler, "sampling/custom_sampling",
             {"noise": ["NOISE"], "guider": ["GUIDER"], "sampler": ["SAMPLER"], "sigmas": ["SIGMAS"],
              "latent_image": ["LATENT"]}, ["LATENT", "LATENT"], output_names=["output", "denoised_output"], v3=True),
        node("CFGGuider", sampler, "sampling/custom_sampling/guiders",
             {"model": ["MODEL"], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "cfg": CFG},
             ["GUIDER"], v3=True),
        node("BasicGuider", sampler, "sampling/custom_sampling/guiders",
             {"model": ["MODEL"], "conditioning": ["CONDITIONING"]}, ["GUIDER"], v3=True),
        node("RandomNoise", sampler, "sampling/custom_sampling/noise", {"noise_seed": SEED}, ["NOISE"], v3=True),
        node("KSamplerSelect", sampler, "sampling/custom_sampling/samplers", {"sampler_name": v3combo(SAMPLERS)},
             ["SAMPLER"], v3=True),
        node("BasicScheduler", sampler, "sampling/custom_sampling/schedulers",
             {"model": ["MODEL"], "scheduler": v3combo(SCHEDULERS), "steps": STEPS, "denoise": DENOISE}, ["SIGMAS"],
             v3=True),
        node("BetaSamplingScheduler", sampler, "sampling/custom_sampling/schedulers",
             {"model": ["MODEL"], "steps": STEPS, "alpha": FLOAT(0.6, 0.0, 50.0, 0.01),
              "beta": FLOAT(0.6, 0.0, 50.0, 0.01)}, ["SIGMAS"], v3=True),
        node("ModelSamplingAuraFlow", "comfy_extras.nodes_model_advanced", "advanced/model",
             {"model": ["MODEL"], "shift": FLOAT(1.73, 0.0, 100.0, 0.01)}, ["MODEL"]),
        node("ModelSamplingFlux", "comfy_extras.nodes_model_advanced", "advanced/model",
             {"model": ["MODEL"], "max_shift": FLOAT(1.15, 0.0, 100.0, 0.01),
              "base_shift": FLOAT(0.5, 0.0, 100.0, 0.01), "width": INT(1024, 16, 16384, 8),
              "height": INT(1024, 16, 16384, 8)}, ["MODEL"]),
        node("ChromaRadianceOptions", "comfy_extras.nodes_chroma_radiance", "model_patches/chroma_radiance",
             {"model": ["MODEL"], "preserve_wrapper": BOOLEAN(True), "start_sigma": FLOAT(1.0, 0.0, 1.0, 0.01),
              "end_sigma": FLOAT(0.0, 0.0, 1.0, 0.01), "nerf_tile_size": INT(-1, -1, 8192)}, ["MODEL"],
             optional={"force_sequential_txt_ids": BOOLEAN(False)}, v3=True),
        node("T5TokenizerOptions", "comfy_extras.nodes_cond", "_for_testing/conditioning",
             {"clip": ["CLIP"], "min_padding": INT(0, 0, 10000), "min_length": INT(0, 0, 10000)}, ["CLIP"], v3=True),
        node("ReferenceLatent", "comfy_extras.nodes_edit_model", "advanced/conditioning/edit_models",
             {"conditioning": ["CONDITIONING"]}, ["CONDITIONING"], optional={"latent": ["LATENT"]}, v3=True),
        node("FluxKVCache", flux, "experimental", {"model": ["MODEL"]}, ["MODEL"], v3=True),
        node("VAEDecode", "nodes", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
        node("VAEEncode", "nodes", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"]),
        node("SaveImage", "nodes", "image",
             {"images": ["IMAGE"], "filename_prefix": STRING(default="ComfyUI")}, [], output_node=True),
        node("PreviewImage", "nodes", "image", {"images": ["IMAGE"]}, [], output_node=True),
        node("LoadImage", "nodes", "image", {"image": legacy([], image_upload=True)}, ["IMAGE", "MASK"]),
        node("GetImageSize", "comfy_extras.nodes_images", "image", {"image": ["IMAGE"]}, ["INT", "INT", "INT"],
             output_names=["width", "height", "batch_size"], v3=True),
        node("ImageScaleToTotalPixels", "comfy_extras.nodes_post_processing", "image/upscaling",
             {"image": ["IMAGE"], "upscale_method": v3combo(UPSCALE_METHODS),
              "megapixels": FLOAT(1.0, 0.01, 16.0, 0.01), "resolution_steps": INT(1, 1, 256)}, ["IMAGE"], v3=True),
        node("PrimitiveInt", "comfy_extras.nodes_primitive", "utils/primitive",
             {"value": INT(0, -(2**63), 2**63 - 1, control_after_generate=True)}, ["INT"], v3=True),
        node("PrimitiveStringMultiline", "comfy_extras.nodes_primitive", "utils/primitive",
             {"value": STRING(multiline=True)}, ["STRING"], v3=True),
    ]  # fmt: skip
    return {spec["name"]: spec for spec in classes}


NODE_CLASSES = _node_classes()


# --------------------------------------------------------------------------------------------------
# Validation, as ComfyUI's execution.validate_prompt does it


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _combo(spec: list[Any]) -> list[str] | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1]["options"]
    return None


def _literal_errors(name: str, value: Any, spec: list[Any]) -> list[dict[str, Any]]:
    kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
    options = _combo(spec)
    if options is not None:
        if value in options:
            return []
        long = len(options) > 20
        listed = f"(list of length {len(options)})" if long else str(options)
        return [_error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}",
                       input_name=name, input_config=None if long else spec, received_value=value)]  # fmt: skip
    if kind in ("INT", "FLOAT"):
        try:
            number = int(value) if kind == "INT" else float(value)
        except (TypeError, ValueError) as exc:
            return [_error("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                           f"{name}, {value}, {exc}", input_name=name, input_config=spec, received_value=value,
                           exception_message=str(exc))]  # fmt: skip
        if "min" in opts and number < opts["min"]:
            return [_error("value_smaller_than_min", f"Value {number} smaller than min of {opts['min']}", name,
                           input_name=name, input_config=spec, received_value=value)]  # fmt: skip
        if "max" in opts and number > opts["max"]:
            return [_error("value_bigger_than_max", f"Value {number} bigger than max of {opts['max']}", name,
                           input_name=name, input_config=spec, received_value=value)]  # fmt: skip
    return []


class Validator:
    """One prompt's validation: per node, memoised, ancestors of the output nodes only."""

    def __init__(self, prompt: dict[str, Any], info: dict[str, Any]) -> None:
        self.prompt, self.info = prompt, info
        self.done: dict[str, tuple[bool, list[dict[str, Any]]]] = {}

    def node(self, node_id: str) -> bool:
        if node_id in self.done:
            return self.done[node_id][0]
        self.done[node_id] = (True, [])  # cycles end here
        node = self.prompt[node_id]
        spec = self.info[node["class_type"]]["input"]
        inputs = node.get("inputs", {})
        errors: list[dict[str, Any]] = []
        upstream_ok = True
        for group in ("required", "optional"):
            for name, ispec in (spec.get(group) or {}).items():
                if name not in inputs:
                    if group == "required":
                        errors.append(_error("required_input_missing", "Required input is missing", name,
                                             input_name=name))  # fmt: skip
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    errors += self._link_errors(name, value, ispec)
                    if value and value[0] in self.prompt and not self.node(value[0]):
                        upstream_ok = False
                else:
                    errors += _literal_errors(name, value, ispec)
        self.done[node_id] = (not errors and upstream_ok, errors)
        return self.done[node_id][0]

    def _link_errors(self, name: str, value: list[Any], ispec: list[Any]) -> list[dict[str, Any]]:
        if len(value) != 2:
            return [_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                           name, input_name=name, input_config=ispec, received_value=value)]  # fmt: skip
        source, slot = value
        if source not in self.prompt:
            return [_error("exception_during_validation", "Exception when validating node", repr(str(source)),
                           exception_type="KeyError", traceback=["KeyError: " + repr(str(source))],
                           linked_node=value)]  # fmt: skip
        outputs = self.info[self.prompt[source]["class_type"]]["output"]
        received = outputs[slot] if isinstance(slot, int) and 0 <= slot < len(outputs) else None
        wanted = "COMBO" if isinstance(ispec[0], list) else ispec[0]
        if received != wanted and "*" not in (received, wanted):
            return [_error("return_type_mismatch", "Return type mismatch between linked nodes",
                           f"{name}, received_type({received}) mismatch input_type({wanted})", input_name=name,
                           input_config=ispec, received_type=received, linked_node=value)]  # fmt: skip
        return []

    def run(self) -> tuple[dict[str, Any] | None, list[str], dict[str, Any]]:
        """(400 error envelope or None, outputs to run, node_errors)."""
        for node_id, node in self.prompt.items():
            if "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return {"error": _error("invalid_prompt", message, f"Node ID '#{node_id}'"), "node_errors": {}}, [], {}
            class_type = node["class_type"]
            if class_type not in self.info:
                error = _error("missing_node_type", f"Node '{class_type}' not found. The custom node may not be "
                               "installed.", f"Node ID '#{node_id}'", node_id=node_id, class_type=class_type,
                               node_title=class_type)  # fmt: skip
                return {"error": error, "node_errors": {}}, [], {}
        outputs = [n for n, node in self.prompt.items() if self.info[node["class_type"]]["output_node"]]
        if not outputs:
            return {"error": _error("prompt_no_outputs", "Prompt has no outputs"), "node_errors": {}}, [], {}
        good: list[str] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            if self.node(output):
                good.append(output)
                continue
            for node_id in self._failed_ancestors(output):
                entry = node_errors.setdefault(
                    node_id,
                    {"errors": self.done[node_id][1], "dependent_outputs": [],
                     "class_type": self.prompt[node_id]["class_type"]},
                )  # fmt: skip
                entry["dependent_outputs"].append(output)
        if not good:
            error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
            return {"error": error, "node_errors": node_errors}, [], node_errors
        return None, good, node_errors

    def _failed_ancestors(self, node_id: str) -> list[str]:
        found, stack, seen = [], [node_id], set()
        while stack:
            current = stack.pop()
            if current in seen or current not in self.prompt:
                continue
            seen.add(current)
            if self.done.get(current, (True, []))[1]:
                found.append(current)
            stack += [v[0] for v in self.prompt[current].get("inputs", {}).values() if isinstance(v, list) and v]
        return found


# --------------------------------------------------------------------------------------------------
# The server


def png_bytes(seed: int, size: int = 8) -> bytes:
    """A small real PNG whose colour depends on ``seed``."""
    colour = (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _now_ms() -> int:
    return int(time.time() * 1000)


class ComfyStub:
    """The stand-in server; ``root`` is its ComfyUI folder (``models/``, ``output/``, ``temp/``)."""

    def __init__(self, root: Path, *, delay: float = 0.05, mode: str = "ok", answer_delay: float = 0.0) -> None:
        self.root = root
        for directories in FOLDERS.values():
            for directory in directories:
                (root / "models" / directory).mkdir(parents=True, exist_ok=True)
        self.delay, self.mode, self.answer_delay = delay, mode, answer_delay
        self.missing_classes: set[str] = set()
        self.backslash = False  # list subfolders as a ComfyUI on Windows does (``flux\\x.safetensors``)
        self.object_info_calls = 0
        self.object_info_fails_after: int | None = None  # answer 500 to GET /object_info after this many
        self.prompt_answer: bytes | None = None  # POST /prompt answers 200 with these bytes (a proxy's HTML page)
        self.received: list[dict[str, Any]] = []  # every POST /prompt body that parsed
        self.interrupts: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.pending: list[list[Any]] = []
        self.running: list[Any] | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.images: dict[tuple[str, str, str], bytes] = {}
        self.number = 0
        self.interrupted = threading.Event()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.alive = False
        self._threads: list[threading.Thread] = []

    # set-up -----------------------------------------------------------------------------------------
    def add_file(self, folder: str, name: str, data: bytes = b"stand-in model file") -> Path:
        path = self.root / "models" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def add_standard_files(self) -> None:
        for folder, names in STANDARD_FILES.items():
            for name in names:
                self.add_file(folder, name)

    def start(self) -> None:
        self.alive = True
        self._threads = [
            threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True),
            threading.Thread(target=self._work, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.interrupted.set()
        with self.cond:
            self.cond.notify_all()
        self._die()
        for thread in self._threads:
            thread.join(timeout=10)

    def _die(self) -> None:
        if self.alive:
            self.alive = False
            self.server.shutdown()
            self.server.server_close()

    # what the endpoints serve ------------------------------------------------------------------------
    def files(self, folder: str) -> list[str]:
        names = []
        for directory in FOLDERS[folder]:
            base = self.root / "models" / directory
            for current, _, filenames in os.walk(base, followlinks=True):
                for filename in filenames:
                    if Path(filename).suffix.lower() in MODEL_EXTENSIONS:
                        name = (Path(current) / filename).relative_to(base).as_posix()
                        names.append(name.replace("/", "\\") if self.backslash else name)
        return sorted(set(names))

    def object_info(self) -> dict[str, Any]:
        info = copy.deepcopy(NODE_CLASSES)
        for spec in info.values():
            for inputs in spec["input"].values():
                for input_name, ispec in inputs.items():
                    if isinstance(ispec, Files):
                        opts = {"tooltip": ispec.tooltip} if ispec.tooltip else {}
                        inputs[input_name] = [self.files(ispec.folder) + list(ispec.extra), opts]
        for name in self.missing_classes:
            info.pop(name, None)
        return info

    def queue_prompt(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.cond:
            self.number += 1
            number = self.number
        if "prompt" not in body:
            return 400, {"error": _error("no_prompt", "No prompt provided", "No prompt provided"), "node_errors": {}}
        prompt = body["prompt"]
        self.received.append(body)
        error, outputs, node_errors = Validator(prompt, self.object_info()).run()
        if error is not None:
            return 400, error
        prompt_id = str(uuid.uuid4())
        item = [number, prompt_id, prompt, {"client_id": body.get("client_id"), "create_time": _now_ms()}, outputs]
        with self.cond:
            self.pending.append(item)
            self.cond.notify_all()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def queue(self) -> dict[str, Any]:
        with self.cond:
            return {"queue_running": [self.running] if self.running else [], "queue_pending": list(self.pending)}

    def interrupt(self, body: dict[str, Any]) -> None:
        self.interrupts.append(body)
        with self.cond:
            running_id = self.running[1] if self.running else None
        if running_id is not None and body.get("prompt_id") in (None, running_id):
            self.interrupted.set()

    def delete_pending(self, prompt_ids: list[str]) -> None:
        with self.cond:
            self.pending = [item for item in self.pending if item[1] not in prompt_ids]

    # execution ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping.is_set():
                    self.cond.wait()
                if self.stopping.is_set():
                    return
                item = self.running = self.pending.pop(0)
                self.interrupted.clear()
            if self.mode == "die":
                self._die()
                return
            interrupted = self.interrupted.wait(self.delay)
            entry = self._execute(item, interrupted)
            with self.cond:
                self.history[item[1]] = entry
                self.running = None

    def _execute(self, item: list[Any], interrupted: bool) -> dict[str, Any]:
        number, prompt_id, prompt, extra, outputs = item
        messages: list[list[Any]] = [
            ["execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()}],
            ["execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": _now_ms()}],
        ]
        entry = {"prompt": [number, prompt_id, prompt, extra, outputs], "outputs": {}, "meta": {}}
        failure = self._failure(prompt, prompt_id, interrupted)
        if failure is not None:
            entry["status"] = {"status_str": "error", "completed": False, "messages": [*messages, failure]}
            return entry
        for node_id in outputs:
            entry["outputs"][node_id] = {"images": [self._image(prompt, node_id)]}
            entry["meta"][node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                      "real_node_id": node_id}  # fmt: skip
        messages.append(["execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()}])
        entry["status"] = {"status_str": "success", "completed": True, "messages": messages}
        return entry

    def _failure(self, prompt: dict[str, Any], prompt_id: str, interrupted: bool) -> list[Any] | None:
        """The execution_error / execution_interrupted message this run ends with, if any."""
        loaders = [n for n, node in prompt.items() if node["class_type"] in LOADERS]
        first = loaders[0] if loaders else next(iter(prompt))
        if interrupted:
            return ["execution_interrupted", {"prompt_id": prompt_id, "node_id": first,
                                              "node_type": prompt[first]["class_type"], "executed": [],
                                              "timestamp": _now_ms()}]  # fmt: skip
        inputs = prompt[first]["inputs"]
        folder = "checkpoints" if "ckpt_name" in inputs else "diffusion_models"
        name = f"{folder}/{inputs.get('ckpt_name') or inputs.get('unet_name')}"
        if self.mode == "container" and (self.root / "models" / name).is_symlink():
            # ComfyUI in a container: a symbolic link to a path outside it leads nowhere
            return ["execution_error", self._error_message(prompt_id, first, prompt[first]["class_type"],
                    "FileNotFoundError", f"[Errno 2] No such file or directory: '/ComfyUI/models/{name}'",
                    {k: [v] for k, v in inputs.items()})]  # fmt: skip
        if self.mode == "error":
            return ["execution_error", self._error_message(prompt_id, first, prompt[first]["class_type"],
                    "RuntimeError", f"ERROR: Could not detect model type of: {self.root / 'models' / name}\n\n",
                    {k: [v] for k, v in inputs.items()})]  # fmt: skip
        for node_id, node in prompt.items():  # a literal where a link belongs fails when the node runs
            spec = NODE_CLASSES[node["class_type"]]["input"]
            for group in spec.values():
                for name, ispec in group.items():
                    value = node.get("inputs", {}).get(name)
                    link_type = isinstance(ispec, list) and isinstance(ispec[0], str) and ispec[0] in LINK_TYPES
                    if link_type and value is not None and not isinstance(value, list):
                        return ["execution_error", self._error_message(
                            prompt_id, node_id, node["class_type"], "AttributeError",
                            f"'{type(value).__name__}' object has no attribute 'clone'", {name: [value]})]  # fmt: skip
        return None

    @staticmethod
    def _error_message(prompt_id: str, node_id: str, node_type: str, kind: str, message: str,
                       current_inputs: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        return {
            "prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": [],
            "exception_message": message, "exception_type": kind,
            "traceback": ['  File "execution.py", line 496, in execute\n', "    ...\n", "\n", "\n", "\n",
                          f"{kind}: {message}"],
            "current_inputs": current_inputs, "current_outputs": [], "timestamp": _now_ms(),
        }  # fmt: skip

    def _image(self, prompt: dict[str, Any], node_id: str) -> dict[str, str]:
        node = prompt[node_id]
        seed = next((v for n in prompt.values() for k, v in n["inputs"].items() if k in ("seed", "noise_seed")), 0)
        if isinstance(seed, list):  # linked to a primitive node
            seed = prompt[str(seed[0])]["inputs"].get("value", 0)
        if node["class_type"] == "SaveImage":
            prefix = node["inputs"].get("filename_prefix", "ComfyUI")
            subfolder, _, stem = prefix.rpartition("/")
            kind = "output"
        else:
            subfolder, stem, kind = "", f"ComfyUI_temp_{uuid.uuid4().hex[:5]}", "temp"
        counter = 1 + sum(1 for key in self.images if key[0] == kind and key[1] == subfolder)
        filename = f"{stem}_{counter:05d}_.png"
        self.images[(kind, subfolder, filename)] = png_bytes(int(seed))
        return {"filename": filename, "subfolder": subfolder, "type": kind}

    def system_stats(self) -> dict[str, Any]:
        return {
            "system": {"os": "linux", "ram_total": 8 << 30, "ram_free": 4 << 30, "comfyui_version": "0.33.0",
                       "required_frontend_version": "1.30.0", "installed_templates_version": "0.11.44",
                       "required_templates_version": "0.11.44", "comfy_package_versions": [],
                       "python_version": "3.11.2", "pytorch_version": "2.13.0+cpu", "embedded_python": False,
                       "deploy_environment": "local-git", "argv": ["main.py", "--cpu"]},
            "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                         "torch_vram_total": 0, "torch_vram_free": 0}],
        }  # fmt: skip


def _handler(stub: ComfyStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests read results, not logs."""

        def _send(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload: Any, status: int = 200) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self) -> None:
            stub.stopping.wait(stub.answer_delay)
            url = urlparse(self.path)
            parts = [p for p in url.path.split("/") if p]
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if parts == ["object_info"]:
                stub.object_info_calls += 1
                if stub.object_info_fails_after is not None and stub.object_info_calls > stub.object_info_fails_after:
                    self._send(500, b"500 Internal Server Error\n\nServer got itself in trouble", "text/plain")
                else:
                    self._json(stub.object_info())
            elif len(parts) == 2 and parts[0] == "object_info":
                info = stub.object_info()
                self._json({parts[1]: info[parts[1]]} if parts[1] in info else {})
            elif parts == ["prompt"]:
                queue = stub.queue()
                self._json(
                    {"exec_info": {"queue_remaining": len(queue["queue_running"]) + len(queue["queue_pending"])}}
                )
            elif parts == ["history"]:
                items = list(stub.history.items())[-int(query.get("max_items", 10**9)) :]
                self._json(dict(items))
            elif len(parts) == 2 and parts[0] == "history":
                self._json({parts[1]: stub.history[parts[1]]} if parts[1] in stub.history else {})
            elif parts == ["queue"]:
                self._json(stub.queue())
            elif parts == ["view"]:
                key = (query.get("type", "output"), query.get("subfolder", ""), query.get("filename", ""))
                if key in stub.images:
                    self._send(200, stub.images[key], "image/png")
                else:
                    self._send(404)
            elif parts == ["system_stats"]:
                self._json(stub.system_stats())
            elif parts == ["models"]:
                self._json(list(FOLDERS))
            elif len(parts) == 2 and parts[0] == "models" and parts[1] in FOLDERS:
                self._json(stub.files(parts[1]))
            else:
                self._send(404, b"404: Not Found", "text/plain; charset=utf-8")

        def do_POST(self) -> None:
            stub.stopping.wait(stub.answer_delay)
            path = urlparse(self.path).path
            try:
                body = self._body()
            except json.JSONDecodeError:
                self._send(500, b"500 Internal Server Error\n\nServer got itself in trouble", "text/plain")
                return
            if path == "/prompt" and stub.prompt_answer is not None:
                self._send(200, stub.prompt_answer, "text/html")
                return
            if path == "/prompt":
                status, payload = stub.queue_prompt(body)
                self._json(payload, status)
                return
            if path == "/interrupt":
                stub.interrupt(body)
            elif path == "/queue":
                if body.get("clear"):
                    stub.delete_pending([item[1] for item in stub.queue()["queue_pending"]])
                stub.delete_pending(body.get("delete", []))
            elif path == "/history":
                if body.get("clear"):
                    stub.history.clear()
                for prompt_id in body.get("delete", []):
                    stub.history.pop(prompt_id, None)
            else:
                self._send(404, b"404: Not Found", "text/plain; charset=utf-8")
                return
            self._send(200)

    return Handler


@pytest.fixture(name="comfy_stub")
def comfy_stub_fixture(tmp_path: Path) -> Iterator[ComfyStub]:
    """``comfy_stub``: a running stand-in ComfyUI with the standard text encoders and VAEs.

    Import ``comfy_stub_fixture`` into a test module to use it; configure the stub before queueing.
    """
    stub = ComfyStub(tmp_path / "ComfyUI")
    stub.add_standard_files()
    stub.start()
    yield stub
    stub.stop()
