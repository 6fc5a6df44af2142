"""Benchmark: ortho-mecha's merge methods against sd-mecha's ``n_average`` on the same inputs.

Prints, for ``ortho_project``, ``ortho_superpose`` and ``orthomerge``: merge time ÷ the time of
sd-mecha's ``n_average`` of the same models, and each merge's peak RSS (every merge runs in its own
process; the RSS of a process that has only imported torch and sd-mecha is shown for reference). Models
are synthetic fp16 files with SDXL-like key shapes (the generator of ``bench/analysis.py``); merges run
through ``sd_mecha.merge`` with the recipes ortho-mecha builds, fp32 arithmetic, fp16 output.

    .venv/bin/python bench/merge.py                          # 4 × 32 MB, about a minute
    .venv/bin/python bench/merge.py --models 8 --size-mb 512 --threads 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("ortho_project", "ortho_superpose", "orthomerge")


def _generator():
    """The analysis benchmark's model generator, loaded by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_analysis", HERE / "analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


def run_step(step: str, paths: list[Path], threads: int) -> None:
    """In the child process: one merge (or none, for the import baseline); print seconds and peak RSS."""
    import resource

    import sd_mecha
    import torch
    import tqdm

    import ortho_mecha  # noqa: F401 - registers the ortho-mecha methods with sd-mecha
    from ortho_mecha.mecha_config import model_node, register_base_config
    from ortho_mecha.plan import plan_from_dict
    from ortho_mecha.recipe import build_recipe

    config = register_base_config(paths[0])
    if step == "n_average":
        recipe = sd_mecha.n_average(*[model_node(p, config) for p in paths[1:]])
    elif step in METHODS:
        rows = [{"model": str(p)} for p in paths[1:]]
        recipe = build_recipe(plan_from_dict({"base": str(paths[0]), "method": step, "rows": rows}, paths[0].parent))
    out = paths[0].parent / f"{step}.out.safetensors"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    if step != "import":
        sd_mecha.merge(
            recipe,
            output=out,
            merge_dtype=torch.float32,
            output_dtype=torch.float16,
            threads=threads,
            tqdm=lambda **kw: tqdm.tqdm(disable=True, **kw),
        )
    seconds = time.perf_counter() - started
    out.unlink(missing_ok=True)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps({"step": step, "seconds": seconds, "peak_rss_gib": rss_gib}))


def measured(step: str, paths: list[Path], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--threads", str(threads), *map(str, paths)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4, help="fine-tuned models besides the base (4)")
    parser.add_argument("--size-mb", type=int, default=32, help="size of each fp16 model in MB (32)")
    parser.add_argument("--threads", type=int, default=2, help="sd-mecha merge threads (2)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ortho-mecha-bench"), help="where the models go")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.paths, args.threads)
        return
    paths = _generator()(args.dir / f"{args.models}x{args.size_mb}mb", args.models, args.size_mb)
    total_gib = sum(p.stat().st_size for p in paths) / 2**30
    print(f"{len(paths) - 1} models + base, {total_gib:.2f} GiB, SDXL-like fp16 shapes, {args.threads} threads")
    baseline = measured("import", paths, args.threads)
    print(f"RSS after importing torch + sd-mecha: {baseline['peak_rss_gib']:.2f} GiB")
    reference = measured("n_average", paths, args.threads)
    name, seconds, rss = "sd-mecha n_average", reference["seconds"], reference["peak_rss_gib"]
    print(f"{name:<20} {seconds:8.2f} s   1.00 x   peak RSS {rss:.2f} GiB")
    for method in METHODS:
        result = measured(method, paths, args.threads)
        ratio = result["seconds"] / reference["seconds"]
        print(f"{method:<20} {result['seconds']:8.2f} s {ratio:6.2f} x   peak RSS {result['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
