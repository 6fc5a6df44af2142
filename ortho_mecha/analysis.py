"""The analysis pass: one streaming read of every file, every pairwise figure from it.

For every analysed key, each file's tensor is read chunk by chunk (``files × chunk`` elements in
memory, never a whole model), the deltas ``x_f = W_f − W_C`` against the base C are formed explicitly
and ``H += X Xᵀ`` is accumulated per key in float64 (default: float32 deltas and products per chunk;
``exact``: float64 throughout). Every delta inner product follows from H without another read
(:mod:`ortho_mecha.gram`). From the same pass, for the deltas as analysed (each row ``M_i − B_i``):
sign-conflict counts by the two-matmul identity, per-key maxima for outliers, the rounding-noise
floor, and, for the ``rank_samples`` largest matrix keys, the singular-value signal.

H is kept per key (the cache holds it; exact ``ortho_superpose`` predictions need it), per block and
in total. Computing only some rows of H (``new`` files against all) is what makes adding one model to
a cached analysis cost one row, not the whole matrix.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from ortho_mecha import arch as arch_mod
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import short_names
from ortho_mecha.gram import (
    UNIT_ROUNDOFF,
    cosine,
    delta_gram,
    delta_norms_sq,
    noise_floor,
    noise_unit,
    selection_matrix,
)
from ortho_mecha.io import DTYPES, ITEMSIZES, ROUNDING, Model, TensorInfo, expand_model_paths
from ortho_mecha.lora_rows import is_lora, refuse_lora_delta_from
from ortho_mecha.progress import counted, read_text
from ortho_mecha.validate import Alignment

try:
    from ortho_mecha import _kernels
except ImportError:  # built without a C compiler: torch and numpy do the same work, slower
    _kernels = None

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 17  # elements per chunk, at most
MIN_CHUNK = 1 << 14
# A chunk of every file stays near the size of a core's cache share: with many files, reading a 13 MB chunk
# (51 × 128K fp16) and converting it a tile at a time cost ~20 % more than 4 chunks of 3 MB.
CHUNK_BYTES = 4 << 20
T = TypeVar("T")
PARALLEL_MIN_BYTES = 1 << 30  # streams from this size on are reduced by two threads
PROGRESS_EVERY = 0.25  # seconds between progress reports of a pass
SIGN_BLOCK_WORDS = 1 << 17  # bound of the temporaries of sign counting (uint64 words)
SNR_CAP = 1e4
ENERGY = 0.90
SIGNAL_COLUMNS_PER_ROW = 2  # signal Gram estimated from 2 × (short side) columns of the long side
SIGNAL_BLOCK = 1 << 20  # elements per file read at a time for the signal (whole matrix rows)
SIGNAL_TASK_COST = 4  # a signal task's time ≈ reading and reducing its key's elements from this many files
OUTLIER_KEYS_LISTED = 5
FUSED_DTYPES = ("F32", "F16", "BF16")  # stored dtypes the kernel converts itself
NO_ROWS = np.zeros(0, dtype=np.int64)

Progress = Callable[[dict], None]


@dataclass
class RowStats:
    """Figures that need the tensors of one analysed delta (not linear in it, so not derivable from H).

    Kept per key so that passes over disjoint key sets (shards of a distributed pass) combine by union.
    """

    max_abs: dict[str, float] = field(default_factory=dict)  # per key: max |δ|
    base_sq: dict[str, float] = field(default_factory=dict)  # per key: ‖W_C‖², to judge relative change
    rounding_sq: float = 0.0  # squared relative rounding step of the inputs behind this delta
    # per signal key: (effective rank, SNR), None where the delta is zero (a LoRA that does not touch the key)
    signal: dict[str, tuple[float, float] | None] = field(default_factory=dict)

    @property
    def noise_sq(self) -> float:
        """Squared rounding-noise floor of the delta: a delta below it is null."""
        return self.rounding_sq * sum(self.base_sq.values())

    @property
    def signal_keys(self) -> list[str]:
        """The measured keys in name order (the signal threads finish them in any order)."""
        return sorted(self.signal)

    @property
    def _measured(self) -> list[tuple[float, float]]:
        """The figures of the signal keys where the delta is not zero, in key order."""
        return [figures for key in self.signal_keys if (figures := self.signal[key]) is not None]

    @property
    def effective_rank(self) -> float:
        """Mean over the measured keys where the delta is not zero; 1 (full rank: no credit for focus) when there
        is none (a delta zero on every signal key tells nothing of its focus)."""
        measured = self._measured
        return float(np.mean([rank for rank, _ in measured])) if measured else 1.0

    @property
    def snr(self) -> float:
        measured = self._measured
        return float(np.mean([snr for _, snr in measured])) if measured else 0.0

    def merge(self, other: RowStats) -> None:
        """Add the figures of a pass over other keys."""
        self.max_abs.update(other.max_abs)
        self.base_sq.update(other.base_sq)
        self.signal.update(other.signal)
        self.rounding_sq = max(self.rounding_sq, other.rounding_sq)


@dataclass
class PassResult:
    """What one streaming pass computed. ``h_key`` rows are valid for ``h_rows`` (all files when full)."""

    h_key: dict[str, np.ndarray]
    both: np.ndarray  # rows × rows: elements where both deltas are non-zero
    agree: np.ndarray  # rows × rows: Σ sign(δ_a) sign(δ_b)
    stats: dict[int, RowStats]
    bytes_read: int
    seconds: float


@dataclass
class PassPlan:
    """What a pass has to compute: H rows for some files, row figures for some analysed rows."""

    h_rows: list[int]  # file indices whose H row (against every file) is needed
    stat_rows: list[int]  # analysed-row indices whose conflicts, outliers and signal are needed

    @property
    def empty(self) -> bool:
        return not self.h_rows and not self.stat_rows


def _compute_dtype(exact: bool) -> torch.dtype:
    return torch.float64 if exact else torch.float32


def _signal_keys(alignment: Alignment, k: int) -> list[str]:
    """The ``k`` largest analysed 2-D keys (by element count), the matrices of linear layers that fine-tunes and
    LoRAs change (an SD UNet's largest keys are 3×3 convs, which a LoRA of its attention layers leaves alone);
    conv keys (flattened to out × rest) only where there are fewer than ``k`` matrices."""
    shapes = {c: alignment.base.tensors[alignment.maps[0].keys[c]].shape for c in alignment.keys}
    candidates = [c for c, s in shapes.items() if len(s) >= 2 and min(s[0], math.prod(s[1:])) > 1]
    return sorted(candidates, key=lambda c: (len(shapes[c]) > 2, -math.prod(shapes[c]), c))[:k]


def sample_lines(shape: Sequence[int], columns: int | None, seed: int = 0) -> tuple[bool, torch.Tensor | None, float]:
    """How a matrix (conv kernels flattened to out × rest) is sampled for its signal Gram.

    (tall: whether the rows are the long side, so that the Gram of the smaller side is mᵀm; the sorted
    indices of the long side's lines kept, None for all; the scale sqrt(long / kept) that makes the
    sampled Gram an unbiased estimate of the whole Gram, so of its spectrum's shape).
    """
    rows, rest = shape[0], math.prod(shape[1:])
    tall = rows > rest
    long = rows if tall else rest
    if columns is None or long <= columns:
        return tall, None, 1.0
    pick = torch.randperm(long, generator=torch.Generator().manual_seed(seed))[:columns].sort().values
    return tall, pick, math.sqrt(long / columns)


def sampled_energy(sampled: torch.Tensor, tall: bool) -> np.ndarray:
    """σ², descending, of a (sampled) matrix from the Gram of its smaller side.

    The eigenvalues are computed in the matrix's dtype: the Gram of float32 deltas carries float32
    rounding already, and float32 eigenvalues take about half the time of float64 here. Both steps use
    numpy's and scipy's OpenBLAS (a symmetric product, LAPACK's ``syevr``): 1.6× torch's MKL here, on one
    thread as the pass limits them (their own threads fight the pass's for the cores). ``syevr`` is called
    through the kernels' :func:`eigvalsh`, which releases the GIL that scipy's wrapper holds.
    """
    m = sampled.numpy()
    gram = m.T @ m if tall else m @ m.T
    if not np.isfinite(gram).all():  # NaN/Inf in the delta: LAPACK would fail; the pass names the file and key
        return np.full(len(gram), np.nan)
    if _kernels is None:
        values = scipy.linalg.eigh(gram, eigvals_only=True, driver="evr", overwrite_a=True, check_finite=False)
    else:  # the same LAPACK routine, without holding the GIL (scipy's wrapper holds it, stalling the pass)
        values = np.empty(len(gram), dtype=gram.dtype)
        _kernels.eigvalsh(np.ascontiguousarray(gram), values)
    return np.clip(values[::-1], 0.0, None).astype(np.float64)


def signal_figures(energies: np.ndarray) -> tuple[float, float] | None:
    """(effective rank, SNR) of one delta from its σ²: fewest values holding 90 % of Σσ², over n; top 10 % ÷ rest.
    None for a zero delta, which has neither."""
    n = len(energies)
    total = float(energies.sum())
    if n == 0 or total <= 0:
        return None
    r = int(np.searchsorted(np.cumsum(energies), ENERGY * total) + 1)
    top = max(1, math.ceil(0.1 * n))
    rest = float(energies[top:].sum())
    head = float(energies[:top].sum())
    snr = SNR_CAP if rest <= head / SNR_CAP else head / rest
    return min(r, n) / n, snr


class _Buffers:
    """A worker's preallocated chunk tensors (fresh multi-MB tensors per chunk cost page faults)."""

    def __init__(self, n_files: int, n_rows: int, chunk: int, dtype: torch.dtype, itemsize: int) -> None:
        """``itemsize``: the largest stored element size of the keys passed over."""
        self.scratch = torch.empty(chunk * 8, dtype=torch.uint8)  # a chunk's stored bytes, before conversion
        self.stored = torch.empty((n_files, chunk * itemsize), dtype=torch.uint8)  # every file's, converted at once
        self.base = torch.empty(chunk, dtype=dtype)
        self.deltas = torch.empty((n_files, chunk), dtype=dtype)
        words = -(-chunk // 64)
        self.pos = np.zeros((n_rows, words), dtype=np.uint64)
        self.neg = np.zeros((n_rows, words), dtype=np.uint64)
        self.gram = torch.empty((n_files, n_files), dtype=dtype)


@dataclass(frozen=True)
class _Located:
    """Where the kernel reads one key: per analysed file a descriptor and the byte offset of element 0, and the
    base's, with its stored dtype."""

    fds: np.ndarray
    offsets: np.ndarray
    base_fd: int
    base_offset: int
    base_dtype: str


@dataclass
class _KeyTotals:
    """What the workers add up for one key."""

    gram: np.ndarray  # computed H rows × files
    peaks: np.ndarray  # per stat row: max |d_r|
    base_sq: float = 0.0


class _Reducer:
    """Reduces whole chunks of every file on one thread (delta, Gram rows, sign bits and counts, peaks),
    so a chunk never leaves its core's cache, into per-key totals. A large pass runs two, each on its own
    thread and its own buffers, taking chunks from one queue; their totals add up (:meth:`add`)."""

    def __init__(self, alignment: Alignment, file_maps: Sequence[int], dtype: torch.dtype, chunk: int,
                 keys: Sequence[str], rows_t: np.ndarray, h_rows: list[int], stat_rows: list[int]) -> None:
        self.alignment, self.file_maps = alignment, file_maps
        self.files = [([alignment.base, *alignment.models])[i] for i in file_maps]
        self.h_rows, self.stat_rows = h_rows, stat_rows
        self.h_index, self.stat_index = np.array(h_rows, dtype=np.int64), np.array(stat_rows, dtype=np.int64)
        self.all_h = len(h_rows) == len(file_maps)
        self.n_rows = rows_t.shape[0] if stat_rows else 0  # rows whose sign bits are packed (none: no stats)
        # rows that are plain "model − base" need no selection product: they are the first rows of X
        plain = np.array_equal(rows_t, np.eye(rows_t.shape[0], len(file_maps)))
        self.selection = None if plain else torch.from_numpy(rows_t).to(dtype)
        self.dtype = dtype
        # the compiled kernel reduces float32 chunks of plain rows in one pass (signs: of the first rows)
        self.fused = _kernels is not None and dtype == torch.float32 and plain
        self.all_stats = len(stat_rows) == rows_t.shape[0]
        self.uniform = {c: self._uniform_dtype(c) for c in keys}
        itemsize = max((ITEMSIZES[d] for d in self.uniform.values() if d is not None), default=1)
        self.buffers = _Buffers(len(file_maps), self.n_rows, chunk, dtype, itemsize)
        self.totals: dict[str, _KeyTotals] = {}
        self.located: dict[str, _Located | None] = {}
        self.both = np.zeros((rows_t.shape[0],) * 2)
        self.agree = np.zeros((rows_t.shape[0],) * 2)
        self.bytes_read = 0

    def _uniform_dtype(self, canon: str) -> str | None:
        """The stored dtype of key ``canon`` when every file holds it, in that dtype, as plain weights (no
        fp8 scale, no LoRA product): then a chunk of all files is converted in one operation."""
        dtypes = set()
        for model, map_index in zip(self.files, self.file_maps, strict=True):
            name = self.alignment.maps[map_index].keys.get(canon)
            if name is None or model.is_delta or model.tensors[name].scale is not None:
                return None
            dtypes.add(model.tensors[name].dtype)
        return dtypes.pop() if len(dtypes) == 1 else None

    def reduce(self, canon: str, start: int, stop: int) -> None:
        """Read elements [start, stop) of key ``canon`` from every file and add the chunk's figures."""
        buffers = self.buffers
        totals = self.totals.get(canon)
        if totals is None:
            totals = self.totals[canon] = _KeyTotals(np.zeros((len(self.h_rows), len(self.files))),
                                                     np.zeros(len(self.stat_rows)))
        n = stop - start
        located = self.located.get(canon) if canon in self.located else self._locate(canon)
        if located is not None:  # the kernel reads the files itself: no Python per file and chunk
            self._read_reduce(located, canon, start, n, totals)
            return
        base = self.alignment.base
        base_name = self.alignment.maps[0].keys[canon]
        b = base.read_into(base_name, start, stop, buffers.base[:n], buffers.scratch)
        self.bytes_read += n * base.tensors[base_name].itemsize
        totals.base_sq += float(torch.dot(b, b))
        # whole-chunk operations where possible: each operation's fixed cost adds up over the chunks
        uniform = self.uniform[canon]
        if uniform is not None:
            stored = buffers.stored[:, : n * ITEMSIZES[uniform]]
            for row, (model, map_index) in enumerate(zip(self.files, self.file_maps, strict=True)):
                model.read_stored(self.alignment.maps[map_index].keys[canon], start, stop, stored[row])
            self.bytes_read += stored.numel()
            if self.fused and uniform in FUSED_DTYPES:  # the kernel forms the deltas itself, a tile at a time
                _kernels.reduce_chunk(buffers.stored.numpy(), uniform, buffers.base.numpy(), n, self.h_index,
                                      totals.gram, self.stat_index, self.agree, self.both, totals.peaks)
                return
        x = buffers.deltas[:, :n]
        if uniform is not None:
            x.copy_(stored.view(DTYPES[uniform])).sub_(b)
        else:
            for row, (model, map_index) in enumerate(zip(self.files, self.file_maps, strict=True)):
                name = self.alignment.maps[map_index].keys.get(canon)
                if name is None:  # key missing or of another shape in this file: its delta counts as zero
                    x[row].zero_()
                    continue
                model.read_into(name, start, stop, x[row], buffers.scratch)
                self.bytes_read += n * model.tensors[name].itemsize
                if not model.is_delta:  # a LoRA row reads its delta (the product) directly
                    x[row].sub_(b)
        if self.fused:  # the selection is plain: the rows are the first deltas
            _kernels.reduce_chunk(buffers.deltas.numpy(), "F32", None, n, self.h_index, totals.gram,
                                  self.stat_index, self.agree, self.both, totals.peaks)
        elif _kernels is not None and self.dtype == torch.float32:
            d = self.selection @ x
            _kernels.reduce_chunk(d.numpy(), "F32", None, n, NO_ROWS, None, self.stat_index, self.agree, self.both,
                                  totals.peaks)
            _kernels.reduce_chunk(buffers.deltas.numpy(), "F32", None, n, self.h_index, totals.gram, NO_ROWS,
                                  None, None, None)
        else:
            self._reduce_torch(x, n, totals)

    def _locate(self, canon: str) -> _Located | None:
        """Where the kernel reads key ``canon`` from, when it can (plain F32/F16/BF16 weights in every file and
        the base, the rows plain deltas), else None; remembered per key."""
        base = self.alignment.base
        base_info = base.tensors[self.alignment.maps[0].keys[canon]]
        located = None
        if (self.fused and self.uniform[canon] in FUSED_DTYPES and base_info.scale is None
                and base_info.dtype in FUSED_DTYPES):
            where = [model.location(self.alignment.maps[map_index].keys[canon])
                     for model, map_index in zip(self.files, self.file_maps, strict=True)]
            located = _Located(np.array([fd for fd, _ in where], dtype=np.int64),
                               np.array([offset for _, offset in where], dtype=np.int64),
                               *base.location(base_info.name), base_info.dtype)
        self.located[canon] = located
        return located

    def _read_reduce(self, located: _Located, canon: str, start: int, n: int, totals: _KeyTotals) -> None:
        uniform = self.uniform[canon]
        itemsize, base_itemsize = ITEMSIZES[uniform], ITEMSIZES[located.base_dtype]
        try:
            totals.base_sq += _kernels.read_reduce_chunk(
                located.fds, located.offsets + start * itemsize, located.base_fd,
                located.base_offset + start * base_itemsize, located.base_dtype, self.buffers.stored.numpy(),
                uniform, self.buffers.base.numpy(), n, self.h_index, totals.gram, self.stat_index, self.agree,
                self.both, totals.peaks)
        except OSError as exc:  # OSError(errno, message, row): the row as its filename; −1 is the base
            row = exc.filename
            model, name = ((self.alignment.base, self.alignment.maps[0].keys[canon]) if row < 0 else
                           (self.files[row], self.alignment.maps[self.file_maps[row]].keys[canon]))
            file = model.tensors[name].file
            raise OrthoMechaError(f"truncated while reading '{name}' ({exc.strerror})", file) from None
        self.bytes_read += n * (base_itemsize + len(self.files) * itemsize)

    def _reduce_torch(self, x: torch.Tensor, n: int, totals: _KeyTotals) -> None:
        """The chunk's figures from its deltas ``x`` by torch and numpy: ``exact`` (float64) passes, and every
        pass where the kernels were not built."""
        if self.n_rows:
            words = -(-n // 64)
            pos, neg = self.buffers.pos[:, :words], self.buffers.neg[:, :words]
            d = x[: self.n_rows] if self.selection is None else self.selection @ x
            pack_signs(d.numpy(), pos, neg)
            # max and min apart: several times faster here than torch.aminmax (a chunk is never empty)
            picked = (d if self.all_stats else d[self.stat_rows]).numpy()
            np.maximum(totals.peaks, np.maximum(picked.max(axis=1), -picked.min(axis=1)), out=totals.peaks)
            count_signs(pos, neg, self.stat_rows, self.agree, self.both)
        if self.h_rows:
            # torch's (MKL's) product: OpenBLAS's, as fast on one thread, is no faster on two at once here
            product = torch.mm(x if self.all_h else x[self.h_rows], x.T, out=self.buffers.gram[: len(self.h_rows)])
            totals.gram += product.numpy()

    def add(self, other: _Reducer) -> None:
        """Add another reducer's totals (over other chunks of the same keys) into this one's."""
        for key, part in other.totals.items():
            totals = self.totals.get(key)
            if totals is None:
                self.totals[key] = part
                continue
            totals.gram += part.gram
            np.maximum(totals.peaks, part.peaks, out=totals.peaks)
            totals.base_sq += part.base_sq
        self.both += other.both
        self.agree += other.agree
        self.bytes_read += other.bytes_read


class _TaskQueue(Generic[T]):
    """Tasks handed to whichever thread asks first, each once; :meth:`stop` ends the handing out."""

    def __init__(self, tasks: list[T]) -> None:
        self.tasks = tasks
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> T | None:
        with self._lock:
            if self._next >= len(self.tasks):
                return None
            self._next += 1
            return self.tasks[self._next - 1]

    def taken(self) -> int:
        """Tasks handed out so far."""
        return self._next

    def stop(self) -> None:
        with self._lock:
            self._next = len(self.tasks)


class _Worker:
    """A daemon thread running ``target`` with one torch thread (torch's thread count is per thread), its
    error kept for :meth:`join` to raise; ``on_error`` runs first (to stop the other workers)."""

    def __init__(self, name: str, target: Callable[[], None], on_error: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target, on_error), name=name, daemon=True)

    def _run(self, target: Callable[[], None], on_error: Callable[[], None]) -> None:
        torch.set_num_threads(1)
        try:
            target()
        except BaseException as exc:  # re-raised by join() in the pass's thread
            self.error = exc
            on_error()

    def start(self) -> None:
        self.thread.start()

    def wait(self, waiting: Callable[[], None] = lambda: None) -> None:
        """Wait for the thread, if it was started, calling ``waiting`` every PROGRESS_EVERY seconds."""
        if self.thread.ident is None:
            return
        while self.thread.is_alive():
            self.thread.join(PROGRESS_EVERY)
            waiting()

    def join(self, waiting: Callable[[], None] = lambda: None) -> None:
        """:meth:`wait`, then raise the thread's error."""
        self.wait(waiting)
        if self.error is not None:
            raise self.error


def _reduce_chunks(chunks: _TaskQueue[tuple[str, int, int]], reducer: _Reducer,
                   between: Callable[[], None] = lambda: None) -> None:
    """Reduce chunks until none is left (or the queue is stopped), calling ``between`` after each."""
    while (task := chunks.take()) is not None:
        reducer.reduce(*task)
        between()


def _chunk_tasks(alignment: Alignment, keys: Sequence[str], chunk: int) -> list[tuple[str, int, int]]:
    """(key, start, stop) of every chunk of a pass over ``keys``, in file order."""
    return [(c, start, min(_numel(alignment, c), start + chunk))
            for c in keys for start in range(0, _numel(alignment, c), chunk)]


def _stream_bytes(alignment: Alignment, file_maps: Sequence[int], keys: Sequence[str]) -> int:
    """Bytes a pass over ``keys`` reads from the base and the analysed files (what they store of them)."""
    streamed = 0
    for map_index in (0, *file_maps):
        model, keymap = ([alignment.base, *alignment.models])[map_index], alignment.maps[map_index]
        for canon in keys:
            name = keymap.keys.get(canon)
            if name is not None:
                streamed += model.tensors[name].numel * model.tensors[name].itemsize
    return streamed


def run_pass(
    alignment: Alignment,
    file_maps: Sequence[int],
    rows_t: np.ndarray,
    plan: PassPlan,
    *,
    exact: bool = False,
    chunk: int = DEFAULT_CHUNK,
    rank_samples: int = 5,
    keys: Sequence[str] | None = None,
    progress: Progress | None = None,
    one_thread: bool = False,
) -> PassResult:
    """Stream the files once and compute what ``plan`` asks for, over ``keys`` (default: every analysed key).

    This thread reduces chunks while a worker thread starts on the signal; a stream of at least
    PARALLEL_MIN_BYTES is reduced by a second thread too (unless ``one_thread``), which stops with the
    chunks. Then this thread joins the signal thread on the tasks left. On a shorter stream the signal
    thread, once the signal is done, reduces the chunks left beside this one (unless ``one_thread``).

    ``file_maps[f]`` is the alignment index (1-based model maps) of analysed file f; ``rows_t`` is the
    rows × files selection matrix of the analysed deltas (:func:`ortho_mecha.gram.selection_matrix`).
    Passes over disjoint key sets add up (:func:`combine_passes`) to the pass over their union.
    """
    started = time.perf_counter()
    dtype = _compute_dtype(exact)
    n_files, n_rows = len(file_maps), rows_t.shape[0]
    files = [([alignment.base, *alignment.models])[i] for i in file_maps]
    h_rows = sorted(plan.h_rows)
    stat_rows = sorted(plan.stat_rows)
    h_key: dict[str, np.ndarray] = {}
    stats = {r: RowStats() for r in stat_rows}
    keys = list(alignment.keys if keys is None else keys)
    sizes = np.cumsum([_numel(alignment, c) for c in keys])
    total_elements = int(sizes[-1]) if keys else 0
    threads = torch.get_num_threads()
    # one torch (and BLAS) thread per worker thread: on 2 cores that beats torch's own threading, whose
    # spinning OpenMP workers slow the many small per-chunk operations down badly
    torch.set_num_threads(1)
    blas_threads = threadpool_limits(limits=1)
    chunks = _TaskQueue(_chunk_tasks(alignment, keys, chunk))
    chunk_ends = np.cumsum([stop - start for _, start, stop in chunks.tasks])  # elements done with each chunk
    reducers = [_Reducer(alignment, file_maps, dtype, chunk, keys, rows_t, h_rows, stat_rows)]
    passed = set(keys)
    signal_keys = [k for k in _signal_keys(alignment, rank_samples) if k in passed] if stat_rows else []
    signal = _SignalWork(alignment, files, file_maps, rows_t, stat_rows, dtype, signal_keys, sampled=not exact)
    # progress counts work in element-reads: a chunk of n elements costs n × (files + base); a signal task,
    # about SIGNAL_TASK_COST × its key's elements (its sampled Gram and eigenvalues, measured on SDXL keys)
    files_read = n_files + 1
    signal_ends = np.cumsum([SIGNAL_TASK_COST * _numel(alignment, canon) for canon, _ in signal.tasks.tasks])
    total_work = total_elements * files_read + (int(signal_ends[-1]) if len(signal_ends) else 0)
    last_report = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_report
        now = time.perf_counter()
        if progress is None or (not force and now - last_report < PROGRESS_EVERY):
            return
        last_report = now
        taken, signal_taken = chunks.taken(), signal.tasks.taken()
        done = int(chunk_ends[taken - 1]) if taken else 0
        work = done * files_read + (int(signal_ends[signal_taken - 1]) if signal_taken else 0)
        fraction = work / max(total_work, 1)
        keys_done = int(np.searchsorted(sizes, done, side="right"))
        progress({
            "fraction": fraction,
            "files": len(files) + 1,
            "key": keys[min(keys_done, len(keys) - 1)] if keys else "",
            "keys_done": keys_done,
            "keys_total": len(keys),
            "signal_done": signal_taken,
            "signal_total": len(signal.tasks.tasks),
            "bytes": round(stream_bytes * done / max(total_elements, 1)),
            "eta_s": (now - started) / fraction * (1 - fraction) if fraction > 0 else None,
        })

    def stop() -> None:
        chunks.stop()
        signal.tasks.stop()

    def signal_then_chunks() -> None:
        """The signal, then (a short stream's second reducing thread) the chunks still left, if any."""
        signal.drain()
        if chunks.taken() < len(chunks.tasks):
            reducers.append(_Reducer(alignment, file_maps, dtype, chunk, keys, rows_t, h_rows, stat_rows))
            _reduce_chunks(chunks, reducers[-1])

    stream_bytes = _stream_bytes(alignment, file_maps, keys)
    if one_thread:
        workers = [_Worker("ortho-mecha-signal", signal.drain, stop)]
    elif stream_bytes >= PARALLEL_MIN_BYTES:
        reducers.append(_Reducer(alignment, file_maps, dtype, chunk, keys, rows_t, h_rows, stat_rows))
        workers = [_Worker("ortho-mecha-signal", signal.drain, stop),
                   _Worker("ortho-mecha-chunks", functools.partial(_reduce_chunks, chunks, reducers[1]), stop)]
    else:
        workers = [_Worker("ortho-mecha-signal", signal_then_chunks, stop)]
    reducer = reducers[0]
    try:
        for worker in workers:
            worker.start()
        _reduce_chunks(chunks, reducer, report)
        signal.drain(report)  # this thread helps with the signal too
        for worker in workers:
            worker.join(report)  # its error raised here
        for other in reducers[1:]:
            reducer.add(other)
        report(force=True)
        base_sq = {canon: totals.base_sq for canon, totals in reducer.totals.items()}
        for canon in keys:
            totals = reducer.totals.pop(canon, None)  # let go of each key's sums once its Gram is made
            h_key[canon] = _finish_key(None if totals is None else totals.gram, n_files, h_rows)
            if totals is not None:
                _store_peaks(stats, stat_rows, canon, totals.peaks)
        # symmetric completion of the conflict counts: rows computed against all, mirror them
        both, agree = reducer.both, reducer.agree
        if stat_rows:
            mask = np.zeros(n_rows, dtype=bool)
            mask[stat_rows] = True
            both = np.where(mask[:, None], both, both.T)
            agree = np.where(mask[:, None], agree, agree.T)
            _finish_row_stats(alignment, files, file_maps, rows_t, stat_rows, stats, base_sq)
            for r, per_key in signal.figures.items():
                stats[r].signal.update(per_key)
    finally:
        stop()
        for worker in workers:
            worker.wait()
        blas_threads.restore_original_limits()
        torch.set_num_threads(threads)  # after: threadpoolctl's restore also sets OpenMP's count (torch's)
    bytes_read = reducer.bytes_read
    return PassResult(h_key, both, agree, stats, bytes_read, time.perf_counter() - started)


def pack_signs(d: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> None:
    """Bit-pack (d > 0) into ``pos`` and (d < 0) into ``neg``: uint64 words, zero-padded past len(d)."""
    nbytes = -(-d.shape[-1] // 8)
    pos_bytes, neg_bytes = pos.view(np.uint8), neg.view(np.uint8)
    pos_bytes[..., nbytes:] = 0
    neg_bytes[..., nbytes:] = 0
    pos_bytes[..., :nbytes] = np.packbits(d > 0, axis=-1)
    neg_bytes[..., :nbytes] = np.packbits(d < 0, axis=-1)


def count_signs(pos: np.ndarray, neg: np.ndarray, rows: Sequence[int], agree: np.ndarray, both: np.ndarray) -> None:
    """Add the sign products of a chunk, given as :func:`pack_signs` masks (all rows), for ``rows`` against
    every row.

    With S = sign(d) and Z = |S|: ``both[a] += Z_a Zᵀ`` (elements where both deltas are non-zero) and
    ``agree[a] += S_a Sᵀ`` (agreeing minus disagreeing signs), so conflicts = (both − agree) / 2. On the
    masks P = (d > 0), N = (d < 0): ``Z_a Zᵀ = popcount((P_a|N_a) & (P|N))`` and the conflicts
    ``C_ab + C'_ab`` with C = popcount(P_a & N_b), C' = popcount(N_a & P_b) (C' = Cᵀ when every row is
    asked for). Exact integers, several times faster here than two float products; a few rows at a time
    are done in one broadcast operation.
    """
    n, words = pos.shape
    nonzero = pos | neg
    rows = np.asarray(rows, dtype=np.intp)
    symmetric = len(rows) == n

    def count(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (r, words) against (n, words) → (r, n)
        return np.bitwise_count(a[:, None, :] & b[None, :, :]).sum(axis=-1, dtype=np.int64)

    block = max(1, SIGN_BLOCK_WORDS // max(1, n * words))
    overlap = np.zeros((len(rows), n), dtype=np.int64)
    conflicts = np.empty((len(rows), n), dtype=np.int64)
    for i in range(0, len(rows), block):
        picked = rows[i: i + block]
        if symmetric:  # the overlaps' upper triangle, mirrored below
            overlap[i: i + block, i:] = count(nonzero[picked], nonzero[i:])
        else:
            overlap[i: i + block] = count(nonzero[picked], nonzero)
        conflicts[i: i + block] = count(pos[picked], neg)
        if not symmetric:
            conflicts[i: i + block] += count(neg[picked], pos)
    if symmetric:
        overlap = np.triu(overlap) + np.triu(overlap, 1).T
        conflicts += conflicts.T
    both[rows] += overlap
    agree[rows] += overlap - 2 * conflicts


def _store_peaks(stats: dict[int, RowStats], stat_rows: list[int], key: str, peaks: np.ndarray) -> None:
    for r, peak in zip(stat_rows, peaks.tolist(), strict=True):
        stats[r].max_abs[key] = float(peak)


def _numel(alignment: Alignment, canon: str) -> int:
    return alignment.base.tensors[alignment.maps[0].keys[canon]].numel


def _finish_key(acc: np.ndarray | None, n_files: int, h_rows: list[int]) -> np.ndarray:
    """The key's F×F Gram with the computed rows filled in (and mirrored); other entries NaN."""
    h = np.full((n_files, n_files), np.nan)
    if acc is not None and h_rows:
        h[h_rows, :] = acc
        h[:, h_rows] = acc.T
    return (h + h.T) / 2.0  # two computed rows meet twice, maybe an ulp apart: the cache keeps one value a pair


def _finish_row_stats(
    alignment: Alignment,
    files: Sequence[Model],
    file_maps: Sequence[int],
    rows_t: np.ndarray,
    stat_rows: list[int],
    stats: dict[int, RowStats],
    base_sq: dict[str, float],
) -> None:
    """Rounding-noise floor of the rows whose tensor figures were asked for."""
    rounding = [_file_rounding(alignment, m, mi) for m, mi in zip(files, file_maps, strict=True)]
    base_rounding = _file_rounding(alignment, alignment.base, 0)
    for r in stat_rows:
        terms = np.nonzero(rows_t[r])[0]
        stats[r].rounding_sq = sum(rounding[i] ** 2 for i in terms) + (base_rounding**2 if len(terms) == 1 else 0.0)
        stats[r].base_sq = dict(base_sq)


class _SignalWork:
    """The SVD signal figures of every (signal key, row), as tasks any thread can take: a worker thread starts
    on them beside the streaming pass; the pass's own thread joins in once the chunks are gone."""

    def __init__(self, alignment: Alignment, files: Sequence[Model], file_maps: Sequence[int], rows_t: np.ndarray,
                 stat_rows: list[int], dtype: torch.dtype, signal_keys: list[str], sampled: bool = True) -> None:
        self.alignment, self.files, self.file_maps, self.rows_t = alignment, files, file_maps, rows_t
        self.dtype = dtype
        self.sampled = sampled  # False (--exact): every line, DESIGN's SVD of the whole delta
        self.tasks = _TaskQueue([(canon, r) for canon in signal_keys for r in stat_rows])
        self.figures: dict[int, dict[str, tuple[float, float] | None]] = {r: {} for r in stat_rows}
        self._base_cache: dict[str, torch.Tensor] = {}
        self._base_lock = threading.Lock()

    def drain(self, after_each: Callable[[], None] = lambda: None) -> None:
        """Compute tasks until none is left (or the queue is stopped), calling ``after_each`` after each."""
        while (task := self.tasks.take()) is not None:
            canon, r = task
            self.figures[r][canon] = signal_figures(self._energies(canon, r))
            after_each()

    def _energies(self, canon: str, r: int) -> np.ndarray:
        """σ² of row ``r``'s delta Σ_i t_ri (x_i − x_base) on key ``canon``, from the lines :func:`sample_lines`
        picks (SIGNAL_COLUMNS_PER_ROW × the short side; every line when not ``sampled``) through
        :func:`sampled_energy`. Each file's lines are kept from a stream of blocks of whole matrix rows, so
        memory stays at a block plus the samples, whatever the key's size; the base's lines are kept once per
        key (:meth:`_base_lines`).

        The sample's Gram is an unbiased estimate of the whole Gram, but its spectrum is wider (a k × 2k sample
        of noise spreads as Marchenko–Pastur at aspect ½): on noise-like deltas the default's effective rank
        reads ~0.05–0.15 lower and its SNR higher than the whole delta's, as the README says; --exact reads
        every line."""
        base_name = self.alignment.maps[0].keys[canon]
        shape = self.alignment.base.tensors[base_name].shape
        columns = SIGNAL_COLUMNS_PER_ROW * min(shape[0], math.prod(shape[1:])) if self.sampled else None
        tall, pick, scale = sample_lines(shape, columns)
        base = self._base_lines(canon, base_name, shape, tall, pick)
        sampled = None  # the first term's lines themselves: a plain row holds one sample matrix, not two
        for i in np.nonzero(self.rows_t[r])[0]:
            name = self.alignment.maps[self.file_maps[i]].keys.get(canon)
            if name is None:  # a missing key is a zero delta
                continue
            lines = _sampled_lines(self.files[i], name, shape, tall, pick, self.dtype)
            if not self.files[i].is_delta:  # a LoRA's values are its product, a delta already
                lines.sub_(base)
            if sampled is None:
                sampled = lines if self.rows_t[r, i] == 1.0 else lines.mul_(float(self.rows_t[r, i]))
            else:
                sampled.add_(lines, alpha=float(self.rows_t[r, i]))
        if sampled is None:
            sampled = torch.zeros_like(base)
        return sampled_energy(sampled.mul_(scale) if scale != 1.0 else sampled, tall)

    def _base_lines(self, canon: str, name: str, shape: Sequence[int], tall: bool,
                    pick: torch.Tensor | None) -> torch.Tensor:
        """The base's sampled lines of key ``canon`` (its tensor ``name``), kept for the last few keys (the tasks
        come key by key)."""
        with self._base_lock:
            lines = self._base_cache.pop(canon, None)
            if lines is None:
                lines = _sampled_lines(self.alignment.base, name, shape, tall, pick, self.dtype)
            self._base_cache[canon] = lines  # most recent last
            while len(self._base_cache) > 2:
                self._base_cache.pop(next(iter(self._base_cache)))
            return lines


def _sampled_lines(model: Model, name: str, shape: Sequence[int], tall: bool, pick: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """The lines :func:`sample_lines` picked of ``model``'s tensor ``name`` (conv kernels flattened), read in
    blocks of whole matrix rows of about SIGNAL_BLOCK elements: sampled rows of a tall matrix, sampled
    columns of a wide one, all of it when nothing is sampled; gathered into one preallocated matrix."""
    rows, rest = shape[0], math.prod(shape[1:])
    if pick is None:
        return model.read(name, 0, rows * rest, dtype).view(rows, rest)
    out = torch.empty((len(pick), rest) if tall else (rows, len(pick)), dtype=dtype)
    step = max(1, SIGNAL_BLOCK // rest)
    filled = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lines = pick[(pick >= r0) & (pick < r1)] - r0 if tall else None
        if lines is not None and not len(lines):
            continue
        block = model.read(name, r0 * rest, r1 * rest, dtype).view(r1 - r0, rest)
        if lines is not None:
            out[filled: filled + len(lines)] = block[lines]
            filled += len(lines)
        else:
            out[r0:r1] = block[:, pick]
    return out


def combine_passes(parts: Sequence[PassResult]) -> PassResult:
    """The pass over the union of the parts' (disjoint) key sets: H per key united, counts summed."""
    first = parts[0]
    stats = {r: RowStats() for r in first.stats}
    for part in parts:
        for r, st in part.stats.items():
            stats[r].merge(st)
    return PassResult(
        h_key={k: v for part in parts for k, v in part.h_key.items()},
        both=np.sum([p.both for p in parts], axis=0),
        agree=np.sum([p.agree for p in parts], axis=0),
        stats=stats,
        bytes_read=sum(p.bytes_read for p in parts),
        seconds=max(p.seconds for p in parts),
    )


def _file_rounding(alignment: Alignment, model: Model, map_index: int) -> float:
    """The coarsest relative rounding step among a file's analysed tensors."""
    names = alignment.maps[map_index].keys.values()
    return max((ROUNDING.get(model.tensors[n].dtype, 0.0) for n in names), default=0.0)


# -- the analysis as a whole ------------------------------------------------------------------------------


@dataclass
class Analysis:
    """A finished analysis: H per key (and so per block and total), and the per-row tensor figures."""

    base: str
    models: list[str]
    files: list[str]  # models first, then extra delta-from files
    delta_from: list[int | None]  # per model: file index of its delta-from, None for the base
    arch: str
    keys: list[str]
    key_blocks: dict[str, str]
    h_key: dict[str, np.ndarray]
    both: np.ndarray
    agree: np.ndarray
    stats: list[RowStats]
    validation: dict
    exact: bool
    rank_samples: int
    stale: list[bool] = field(default_factory=list)  # per row: tensor figures are for another delta-from
    seconds: float = 0.0
    bytes_read: int = 0
    numels: dict[str, int] = field(default_factory=dict)
    cached_files: int = 0  # files whose Gram rows came from the cache (the pass read only the others)
    cached_rows: int = 0  # models whose signal, conflict and outlier figures came from the cache
    fingerprints: dict[str, str] = field(default_factory=dict)  # base and every file: their fingerprint when read

    @functools.cached_property
    def _base_tensors(self) -> list[TensorInfo | None]:
        """Per key of ``h_key``: the base's stored tensor (dtype, shape), None where it lacks the key; its
        header read once for the per-key figures below."""
        from ortho_mecha.validate import key_map

        with Model(self.base) as base:
            names = key_map(base).keys
            return [base.tensors[names[k]] if k in names else None for k in self.h_key]

    @property
    def base_norm(self) -> float | None:
        """‖C‖ over the analysed keys (None where the pass recorded no base energy)."""
        base_sq = next((st.base_sq for st in self.stats if st.base_sq), {})
        total = sum(base_sq.get(k, 0.0) for k in self.h_key)
        return math.sqrt(total) if total > 0 else None

    @functools.cached_property
    def noise_floors(self) -> np.ndarray:
        """Per key of ``h_key``: the rounding-noise energy of deltas of the base's stored dtype, or of the files'
        where coarser (:func:`ortho_mecha.gram.noise_floor`, :func:`~ortho_mecha.gram.noise_unit`, as the recipe
        passes it), below which ``ortho_superpose`` drops a direction; 0 where the base's energy on the key is
        not known. Computed once per analysis (the Mixer asks on every rerun)."""
        from ortho_mecha.lora_rows import is_lora_file

        base_sq = next((st.base_sq for st in self.stats if st.base_sq), {})
        rows_unit = noise_unit(self.base, [f for f in self.files if not is_lora_file(f)])
        units = [0.0 if t is None else max(UNIT_ROUNDOFF.get(t.dtype, 0.0), rows_unit) for t in self._base_tensors]
        return noise_floor(np.array([base_sq.get(k, 0.0) for k in self.h_key]), np.array(units))

    @functools.cached_property
    def rotation_shares(self) -> np.ndarray:
        """Per key of ``h_key``: the share of a delta ``orthomerge``'s rotation carries on that key's shape
        (:func:`ortho_mecha.metrics.rotation_share`), for its survival estimate."""
        from ortho_mecha.metrics import rotation_share

        return np.array([0.0 if t is None else rotation_share(t.shape) for t in self._base_tensors])

    @property
    def h(self) -> np.ndarray:
        """The file Gram over all keys: Σ_k H_k, added in place (a stack of 1,700 keys' 200×200 Grams is 0.5 GB)."""
        total = np.zeros((len(self.files),) * 2)
        for h_key in self.h_key.values():
            total += h_key
        return total

    def h_blocks(self) -> dict[str, np.ndarray]:
        blocks: dict[str, np.ndarray] = {}
        for key, value in self.h_key.items():
            block = self.key_blocks[key]
            blocks[block] = blocks[block] + value if block in blocks else value.copy()
        return dict(sorted(blocks.items(), key=lambda kv: arch_mod.block_sort_key(kv[0])))

    def gram(self, delta_from: Sequence[int | None] | None = None, h: np.ndarray | None = None) -> np.ndarray:
        """The N×N delta Gram of the models for any delta-froms, from H alone (no file read)."""
        delta_from = self.delta_from if delta_from is None else delta_from
        return delta_gram(self.h if h is None else h, list(range(len(self.models))), list(delta_from))


def row_selection(n_files: int, n_models: int, delta_from: Sequence[int | None]) -> np.ndarray:
    return selection_matrix(n_files, list(range(n_models)), list(delta_from))


def max_outlier(stats: RowStats, key_sq: dict[str, float], numels: dict[str, int]) -> tuple[float, list[str]]:
    """The row's outlier score and its outlier keys.

    Score: ``3 · max_k max|δ_k| / (RMS(δ_k) · sqrt(2 ln n_k))`` over keys k of n_k elements (Gaussian noise
    of any size scores about 3). Outlier keys: those whose relative change ‖δ_k‖/‖W_k‖ is more than 10× the
    row's median relative change (norm scales and matrices differ in size, so raw norms would mislead).
    """
    best, relative = 0.0, {}
    for key, sq in key_sq.items():
        n = numels[key]
        if n < 2 or sq <= 0:
            continue
        rms = math.sqrt(sq / n)
        best = max(best, 3.0 * stats.max_abs.get(key, 0.0) / (rms * math.sqrt(2.0 * math.log(n))))
        base_sq = stats.base_sq.get(key, 0.0)
        if base_sq > 0:
            relative[key] = math.sqrt(sq / base_sq)
    if not relative:
        return best, []
    typical = float(np.median(list(relative.values())))
    far = sorted((k for k, v in relative.items() if v > 10 * typical), key=lambda k: -relative[k])
    return best, far[:OUTLIER_KEYS_LISTED]


# -- running an analysis, with the cache --------------------------------------------------------------------


def _resolve_delta_from(models: list[Model], delta_from: dict[str, str]) -> tuple[list[Model], list[int | None]]:
    """Extra delta-from files (not among the models) and each model's delta-from file index."""
    by_path = {m.path.resolve(): i for i, m in enumerate(models)}
    extras: list[Model] = []
    row_from: list[int | None] = [None] * len(models)
    for model_arg, other_arg in delta_from.items():
        model_index = by_path.get(Path(model_arg).resolve())
        if model_index is None:
            raise OrthoMechaError("--delta-from names a model that is not among the analysed models", model_arg)
        other_path = Path(other_arg).resolve()
        if other_path == models[model_index].path.resolve():
            raise OrthoMechaError("a model cannot be its own delta-from", model_arg)
        existing = next((j for j, e in enumerate(extras) if e.path.resolve() == other_path), None)
        if other_path in by_path:
            other = models[by_path[other_path]]
        else:
            other = extras[existing] if existing is not None else Model(other_arg)
        refuse_lora_delta_from(model_arg, other_arg, is_lora(models[model_index].tensors), is_lora(other.tensors))
        if other_path in by_path:
            row_from[model_index] = by_path[other_path]
            continue
        if existing is None:
            extras.append(other)
            existing = len(extras) - 1
        row_from[model_index] = len(models) + existing
    for i, j in enumerate(row_from):
        if j is not None and j < i and row_from[j] == i:  # allowed (two opposite deltas), rarely meant
            logger.warning("%s and %s are each other's delta-from: their deltas are exact opposites",
                           models[j].path, models[i].path)
    return extras, row_from


def _refused_alone(base: Model, files: Sequence[Model], arch: str | None) -> list[str]:
    """The error of each of ``files`` that the alignment refuses against ``base`` on its own (headers only)."""
    from ortho_mecha.validate import align

    refused = []
    for file in files:
        try:
            align(base, [file], arch)
        except OrthoMechaError as error:
            refused.append(str(error))
    return refused


def default_chunk(base: Model, files: Sequence[Model]) -> int:
    """Elements per chunk: DEFAULT_CHUNK, or less (a power of two, at least MIN_CHUNK) where a chunk of the
    base and every file would pass CHUNK_BYTES (each file at its mean stored bytes per element)."""
    per_element = sum(
        sum(t.numel * t.itemsize for t in m.tensors.values()) / max(1, sum(t.numel for t in m.tensors.values()))
        for m in (base, *files))
    fit = int(CHUNK_BYTES / max(per_element, 1.0))
    return max(MIN_CHUNK, min(DEFAULT_CHUNK, 1 << (max(fit, 1).bit_length() - 1)))


def analyse(
    base: str | Path,
    models: Sequence[str | Path],
    delta_from: dict[str, str] | None = None,
    *,
    arch: str | None = None,
    exact: bool = False,
    rank_samples: int = 5,
    chunk: int | None = None,
    use_cache: bool = True,
    scheduler: str | None = None,
    progress: Progress | None = None,
    one_thread: bool = False,
) -> Analysis:
    """Analyse ``models`` against ``base`` in one streaming pass (or none, when the cache has it all).

    With ``scheduler`` (a Dask address or ``local:N``) the pass is sharded by key over Dask workers. A large
    local pass over 1 GiB or more is reduced by two threads unless ``one_thread``.
    """
    from ortho_mecha import analysis_cache
    from ortho_mecha.validate import align, open_models

    if rank_samples < 0:
        raise OrthoMechaError(f"--rank-samples must be 0 or more, got {rank_samples}")
    if chunk is not None and chunk < 1:
        raise OrthoMechaError(f"--chunk must be positive, got {chunk}")
    base_model, opened, problems = open_models(base, list(models), strict=False)
    extras, row_from = _resolve_delta_from(opened, dict(delta_from or {}))
    try:
        alignment = align(base_model, [*opened, *extras], arch)
    except OrthoMechaError as error:
        if not problems and len(opened) + len(extras) == 1:
            raise
        problems += _refused_alone(base_model, [*opened, *extras], arch) or [str(error)]
        problems = list(dict.fromkeys(problems))  # a problem of the base is every file's: said once
    if problems:  # every file that cannot be used, in one message (not one run per file)
        raise OrthoMechaError("; ".join(problems) if len(problems) == 1 else
                              f"{len(problems)} files cannot be analysed: " + "; ".join(problems))
    file_models = [*opened, *extras]
    chunk = default_chunk(base_model, file_models) if chunk is None else chunk
    file_maps = list(range(1, len(file_models) + 1))
    rows_t = row_selection(len(file_models), len(opened), row_from)
    store = analysis_cache.Store.open(base_model, exact, rank_samples, enabled=use_cache)
    fps = [m.fingerprint for m in file_models]
    row_sigs = [(fps[i], None if b is None else fps[b]) for i, b in enumerate(row_from)]
    known = store.lookup(alignment.keys, fps, row_sigs)
    plan = PassPlan(h_rows=known.missing_files, stat_rows=known.missing_rows)
    seconds, bytes_read = 0.0, 0
    if not plan.empty:
        logger.info("pass: %d H rows, %d row figures", len(plan.h_rows), len(plan.stat_rows))
        if scheduler:
            from ortho_mecha.distributed import distributed_pass

            result = distributed_pass(scheduler, alignment, rows_t, plan, exact=exact, chunk=chunk,
                                      rank_samples=rank_samples, progress=progress)
        else:
            result = run_pass(alignment, file_maps, rows_t, plan, exact=exact, chunk=chunk,
                              rank_samples=rank_samples, progress=progress, one_thread=one_thread)
        known.fill(result)
        seconds, bytes_read = result.seconds, result.bytes_read
        del result  # its per-key Grams are in ``known`` now (0.5 GB at 200 files and 1,700 keys)
        _refuse_nonfinite(known.h_key, file_models)  # before the cache keeps it
        store.save(alignment.keys, fps, row_sigs, known)
    elif progress is not None:
        progress({"fraction": 1.0, "cached": True, "files": len(fps) + 1, "bytes": 0})
    return Analysis(
        base=os.path.abspath(base_model.path),  # absolute: a plan made from the report may live elsewhere
        models=[os.path.abspath(m.path) for m in opened],
        files=[os.path.abspath(m.path) for m in file_models],
        delta_from=row_from,
        arch=alignment.arch,
        keys=list(alignment.keys),
        key_blocks={k: arch_mod.block_of(k) for k in alignment.keys},
        h_key=known.h_key,
        both=known.both,
        agree=known.agree,
        stats=known.stats,
        validation=alignment.report(),
        exact=exact,
        rank_samples=rank_samples,
        stale=[False] * len(opened),
        seconds=seconds,
        bytes_read=bytes_read,
        numels={k: _numel(alignment, k) for k in alignment.keys},
        cached_files=len(fps) - len(plan.h_rows),
        cached_rows=len(row_sigs) - len(plan.stat_rows),
        fingerprints={os.path.abspath(m.path): fp
                      for m, fp in zip([base_model, *file_models], [base_model.fingerprint, *fps], strict=True)},
    )


def _refuse_nonfinite(h_key: dict[str, np.ndarray], files: Sequence[Model]) -> None:
    """Raise naming the first model file whose delta holds NaN/Inf values, and its keys (a file's diagonal entry of
    a key's Gram is then not finite): the figures of every pair with it would be NaN."""
    bad: dict[int, list[str]] = {}
    for key, gram in h_key.items():
        for i in np.flatnonzero(~np.isfinite(np.diag(gram))):
            bad.setdefault(int(i), []).append(key)
    if bad:
        i, keys = min(bad.items())
        shown = ", ".join(f"'{k}'" for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        raise OrthoMechaError(f"holds NaN/Inf values in {shown}; fix or leave out this file ('ortho-mecha validate' "
                              "checks every file)", files[i].path)


# -- the report -----------------------------------------------------------------------------------------------


OPPOSED_SHOWN = 0.05  # the summary calls a pair "most opposed" below this cos (near 0 it is just unrelated)


POWERS_OF_TEN = 10.0 ** np.arange(23)  # exact float64 values (10**23 is not)


def _round(matrix: np.ndarray, digits: int = 12) -> list:
    """``matrix`` as nested lists of floats kept to ``digits`` significant digits: relative, so a Gram of small
    deltas (entries of 1e-12) keeps its precision, where rounding to decimal places left it one digit or none.

    Vectorised (a 200-model report rounds millions of entries): v is scaled by an exact power of ten 10**e
    that puts its ``digits``-th digit at the units, rounded to an integer and divided back, which gives the
    float nearest that decimal, as ``float(f"{v:.12g}")`` does. Values whose scale is no exact float64 (below
    ~1e-11 for 12 digits), and those within a thousandth of a unit of halfway, take the string route; NaN,
    ±Inf and 0 stay as they are.
    """
    values = np.asarray(matrix, dtype=np.float64)
    top = len(POWERS_OF_TEN) - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # the string route mends what overflows
        magnitude = np.floor(np.log10(np.abs(values)))
        scaled = np.isfinite(magnitude)  # not 0, NaN or ±Inf
        exponent = np.where(scaled, digits - 1 - magnitude, 0.0).astype(np.int64)
        power = POWERS_OF_TEN[np.clip(np.abs(exponent), 0, top)]
        shifted = np.where(exponent >= 0, values * power, values / power)
        out = np.where(exponent >= 0, np.round(shifted) / power, np.round(shifted) * power)
        # the product's own rounding may move a value lying (nearly) halfway between two decimals to the other side
        halfway = np.abs(np.abs(shifted - np.trunc(shifted)) - 0.5) < 1e-3
    rest = np.flatnonzero(scaled & ((np.abs(exponent) > top) | halfway))
    out.flat[rest] = [float(f"{x:.{digits}g}") for x in values.flat[rest]]
    return out.tolist()


def conflict_ratio(both: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """conflicts / both, with conflicts = (both − Σ sign·sign) / 2; 0 on the diagonal and where nothing overlaps."""
    conflicts = (both - agree) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(both > 0, conflicts / np.where(both > 0, both, 1.0), 0.0)
    np.fill_diagonal(ratio, 0.0)
    return ratio


def row_figures(a: Analysis, g: np.ndarray, g_key_diag: dict[str, np.ndarray]) -> dict:
    """Per-row tensor figures (null flags, outlier scores and keys, signal), given the rows' delta Gram ``g``."""
    null, max_out, out_keys = [], [], []
    for r, st in enumerate(a.stats):
        null.append(bool(g[r, r] <= st.noise_sq))
        score, keys = max_outlier(st, {k: float(v[r]) for k, v in g_key_diag.items()}, a.numels)
        max_out.append(score)
        out_keys.append(keys)
    return {
        "null": null,
        "outliers": {"max_outlier": max_out, "keys": out_keys},
        "signal": {
            "effective_rank": [st.effective_rank for st in a.stats],
            "snr": [st.snr for st in a.stats],
            "keys": a.stats[0].signal_keys if a.stats else [],
        },
    }


def report(a: Analysis) -> dict:
    """The JSON report (DESIGN.md §4, §6b): per-model fields are lists in ``models`` order, matrices N×N."""
    from ortho_mecha.lineage import change_from_base

    n = len(a.models)
    rows = list(range(n))
    h = a.h  # the sum over every key's Gram, formed once for the whole report
    g = a.gram(h=h)
    cos = cosine(g)
    blocks = {}
    for name, h_block in a.h_blocks().items():
        gb = delta_gram(h_block, rows, a.delta_from)
        blocks[name] = {"cos": _round(cosine(gb)), "norms": _round(np.sqrt(np.clip(np.diag(gb), 0, None)))}
    g_key_diag = {k: delta_norms_sq(h, rows, a.delta_from) for k, h in a.h_key.items()}
    figures = row_figures(a, g, g_key_diag)
    out = {
        "version": __import__("ortho_mecha").__version__,
        "base": a.base,
        "arch": a.arch,
        "models": a.models,
        "files": a.files,
        "delta_from": [None if b is None else a.files[b] for b in a.delta_from],
        "lora": [a.validation["models"][i].get("lora") is not None for i in rows],  # kohya LoRA rows
        "mode": "exact" if a.exact else "default",
        "rank_samples": a.rank_samples,
        "keys": len(a.keys),
        "h": _round(h),
        "gram": _round(g),
        "cos": _round(cos),
        "new_info": _round(1.0 - cos**2),
        "conflict_ratio": _round(conflict_ratio(a.both, a.agree)),
        "norms": _round(np.sqrt(np.clip(np.diag(g), 0, None))),
        "base_norm": a.base_norm,
        # ‖M − C‖ / ‖C‖ per model: above lineage.OTHER_LINEAGE_CHANGE, not a fine-tune of the base
        "change": [None if c is None else round(c, 6) for c in change_from_base(h, n, a.base_norm)],
        "blocks": blocks,
        **figures,
        "stale": a.stale,
        "validation": a.validation,
        "seconds": round(a.seconds, 3),
        "bytes_read": a.bytes_read,
        "cached_files": a.cached_files,
        "cached_rows": a.cached_rows,
    }
    _add_proposals(out, h, g)
    return out


def _add_proposals(out: dict, h: np.ndarray, g: np.ndarray) -> None:
    """Quality, lineage and the model map (issue 5), all from the figures already in the report."""
    from ortho_mecha import lineage, metrics

    n = len(out["models"])
    survival = metrics.survival_plain(g, include=[not null for null in out["null"]])
    scores, grades = metrics.quality(
        out["signal"]["effective_rank"], out["signal"]["snr"], survival, out["outliers"]["max_outlier"], out["null"]
    )
    out["survival"] = _round(survival)
    out["quality"] = {"score": _round(scores), "grade": list(grades)}
    found = lineage.lineage(h, n, np.asarray(scores))
    files = out["files"]
    out["lineage"] = [
        {
            "parent": None if item["parent"] is None else files[item["parent"]],
            "mix": None if item["mix"] is None else {files[j]: round(float(w), 6) for j, w in item["mix"].items()},
            "confidence": round(float(item["confidence"]), 6),
            "duplicate_of": None if item.get("duplicate_of") is None else files[item["duplicate_of"]],
        }
        for item in found
    ]
    coords = lineage.model_map(h)
    out["map"] = [{"x": float(x), "y": float(y)} for x, y in coords[:n]]


def with_delta_from(a: Analysis, delta_from: Sequence[int | None]) -> Analysis:
    """The same analysis with other delta-froms: Gram figures recomputed from H with no file read; rows
    whose delta-from changed keep their old tensor figures, marked stale until a re-pass refreshes them."""
    if len(delta_from) != len(a.models):
        raise ValueError(f"{len(delta_from)} delta-froms for {len(a.models)} models")
    stale = [old != new or s for old, new, s in zip(a.delta_from, delta_from, a.stale, strict=True)]
    return replace(a, delta_from=list(delta_from), stale=stale)  # its fields only, not the cached figures


def summary_lines(rep: dict) -> list[str]:
    """A short human summary of a report."""
    from ortho_mecha.lineage import other_lineage, other_lineage_note

    files = [*rep["models"], *(f for f in rep.get("files") or () if f not in rep["models"])]
    shown = dict(zip(files, short_names(files, keep_suffix=True), strict=True))  # a folder where names collide
    names = [shown[m] for m in rep["models"]]
    read = read_text(rep)
    lines = [f"{rep['arch']} base {Path(rep['base']).name}: {counted(len(names), 'model')}, "
             f"{counted(rep['keys'], 'key')}, {read}"]
    width = max(len(n) for n in names)
    grades = rep.get("quality", {}).get("grade", ["?"] * len(names))
    other = other_lineage(rep)
    for i, name in enumerate(names):
        flags = []
        if rep["null"][i]:
            flags.append("null delta")
        if i in other:
            flags.append(other_lineage_note(other[i]))
        if rep["outliers"]["keys"][i]:
            flags.append(f"outlier keys: {', '.join(rep['outliers']['keys'][i][:2])}")
        lineage = (rep.get("lineage") or [{}] * len(names))[i]
        if lineage.get("duplicate_of"):
            flags.append(f"duplicate of {shown.get(lineage['duplicate_of'], Path(lineage['duplicate_of']).name)}")
        if lineage.get("parent"):
            flags.append(f"parent {shown.get(lineage['parent'], Path(lineage['parent']).name)}")
        if lineage.get("mix"):
            mix = sorted(lineage["mix"].items(), key=lambda item: -item[1])
            flags.append("merge of " + " + ".join(f"{weight:.2f} {shown.get(source, Path(source).name)}"
                                                   for source, weight in mix))
        if rep["delta_from"][i]:
            flags.append(f"delta from {shown.get(rep['delta_from'][i], Path(rep['delta_from'][i]).name)}")
        lines.append(f"  {name:<{width}}  norm {rep['norms'][i]:.4g}  grade {grades[i]:<2}  {'; '.join(flags)}")
    cos = np.asarray(rep["cos"])
    real = [i for i in range(len(names)) if not rep["null"][i]]  # a null delta has no direction to compare
    if len(real) > 1:
        pairs = list(itertools.combinations(real, 2))
        a, b = max(pairs, key=lambda pair: cos[pair])
        lines.append(f"  most similar: {names[a]} ~ {names[b]} (cos {cos[a, b]:.3f})")
        a, b = min(pairs, key=lambda pair: cos[pair])
        if len(pairs) > 1:  # with one pair, that pair is all there is to say
            label = "most opposed" if cos[a, b] < -OPPOSED_SHOWN else "least similar"
            lines.append(f"  {label}: {names[a]} ~ {names[b]} (cos {cos[a, b]:.3f})")
    return lines


def _parse_delta_from(items: list[str]) -> dict[str, str]:
    """``--delta-from MODEL=OTHER`` items as {MODEL: OTHER}; one OTHER per model (however its path is spelt)."""
    pairs: dict[str, str] = {}
    given: dict[str, str] = {}  # real path of each MODEL → the item that named it
    for item in items:
        model, sep, other = item.partition("=")
        if not sep or not model or not other:
            raise OrthoMechaError(f"--delta-from expects MODEL=OTHER, got '{item}'")
        earlier = given.setdefault(os.path.realpath(model), item)
        if earlier != item and os.path.realpath(earlier.partition("=")[2]) != os.path.realpath(other):
            raise OrthoMechaError(f"--delta-from gives {model} two delta-froms ('{earlier}' and '{item}'): "
                                  "one per model")
        pairs[model] = other
    return pairs


def cli_analyse(args: argparse.Namespace) -> int:
    from ortho_mecha.fsutil import write_json
    from ortho_mecha.progress import TqdmProgress
    from ortho_mecha.validate import check_report_output

    if args.rank_samples < 1:  # 0 (the library's "no signal") would grade every model on made-up signal figures
        raise OrthoMechaError(f"--rank-samples must be 1 or more (the largest keys whose SVD gives the signal "
                              f"figures), got {args.rank_samples}")
    delta_from = _parse_delta_from(args.delta_from)
    if args.scheduler:  # said now, whether or not the analysis is cached
        from ortho_mecha.distributed import check_scheduler

        check_scheduler(args.scheduler)
    if args.json:  # said now, not after the pass
        inputs = [args.base, *expand_model_paths(args.models, warn=False), *delta_from.values()]
        check_report_output(Path(args.json), inputs, args.overwrite)  # the paths: headers are read once, below
    with TqdmProgress("analysing") as bar:
        result = analyse(
            args.base,
            args.models,
            delta_from,
            arch=args.arch,
            exact=args.exact,
            rank_samples=args.rank_samples,
            chunk=args.chunk,
            use_cache=not args.no_cache,
            scheduler=args.scheduler,
            progress=bar.update,
            one_thread=args.one_thread,
        )
    rep = report(result)
    for check in rep["validation"]["models"]:
        if check.get("family"):
            logger.warning("%s: %s", check["path"], check["family"])
        if check.get("shape_mismatch"):  # its figures leave those keys out: said, not only in the report
            logger.warning("%s: %s with a shape unlike the base's left out of its figures (merge refuses it), e.g. %s",
                           check["path"], counted(len(check["shape_mismatch"]), "key"), check["shape_mismatch"][0])
    for line in summary_lines(rep):
        print(line)
    if args.json:
        write_json(args.json, rep, overwrite=args.overwrite)
        print(f"report written to {args.json}")
    return 0


def run_job(params: dict, progress: Progress) -> dict:
    """Background-job entry (``ortho_mecha.jobs`` kind ``analyse``): params as :func:`analyse` takes them.

    Returns the JSON report, with the ``fingerprints`` of the files it was made from (a page that shows the
    report later checks the files against them); the analysis itself stays in the cache, so ``analyse`` with
    the same arguments afterwards returns at once with no file read.
    """
    result = analyse(
        params["base"],
        params["models"],
        params.get("delta_from") or {},
        arch=params.get("arch"),
        exact=bool(params.get("exact", False)),
        rank_samples=int(params.get("rank_samples", 5)),
        progress=progress,
    )
    return report(result) | {"fingerprints": result.fingerprints}
