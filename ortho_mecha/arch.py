"""Architecture detection from key names and shapes, and per-block grouping of keys.

Ids used everywhere (CLI ``--arch``, reports, plans): ``sd1``, ``sdxl``, ``flux1``, ``flux2-klein``,
``chroma``, ``zimage``, ``custom``. The seed tool's config strings ``chroma-flow`` and ``zimage-base``
are accepted as aliases. Detection works on canonical keys (prefix stripped, ``.scale`` norms renamed
to ``.weight``, see :mod:`ortho_mecha.validate`); the identifying keys are those ComfyUI's own model
detection uses. Anything else is ``custom`` and goes through exactly the same path.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

ARCH_IDS = ("sd1", "sdxl", "flux1", "flux2-klein", "chroma", "zimage", "custom")
ALIASES = {"chroma-flow": "chroma", "zimage-base": "zimage"}

FLUX_KEY = "double_blocks.0.img_attn.norm.key_norm.weight"
UNET_KEY = "input_blocks.0.0.weight"
ZIMAGE_KEYS = ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")
DIFFUSERS_FLUX_KEYS = ("x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_q.weight")
ZIMAGE_DIM = 3840
SD1_CONTEXT = 768
SDXL_CONTEXT = 2048  # the SDXL refiner (1280) and SD2 (1024) also carry UNet keys, some with label_emb
CROSS_ATTN_SUFFIX = ".attn2.to_k.weight"

# A block is the outermost numbered (``double_blocks.3``) or named (``middle_block``) group in a key.
_BLOCK = re.compile(
    r"(?:^|\.)(?:(?P<group>double_blocks|single_blocks|input_blocks|output_blocks|layers|noise_refiner|"
    r"context_refiner|transformer_blocks|single_transformer_blocks|blocks|down_blocks|up_blocks|joint_blocks|"
    r"nerf_blocks)\.(?P<index>\d+)|(?P<named>middle_block|mid_block))\."
)


def canonical_arch(arch: str) -> str:
    """Map an id or alias to its canonical id, or raise with the valid ids."""
    arch = ALIASES.get(arch, arch)
    if arch not in ARCH_IDS:
        raise ValueError(f"unknown architecture '{arch}'; valid: {', '.join(ARCH_IDS)} (aliases: {', '.join(ALIASES)})")
    return arch


def detect(shapes: Mapping[str, Sequence[int]]) -> str:
    """The architecture id of a model, from its canonical keys and their shapes."""
    if FLUX_KEY in shapes:
        if "img_in.weight" not in shapes:  # e.g. Chroma Radiance (pixel space, ``img_in_patch``)
            return "custom"
        if "double_stream_modulation_img.lin.weight" in shapes:
            return "flux2-klein"
        if any(k.startswith("distilled_guidance_layer.") for k in shapes):
            return "chroma"
        return "flux1"
    if all(k in shapes for k in ZIMAGE_KEYS):
        return "zimage" if shapes[ZIMAGE_KEYS[0]][0] == ZIMAGE_DIM else "custom"
    if UNET_KEY in shapes:
        context = _context_dim(shapes)
        if "label_emb.0.0.weight" in shapes:
            return "sdxl" if context == SDXL_CONTEXT else "custom"
        return "sd1" if context == SD1_CONTEXT else "custom"
    return "custom"


def is_diffusers_flux(keys: Collection[str]) -> bool:
    """Whether canonical ``keys`` are a Flux.1 transformer in diffusers' layout (``transformer_blocks.N.attn.to_q``,
    ``x_embedder``, ``context_embedder``): ``custom`` to :func:`detect`, as its keys are not the BFL ones."""
    return all(k in keys for k in DIFFUSERS_FLUX_KEYS)


def _context_dim(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The text-context width of a UNet: the input width of its cross-attention keys (None if they disagree)."""
    widths = {tuple(s)[1] for k, s in shapes.items() if k.endswith(CROSS_ATTN_SUFFIX) and len(s) == 2}
    return widths.pop() if len(widths) == 1 else None


def block_of(key: str) -> str:
    """The block a canonical key belongs to: ``double_blocks.3``, ``middle_block``, or its first name part."""
    match = _BLOCK.search(key)
    if match is None:
        return key.split(".", 1)[0]
    return match["named"] or f"{match['group']}.{match['index']}"


def block_sort_key(block: str) -> tuple[str, int]:
    """Sort blocks by name, then numerically by index (``layers.2`` before ``layers.10``)."""
    name, _, index = block.rpartition(".")
    return (name, int(index)) if index.isdigit() else (block, -1)
