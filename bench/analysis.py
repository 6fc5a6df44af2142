"""Benchmark: the analysis pass against the physical limit (reading the files) and against sd-mecha.

Prints, from one run on the same files: analysis time ÷ time to just read them (``cat`` to /dev/null),
warm page cache and, where the page cache can be dropped (root), cold; analysis time ÷ sd-mecha's
``n_average`` merge of the same models; peak RSS and peak anonymous memory of each step (each step runs
in its own process), and the same warm run with ``--one-thread``. Models are synthetic fp16 files with
SDXL-like key shapes.

    .venv/bin/python bench/analysis.py --models 8 --size-mb 1024     # the issue's 8 × 1 GB figure
    .venv/bin/python bench/analysis.py                               # a quicker 8 × 256 MB run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import drop_page_cache, generate, measured, read_files, run_and_report


def run_step(step: str, paths: list[Path], rank_samples: int, chunk: int | None) -> None:
    if step == "read":
        run_and_report(step, lambda: read_files(paths), children=True)
    elif step in ("analyse", "analyse_one_thread"):
        from ortho_mecha.analysis import analyse

        run_and_report(step, lambda: analyse(paths[0], paths[1:], use_cache=False, rank_samples=rank_samples,
                                             chunk=chunk, one_thread=step == "analyse_one_thread"))
    elif step == "n_average":
        run_and_report(step, lambda: n_average(paths))


def n_average(paths: list[Path]) -> None:
    import sd_mecha
    import torch

    from ortho_mecha.mecha_config import model_node, register_base_config

    config = register_base_config(paths[0])
    out = paths[0].parent / "n_average.out.safetensors"
    out.unlink(missing_ok=True)
    recipe = sd_mecha.n_average(*[model_node(p, config) for p in paths[1:]])
    sd_mecha.merge(recipe, output=out, merge_dtype=torch.float32, output_dtype=torch.float16, threads=2)
    out.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size-mb", type=float, default=256)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ortho-mecha-bench"))
    parser.add_argument("--rank-samples", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--skip-mecha", action="store_true", help="leave out sd-mecha's n_average")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.paths, args.rank_samples, args.chunk)
        return
    paths = generate(args.dir / f"{args.models}x{args.size_mb:g}mb", args.models, args.size_mb)
    total_gib = sum(p.stat().st_size for p in paths) / 2**30
    extra = ["--rank-samples", args.rank_samples] + (["--chunk", args.chunk] if args.chunk else [])
    print(f"{len(paths) - 1} models + base, {total_gib:.2f} GiB, SDXL-like fp16 shapes")
    measured(__file__, "read", *paths)  # warm the page cache
    read_warm = measured(__file__, "read", *paths)
    analyse_warm = measured(__file__, "analyse", *paths, *extra)
    print(f"warm: read {read_warm['seconds']:.2f} s, analysis {analyse_warm['seconds']:.2f} s "
          f"-> ratio {analyse_warm['seconds'] / read_warm['seconds']:.2f} (target <= 8)")
    if drop_page_cache():
        read_cold = measured(__file__, "read", *paths)
        drop_page_cache()
        analyse_cold = measured(__file__, "analyse", *paths, *extra)
        print(f"cold: read {read_cold['seconds']:.2f} s, analysis {analyse_cold['seconds']:.2f} s "
              f"-> ratio {analyse_cold['seconds'] / read_cold['seconds']:.2f} (target <= 2)")
    else:
        print("cold: page cache cannot be dropped here (needs root); skipped")
    print(f"analysis peak RSS {analyse_warm['peak_rss_gib']:.2f} GiB, peak anonymous "
          f"{analyse_warm['peak_anon_gib']:.2f} GiB (target < 0.5)")
    single = measured(__file__, "analyse_one_thread", *paths, *extra)
    print(f"--one-thread: warm analysis {single['seconds']:.2f} s -> ratio "
          f"{single['seconds'] / read_warm['seconds']:.2f}, peak RSS {single['peak_rss_gib']:.2f} GiB, "
          f"anonymous {single['peak_anon_gib']:.2f} GiB")
    if not args.skip_mecha:
        measured(__file__, "read", *paths)
        mecha = measured(__file__, "n_average", *paths)
        print(f"sd-mecha n_average {mecha['seconds']:.2f} s (peak RSS {mecha['peak_rss_gib']:.2f} GiB) -> analysis "
              f"÷ n_average {analyse_warm['seconds'] / mecha['seconds']:.2f} (target <= 0.25)")


if __name__ == "__main__":
    main()
