"""One merge key's independent steps, spread over the cores other keys leave idle.

sd-mecha merges keys on a few threads, each running torch single-threaded (``merge._torch_threads_per_worker``
shares the cores out among them). When one key costs far more than the others, or only the last key of a merge
is left, that key keeps one core busy while the others wait. :func:`spread` runs the steps of a key that do not
depend on each other (``orthomerge``'s rows, the column blocks of its output) on a process-wide pool, as many
at once as there are cores not taken by the other keys at work (:func:`key_at_work`), and the merge thread waits
for them; with every core taken they run in the merge thread as before. The steps are torch and BLAS work that
lets go of the GIL. Each step computes exactly what it would compute in the merge thread, so the result does not
depend on how the steps were shared out.
"""

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")

_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool)
_at_work = 0  # keys inside key_at_work, in every merge thread


def match_threads() -> None:
    """Give this thread's BLAS and LAPACK (torch's MKL) and OpenMP the thread count torch is set to.

    ``torch.set_num_threads`` sets them for the thread that calls it only (MKL's ``_local`` count, OpenMP's
    per-thread ICV); in any other thread, sd-mecha's merge threads and this module's pool included, MKL ran at
    its own default, every core, and fewer when the machine was busy (its dynamic mode). A product's bits hang on
    how many threads share it, so the same merge gave other bits from run to run under load (1 ulp on a conv
    key, found by the test that merges a plan three ways). Each merge method calls this on entry, and each step
    on the pool before it runs."""
    torch.set_num_threads(torch.get_num_threads())


@contextmanager
def key_at_work() -> Iterator[None]:
    """Count this key among those at work while the block runs (:func:`workers` leaves them their cores)."""
    global _at_work
    with _lock:
        _at_work += 1
    try:
        yield
    finally:
        with _lock:
            _at_work -= 1


def workers() -> int:
    """How many steps :func:`spread` runs at once: while torch runs single-threaded (as in a multi-threaded merge),
    one per core the other keys at work leave (at least 1); otherwise 1, as torch spreads each step itself."""
    if torch.get_num_threads() != 1:
        return 1
    return max(1, (os.cpu_count() or 1) - max(_at_work - 1, 0))


def spread(step: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``[step(item) for item in items]``, in :func:`workers` consecutive groups at once on the pool."""
    return [result for group in spread_groups(lambda group: [step(item) for item in group], items) for result in group]


def spread_groups(step: Callable[[Sequence[Item]], Result], items: Sequence[Item]) -> list[Result]:
    """``step`` over :func:`workers` consecutive groups of ``items`` (fewer if there are fewer items), in order: at
    once on the pool, or in this thread for a single group."""
    count = min(workers(), len(items))
    if count < 2:
        return [step(items)]
    size, extra = divmod(len(items), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return list(_executor().map(_matched(step), [items[bounds[i]:bounds[i + 1]] for i in range(count)]))


def _matched(step: Callable[[Sequence[Item]], Result]) -> Callable[[Sequence[Item]], Result]:
    """``step`` run after :func:`match_threads` in the pool's thread."""

    def run(group: Sequence[Item]) -> Result:
        match_threads()
        return step(group)

    return run


def _executor() -> ThreadPoolExecutor:
    """The pool of one thread per core, made on first use, and again in a forked process (whose copy of it has no
    threads)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ortho-mecha-step")
            _pool = (os.getpid(), pool)
        return _pool[1]
