"""Tiny safetensors models for tests: planted families in several key layouts and dtypes.

Built on ``ortho_mecha.demo`` (the same generator the demo uses), plus helpers for the awkward files
tests need: scaled fp8, shards, full checkpoints with text encoders and a VAE, and brute-force float64
deltas to check the analysis against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ortho_mecha.demo import (
    DTYPES,
    Shapes,
    family_weights,
    flux_layout,
    low_rank_delta,
    random_base,
    sdxl_layout,
    write_model,
)

__all__ = [
    "DTYPES",
    "family_weights",
    "flat_delta",
    "write_checkpoint_family",
    "write_family_files",
    "write_scaled_fp8",
    "write_sharded",
]

SD1_TEXT = "cond_stage_model.transformer.text_model."
POSITION_IDS = f"{SD1_TEXT}embeddings.position_ids"  # an int64 key, as real SD1.5 checkpoints carry


def sd1_checkpoint_layout(channels: int = 16, text: int = 32) -> Shapes:
    """SD1.5-checkpoint-style keys: a small UNet under ``model.diffusion_model.`` (cross-attention width 768,
    which architecture detection checks), a CLIP-L text encoder under ``cond_stage_model.`` and a VAE under
    ``first_stage_model.``."""
    c, p = channels, "model.diffusion_model."
    shapes: Shapes = {
        f"{p}input_blocks.0.0.weight": (c, 4, 3, 3),
        f"{p}input_blocks.0.0.bias": (c,),
        f"{p}input_blocks.1.1.proj_in.weight": (c, c),
        f"{p}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (c, 768),
        f"{p}middle_block.1.proj_in.weight": (c, c),
        f"{p}time_embed.0.weight": (4 * c, c),
        f"{p}out.2.weight": (4, c, 3, 3),
    }
    return shapes | {
        f"{SD1_TEXT}embeddings.token_embedding.weight": (50, text),
        f"{SD1_TEXT}encoder.layers.0.self_attn.q_proj.weight": (text, text),
        f"{SD1_TEXT}encoder.layers.0.layer_norm1.weight": (text,),
        f"{SD1_TEXT}final_layer_norm.weight": (text,),
        "first_stage_model.encoder.conv_in.weight": (c, 3, 3, 3),
        "first_stage_model.decoder.conv_out.weight": (3, c, 3, 3),
        "first_stage_model.decoder.conv_out.bias": (3,),
    }


def flux_checkpoint_layout(hidden: int = 32, text: int = 32) -> Shapes:
    """ComfyUI's all-in-one Flux.1 checkpoint keys: the transformer under ``model.diffusion_model.``, CLIP-L and
    T5-XXL under ``text_encoders.``, the VAE under ``vae.``."""
    clip, t5 = "text_encoders.clip_l.transformer.text_model.", "text_encoders.t5xxl.transformer."
    return {f"model.diffusion_model.{k}": shape for k, shape in flux_layout(hidden=hidden).items()} | {
        f"{clip}embeddings.token_embedding.weight": (50, text),
        f"{clip}encoder.layers.0.self_attn.q_proj.weight": (text, text),
        f"{t5}shared.weight": (50, text),
        f"{t5}encoder.block.0.layer.0.SelfAttention.q.weight": (text, text),
        f"{t5}encoder.final_layer_norm.weight": (text,),
        "vae.encoder.conv_in.weight": (16, 3, 3, 3),
        "vae.decoder.conv_out.weight": (3, 16, 3, 3),
    }


CHECKPOINT_LAYOUTS = {
    "sd1": sd1_checkpoint_layout,
    "sdxl": lambda: sdxl_layout(channels=16, text=32),
    "flux_aio": flux_checkpoint_layout,
}


def write_checkpoint_family(folder: Path, layout: str = "sd1", dtype: str = "fp32", seed: int = 0) -> dict[str, Path]:
    """A base checkpoint and fine-tunes ``a``, ``b``, ``c`` (low-rank deltas on every key, text encoders and
    VAE included), plus ``diffusion_only`` (the base without its text encoders and VAE). SD1 files also
    carry the int64 ``position_ids`` key."""
    generator = torch.Generator().manual_seed(seed)
    base = random_base(CHECKPOINT_LAYOUTS[layout](), generator)
    members = {"base": base} | {name: {k: w + d[k] for k, w in base.items()}
                                for name, d in ((n, low_rank_delta(base, generator)) for n in ("a", "b", "c"))}
    members["diffusion_only"] = {k: v for k, v in base.items() if k.startswith("model.diffusion_model.")}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, tensors in members.items():
        data = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
        if layout == "sd1" and name != "diffusion_only":
            data[POSITION_IDS] = torch.arange(77, dtype=torch.int64).reshape(1, 77)
        paths[name] = folder / f"{name}.safetensors"
        save_file(data, str(paths[name]))
    return paths


def write_family_files(folder: Path, layout: str = "flux", dtype: str = "fp16", seed: int = 0,
                       members: list[str] | None = None, base_scale: float = 1.0,
                       overwrite: bool = False) -> dict[str, Path]:
    """Write (some of) a planted family; ``base_scale`` multiplies the base weights (not the deltas)."""
    weights = family_weights(layout, seed)
    base = weights["base"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in members or list(weights):
        tensors = {k: base[k] * base_scale + (v - base[k]) for k, v in weights[name].items()}
        paths[name] = write_model(folder / f"{name}.safetensors", tensors, dtype, overwrite=overwrite)
    return paths


def stored(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors as stored, up-cast to float64 (what the analysis should see)."""
    from safetensors.torch import load_file

    return {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}


def flat_delta(model: Path, base: Path, keys: list[str] | None = None) -> torch.Tensor:
    """The float64 delta model − base over the (given or shared float) keys, flattened and concatenated."""
    m, b = stored(model), stored(base)
    keys = keys or [k for k in b if k in m]
    return torch.cat([(m[k] - b[k]).flatten() for k in keys])


def write_scaled_fp8(path: Path, tensors: dict[str, torch.Tensor], per_row: bool = True) -> dict[str, torch.Tensor]:
    """Write a ComfyUI-style scaled-fp8 file; return the dequantised float64 tensors it represents."""
    data, dequant = {}, {}
    for key, value in tensors.items():
        if value.ndim < 2:
            data[key] = value.to(torch.float16)
            dequant[key] = data[key].to(torch.float64)
            continue
        amax = value.abs().amax(dim=tuple(range(1, value.ndim)), keepdim=True) if per_row else value.abs().max()
        scale = (amax / 448.0).clamp_min(1e-12)
        q = (value / scale).to(torch.float8_e4m3fn)
        data[key] = q
        scale_key = key.rsplit(".", 1)[0] + ".scale_weight"
        data[scale_key] = scale.reshape(-1).to(torch.float32) if per_row else scale.reshape(()).to(torch.float32)
        dequant[key] = q.to(torch.float64) * scale.to(torch.float32).to(torch.float64)
    data["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(data, str(path))
    return dequant


def write_sharded(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """Split tensors over ``shards`` files named like Hugging Face shards, with the index JSON; return the index."""
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map |= dict.fromkeys(part, name)
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index
