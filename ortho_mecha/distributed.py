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

import asyncio
import dataclasses
import heapq
import importlib.metadata
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ortho_mecha.analysis import PassPlan, PassResult, Progress, combine_passes, run_pass
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.validate import Alignment, align

logger = logging.getLogger(__name__)

SHARDS_PER_WORKER = 4  # more shards than workers so a slow worker does not hold up the end
CONNECT_SECONDS = 10.0  # to reach the scheduler and hear it answer as one
WORKERLESS_SECONDS = 30.0  # how long a cluster may have no worker (before the pass, or after losing them all)
POLL_SECONDS = 1.0
PACKAGE = "ortho-mecha"
LOCAL_PER_CORE = 4  # local:N takes at most this many worker processes per core (local:200 is a typo, not a plan)
SHARED_FILES = "every worker must see the model files at the same absolute paths as this machine (shared storage)"


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
    exact: bool, chunk: int, rank_samples: int, digests: Sequence[str],
) -> PassResult:
    """Runs on a worker: open the files, check that they are the client's (``digests``: the
    :func:`~ortho_mecha.io.sampled_digest` of the base and of each file), line them up as the client did, pass
    over ``keys``. An error names the worker."""
    from ortho_mecha.io import Model, sampled_digest

    try:
        models = []
        for path, digest in zip([base, *files], digests, strict=True):
            if not Path(path).exists():
                raise OrthoMechaError(f"not found on this worker: {SHARED_FILES}", path)
            model = Model(path)
            if sampled_digest(model.files) != digest:
                raise OrthoMechaError(f"this worker reads another file than the client's at that path: {SHARED_FILES}",
                                      path)
            models.append(model)
        alignment = align(models[0], models[1:], arch)
        return run_pass(alignment, list(range(1, len(files) + 1)), rows_t, plan, exact=exact, chunk=chunk,
                        rank_samples=rank_samples, keys=keys, one_thread=True)  # a worker has one core
    except OrthoMechaError as exc:
        raise OrthoMechaError(f"on Dask worker {_worker_address()}: {exc}") from None


def _worker_address() -> str:
    from dask.distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # called outside a worker (a test runs the worker's part in its own process)
        return "(none: run in this process)"


SCHEDULER_FORMS = "local:N, tcp://HOST:PORT or HOST:PORT"


def check_scheduler(scheduler: str) -> int | None:
    """Raise unless ``scheduler`` is a scheduler address or ``local:N`` and Dask distributed is installed (said
    before any work, and whether or not the analysis is cached); the N of ``local:N``, else None."""
    if not (scheduler.startswith("local:") or re.fullmatch(r"(tcp://)?(\[[0-9A-Fa-f:.]+\]|[\w.\-]+):\d+", scheduler)):
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
    cores = os.cpu_count() or 1
    if not 1 <= workers <= LOCAL_PER_CORE * cores:
        raise OrthoMechaError(f"--scheduler local:N starts N single-threaded worker processes on this machine, from 1 "
                              f"to {LOCAL_PER_CORE * cores} here ({cores} cores); got {workers}")
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
        # Client's own timeout bounds the connection but not the scheduler's answer, which a listener of another
        # kind never gives
        answers(scheduler if "://" in scheduler else f"tcp://{scheduler}")
        client = stack.enter_context(Client(scheduler, timeout=f"{CONNECT_SECONDS:.0f}s"))
    except TimeoutError as exc:
        raise OrthoMechaError(
            f"cannot reach the Dask scheduler at {scheduler}: no Dask answer within {CONNECT_SECONDS:.0f} s "
            "(is a Dask scheduler listening there?)"
        ) from exc
    except OSError as exc:
        raise OrthoMechaError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        client.wait_for_workers(1, timeout=WORKERLESS_SECONDS)
    except TimeoutError as exc:
        raise OrthoMechaError(
            f"the Dask scheduler at {scheduler} has no workers (waited {WORKERLESS_SECONDS:.0f} s): start some with "
            f"'dask worker {scheduler}'; {SHARED_FILES}"
        ) from exc
    _check_workers(client, scheduler)
    return client


def _check_workers(client: Any, scheduler: str) -> None:
    """Raise unless every worker runs this ortho-mecha version (a worker without it could not even read the pass's
    task, and only its own log would say so while the client waited)."""
    try:
        theirs = client.run(importlib.metadata.version, PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise OrthoMechaError(f"a worker of the Dask scheduler at {scheduler} has no {PACKAGE}: install it there "
                              f"(pip install \"ortho-mecha[distributed]\"), the version this machine has") from exc
    ours = importlib.metadata.version(PACKAGE)
    other = {worker: version for worker, version in theirs.items() if version != ours}
    if other:
        worker, version = next(iter(other.items()))
        raise OrthoMechaError(f"Dask worker {worker} runs ortho-mecha {version}, this machine {ours}: install the "
                              "same version on every worker (a pass's figures depend on it)")


def answers(address: str) -> None:
    """Connect to the Dask ``address`` and wait for its handshake, within CONNECT_SECONDS: TimeoutError, or OSError
    when it cannot be reached. In a thread of its own, as the calling one may be running an event loop already."""
    from distributed.comm import connect

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=CONNECT_SECONDS), CONNECT_SECONDS)
        await comm.close()

    with ThreadPoolExecutor(1) as probe:
        probe.submit(asyncio.run, handshake()).result()


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
    """The pass of :func:`analysis.run_pass`, sharded by key over the workers of ``scheduler``; its ``seconds``
    are the wall time from the first shard sent to the last one back."""
    from ortho_mecha.io import sampled_digest

    files = [str(Path(m.path).resolve()) for m in alignment.models]
    base = str(Path(alignment.base.path).resolve())
    digests = [sampled_digest(m.files) for m in (alignment.base, *alignment.models)]
    with ExitStack() as stack:
        client = _client(scheduler, stack)
        from dask.distributed import wait  # installed: the client says so

        workers = len(client.nthreads())
        shards = shard_keys(alignment, workers * SHARDS_PER_WORKER)
        logger.info("distributing %d keys in %d shards over %d workers", len(alignment.keys), len(shards), workers)
        start = time.perf_counter()
        pending = {
            client.submit(worker_pass, base, files, alignment.arch, rows_t, plan, shard, exact, chunk, rank_samples,
                          digests, pure=False)
            for shard in shards
        }
        parts: list[PassResult] = []
        workerless_since = None
        while pending:
            try:
                done, pending = wait(pending, timeout=POLL_SECONDS, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished: is anyone still at work?
                if client.nthreads():
                    workerless_since = None
                elif workerless_since is None:
                    workerless_since = time.monotonic()
                elif time.monotonic() - workerless_since > WORKERLESS_SECONDS:
                    raise OrthoMechaError(
                        f"the Dask scheduler at {scheduler} lost all its workers and none came back in "
                        f"{WORKERLESS_SECONDS:.0f} s: {len(pending)} of {len(shards)} shards were not done"
                    ) from None
                continue
            parts.extend(future.result() for future in done)
            if progress is not None:
                progress({"fraction": len(parts) / len(shards), "shards_done": len(parts), "shards": len(shards),
                          "files": len(files) + 1, "bytes": sum(p.bytes_read for p in parts)})
        seconds = time.perf_counter() - start
    return dataclasses.replace(combine_passes(parts), seconds=seconds)
