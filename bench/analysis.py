"""Benchmark: the analysis pass against the physical limit (reading the files) and against sd-mecha.

Prints, from one run on the same files: analysis time ÷ time to just read them (``cat`` to /dev/null),
warm page cache and, where the page cache can be dropped (root), cold; analysis time ÷ sd-mecha's
``n_average`` merge of the same models; peak RSS and peak anonymous memory of each step (each step runs
in its own process). Models are synthetic fp16 files with SDXL-like key shapes.

    .venv/bin/python bench/analysis.py --models 8 --size-mb 1024     # the issue's 8 × 1 GB figure
    .venv/bin/python bench/analysis.py                               # a quicker 8 × 256 MB run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (shape, count) of SDXL UNet tensors, cycled until a model reaches its target size
SDXL_SHAPES: list[tuple[int, ...]] = [
    (640, 640), (640, 2048), (5120, 640), (640, 2560), (1280, 1280), (1280, 2048), (10240, 1280),
    (1280, 5120), (1280, 1280, 3, 3), (640, 640, 3, 3), (1280,), (640,), (320, 320, 3, 3), (2560, 320),
]


def layout(size_mb: int) -> dict[str, tuple[int, ...]]:
    shapes, total, i = {}, 0, 0
    while total < size_mb * 2**20 / 2:
        shape = SDXL_SHAPES[i % len(SDXL_SHAPES)]
        block = i // len(SDXL_SHAPES)
        shapes[f"model.diffusion_model.input_blocks.{block}.{i % len(SDXL_SHAPES)}.weight"] = shape
        n = 1
        for d in shape:
            n *= d
        total += n
        i += 1
    return shapes


def generate(folder: Path, models: int, size_mb: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    paths = [folder / "base.safetensors"] + [folder / f"model_{i:03d}.safetensors" for i in range(models)]
    wanted = {"models": models, "size_mb": size_mb}
    if spec.exists() and json.loads(spec.read_text()) == wanted and all(p.exists() for p in paths):
        return paths
    shapes = layout(size_mb)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file({k: v.half() for k, v in base.items()}, str(paths[0]))
    for p in paths[1:]:
        save_file({k: (v + torch.randn(v.shape, generator=g) * 0.002).half() for k, v in base.items()}, str(p))
    spec.write_text(json.dumps(wanted))
    return paths


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measured(step: str, paths: list[Path], extra: list[str] | None = None) -> dict:
    """Run one step in a child process; return its seconds, peak RSS and peak anonymous memory."""
    cmd = [sys.executable, __file__, "--step", step, *map(str, paths), *(extra or [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_sampler() -> tuple[dict, threading.Event]:
    peak = {"anon_kib": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak["anon_kib"] = max(peak["anon_kib"], int(line.split()[1]))
            stop.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return peak, stop


def run_step(step: str, paths: list[Path], args: argparse.Namespace) -> None:
    import resource

    peak, stop = _peak_sampler()
    started = time.perf_counter()
    if step == "read":
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    elif step == "analyse":
        from ortho_mecha.analysis import analyse

        analyse(paths[0], paths[1:], use_cache=False, rank_samples=args.rank_samples, chunk=args.chunk)
    elif step == "n_average":
        import sd_mecha
        import torch

        from ortho_mecha.mecha_config import model_node, register_base_config

        config = register_base_config(paths[0])
        out = paths[0].parent / "n_average.out.safetensors"
        out.unlink(missing_ok=True)
        recipe = sd_mecha.n_average(*[model_node(p, config) for p in paths[1:]])
        sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16, threads=2)
        out.unlink()
    seconds = time.perf_counter() - started
    stop.set()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if step == "read":
        rss_kib = max(rss_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"step": step, "seconds": seconds, "peak_rss_gib": rss_kib / 2**20,
                      "peak_anon_gib": peak["anon_kib"] / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ortho-mecha-bench"))
    parser.add_argument("--rank-samples", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--skip-mecha", action="store_true", help="leave out sd-mecha's n_average")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.paths, args)
        return
    paths = generate(args.dir / f"{args.models}x{args.size_mb}mb", args.models, args.size_mb)
    total_gib = sum(p.stat().st_size for p in paths) / 2**30
    extra = ["--rank-samples", str(args.rank_samples)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    print(f"{len(paths) - 1} models + base, {total_gib:.2f} GiB, SDXL-like fp16 shapes")
    measured("read", paths)  # warm the page cache
    read_warm = measured("read", paths)
    analyse_warm = measured("analyse", paths, extra)
    print(f"warm: read {read_warm['seconds']:.2f} s, analysis {analyse_warm['seconds']:.2f} s "
          f"-> ratio {analyse_warm['seconds'] / read_warm['seconds']:.2f} (target <= 8)")
    if drop_page_cache():
        read_cold = measured("read", paths)
        drop_page_cache()
        analyse_cold = measured("analyse", paths, extra)
        print(f"cold: read {read_cold['seconds']:.2f} s, analysis {analyse_cold['seconds']:.2f} s "
              f"-> ratio {analyse_cold['seconds'] / read_cold['seconds']:.2f} (target <= 2)")
    else:
        print("cold: page cache cannot be dropped here (needs root); skipped")
    print(f"analysis peak RSS {analyse_warm['peak_rss_gib']:.2f} GiB, peak anonymous "
          f"{analyse_warm['peak_anon_gib']:.2f} GiB (target < 0.5)")
    if not args.skip_mecha:
        measured("read", paths)
        mecha = measured("n_average", paths)
        print(f"sd-mecha n_average {mecha['seconds']:.2f} s (peak RSS {mecha['peak_rss_gib']:.2f} GiB) -> analysis "
              f"÷ n_average {analyse_warm['seconds'] / mecha['seconds']:.2f} (target <= 0.25)")


if __name__ == "__main__":
    main()
