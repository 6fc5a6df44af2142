"""Small synthetic model families with planted relations, in realistic key layouts.

``ortho-mecha demo DIR`` writes one so the dashboard has something to show on a fresh machine with
no downloads; the test suite uses the same generator for its models. A family has a base and:
two independent fine-tunes (low-rank, focused deltas, as real fine-tunes have), a fine-tune of the
first fine-tune, a 0.5/0.5 merge of the two fine-tunes, a near-duplicate of the second, an unrelated
model (a large full-rank, noise-like delta) and the opposite of the first fine-tune.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import atomic_write_bytes, output_folder

logger = logging.getLogger(__name__)

DEMO_MARK = "ortho_mecha_demo"  # metadata key of every file the demo writes

Shapes = dict[str, tuple[int, ...]]
DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def flux_layout(hidden: int = 64, double: int = 2, single: int = 2, context: int = 96) -> Shapes:
    """Flux.1-style keys (``double_blocks.N``, ``single_blocks.N``, norms stored as ``.scale``) at a small width."""
    h, heads = hidden, 4
    shapes: Shapes = {
        "img_in.weight": (h, 64),
        "img_in.bias": (h,),
        "txt_in.weight": (h, context),
        "txt_in.bias": (h,),
        "time_in.in_layer.weight": (h, 256),
        "time_in.out_layer.weight": (h, h),
        "vector_in.in_layer.weight": (h, 48),
        "guidance_in.in_layer.weight": (h, 256),
        "final_layer.linear.weight": (64, h),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
    }
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            shapes |= {
                f"{p}attn.qkv.weight": (3 * h, h),
                f"{p}attn.proj.weight": (h, h),
                f"{p}attn.norm.query_norm.scale": (h // heads,),
                f"{p}attn.norm.key_norm.scale": (h // heads,),
                f"{p}mlp.0.weight": (4 * h, h),
                f"{p}mlp.2.weight": (h, 4 * h),
                f"{p}mod.lin.weight": (6 * h, h),
            }
    for i in range(single):
        p = f"single_blocks.{i}."
        shapes |= {
            f"{p}linear1.weight": (7 * h, h),
            f"{p}linear2.weight": (h, 5 * h),
            f"{p}norm.query_norm.scale": (h // heads,),
            f"{p}norm.key_norm.scale": (h // heads,),
            f"{p}modulation.lin.weight": (3 * h, h),
        }
    return shapes


def sdxl_layout(channels: int = 32, context: int = 2048, text: int = 64) -> Shapes:
    """SDXL-checkpoint-style keys (``model.diffusion_model.input_blocks.N``, conv kernels, text encoder and VAE).

    ``context`` is the cross-attention input width (SDXL's 2048, which architecture detection checks);
    ``text`` the (small) width of the text-encoder keys.
    """
    c, p = channels, "model.diffusion_model."
    shapes: Shapes = {
        f"{p}input_blocks.0.0.weight": (c, 4, 3, 3),
        f"{p}input_blocks.0.0.bias": (c,),
        f"{p}time_embed.0.weight": (4 * c, c),
        f"{p}label_emb.0.0.weight": (4 * c, 2 * c),
        f"{p}out.2.weight": (4, c, 3, 3),
    }
    for block in (1, 2, 4, 5):
        q = f"{p}input_blocks.{block}."
        shapes |= {
            f"{q}0.in_layers.2.weight": (c, c, 3, 3),
            f"{q}0.emb_layers.1.weight": (c, 4 * c),
            f"{q}1.proj_in.weight": (c, c),
            f"{q}1.transformer_blocks.0.attn1.to_q.weight": (c, c),
            f"{q}1.transformer_blocks.0.attn2.to_k.weight": (c, context),
            f"{q}1.transformer_blocks.0.ff.net.0.proj.weight": (8 * c, c),
            f"{q}1.transformer_blocks.0.norm1.weight": (c,),
        }
    shapes |= {
        f"{p}middle_block.1.transformer_blocks.0.attn1.to_q.weight": (c, c),
        f"{p}middle_block.0.in_layers.2.weight": (c, c, 3, 3),
    }
    for block in (0, 3, 6):
        q = f"{p}output_blocks.{block}."
        shapes |= {f"{q}0.in_layers.2.weight": (c, 2 * c, 3, 3), f"{q}1.proj_out.weight": (c, c)}
    shapes |= {
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (4 * text, text),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3 * text, text),
        "first_stage_model.decoder.conv_in.weight": (c, 4, 3, 3),
    }
    return shapes


def custom_layout(width: int = 48, layers: int = 4) -> Shapes:
    """An architecture no tool knows: ``layers.N`` blocks of a made-up transformer."""
    shapes: Shapes = {"embed.weight": (width, 24), "head.weight": (24, width), "head.bias": (24,)}
    for i in range(layers):
        shapes |= {
            f"layers.{i}.attn.wqkv.weight": (3 * width, width),
            f"layers.{i}.attn.out.weight": (width, width),
            f"layers.{i}.ffn.up.weight": (3 * width, width),
            f"layers.{i}.ffn.down.weight": (width, 3 * width),
            f"layers.{i}.norm.weight": (width,),
        }
    return shapes


LAYOUTS: dict[str, Callable[[], Shapes]] = {"flux": flux_layout, "sdxl": sdxl_layout, "custom": custom_layout}


def random_base(shapes: Shapes, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Base weights: 1-D norms near 1, matrices and kernels with a 1/sqrt(fan-in) spread."""
    out = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            out[key] = 1.0 + 0.05 * torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=generator, dtype=torch.float64) / fan_in**0.5
    return out


def low_rank_delta(
    base: dict[str, torch.Tensor], generator: torch.Generator, scale: float = 0.05, rank: int = 4, noise: float = 0.02
) -> dict[str, torch.Tensor]:
    """A fine-tune-like delta: low rank in every matrix (relative size ``scale``) plus a little noise."""
    out = {}
    for key, weight in base.items():
        rms = float(weight.pow(2).mean().sqrt())
        if weight.ndim == 1:
            out[key] = scale * rms * torch.randn(weight.shape, generator=generator, dtype=torch.float64)
            continue
        rows, cols = weight.shape[0], weight[0].numel()
        r = min(rank, rows, cols)
        u = torch.randn(rows, r, generator=generator, dtype=torch.float64)
        v = torch.randn(r, cols, generator=generator, dtype=torch.float64)
        structured = (u @ v) / (r * cols) ** 0.5 * (cols**0.5)
        structured *= scale * rms / float(structured.pow(2).mean().sqrt())
        jitter = noise * scale * rms * torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        out[key] = (structured + jitter).reshape(weight.shape)
    return out


def noise_delta(base: dict[str, torch.Tensor], generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """A full-rank, noise-like delta of relative size ``scale`` (no structure: an unrelated model)."""
    return {
        k: scale * float(w.pow(2).mean().sqrt()) * torch.randn(w.shape, generator=generator, dtype=torch.float64)
        for k, w in base.items()
    }


def combine(base: dict[str, torch.Tensor], *terms: tuple[float, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: w + sum(c * d[k] for c, d in terms) for k, w in base.items()}


@dataclass(frozen=True)
class FamilyMember:
    name: str
    relation: str


FAMILY = (
    FamilyMember("base", "the base every delta is taken against"),
    FamilyMember("anime", "fine-tune of base"),
    FamilyMember("photo", "fine-tune of base, independent of anime"),
    FamilyMember("anime_v2", "fine-tune of anime"),
    FamilyMember("anime_photo_merge", "0.5/0.5 merge of anime and photo"),
    FamilyMember("photo_copy", "near-duplicate of photo"),
    FamilyMember("unrelated", "unrelated: a large noise-like delta"),
    FamilyMember("anime_opposite", "opposite of anime (base − (anime − base))"),
)


def family_weights(layout: str = "flux", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The planted family's float64 weights, by member name (see FAMILY)."""
    if layout not in LAYOUTS:
        raise OrthoMechaError(f"unknown demo layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    generator = torch.Generator().manual_seed(seed)
    base = random_base(LAYOUTS[layout](), generator)
    anime = low_rank_delta(base, generator)
    photo = low_rank_delta(base, generator)
    v2 = low_rank_delta(base, generator, scale=0.025)
    tiny = noise_delta(base, generator, scale=1e-4)
    return {
        "base": base,
        "anime": combine(base, (1.0, anime)),
        "photo": combine(base, (1.0, photo)),
        "anime_v2": combine(base, (1.0, anime), (1.0, v2)),
        "anime_photo_merge": combine(base, (0.5, anime), (0.5, photo)),
        "photo_copy": combine(base, (1.0, photo), (1.0, tiny)),
        "unrelated": combine(base, (1.0, noise_delta(base, generator, scale=0.08))),
        "anime_opposite": combine(base, (-1.0, anime)),
    }


def write_model(path: Path, tensors: dict[str, torch.Tensor], dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write tensors as a safetensors file in ``dtype`` (fp32, fp16, bf16, fp8, fp8_e5m2), atomically."""
    if dtype not in DTYPES:
        raise OrthoMechaError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")
    data = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(data, metadata={DEMO_MARK: "1"}), overwrite=overwrite)


def write_family(
    folder: Path, layout: str = "flux", dtype: str = "fp16", seed: int = 0, overwrite: bool = False
) -> dict[str, Path]:
    """Write the planted family into ``folder``; return {member name: path}. Existing files are kept unless asked;
    a folder made here is removed again when the writing fails."""
    paths = {}
    with output_folder(folder):
        for name, tensors in family_weights(layout, seed).items():
            path = folder / f"{name}.safetensors"
            if path.exists() and not overwrite:
                logger.info("keeping existing %s", path)
            else:
                write_model(path, tensors, dtype, overwrite=overwrite)
            paths[name] = path
    return paths


def _is_demo_file(path: Path) -> bool:
    """Whether ``path`` is a model the demo wrote (its header's metadata says so)."""
    from ortho_mecha.io import parse_header

    try:
        return parse_header(path)[1].get(DEMO_MARK) == "1"
    except OrthoMechaError:
        return False


def cli_demo(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise OrthoMechaError("exists and is not a folder", folder)
    existing = [folder / f"{m.name}.safetensors" for m in FAMILY if (folder / f"{m.name}.safetensors").exists()]
    foreign = [path.name for path in existing if not _is_demo_file(path)]
    if foreign and not args.overwrite:  # kept, files from elsewhere would not have the planted relations
        raise OrthoMechaError(f"already holds {', '.join(foreign)}, not written by the demo; choose an empty folder, "
                              "or pass --overwrite to write the demo over them", folder)
    paths = write_family(folder, overwrite=args.overwrite)
    relations = {m.name: m.relation for m in FAMILY}
    for name, path in paths.items():
        kept = "; kept from an earlier run" if path in existing and not args.overwrite else ""
        print(f"{path}  ({relations[name]}{kept})")
    base = paths.pop("base")
    print(f"\nnext: ortho-mecha analyse --base {base} {folder} --json {folder / 'report.json'}")
    return 0
