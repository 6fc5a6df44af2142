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
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ortho_mecha import arch as arch_mod
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.gram import UNIT_ROUNDOFF, cosine, delta_gram, noise_floor, selection_matrix
from ortho_mecha.io import ROUNDING, Model, expand_model_paths
from ortho_mecha.lora_rows import is_lora, refuse_lora_delta_from
from ortho_mecha.validate import Alignment

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 17
SNR_CAP = 1e4
ENERGY = 0.90
SIGNAL_COLUMNS_PER_ROW = 2  # signal Gram estimated from 2 × (short side) columns of the long side
SIGNAL_BLOCK = 1 << 20  # elements per file read at a time for the signal (whole matrix rows)
OUTLIER_KEYS_LISTED = 5

Progress = Callable[[dict], None]


@dataclass
class RowStats:
    """Figures that need the tensors of one analysed delta (not linear in it, so not derivable from H).

    Kept per key so that passes over disjoint key sets (shards of a distributed pass) combine by union.
    """

    max_abs: dict[str, float] = field(default_factory=dict)  # per key: max |δ|
    base_sq: dict[str, float] = field(default_factory=dict)  # per key: ‖W_C‖², to judge relative change
    rounding_sq: float = 0.0  # squared relative rounding step of the inputs behind this delta
    signal: dict[str, tuple[float, float]] = field(default_factory=dict)  # per signal key: (effective rank, SNR)

    @property
    def noise_sq(self) -> float:
        """Squared rounding-noise floor of the delta: a delta below it is null."""
        return self.rounding_sq * sum(self.base_sq.values())

    @property
    def signal_keys(self) -> list[str]:
        return list(self.signal)

    @property
    def effective_rank(self) -> float:
        return float(np.mean([v[0] for v in self.signal.values()])) if self.signal else 0.0

    @property
    def snr(self) -> float:
        return float(np.mean([v[1] for v in self.signal.values()])) if self.signal else 0.0

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
    """The ``k`` largest analysed keys with at least two dimensions (by element count)."""
    shapes = {c: alignment.base.tensors[alignment.maps[0].keys[c]].shape for c in alignment.keys}
    candidates = [c for c, s in shapes.items() if len(s) >= 2 and min(s[0], math.prod(s[1:])) > 1]
    return sorted(candidates, key=lambda c: (-math.prod(shapes[c]), c))[:k]


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
    rounding already, and float32 ``eigvalsh`` takes about half the time of float64 here.
    """
    gram = sampled.T @ sampled if tall else sampled @ sampled.T
    # torch's LAPACK, in the pass's single torch thread: scipy's own threaded BLAS, called from here, was
    # measured 25× slower than standalone (its threads fight torch's OpenMP runtime for the 2 cores)
    values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    return values.to(torch.float64).numpy()


def signal_figures(energies: np.ndarray) -> tuple[float, float]:
    """(effective rank, SNR) of one delta from its σ²: fewest values holding 90 % of Σσ², over n; top 10 % ÷ rest."""
    n = len(energies)
    total = float(energies.sum())
    if n == 0 or total <= 0:
        return 0.0, 0.0
    r = int(np.searchsorted(np.cumsum(energies), ENERGY * total) + 1)
    top = max(1, math.ceil(0.1 * n))
    rest = float(energies[top:].sum())
    head = float(energies[:top].sum())
    snr = SNR_CAP if rest <= head / SNR_CAP else head / rest
    return min(r, n) / n, snr


class _Reader:
    """Reads the chunks of the files a pass needs in a background thread, one key chunk ahead."""

    def __init__(self, alignment: Alignment, files: Sequence[Model], file_maps: Sequence[int], dtype: torch.dtype,
                 chunk: int, keys: Sequence[str]) -> None:
        self.alignment, self.files, self.file_maps = alignment, files, file_maps
        self.dtype, self.chunk, self.keys = dtype, chunk, keys
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.bytes_read = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ortho-mecha-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            base_key = self.alignment.maps[0].keys
            for canon in self.keys:
                numel = self.alignment.base.tensors[base_key[canon]].numel
                for start in range(0, numel, self.chunk):
                    stop = min(numel, start + self.chunk)
                    block = self._read_chunk(canon, start, stop)
                    while not self.stop.is_set():
                        try:
                            self.queue.put((canon, start, stop, *block), timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if self.stop.is_set():
                        return
            self.queue.put(None)
        except BaseException as exc:  # handed to the consumer, re-raised there
            self.error = exc
            self.queue.put(None)

    def _read_chunk(self, canon: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.alignment.base
        base_name = self.alignment.maps[0].keys[canon]
        b = base.read(base_name, start, stop, self.dtype)
        self.bytes_read += (stop - start) * base.tensors[base_name].itemsize
        x = torch.empty((len(self.files), stop - start), dtype=self.dtype)
        for row, (model, map_index) in enumerate(zip(self.files, self.file_maps, strict=True)):
            name = self.alignment.maps[map_index].keys.get(canon)
            if name is None:  # key missing or of another shape in this file: its delta counts as zero
                x[row].zero_()
                continue
            model.read_into(name, start, stop, x[row])
            self.bytes_read += (stop - start) * model.tensors[name].itemsize
            if not model.is_delta:  # a LoRA row reads its delta (the product) directly
                x[row].sub_(b)
        return b, x

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


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
) -> PassResult:
    """Stream the files once and compute what ``plan`` asks for, over ``keys`` (default: every analysed key).

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
    t = torch.from_numpy(rows_t).to(dtype)
    # rows that are plain "model − base" need no selection product: they are the first rows of X
    plain_rows = np.array_equal(rows_t, np.eye(n_rows, n_files))
    all_h = len(h_rows) == n_files
    all_stats = len(stat_rows) == n_rows
    h_key: dict[str, np.ndarray] = {}
    both = np.zeros((n_rows, n_rows))
    agree = np.zeros((n_rows, n_rows))
    stats = {r: RowStats() for r in stat_rows}
    keys = list(alignment.keys if keys is None else keys)
    key_index = {k: i for i, k in enumerate(keys)}
    total_elements = sum(_numel(alignment, c) for c in keys)
    done_elements = 0
    base_sq: dict[str, float] = {}
    threads = torch.get_num_threads()
    # one torch thread per Python thread: the reader converts, this thread multiplies and a third computes
    # the SVD signal of the largest keys; on 2 cores that beats torch's own threading, whose spinning
    # OpenMP workers slow the many small per-chunk operations (and LAPACK) down badly
    torch.set_num_threads(1)
    reader = _Reader(alignment, files, file_maps, dtype, chunk, keys)
    signal_keys = [k for k in _signal_keys(alignment, rank_samples) if k in key_index] if stat_rows else []
    signal = _SignalWork(alignment, files, file_maps, rows_t, stat_rows, dtype, signal_keys)
    signal_thread = threading.Thread(target=signal.run, name="ortho-mecha-signal", daemon=True)
    signal_thread.start()
    try:
        current, acc, peaks = None, None, None
        for canon, start, stop, b, x in reader:
            if canon != current:
                if current is not None:
                    h_key[current] = _finish_key(acc, n_files, h_rows)
                    _store_peaks(stats, stat_rows, current, peaks)
                current = canon
                acc = torch.zeros((len(h_rows), n_files), dtype=torch.float64)
                peaks = torch.zeros(len(stat_rows), dtype=dtype)
                base_sq[canon] = 0.0
            if h_rows:
                acc += ((x if all_h else x[h_rows]) @ x.T).to(torch.float64)
            base_sq[canon] += float(torch.dot(b, b))
            if stat_rows:
                d_all = x[:n_rows] if plain_rows else t @ x
                d = d_all if all_stats else d_all[stat_rows]
                sign_counts(d_all.numpy(), stat_rows, agree, both)
                if d.shape[1]:  # amax and amin apart: several times faster here than torch.aminmax
                    torch.maximum(peaks, torch.maximum(d.amax(dim=1), d.amin(dim=1).neg_()), out=peaks)
            done_elements += stop - start
            if progress is not None:
                elapsed = time.perf_counter() - started
                fraction = done_elements / max(total_elements, 1)
                progress({
                    "fraction": fraction,
                    "files": len(files) + 1,
                    "key": canon,
                    "keys_done": key_index[canon] + (stop == _numel(alignment, canon)),
                    "keys_total": len(keys),
                    "bytes": reader.bytes_read,
                    "eta_s": elapsed / fraction * (1 - fraction) if fraction > 0 else None,
                })
        if current is not None:
            h_key[current] = _finish_key(acc, n_files, h_rows)
            _store_peaks(stats, stat_rows, current, peaks)
        # symmetric completion of the conflict counts: rows computed against all, mirror them
        if stat_rows:
            mask = np.zeros(n_rows, dtype=bool)
            mask[stat_rows] = True
            both = np.where(mask[:, None], both, both.T)
            agree = np.where(mask[:, None], agree, agree.T)
            _finish_row_stats(alignment, files, file_maps, rows_t, stat_rows, stats, base_sq)
            for r, per_key in signal.finish(signal_thread).items():  # this thread helps once the stream is done
                stats[r].signal.update(per_key)
    finally:
        signal.stop.set()
        signal_thread.join()
        reader.close()
        torch.set_num_threads(threads)
    bytes_read = reader.bytes_read
    return PassResult(h_key, both, agree, stats, bytes_read, time.perf_counter() - started)


def sign_counts(d: np.ndarray, rows: Sequence[int], agree: np.ndarray, both: np.ndarray) -> None:
    """Add the sign products of the chunk ``d`` (all rows × elements) for ``rows`` against every row.

    With S = sign(d) and Z = |S|: ``both[a] += Z_a Zᵀ`` (elements where both deltas are non-zero) and
    ``agree[a] += S_a Sᵀ`` (agreeing minus disagreeing signs), so conflicts = (both − agree) / 2. Counted
    on bit-packed masks P = (d > 0), N = (d < 0): ``Z_a Zᵀ = popcount((P_a|N_a) & (P|N))`` and the
    conflicts ``popcount(P_a & N) + popcount(N_a & P)``, which is about three times faster here than the
    two float products (exact integers either way).
    """
    words = -(-d.shape[1] // 64) * 8  # bytes per row, padded to whole 64-bit words
    pos, neg = (np.zeros((d.shape[0], words), dtype=np.uint8) for _ in range(2))
    pos[:, : -(-d.shape[1] // 8)] = np.packbits(d > 0, axis=1)
    neg[:, : -(-d.shape[1] // 8)] = np.packbits(d < 0, axis=1)
    pos, neg = pos.view(np.uint64), neg.view(np.uint64)
    nonzero = pos | neg

    def count(row: np.ndarray, others: np.ndarray) -> np.ndarray:
        return np.bitwise_count(row & others).sum(axis=1, dtype=np.int64)

    n = d.shape[0]
    if len(rows) == n:  # every row: the overlaps are symmetric and the conflicts are C + Cᵀ, C_ab = |P_a ∧ N_b|
        overlap, c = np.zeros((n, n), dtype=np.int64), np.zeros((n, n), dtype=np.int64)
        for a in range(n):
            overlap[a, a:] = count(nonzero[a], nonzero[a:])
            c[a] = count(pos[a], neg)
        overlap = np.triu(overlap) + np.triu(overlap, 1).T
        both += overlap
        agree += overlap - 2 * (c + c.T)
        return
    for a in rows:
        overlap = count(nonzero[a], nonzero)
        both[a] += overlap
        agree[a] += overlap - 2 * (count(pos[a], neg) + count(neg[a], pos))


def _store_peaks(stats: dict[int, RowStats], stat_rows: list[int], key: str, peaks: torch.Tensor | None) -> None:
    if peaks is not None:
        for r, peak in zip(stat_rows, peaks.tolist(), strict=True):
            stats[r].max_abs[key] = float(peak)


def _numel(alignment: Alignment, canon: str) -> int:
    return alignment.base.tensors[alignment.maps[0].keys[canon]].numel


def _finish_key(acc: torch.Tensor | None, n_files: int, h_rows: list[int]) -> np.ndarray:
    """The key's F×F Gram with the computed rows filled in (and mirrored); other entries NaN."""
    h = np.full((n_files, n_files), np.nan)
    if acc is not None and h_rows:
        values = acc.numpy()
        h[h_rows, :] = values
        h[:, h_rows] = values.T
    return h


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
    on them beside the streaming pass and the pass's thread joins in once its stream is done."""

    def __init__(self, alignment: Alignment, files: Sequence[Model], file_maps: Sequence[int], rows_t: np.ndarray,
                 stat_rows: list[int], dtype: torch.dtype, signal_keys: list[str]) -> None:
        self.alignment, self.files, self.file_maps, self.rows_t = alignment, files, file_maps, rows_t
        self.dtype = dtype
        self.tasks: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        for canon in signal_keys:
            for r in stat_rows:
                self.tasks.put((canon, r))
        self.figures: dict[int, dict[str, tuple[float, float]]] = {r: {} for r in stat_rows}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """:meth:`drain` in a worker thread, keeping its error for :meth:`finish`."""
        try:
            self.drain()
        except BaseException as exc:  # re-raised by finish() in the pass's thread
            self.error = exc

    def finish(self, worker: threading.Thread) -> dict[int, dict[str, tuple[float, float]]]:
        """Take the tasks left, wait for ``worker``, re-raise its error; the figures per row and key."""
        self.drain()
        worker.join()
        if self.error is not None:
            raise self.error
        return self.figures

    def drain(self) -> None:
        """Compute tasks until none is left (or ``stop`` is set)."""
        while not self.stop.is_set():
            try:
                canon, r = self.tasks.get_nowait()
            except queue.Empty:
                return
            self.figures[r][canon] = signal_figures(self._energies(canon, r))

    def _energies(self, canon: str, r: int) -> np.ndarray:
        """σ² of row ``r``'s delta Σ_i t_ri (x_i − x_base) on key ``canon``, from the lines :func:`sample_lines`
        picks (SIGNAL_COLUMNS_PER_ROW × the short side) through :func:`sampled_energy`, streamed in blocks of
        whole matrix rows: only the sampled lines are kept, so memory stays at a block per file plus the
        sample, whatever the key's size. The base's block is read again for each row (a task is one row and
        key, so two threads can share them)."""
        base_name = self.alignment.maps[0].keys[canon]
        shape = self.alignment.base.tensors[base_name].shape
        rows, rest = shape[0], math.prod(shape[1:])
        tall, pick, scale = sample_lines((rows, rest), SIGNAL_COLUMNS_PER_ROW * min(rows, rest))
        terms = [(self.files[i], self.alignment.maps[self.file_maps[i]].keys.get(canon), float(self.rows_t[r, i]))
                 for i in np.nonzero(self.rows_t[r])[0]]
        kept = []
        step = max(1, SIGNAL_BLOCK // rest)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            lines = pick[(pick >= r0) & (pick < r1)] - r0 if tall and pick is not None else None
            if lines is not None and not len(lines):
                continue
            base = self.alignment.base.read(base_name, r0 * rest, r1 * rest, self.dtype).view(r1 - r0, rest)
            block = torch.zeros_like(base)
            for model, name, coefficient in terms:
                if name is None:  # a missing key is a zero delta
                    continue
                term = model.read(name, r0 * rest, r1 * rest, self.dtype).view(r1 - r0, rest)
                if not model.is_delta:  # a LoRA's values are its product, a delta already
                    term.sub_(base)
                block.add_(term, alpha=coefficient)
            if lines is not None:
                block = block[lines]
            elif pick is not None:
                block = block[:, pick]
            kept.append(block)
        sampled = torch.cat(kept) if kept else torch.zeros((0, rest), dtype=self.dtype)
        return sampled_energy(sampled * scale if scale != 1.0 else sampled, tall)


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

    @functools.cached_property
    def noise_floors(self) -> np.ndarray:
        """Per key of ``h_key``: the rounding-noise energy of deltas of the base's stored dtype
        (:func:`ortho_mecha.gram.noise_floor`), below which ``ortho_superpose`` drops a direction; 0 where
        the base's energy on the key is not known. Computed once per analysis (the Mixer asks on every rerun)."""
        from ortho_mecha.validate import key_map

        base_sq = next((st.base_sq for st in self.stats if st.base_sq), {})
        with Model(self.base) as base:
            names = key_map(base).keys
            units = [UNIT_ROUNDOFF.get(base.tensors[names[k]].dtype, 0.0) if k in names else 0.0 for k in self.h_key]
        return noise_floor(np.array([base_sq.get(k, 0.0) for k in self.h_key]), np.array(units))

    @property
    def h(self) -> np.ndarray:
        return np.sum(list(self.h_key.values()), axis=0) if self.h_key else np.zeros((len(self.files),) * 2)

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
    return extras, row_from


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
) -> Analysis:
    """Analyse ``models`` against ``base`` in one streaming pass (or none, when the cache has it all).

    With ``scheduler`` (a Dask address or ``local:N``) the pass is sharded by key over Dask workers.
    """
    from ortho_mecha import analysis_cache
    from ortho_mecha.validate import align, open_models

    if rank_samples < 0:
        raise OrthoMechaError(f"--rank-samples must be 0 or more, got {rank_samples}")
    chunk = chunk or DEFAULT_CHUNK
    if chunk < 1:
        raise OrthoMechaError(f"--chunk must be positive, got {chunk}")
    base_model, opened = open_models(base, list(models))
    extras, row_from = _resolve_delta_from(opened, dict(delta_from or {}))
    alignment = align(base_model, [*opened, *extras], arch)
    file_models = [*opened, *extras]
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
                              rank_samples=rank_samples, progress=progress)
        known.fill(result)
        store.save(alignment.keys, fps, row_sigs, known)
        seconds, bytes_read = result.seconds, result.bytes_read
    elif progress is not None:
        progress({"fraction": 1.0, "cached": True, "files": len(fps) + 1, "bytes": 0})
    return Analysis(
        base=str(base_model.path),
        models=[str(m.path) for m in opened],
        files=[str(m.path) for m in file_models],
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
    )


# -- the report -----------------------------------------------------------------------------------------------


def _round(matrix: np.ndarray, digits: int = 12) -> list:
    return np.round(np.asarray(matrix, dtype=np.float64), digits).tolist()


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
    n = len(a.models)
    rows = list(range(n))
    h = a.h  # the sum over every key's Gram, formed once for the whole report
    g = a.gram(h=h)
    cos = cosine(g)
    blocks = {}
    for name, h_block in a.h_blocks().items():
        gb = delta_gram(h_block, rows, a.delta_from)
        blocks[name] = {"cos": _round(cosine(gb)), "norms": _round(np.sqrt(np.clip(np.diag(gb), 0, None)))}
    g_key_diag = {k: np.diag(delta_gram(h, rows, a.delta_from)) for k, h in a.h_key.items()}
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
        "blocks": blocks,
        **figures,
        "stale": a.stale,
        "validation": a.validation,
        "seconds": round(a.seconds, 3),
        "bytes_read": a.bytes_read,
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
    return Analysis(**{**a.__dict__, "delta_from": list(delta_from), "stale": stale})


def summary_lines(rep: dict) -> list[str]:
    """A short human summary of a report."""
    names = [Path(m).name for m in rep["models"]]
    read = f"{rep['bytes_read'] / 2**20:.1f} MiB read in {rep['seconds']:.1f} s" if rep["bytes_read"] else "from cache"
    lines = [f"{rep['arch']} base {Path(rep['base']).name}: {len(names)} models, {rep['keys']} keys, {read}"]
    width = max(len(n) for n in names)
    grades = rep.get("quality", {}).get("grade", ["?"] * len(names))
    for i, name in enumerate(names):
        flags = []
        if rep["null"][i]:
            flags.append("null delta")
        if rep["outliers"]["keys"][i]:
            flags.append(f"outlier keys: {', '.join(rep['outliers']['keys'][i][:2])}")
        if rep.get("lineage") and rep["lineage"][i]["parent"]:
            flags.append(f"parent {Path(rep['lineage'][i]['parent']).name}")
        lines.append(f"  {name:<{width}}  norm {rep['norms'][i]:.4g}  grade {grades[i]:<2}  {'; '.join(flags)}")
    cos = np.asarray(rep["cos"])
    if len(names) > 1:
        iu = np.triu_indices(len(names), 1)
        hi, lo = int(np.argmax(cos[iu])), int(np.argmin(cos[iu]))
        a, b = iu[0][hi], iu[1][hi]
        lines.append(f"  most similar: {names[a]} ~ {names[b]} (cos {cos[a, b]:.3f})")
        a, b = iu[0][lo], iu[1][lo]
        lines.append(f"  most opposed: {names[a]} ~ {names[b]} (cos {cos[a, b]:.3f})")
    return lines


def _parse_delta_from(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        model, sep, other = item.partition("=")
        if not sep or not model or not other:
            raise OrthoMechaError(f"--delta-from expects MODEL=OTHER, got '{item}'")
        pairs[model] = other
    return pairs


def cli_analyse(args: argparse.Namespace) -> int:
    from ortho_mecha.fsutil import write_json
    from ortho_mecha.progress import TqdmProgress
    from ortho_mecha.validate import refuse_input_as_output

    delta_from = _parse_delta_from(args.delta_from)
    if args.json:
        inputs = [args.base, *expand_model_paths(args.models), *delta_from.values()]
        refuse_input_as_output(Path(args.json), [Model(p) for p in inputs])
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
        )
    rep = report(result)
    for line in summary_lines(rep):
        print(line)
    if args.json:
        write_json(args.json, rep, overwrite=True)
        print(f"report written to {args.json}")
    return 0


def run_job(params: dict, progress: Progress) -> dict:
    """Background-job entry (``ortho_mecha.jobs`` kind ``analyse``): params as :func:`analyse` takes them.

    Returns the JSON report; the analysis itself stays in the cache, so ``analyse`` with the same
    arguments afterwards returns at once with no file read.
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
    return report(result)
