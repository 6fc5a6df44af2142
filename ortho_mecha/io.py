"""Reading safetensors models lazily: one key, or one chunk of a key, at a time.

Only ``.safetensors`` is read. The header is checked before any tensor is touched (truncation, sizes
that do not add up, overlapping or duplicate entries), pickle checkpoints are refused without being
unpickled, GGUF and bitsandbytes-quantised files are refused by name, "scaled fp8" files are
dequantised with their per-key scales, and a sharded model (``*-0000k-of-0000n`` with its index JSON)
reads as one model. Files are opened read-only; nothing here ever writes to an input.

Reads go through ``os.pread`` into a buffer the size of the chunk asked for, so memory follows the
chunk size, never the model size (memory-mapping whole files shows the whole model in RSS).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path, PurePath

import torch

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import refuse_unencodable
from ortho_mecha.security import READ_SUFFIXES

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
logger = logging.getLogger(__name__)

HEADER_LIMIT = 256 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
ITEMSIZES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# Relative rounding step of each storage dtype (half an ulp at 1.0): the noise floor of a stored weight.
ROUNDING = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8, "F8_E4M3": 2.0**-4, "F8_E5M2": 2.0**-3}

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # .comfy_quant: ComfyUI's per-layer quant marker
IGNORED_KEYS = {"scaled_fp8"}
QUANT_MARKERS = ("quant_state", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "bitsandbytes")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int
    scale: str | None = None  # key of the per-key scale tensor of a scaled-fp8 weight

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's data as the bytes a safetensors file stores (row-major, native little-endian)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def refuse_unsupported(path: Path) -> None:
    """Refuse files that are not safetensors, with the reason and what to do instead, and names that are not
    UTF-8 (:func:`ortho_mecha.fsutil.refuse_unencodable`)."""
    refuse_unencodable(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise OrthoMechaError(
            f"'{suffix}' is a pickle checkpoint; ortho-mecha never unpickles files (they can run code). "
            "Convert it to .safetensors first",
            path,
        )
    if suffix == ".gguf":
        raise OrthoMechaError("GGUF files are quantised; use a .safetensors model", path)
    if suffix not in READ_SUFFIXES:
        raise OrthoMechaError("not a .safetensors file (only safetensors models are read)", path)


FORMAT_HINTS = ((b"\x89PNG", "a PNG image"), (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.ckpt is one)"),
                (b"\x80", "a Python pickle"), (b"{", "JSON text"))


def _format_hint(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes (" (it is a PNG image)"), or ""."""
    return next((f" (it is {what})" for magic, what in FORMAT_HINTS if head.startswith(magic)), "")


def parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check one safetensors file's header; return its tensors and its ``__metadata__``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
            if head[:4] == b"GGUF":
                raise OrthoMechaError("this is a GGUF file (quantised); it cannot be analysed or merged", path)
            if len(head) < 9:
                raise OrthoMechaError(f"truncated: {size} bytes is too short for a safetensors header", path)
            if head[8:9] != b"{":  # the safetensors format: 8 bytes of header length, then the JSON header
                raise OrthoMechaError(f"not a safetensors file{_format_hint(head)}; is it another format renamed?",
                                      path)
            (header_len,) = struct.unpack("<Q", head[:8])
            if header_len < 2 or header_len > min(HEADER_LIMIT, size - 8):
                raise OrthoMechaError(
                    f"corrupt or truncated: the header claims {header_len} bytes but the file has {size - 8} after "
                    "the length field",
                    path,
                )
            fh.seek(8)
            raw = fh.read(header_len)
    except IsADirectoryError as exc:
        raise OrthoMechaError("is a directory, expected a .safetensors file", path) from exc
    except FileNotFoundError as exc:
        raise OrthoMechaError("no such file", path) from exc
    except PermissionError as exc:
        raise OrthoMechaError("permission denied (cannot read the file)", path) from exc
    except OSError as exc:
        raise OrthoMechaError(f"cannot read: {exc.strerror or exc}", path) from exc

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen = dict(pairs)
        if len(seen) < len(pairs):  # rare: the Python loop only to name the key
            key = next(k for i, (k, _) in enumerate(pairs) if any(k == other for other, _ in pairs[:i]))
            raise OrthoMechaError(f"corrupt header: key '{key}' appears twice", path)
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OrthoMechaError(f"corrupt header (not valid JSON: {exc})", path) from exc
    if not isinstance(header, dict):
        raise OrthoMechaError("corrupt header (not a JSON object)", path)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise OrthoMechaError("corrupt header ('__metadata__' is not a JSON object of text values)", path)
    # safetensors keeps text values; a value some tool wrote as JSON data is kept as its JSON text
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(map(int, entry["shape"]))
            begin, end = map(int, entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OrthoMechaError(f"corrupt header entry for '{name}'", path) from exc
        if dtype not in DTYPES:
            raise OrthoMechaError(
                f"tensor '{name}' has dtype {dtype}, which ortho-mecha cannot read "
                f"(supported: {', '.join(sorted(DTYPES))}); 4-bit and other packed formats are not supported",
                path,
            )
        if min(shape, default=0) < 0 or begin < 0 or end < begin:
            raise OrthoMechaError(
                f"corrupt header: '{name}' has a negative size (shape {list(shape)}, offsets [{begin}, {end}])", path
            )
        nbytes = math.prod(shape) * ITEMSIZES[dtype]
        if end - begin != nbytes:
            raise OrthoMechaError(
                f"corrupt header: '{name}' is {dtype}{list(shape)} ({nbytes} bytes) but its offsets span "
                f"{end - begin} bytes",
                path,
            )
        if end > data_size:
            raise OrthoMechaError(
                f"truncated: '{name}' ends at byte {end} of the data but the file holds only {data_size}", path
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    _check_overlaps(tensors, path)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _check_overlaps(tensors: dict[str, TensorInfo], path: Path) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise OrthoMechaError(f"corrupt header: '{name_a}' and '{name_b}' overlap", path)


def _shard_files(path: Path) -> list[Path]:
    """The shard files of a sharded model, given its index JSON or any one shard."""
    if path.name.endswith(".json"):
        try:
            index = json.loads(path.read_text())
            files = sorted(set(index["weight_map"].values()))
        except FileNotFoundError as exc:
            raise OrthoMechaError("no such file", path) from exc
        except PermissionError as exc:
            raise OrthoMechaError("permission denied (cannot read the file)", path) from exc
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise OrthoMechaError("not a valid sharded-model index (expected a JSON 'weight_map')", path) from exc
        outside = [f for f in files if PurePath(f).is_absolute() or ".." in PurePath(f.replace("\\", "/")).parts]
        if outside:  # an index names its shards beside it; a path leading elsewhere is not a shard of this model
            raise OrthoMechaError(f"sharded-model index names a file outside its folder: {outside[0]!r}", path)
        shards = [path.parent / f for f in files]
    else:
        match = SHARD_RE.match(path.name)
        assert match is not None
        stem, total = match["stem"], int(match["total"])
        index_json = path.parent / f"{stem}.safetensors.index.json"
        if index_json.exists():
            return _shard_files(index_json)
        shards = [path.parent / f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise OrthoMechaError(f"sharded model is incomplete: missing {', '.join(missing)}", path)
    return shards


def model_files(path: Path) -> list[Path]:
    """The files a model path stands for, headers unread: its shards (given the index JSON or one shard), or
    itself once it is a file ortho-mecha reads (:func:`refuse_unsupported`)."""
    if path.name.endswith(".json") or SHARD_RE.match(path.name):
        return _shard_files(path)
    refuse_unsupported(path)
    return [path]


def sampled_digest(files: Sequence[Path], stamped: bool = False) -> str:
    """A hash of each file's size, its first 64 KiB (the header) and 16 blocks of 4 KiB spread over it: cheap, and
    different for two files of one layout. ``stamped``: each file's name and mtime count too (a cache fingerprint);
    without, a copy of a file has its digest."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update((f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}" if stamped else f"{stat.st_size}").encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(64 * 1024))
            for i in range(1, 17):
                fh.seek(stat.st_size * i // 17)
                digest.update(fh.read(4096))
    return digest.hexdigest()[:32]


def _scale_keys(name: str) -> tuple[str, str, str]:
    """The names a quantised weight ``name``'s scale tensor goes by (ComfyUI's scaled fp8, its mixed precision)."""
    stem = name.rsplit(".", 1)[0]
    return f"{stem}.scale_weight", f"{name}_scale", f"{stem}.weight_scale"


class Model:
    """A model on disk (one safetensors file, or the shards of one): lazily readable, key by key."""

    is_delta = False  # its tensors are weights (a LoRA row's are deltas: ortho_mecha.lora_rows.LoraModel)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise OrthoMechaError("is a directory, expected a .safetensors file or a shard index JSON", self.path)
        self.files = model_files(self.path)
        self.metadata: dict[str, str] = {}
        raw: dict[str, TensorInfo] = {}
        for file in self.files:
            if file != self.path:
                refuse_unsupported(file)
            tensors, metadata = parse_header(file)
            self.metadata.update(metadata)
            for name, info in tensors.items():
                if name in raw:
                    raise OrthoMechaError(f"key '{name}' is in two shards ({raw[name].file.name}, {file.name})", file)
                raw[name] = info
        self._refuse_quantised(raw)
        self.tensors = self._attach_scales(raw)
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()

    def _refuse_quantised(self, raw: dict[str, TensorInfo]) -> None:
        names = "\n".join(raw).lower()  # one search of every name, not one per key and marker
        if any(marker in names for marker in QUANT_MARKERS):
            name = next(name for name in raw if any(marker in name.lower() for marker in QUANT_MARKERS))
            raise OrthoMechaError(
                f"bitsandbytes/NF4-quantised model (key '{name}'); ortho-mecha reads fp32, fp16, bf16 and fp8 "
                "safetensors only",
                self.path,
            )
        if IGNORED_KEYS & raw.keys() and not any(name.endswith(SCALE_SUFFIXES) for name in raw):
            fp8 = next((name for name, info in raw.items() if info.dtype in FP8_DTYPES), None)
            if fp8 is not None:  # read as they are, its weights would be off by their lost scales (merges of ±448)
                raise OrthoMechaError(
                    f"marked scaled_fp8 (ComfyUI's scaled fp8) but holds no scale key (.scale_weight or "
                    f".weight_scale): its fp8 weights, e.g. '{fp8}', were stored divided by scales this file lacks; "
                    "use the complete file, or the model's fp32/fp16/bf16 one",
                    self.path,
                )
        for name, info in raw.items():
            if info.dtype in FLOAT_DTYPES or name.endswith(SCALE_SUFFIXES + IGNORED_SUFFIXES):
                continue
            marked = f"{name.rsplit('.', 1)[0]}.comfy_quant" in raw or any(c in raw for c in _scale_keys(name))
            if marked:  # int8 (int8_tensorwise), packed NVFP4/MXFP4, …
                raise OrthoMechaError(
                    f"quantised weights of ComfyUI's mixed-precision kind (key '{name}' is {info.dtype}, with a scale "
                    "or a .comfy_quant marker): only fp8 ones are dequantised; use the model's fp32/fp16/bf16/fp8 "
                    "file",
                    self.path,
                )

    def _attach_scales(self, raw: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Drop scale and marker keys, pointing each scaled-fp8 weight at its scale tensor."""
        tensors: dict[str, TensorInfo] = {}
        for name, info in raw.items():
            if name in IGNORED_KEYS or name.endswith(SCALE_SUFFIXES + IGNORED_SUFFIXES):
                continue
            scale = None
            if info.dtype in FP8_DTYPES:
                scale = next((c for c in _scale_keys(name) if c in raw), None)
                if scale is not None:
                    n_scale = raw[scale].numel
                    rows = info.shape[0] if info.shape else 1
                    if n_scale not in (1, rows):
                        raise OrthoMechaError(
                            f"scale '{scale}' has {n_scale} values; expected 1 or one per row ({rows}) of '{name}'",
                            self.path,
                        )
            tensors[name] = info if scale is None else replace(info, scale=scale)
        self._scales = {t.scale: raw[t.scale] for t in tensors.values() if t.scale}
        return tensors

    # -- identity -------------------------------------------------------------------------------------

    @cached_property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @cached_property
    def fingerprint(self) -> str:
        """Size, mtime and a hash of the header plus sampled bytes of every file: cheap, changes when the file does."""
        return sampled_digest(self.files, stamped=True)

    @property
    def scaled_fp8(self) -> bool:
        return bool(self._scales)

    # -- reading --------------------------------------------------------------------------------------

    def _fd(self, file: Path) -> int:
        with self._fd_lock:  # the analysis reads one model from several threads
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # reads go front to back: let the kernel read ahead further
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[file] = fd
            return fd

    def _read_raw(self, info: TensorInfo, start: int, stop: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of ``info`` as stored, in ``scratch`` (uint8, large enough) when given."""
        size = info.itemsize
        nbytes = (stop - start) * size
        if nbytes == 0:
            return torch.empty(0, dtype=DTYPES[info.dtype])
        raw = torch.empty(nbytes, dtype=torch.uint8) if scratch is None else scratch[:nbytes]
        view = memoryview(raw.numpy())
        offset, got = info.start + start * size, 0
        fd = self._fd(info.file)
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise OrthoMechaError(f"truncated while reading '{info.name}'", info.file)
            got += n
        return raw.view(DTYPES[info.dtype])

    def location(self, key: str) -> tuple[int, int]:
        """(an open read-only file descriptor, the byte offset in it of element 0) of ``key`` as stored: for
        readers that read the stored bytes themselves (the analysis kernel). The model keeps the descriptor."""
        info = self.tensors[key]
        return self._fd(info.file), info.start

    def read(
        self, key: str, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Elements [start, stop) of ``key``, flattened, converted to ``dtype`` (scaled fp8 dequantised)."""
        info = self.tensors[key]
        stop = info.numel if stop is None else stop
        return self.read_into(key, start, stop, torch.empty(stop - start, dtype=dtype))

    def read_stored(self, key: str, start: int, stop: int, into: torch.Tensor) -> torch.Tensor:
        """Elements [start, stop) of ``key`` as stored (no conversion, no fp8 scale), in the uint8 buffer ``into``."""
        return self._read_raw(self.tensors[key], start, stop, into)

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Read elements [start, stop) of ``key`` into the 1-D tensor ``out`` (converting to its dtype).

        ``scratch``: a uint8 buffer of at least (stop − start) × 8 bytes the stored bytes are read into first;
        a streaming reader reuses one, as fresh buffers per read cost page faults.
        """
        info = self.tensors[key]
        out.copy_(self._read_raw(info, start, stop, scratch))
        if info.scale is not None:
            scale_info = self._scales[info.scale]
            scale = self._read_raw(scale_info, 0, scale_info.numel).to(out.dtype)
            if scale.numel() == 1:
                out.mul_(scale)
            else:
                row_len = info.numel // info.shape[0]
                rows = torch.arange(start, stop) // row_len
                out.mul_(scale[rows])
        return out

    def read_tensor(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole tensor ``key`` in its shape, converted to ``dtype``."""
        return self.read(key, dtype=dtype).reshape(self.tensors[key].shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {len(self.tensors)} tensors)"


def fingerprint_now(path: str | Path) -> str | None:
    """The :attr:`Model.fingerprint` of the model at ``path`` now; None when it is gone or cannot be read."""
    try:
        with Model(path) as model:
            return model.fingerprint
    except (OSError, OrthoMechaError):
        return None


def expand_model_paths(paths: list[str | Path], warn: bool = True) -> list[Path]:
    """Expand folders into their models (shards grouped into one), keep files as given, in order; a file
    named twice (also through a folder, or a link) is kept once, where it first comes, with a warning (unless not
    ``warn``: a look at the files ahead of the command that expands them again, and warns)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = list(_models_in_dir(path))
            if not found:
                raise OrthoMechaError("folder holds no .safetensors files", path)
            out.extend(found)
        else:
            out.append(path)
    kept: dict[Path, Path] = {}
    for path in out:
        if path.resolve() not in kept:
            kept[path.resolve()] = path
        elif warn:
            logger.warning("%s: given more than once; taken once", path)
    return list(kept.values())


def _models_in_dir(folder: Path) -> Iterator[Path]:
    seen_stems: set[str] = set()
    for file in sorted(folder.iterdir()):
        if not file.is_file() or not file.name.lower().endswith(READ_SUFFIXES):
            continue
        match = SHARD_RE.match(file.name)
        if match is None:
            yield file
        elif match["stem"] not in seen_stems:
            seen_stems.add(match["stem"])
            index_json = folder / f"{match['stem']}.safetensors.index.json"
            yield index_json if index_json.exists() else file
