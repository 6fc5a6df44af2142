"""LoRA extraction: a merged model's difference from its base as a kohya-layout LoRA.

For every matrix key (2-D weights; conv kernels flattened to ``out × (in·kh·kw)``, 1×1 convs alike) the
delta ``D = MERGED − BASE`` is replaced by its best rank-``R`` approximation (Eckart–Young: the
truncated SVD, whose error is ``sqrt(Σ dropped σ²)``). The file follows the kohya layout ComfyUI and
A1111 load:

- ``lora_unet_<key>.lora_down.weight`` ``[R, in(, kh, kw)]``, ``.lora_up.weight`` ``[out, R(, 1, 1)]``
  and ``.alpha`` = R (a float32 scalar), so ``alpha / R = 1`` and ``W ≈ BASE + up @ down``;
- ``<key>`` is the diffusion key without the ``model.diffusion_model.`` prefix and without its final
  ``.weight``, dots written as underscores (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
  ``lora_unet_double_blocks_0_img_attn_qkv``). ComfyUI maps every ``diffusion_model.*.weight`` of the
  loaded model to exactly this name; A1111 reads ``lora_unet_`` as ``diffusion_model_``. So the names
  follow the input's own layout; a key not ending in ``.weight`` has no such name and is reported as not
  captured.
- A Flux.1 transformer in diffusers' layout (``transformer_blocks.N.attn.to_q``, …) is loaded by ComfyUI as
  its own (BFL) Flux model, whose ``lora_unet_`` names are the BFL ones; it maps the diffusers module names
  with the prefix ``lora_transformer_`` instead (``lora_transformer_transformer_blocks_0_attn_to_q``, as
  OneTrainer writes them), so such a model's LoRA takes that prefix.

1-D keys (norms, biases) cannot be factorised and are reported as not captured, with their total
delta norm. Zero deltas are skipped. The rank is clamped per key to ``min(out, in)`` and directions with
σ² below ``1e-12 σ₁²`` (numerically zero) are dropped, so a key's written rank can be below R; its
alpha is its own rank, which keeps the scale 1 on every key.

The SVD goes through the smaller Gram (``D Dᵀ`` or ``Dᵀ D``, float64, accumulated in chunks) and its top
eigenpairs from LAPACK's MRRR driver (``scipy.linalg.eigh(driver="evr", subset_by_index=...)``, which the
analysis pass measured ~10× faster than ``torch.linalg.eigvalsh`` here). On a 640×2560 key this route
took 1.3–2.5× less time than a full ``torch.linalg.svd`` on the shared 2-core machine, and its cost is
one pass over the delta plus the cube of the smaller side. σ² come out to float64 rounding of the Gram
(≈1e-13 σ₁², far below fp16/bf16 storage noise). Both factors carry ``sqrt(σ)`` so neither underflows
in fp16. Models are read one key at a time in chunks; never a whole model in memory.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import save

from ortho_mecha import __version__
from ortho_mecha.arch import is_diffusers_flux
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import atomic_write_bytes, check_writable, refuse_existing, require_folder, write_json
from ortho_mecha.io import Model
from ortho_mecha.validate import align, check_report_output, key_map, refuse_input_as_output

if TYPE_CHECKING:
    from ortho_mecha.jobs import Progress

logger = logging.getLogger(__name__)

CHUNK = 1 << 22  # elements per streamed read / per Gram block
ZERO_RTOL = 1e-12  # σ² below this fraction of σ₁² counts as zero (float64 Gram rounding is ~1e-13)
LORA_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PREFIX = "lora_unet_"
DIFFUSERS_DIT_PREFIX = "lora_transformer_"  # a DiT's modules in diffusers' names, kohya-style keys


def lora_name(key: str, prefix: str = PREFIX) -> str | None:
    """The kohya module name of a canonical diffusion key, or None when the key has no such name."""
    if not key.endswith(".weight"):
        return None
    return prefix + key[: -len(".weight")].replace(".", "_")


def lora_prefix(keys: Collection[str]) -> str:
    """The prefix of the module names ComfyUI gives a model of canonical ``keys``: ``lora_transformer_`` for a
    Flux.1 transformer in diffusers' layout, else ``lora_unet_``."""
    return DIFFUSERS_DIT_PREFIX if is_diffusers_flux(keys) else PREFIX


@dataclass(frozen=True)
class LowRank:
    """A rank-k factorisation ``up @ down`` of a 2-D delta, with the delta's energy kept and total."""

    up: torch.Tensor  # [out, k] float64
    down: torch.Tensor  # [k, in] float64
    kept: float  # Σ of the kept σ²
    total: float  # Σ σ² = ‖D‖²

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def energy(self) -> float:
        """Fraction of ‖D‖² kept (1 for a zero delta)."""
        return self.kept / self.total if self.total > 0 else 1.0

    @property
    def tail(self) -> float:
        """The Eckart–Young error ‖D − up @ down‖ = sqrt(Σ dropped σ²)."""
        return math.sqrt(max(self.total - self.kept, 0.0))

    def scaled(self, c: float) -> LowRank:
        """The factorisation of ``c · D`` (the same directions, both factors scaled by sqrt|c|)."""
        root = math.sqrt(abs(c))
        sign = -1.0 if c < 0 else 1.0
        return LowRank(self.up * (sign * root), self.down * root, self.kept * c * c, self.total * c * c)


def _gram(mat: torch.Tensor) -> torch.Tensor:
    """``mat @ mat.T`` in float64 for a short-and-wide ``mat``, accumulated over column blocks."""
    n, long = mat.shape
    step = max(1, CHUNK // max(n, 1))
    gram = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, long, step):
        block = mat[:, start : start + step].to(torch.float64)
        gram.addmm_(block, block.T)
    return gram


def _project(mat: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``basis.T @ mat`` in float64, over column blocks of ``mat``."""
    n, long = mat.shape
    out = torch.empty(basis.shape[1], long, dtype=torch.float64)
    step = max(1, CHUNK // max(n, 1))
    for start in range(0, long, step):
        out[:, start : start + step] = basis.T @ mat[:, start : start + step].to(torch.float64)
    return out


def factorise(delta: torch.Tensor, rank: int) -> LowRank:
    """The truncated SVD of a 2-D ``delta`` at ``rank`` (clamped to its smaller side), √σ on each factor."""
    rows, cols = delta.shape
    tall = rows > cols
    mat = delta.T if tall else delta  # [n, long] with n the smaller side
    n = mat.shape[0]
    gram = _gram(mat)
    total = float(gram.trace())
    if total <= 0.0:
        return LowRank(torch.zeros(rows, 0, dtype=torch.float64), torch.zeros(0, cols, dtype=torch.float64), 0.0, 0.0)
    r = min(rank, n)
    values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - r, n - 1], driver="evr", check_finite=False)
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = values > values[0] * ZERO_RTOL
    values, vectors = values[keep], vectors[:, keep]
    basis = torch.from_numpy(np.ascontiguousarray(vectors))
    coeffs = _project(mat, basis)  # [k, long], row i has norm σ_i
    root = torch.from_numpy(np.sqrt(np.sqrt(values)).copy())  # sqrt(σ_i)
    short, wide = basis * root, coeffs / root[:, None]
    up, down = (wide.T, short.T) if tall else (short, wide)
    return LowRank(up.contiguous(), down.contiguous(), float(values.sum()), total)


def lora_tensors(name: str, low: LowRank, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kohya tensors of one module: down ``[k, *shape[1:]]``, up ``[out, k, 1…]``, alpha = k."""
    k = low.rank
    up = low.up.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    down = low.down.reshape(k, *shape[1:])
    return {
        f"{name}.lora_down.weight": down.to(dtype).contiguous(),
        f"{name}.lora_up.weight": up.to(dtype).contiguous(),
        f"{name}.alpha": torch.tensor(float(k), dtype=torch.float32),
    }


def kohya_metadata(tensors: dict[str, torch.Tensor], **extra: object) -> dict[str, str]:
    """``__metadata__`` of the LoRA ``tensors``: kohya's network fields plus ortho-mecha's own (as strings). Its
    dim is the largest rank written (a rank asked for above a key's side is cut to it), each module's alpha its own
    rank (scale 1)."""
    dim = max((t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")), default=0)
    fields = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ortho_mecha_version": __version__,
    }
    return fields | {f"ortho_mecha_{k}": str(v) for k, v in extra.items()}


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool) -> Path:
    """Write a LoRA atomically (temporary file, fsync, rename); an existing file only with ``overwrite``."""
    return atomic_write_bytes(path, save(tensors, metadata=metadata), overwrite=overwrite)


def check_rank(rank: int) -> None:
    if rank < 1:
        raise OrthoMechaError(f"--rank must be a whole number ≥ 1, got {rank}")


def lora_dtype(name: str) -> torch.dtype:
    if name not in LORA_DTYPES:
        raise OrthoMechaError(f"unknown LoRA dtype '{name}'; valid: {', '.join(LORA_DTYPES)}")
    return LORA_DTYPES[name]


def check_output(out: Path, inputs: list[Model], overwrite: bool) -> Path:
    """A ``.safetensors`` path in an existing folder, not an input, not existing unless ``overwrite``."""
    if out.suffix != ".safetensors":
        raise OrthoMechaError("the LoRA must be written to a .safetensors file", out)
    require_folder(out.parent)
    refuse_input_as_output(out, inputs, "the LoRA")
    refuse_existing(out, overwrite)
    check_writable(out)
    return out


# -- extraction -----------------------------------------------------------------------------------


@dataclass
class KeyResult:
    """One factorised key: its LoRA name, shape, written rank, kept energy, ‖D‖ and the tail error."""

    key: str
    lora: str
    shape: list[int]
    rank: int
    energy_kept: float
    delta_norm: float
    error: float


@dataclass
class Uncaptured:
    """Keys whose delta the LoRA does not carry: how many, and their total delta norm."""

    keys: int = 0
    delta_norm: float = 0.0
    examples: list[str] = field(default_factory=list)

    def add(self, key: str, norm2: float) -> None:
        self.keys += 1
        self.delta_norm = math.hypot(self.delta_norm, math.sqrt(norm2))
        if len(self.examples) < 3:
            self.examples.append(key)


@dataclass
class ExtractReport:
    """What :func:`extract_lora` wrote and how much of the merge's delta it kept."""

    base: str
    merged: str
    out: str
    rank: int
    dtype: str
    keys: list[KeyResult]
    energy_kept: float  # over the factorised keys: Σ kept σ² / Σ ‖D‖²
    energy_kept_all: float  # the same over every compared key (uncaptured ones count as lost)
    zero_keys: int  # matrix keys whose delta is exactly zero (skipped)
    one_d: Uncaptured  # norms and biases: no LoRA form
    unnamed: Uncaptured  # matrices whose key does not end in ``.weight``: no kohya name
    missing_in_merged: int
    only_in_merged: int
    non_diffusion: int  # text-encoder / VAE keys of a checkpoint, not in the LoRA
    non_diffusion_norm: float = 0.0  # ‖merged − base‖ over those keys (both files', one shape): what the LoRA lacks

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = [
            f"wrote {self.out}: {len(self.keys)} keys at rank ≤ {self.rank} ({self.dtype}), "
            f"kept {self.energy_kept:.2%} of the matrix delta energy ({self.energy_kept_all:.2%} of the diffusion "
            "model's)"
        ]
        if self.one_d.keys:
            lines.append(
                f"  not captured: {self.one_d.keys} 1-D keys (norms/biases), delta norm {self.one_d.delta_norm:.4g}"
            )
        if self.unnamed.keys:
            lines.append(
                f"  not captured: {self.unnamed.keys} matrix keys without a '.weight' name, delta norm "
                f"{self.unnamed.delta_norm:.4g} (e.g. {', '.join(self.unnamed.examples)})"
            )
        if self.zero_keys:
            lines.append(f"  skipped: {self.zero_keys} keys whose delta is zero")
        if self.missing_in_merged or self.only_in_merged:
            lines.append(
                f"  {self.missing_in_merged} base keys missing from the merged model, "
                f"{self.only_in_merged} keys only in the merged model (not compared)"
            )
        if self.non_diffusion:
            differ = (f"they differ from the base's by norm {self.non_diffusion_norm:.4g}, which the LoRA does not "
                      "carry" if self.non_diffusion_norm else "they equal the base's")
            lines.append(f"  {self.non_diffusion} text-encoder/VAE keys are not in the LoRA (a LoRA of the "
                         f"UNet/transformer): {differ}")
        return lines


def read_delta(model: Model, model_key: str, base: Model, base_key: str) -> torch.Tensor:
    """``model − base`` for one key in the base's shape, float32 (each chunk subtracted in float64)."""
    info = base.tensors[base_key]
    out = torch.empty(info.numel, dtype=torch.float32)
    for start in range(0, info.numel, CHUNK):
        stop = min(info.numel, start + CHUNK)
        wide = model.read(model_key, start, stop, torch.float64)
        wide -= base.read(base_key, start, stop, torch.float64)
        out[start:stop] = wide
    return out.reshape(info.shape)


def extract_lora(
    merged: str | Path,
    base: str | Path,
    rank: int,
    out: str | Path,
    dtype: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExtractReport:
    """Write ``MERGED − BASE`` as a rank-``rank`` kohya LoRA to ``out``; return what was kept and lost.

    ``progress`` is told each key (fraction, keys done and total) before it is read; it may raise to stop
    (a background job's cancel), and then nothing is written — the file is written in one piece at the end.
    """
    check_rank(rank)
    torch_dtype = lora_dtype(dtype)
    from ortho_mecha.lora_rows import refuse_lora  # lora_rows imports this module

    base_model, merged_model = Model(base), Model(merged)
    refuse_lora(merged_model, "extract-lora takes the merged model and its base")
    refuse_lora(base_model, "extract-lora takes the merged model and its base")
    out_path = check_output(Path(out), [base_model, merged_model], overwrite)
    alignment = align(base_model, [merged_model])
    check = alignment.checks[0]
    if check.shape_mismatch:
        key = check.shape_mismatch[0]
        got = list(merged_model.tensors[key_map(merged_model).keys[key]].shape)
        want = list(base_model.tensors[alignment.file_key(0, key)].shape)
        raise OrthoMechaError(
            f"{len(check.shape_mismatch)} keys have a shape unlike the base {base_model.path}'s, e.g. '{key}' "
            f"{got} vs {want}: the merged model is not built on this base; give the base it was merged from",
            merged_model.path,
        )

    tensors: dict[str, torch.Tensor] = {}
    results: list[KeyResult] = []
    one_d, unnamed = Uncaptured(), Uncaptured()
    zero = missing = 0
    kept_sum = total_sum = 0.0
    prefix = lora_prefix(alignment.keys)
    for done, canon in enumerate(alignment.keys):
        if progress is not None:
            progress({"fraction": done / len(alignment.keys), "keys_done": done, "keys_total": len(alignment.keys)})
        merged_key = alignment.file_key(1, canon)
        if merged_key is None:
            missing += 1
            continue
        base_key = alignment.file_key(0, canon)
        delta = read_delta(merged_model, merged_key, base_model, base_key)
        norm2 = float(delta.to(torch.float64).pow(2).sum())
        if not math.isfinite(norm2):
            raise OrthoMechaError(f"key '{merged_key}' holds NaN or Inf values (here or in the base {base_model.path})",
                                  merged_model.path)
        name = lora_name(canon, prefix)
        if delta.ndim < 2 or name is None:
            (one_d if delta.ndim < 2 else unnamed).add(canon, norm2)
            continue
        if norm2 == 0.0:
            zero += 1
            continue
        low = factorise(delta.reshape(delta.shape[0], -1), rank)
        tensors |= lora_tensors(name, low, tuple(delta.shape), torch_dtype)
        kept_sum, total_sum = kept_sum + low.kept, total_sum + low.total
        results.append(KeyResult(canon, name, list(delta.shape), low.rank, low.energy, math.sqrt(low.total), low.tail))
        logger.debug("%s: rank %d, kept %.4f of %.4g", canon, low.rank, low.energy, low.total)
    if not tensors and unnamed.delta_norm > 0:
        raise OrthoMechaError(
            f"none of its matrix keys that differ from the base {base_model.path} has a kohya module name (a LoRA "
            f"names a module by its '<module>.weight' key; here e.g. '{unnamed.examples[0]}'): no LoRA can carry "
            "the difference; nothing was written", merged_model.path)
    if not tensors:
        beside = _beside_norm(merged_model, base_model, alignment.maps[1].set_aside)
        where = (f"its text-encoder/VAE keys differ (norm {beside:.4g}), and a LoRA here holds the UNet/transformer "
                 "only: merge the text encoder with a plan's 'components' instead" if beside
                 else "there is no difference to extract")
        raise OrthoMechaError(
            f"equals the base {base_model.path} on every matrix key of the diffusion model: {where}",
            merged_model.path,
        )
    metadata = kohya_metadata(tensors, base=base_model.path, merged=merged_model.path, rank=rank, kind="extract-lora")
    write_lora(out_path, tensors, metadata, overwrite)
    lost = one_d.delta_norm**2 + unnamed.delta_norm**2
    return ExtractReport(
        base=str(base_model.path),
        merged=str(merged_model.path),
        out=str(out_path),
        rank=rank,
        dtype=dtype,
        keys=results,
        energy_kept=kept_sum / total_sum,
        energy_kept_all=kept_sum / (total_sum + lost),
        zero_keys=zero,
        one_d=one_d,
        unnamed=unnamed,
        missing_in_merged=missing,
        only_in_merged=check.extra,
        non_diffusion=alignment.maps[1].non_diffusion,
        non_diffusion_norm=_beside_norm(merged_model, base_model, alignment.maps[1].set_aside),
    )


def _beside_norm(merged: Model, base: Model, keys: list[str]) -> float:
    """‖merged − base‖ over ``keys`` (a checkpoint's text encoders and VAE) that both files hold as floats in one
    shape."""
    norm2 = 0.0
    for key in keys:
        mine, theirs = merged.tensors[key], base.tensors.get(key)
        if theirs is not None and mine.is_float and theirs.is_float and mine.shape == theirs.shape:
            norm2 += float(read_delta(merged, key, base, key).double().square().sum())
    return math.sqrt(norm2)


def run_job(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Background-job entry (kind ``extract-lora``): ``{"model", "base", "rank", "out"}`` (optional ``dtype``).

    Never overwrites: an existing ``out`` is refused before the first key is read and again just before the
    finished file is renamed into place. The result is :meth:`ExtractReport.to_dict` (``out`` the written
    path, ``keys`` each key's kept energy) plus ``summary``, its lines.
    """
    for name in ("model", "base", "out"):
        if not isinstance(params.get(name), str):
            raise OrthoMechaError(f"extract-lora job: '{name}' must be a file path")
    rank = params.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise OrthoMechaError(f"extract-lora job: 'rank' must be a whole number ≥ 1, got {rank!r}")
    report = extract_lora(params["model"], params["base"], rank, params["out"], dtype=params.get("dtype", "fp16"),
                          progress=progress)
    return report.to_dict() | {"summary": report.summary_lines()}


def cli_extract_lora(args: argparse.Namespace) -> int:
    if args.json:  # before the work: a report that cannot be written would fail it after the LoRA is written
        check_report_output(Path(args.json), [Model(args.merged), Model(args.base)], args.overwrite)
    report = extract_lora(args.merged, args.base, args.rank, args.out, dtype=args.dtype, overwrite=args.overwrite)
    for line in report.summary_lines():
        print(line)
    if args.json:
        write_json(Path(args.json), report.to_dict(), overwrite=args.overwrite)
        print(f"report written to {args.json}")
    return 0
