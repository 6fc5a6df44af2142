"""Shared-base compression after Hyper-Merge (DESIGN §11): many models as one base plus scalars.

For models ``W_m`` (m = 1..M) and a base ``W̃`` (a base model, or the models' average) every key is
fitted as ``W_m ≈ W̃ + λ_m δW`` (one shared direction) or ``W̃ + λ_m δW + κ_m δQ`` (two), minimising
``Σ_m ‖W_m − Ŵ_m‖²`` by alternating least squares on the deltas ``X_m = W_m − W̃``::

    λ_m ← <δW, X_m> / ‖δW‖²          δW ← Σ_m λ_m X_m / Σ_m λ_m²

and δQ, κ_m the same way on the residual ``X_m − λ_m δW``.

Every iterate of δW is a combination ``Σ_m a_m X_m`` of the deltas, so the rounds run on the M×M Gram
``G = [<X_i, X_j>]`` alone (``<δW, X_m> = (G a)_m``, ``‖δW‖² = aᵀ G a``): one streamed read of the key
across all models (chunk by chunk, never a whole model in memory) gives G, and the fitted δW, δQ are
only materialised when exported. δW starts at the top eigenvector of G (the mean delta would be zero
for an average base). That start is the top singular direction of the stacked deltas, so the rounds
converge at once; by Eckart–Young the 1-direction fit is the best rank-1 fit of the key, and fitting δQ
on the residual gives the best rank-2 fit. The rounds are kept as a check on that.

The scalars are reported normalised so that the largest ``|λ_m|`` (and ``|κ_m|``) is +1; the direction
carries the size (only products ``λ_m δW`` are determined). With the average as base, ``W̃`` is the
average *as written* (rounded to the first model's dtype, fp16 for fp8 inputs), so the fit describes
the files :func:`export` writes. Relative errors ``‖W_m − Ŵ_m‖ / ‖W_m − W̃‖`` are reported per model,
overall and per key.

:func:`export` writes, into a folder and never over an existing file, the average base
(``base_average.safetensors``, only when the base is the average) and per model a kohya LoRA
(``<model>_lora.safetensors``): the truncated SVD of ``λ_m δW + κ_m δQ`` per matrix key, through
:mod:`ortho_mecha.lora`. 1-D keys (norms, biases) have no LoRA form and are reported as not captured.
Fitting reads every model once; exporting reads them once more (the directions are built from the
deltas key by key), so neither ever holds more than one key of each model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ortho_mecha import __version__
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import (
    check_writable,
    discard,
    output_folder,
    partial_path,
    place,
    refuse_existing,
    remove_stale_partials,
    removed_on_failure,
    require_folder,
    write_json,
)
from ortho_mecha.io import DTYPES, ROUNDING, Model, expand_model_paths, tensor_bytes
from ortho_mecha.lora import (
    LowRank,
    Uncaptured,
    check_rank,
    factorise,
    kohya_metadata,
    lora_dtype,
    lora_name,
    lora_prefix,
    lora_tensors,
    write_lora,
)
from ortho_mecha.lora_rows import refuse_lora
from ortho_mecha.validate import Alignment, align, check_report_output

logger = logging.getLogger(__name__)

AVERAGE = "average"
AVERAGE_FILE = "base_average.safetensors"
LORA_SUFFIX = "_lora.safetensors"
CHUNK = 1 << 22  # elements read per key and step, over all models together
ZERO_RTOL = 1e-13  # a residual Gram eigenvalue below this fraction of the key's energy is rounding
DIRECTIONS = (1, 2)
WRITTEN_DTYPES = {"F64", "F32", "F16", "BF16"}  # the average keeps these; other (fp8) keys are written as F16
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
NEVER_OVERWRITTEN = "compress never replaces a file: choose another --out folder (or --json) or move it away"


# -- the models lined up ---------------------------------------------------------------------------


def _written_dtype(dtype: str) -> str:
    """The dtype an average of tensors stored in ``dtype`` is written in: the same, or F16 for fp8 and others."""
    return dtype if dtype in WRITTEN_DTYPES else "F16"


def _nonfinite(key: str, models: list[Model], stack: torch.Tensor, fallback: Model | None = None) -> OrthoMechaError:
    """The error for NaN/Inf in ``key``, naming the first of ``models`` whose row of ``stack`` holds them (else
    ``fallback``'s file: the base)."""
    bad = next((m for m, row in zip(models, stack, strict=True) if not bool(torch.isfinite(row).all())), fallback)
    return OrthoMechaError(f"key '{key}' holds NaN or Inf values", None if bad is None else bad.path)


class Family:
    """The models (and the base file, unless the base is their average) lined up on shared keys."""

    def __init__(self, models: list[str | Path], base: str | Path | None) -> None:
        self.average = base is None or str(base) == AVERAGE
        paths = expand_model_paths(list(models))
        self.base: Model | None = None
        left_out = ""  # said when too few models are left
        if base is not None and not self.average:
            base_path = Path(base)
            if base_path.is_dir():
                raise OrthoMechaError("the base must be one model file (or 'average'), not a folder", base_path)
            given = len(paths)
            paths = [p for p in paths if p.resolve() != base_path.resolve()]  # a folder of models may hold the base
            self.base = Model(base_path)
            if len(paths) < given:
                left_out = f"; the base {base_path} is not counted as a model"
        if len(paths) < 2:
            raise OrthoMechaError(
                f"compression shares directions across models: give at least two models (got {len(paths)}{left_out})",
                paths[0] if paths else None,
            )
        self.models = [Model(p) for p in paths]
        for model in [*self.models, *([self.base] if self.base else [])]:
            refuse_lora(model, "compress fits full models (a LoRA row belongs in a plan)")
        if self.base is None:  # the first model is the reference the others are lined up against
            self.alignment: Alignment = align(self.models[0], self.models[1:])
            self._index = list(range(len(self.models)))
        else:
            self.alignment = align(self.base, self.models)
            self._index = [m + 1 for m in range(len(self.models))]
        file_keys = [[self.alignment.file_key(i, k) for i in self._index] for k in self.alignment.keys]
        self.keys = [k for k, fk in zip(self.alignment.keys, file_keys, strict=True) if None not in fk]
        self.left_out = [k for k, fk in zip(self.alignment.keys, file_keys, strict=True) if None in fk]

    @property
    def inputs(self) -> list[Model]:
        return [*self.models, *([self.base] if self.base else [])]

    def beside(self) -> list[str]:
        """The first model's float keys beside the diffusion model (a checkpoint's text encoders and VAE) that every
        model has, in one shape: the written average base carries their average too, so it loads as a checkpoint."""
        first = self.models[0]
        return [key for key in self.alignment.maps[self._index[0]].set_aside
                if first.tensors[key].is_float and all(key in m.tensors and m.tensors[key].shape ==
                                                        first.tensors[key].shape for m in self.models[1:])]

    def beside_info(self, key: str) -> tuple[str, tuple[int, ...]]:
        """The dtype the average of a :meth:`beside` key is written in, and its shape."""
        info = self.models[0].tensors[key]
        return _written_dtype(info.dtype), info.shape

    def average_beside(self, key: str, writer: StreamingFile) -> list[float]:
        """Stream the models' average of a :meth:`beside` key into ``writer``; each model's ‖W_m − average‖²."""
        dtype, shape = self.beside_info(key)
        numel = math.prod(shape)
        norms2 = [0.0] * len(self.models)
        step = max(1, CHUNK // len(self.models))
        for start in range(0, numel, step):
            stop = min(numel, start + step)
            stack = torch.stack([m.read(key, start, stop, torch.float64) for m in self.models])
            average = stack.mean(0).to(DTYPES[dtype])
            if not bool(torch.isfinite(stack.sum())):
                raise _nonfinite(key, self.models, stack)
            writer.write(average)
            for m, norm2 in enumerate((stack - average.to(torch.float64)).square().sum(dim=1).tolist()):
                norms2[m] += norm2
        return norms2

    def model_key(self, m: int, canon: str) -> str:
        key = self.alignment.file_key(self._index[m], canon)
        assert key is not None
        return key

    def reference_info(self, canon: str) -> tuple[str, str, tuple[int, ...]]:
        """The first model's own key, the dtype the average is written in, and the shape."""
        key = self.model_key(0, canon)
        info = self.models[0].tensors[key]
        return key, _written_dtype(info.dtype), info.shape

    def chunks(self, canon: str) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(start, stop, X, W̃)`` over the key: X the M deltas ``[M, stop − start]``, W̃ the base, float64."""
        keys = [self.model_key(m, canon) for m in range(len(self.models))]
        numel = self.models[0].tensors[keys[0]].numel
        _, average_dtype, _ = self.reference_info(canon)
        step = max(1, CHUNK // len(keys))
        for start in range(0, numel, step):
            stop = min(numel, start + step)
            stack = torch.stack([m.read(k, start, stop, torch.float64) for m, k in zip(self.models, keys, strict=True)])
            if self.base is None:
                base = stack.mean(0).to(DTYPES[average_dtype]).to(torch.float64)  # as written
            else:
                base = self.base.read(self.alignment.maps[0].keys[canon], start, stop, torch.float64)
            if not bool(torch.isfinite(stack.sum() + base.sum())):
                raise _nonfinite(canon, self.models, stack, self.base)
            yield start, stop, stack - base, base

    def close(self) -> None:
        for model in self.inputs:
            model.close()


# -- the fit ---------------------------------------------------------------------------------------


def als(gram: np.ndarray, rounds: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """One shared direction on a delta Gram: ``(λ, a)`` with δW = Σ a_m X_m, normalised so max |λ| = +1.

    Zero scalars when the Gram's top eigenvalue is at most ``floor`` (nothing left to fit).
    """
    values, vectors = np.linalg.eigh(gram)
    size = gram.shape[0]
    if values[-1] <= floor:
        return np.zeros(size), np.zeros(size)
    a = vectors[:, -1]
    for _ in range(rounds):
        lam = gram @ a / (a @ gram @ a)
        a = lam / (lam @ lam)
    lam = gram @ a / (a @ gram @ a)
    scale = lam[np.argmax(np.abs(lam))]
    return lam / scale, a * scale


@dataclass
class KeyFit:
    """One key's fit: scalars per model (λ, and κ with two directions), the directions' norms, errors."""

    key: str
    shape: list[int]
    lam: list[float]
    kappa: list[float] | None
    norm_dw: float  # ‖δW‖
    norm_dq: float | None  # ‖δQ‖
    error: list[float]  # per model ‖W_m − Ŵ_m‖ / ‖W_m − W̃‖ on this key (0 where the model equals the base)
    delta2: list[float]  # ‖W_m − W̃‖² per model
    noise2: float  # (rounding step of the key's dtype · ‖W̃‖)²: a delta2 up to this is rounding, the model is W̃
    residual2: list[float]  # ‖W_m − Ŵ_m‖² per model
    a: list[float]  # δW = Σ_m a_m (W_m − W̃)
    c: list[float] | None  # δQ = Σ_m c_m (W_m − W̃)


def fit_key(
    key: str, shape: tuple[int, ...], gram: np.ndarray, directions: int, rounds: int, noise2: float = 0.0
) -> KeyFit:
    """Fit one key from the Gram of its M deltas (see the module docstring); a model whose delta2 is at most
    ``noise2`` (rounding) equals the base, and its error is 0."""
    size = gram.shape[0]
    floor = ZERO_RTOL * max(float(np.trace(gram)), 0.0)
    lam, a = als(gram, rounds, floor)
    residual = np.eye(size) - np.outer(lam, a)  # X − λ δW = residual @ X
    kappa = c = None
    if directions == 2:
        kappa, b = als(residual @ gram @ residual.T, rounds, floor)
        c = residual.T @ b
        residual = residual - np.outer(kappa, c)
    delta2 = np.clip(np.diag(gram), 0.0, None)
    residual2 = np.clip(np.diag(residual @ gram @ residual.T), 0.0, None)
    return KeyFit(
        key=key,
        shape=list(shape),
        lam=lam.tolist(),
        kappa=None if kappa is None else kappa.tolist(),
        norm_dw=math.sqrt(max(float(a @ gram @ a), 0.0)),
        norm_dq=None if c is None else math.sqrt(max(float(c @ gram @ c), 0.0)),
        error=_relative_error(residual2, delta2, noise2).tolist(),
        delta2=delta2.tolist(),
        noise2=noise2,
        residual2=residual2.tolist(),
        a=a.tolist(),
        c=None if c is None else c.tolist(),
    )


def _relative_error(residual2: np.ndarray, delta2: np.ndarray, noise2: float) -> np.ndarray:
    """sqrt(residual2 / delta2) per model, 0 where delta2 is rounding (at most ``noise2``): that model is the base."""
    real = delta2 > noise2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(real, np.sqrt(residual2 / np.where(real, delta2, 1.0)), 0.0)


@dataclass
class Fit:
    """The fit of every shared key, and each model's overall relative reconstruction error."""

    base: str  # "average" or the base model's path
    models: list[str]
    directions: int
    rounds: int
    keys: list[KeyFit]
    error: list[float]  # per model: sqrt(Σ_keys ‖W_m − Ŵ_m‖²) / sqrt(Σ_keys ‖W_m − W̃‖²)
    left_out: list[str] = field(default_factory=list)  # keys not in every model with one shape (not fitted)
    non_diffusion: int = 0  # text-encoder / VAE keys of the first model, not fitted

    def to_dict(self) -> dict:
        return asdict(self)


def _check_options(directions: int, rounds: int) -> None:
    if directions not in DIRECTIONS:
        raise OrthoMechaError(f"--directions must be 1 or 2 (shared directions per key), got {directions}")
    if rounds < 1:
        raise OrthoMechaError(f"--rounds must be a whole number ≥ 1, got {rounds}")


def fit(models: list[str | Path], base: str | Path | None = None, directions: int = 1, rounds: int = 3) -> Fit:
    """Fit ``W_m ≈ W̃ + λ_m δW (+ κ_m δQ)`` key by key; ``base`` is a model file or None/"average"."""
    _check_options(directions, rounds)
    family = Family(models, base)
    try:
        fits = []
        for canon in family.keys:
            gram = np.zeros((len(family.models), len(family.models)))
            base2 = 0.0
            for _, _, deltas, base_chunk in family.chunks(canon):
                gram += (deltas @ deltas.T).numpy()
                base2 += float(base_chunk.square().sum())
            _, dtype, shape = family.reference_info(canon)
            fits.append(fit_key(canon, shape, (gram + gram.T) / 2.0, directions, rounds, base2 * ROUNDING[dtype] ** 2))
            logger.debug("%s: λ %s, errors %s", canon, fits[-1].lam, fits[-1].error)
    finally:
        family.close()
    delta2 = np.sum([k.delta2 for k in fits], axis=0) if fits else np.zeros(len(family.models))
    residual2 = np.sum([k.residual2 for k in fits], axis=0) if fits else np.zeros(len(family.models))
    return Fit(
        base=str(family.base.path) if family.base else AVERAGE,
        models=[str(m.path) for m in family.models],
        directions=directions,
        rounds=rounds,
        keys=fits,
        error=_relative_error(residual2, delta2, sum(k.noise2 for k in fits)).tolist(),
        left_out=family.left_out,
        non_diffusion=family.alignment.maps[0].non_diffusion,
    )


# -- export ----------------------------------------------------------------------------------------


class StreamingFile:
    """A safetensors file written key by key in a fixed order: the header first (every shape is known),
    then the data as it comes, into ``.NAME.partial-<pid>`` beside the target, renamed into place at the end."""

    def __init__(self, path: Path, layout: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        refuse_existing(path, overwrite=False, remedy=NEVER_OVERWRITTEN)
        remove_stale_partials(path)
        self.path = path
        self.partial = partial_path(path)
        header: dict[str, object] = {"__metadata__": metadata}
        position = 0
        for key, (dtype, shape) in layout.items():
            size = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
            position += size
        self.size = position
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.written = 0
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._fh = os.fdopen(fd, "wb")
        try:
            self._fh.write(len(encoded).to_bytes(8, "little") + encoded)
        except OSError as exc:
            self.abort()
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> OrthoMechaError:
        """A write error (a full disk) said of the user's file, not the partial one (the caller aborts)."""
        return OrthoMechaError(f"cannot write ({exc.strerror or exc}); nothing was written", self.path)

    def write(self, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        try:
            self._fh.write(data)
        except OSError as exc:
            raise self._failed(exc) from None
        self.written += data.nbytes

    def finish(self) -> Path:
        if self.written != self.size:
            raise RuntimeError(f"{self.path}: wrote {self.written} data bytes, the header announces {self.size}")
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as exc:
            raise self._failed(exc) from None
        place(self.partial, self.path, overwrite=False)
        return self.path

    def abort(self) -> None:
        discard(self._fh, self.partial)


def output_paths(out_dir: Path, models: list[str], average: bool) -> tuple[Path | None, list[Path]]:
    """Where the average and each model's LoRA go; raise if any exists or two models share a name."""
    loras = [out_dir / (Path(m).name.removesuffix(".safetensors").removesuffix(".json") + LORA_SUFFIX) for m in models]
    if len(set(loras)) != len(loras):
        clash = next(p for p in loras if loras.count(p) > 1)
        raise OrthoMechaError("two models would write the same LoRA; give the models distinct file names", clash)
    average_path = out_dir / AVERAGE_FILE if average else None
    for path in [*([average_path] if average_path else []), *loras]:
        refuse_existing(path, overwrite=False, remedy=NEVER_OVERWRITTEN)
    return average_path, loras


@dataclass
class ModelExport:
    """One model's LoRA: where it went, how much of its fitted delta it keeps, what it cannot carry."""

    model: str
    lora: str
    keys: int
    energy_kept: float  # Σ kept σ² / Σ ‖λ_m δW + κ_m δQ‖² over the LoRA's keys
    fit_error: float  # the fit's relative error (before the LoRA's truncation)
    not_captured: Uncaptured  # 1-D and unnamed keys of the fitted delta
    # ‖W_m − (base + LoRA)‖ / ‖W_m − W̃‖ over the fitted keys is at most this: the fit's residual plus what the
    # LoRA drops of the fitted delta (its truncation, and the keys it cannot carry), by the triangle inequality
    error_bound: float = 0.0


@dataclass
class ExportReport:
    base: str  # the base the LoRAs apply to: the written average or the given base model
    rank: int
    dtype: str
    models: list[ModelExport]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = [f"base: {self.base}"]
        for m in self.models:
            lines.append(
                f"  {m.lora}: fit error {m.fit_error:.2%}, LoRA rank ≤ {self.rank} keeps {m.energy_kept:.2%} "
                f"of the fitted delta, so base + this LoRA is within {m.error_bound:.2%} of the model (at most); "
                f"not captured: {m.not_captured.keys} keys (norm {m.not_captured.delta_norm:.4g})"
            )
        return lines


def export(result: Fit, out_dir: str | Path, rank: int = 64, dtype: str = "fp16") -> ExportReport:
    """Write the average base (when the base is the average) and one LoRA per model into ``out_dir``, as one set:
    when any of them fails (or Ctrl-C), those already written are removed again, and ``out_dir`` too when this
    made it, so a rerun finds nothing in its way."""
    check_rank(rank)
    torch_dtype = lora_dtype(dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OrthoMechaError("exists and is not a folder", out)
    require_folder(out.parent)
    average_path, lora_paths = output_paths(out, result.models, result.base == AVERAGE)
    family = Family(result.models, result.base)
    fits = {k.key: k for k in result.keys}
    if [k for k in family.keys if k in fits] != list(fits):
        raise OrthoMechaError("the models changed since the fit (its keys are not theirs); fit again", out)
    prefix = lora_prefix(family.keys)
    if fits and not any(len(k.shape) >= 2 and lora_name(k.key, prefix) is not None for k in fits.values()):
        family.close()
        example = next((k.key for k in fits.values() if len(k.shape) >= 2), next(iter(fits)))
        raise OrthoMechaError(
            f"none of the models' matrix keys has a kohya module name (a LoRA names a module by its "
            f"'<module>.weight' key; here e.g. '{example}'): no LoRA can carry their deltas; nothing was written", out)
    with output_folder(out), removed_on_failure() as written:  # the set lands whole, or not at all
        writer = None
        if average_path is not None:
            layout = {}
            for canon in fits:
                key, written_dtype, shape = family.reference_info(canon)
                layout[key] = (written_dtype, shape)
            beside = family.beside()
            layout |= {key: family.beside_info(key) for key in beside}
            meta = {"ortho_mecha_version": __version__, "ortho_mecha_kind": "compress-average"}
            writer = StreamingFile(average_path, layout, meta | {"ortho_mecha_models": json.dumps(result.models)})
        count = len(family.models)
        tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
        kept, total, dropped = np.zeros(count), np.zeros(count), np.zeros(count)
        lost = [Uncaptured() for _ in range(count)]
        try:
            for canon, key_fit in fits.items():
                dw, dq = _directions(family, key_fit, writer)
                name = lora_name(canon, prefix)
                for m in range(count):
                    lam, kappa = key_fit.lam[m], key_fit.kappa[m] if key_fit.kappa else 0.0
                    if dw.ndim < 2 or name is None:
                        lost[m].add(canon, norm2 := float((lam * dw + kappa * dq).pow(2).sum()))
                        dropped[m] += norm2
                if dw.ndim < 2 or name is None:
                    continue
                for m, low in enumerate(_per_model(key_fit, dw, dq, rank)):
                    if low.rank:
                        tensors[m] |= lora_tensors(name, low, tuple(dw.shape), torch_dtype)
                        kept[m], total[m] = kept[m] + low.kept, total[m] + low.total
            if writer:
                for key in beside:  # the text encoders and VAE: their average, which no LoRA changes
                    for m, norm2 in enumerate(family.average_beside(key, writer)):
                        lost[m].add(key, norm2)
                written.append(writer.finish())
            base_written = str(written[0]) if writer else result.base
        except BaseException:
            if writer:
                writer.abort()
            raise
        finally:
            family.close()
        bounds = _error_bounds(result, total - kept + dropped)
        exports = []
        for m, (model, path) in enumerate(zip(result.models, lora_paths, strict=True)):
            metadata = kohya_metadata(
                tensors[m], base=base_written, model=model, rank=rank, kind="compress", directions=result.directions
            )
            written.append(write_lora(path, tensors[m], metadata, overwrite=False))
            energy = kept[m] / total[m] if total[m] > 0 else 1.0
            exports.append(ModelExport(model, str(path), len(tensors[m]) // 3, energy, result.error[m], lost[m],
                                       float(bounds[m])))
        return ExportReport(base_written, rank, dtype, exports)


def _error_bounds(result: Fit, dropped2: np.ndarray) -> np.ndarray:
    """Per model, ‖W_m − (base + LoRA)‖ / ‖W_m − W̃‖ over the fitted keys at most: (‖residual‖ + ‖what the LoRA
    drops of the fitted delta‖) / ‖delta‖; 0 for a model the fit found equal to the base (error 0)."""
    delta2 = np.sum([k.delta2 for k in result.keys], axis=0) if result.keys else np.zeros(len(result.models))
    residual2 = np.sum([k.residual2 for k in result.keys], axis=0) if result.keys else np.zeros(len(result.models))
    real = (np.asarray(result.error) > 0) & (delta2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (np.sqrt(residual2) + np.sqrt(np.clip(dropped2, 0.0, None))) / np.sqrt(np.where(real, delta2, 1.0))
    return np.where(real, bound, 0.0)


def _directions(family: Family, key_fit: KeyFit, writer: StreamingFile | None) -> tuple[torch.Tensor, torch.Tensor]:
    """δW and δQ of one key in its shape (float32; δQ zero with one direction), streaming the average out."""
    numel = math.prod(key_fit.shape)
    dw, dq = torch.zeros(numel, dtype=torch.float32), torch.zeros(numel, dtype=torch.float32)
    a = torch.tensor(key_fit.a, dtype=torch.float64)
    c = torch.tensor(key_fit.c, dtype=torch.float64) if key_fit.c else None
    _, average_dtype, _ = family.reference_info(key_fit.key)
    for start, stop, deltas, base in family.chunks(key_fit.key):
        dw[start:stop] = a @ deltas
        if c is not None:
            dq[start:stop] = c @ deltas
        if writer is not None:
            writer.write(base.to(DTYPES[average_dtype]))
    return dw.reshape(key_fit.shape), dq.reshape(key_fit.shape)


def _per_model(key_fit: KeyFit, dw: torch.Tensor, dq: torch.Tensor, rank: int) -> Iterator[LowRank]:
    """Each model's truncated SVD of ``λ_m δW + κ_m δQ`` (one SVD of δW, scaled, with one direction)."""
    rows = dw.shape[0]
    if key_fit.kappa is None:
        shared = factorise(dw.reshape(rows, -1), rank)
        for lam in key_fit.lam:
            yield shared.scaled(lam)
        return
    for lam, kappa in zip(key_fit.lam, key_fit.kappa, strict=True):
        yield factorise((lam * dw + kappa * dq).reshape(rows, -1), rank)


# -- command line ----------------------------------------------------------------------------------


def cli_compress(args: argparse.Namespace) -> int:
    _check_options(args.directions, args.rounds)
    check_rank(args.rank)
    models = [str(p) for p in expand_model_paths(args.models)]
    out = Path(args.out)
    _, loras = output_paths(out, models, args.base == AVERAGE)
    check_writable(loras[0] if out.is_dir() else out)  # before the fit: a folder that cannot be written fails now
    if args.json:  # before the fit: a report that cannot be written would fail it after the LoRAs are written
        inputs = [Model(p) for p in models] + ([] if args.base == AVERAGE else [Model(args.base)])
        check_report_output(Path(args.json), inputs, overwrite=False, remedy=NEVER_OVERWRITTEN)
    result = fit(models, args.base, args.directions, args.rounds)
    written = export(result, out, args.rank, args.dtype)
    for line in written.summary_lines():
        print(line)
    if result.left_out:
        print(f"  {len(result.left_out)} keys not in every model with the same shape were left out, e.g. "
              f"{result.left_out[0]}")
    if result.non_diffusion:
        kept = ("the written base holds their average" if result.base == AVERAGE else
                f"the base {result.base} keeps its own")
        print(f"  {result.non_diffusion} text-encoder/VAE keys are outside the fit and the LoRAs (they hold the "
              f"diffusion model only): {kept}, and the models' differences there are in no LoRA")
    if args.json:
        write_json(Path(args.json), {"fit": result.to_dict(), "export": written.to_dict()})
        print(f"report written to {args.json}")
    return 0
