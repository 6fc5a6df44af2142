"""Tiny real safetensors models for the plan, recipe and merge tests.

``write_family(folder)`` writes a base and fine-tunes whose keys look like an SDXL UNet (so a guessing
tool would be tempted to pick sd-mecha's built-in SDXL config): a 4-D conv, matrices, 1-D biases and
norms (one stored as ``.scale``), and an integer tensor. Fine-tunes are the base plus small seeded
deltas, stored as fp32, fp16, bf16 and fp8 e4m3fn; one carries the ``model.diffusion_model.`` prefix
and the ``.norm.weight`` spelling against the bare base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."
NORM_SCALE = "double_blocks.0.img_attn.norm.key_norm.scale"
SHAPES: dict[str, tuple[int, ...]] = {
    "input_blocks.0.0.weight": (8, 4, 3, 3),
    "input_blocks.0.0.bias": (8,),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    "label_emb.0.0.weight": (16, 12),
    "middle_block.1.norm.weight": (8,),
    "middle_block.1.proj_in.weight": (8, 8),
    "time_embed.0.weight": (16, 8),
    "time_embed.0.bias": (16,),
    "out.2.weight": (4, 8, 3, 3),
    NORM_SCALE: (4,),
}
INT_KEY = "position_ids"


def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.5 for key, shape in SHAPES.items()}
    state[INT_KEY] = torch.arange(6, dtype=torch.int64)
    return state


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + torch.randn(value.shape, generator=generator) * scale if value.is_floating_point() else value
        for key, value in base.items()
    }


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint spelling: prefix on every key, ``.norm.scale`` stored as ``.norm.weight``."""
    renamed = {}
    for key, value in state.items():
        name = key.removesuffix(".scale") + ".weight" if key == NORM_SCALE else key
        renamed[PREFIX + name] = value
    return renamed


def write_family(folder: Path) -> dict[str, Path]:
    """Write the test family into ``folder``; return name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_state()
    models = {
        "base": base,
        "a": finetune(base, 1),
        "b": finetune(base, 2),
        "c16": cast(finetune(base, 3), torch.float16),
        "dbf16": cast(finetune(base, 4), torch.bfloat16),
        "e8": cast(finetune(base, 5), torch.float8_e4m3fn),
        "pref": prefixed(finetune(base, 6)),
        "tex": finetune(base, 7, scale=0.02),
    }
    paths = {}
    for name, state in models.items():
        path = folder / f"{name}.safetensors"
        save_file(state, str(path))
        paths[name] = path
    return paths


def read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_plan(folder: Path, data: dict, name: str = "plan.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data))
    return path
