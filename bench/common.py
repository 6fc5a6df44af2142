"""Shared pieces of the benchmarks: synthetic SDXL-shaped models, child-process steps with peak memory."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# shapes of SDXL UNet tensors, cycled until a model reaches its target size
SDXL_SHAPES: list[tuple[int, ...]] = [
    (640, 640), (640, 2048), (5120, 640), (640, 2560), (1280, 1280), (1280, 2048), (10240, 1280),
    (1280, 5120), (1280, 1280, 3, 3), (640, 640, 3, 3), (1280,), (640,), (320, 320, 3, 3), (2560, 320),
]


# shapes of Flux.1 transformer tensors (attention, MLP, modulation, single-block linears), cycled likewise
FLUX_SHAPES: list[tuple[int, ...]] = [
    (3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (21504, 3072), (3072, 15360),
    (3072,), (128,),
]
SHAPES = {"sdxl": SDXL_SHAPES, "flux": FLUX_SHAPES}


def layout(size_mb: float, family: str = "sdxl") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``family`` (sdxl, flux) adding up to about ``size_mb`` of fp16; an SDXL model
    under 64 MB keeps to its smaller keys."""
    shapes, total, i = {}, 0, 0
    every = SHAPES[family]
    small = [s for s in every if len(s) == 1 or s[0] * s[1] <= 2**20] if size_mb < 64 and family == "sdxl" else every
    while total < size_mb * 2**20 / 2:
        shape = small[i % len(small)]
        shapes[f"model.diffusion_model.input_blocks.{i // len(small)}.{i % len(small)}.weight"] = shape
        n = 1
        for d in shape:
            n *= d
        total += n
        i += 1
    return shapes


def generate(folder: Path, models: int, size_mb: float, seed: int = 0, family: str = "sdxl") -> list[Path]:
    """Base + ``models`` fp16 fine-tunes (small random deltas) of ``family``'s shapes, reused when already
    on disk."""
    wanted = {"models": models, "size_mb": size_mb, "seed": seed} | ({"family": family} if family != "sdxl" else {})
    return generate_shapes(folder, models, layout(size_mb, family), wanted, seed)


def generate_shapes(folder: Path, models: int, shapes: dict[str, tuple[int, ...]], wanted: dict, seed: int = 0,
                    scale: float = 0.02, delta_scale: float = 0.002) -> list[Path]:
    """Base (N(0, ``scale``) values) + ``models`` fp16 fine-tunes (deltas N(0, ``delta_scale``)) of ``shapes``,
    reused when the folder's ``spec.json`` records ``wanted`` (what the caller's files are made from)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    paths = [folder / "base.safetensors"] + [folder / f"model_{i:03d}.safetensors" for i in range(models)]
    if spec.exists() and json.loads(spec.read_text()) == wanted and all(p.exists() for p in paths):
        return paths
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}
    save_file({k: v.half() for k, v in base.items()}, str(paths[0]))
    for p in paths[1:]:
        save_file({k: (v + torch.randn(v.shape, generator=g) * delta_scale).half() for k, v in base.items()}, str(p))
    spec.write_text(json.dumps(wanted))
    return paths


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measured(script: str, step: str, *args: object) -> dict:
    """Run ``script --step STEP ARGS`` in a child process; return what its :func:`report` printed."""
    cmd = [sys.executable, script, "--step", step, *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_and_report(step: str, work: Callable[[], object], children: bool = False) -> None:
    """Run ``work`` in this (child) process and print seconds, peak RSS and peak anonymous memory of it and
    its own children as JSON (plus whatever dict ``work`` returns)."""
    peak = {"RssAnon": 0, "VmRSS": 0}
    stop = threading.Event()

    def read() -> None:  # this process and its children (``cat``, Dask workers), sampled together
        total = dict.fromkeys(peak, 0)
        for pid in _process_tree(os.getpid()):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    name = line.split(":", 1)[0]
                    if name in total:
                        total[name] += int(line.split()[1])
        for name, value in total.items():
            peak[name] = max(peak[name], value)

    def sample() -> None:
        while not stop.is_set():
            read()
            stop.wait(0.02)

    read()  # also counts what is resident before a step too short for the sampler to see
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    read()
    # RSS sampled from /proc (every 20 ms): getrusage's ru_maxrss counts the page cache of files read under
    # some sandboxes (gVisor), which would charge the streamed models to the process
    rss = peak["VmRSS"]
    if children:
        rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    extra = result if isinstance(result, dict) else {}
    print(json.dumps({"step": step, "seconds": seconds, "peak_rss_gib": rss / 2**20,
                      "peak_anon_gib": peak["RssAnon"] / 2**20, **extra}))


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    found, i = [pid], 0
    while i < len(found):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{found[i]}/task").iterdir():
                found += [int(child) for child in (task / "children").read_text().split()]
        i += 1
    return found


def read_files(paths: list[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
