"""The analysis pass sharded by key across Dask distributed workers.

Each worker opens the files itself from shared storage (the same paths as on the client), runs the
ordinary streaming pass over its share of the keys and returns the partial results: H per key, the
sign-count sums and the per-key row figures. The client unites them (:func:`analysis.combine_passes`)
into exactly the result of the local pass: per key the arithmetic is the same, chunk for chunk.

``scheduler`` is a Dask scheduler address (``tcp://host:8786``) or ``local:N`` for a LocalCluster of N
single-threaded worker processes on this machine. Dask is an optional extra:
``pip install "ortho-mecha[distributed]"``.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ortho_mecha.analysis import PassPlan, PassResult, Progress, combine_passes, run_pass
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.validate import Alignment, align

logger = logging.getLogger(__name__)

SHARDS_PER_WORKER = 4  # more shards than workers so a slow worker does not hold up the end


def shard_keys(alignment: Alignment, shards: int) -> list[list[str]]:
    """Split the analysed keys into ``shards`` groups of about equal element count (largest first)."""
    sizes = {k: alignment.base.tensors[alignment.maps[0].keys[k]].numel for k in alignment.keys}
    heap = [(0, i) for i in range(max(1, shards))]
    groups: list[list[str]] = [[] for _ in heap]
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        load, i = heapq.heappop(heap)
        groups[i].append(key)
        heapq.heappush(heap, (load + sizes[key], i))
    order = {k: n for n, k in enumerate(alignment.keys)}
    return [sorted(g, key=order.__getitem__) for g in groups if g]


def worker_pass(
    base: str, files: Sequence[str], arch: str, rows_t: np.ndarray, plan: PassPlan, keys: list[str],
    exact: bool, chunk: int, rank_samples: int,
) -> PassResult:
    """Runs on a worker: open the files, line them up as the client did, pass over ``keys``."""
    from ortho_mecha.io import Model

    alignment = align(Model(base), [Model(f) for f in files], arch)
    file_maps = list(range(1, len(files) + 1))
    return run_pass(alignment, file_maps, rows_t, plan, exact=exact, chunk=chunk, rank_samples=rank_samples,
                    keys=keys, one_thread=True)  # a worker has one core


SCHEDULER_FORMS = "local:N, tcp://HOST:PORT or HOST:PORT"


def check_scheduler(scheduler: str) -> int | None:
    """Raise unless ``scheduler`` is a scheduler address or ``local:N`` and Dask distributed is installed (said
    before any work, and whether or not the analysis is cached); the N of ``local:N``, else None."""
    if not (scheduler.startswith("local:") or "://" in scheduler or re.fullmatch(r"[\w.\-\[\]:]+:\d+", scheduler)):
        raise OrthoMechaError(f"--scheduler '{scheduler}' is not a scheduler: give {SCHEDULER_FORMS}")
    try:
        import dask.distributed  # noqa: F401 - only whether it can be
    except ImportError as exc:
        raise OrthoMechaError(
            "--scheduler needs Dask distributed, which is not installed: pip install \"ortho-mecha[distributed]\""
        ) from exc
    if not scheduler.startswith("local:"):
        return None
    try:
        workers = int(scheduler.removeprefix("local:"))
    except ValueError as exc:
        raise OrthoMechaError(f"--scheduler local:N needs a number of workers, got '{scheduler}'") from exc
    if workers < 1:
        raise OrthoMechaError(f"--scheduler local:N needs at least 1 worker, got {workers}")
    return workers


def _client(scheduler: str, stack: ExitStack):
    workers = check_scheduler(scheduler)
    from dask.distributed import Client, LocalCluster

    if workers is not None:
        cluster = stack.enter_context(
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        )
        return stack.enter_context(Client(cluster))
    try:
        return stack.enter_context(Client(scheduler, timeout="10s"))
    except OSError as exc:
        raise OrthoMechaError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc


def distributed_pass(
    scheduler: str,
    alignment: Alignment,
    rows_t: np.ndarray,
    plan: PassPlan,
    *,
    exact: bool,
    chunk: int,
    rank_samples: int,
    progress: Progress | None = None,
) -> PassResult:
    """The pass of :func:`analysis.run_pass`, sharded by key over the workers of ``scheduler``."""
    files = [str(Path(m.path).resolve()) for m in alignment.models]
    base = str(Path(alignment.base.path).resolve())
    with ExitStack() as stack:
        client = _client(scheduler, stack)
        from dask.distributed import as_completed  # installed: the client says so
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        shards = shard_keys(alignment, workers * SHARDS_PER_WORKER)
        logger.info("distributing %d keys in %d shards over %d workers", len(alignment.keys), len(shards), workers)
        futures = [
            client.submit(worker_pass, base, files, alignment.arch, rows_t, plan, shard, exact, chunk, rank_samples,
                          pure=False)
            for shard in shards
        ]
        parts = []
        for done, future in enumerate(as_completed(futures), start=1):
            parts.append(future.result())
            if progress is not None:
                progress({"fraction": done / len(futures), "shards_done": done, "shards": len(futures),
                          "files": len(files) + 1, "bytes": sum(p.bytes_read for p in parts)})
    return combine_passes(parts)
