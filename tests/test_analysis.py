"""The streaming analysis pass against brute-force float64 computations on flattened deltas."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import diskcache
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ortho_mecha import analysis as A
from ortho_mecha.analysis_cache import Store
from ortho_mecha.gram import cosine, delta_gram, delta_norms_sq
from ortho_mecha.progress import read_text
from tests.modelgen import flat_delta, stored, write_family_files

MEMBERS = ["base", "anime", "photo", "anime_v2", "anime_photo_merge", "unrelated", "anime_opposite"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(cache))
    return cache


def brute(paths: dict[str, Path], names: list[str], base_keys: list[str]) -> np.ndarray:
    x = torch.stack([flat_delta(paths[n], paths["base"], base_keys) for n in names])
    return (x @ x.T).numpy()


def canonical_keys(path: Path) -> list[str]:
    return list(stored(path))


@pytest.mark.parametrize(
    ("layout", "dtype", "base_scale", "exact", "tol"),
    [
        ("flux", "fp16", 1.0, False, 1e-5),
        ("flux", "fp16", 1.0, True, 1e-9),
        ("sdxl", "bf16", 1.0, False, 1e-5),
        ("custom", "fp8", 1.0, False, 1e-5),
        # fp32 weights ~10⁶ times larger than the deltas: a Gram of raw weights would lose the deltas
        ("custom", "fp32", 1e6, False, 1e-5),
        ("custom", "fp32", 1e6, True, 1e-9),
    ],
)
def test_cosines_match_brute_force(tmp_path: Path, layout: str, dtype: str, base_scale: float, exact: bool,
                                   tol: float) -> None:
    paths = write_family_files(tmp_path / "m", layout, dtype, base_scale=base_scale, members=MEMBERS)
    names = MEMBERS[1:]
    result = A.analyse(paths["base"], [paths[n] for n in names], exact=exact, chunk=4096, use_cache=False)
    keys = result.keys
    base_keys = [k for k in canonical_keys(paths["base"]) if _canon(k) in keys]
    expected = brute(paths, names, base_keys)
    g = result.gram()
    assert np.allclose(np.diag(g), np.diag(expected), rtol=tol * 10, atol=0)
    assert np.abs(cosine(g) - cosine(expected)).max() < tol


def _canon(key: str) -> str:
    from ortho_mecha.validate import DIFFUSION_PREFIX, canonical_key

    return canonical_key(key.removeprefix(DIFFUSION_PREFIX))


def test_planted_relations_show_in_the_report(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "flux", "fp16", members=MEMBERS)
    names = MEMBERS[1:]
    rep = A.report(A.analyse(paths["base"], [paths[n] for n in names]))
    idx = {n: i for i, n in enumerate(names)}
    cos, conflict = np.array(rep["cos"]), np.array(rep["conflict_ratio"])
    assert cos[idx["anime"], idx["anime_opposite"]] < -0.999
    assert conflict[idx["anime"], idx["anime_opposite"]] > 0.99
    assert abs(cos[idx["anime"], idx["photo"]]) < 0.1
    assert abs(cos[idx["anime"], idx["unrelated"]]) < 0.1
    assert 0.4 < conflict[idx["anime"], idx["photo"]] < 0.6  # independent signs disagree half the time
    rank, snr = rep["signal"]["effective_rank"], rep["signal"]["snr"]
    assert rank[idx["anime"]] < 0.2 < 0.5 < rank[idx["unrelated"]]
    assert snr[idx["anime"]] > 100 > 1 > snr[idx["unrelated"]]
    assert set(rep) >= {"models", "delta_from", "gram", "cos", "new_info", "conflict_ratio", "norms", "blocks",
                        "signal", "outliers", "validation", "arch", "quality", "lineage", "map"}
    assert rep["arch"] == "flux1"
    assert "double_blocks.0" in rep["blocks"] and "single_blocks.1" in rep["blocks"]
    block_cos = np.array(rep["blocks"]["double_blocks.0"]["cos"])
    assert block_cos.shape == (len(names), len(names))


def test_conflict_counts_match_brute_force(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "bf16", members=MEMBERS)
    names = MEMBERS[1:]
    result = A.analyse(paths["base"], [paths[n] for n in names], chunk=1000, use_cache=False)
    base_keys = list(stored(paths["base"]))
    x = torch.stack([flat_delta(paths[n], paths["base"], base_keys) for n in names])
    s = torch.sign(x)
    both = (s.abs() @ s.abs().T).numpy()
    conflicts = ((s[:, None, :] * s[None, :, :]) < 0).sum(-1).numpy()
    assert np.array_equal(result.both, both)
    assert np.array_equal((result.both - result.agree) / 2, conflicts)


def _slowed(real: Callable, seconds: float, threads: set[str]) -> Callable:
    """``real``, sleeping first and noting the calling thread's name: every thread then gets some tasks."""
    def call(*args: object) -> object:
        threads.add(threading.current_thread().name)
        time.sleep(seconds)
        return real(*args)
    return call


@pytest.mark.parametrize("delta_from", [False, True])
def test_second_thread_gives_the_one_thread_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   delta_from: bool) -> None:
    """A large stream is reduced by two threads (here forced on small files): chunks and signal tasks split
    between them, the report is the one-thread one."""
    paths = write_family_files(tmp_path / "m", "flux", "bf16", members=MEMBERS)
    names = MEMBERS[1:]
    froms = {paths["anime_v2"]: paths["anime"]} if delta_from else None
    reducing: set[str] = set()
    signalling: set[str] = set()

    def run(min_bytes: int, one_thread: bool = False) -> dict:
        monkeypatch.setattr(A, "PARALLEL_MIN_BYTES", min_bytes)
        progress: list[dict] = []
        result = A.analyse(paths["base"], [paths[n] for n in names], delta_from=froms, chunk=512, use_cache=False,
                           progress=progress.append, one_thread=one_thread)
        assert progress and progress[-1]["fraction"] == 1.0
        return A.report(result)

    alone = run(0, one_thread=True)
    monkeypatch.setattr(A._Reducer, "reduce", _slowed(A._Reducer.reduce, 0.001, reducing))
    monkeypatch.setattr(A._SignalWork, "_energies", _slowed(A._SignalWork._energies, 0.1, signalling))
    shared = run(0)
    assert reducing == {threading.main_thread().name, "ortho-mecha-chunks"}
    assert len(signalling) >= 2
    for field in ("conflict_ratio", "outliers"):
        assert shared[field] == alone[field], field
    for figure in ("effective_rank", "snr"):
        assert np.allclose(shared["signal"][figure], alone["signal"][figure], rtol=1e-12, atol=0)
    assert np.allclose(shared["gram"], alone["gram"], rtol=1e-12, atol=0)


def test_progress_moves_on_while_the_signal_is_computed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the chunks are read, the bar still moves with each signal SVD, and reaches 1 only at the end."""
    paths = write_family_files(tmp_path / "m", "flux", "bf16", members=MEMBERS)
    monkeypatch.setattr(A._SignalWork, "_energies", _slowed(A._SignalWork._energies, 0.3, set()))
    seen: list[dict] = []
    A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:]], rank_samples=2, use_cache=False, progress=seen.append)
    fractions = [info["fraction"] for info in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    read_all = [info for info in seen if info["keys_done"] == info["keys_total"]]
    waiting = [info for info in read_all if info["fraction"] < 1.0]
    assert len({info["signal_done"] for info in waiting}) >= 2, waiting
    assert seen[-1]["signal_done"] == seen[-1]["signal_total"] == 2 * (len(MEMBERS) - 1)


def test_on_a_short_stream_the_signal_thread_then_takes_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below PARALLEL_MIN_BYTES there is no second chunk thread, but the signal thread reduces the chunks left
    once the signal is done (here at once: no signal keys); the report is the one-thread one."""
    paths = write_family_files(tmp_path / "m", "sdxl", "fp16", members=MEMBERS)
    models = [paths[n] for n in MEMBERS[1:]]
    alone = A.report(A.analyse(paths["base"], models, chunk=512, rank_samples=0, use_cache=False, one_thread=True))
    reducing: set[str] = set()
    monkeypatch.setattr(A._Reducer, "reduce", _slowed(A._Reducer.reduce, 0.001, reducing))
    shared = A.report(A.analyse(paths["base"], models, chunk=512, rank_samples=0, use_cache=False))
    assert reducing == {threading.main_thread().name, "ortho-mecha-signal"}
    assert shared["conflict_ratio"] == alone["conflict_ratio"] and shared["outliers"] == alone["outliers"]
    assert np.allclose(shared["gram"], alone["gram"], rtol=1e-12, atol=0)


@pytest.mark.parametrize(("where", "parallel_from"), [("ortho-mecha-chunks", 0), ("ortho-mecha-signal", 0),
                                                      ("ortho-mecha-signal", 2**62)])
def test_a_worker_thread_error_ends_the_pass_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     where: str, parallel_from: int) -> None:
    """An error in a worker thread (a file gone bad mid-pass) stops the other threads and is the pass's error."""
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:4])
    monkeypatch.setattr(A, "PARALLEL_MIN_BYTES", parallel_from)

    def failing(real: Callable) -> Callable:
        def call(*args: object) -> object:
            time.sleep(0.002)
            if threading.current_thread().name == where:
                raise A.OrthoMechaError("truncated while reading 'k'", paths["anime"])
            return real(*args)
        return call

    monkeypatch.setattr(A._Reducer, "reduce", failing(A._Reducer.reduce))
    monkeypatch.setattr(A._SignalWork, "_energies", failing(A._SignalWork._energies))
    with pytest.raises(A.OrthoMechaError, match="truncated while reading") as raised:
        A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:4]], chunk=256, use_cache=False)
    assert str(paths["anime"]) in str(raised.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("ortho-mecha-")]


@pytest.mark.parametrize("flag", ["--one-thread", "--single-process"])
def test_one_thread_starts_no_second_reducer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable,
                                             flag: str) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:3])
    started: list[str] = []
    real_init = A._Worker.__init__
    monkeypatch.setattr(A, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(A._Worker, "__init__", lambda self, name, *rest: started.append(name) or real_init(
        self, name, *rest))
    report_file = tmp_path / "report.json"
    result = cli("analyse", flag, "--no-cache", "--base", paths["base"], paths["anime"], paths["photo"],
                 "--json", report_file)
    assert result.code == 0 and report_file.exists() and started == ["ortho-mecha-signal"]
    assert cli("analyse", "--no-cache", "--base", paths["base"], paths["anime"], paths["photo"]).code == 0
    assert started[1:] == ["ortho-mecha-signal", "ortho-mecha-chunks"]


def test_the_pass_gives_torch_and_blas_their_thread_counts_back(tmp_path: Path) -> None:
    from threadpoolctl import threadpool_info

    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:3])
    torch.set_num_threads(2)
    before = (torch.get_num_threads(), [pool["num_threads"] for pool in threadpool_info()])
    A.analyse(paths["base"], [paths["anime"], paths["photo"]], use_cache=False)
    assert (torch.get_num_threads(), [pool["num_threads"] for pool in threadpool_info()]) == before


def test_delta_from_and_regram_without_reading(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "flux", "fp32", members=MEMBERS)
    names = ["anime", "anime_v2", "photo"]
    fresh = A.analyse(paths["base"], [paths[n] for n in names], {str(paths["anime_v2"]): str(paths["anime"])},
                      exact=True, use_cache=False)
    base_keys = list(stored(paths["base"]))
    deltas = [flat_delta(paths["anime"], paths["base"], base_keys),
              flat_delta(paths["anime_v2"], paths["anime"], base_keys),
              flat_delta(paths["photo"], paths["base"], base_keys)]
    x = torch.stack(deltas)
    assert np.allclose(fresh.gram(), (x @ x.T).numpy(), rtol=1e-9, atol=1e-12)
    # the same figures from an analysis against the base, re-grammed with no file read
    plain = A.analyse(paths["base"], [paths[n] for n in names], exact=True, use_cache=False)
    floors, shares = plain.noise_floors, plain.rotation_shares  # cached on it: not taken for fields
    moved = A.with_delta_from(plain, [None, 0, None])
    assert np.array_equal(moved.noise_floors, floors) and np.array_equal(moved.rotation_shares, shares)
    assert moved.stale == [False, True, False]
    assert np.allclose(moved.gram(), fresh.gram(), rtol=1e-9, atol=1e-12)
    # a delta-from outside the model set becomes an extra file row
    extra = A.analyse(paths["base"], [paths["anime_v2"]], {str(paths["anime_v2"]): str(paths["anime"])},
                      exact=True, use_cache=False)
    assert extra.files[1] == str(paths["anime"]) and extra.delta_from == [1]
    assert np.isclose(extra.gram()[0, 0], float(deltas[1] @ deltas[1]), rtol=1e-9)


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[A.PassPlan]:
    """The plan of every streaming pass run during the test (the real pass still runs)."""
    plans: list[A.PassPlan] = []
    real_pass = A.run_pass

    def spy(*args, **kwargs):
        plans.append(args[3])
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(A, "run_pass", spy)
    return plans


def test_cache_reuses_and_extends(tmp_path: Path, passes: list[A.PassPlan]) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS)
    first = A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:4]])
    assert first.bytes_read > 0
    again = A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:4]])
    assert again.bytes_read == 0 and np.array_equal(again.h, first.h)

    grown = A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:5]])
    assert passes[-1].h_rows == [3], "adding one model computes one new H row"
    assert grown.cached_files == 3 and first.cached_files == 0
    assert read_text(A.report(grown)).endswith(" (Gram of 3 files, figures of 3 models from the cache)")  # said
    ranked = A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:5]], rank_samples=2)  # the Gram only is cached
    assert read_text(A.report(ranked)).endswith(" (Gram of 4 files from the cache)") and ranked.cached_rows == 0
    full = A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:5]], use_cache=False)
    assert np.allclose(grown.h, full.h, rtol=1e-5, atol=0)  # default mode: float32 products per chunk
    assert np.array_equal(grown.both, full.both)

    # a changed file is a new file to the cache
    write_family_files(tmp_path / "m", "custom", "fp16", seed=7, members=["photo"], overwrite=True)
    changed = A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:5]])
    assert passes[-1].h_rows == [1]
    assert not np.allclose(changed.h, grown.h)


def test_changed_delta_from_refreshes_only_its_row(tmp_path: Path, passes: list[A.PassPlan]) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:4])
    models = [paths[n] for n in ("anime", "photo", "anime_v2")]
    first = A.analyse(paths["base"], models)
    moved = A.with_delta_from(first, [None, None, 0])
    refreshed = A.analyse(paths["base"], models, {str(paths["anime_v2"]): str(paths["anime"])})
    assert passes[-1].h_rows == [] and passes[-1].stat_rows == [2]
    assert np.allclose(refreshed.gram(), moved.gram(), rtol=1e-12)
    assert refreshed.stats[2].max_abs != first.stats[2].max_abs
    assert refreshed.stats[0].max_abs == first.stats[0].max_abs


def test_store_is_keyed_by_mode_and_rank_samples(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:3])
    A.analyse(paths["base"], [paths["anime"], paths["photo"]])
    exact = A.analyse(paths["base"], [paths["anime"], paths["photo"]], exact=True)
    assert exact.bytes_read > 0
    fewer = A.analyse(paths["base"], [paths["anime"], paths["photo"]], rank_samples=1)
    assert fewer.bytes_read > 0 and fewer.stats[0].signal_keys and len(fewer.stats[0].signal_keys) == 1
    store = Store("x", False, 5, enabled=False)
    assert store.lookup(["k"], ["a"], [("a", None)]).missing_files == [0]


def test_without_signal_samples_no_model_gets_credit_for_focus(tmp_path: Path) -> None:
    """--rank-samples 0 measures no signal: effective rank counts as full (1), so noise does not grade well."""
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=["base", "anime", "unrelated"])
    rep = A.report(A.analyse(paths["base"], [paths["anime"], paths["unrelated"]], rank_samples=0, use_cache=False))
    assert rep["signal"]["effective_rank"] == [1.0, 1.0]
    assert all(score < 0.35 for score in rep["quality"]["score"]) and set(rep["quality"]["grade"]) == {"D"}


def test_signal_keys_are_matrices_and_a_delta_zero_on_them_gets_no_focus_credit(tmp_path: Path) -> None:
    """An SD UNet's largest keys are 3×3 convs, which an attention LoRA leaves alone: the signal comes from the
    largest matrices, and a row whose delta is zero on every signal key is not "perfectly focused" (rank 0)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    shapes = {"conv.weight": (64, 64, 3, 3), "attn.to_q.weight": (96, 96), "ff.weight": (128, 64), "norm.bias": (64,)}
    base = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    noise = {key: 0.05 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    files = {
        "base": base,
        "everywhere": {key: value + noise[key] for key, value in base.items()},
        "conv_only": {key: value + noise[key] if key == "conv.weight" else value for key, value in base.items()},
    }
    for name, state in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    run = A.analyse(tmp_path / "base.safetensors", [tmp_path / "everywhere.safetensors",
                                                    tmp_path / "conv_only.safetensors"], rank_samples=2, exact=True,
                    use_cache=False)
    assert run.stats[0].signal_keys == ["attn.to_q.weight", "ff.weight"]  # not the larger conv
    rep = A.report(run)
    assert 0.5 < rep["signal"]["effective_rank"][0] < 1.0  # noise: nearly full rank
    assert rep["signal"]["effective_rank"][1] == 1.0 and rep["signal"]["snr"][1] == 0.0  # nothing measured
    assert rep["quality"]["grade"][1] == "D"


def test_identical_model_is_a_null_delta(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=["base", "anime"])
    same = tmp_path / "m" / "same.safetensors"
    same.write_bytes(paths["base"].read_bytes())
    rep = A.report(A.analyse(paths["base"], [paths["anime"], same]))
    assert rep["null"] == [False, True]
    assert rep["quality"]["grade"][1] == "D"


def test_an_empty_key_is_left_out_and_nan_input_is_named(tmp_path: Path) -> None:
    """A 0-element tensor adds nothing (it made every figure NaN); a model holding NaN is refused naming it and
    its key, before the cache keeps anything (it failed later in the lineage with an unnamed numpy error)."""
    from safetensors.torch import load_file, save_file

    from ortho_mecha.errors import OrthoMechaError

    paths = write_family_files(tmp_path / "m", "custom", "fp32", members=["base", "anime", "photo"])
    for path in paths.values():
        save_file(load_file(str(path)) | {"empty.weight": torch.zeros(0)}, str(path))
    analysis = A.analyse(paths["base"], [paths["anime"], paths["photo"]], use_cache=False)
    assert "empty.weight" not in analysis.keys
    assert np.isfinite(A.report(analysis)["cos"]).all()
    state = load_file(str(paths["photo"]))
    key = next(k for k, v in state.items() if v.numel() > 4)
    # and in the largest matrix, whose sampled spectrum (the signal figures) LAPACK cannot take with a NaN: it
    # failed there first with "?syevr failed (info 1, …)", naming no file
    largest = max((k for k, v in state.items() if v.dim() == 2), key=lambda k: state[k].numel())
    for name in (key, largest):
        state[name].view(-1)[3] = float("nan")
        bad = tmp_path / "nan.safetensors"
        save_file(state, str(bad))
        with pytest.raises(OrthoMechaError, match=rf"nan\.safetensors: holds NaN/Inf values in .*'{name}'"):
            A.analyse(paths["base"], [paths["anime"], bad], use_cache=False)
    with pytest.raises(OrthoMechaError, match=rf"nan\.safetensors: holds NaN/Inf values in '{key}'"):
        A.analyse(paths["base"], [paths["anime"], bad])
    assert Store.open(*(A.Model(paths["base"]), False, 5)).lookup([key], [A.Model(bad).fingerprint],
                                                                  [(A.Model(bad).fingerprint, None)]).missing_files


def test_memory_is_bounded_by_chunk(tmp_path: Path) -> None:
    """Reads go chunk by chunk: no read ever asks for more than the chunk size."""
    paths = write_family_files(tmp_path / "m", "custom", "fp32", members=MEMBERS[:4])
    sizes: list[int] = []
    from ortho_mecha.io import Model

    real_read = Model._read_raw  # every read of a file's bytes goes through it

    def spy(self, info, start, stop, scratch=None):
        sizes.append(stop - start)
        return real_read(self, info, start, stop, scratch)

    class KernelSpy:  # the compiled kernel reads the files of plain keys itself: n is its 9th argument
        def __getattr__(self, name: str) -> object:
            return getattr(kernels, name)

        def read_reduce_chunk(self, *args: object) -> float:
            sizes.append(args[8])
            return kernels.read_reduce_chunk(*args)

    kernels = A._kernels
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Model, "_read_raw", spy)
        if kernels is not None:
            mp.setattr(A, "_kernels", KernelSpy())
        A.analyse(paths["base"], [paths[n] for n in MEMBERS[1:4]], chunk=512, rank_samples=0, use_cache=False)
    assert sizes and max(sizes) <= 512


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_files=st.integers(2, 6),
    delta_from=st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=1, max_size=5),
)
def test_delta_identity(seed: int, n_files: int, delta_from: list[int | None]) -> None:
    """<M_a − B_a, M_b − B_b> from H equals the inner product of the explicit deltas."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_files, 50))
    h = x @ x.T
    rows = list(range(min(len(delta_from), n_files)))
    froms = [None if b is None or b % n_files == m else b % n_files for m, b in zip(rows, delta_from, strict=False)]
    explicit = np.stack([x[m] - (x[b] if b is not None else 0) for m, b in zip(rows, froms, strict=True)])
    assert np.allclose(delta_gram(h, rows, froms), explicit @ explicit.T, atol=1e-9)
    assert np.allclose(delta_norms_sq(h, rows, froms), (explicit**2).sum(axis=1), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(2, 5), length=st.integers(1, 300), zeros=st.floats(0, 0.6),
       subset=st.integers(0, 31))
@example(seed=1, rows=3, length=70, zeros=0.3, subset=7)  # every row: the symmetric counting
@example(seed=2, rows=4, length=130, zeros=0.3, subset=5)  # rows 0 and 2 only
def test_conflict_identity(seed: int, rows: int, length: int, zeros: float, subset: int) -> None:
    """conflicts = (|S||S|ᵀ − S Sᵀ)/2 counts exactly the element pairs of opposite sign, and the pass's
    bit-packed counting gives exactly |S||S|ᵀ and S Sᵀ for any chunk length and any subset of rows."""
    rng = np.random.default_rng(seed)
    d = (rng.normal(size=(rows, length)) * (rng.random((rows, length)) > zeros)).astype(np.float32)
    s = np.sign(d).astype(np.float64)
    counted = ((d[:, None, :] * d[None, :, :]) < 0).sum(-1)
    assert np.array_equal((np.abs(s) @ np.abs(s).T - s @ s.T) / 2, counted)
    picked = [r for r in range(rows) if subset >> r & 1] or [0]
    agree, both = np.full((rows, rows), 7.0), np.full((rows, rows), 7.0)
    words = -(-length // 64)
    pos, neg = np.full((rows, words), 2**64 - 1, dtype=np.uint64), np.full((rows, words), 2**64 - 1, dtype=np.uint64)
    A.pack_signs(d, pos, neg)  # stale bits in the buffers must not count
    A.count_signs(pos, neg, picked, agree, both)
    assert np.array_equal(both[picked], 7.0 + (np.abs(s) @ np.abs(s).T)[picked])
    assert np.array_equal(agree[picked], 7.0 + (s @ s.T)[picked])
    others = [r for r in range(rows) if r not in picked]
    assert (both[others] == 7.0).all() and (agree[others] == 7.0).all()


def test_signal_figures_hand_computed() -> None:
    # σ² = [8, 2, 0, 0]: 90 % of 10 needs both values → r = 2 of n = 4; top 10 % = 1 value: 8 / 2
    assert A.signal_figures(np.array([8.0, 2.0, 0.0, 0.0])) == (0.5, 4.0)
    rank, snr = A.signal_figures(np.array([1.0] + [0.0] * 9))
    assert rank == 0.1 and snr == A.SNR_CAP
    assert A.signal_figures(np.zeros(3)) is None  # a zero delta has no signal figures


def whole_delta_energy(delta: torch.Tensor, columns: int) -> np.ndarray:
    """The reference: the same sampled lines taken from the whole delta in memory."""
    m = delta.reshape(delta.shape[0], -1)
    tall, pick, scale = A.sample_lines(m.shape, columns)
    if pick is not None:
        m = (m[pick] if tall else m[:, pick]) * scale
    return A.sampled_energy(m, tall)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (12, 4, 3, 3), (5, 7)])
def test_streamed_signal_equals_the_sampled_whole_delta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        shape: tuple[int, ...]) -> None:
    """The signal read in blocks of rows, keeping only the sampled lines, gives the σ² of the same sample of
    the whole delta (row 1 = model b − model a, to cover a delta-from)."""
    from safetensors.torch import save_file

    from ortho_mecha.validate import align, open_models

    gen = torch.Generator().manual_seed(sum(shape))
    tensors = {name: torch.randn(shape, generator=gen) for name in ("base", "a", "b")}
    for name, tensor in tensors.items():
        save_file({"blocks.0.weight": tensor, "blocks.0.bias": tensor.reshape(-1)[:5].clone()},
                  str(tmp_path / f"{name}.safetensors"))
    base, models, _ = open_models(tmp_path / "base.safetensors",
                                  [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    alignment = align(base, models)
    monkeypatch.setattr(A, "SIGNAL_BLOCK", 37)  # several blocks of whole rows per key
    rows_t = np.array([[1.0, 0.0], [-1.0, 1.0]])
    work = A._SignalWork(alignment, models, [1, 2], rows_t, [0, 1], torch.float32, ["blocks.0.weight"])
    short = min(shape[0], int(np.prod(shape[1:])))
    exact = A._SignalWork(alignment, models, [1, 2], rows_t, [0, 1], torch.float64, ["blocks.0.weight"],
                          sampled=False)
    for r, delta in ((0, tensors["a"] - tensors["base"]), (1, tensors["b"] - tensors["a"])):
        expected = whole_delta_energy(delta, columns=A.SIGNAL_COLUMNS_PER_ROW * short)
        assert np.allclose(work._energies("blocks.0.weight", r), expected, rtol=1e-4, atol=1e-4 * expected[0])
    for r, (model, start) in enumerate((("a", "base"), ("b", "a"))):  # --exact: the SVD of the whole delta
        delta = (tensors[model].double() - tensors[start].double()).reshape(shape[0], -1).numpy()
        svd = np.linalg.svd(delta, compute_uv=False) ** 2
        got = exact._energies("blocks.0.weight", r)
        assert np.allclose(got[: len(svd)], svd, rtol=1e-9, atol=1e-9 * svd[0])


def test_the_default_chunk_keeps_a_chunk_of_every_file_near_the_cache(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Few files: DEFAULT_CHUNK elements; more files (or wider elements): a smaller power of two whose chunk of
    every file fits CHUNK_BYTES, never under MIN_CHUNK."""
    from ortho_mecha.io import Model

    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:3])
    base, files = Model(paths["base"]), [Model(paths[n]) for n in MEMBERS[1:3]]
    assert A.default_chunk(base, files) == A.DEFAULT_CHUNK
    monkeypatch.setattr(A, "CHUNK_BYTES", 3 * 2 * 5000)  # 3 fp16 files: 5000 elements fit
    assert A.default_chunk(base, files) == max(A.MIN_CHUNK, 4096)
    monkeypatch.setattr(A, "MIN_CHUNK", 1024)
    assert A.default_chunk(base, files) == 4096
    fp32 = write_family_files(tmp_path / "w", "custom", "fp32", members=MEMBERS[:3])
    assert A.default_chunk(Model(fp32["base"]), [Model(fp32[n]) for n in MEMBERS[1:3]]) == 2048


def test_summary_names_the_least_similar_pair_as_opposed_only_when_it_is() -> None:
    def rep(cos: list[list[float]], delta_from: list[str | None]) -> dict:
        n = len(cos)
        return {"models": [f"/m/{c}.safetensors" for c in "abc"[:n]], "bytes_read": 0, "seconds": 0.0,
                "arch": "custom", "base": "/m/base.safetensors", "keys": 3, "null": [False] * n,
                "outliers": {"keys": [[] for _ in range(n)]}, "norms": [1.0] * n, "cos": cos,
                "delta_from": delta_from}

    apart = A.summary_lines(rep([[1, 0.9, 0.2], [0.9, 1, 0.5], [0.2, 0.5, 1]], [None, None, "/m/a.safetensors"]))
    assert "  most similar: a.safetensors ~ b.safetensors (cos 0.900)" in apart
    assert "  least similar: a.safetensors ~ c.safetensors (cos 0.200)" in apart
    assert any(line.startswith("  c.safetensors") and "delta from a.safetensors" in line for line in apart)
    opposed = A.summary_lines(rep([[1, 0.9, -0.7], [0.9, 1, 0.5], [-0.7, 0.5, 1]], [None] * 3))
    assert "  most opposed: a.safetensors ~ c.safetensors (cos -0.700)" in opposed
    pair = A.summary_lines(rep([[1, 0.3], [0.3, 1]], [None] * 2))
    assert sum("similar" in line or "opposed" in line for line in pair) == 1
    assert pair[0].endswith("3 keys, from cache")
    orthogonal = A.summary_lines(rep([[1, 0.1, -0.0002], [0.1, 1, 0.05], [-0.0002, 0.05, 1]], [None] * 3))
    assert "  least similar: a.safetensors ~ c.safetensors (cos -0.000)" in orthogonal  # unrelated, not opposed
    with_null = rep([[1, 0.9, -0.7], [0.9, 1, 0.5], [-0.7, 0.5, 1]], [None] * 3) | {"null": [False, False, True]}
    lines = A.summary_lines(with_null)  # a null delta has no direction: its pairs are left out
    assert "  most similar: a.safetensors ~ b.safetensors (cos 0.900)" in lines
    assert not any("c.safetensors (cos" in line or "~ c.safetensors" in line for line in lines)
    lineage = [{"parent": None, "mix": None, "duplicate_of": "/m/b.safetensors"}, {"parent": None, "mix": None},
               {"parent": None, "mix": {"/m/a.safetensors": 0.3, "/m/b.safetensors": 0.7}, "duplicate_of": None}]
    lines = A.summary_lines(with_null | {"lineage": lineage})  # the lineage's results, as its parents
    assert lines[1].endswith("duplicate of b.safetensors")
    assert lines[3].endswith("merge of 0.70 b.safetensors + 0.30 a.safetensors")
    same = rep([[1, 0.2], [0.2, 1]], [None, None]) | {"models": ["/x/a.safetensors", "/y/a.safetensors"]}
    assert "  most similar: x/a.safetensors ~ y/a.safetensors (cos 0.200)" in A.summary_lines(same)  # told apart


def test_the_summary_says_what_was_read_and_how_long_it_took() -> None:
    def read(seconds: float, size: int = 7654321) -> str:
        return read_text({"bytes_read": size, "seconds": seconds})

    assert read(12.34) == "7.3 MiB read in 12.3 s"
    assert read(0.04) == "7.3 MiB read in 40 ms"  # a small pass: not "in 0.0 s"
    assert read(0.0) == "7.3 MiB read in 1 ms"
    assert read(1.0, size=0) == "from cache"


def test_two_models_each_others_delta_from_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = write_family_files(tmp_path, "custom", "fp32", members=["base", "anime", "photo"])
    anime, photo = str(paths["anime"]), str(paths["photo"])
    with caplog.at_level(logging.WARNING, logger="ortho_mecha"):
        result = A.analyse(paths["base"], [anime, photo], {anime: photo, photo: anime}, use_cache=False)
    assert "are each other's delta-from" in caplog.text
    g = result.gram()
    np.testing.assert_allclose(g[0, 1], -g[0, 0], rtol=1e-5)


def test_the_report_keeps_twelve_significant_digits_of_small_grams() -> None:
    """plan recomputes from the report's h: a Gram of tiny deltas (1e-12) must not be rounded to one digit."""
    h = np.array([[4.97661234567891e-12, -1.2345678901234e-15], [-1.2345678901234e-15, 3.0]])
    assert A._round(h) == [[4.97661234568e-12, -1.23456789012e-15], [-1.23456789012e-15, 3.0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_reports_vectorised_rounding_equals_formatting_each_value(seed: int) -> None:
    """``_round`` scales by powers of ten instead of formatting every entry (a 200-model report has millions):
    over values of every scale, signs, zeros and non-finite ones, it gives exactly ``float(f"{v:.12g}")``."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(50_000) * 10.0 ** rng.integers(-40, 40, 50_000)
    values[:8] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e300, -5e-324, 0.5]
    rounded = np.array(A._round(values.reshape(100, 500))).ravel()
    expected = np.array([float(f"{v:.12g}") for v in values])
    np.testing.assert_array_equal(rounded, expected)


def test_the_cache_keeps_a_record_per_computed_row_and_an_analysis_reads_only_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passes: list[A.PassPlan]
) -> None:
    """The cache of a base grows with the rows ever computed, one record each, and a later analysis of a few
    of its files reads their records only (one record of every pair, loaded whole, cost a 2-model analysis
    against a 200-model history 826 MB)."""
    from ortho_mecha.analysis_cache import H_ROW
    from ortho_mecha.cache import open_cache

    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:6])
    four = [paths[n] for n in MEMBERS[1:5]]
    A.analyse(paths["base"], four)

    def h_records() -> int:
        return sum(1 for key in open_cache("analysis").iterkeys() if key.startswith(f"{H_ROW}|"))

    assert h_records() == 4
    grown = A.analyse(paths["base"], [four[0], paths[MEMBERS[5]]])
    assert passes[-1].h_rows == [1] and h_records() == 5  # the new file's row, against the one it came with
    asked: list[str] = []
    real_get = diskcache.Cache.get

    def counting_get(self: diskcache.Cache, key: object, *args: object, **kwargs: object) -> object:
        if isinstance(key, str) and key.startswith(f"{H_ROW}|"):
            asked.append(key)
        return real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "get", counting_get)
    again = A.analyse(paths["base"], [four[1], paths[MEMBERS[5]], four[2]])  # (photo, new) was never computed
    assert passes[-1].h_rows in ([0], [1]) and len(asked) == 3 + 1  # its 3 files; the computed row's, to add to
    assert np.isfinite(again.h).all() and again.cached_files == 2
    full = A.analyse(paths["base"], [four[1], paths[MEMBERS[5]], four[2]], use_cache=False)
    np.testing.assert_allclose(again.h, full.h, rtol=1e-5)
    asked.clear()
    assert A.analyse(paths["base"], four[:2]).bytes_read == 0 and len(asked) == 2
    np.testing.assert_allclose(grown.h, A.analyse(paths["base"], [four[0], paths[MEMBERS[5]]], use_cache=False).h,
                               rtol=1e-5)
