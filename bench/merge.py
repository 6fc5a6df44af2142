"""Benchmark: ortho-mecha's merge methods against sd-mecha's ``n_average`` on the same inputs.

Prints, for ``ortho_project``, ``ortho_superpose``, ``orthomerge`` and ``orthomerge`` with
``precision="float32"`` (its explicit approximation): merge time ÷ the time of
sd-mecha's ``n_average`` of the same models, and each merge's peak RSS and peak anonymous memory (every
merge runs in its own process; a process that has only imported torch and sd-mecha is shown for
reference). Models are synthetic fp16 files with SDXL-like key shapes (``bench/common.py``); fp32
arithmetic, fp16 output.

By default every merge, ``n_average`` included, runs the way ``ortho-mecha merge`` runs it:
``ortho_mecha.merge.execute`` (its streaming writer and thread settings; the input hashes are cached
before timing). ``--via sd-mecha`` calls ``sd_mecha.merge`` straight into a file instead, as a plain
sd-mecha user would. ``--repeat N`` keeps each step's fastest of N runs (the machine may be shared); the
CPU seconds of each merge (all threads) are shown beside the wall time, as other processes' load moves
them much less.

    .venv/bin/python bench/merge.py                          # 4 × 32 MB, about a minute
    .venv/bin/python bench/merge.py --size-mb 64 --repeat 3  # SDXL's largest keys (10240 × 1280) too
    .venv/bin/python bench/merge.py --models 8 --size-mb 512 --threads 4
    .venv/bin/python bench/merge.py --shapes flux --size-mb 256 --methods orthomerge   # Flux.1-shaped keys
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
from pathlib import Path

from common import generate, measured, run_and_report

METHODS = ("ortho_project", "ortho_superpose", "orthomerge", "orthomerge_float32")
VARIANTS = {"orthomerge_float32": ("orthomerge", {"precision": "float32"})}  # step: (method, options)


def run_step(step: str, paths: list[Path], threads: int | None, via: str) -> None:
    """In the child process: one merge (or none, for the import baseline); print seconds and peak memory."""
    import sd_mecha
    import torch

    import ortho_mecha  # noqa: F401 - registers the ortho-mecha methods with sd-mecha
    from ortho_mecha.hashing import sha256_file
    from ortho_mecha.mecha_config import model_node, register_base_config
    from ortho_mecha.merge import execute
    from ortho_mecha.plan import plan_from_dict
    from ortho_mecha.recipe import build_recipe

    if step == "floor":
        print(json.dumps(exact_floor(paths, threads or 1)))
        return
    config = register_base_config(paths[0])
    if step == "import":
        run_and_report(step, lambda: None)
        for path in paths:
            sha256_file(path)  # fills the hash cache, so the timed merges only look their hashes up
        return
    if step == "n_average":
        recipe = sd_mecha.n_average(*[model_node(p, config) for p in paths[1:]])
    else:
        rows = [{"model": str(p)} for p in paths[1:]]
        method, options = VARIANTS.get(step, (step, {}))
        plan = {"base": str(paths[0]), "method": method, "options": options, "rows": rows, "merge_dtype": "fp32",
                "output_dtype": "fp16"}
        recipe = build_recipe(plan_from_dict(plan, paths[0].parent))
    out = paths[0].parent / f"{step}.out.safetensors"
    out.unlink(missing_ok=True)

    def merge() -> None:
        if via == "ortho":
            execute(recipe, out, base=paths[0], merge_dtype="fp32", output_dtype="fp16", threads=threads)
        else:
            sd_mecha.merge(
                recipe,
                output=out,
                merge_dtype=torch.float32,
                output_dtype=torch.float16,
                threads=threads,
                tqdm=_silent,
            )

    cpu = {}

    def timed_merge() -> None:  # CPU seconds too: unlike wall time, barely moved by other processes' load
        before = resource.getrusage(resource.RUSAGE_SELF)
        merge()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu["seconds"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_and_report(step, timed_merge)
    print(json.dumps(json.loads(printed.getvalue().splitlines()[-1]) | {"cpu_seconds": cpu["seconds"]}))
    out.unlink(missing_ok=True)


def exact_floor(paths: list[Path], threads: int) -> dict:
    """Seconds of the two steps exact ``orthomerge`` cannot skip, on the same keys, inputs already in memory:
    the products W_i Wᵀ (float64, on the smaller side; the Procrustes input of DESIGN.md's step 1) and one
    k × k float64 eigendecomposition per row and key (``eigh`` of MᵀM, the cheapest exact polar route;
    ill-conditioned keys need an SVD, ~1.2–1.5× that). Spread over ``threads`` workers of one BLAS thread
    each, as the merge spreads its keys. Reading and converting are left out."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors import safe_open
    from threadpoolctl import threadpool_limits

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(path, "pt")) for path in paths]
        names = files[0].keys()
        keys = [key for key in names if len(files[0].get_slice(key).get_shape()) >= 2]
        inputs = []
        for key in keys:
            matrices = [f.get_tensor(key).double().flatten(1) for f in files]
            inputs.append([m.T.contiguous() for m in matrices] if matrices[0].shape[0] > matrices[0].shape[1]
                          else matrices)

    def products(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        return [model @ matrices[0].T for model in matrices[1:]]

    torch.set_num_threads(1)
    with threadpool_limits(limits=1), ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        grams = [gram for key_grams in pool.map(products, inputs) for gram in key_grams]
        middle = time.perf_counter()
        list(pool.map(lambda gram: torch.linalg.eigh(gram.T @ gram), grams))
        end = time.perf_counter()
    return {"step": "floor", "products_seconds": middle - start, "decompositions_seconds": end - middle,
            "keys": len(keys)}


def _silent(total: int, desc: str = "") -> object:
    import tqdm

    return tqdm.tqdm(total=total, desc=desc, disable=True)


def best(step: str, paths: list[Path], args: argparse.Namespace) -> dict:
    """The fastest of ``--repeat`` runs of ``step``, each in a fresh process."""
    extra = ["--via", args.via] + (["--threads", args.threads] if args.threads is not None else [])
    runs = [measured(__file__, step, *extra, *paths) for _ in range(args.repeat)]
    return min(runs, key=lambda run: run["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4, help="fine-tuned models besides the base (4)")
    parser.add_argument("--size-mb", type=int, default=32, help="size of each fp16 model in MB (32)")
    parser.add_argument("--threads", type=int, default=2, help="sd-mecha merge threads (2; 0 = the main thread)")
    parser.add_argument("--via", choices=("ortho", "sd-mecha"), default="ortho", help="merge path (see above)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the fastest counts (1)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to time")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ortho-mecha-bench"), help="where the models go")
    parser.add_argument("--shapes", choices=("sdxl", "flux"), default="sdxl",
                        help="key shapes: SDXL's (default) or Flux.1's, for extrapolating to Flux-size models")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.paths, args.threads, args.via)
        return
    folder = args.dir / (f"{args.models}x{args.size_mb}mb" + ("" if args.shapes == "sdxl" else f"-{args.shapes}"))
    paths = generate(folder, args.models, args.size_mb, family=args.shapes)
    os.environ.setdefault("ORTHO_MECHA_CACHE", str(args.dir / "cache"))  # the children's hash cache
    total_gib = sum(p.stat().st_size for p in paths) / 2**30
    print(
        f"{len(paths) - 1} models + base, {total_gib:.2f} GiB, {args.shapes.upper()}-like fp16 shapes, "
        f"{args.threads} threads, via {args.via}, best of {args.repeat}"
    )
    baseline = measured(__file__, "import", *paths)
    print(f"RSS after importing torch + sd-mecha: {baseline['peak_rss_gib']:.2f} GiB")
    reference = best("n_average", paths, args)

    def line(name: str, result: dict) -> str:
        ratio = result["seconds"] / reference["seconds"]
        cpu_ratio = result["cpu_seconds"] / reference["cpu_seconds"]
        return (
            f"{name:<20} {result['seconds']:7.2f} s {ratio:6.2f} x"
            f"   CPU {result['cpu_seconds']:6.2f} s {cpu_ratio:6.2f} x"
            f"   peak RSS {result['peak_rss_gib']:.2f} GiB   peak anon {result['peak_anon_gib']:.2f} GiB"
        )

    print(line("sd-mecha n_average", reference))
    for method in args.methods:
        print(line(method, best(method, paths, args)))
    if any(method.startswith("orthomerge") for method in args.methods):
        floor = measured(__file__, "floor", "--threads", args.threads, *paths)
        products, decompositions = floor["products_seconds"], floor["decompositions_seconds"]
        print(
            f"exact orthomerge's floor over {floor['keys']} matrix keys, {max(args.threads, 1)} threads: "
            f"products W_i Wᵀ {products:.2f} s "
            f"({products / reference['seconds']:.2f} x), + one float64 eigh per row and key {decompositions:.2f} s "
            f"= {(products + decompositions) / reference['seconds']:.2f} x n_average"
        )


if __name__ == "__main__":
    main()
