"""A dry-run forecast for a plan: peak RAM, output size, free disk and merge time, before any merge.

Everything comes from the safetensors headers (shapes and dtypes; no tensor is read) and from a few
short measurements of this machine: reading speed of the inputs, float64 element throughput, matrix
multiply speed and a symmetric eigendecomposition. The time is an estimate (within a small factor);
the output size is exact.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from ortho_mecha.io import Model
from ortho_mecha.merge import output_bytes
from ortho_mecha.plan import Plan
from ortho_mecha.validate import key_map

DTYPE_BYTES = {"fp8_e4m3fn": 1, "fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
PROCESS_BASELINE = 700 * 2**20  # torch + sd-mecha + Python, measured RSS of an idle merge process
ORTHO_METHODS = {"ortho_project", "ortho_superpose"}


@dataclass(frozen=True)
class Speeds:
    """This machine's measured rates."""

    read_bytes_s: float
    elements_s: float  # float64 element operations per second (an axpy)
    flops_s: float  # float64 matrix-multiply flops per second
    eigh_n3_s: float  # n³ units per second of a symmetric eigendecomposition


@dataclass(frozen=True)
class Forecast:
    output_bytes: int
    inputs_bytes: int
    peak_ram_bytes: int
    seconds: float
    free_disk_bytes: int | None
    fits_disk: bool | None
    largest_key: str

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        disk = (
            f", {_size(self.free_disk_bytes)} free there ({'enough' if self.fits_disk else 'NOT enough'})"
            if self.free_disk_bytes is not None
            else ""
        )
        return [
            f"output: {_size(self.output_bytes)}{disk}",
            f"inputs: {_size(self.inputs_bytes)} read once",
            f"peak RAM: about {_size(self.peak_ram_bytes)}: {_size(self.peak_ram_bytes - PROCESS_BASELINE)} for "
            f"the merge's tensors (largest key {self.largest_key}) on top of ~{_size(PROCESS_BASELINE)} for Python, "
            "torch and sd-mecha",
            f"time: {_duration(self.seconds)} on this machine for the merge itself (estimate; "
            "starting up, hashing new inputs and measuring survival come on top)",
        ]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    """An estimate in words: "under a second" ("about 0 s" read as a broken estimate), else "about 12 s"."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def _timed(fn: object, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


@cache
def machine_speeds(sample: Path | None = None) -> Speeds:
    """Measure this machine once per process (about a quarter of a second)."""
    a = torch.randn(1 << 22, dtype=torch.float64)
    b = torch.randn(1 << 22, dtype=torch.float64)
    elements = a.numel() / _timed(lambda: a.add_(b, alpha=0.5))
    m = torch.randn(384, 384, dtype=torch.float64)
    flops = 2 * 384**3 / _timed(lambda: m @ m)
    sym = m @ m.T
    eigh = 256**3 / _timed(lambda: torch.linalg.eigh(sym[:256, :256]))
    read = 1.5e9
    if sample is not None and sample.is_file():
        size = min(sample.stat().st_size, 64 * 2**20)
        fd = os.open(sample, os.O_RDONLY)
        try:
            read = size / _timed(lambda: os.pread(fd, size, 0), repeat=1)
        finally:
            os.close(fd)
    return Speeds(read, elements, flops, eigh)


def _key_seconds(shape: tuple[int, ...], n_rows: int, method: str, speeds: Speeds) -> float:
    numel = math.prod(shape)
    if method in ORTHO_METHODS:
        # stack the rows in float64, their Gram (n² · numel), the combination (n · numel)
        return (3 * n_rows * numel) / speeds.elements_s + (n_rows**2 * numel * 2) / speeds.flops_s
    if method == "orthomerge" and len(shape) >= 2:
        k, m = sorted((shape[0], numel // shape[0]))
        per_row = 2 * k * k * m / speeds.flops_s + 3 * k**3 / speeds.eigh_n3_s + 4 * k**3 / speeds.flops_s
        return n_rows * per_row + 2 * k * k * m / speeds.flops_s + 4 * n_rows * numel / speeds.elements_s
    return 3 * n_rows * numel / speeds.elements_s


def forecast(plan: Plan, out: str | Path | None = None, threads: int = 1) -> Forecast:
    """Forecast the merge of ``plan`` (written to ``out``'s folder when given) from headers and speeds."""
    paths = plan.input_files()  # a component taken from a model is one more input
    base = Model(plan.base)
    shapes = {canon: base.tensors[name].shape for canon, name in key_map(base).keys.items()}
    out_bytes = output_bytes(plan)
    inputs_bytes = sum(Model(p).nbytes for p in paths)
    n_rows = sum(r.repeat if plan.method == "orthomerge" else 1 for r in plan.rows if r.enabled)
    n_inputs = len(paths)
    merge_bytes = DTYPE_BYTES[plan.merge_dtype]
    largest = max(shapes, key=lambda k: math.prod(shapes[k])) if shapes else ""
    largest_numel = math.prod(shapes[largest]) if largest else 0
    # per key in flight: every input in the merge dtype, each row's delta, float64 work on the stack
    per_key = largest_numel * (n_inputs * merge_bytes + n_rows * (merge_bytes + 8) + 3 * 8)
    if plan.method == "orthomerge" and largest and len(shapes[largest]) >= 2:
        k = min(shapes[largest][0], largest_numel // shapes[largest][0])
        per_key += n_rows * k * k * 8 * 3
    peak = PROCESS_BASELINE + max(1, threads) * per_key
    speeds = machine_speeds(plan.base)
    compute = sum(_key_seconds(s, n_rows, plan.method, speeds) for s in shapes.values()) / max(1, min(threads, 2))
    seconds = inputs_bytes / speeds.read_bytes_s + compute + out_bytes / speeds.read_bytes_s
    free, fits = None, None
    if out is not None:
        folder = Path(out).parent
        if folder.is_dir():
            free = shutil.disk_usage(folder).free
            fits = free > out_bytes
    return Forecast(out_bytes, inputs_bytes, int(peak), seconds, free, fits, largest)
