"""Benchmark: how the analysis scales with the number of models, incrementally, and against a naive pass.

Prints, each figure from one run on the same files (warm page cache; each step in its own process):
- analysis ÷ raw read of the same bytes for N = 2, 8, 32 models;
- time and peak RSS as N grows to 200 small models (read cost linear in N, products N²);
- adding 1 model to a cached analysis of 50 ÷ a fresh analysis of 51;
- the streaming pass vs a naive one (whole state dicts loaded, deltas flattened, one big Gram);
- the whole pipeline on 200 small models: analyse, optimize, merge with ortho_superpose (peak memory);
- 200 models of 1,700 small keys (SDXL's key count) through ``ortho-mecha analyse --json``: fresh, re-run from the
  cache, and 2 of them against that cache, each with its report written (the cost there is the N² × keys
  figures, not the read).

    .venv/bin/python bench/scale.py                      # everything, a few minutes
    .venv/bin/python bench/scale.py --only growth --max-models 200
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from common import generate, generate_shapes, measured, read_files, run_and_report


def naive(paths: list[Path]) -> None:
    """What a straightforward script does: load every state dict, flatten the deltas, one Gram."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(paths[0]))
    rows = []
    for p in paths[1:]:
        model = load_file(str(p))
        rows.append(torch.cat([(model[k].float() - base[k].float()).flatten() for k in base]))
        del model
    x = torch.stack(rows)
    (x.double() @ x.double().T).numpy()


def incremental(paths: list[Path]) -> None:
    """Analyse all but the last model into a fresh cache (untimed), then time adding the last one."""
    from ortho_mecha.analysis import analyse

    with tempfile.TemporaryDirectory() as cache:
        os.environ["ORTHO_MECHA_CACHE"] = cache
        analyse(paths[0], paths[1:-1])
        run_and_report("incremental", lambda: analyse(paths[0], paths[1:]))


def two_hundred(paths: list[Path]) -> dict:
    """Analyse, optimize and merge (ortho_superpose) the whole family, each stage timed."""
    import time

    from ortho_mecha.analysis import analyse, report
    from ortho_mecha.merge import merge_plan
    from ortho_mecha.optimize import plan_from_report
    from ortho_mecha.plan import plan_from_dict

    stages = {}
    started = time.perf_counter()
    rep = report(analyse(paths[0], paths[1:], use_cache=False))
    stages["analyse"] = time.perf_counter() - started
    started = time.perf_counter()
    plan = plan_from_dict(plan_from_report(rep, method="ortho_superpose"), paths[0].parent)
    stages["optimize"] = time.perf_counter() - started
    out = paths[0].parent / "merged_200.safetensors"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    merge_plan(plan, out, threads=1)
    stages["merge"] = time.perf_counter() - started
    out.unlink()
    return {"stages": stages, "enabled_rows": len(plan.enabled_rows)}


def many_keys(folder: Path, models: int, keys: int) -> list[Path]:
    """Base + ``models`` fp16 fine-tunes of ``keys`` 16×16 keys (a custom layout), reused when already on disk."""
    shapes = {f"blocks.{i // 10}.layer{i % 10}.weight": (16, 16) for i in range(keys)}
    return generate_shapes(folder, models, shapes, {"models": models, "keys": keys}, seed=7, scale=0.05,
                           delta_scale=0.01)


def cli_analyse(paths: list[Path]) -> None:
    """``ortho-mecha analyse --base BASE MODELS --json REPORT`` with the cache in the models' folder."""
    from ortho_mecha.cli import main as cli

    os.environ["ORTHO_MECHA_CACHE"] = str(paths[0].parent / "cache")
    report = paths[0].parent / "report.json"
    report.unlink(missing_ok=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        cli(["analyse", "--base", str(paths[0]), *map(str, paths[1:]), "--json", str(report)])


def run_step(step: str, paths: list[Path]) -> None:
    if step == "read":
        run_and_report(step, lambda: read_files(paths), children=True)
    elif step == "analyse":
        from ortho_mecha.analysis import analyse

        run_and_report(step, lambda: analyse(paths[0], paths[1:], use_cache=False))
    elif step == "naive":
        run_and_report(step, lambda: naive(paths))
    elif step == "incremental":
        incremental(paths)
    elif step == "two_hundred":
        run_and_report(step, lambda: two_hundred(paths))
    elif step == "cli":
        run_and_report(step, lambda: cli_analyse(paths))


def ratios(folder: Path, size_mb: float) -> None:
    print(f"analysis ÷ raw read (warm), {size_mb:g} MB fp16 models:")
    for n in (2, 8, 32):
        paths = generate(folder / f"{n}x{size_mb:g}mb", n, size_mb)
        measured(__file__, "read", *paths)
        read = measured(__file__, "read", *paths)
        ours = measured(__file__, "analyse", *paths)
        print(f"  N={n:3d}: read {read['seconds']:.2f} s, analysis {ours['seconds']:.2f} s, ratio "
              f"{ours['seconds'] / read['seconds']:.1f}, peak RSS {ours['peak_rss_gib']:.2f} GiB")


def growth(folder: Path, size_mb: float, max_models: int) -> None:
    print(f"growth with N, {size_mb:g} MB models (time, time ÷ N², peak RSS):")
    paths = generate(folder / f"{max_models}x{size_mb:g}mb", max_models, size_mb)
    for n in [n for n in (10, 25, 50, 100, 200) if n <= max_models]:
        ours = measured(__file__, "analyse", *paths[: n + 1])
        print(f"  N={n:3d}: {ours['seconds']:.2f} s, {ours['seconds'] / n**2 * 1e3:.3f} ms/N², "
              f"peak RSS {ours['peak_rss_gib']:.2f} GiB, anonymous {ours['peak_anon_gib']:.2f} GiB")


def adding_one(folder: Path, size_mb: float) -> None:
    paths = generate(folder / f"51x{size_mb:g}mb", 51, size_mb)
    fresh = measured(__file__, "analyse", *paths)
    added = measured(__file__, "incremental", *paths)
    print(f"incremental: add 1 to a cached 50 {added['seconds']:.2f} s, fresh 51 {fresh['seconds']:.2f} s -> "
          f"ratio {added['seconds'] / fresh['seconds']:.3f} (target <= 0.1)")


def versus_naive(folder: Path, size_mb: float) -> None:
    paths = generate(folder / f"8x{size_mb:g}mb", 8, size_mb)
    ours = measured(__file__, "analyse", *paths)
    theirs = measured(__file__, "naive", *paths)
    print(f"naive (whole state dicts): {theirs['seconds']:.2f} s, peak RSS {theirs['peak_rss_gib']:.2f} GiB; "
          f"streaming {ours['seconds']:.2f} s, peak RSS {ours['peak_rss_gib']:.2f} GiB "
          f"(streaming computes conflicts, signal and outliers too)")


def whole_pipeline(folder: Path, size_mb: float, models: int) -> None:
    paths = generate(folder / f"{models}x{size_mb:g}mb", models, size_mb)
    done = measured(__file__, "two_hundred", *paths)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in done["stages"].items())
    print(f"{models} models ({done['enabled_rows']} rows enabled by the optimizer): {stages}; peak RSS "
          f"{done['peak_rss_gib']:.2f} GiB, peak anonymous {done['peak_anon_gib']:.2f} GiB")


def with_many_keys(folder: Path, models: int, keys: int) -> None:
    paths = many_keys(folder / f"{models}x{keys}keys", models, keys)
    shutil.rmtree(paths[0].parent / "cache", ignore_errors=True)
    fresh = measured(__file__, "cli", *paths)
    size = (paths[0].parent / "report.json").stat().st_size
    cached = measured(__file__, "cli", *paths)
    two = measured(__file__, "cli", *paths[:3])
    cache = sum(f.stat().st_size for f in (paths[0].parent / "cache").rglob("*") if f.is_file())
    print(f"{models} models x {keys} keys, 'analyse --json' (report {size / 2**20:.0f} MiB, cache {cache / 2**20:.0f} "
          f"MiB): fresh {fresh['seconds']:.1f} s, peak RSS {fresh['peak_rss_gib']:.2f} GiB; from the cache "
          f"{cached['seconds']:.1f} s (ratio {cached['seconds'] / fresh['seconds']:.2f}), peak RSS "
          f"{cached['peak_rss_gib']:.2f} GiB; 2 of them against that cache {two['seconds']:.2f} s, peak RSS "
          f"{two['peak_rss_gib']:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ortho-mecha-bench"))
    parser.add_argument("--size-mb", type=float, default=64, help="model size for the ratio and naive runs")
    parser.add_argument("--small-mb", type=float, default=4, help="model size for the growth and incremental runs")
    parser.add_argument("--max-models", type=int, default=200)
    parser.add_argument("--keys", type=int, default=1700, help="keys per model of the many-keys run")
    parser.add_argument("--only", choices=["ratios", "growth", "incremental", "naive", "pipeline", "keys"])
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.paths)
        return
    if args.only in (None, "ratios"):
        ratios(args.dir, args.size_mb)
    if args.only in (None, "growth"):
        growth(args.dir, args.small_mb, args.max_models)
    if args.only in (None, "incremental"):
        adding_one(args.dir, args.small_mb)
    if args.only in (None, "naive"):
        versus_naive(args.dir, args.size_mb)
    if args.only in (None, "pipeline"):
        whole_pipeline(args.dir, args.small_mb, args.max_models)
    if args.only in (None, "keys"):
        with_many_keys(args.dir, args.max_models, args.keys)


if __name__ == "__main__":
    main()
