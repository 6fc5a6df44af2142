"""One merge key's independent steps, spread over the machine's cores.

sd-mecha merges keys on a few threads, each running torch single-threaded (``merge._torch_threads_per_worker``
shares the cores out among them). When one key costs far more than the others, or only the last key of a merge
is left, that key keeps one core busy while the others wait. :func:`spread` runs the steps of a key that do not
depend on each other (``orthomerge``'s rows, the column blocks of its output) on a process-wide pool of one
thread per core instead, and the merge thread waits for them. The steps are torch and BLAS work that lets go
of the GIL. Each step computes exactly what it would compute in the merge thread, so the result does not
depend on how the steps were shared out.
"""

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool)


def workers() -> int:
    """How many steps :func:`spread` runs at once: one per core while torch runs single-threaded (as in a
    multi-threaded merge), otherwise 1, as torch then spreads each step over the cores itself."""
    return (os.cpu_count() or 1) if torch.get_num_threads() == 1 else 1


def spread(step: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``[step(item) for item in items]``, the items run at once on the pool when :func:`workers` > 1."""
    count = workers()
    if count < 2 or len(items) < 2:
        return [step(item) for item in items]
    return list(_executor(count).map(step, items))


def spread_groups(step: Callable[[Sequence[Item]], Result], items: Sequence[Item]) -> list[Result]:
    """``step`` over consecutive groups of ``items``, one group per worker (see :func:`spread`), in order."""
    count = min(workers(), len(items))
    if count < 2:
        return [step(items)]
    size, extra = divmod(len(items), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return spread(step, [items[bounds[i]:bounds[i + 1]] for i in range(count)])


def _executor(count: int) -> ThreadPoolExecutor:
    """The pool, made on first use, and again in a forked process (whose copy of it has no threads)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=count, thread_name_prefix="ortho-mecha-step"))
        return _pool[1]
