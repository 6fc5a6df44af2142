"""Merge execution: a plan's recipe through ``sd_mecha.merge`` into a checked, repaired, traceable file.

:func:`execute` runs any sd-mecha recipe built on a base's derived config (the generated script calls
it too); :func:`merge_plan` builds the plan's recipe first. In order:

1. the output is checked before any work: a ``.safetensors`` name in an existing folder, not one of the
   inputs, and not an existing file unless ``overwrite``; free disk space for the estimated size (the
   base's keys at the output dtype);
2. every input is lined up with the base config (shape mismatches and files sd-mecha cannot read are
   errors naming both files; keys the base lacks are counted and ignored) and hashed (sha256, cached);
3. sd-mecha streams the merge key by key into a temporary file in the output folder,
   ``.OUT.safetensors.partial-<pid>-<random>``; each key is repaired as it arrives — NaN/Inf elements are
   replaced by the base's values, non-float keys (which sd-mecha would cast to the output dtype) are
   copied from the base — and keys the merge did not produce (a model lacking them) are copied from
   the base at the end; every repair is counted in the report;
4. the header carries ``__metadata__``: the serialized recipe (``mecha_recipe``, sd-mecha's own key),
   the plan JSON and the sha256 of every input; the file is fsynced and moved into place — without
   ``overwrite`` never over a file that appeared meanwhile (another merge into the same name), which is
   kept, and this merge fails saying so (``fsutil.place``).

On any failure, Ctrl-C or SIGTERM the temporary file is removed, so no partial output ever sits under
the final name; a ``.partial-<pid>-…`` left by a killed process (SIGKILL) is removed by the next write of
that output once that process is gone. Inputs are only ever opened for reading.

sd-mecha calls used here, checked in tests/test_merge.py: ``merge(output=<mapping>)`` hands every
merged key to the mapping's ``__setitem__`` (plus a ``"__metadata__"`` entry, ignored), ``tqdm=`` is
called as ``tqdm(total=, desc=)`` and used as a context manager with ``set_postfix`` before and
``update`` after each key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sd_mecha
import torch
from sd_mecha.recipe_nodes import ModelRecipeNode
from threadpoolctl import threadpool_limits

from ortho_mecha import __version__
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import (
    check_writable,
    discard,
    file_stamp,
    partial_path,
    place,
    refuse_existing,
    remove_stale_partials,
    require_folder,
    short_names,
)
from ortho_mecha.hashing import sha256_file
from ortho_mecha.io import DTYPES, Model, expand_model_paths, parse_header, tensor_bytes
from ortho_mecha.lora_rows import is_lora_file
from ortho_mecha.mecha_config import check_model, register_base_config
from ortho_mecha.plan import Plan, load_plan, plan_from_dict, save_plan
from ortho_mecha.progress import counted, duration
from ortho_mecha.recipe import build_recipe
from ortho_mecha.validate import file_arch, other_family

logger = logging.getLogger(__name__)

Progress = Callable[[Mapping[str, Any]], None]

TORCH_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}
META_RECIPE = "mecha_recipe"  # the key sd-mecha itself writes the recipe under
META_PLAN = "ortho_mecha_plan"
META_HASHES = "ortho_mecha_sha256"
META_VERSION = "ortho_mecha_version"
META_CONVERTED = "ortho_mecha_converted_from"
SCALED_FP8_AS = torch.bfloat16  # what convert's "keep" makes of a scaled fp8 weight (fp8 × scale fits bf16's range)
DISK_MARGIN = 64 * 2**20


class MergeInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a merge (a KeyboardInterrupt, so the CLI reports it as an interruption)."""


class _Stopped(Exception):
    """Raised in sd-mecha's worker threads once the merge is being stopped, so pending keys end at once."""


# -- the output file ------------------------------------------------------------------------------


def data_bytes(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes of tensor data in a file of this layout."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for dtype, shape in layout.values())


# an LDM checkpoint's (SD1.x, SD2.x) top-level diffusion-schedule buffers: not weights, stored in float32
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
})


def output_layout(base: Model, output_dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The merged file's (dtype, shape) per key: the base's keys, float ones in ``output_dtype`` — but an SD
    checkpoint's noise-schedule buffers (:data:`SCHEDULE_BUFFERS`, e.g. ``alphas_cumprod``, which a UI samples
    with) keep the base's dtype, as integer keys do."""
    out_dtype = TORCH_DTYPES[output_dtype]
    return {key: (out_dtype if info.is_float and key not in SCHEDULE_BUFFERS else DTYPES[info.dtype],
                  tuple(info.shape))
            for key, info in base.tensors.items()}


def merge_metadata(recipe_text: str, hashes: Mapping[str, str], plan_json: str | None) -> dict[str, str]:
    """The merged file's metadata: its recipe, every input's sha256, the tool's version and the plan."""
    return {META_RECIPE: recipe_text, META_HASHES: json.dumps(dict(hashes)), META_VERSION: __version__} | (
        {META_PLAN: plan_json} if plan_json is not None else {})


def _header(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str],
            offsets: Mapping[str, tuple[int, int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for key, (start, end) in offsets.items():
        dtype, shape = layout[key]
        header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
    return json.dumps(header, separators=(",", ":")).encode()


def header_room(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> int:
    """Bytes reserved for the header of a merged file: room for the longest it can be (every offset as long as the
    data's size), rounded up to 8. The file is 8 + this + :func:`data_bytes` long."""
    data_size = data_bytes(layout)
    worst = _header(layout, metadata, {key: (data_size, data_size) for key in layout})
    return -(-len(worst) // 8) * 8


class _OutputWriter:
    """Where sd-mecha puts merged keys: repairs each one and streams it into the temporary file.

    The header is written last, into room reserved up front (its size is bounded because every key,
    shape and dtype is known before the merge starts). Each key's bytes go to a place fixed up front, in the
    base's key order, whatever order sd-mecha's threads finish the keys in: the same plan gives the same file,
    byte for byte. sd-mecha only ever assigns keys to its output mapping, so ``__setitem__`` is all this needs
    of the MutableMapping protocol.
    """

    def __init__(
        self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str], base: Model,
        out: Path | None = None,
    ) -> None:
        self.path = path
        self.out = out or path  # the file the user asked for, named in messages
        self.layout = layout
        self.metadata = metadata
        self.base = base
        self.entries: dict[str, tuple[int, int]] = {}
        self.nonfinite: dict[str, int] = {}
        self.non_float: list[str] = []
        self.missing: list[str] = []
        self._lock = threading.Lock()
        self._base_lock = threading.Lock()
        self.header_room = header_room(layout, metadata)
        self.offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for key, layout_entry in layout.items():
            self.offsets[key] = (position, position + data_bytes({key: layout_entry}))
            position = self.offsets[key][1]
        try:
            self._fh = open(path, "xb")  # noqa: SIM115 - closed by finish() or abort()
        except FileExistsError as exc:
            raise OrthoMechaError("another merge into the same file is running in this process", path) from exc
        self._fh.seek(8 + self.header_room)

    def _base_tensor(self, key: str) -> torch.Tensor:
        with self._base_lock:
            return self.base.read_tensor(key, dtype=DTYPES[self.base.tensors[key].dtype])

    def __setitem__(self, key: str, value: object) -> None:
        if key == "__metadata__":
            return  # sd-mecha's own metadata; ours is complete
        dtype, shape = self.layout[key]
        if not self.base.tensors[key].is_float:
            tensor = self._base_tensor(key)
            self.non_float.append(key)
        else:
            if isinstance(value, torch.Tensor) and value.numel() == 1 and math.prod(shape) == 1:
                value = value.reshape(shape)  # sd-mecha's dare and model_stock give a 0-d key (logit_scale) as [1]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise OrthoMechaError(
                    f"the merge produced {got} for '{key}', expected shape {list(shape)} (the base's)", self.base.path
                )
            tensor = self._repaired(key, value, dtype)
        self._write(key, tensor)
        if isinstance(value, torch.Tensor):
            # sd-mecha 1.1.8 returns each key's result into a future that it keeps until the whole merge ends,
            # which would gather the merged model in memory; written, the tensor lets go of its data
            value.set_()

    def _repaired(self, key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``value`` (the merge's result, in the merge dtype) in the output ``dtype``, its NaN/Inf elements replaced by
        the base's values (counted). A finite value the output dtype cannot hold (above fp16's 65504, say) is an
        error naming the key: written, it would be Inf, and replaced by the base's value it would silently drop
        the merge there. fp8 e4m3fn has no Inf and a cast saturates at ±448: beyond that is the same error. An fp8
        ``value`` (``convert`` keeps a plain fp8 key as it is) is looked at in float32, exactly: torch compares no
        fp8."""
        if value.element_size() == 1:
            value = value.float()
        if dtype == torch.float8_e4m3fn:
            beyond = value.abs() > torch.finfo(dtype).max
            if bool(beyond.any()):
                raise self._overflow(key, int(beyond.sum()), dtype, float(value[beyond].abs().max()))
        tensor = value.to(dtype)
        wide = (
            tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
        )
        if bool(torch.isfinite(wide.sum())):  # no NaN/Inf element: one cheap pass, no mask (rare overflow: below)
            return tensor
        bad = ~torch.isfinite(wide)
        count = int(bad.sum())
        if not count:
            return tensor
        beyond = bad & torch.isfinite(value)  # finite before the cast: too large for the output dtype
        if bool(beyond.any()):
            raise self._overflow(key, int(beyond.sum()), dtype, float(value[beyond].abs().max()))
        base = self._base_tensor(key)
        if base.element_size() == 1:  # fp8: as the value above
            base = base.float()
        replacement = base.to(wide.dtype)
        overflow = bad & ~torch.isfinite(replacement) & torch.isfinite(base)  # the base's own value does not fit
        if bool(overflow.any()):
            raise self._overflow(key, int(overflow.sum()), dtype, float(base[overflow].abs().max()))
        self.nonfinite[key] = count
        return torch.where(bad, replacement, wide).to(tensor.dtype)

    def _overflow(self, key: str, count: int, dtype: torch.dtype, largest: float) -> OrthoMechaError:
        return OrthoMechaError(
            f"'{key}' has {count} value{'s' if count != 1 else ''} beyond the range of the output dtype "
            f"{SAFETENSORS_NAMES[dtype]} (the largest there: {largest:.4g}); write it as bf16 or fp32 (a plan's "
            "\"output_dtype\", convert's --dtype); nothing was written",
            self.out,
        )

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        start, end = self.offsets[key]
        if len(data) != end - start:  # the dtype and shape were checked: this would be a bug, said before harm
            raise RuntimeError(f"'{key}': {len(data)} bytes to write where the layout has {end - start}")
        with self._lock:
            self._fh.seek(8 + self.header_room + start)
            self._fh.write(data)
            self.entries[key] = (start, end)

    def finish(self) -> None:
        """Copy the keys the merge did not produce from the base, write the header, fsync, close."""
        for key, (dtype, _) in self.layout.items():
            if key not in self.entries:
                (self.missing if self.base.tensors[key].is_float else self.non_float).append(key)
                self._write(key, self._base_tensor(key).to(dtype))
        header = _header(self.layout, self.metadata, {key: self.entries[key] for key in self.layout})
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self.header_room))
        self._fh.write(header + b" " * (self.header_room - len(header)))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        discard(self._fh, self.path)


# -- progress and interruption --------------------------------------------------------------------


class _Control:
    """Shared by a merge's progress bars and signal handler: the stop flag and what caused the stop."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None


class _ProgressBar:
    """Stands in for tqdm inside ``sd_mecha.merge``: reports each merged key to ``progress`` and stops
    the merge at the next key once a stop was requested (a signal, or ``progress`` raising: a job cancel)."""

    def __init__(self, progress: Progress | None, control: _Control, total: int, desc: str = "") -> None:
        self.progress, self.control, self.total = progress, control, total
        self.done = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_postfix(self, postfix: Mapping[str, Any] | None = None, **_: Any) -> None:
        if self.control.stop.is_set():
            raise _Stopped("the merge is being stopped")

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.progress is None:
                return
            elapsed = time.monotonic() - self._started
            info = {  # the keys are said by whoever shows it ("key 214 of 457"), with the time left at this pace
                "fraction": self.done / max(1, self.total),
                "keys_done": self.done,
                "keys_total": self.total,
                "eta_s": elapsed / self.done * (self.total - self.done),
            }
            try:
                self.progress(info)
            except BaseException as exc:
                self.control.error = self.control.error or exc
                self.control.stop.set()
                raise


@contextlib.contextmanager
def _stop_on_signals(control: _Control) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`MergeInterrupted` (main thread only; or into what the process's own
    handler raises, which is then called) and stop pending keys."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        control.stop.set()  # the keys not started are not merged
        earlier = previous[signum]
        if callable(earlier) and earlier is not signal.default_int_handler:
            earlier(signum, frame)  # the process's own handler decides what the stop is (a job worker: cancelled)
        raise MergeInterrupted(f"merge stopped by {signal.Signals(signum).name}")

    # an ignored signal stays ignored; a handler of the process's own is called after the stop flag is set
    previous = {
        sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) not in (signal.SIG_IGN, None)
    }
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- execution ------------------------------------------------------------------------------------


def _check_output(out: str | Path, overwrite: bool, inputs: list[Path]) -> Path:
    out = Path(out).expanduser()
    out = out.parent.resolve() / out.name
    if out.suffix != ".safetensors":
        raise OrthoMechaError("the output must be a .safetensors file", out)
    require_folder(out.parent, "the output folder")
    if out.is_dir():
        raise OrthoMechaError("is a folder; give the output a file name inside it", out)
    if _among(out, inputs):
        raise OrthoMechaError("the output would replace one of its own inputs; choose another name", out)
    refuse_existing(out, overwrite)
    check_writable(out)
    return out


def _check_device(device: str | None, threads: int | None) -> str:
    if threads is not None and threads < 0:
        raise OrthoMechaError(f"threads must be 0 (merge in this thread) or more, got {threads}")
    try:
        chosen = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise OrthoMechaError(f"unknown device '{device}': {exc}; use cpu, cuda, cuda:0, mps, ...") from exc
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(chosen.type, lambda: True)():
        raise OrthoMechaError(f"device '{device}' is not available to this PyTorch ({torch.__version__}); merge on "
                              "the CPU (leave --device out) or install a PyTorch build for it")
    return str(chosen)


def _merge_threads(threads: int | None, files: int) -> int:
    """sd-mecha's merge threads: ``threads``, or sd-mecha 1.1.8's own default for this many input files."""
    return threads if threads is not None else min(max(files, 2), os.cpu_count() or 1, 4)


@contextlib.contextmanager
def _torch_threads_per_worker(workers: int) -> Iterator[None]:
    """Share torch's intra-op threads (and numpy's and scipy's BLAS threads) out among sd-mecha's ``workers``
    merge threads while they run.

    Every worker would otherwise run torch's full thread count, and torch's OpenMP threads spin between
    operations: on 2 cores, 2 workers × 2 torch threads made orthomerge about 30 % slower than 2 × 1.
    With ``workers`` = 0 (merge in this thread) torch keeps all its threads.
    """
    previous = torch.get_num_threads()
    if not workers:
        yield
        return
    each = max(1, previous // workers)
    torch.set_num_threads(each)
    try:
        with threadpool_limits(limits=each):  # numpy's and scipy's BLAS (orthomerge's LAPACK)
            yield
    finally:
        # after threadpoolctl's own restore: it also sets OpenMP's count, torch's included, to what it found
        torch.set_num_threads(previous)


def _check_free_space(folder: Path, data_size: int, what: str = "the merge") -> None:
    free = shutil.disk_usage(folder).free
    if data_size + DISK_MARGIN > free:
        raise OrthoMechaError(
            f"not enough free disk space for {what}: it needs about {(data_size + DISK_MARGIN) / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free",
            folder,
        )


def _input_files(recipe: sd_mecha.RecipeNode, base: Path) -> list[Path]:
    paths = [Path(node.path).resolve() for node in recipe if isinstance(node, ModelRecipeNode)]
    return list(dict.fromkeys([base, *paths]))


def _preflight(inputs: list[Path], out: str | Path, overwrite: bool) -> tuple[Path, list[Any]]:
    """What ``merge`` checks before it reads any tensor: the output (a new ``.safetensors`` in an existing
    folder, not an input), then every input against the base ``inputs[0]`` (shapes, shared keys, files
    sd-mecha cannot merge). (The output path, each input's check.)"""
    out = _check_output(out, overwrite, inputs)
    return out, _check_inputs(inputs)


def _check_inputs(inputs: list[Path]) -> list[Any]:
    """Each input's check against the base ``inputs[0]`` (shapes, shared keys, files sd-mecha cannot merge); a
    model of a related family (Chroma beside Flux.1) is merged as asked, with a warning."""
    config_id = register_base_config(inputs[0])
    checks = [check_model(config_id, inputs[0], path) for path in inputs[1:]]
    base_arch = file_arch(parse_header(inputs[0])[0])
    for path in inputs[1:]:
        if not is_lora_file(path) and (family := other_family(base_arch, file_arch(parse_header(path)[0]))):
            logger.warning("%s: %s", path, family)  # merged as asked: Chroma and Flux.1 may be merged on purpose
    return checks


def replaces_an_input(plan: Plan, out: Path) -> bool:
    """Whether ``out`` is one of ``plan``'s input files (a merge into it is refused)."""
    return _among(out, plan.input_files())


def _among(out: Path, inputs: Iterable[str | Path]) -> bool:
    """Whether ``out`` is one of ``inputs`` (by real path: a link or another spelling counts)."""
    return out.resolve() in {Path(p).resolve() for p in inputs}


def check_plan(plan: Plan, out: str | Path, overwrite: bool = False) -> None:
    """:func:`_preflight` of ``plan``'s inputs and ``out``, for ``merge --dry-run``."""
    _preflight([Path(p).resolve() for p in plan.input_files()], out, overwrite)


def check_plan_inputs(plan: Plan) -> None:
    """The input checks of :func:`check_plan` alone (every file against the plan's base), as the dashboard's
    Mixer and Merge pages make them before a merge is started; the output they check themselves. The texture
    model is checked on its own, and a problem of it says so (its message named the file only, which read as a
    row's)."""
    inputs = [Path(p).resolve() for p in plan.input_files()]
    texture = None if plan.texture is None else plan.texture.model.resolve()
    _check_inputs([path for path in inputs if path != texture or path == inputs[0]])
    if texture is not None and texture != inputs[0]:
        try:
            _check_inputs([inputs[0], texture])
        except OrthoMechaError as error:
            raise OrthoMechaError(f"the texture model: {error}") from None


def execute(
    recipe: sd_mecha.RecipeNode,
    out: str | Path,
    *,
    base: str | Path,
    merge_dtype: str,
    output_dtype: str,
    plan_json: str | None = None,
    recipe_text: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Merge ``recipe`` (built on ``base``'s derived config) into ``out``; return the report (module docstring)."""
    started = time.monotonic()
    base = Path(base).resolve()
    inputs = _input_files(recipe, base)
    merge_device = _check_device(device, threads)
    out, checks = _preflight(inputs, out, overwrite)
    with Model(base) as base_model:
        layout = output_layout(base_model, output_dtype)
        _check_free_space(out.parent, data_bytes(layout))
        stamps = {path: file_stamp(path) for path in inputs}  # before hashing: the hashes are of these files
        hashes = {}
        for path in inputs:
            if progress is not None:
                progress({"fraction": 0.0, "message": f"sha256 of {path.name}"})
            hashes[str(path)] = sha256_file(path)
        metadata = merge_metadata(recipe_text if recipe_text is not None else sd_mecha.serialize(recipe), hashes,
                                  plan_json)
        control = _Control()
        workers = _merge_threads(threads, len(inputs))
        with _stop_on_signals(control), _torch_threads_per_worker(workers):
            try:
                with _written(out, layout, metadata, base_model, overwrite) as writer:
                    sd_mecha.merge(
                        recipe,
                        merge_device=merge_device,
                        merge_dtype=TORCH_DTYPES[merge_dtype],
                        # the writer casts to the output dtype, so that a value beyond its range is seen (fp16
                        # would make it Inf, indistinguishable from an input's NaN/Inf; fp8 e4m3fn saturates)
                        output_dtype=TORCH_DTYPES[merge_dtype],
                        threads=workers,
                        output=writer,
                        tqdm=lambda total, desc="": _ProgressBar(progress, control, total, desc),
                        check_extra_keys=False,  # counted per input in the report instead
                        check_finite_output=False,  # repaired and counted by the writer
                        omit_non_finite_inputs=False,  # a NaN in one input costs its elements, not the whole key
                    )
                    _refuse_changed(stamps)  # before the output is moved into place
            except _Stopped:
                if control.error is not None:
                    raise control.error from None  # what stopped the merge, not a key that stopped after it
                raise
    report = {
        "output": str(out),
        "bytes": out.stat().st_size,
        "keys": len(layout),
        "merge_dtype": merge_dtype,
        "output_dtype": output_dtype,
        "sha256": hashes,
        "output_sha256": sha256_file(out),  # (cached by fingerprint: a later preview or check reads no byte again)
        "inputs": [asdict(check) for check in checks],
        "extra_keys_ignored": sum(check.extra for check in checks),
        "lora_modules_set_aside": sum(check.set_aside for check in checks),
        "repairs": {"nonfinite": dict(writer.nonfinite), "missing": writer.missing, "non_float": writer.non_float},
        "seconds": round(time.monotonic() - started, 3),
    }
    logger.info("merged %s (%d keys, repairs %s)", out, len(layout), report["repairs"])
    return report


def _refuse_changed(stamps: Mapping[Path, tuple[int, int]]) -> None:
    """Raise if an input's size or time changed since the merge began (copied over or re-downloaded meanwhile):
    the merge read part of one file and part of another, and the recorded sha256 is the old file's."""
    for path, stamp in stamps.items():
        try:
            changed = file_stamp(path) != stamp
        except OSError:
            changed = True
        if changed:
            raise OrthoMechaError("changed while it was being merged (its size or time differ: copied over or "
                                  "downloaded again meanwhile?); nothing was written: merge again once it is complete",
                                  path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _written(out: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
             base: Model, overwrite: bool) -> Iterator[_OutputWriter]:
    """The writer of ``out``, streaming into ``.OUT.partial-<pid>-…`` (stale ones of killed processes removed
    first): finished, moved into place (never over a file that appeared meanwhile unless ``overwrite``) and the
    folder fsynced when the block ends; removed if it raises."""
    remove_stale_partials(out)
    temp = partial_path(out)
    try:
        writer = _OutputWriter(temp, layout, metadata, base, out)
    except OSError as exc:
        raise OrthoMechaError(f"cannot write the output ({exc.strerror or exc})", out) from None
    try:
        yield writer
        writer.finish()
        place(temp, out, overwrite)
    except OSError as exc:  # the disk filled up, the folder went away: said of the user's file, not the temporary one
        writer.abort()
        raise OrthoMechaError(f"cannot write the output ({exc.strerror or exc}); nothing was written", out) from None
    except BaseException:
        writer.abort()
        raise
    _fsync_dir(out.parent)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write ``source`` (one file or the shards of one) as one plain ``.safetensors`` file sd-mecha reads as is.

    Scaled fp8 weights are dequantised (w × scale, per tensor or per row) and their scale tensors and
    marker keys dropped; float tensors are stored in ``dtype`` ("keep": as stored, scaled fp8 as bf16),
    other tensors as they are; the file's metadata is kept, with ``ortho_mecha_converted_from`` added.
    Written like a merge: the output is checked first, streamed key by key into a temporary file and
    renamed into place, so a failure or Ctrl-C leaves nothing under ``out``. Returns a small report.
    """
    started = time.monotonic()
    if dtype != "keep" and dtype not in ("fp32", "fp16", "bf16"):
        raise OrthoMechaError(f"unknown dtype '{dtype}' for convert: use keep, fp32, fp16 or bf16")
    if Path(source).is_dir():  # a folder holding one model (e.g. its shards and index) stands for it
        found = expand_model_paths([source])
        if len(found) > 1:
            raise OrthoMechaError(f"holds {len(found)} models; name the one to convert", source)
        source = found[0]
    with Model(source) as model:
        out = _check_output(out, overwrite, [model.path, *model.files])

        def stored_as(info: Any) -> torch.dtype:
            if not info.is_float:
                return DTYPES[info.dtype]
            if dtype != "keep":
                return TORCH_DTYPES[dtype]
            return SCALED_FP8_AS if info.scale is not None else DTYPES[info.dtype]

        layout = {key: (stored_as(info), tuple(info.shape)) for key, info in model.tensors.items()}
        _check_free_space(out.parent, data_bytes(layout), "the copy")
        metadata = dict(model.metadata) | {META_CONVERTED: model.path.name, META_VERSION: __version__}
        with _stop_on_signals(_Control()), _written(out, layout, metadata, model, overwrite) as writer:
            for done, (key, info) in enumerate(model.tensors.items(), start=1):
                # non-float keys the writer copies itself; scaled fp8 is dequantised in float32 first
                read_as = torch.float32 if info.scale else layout[key][0]
                writer[key] = model.read_tensor(key, read_as) if info.is_float else None
                if progress is not None:
                    progress({"fraction": done / len(layout), "keys_done": done, "keys_total": len(layout)})
        report = {"source": str(model.path), "files": len(model.files), "output": str(out), "keys": len(layout),
                  "dequantised": sum(info.scale is not None for info in model.tensors.values())}
    return report | {"bytes": out.stat().st_size, "seconds": round(time.monotonic() - started, 3)}


def cli_convert(args: argparse.Namespace) -> int:
    from ortho_mecha.progress import TqdmProgress

    with TqdmProgress("converting") as bar:
        report = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=bar.update)
    shards = f" from {report['files']} shards" if report["files"] > 1 else ""
    scaled = f", {report['dequantised']} scaled fp8 weights dequantised" if report["dequantised"] else ""
    print(f"wrote {report['output']}{shards}: {counted(report['keys'], 'key')}{scaled}, "
          f"{report['bytes'] / 2**20:.1f} MiB, {duration(report['seconds'])}")
    return 0


def merge_plan(
    plan: Plan,
    out: str | Path,
    overwrite: bool = False,
    threads: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Merge ``plan`` into ``out`` (see :func:`execute`); the report also names the plan's method and rows."""
    recipe = build_recipe(plan)
    report = execute(
        recipe,
        out,
        base=plan.base,
        merge_dtype=plan.merge_dtype,
        output_dtype=plan.output_dtype,
        plan_json=plan.to_json(),
        recipe_text=sd_mecha.serialize(recipe),
        overwrite=overwrite,
        threads=threads,
        device=device,
        progress=progress,
    )
    return {"method": plan.method, "rows": len(plan.enabled_rows)} | report


def output_bytes(plan: Plan) -> int:
    """The size of the file :func:`merge_plan` writes for ``plan``: exact, as the header's room depends only on
    the keys, the metadata's lengths (an input's sha256 is always 64 hex digits) and the data's size."""
    recipe = build_recipe(plan)
    inputs = _input_files(recipe, Path(plan.base).resolve())
    with Model(inputs[0]) as base:
        layout = output_layout(base, plan.output_dtype)
    metadata = merge_metadata(sd_mecha.serialize(recipe), {str(path): "0" * 64 for path in inputs}, plan.to_json())
    return 8 + header_room(layout, metadata) + data_bytes(layout)


def job_plan(params: Mapping[str, Any]) -> Plan:
    """The plan of a ``merge`` job's parameters: its ``plan_data`` (a plan as JSON data, absolute paths), or the
    plan file ``plan``."""
    if isinstance(params.get("plan_data"), dict):
        return plan_from_dict(params["plan_data"], Path.cwd())
    if not isinstance(params.get("plan"), str):
        raise OrthoMechaError("merge job: give 'plan' (a plan file's path) or 'plan_data' (a plan)")
    return load_plan(params["plan"])


def run_job(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Background-job entry: ``{"plan": path or "plan_data": plan data, "out": path, "overwrite": bool}``
    (optional threads, device, and ``plan_beside``: where to save the plan once the merge is written)."""
    if not isinstance(params.get("out"), str):
        raise OrthoMechaError("merge job: 'out' must be a file path")
    plan = job_plan(params)
    # the dashboard's wording (merge_plan says the same with the command line's remedy)
    refuse_existing(Path(params["out"]), bool(params.get("overwrite", False)),
                    remedy="choose another name, or tick 'Replace an existing file'")
    report = merge_plan(
        plan,
        params["out"],
        overwrite=bool(params.get("overwrite", False)),
        threads=params.get("threads"),
        device=params.get("device"),
        progress=progress,
    )
    if isinstance(params.get("plan_beside"), str):
        save_plan(plan, params["plan_beside"], overwrite=True)
    if params.get("survival", True):
        report["survival"] = _measured(plan, report["output"])
    return report


def _measured(plan: Plan, output: str, progress: Progress | None = None) -> dict[str, Any] | None:
    """The merge's measured survival (:func:`ortho_mecha.evaluate.measure`), or None with a warning when it cannot be
    measured (inputs holding NaN/Inf, say): the merge itself is written and checked by then."""
    from ortho_mecha.evaluate import measure

    try:
        survival = measure(plan, output, progress=progress)
    except (OrthoMechaError, ArithmeticError, ValueError) as error:  # numpy LinAlgError is a ValueError
        logger.warning("the merge is written, but its survival could not be measured: %s", error)
        return None
    if not all(math.isfinite(v) for v in (*survival["predicted"], *survival["measured"])):
        logger.warning("the merge is written, but its survival could not be measured: the inputs hold NaN/Inf "
                       "values (see 'ortho-mecha validate')")
        return None
    return survival


def summary(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal: output, repairs, ignored keys, hashes."""
    repairs = report["repairs"]
    lines = [
        f"merged {counted(report['rows'], 'row')} ({report['method']}) → {report['output']} "
        f"({report['bytes'] / 2**20:.1f} MiB, {report['output_dtype']}, {duration(report['seconds'])})"
    ]
    fixes = []
    if repairs["nonfinite"]:
        fixes.append(
            f"{counted(len(repairs['nonfinite']), 'key')} had NaN/Inf "
            f"({counted(sum(repairs['nonfinite'].values()), 'element')}, "
            "replaced by the base's values)"
        )
    if repairs["missing"]:
        fixes.append(f"{counted(len(repairs['missing']), 'key')} not produced by the merge copied from the base")
    if repairs["non_float"]:
        fixes.append(f"{counted(len(repairs['non_float']), 'non-float key')} copied from the base")
    lines.append("repairs: " + ("; ".join(fixes) if fixes else "none"))
    if report["extra_keys_ignored"]:
        lines.append(f"ignored: {counted(report['extra_keys_ignored'], 'key')} of the inputs that the base does not "
                     "have")
    if report.get("lora_modules_set_aside"):
        lines.append(f"set aside: {report['lora_modules_set_aside']} text-encoder modules of LoRA rows (a LoRA row "
                     "merges its diffusion part only)")
    lines += ["sha256:"] + [f"  {digest}  {path}" for path, digest in report["sha256"].items()]
    lines.append(f"  {report['output_sha256']}  {report['output']} (output)")
    return "\n".join(lines)


def survival_lines(survival: Mapping[str, Any]) -> list[str]:
    """Each row's predicted and measured survival, one line per row."""
    names = short_names(survival["rows"], keep_suffix=True)
    width = max(len(name) for name in names)
    lines = [f"survival (predicted: {survival['label']}):"]
    for name, predicted, measured in zip(names, survival["predicted"], survival["measured"], strict=True):
        lines.append(f"  {name:<{width}}  predicted {predicted:6.3f}  measured {measured:6.3f}")
    return lines


def cli_merge(args: argparse.Namespace) -> int:
    from ortho_mecha.progress import TqdmProgress

    plan = load_plan(args.plan)
    if args.dry_run:
        from ortho_mecha.forecast import forecast

        check_plan(plan, args.out, args.overwrite)
        _check_device(args.device, args.threads)  # what the merge itself refuses
        predicted = forecast(plan, args.out, threads=args.threads or 1)
        for line in predicted.lines():
            print(line)
        if predicted.fits_disk is False:  # what the merge would stop on: the dry run fails as well
            raise OrthoMechaError("not enough free disk space for the output (see above)", Path(args.out).parent)
        return 0
    with TqdmProgress("merging") as bar:
        report = merge_plan(plan, args.out, args.overwrite, args.threads, args.device, progress=bar.update)
    print(summary(report))
    if not args.no_survival:
        with TqdmProgress("measuring survival") as bar:
            survival = _measured(plan, report["output"], progress=bar.update)
        if survival is not None:
            print("\n".join(survival_lines(survival)))
    return 0
