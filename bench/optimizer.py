"""Benchmark: the optimizer on the cached figures of a 50-model family (no file read, as in the Mixer).

Builds the file Gram H of a synthetic family — fine-tunes of the base, fine-tunes of those, 0.5/0.5 merges,
near-duplicates and a few extra delta-from files — from seeded random deltas, then times auto-fill (the
baseline: parent rule and rules, no search), the optimizer and lineage on it, and prints the times and
the optimizer's ratio to auto-fill.

    .venv/bin/python bench/optimizer.py                 # 50 models
    .venv/bin/python bench/optimizer.py --models 200    # the dashboard's largest analysis
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ortho_mecha.gram import delta_gram
from ortho_mecha.lineage import lineage
from ortho_mecha.optimize import RowChoice, autofill, optimize, orthogonality

T = TypeVar("T")


def family(n_models: int, n_extras: int, dim: int, seed: int) -> np.ndarray:
    """H of n_models models then n_extras extra files: every model derives from earlier ones or the base."""
    rng = np.random.default_rng(seed)

    def direction() -> np.ndarray:
        v = rng.standard_normal(dim)
        return v / np.linalg.norm(v)

    vectors: list[np.ndarray] = [direction() for _ in range(n_extras)]  # the extras: base fine-tunes
    for i in range(n_models):
        kind = i % 5
        earlier = vectors[rng.integers(len(vectors))] if vectors else direction()
        if kind == 0 or not vectors:
            vectors.append(rng.uniform(0.5, 2.0) * direction())
        elif kind in (1, 2):
            vectors.append(earlier + rng.uniform(0.2, 0.6) * direction())
        elif kind == 3:
            other = vectors[rng.integers(len(vectors))]
            vectors.append(0.5 * earlier + 0.5 * other)
        else:
            vectors.append(earlier + 0.03 * direction())  # a near-duplicate
    x = np.stack(vectors[n_extras:] + vectors[:n_extras])  # models first, then the extras
    return x @ x.T


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--extras", type=int, default=5)
    parser.add_argument("--dim", type=int, default=4096, help="length of the synthetic deltas")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    h = family(args.models, args.extras, args.dim, seed=0)
    n = args.models
    rng = np.random.default_rng(1)
    quality = rng.uniform(0.2, 0.9, n).tolist()
    null = [False] * n

    t_fill, filled = timed(lambda: autofill(h, n, quality, null), args.repeats)
    t_opt, optimized = timed(lambda: optimize(h, n, quality, null), args.repeats)
    t_lin, _ = timed(lambda: lineage(h, n, quality), args.repeats)

    def score(choices: list[RowChoice]) -> float:
        g = delta_gram(h, list(range(n)), [c.delta_from for c in choices])
        return orthogonality(g, [i for i, c in enumerate(choices) if c.enabled])

    enabled = sum(c.enabled for c in optimized)
    print(f"{n} models + {args.extras} extra files, best of {args.repeats}")
    print(f"  auto-fill   {t_fill * 1e3:8.1f} ms   orthogonality {score(filled):.3f}")
    print(f"  optimizer   {t_opt * 1e3:8.1f} ms   orthogonality {score(optimized):.3f}   {enabled} rows enabled")
    print(f"  lineage     {t_lin * 1e3:8.1f} ms")
    print(f"  optimizer ÷ auto-fill: {t_opt / t_fill:.1f}×")


if __name__ == "__main__":
    main()
