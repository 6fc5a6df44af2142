"""ComfyUI workflows in API format: one built-in graph per architecture, and the user's own graphs.

API format is what ComfyUI's ``POST /prompt`` takes and what its "Save (API)" menu entry writes: a
dict of node id → ``{"class_type": ..., "inputs": {...}}``, where an input is either a literal or a
link ``[source_node_id, output_index]``. Everything here is pure: functions take names and numbers and
return dicts, so the CLI, the dashboard's Preview page and an alpha sweep all build the same graphs.

The built-in graphs follow ComfyUI's official templates (see ``/work/shared/COMFYUI.md``):

======================  ==========================  ==================================================
arch                    loaders                     sampling (defaults)
======================  ==========================  ==================================================
``sd1``                 CheckpointLoaderSimple      KSampler 20 steps, cfg 8, euler/normal, 512²
``sdxl``                CheckpointLoaderSimple      KSamplerAdvanced 25 steps, cfg 8, euler/normal, 1024²
``flux1``               UNETLoader, DualCLIPLoader  KSampler 20 steps (schnell: 4), cfg 1, euler/simple
                        (clip_l + t5xxl, ``flux``),
                        VAELoader ae
``flux2-klein``         UNETLoader, CLIPLoader      SamplerCustomAdvanced: CFGGuider cfg 5, euler,
                        (qwen_3_4b/8b, ``flux2``),  Flux2Scheduler 20 steps (Klein base; the distilled
                        VAELoader flux2-vae         model wants ``--steps 4 --cfg 1``)
``chroma``              UNETLoader, CLIPLoader      SamplerCustomAdvanced: T5TokenizerOptions,
                        (t5xxl, ``chroma``),        ModelSamplingAuraFlow 1, CFGGuider 3.5, euler,
                        VAELoader ae                BasicScheduler beta 26 steps
``zimage``              UNETLoader, CLIPLoader      ModelSamplingAuraFlow 3, KSampler 25 steps, cfg 4,
                        (qwen_3_4b, ``lumina2``),   res_multistep/simple (Z-Image Base; Turbo wants
                        VAELoader ae                ``--steps 8 --cfg 1``)
======================  ==========================  ==================================================

Negative prompt: SD1.5, SDXL and Chroma always encode one (empty text when none is given). Flux.1,
Klein and Z-Image encode one too, except at cfg 1 with no negative text, where — as their distilled
templates do — the negative is ``ConditioningZeroOut`` of the positive (cfg 1 ignores it anyway).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from ortho_mecha.arch import ALIASES, canonical_arch
from ortho_mecha.errors import OrthoMechaError

logger = logging.getLogger(__name__)

Graph = dict[str, dict[str, Any]]
Link = list[Any]  # [source node id, output index]

BUILTIN_ARCHS = ("sd1", "sdxl", "flux1", "flux2-klein", "chroma", "zimage")
MAX_SEED = 2**64 - 1
SAVE_PREFIX = "ortho-mecha"

# Which models folder a file-name input reads from (ComfyUI's folder_paths names).
FILE_FOLDERS = {
    "ckpt_name": "checkpoints",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "vae_name": "vae",
    "lora_name": "loras",
}
FOLDER_ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}  # ComfyUI's older folder names
MODEL_INPUTS = ("unet_name", "ckpt_name")
SEED_INPUTS = ("seed", "noise_seed")


DEFAULT_ALPHAS = "0.5,1,1.5"  # an alpha sweep's global alphas unless given


class Wanted(NamedTuple):
    """A kind of file ComfyUI should offer: an example name (for messages) and patterns, most preferred first.

    Patterns are regular expressions searched in the lower-cased file name (without its subfolder).
    """

    example: str
    patterns: tuple[str, ...]


T5XXL = Wanted("t5xxl_fp16.safetensors", (r"t5xxl_fp16", r"t5xxl"))
CLIP_L = Wanted("clip_l.safetensors", (r"^clip_l\.", r"clip_l"))
CLIP_G = Wanted("clip_g.safetensors", (r"^clip_g\.", r"clip_g"))
SD1_VAE = Wanted("vae-ft-mse-840000-ema-pruned.safetensors", (r"vae-ft-mse", r"^sd[-_]?(v?1[-_.]?5)?[-_]?vae"))
SDXL_VAE = Wanted("sdxl_vae.safetensors", (r"^sdxl[-_]?vae", r"sdxl.*vae"))
QWEN3_4B = Wanted("qwen_3_4b.safetensors", (r"^qwen_?3_?4b\.", r"qwen_?3_?4b"))
QWEN3_8B = Wanted("qwen_3_8b_fp8mixed.safetensors", (r"^qwen_?3_?8b\.", r"qwen_?3_?8b"))
MISTRAL3 = Wanted("mistral_3_small_flux2_bf16.safetensors", (r"mistral_?3_?small_?flux2",))
FLUX1_VAE = Wanted("ae.safetensors", (r"^ae\.(safetensors|sft)$", r"^flux_?1?[-_]vae"))
FLUX2_VAE = Wanted("flux2-vae.safetensors", (r"^flux2[-_]vae", r"full_encoder_small_decoder"))
# SD1.5/SDXL files holding only the UNet: the text encoders and VAE their checkpoints would hold (COMFYUI.md)
SEPARATE_PARTS = {"sd1": ((CLIP_L,), SD1_VAE), "sdxl": ((CLIP_L, CLIP_G), SDXL_VAE)}
# Flux.2 txt_in input width → its text encoder (3 stacked hidden layers of the LLM).
FLUX2_TEXT_DIMS = {7680: QWEN3_4B, 12288: QWEN3_8B, 15360: MISTRAL3}
# the FluxGuidance of a guidance-distilled model (one with guidance_in), which its --cfg sets: the Flux.2 dev
# template's 4, and Flux.1 dev's 3.5 (ComfyUI's default when no FluxGuidance node is there); its sampler's cfg is 1
DEV_GUIDANCE = {"flux2-klein": 4.0, "flux1": 3.5}


@dataclass(frozen=True)
class ModelFacts:
    """What the model file itself tells about which variant it is (``None``: not known)."""

    text_dim: int | None = None  # Flux.2: txt_in.weight.shape[1]
    guidance: bool | None = None  # Flux.1: has guidance_in (dev) or not (schnell)
    all_in_one: bool = False  # a checkpoint holding its text encoders and VAE beside the diffusion model
    diffusion_only: bool = False  # SD1.5/SDXL: lacks its text encoder(s) (a UNet on its own, or a pruned checkpoint)
    no_vae: bool = False  # SD1.5/SDXL: a checkpoint without its VAE ("no-VAE" releases)


@dataclass(frozen=True)
class PreviewSettings:
    """What the user asks for; ``None`` means the architecture's default, empty ``clip`` means auto."""

    prompt: str
    negative: str | None = None  # built-in workflows: empty; the user's own: its own text
    seed: int | None = None  # built-in workflows: 0; the user's own: its own seed
    steps: int | None = None
    cfg: float | None = None
    size: tuple[int, int] | None = None
    clip: tuple[str, ...] = ()
    vae: str | None = None


@dataclass(frozen=True)
class Resolved:
    """Settings with every default filled in and every file chosen: exactly what goes into the graph."""

    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    text_encoders: tuple[str, ...]  # (): the checkpoint's own
    vae: str | None  # None: the checkpoint's own VAE
    guided: bool = False  # Flux.1/Flux.2 dev: cfg is the FluxGuidance value (no negative); the sampler's cfg is 1


@dataclass(frozen=True)
class ArchSpec:
    """One architecture's built-in workflow: its loader, defaults and file preferences."""

    arch: str
    loader: str
    steps: int
    cfg: float
    size: int
    size_step: int
    text_encoders: tuple[Wanted, ...]  # one per text-encoder slot; () = from the checkpoint
    vae: Wanted | None  # None = from the checkpoint
    zero_negative: bool  # ConditioningZeroOut negative at cfg 1 with no negative text
    build: Callable[[str, Resolved], Graph]

    @property
    def model_input(self) -> str:
        return "unet_name" if self.loader == "UNETLoader" else "ckpt_name"

    @property
    def model_folder(self) -> str:
        return FILE_FOLDERS[self.model_input]


def arch_id(arch: str) -> str:
    """The canonical id of ``arch`` (aliases ``chroma-flow``, ``zimage-base`` accepted)."""
    try:
        return canonical_arch(arch)
    except ValueError as exc:
        raise OrthoMechaError(str(exc)) from None


def arch_spec(arch: str) -> ArchSpec:
    """The built-in workflow of ``arch``; ``custom`` (and anything unknown) has none."""
    arch = arch_id(arch)
    if arch not in SPECS:
        raise OrthoMechaError(
            f"architecture '{arch}' has no built-in ComfyUI workflow; pass your own with --workflow FILE.json "
            f'(exported from ComfyUI with "Save (API)"). Built-in: {", ".join(BUILTIN_ARCHS)} '
            f"(aliases: {', '.join(ALIASES)})"
        )
    return SPECS[arch]


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` → ``(1024, 768)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise OrthoMechaError(f"size '{text}' is not WIDTHxHEIGHT (for example 1024x1024)")
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------------------------------
# Choosing text encoders and VAE from what ComfyUI offers


def _file_name(option: str) -> str:
    return option.replace("\\", "/").rsplit("/", 1)[-1].lower()


def pick_file(options: Sequence[str], wanted: Wanted) -> str | None:
    """The option matching the earliest pattern; among equals the shortest, then alphabetical; else None."""
    for pattern in wanted.patterns:
        found = [o for o in options if re.search(pattern, _file_name(o))]
        if found:
            return min(found, key=lambda o: (len(o), o))
    return None


def text_encoders_wanted(spec: ArchSpec, facts: ModelFacts) -> tuple[Wanted, ...]:
    """What each text-encoder slot wants (none for a checkpoint holding its own); Flux.2 picks its LLM from the
    model's txt_in width."""
    if not spec.text_encoders:
        return ()
    if spec.arch == "flux2-klein" and facts.text_dim is not None:
        if facts.text_dim not in FLUX2_TEXT_DIMS:
            known = ", ".join(str(d) for d in FLUX2_TEXT_DIMS)
            raise OrthoMechaError(
                f"this Flux.2 model's txt_in takes {facts.text_dim} features, which matches no known text encoder "
                f"({known}); name the text encoder with --clip"
            )
        return (FLUX2_TEXT_DIMS[facts.text_dim],)
    return spec.text_encoders


def choose_files(
    spec: ArchSpec,
    settings: PreviewSettings,
    text_encoder_options: Sequence[str],
    vae_options: Sequence[str],
    facts: ModelFacts = ModelFacts(),
    server: str = "ComfyUI",
) -> tuple[tuple[str, ...], str | None]:
    """The text encoders and VAE for ``spec``: the user's names, or the best match among ComfyUI's files. Every
    file ComfyUI lacks is named in one error (a fresh ComfyUI may lack all of Flux.1's clip_l, t5xxl and ae), which
    names the ``server``."""
    slots = spec.text_encoders if settings.clip else text_encoders_wanted(spec, facts)  # named: no width needed
    missing: list[str] = []
    if settings.clip:
        if len(settings.clip) != len(slots):
            wanted = "no text encoder files (the checkpoint holds them)" if not slots else f"{len(slots)} --clip"
            raise OrthoMechaError(f"{spec.arch} takes {wanted}, but --clip was given {len(settings.clip)} time(s)")
        encoders = tuple(settings.clip)
    elif spec.arch == "flux2-klein" and facts.text_dim is None and spec.text_encoders:
        encoders = (_pick_klein_encoder(text_encoder_options),)
    else:
        encoders = tuple(_pick(text_encoder_options, wanted, "text encoder", missing) for wanted in slots)
    if settings.vae is not None:
        vae: str | None = settings.vae
    elif spec.vae is not None:
        vae = _pick(vae_options, spec.vae, "VAE", missing)
    else:
        vae = None
    if missing:
        kinds = (("text encoder", "models/text_encoders"), ("VAE", "models/vae"))
        lacking = [folder for kind, folder in kinds if any(item.startswith(f"a {kind} ") for item in missing)]
        folders = " and ".join(lacking)
        raise OrthoMechaError(
            f"{server} lacks files the built-in {spec.arch} workflow needs: {'; '.join(missing)}. Put them in "
            f"ComfyUI's {folders}, or name yours with --clip / --vae (on the Preview page: Text encoder file(s), "
            "VAE file)"
        )
    return encoders, vae


KNOWN_FILES = (T5XXL, CLIP_L, CLIP_G, QWEN3_4B, QWEN3_8B, MISTRAL3, FLUX1_VAE, FLUX2_VAE, SD1_VAE, SDXL_VAE)


def named_file_doubts(spec: ArchSpec, settings: PreviewSettings, facts: ModelFacts = ModelFacts()) -> list[str]:
    """Why a text encoder or VAE the user named (--clip, --vae) may not fit ``spec`` for a model of these
    ``facts``: its name is that of another model's known file (:data:`KNOWN_FILES`) and of none this one takes.
    Warnings only: a renamed file matches no known name and is trusted, and ComfyUI's answer decides."""
    try:
        encoders = text_encoders_wanted(spec, facts)
    except OrthoMechaError:  # a Flux.2 width no encoder is known for: any Flux.2 encoder may be the one
        encoders = tuple(FLUX2_TEXT_DIMS.values())
    if spec.arch == "flux2-klein" and facts.text_dim is None and encoders:
        encoders = tuple(FLUX2_TEXT_DIMS.values())  # 4B, 9B or dev: not known without the model's txt_in
    named = (("text encoder", settings.clip, encoders),
             ("VAE", (settings.vae,) if settings.vae else (),
              (spec.vae,) if spec.vae else (SEPARATE_PARTS[spec.arch][1],) if spec.arch in SEPARATE_PARTS else ()))
    doubts = []
    for role, names, fits in named:
        for name in names:
            others = [w for w in KNOWN_FILES if w not in fits and pick_file([name], w)]
            if not others or any(pick_file([name], w) for w in fits):
                continue
            takes = (f"it takes one like {' or '.join(w.example for w in fits)}" if fits
                     else f"it takes a {role} of its own family")
            doubts.append(f"the {role} '{name}' is named like another model's file, not one this {spec.arch} model "
                          f"takes ({takes}); ComfyUI will likely fail with a shape mismatch")
    return doubts


def _pick(options: Sequence[str], wanted: Wanted, role: str, missing: list[str]) -> str:
    """The best of ``options`` for ``wanted``; with none, "" and what is missing added to ``missing``."""
    chosen = pick_file(options, wanted)
    if chosen is None:
        folder = "text_encoders" if role == "text encoder" else "vae"
        missing.append(f"a {role} like {wanted.example} (its {folder} list has: {', '.join(options) or 'nothing'})")
        return ""
    return chosen


def _pick_klein_encoder(options: Sequence[str]) -> str:
    """Klein 4B uses Qwen3-4B, 9B Qwen3-8B; with the model size unknown only an unambiguous list decides."""
    found = [f for f in (pick_file(options, QWEN3_4B), pick_file(options, QWEN3_8B)) if f is not None]
    if len(found) == 1:
        return found[0]
    if not found:
        raise OrthoMechaError(
            f"ComfyUI offers no text encoder for flux2-klein (looked for {QWEN3_4B.example} or {QWEN3_8B.example}; "
            f"its text_encoders list has: {', '.join(options) or 'nothing'}); put one in ComfyUI's "
            "models/text_encoders or name one with --clip"
        )
    raise OrthoMechaError(
        f"cannot tell whether this is Klein 4B or 9B, and ComfyUI has both {found[0]} and {found[1]}; "
        "name the text encoder with --clip"
    )


def resolve(
    spec: ArchSpec,
    settings: PreviewSettings,
    text_encoder_options: Sequence[str] = (),
    vae_options: Sequence[str] = (),
    facts: ModelFacts = ModelFacts(),
    server: str = "ComfyUI",
) -> Resolved:
    """Fill in ``spec``'s defaults, check the numbers, and choose the files (``server`` names ComfyUI in errors)."""
    guided = spec.arch in DEV_GUIDANCE and facts.guidance is True
    steps = settings.steps if settings.steps is not None else _default_steps(spec, facts)
    cfg = settings.cfg if settings.cfg is not None else DEV_GUIDANCE[spec.arch] if guided else spec.cfg
    width, height = settings.size if settings.size is not None else (spec.size, spec.size)
    if not 1 <= steps <= 10000:
        raise OrthoMechaError(f"steps must be between 1 and 10000, got {steps}")
    if not 0.0 <= cfg <= 100.0:
        raise OrthoMechaError(f"cfg must be between 0 and 100, got {cfg}")
    for name, value in (("width", width), ("height", height)):
        if not 16 <= value <= 16384 or value % spec.size_step:
            raise OrthoMechaError(
                f"{name} {value} does not fit {spec.arch}: use a multiple of {spec.size_step} between 16 and 16384"
            )
    seed = 0 if settings.seed is None else settings.seed
    _check_seed(seed)
    encoders, vae = choose_files(spec, settings, text_encoder_options, vae_options, facts, server)
    return Resolved(settings.prompt, settings.negative or "", seed, steps, cfg, width, height, encoders, vae, guided)


def unused_negative(s: Resolved) -> str | None:
    """Why the negative prompt of these settings has no effect, or None: a dev model's workflow (Flux.1, Flux.2) takes
    guidance, not a negative, and at cfg 1 ComfyUI samples without the negative."""
    if not s.negative:
        return None
    if s.guided:
        return "the negative prompt has no effect: a dev model's workflow uses guidance (FluxGuidance), not a negative"
    if s.cfg == 1.0:
        return "the negative prompt has no effect at cfg 1 (ComfyUI samples without it); raise the cfg to use it"
    return None


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise OrthoMechaError(f"seed must be between 0 and {MAX_SEED}, got {seed}")


def _default_steps(spec: ArchSpec, facts: ModelFacts) -> int:
    if spec.arch == "flux1" and facts.guidance is False:
        return 4  # Flux.1 schnell (no guidance_in): the schnell template's 4 steps
    return spec.steps


# --------------------------------------------------------------------------------------------------
# Built-in graphs


class _Graph:
    """Nodes numbered in the order they are added; ``add`` returns the new node's id."""

    def __init__(self) -> None:
        self.nodes: Graph = {}

    def add(self, class_type: str, title: str | None = None, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[node_id]["_meta"] = {"title": title}
        return node_id


def _out(node_id: str, index: int = 0) -> Link:
    return [node_id, index]


def _save_prefix(model_name: str) -> str:
    stem = Path(model_name.replace("\\", "/")).stem
    return f"{SAVE_PREFIX}/{re.sub(r'[^A-Za-z0-9._-]+', '_', stem) or 'preview'}"


def _prompts(g: _Graph, clip: Link, s: Resolved, zero_negative: bool) -> tuple[Link, Link]:
    positive = g.add("CLIPTextEncode", "Positive prompt", text=s.prompt, clip=clip)
    if zero_negative and s.cfg == 1.0 and not s.negative:
        return _out(positive), _out(g.add("ConditioningZeroOut", "Negative (zeroed)", conditioning=_out(positive)))
    return _out(positive), _out(g.add("CLIPTextEncode", "Negative prompt", text=s.negative, clip=clip))


def _guided_prompt(g: _Graph, clip: Link, s: Resolved) -> tuple[Link, Link]:
    """(the prompt's conditioning, it with a guidance-distilled dev model's guidance: FluxGuidance at ``s.cfg``)."""
    encoded = _out(g.add("CLIPTextEncode", "Positive prompt", text=s.prompt, clip=clip))
    return encoded, _out(g.add("FluxGuidance", conditioning=encoded, guidance=s.cfg))


def _finish(g: _Graph, samples: Link, vae: Link, model_name: str) -> Graph:
    image = g.add("VAEDecode", samples=samples, vae=vae)
    g.add("SaveImage", filename_prefix=_save_prefix(model_name), images=_out(image))
    return g.nodes


def _checkpoint_graph(model_name: str, s: Resolved, *, advanced: bool, clip_type: str) -> Graph:
    g = _Graph()
    model, clip, vae = _loaders(g, model_name, s, clip_type)
    positive, negative = _prompts(g, clip, s, zero_negative=False)
    latent = g.add("EmptyLatentImage", width=s.width, height=s.height, batch_size=1)
    common = {
        "model": model,
        "steps": s.steps,
        "cfg": s.cfg,
        "sampler_name": "euler",
        "scheduler": "normal",
        "positive": positive,
        "negative": negative,
        "latent_image": _out(latent),
    }
    if advanced:
        sampler = g.add(
            "KSamplerAdvanced",
            add_noise="enable",
            noise_seed=s.seed,
            start_at_step=0,
            end_at_step=10000,
            return_with_leftover_noise="disable",
            **common,
        )
    else:
        sampler = g.add("KSampler", seed=s.seed, denoise=1.0, **common)
    return _finish(g, _out(sampler), vae, model_name)


def build_sd1(model_name: str, s: Resolved) -> Graph:
    """SD1.5: the ComfyUI default graph (CheckpointLoaderSimple → KSampler); a UNet on its own through UNETLoader,
    CLIPLoader ``stable_diffusion`` and VAELoader."""
    return _checkpoint_graph(model_name, s, advanced=False, clip_type="stable_diffusion")


def build_sdxl(model_name: str, s: Resolved) -> Graph:
    """SDXL: the sdxl_simple_example base pass (KSamplerAdvanced over all steps, no refiner); a UNet on its own
    through UNETLoader, DualCLIPLoader ``sdxl`` (clip_l, clip_g) and VAELoader."""
    return _checkpoint_graph(model_name, s, advanced=True, clip_type="sdxl")


def _loaders(g: _Graph, model_name: str, s: Resolved, clip_type: str) -> tuple[Link, Link, Link]:
    """(MODEL, CLIP, VAE): UNETLoader with the chosen text encoder and VAE files, or, for a checkpoint holding
    them (no text encoders chosen: SD1.5/SDXL, a DiT family's all-in-one file), CheckpointLoaderSimple's three
    outputs (flux_schnell.json's way); a VAE the user named replaces the checkpoint's."""
    if not s.text_encoders:
        ckpt = g.add("CheckpointLoaderSimple", "Model", ckpt_name=model_name)
        vae = _out(g.add("VAELoader", vae_name=s.vae)) if s.vae else _out(ckpt, 2)
        return _out(ckpt), _out(ckpt, 1), vae
    model = _out(g.add("UNETLoader", "Model", unet_name=model_name, weight_dtype="default"))
    if len(s.text_encoders) == 2:
        clip = _out(
            g.add("DualCLIPLoader", clip_name1=s.text_encoders[0], clip_name2=s.text_encoders[1], type=clip_type)
        )
    else:
        clip = _out(g.add("CLIPLoader", clip_name=s.text_encoders[0], type=clip_type))
    return model, clip, _out(g.add("VAELoader", vae_name=s.vae))


def _ksampler_dit_graph(model_name: str, s: Resolved, *, clip_type: str, shift: float | None) -> Graph:
    g = _Graph()
    model, clip, vae = _loaders(g, model_name, s, clip_type)
    if shift is not None:
        model = _out(g.add("ModelSamplingAuraFlow", model=model, shift=shift))
    if s.guided:  # Flux.1 dev: --cfg is its distilled guidance; the sampler runs at cfg 1, the negative zeroed
        encoded, positive = _guided_prompt(g, clip, s)
        negative = _out(g.add("ConditioningZeroOut", "Negative (zeroed)", conditioning=encoded))
    else:
        positive, negative = _prompts(g, clip, s, zero_negative=True)
    latent = g.add("EmptySD3LatentImage", width=s.width, height=s.height, batch_size=1)
    sampler_name, scheduler = ("res_multistep", "simple") if shift is not None else ("euler", "simple")
    sampler = g.add(
        "KSampler",
        model=model,
        seed=s.seed,
        steps=s.steps,
        cfg=1.0 if s.guided else s.cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=negative,
        latent_image=_out(latent),
        denoise=1.0,
    )
    return _finish(g, _out(sampler), vae, model_name)


def build_flux1(model_name: str, s: Resolved) -> Graph:
    """Flux.1: flux_dev_full_text_to_image (UNETLoader, DualCLIPLoader flux, KSampler euler/simple); dev (a model
    with guidance_in) with its guidance in a FluxGuidance node (3.5, ComfyUI's default; --cfg sets it)."""
    return _ksampler_dit_graph(model_name, s, clip_type="flux", shift=None)


def build_zimage(model_name: str, s: Resolved) -> Graph:
    """Z-Image: image_z_image_turbo's graph (ModelSamplingAuraFlow 3, KSampler res_multistep/simple)."""
    return _ksampler_dit_graph(model_name, s, clip_type="lumina2", shift=3.0)


def _custom_sampler_graph(model_name: str, s: Resolved, *, flux2: bool) -> Graph:
    g = _Graph()
    model, clip, vae = _loaders(g, model_name, s, "flux2" if flux2 else "chroma")
    if not flux2:
        clip = _out(g.add("T5TokenizerOptions", clip=clip, min_padding=0, min_length=0))
        model = _out(g.add("ModelSamplingAuraFlow", model=model, shift=1.0))
    if s.guided:  # Flux.2 dev: guidance distilled into the model, no negative
        guider = g.add("BasicGuider", model=model, conditioning=_guided_prompt(g, clip, s)[1])
    else:
        positive_link, negative_link = _prompts(g, clip, s, zero_negative=flux2)
        guider = g.add("CFGGuider", model=model, positive=positive_link, negative=negative_link, cfg=s.cfg)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    if flux2:
        sigmas = g.add("Flux2Scheduler", steps=s.steps, width=s.width, height=s.height)
        latent = g.add("EmptyFlux2LatentImage", width=s.width, height=s.height, batch_size=1)
    else:
        sigmas = g.add("BasicScheduler", model=model, scheduler="beta", steps=s.steps, denoise=1.0)
        latent = g.add("EmptySD3LatentImage", width=s.width, height=s.height, batch_size=1)
    noise = g.add("RandomNoise", noise_seed=s.seed)
    samples = g.add(
        "SamplerCustomAdvanced",
        noise=_out(noise),
        guider=_out(guider),
        sampler=_out(sampler),
        sigmas=_out(sigmas),
        latent_image=_out(latent),
    )
    return _finish(g, _out(samples), vae, model_name)


def build_flux2_klein(model_name: str, s: Resolved) -> Graph:
    """Flux.2 Klein: image_flux2_klein_text_to_image (CFGGuider, Flux2Scheduler, EmptyFlux2LatentImage); Flux.2
    dev (a model with guidance_in): FluxGuidance 4 into BasicGuider instead of CFGGuider."""
    return _custom_sampler_graph(model_name, s, flux2=True)


def build_chroma(model_name: str, s: Resolved) -> Graph:
    """Chroma: image_chroma_text_to_image (T5TokenizerOptions, AuraFlow shift 1, CFGGuider, beta schedule)."""
    return _custom_sampler_graph(model_name, s, flux2=False)


SPECS: dict[str, ArchSpec] = {
    spec.arch: spec
    for spec in (
        ArchSpec("sd1", "CheckpointLoaderSimple", 20, 8.0, 512, 8, (), None, False, build_sd1),
        ArchSpec("sdxl", "CheckpointLoaderSimple", 25, 8.0, 1024, 8, (), None, False, build_sdxl),
        ArchSpec("flux1", "UNETLoader", 20, 1.0, 1024, 16, (CLIP_L, T5XXL), FLUX1_VAE, True, build_flux1),
        ArchSpec("flux2-klein", "UNETLoader", 20, 5.0, 1024, 16, (QWEN3_4B,), FLUX2_VAE, True, build_flux2_klein),
        ArchSpec("chroma", "UNETLoader", 26, 3.5, 1024, 16, (T5XXL,), FLUX1_VAE, False, build_chroma),
        ArchSpec("zimage", "UNETLoader", 25, 4.0, 1024, 16, (QWEN3_4B,), FLUX1_VAE, True, build_zimage),
    )
}


def file_spec(arch: str, facts: ModelFacts) -> ArchSpec:
    """``arch``'s built-in workflow for one file: a DiT family's all-in-one checkpoint (``facts.all_in_one``) is
    loaded whole by CheckpointLoaderSimple, from ComfyUI's checkpoints folder, with no text encoder or VAE files
    to choose; an SD1.5/SDXL UNet on its own, or a checkpoint lacking a text encoder (``facts.diffusion_only``), by
    UNETLoader, from diffusion_models, beside the text encoder and VAE files a checkpoint would hold; an SD1.5/SDXL
    checkpoint lacking only its VAE (``facts.no_vae``) by CheckpointLoaderSimple beside a VAE file."""
    spec = arch_spec(arch)
    if facts.all_in_one and spec.loader == "UNETLoader":
        return replace(spec, loader="CheckpointLoaderSimple", text_encoders=(), vae=None)
    if facts.diffusion_only and spec.arch in SEPARATE_PARTS:
        encoders, vae = SEPARATE_PARTS[spec.arch]
        return replace(spec, loader="UNETLoader", text_encoders=encoders, vae=vae)
    if facts.no_vae and spec.arch in SEPARATE_PARTS:  # the checkpoint's model and text encoders, a VAE file
        return replace(spec, vae=SEPARATE_PARTS[spec.arch][1])
    return spec


def build_workflow(arch: str, model_name: str, resolved: Resolved) -> Graph:
    """The built-in API-format graph of ``arch`` for the model file ComfyUI knows as ``model_name``."""
    return arch_spec(arch).build(model_name, resolved)


# --------------------------------------------------------------------------------------------------
# The user's own workflow


@dataclass(frozen=True)
class Target:
    """One literal input of one node: where a value gets written."""

    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


@dataclass(frozen=True)
class Bindings:
    """Which inputs take the model name, the prompt, the negative prompt and the seed (None: none, or several in
    ``several``: role → the candidates, an error only when a value for that role is given). ``also``: role → more
    inputs the user marked to take the same value (a base + refiner workflow's second prompt)."""

    model: Target
    prompt: Target | None = None
    negative: Target | None = None
    seed: Target | None = None
    several: dict[str, tuple[Target, ...]] = field(default_factory=dict)
    also: dict[str, tuple[Target, ...]] = field(default_factory=dict)


def load_workflow(path: str | Path) -> Graph:
    """Read an API-format workflow file (see :func:`parse_workflow`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OrthoMechaError("no such workflow file", path) from None
    except OSError as exc:
        raise OrthoMechaError(f"cannot read the workflow: {exc.strerror or exc}", path) from None
    return parse_workflow(data, path)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse_workflow(data: bytes, path: str | Path) -> Graph:
    """The API-format graph in a workflow file's bytes (``path`` names it in messages): JSON text (a UTF-8 BOM,
    as Windows editors write, is skipped; a saved ``/prompt`` request body gives its ``prompt``), or a PNG that
    ComfyUI rendered, whose ``prompt`` text chunk is the API-format graph. A UI-format file is refused with the
    fix (:func:`check_api_format`)."""
    if data.startswith(PNG_MAGIC):
        text = _png_prompt(data, path)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise OrthoMechaError("not a workflow: neither JSON text nor a PNG rendered by ComfyUI", path) from None
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OrthoMechaError(f"not valid JSON ({exc})", path) from None
    if isinstance(graph, dict) and isinstance(graph.get("prompt"), dict) and "class_type" not in graph["prompt"]:
        graph = graph["prompt"]  # a /prompt request body: {"prompt": {...}, "client_id": ...}
    return _text_node_ids(check_api_format(graph, path))


def _text_node_ids(graph: Graph) -> Graph:
    """``graph`` with each link written with a number for its node id (``[3, 0]``, as a script building a graph
    by hand may write it) written as ComfyUI needs it, ``["3", 0]``: it looks the ids up as text and refuses a
    number (``KeyError(3)``)."""
    for node in graph.values():
        inputs = node.get("inputs", {})
        for name, value in inputs.items():
            if (isinstance(value, list) and len(value) == 2 and type(value[0]) is int and isinstance(value[1], int)
                    and str(value[0]) in graph):
                inputs[name] = [str(value[0]), value[1]]
    return graph


def _png_prompt(data: bytes, path: str | Path) -> str:
    """The ``prompt`` text chunk ComfyUI writes into the PNGs it saves (the graph that made the image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            chunks = dict(image.info)
    except (UnidentifiedImageError, OSError) as exc:
        raise OrthoMechaError(f"cannot read this PNG: {exc}", path) from None
    prompt = chunks.get("prompt")
    if not isinstance(prompt, str):
        raise OrthoMechaError(
            "this PNG holds no ComfyUI workflow (no 'prompt' text chunk); export the workflow from ComfyUI with "
            '"Save (API)" instead', path)
    return prompt


def check_api_format(data: object, path: str | Path | None = None) -> Graph:
    """Return ``data`` if it is an API-format graph, else raise saying what it is and how to fix it."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list):
        raise OrthoMechaError(
            "this is a UI-format workflow (it has 'nodes' and 'links' lists); ComfyUI's API takes the API format: "
            'in ComfyUI open the workflow and export it with "Save (API)" (Workflow menu → Export (API))',
            path,
        )
    if not isinstance(data, dict) or not data:
        raise OrthoMechaError("not an API-format workflow: expected a JSON object of node id → node", path)
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise OrthoMechaError(f"node '{node_id}' has no 'class_type'; is this an API-format workflow?", path)
        if not isinstance(node.get("inputs", {}), dict):
            raise OrthoMechaError(f"node '{node_id}' has 'inputs' that is not an object", path)
    return data


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _is_kind(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _value_target(graph: Graph, node_id: str, name: str, kind: type) -> Target | None:
    """Where the value of input ``node_id.name`` is set: that input when it holds a ``kind``, else, when it is
    linked, the one ``kind`` input of the node it links to (a primitive such as PrimitiveInt's ``value``)."""
    value = graph[node_id].get("inputs", {}).get(name)
    if _is_kind(value, kind):
        return Target(node_id, name)
    if not _is_link(value) or str(value[0]) not in graph:
        return None
    source = str(value[0])
    held = [n for n, v in graph[source].get("inputs", {}).items() if _is_kind(v, kind)]
    return Target(source, held[0]) if len(held) == 1 else None


def _value_inputs(graph: Graph, names: Sequence[str], kind: type) -> list[Target]:
    """The distinct places the values of every input named in ``names`` are set (see :func:`_value_target`)."""
    found = (
        _value_target(graph, node_id, name, kind)
        for node_id, node in graph.items()
        for name in node.get("inputs", {})
        if name in names
    )
    return list(dict.fromkeys(t for t in found if t is not None))


def _text_encoders_feeding(graph: Graph, start: object) -> set[str]:
    """CLIPTextEncode nodes upstream of a conditioning link (not through ConditioningZeroOut)."""
    found: set[str] = set()
    stack = [start]
    seen: set[str] = set()
    while stack:
        link = stack.pop()
        if not _is_link(link) or link[0] in seen or link[0] not in graph:
            continue
        seen.add(link[0])
        node = graph[link[0]]
        if node["class_type"] == "CLIPTextEncode":
            found.add(link[0])
        elif node["class_type"] != "ConditioningZeroOut":
            stack.extend(v for v in node.get("inputs", {}).values() if _is_link(v))
    return found


def _prompt_nodes(graph: Graph) -> tuple[set[str], set[str]]:
    """The text encoders feeding samplers' positive and negative inputs (BasicGuider's is positive)."""
    positive: set[str] = set()
    negative: set[str] = set()
    for node in graph.values():
        inputs = node.get("inputs", {})
        if "positive" in inputs:
            positive |= _text_encoders_feeding(graph, inputs["positive"])
        if "negative" in inputs:
            negative |= _text_encoders_feeding(graph, inputs["negative"])
        if node["class_type"] == "BasicGuider":
            positive |= _text_encoders_feeding(graph, inputs.get("conditioning"))
    return positive, negative


def _parse_target(graph: Graph, text: str, role: str, path: Path | None) -> Target:
    node_id, dot, name = text.rpartition(".")
    if not dot or not node_id or not name:
        raise OrthoMechaError(f"--set-{role} '{text}' is not NODE.INPUT (for example 6.text)", path)
    if node_id not in graph:
        raise OrthoMechaError(
            f"--set-{role} '{text}': the workflow has no node '{node_id}' (nodes: {', '.join(graph)})", path
        )
    inputs = graph[node_id].get("inputs", {})
    if name not in inputs:
        raise OrthoMechaError(
            f"--set-{role} '{text}': node {node_id} ({graph[node_id]['class_type']}) has no input '{name}' "
            f"(inputs: {', '.join(inputs) or 'none'})",
            path,
        )
    if _is_link(inputs[name]):
        target = _value_target(graph, node_id, name, int if role == "seed" else str)
        if target is None:
            raise OrthoMechaError(
                f"--set-{role} '{text}' is linked to node {inputs[name][0]}, not a value; mark the input that holds "
                "the value",
                path,
            )
        return target
    return Target(node_id, name)


def _several_message(candidates: Sequence[Target], role: str) -> str:
    what = {"model": "model loaders", "prompt": "positive prompts", "negative": "negative prompts",
            "seed": "seed inputs"}[role]
    listed = ", ".join(str(c) for c in candidates)
    return (f"the workflow has several {what} ({listed}); say which to use with --set-{role} NODE.INPUT, or several "
            f"as NODE.INPUT,NODE.INPUT (on the Preview page: '{role} input')")


def _single(candidates: Sequence[Target], role: str, path: Path | None) -> Target | None:
    if len(candidates) > 1:
        raise OrthoMechaError(_several_message(candidates, role), path)
    return candidates[0] if candidates else None


def find_bindings(
    graph: Graph,
    model: str | None = None,
    prompt: str | None = None,
    negative: str | None = None,
    seed: str | None = None,
    path: Path | None = None,
) -> Bindings:
    """Where the model name, prompts and seed go: the user's ``NODE.INPUT`` marks, else detected.

    Detection takes the single UNETLoader/CheckpointLoaderSimple file input, the CLIPTextEncode texts
    feeding the samplers' positive and negative inputs, and the single ``seed``/``noise_seed`` input. Several
    model loaders are an error naming them; several prompts or seeds (a base + refiner workflow) are one only
    when a value for that role is given (:func:`apply_bindings`): otherwise the workflow keeps its own. A mark
    of the prompt, negative or seed may list several inputs, comma-separated, which all take the value. An
    input fed by a primitive node (PrimitiveInt, a string primitive) is set on that node.
    """
    model_target = (
        _parse_target(graph, model, "model", path)
        if model
        else _single(_value_inputs(graph, MODEL_INPUTS, str), "model", path)
    )
    if model_target is None:
        raise OrthoMechaError(
            "the workflow has no model loader (no 'unet_name' or 'ckpt_name' input); mark the input that takes the "
            "model file with --set-model NODE.INPUT (on the Preview page: 'model input')",
            path,
        )
    positive_nodes, negative_nodes = _prompt_nodes(graph)
    both = positive_nodes & negative_nodes
    if both and not (prompt and negative):
        raise OrthoMechaError(
            f"CLIPTextEncode node(s) {', '.join(sorted(both))} feed both the positive and the negative prompt; "
            "mark them with --set-prompt and --set-negative NODE.INPUT",
            path,
        )

    def texts(nodes: set[str]) -> list[Target]:
        found = (_value_target(graph, n, "text", str) for n in sorted(nodes))
        return list(dict.fromkeys(t for t in found if t is not None))

    detected = {"prompt": texts(positive_nodes), "negative": texts(negative_nodes),
                "seed": _value_inputs(graph, SEED_INPUTS, int)}
    marked = {"prompt": prompt, "negative": negative, "seed": seed}
    targets: dict[str, Target | None] = {}
    several: dict[str, tuple[Target, ...]] = {}
    also: dict[str, tuple[Target, ...]] = {}
    for role, mark in marked.items():
        if mark:
            first, *more = (_parse_target(graph, text.strip(), role, path) for text in mark.split(","))
            targets[role] = first
            if more:
                also[role] = tuple(more)
            if left := [str(t) for t in detected[role] if t not in (first, *more)]:
                logger.warning("--set-%s: %s keep(s) the workflow's own value; list it too, comma-separated, to set it",
                               role, ", ".join(left))
        elif len(detected[role]) > 1:  # an error only if a value for this role is given (apply_bindings)
            targets[role], several[role] = None, tuple(detected[role])
        else:
            targets[role] = _single(detected[role], role, path)
    return Bindings(model_target, targets["prompt"], targets["negative"], targets["seed"], several, also)


def apply_bindings(graph: Graph, bindings: Bindings, model_name: str, settings: PreviewSettings) -> Graph:
    """A copy of ``graph`` with the model name, prompts and seed written where ``bindings`` says.

    A prompt, a negative text or a seed the user gave but the workflow has no place for is an error;
    one the user did not give leaves the workflow's own value.
    """
    if settings.seed is not None:
        _check_seed(settings.seed)
    out = copy.deepcopy(graph)
    values: list[tuple[Target | None, object, str]] = [
        (bindings.model, model_name, "model"),
        (bindings.prompt, settings.prompt, "prompt"),
        (bindings.negative, settings.negative, "negative"),
        (bindings.seed, settings.seed, "seed"),
    ]
    for target, value, role in values:
        if value is None or (role != "seed" and value == "" and target is None):
            continue  # not given: the workflow keeps its own
        if target is None and role in bindings.several:
            raise OrthoMechaError(_several_message(bindings.several[role], role))
        if target is None:
            what = "seed input" if role == "seed" else f"{role} prompt input"
            raise OrthoMechaError(
                f"the workflow has no {what} that ortho-mecha can find; mark it with --set-{role} NODE.INPUT"
            )
        for each in (target, *bindings.also.get(role, ())):
            out[each.node]["inputs"][each.input] = value
    return out


def bound_seed(graph: Graph, bindings: Bindings) -> int | None:
    """The seed ``graph`` samples with, where ``bindings`` finds one as a plain number."""
    if bindings.seed is None:
        return None
    value = graph[bindings.seed.node]["inputs"].get(bindings.seed.input)
    return value if _is_kind(value, int) else None
