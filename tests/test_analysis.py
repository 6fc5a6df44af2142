"""The streaming analysis pass against brute-force float64 computations on flattened deltas."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ortho_mecha import analysis as A
from ortho_mecha.analysis_cache import Store
from ortho_mecha.gram import cosine, delta_gram
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


@pytest.mark.parametrize("delta_from", [False, True])
def test_helper_process_gives_the_single_process_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        delta_from: bool) -> None:
    """A large stream is shared with a helper process (a real one, here forced on small files): chunks and
    signal tasks split between the processes, the report is the single-process one."""
    paths = write_family_files(tmp_path / "m", "flux", "bf16", members=MEMBERS)
    names = MEMBERS[1:]
    froms = {paths["anime_v2"]: paths["anime"]} if delta_from else None

    helped: list[A.HelperResult] = []
    real_result, real_reduce, real_energies = A._Helper.result, A._Reducer.reduce, A._SignalWork._energies

    def result(self: A._Helper, waiting: object) -> A.HelperResult:
        helped.append(real_result(self, waiting))
        return helped[-1]

    def slow(real: object, seconds: float) -> object:  # this process only: the helper, started later, gets work
        def call(*args: object) -> object:
            time.sleep(seconds)
            return real(*args)
        return call

    monkeypatch.setattr(A._Helper, "result", result)

    def run(min_bytes: int) -> dict:
        monkeypatch.setattr(A, "HELPER_MIN_BYTES", min_bytes)
        if min_bytes == 0:
            monkeypatch.setattr(A._Reducer, "reduce", slow(real_reduce, 0.02))
            monkeypatch.setattr(A._SignalWork, "_energies", slow(real_energies, 0.3))
        progress: list[dict] = []
        result = A.analyse(paths["base"], [paths[n] for n in names], delta_from=froms, chunk=512, use_cache=False,
                           progress=progress.append)
        assert progress and progress[-1]["fraction"] == 1.0
        return A.report(result)

    alone, shared = run(2**62), run(0)
    assert len(helped) == 1 and helped[0].bytes_read > 0 and any(helped[0].signal.values())
    for field in ("conflict_ratio", "outliers"):
        assert shared[field] == alone[field], field
    for figure in ("effective_rank", "snr"):  # the same arithmetic; BLAS may round differently in another process
        assert np.allclose(shared["signal"][figure], alone["signal"][figure], rtol=1e-12, atol=0)
    assert np.allclose(shared["gram"], alone["gram"], rtol=1e-12, atol=0)


def test_a_helper_that_fails_before_taking_work_leaves_the_pass_whole(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A helper process that cannot start its work (here: the files moved away under it) took no chunk: the
    pass does every chunk itself and the report is the single-process one."""
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:4])
    names = MEMBERS[1:4]
    alone = A.report(A.analyse(paths["base"], [paths[n] for n in names], chunk=512, use_cache=False))
    monkeypatch.setattr(A, "HELPER_MIN_BYTES", 0)
    monkeypatch.setattr(A.HelperSpec, "__getstate__", lambda self: {**vars(self), "base": str(tmp_path / "gone")},
                        raising=False)
    shared = A.report(A.analyse(paths["base"], [paths[n] for n in names], chunk=512, use_cache=False))
    assert shared["gram"] == alone["gram"] and shared["conflict_ratio"] == alone["conflict_ratio"]
    assert "gone" in caplog.text and "went on without it" in caplog.text


def test_single_process_starts_no_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:3])
    started: list[A.HelperSpec] = []
    monkeypatch.setattr(A, "HELPER_MIN_BYTES", 0)
    monkeypatch.setattr(A._Helper, "__init__", lambda self, spec: started.append(spec) or pytest.fail("helper"))
    report_file = tmp_path / "report.json"
    result = cli("analyse", "--single-process", "--no-cache", "--base", paths["base"], paths["anime"], paths["photo"],
                 "--json", report_file)
    assert result.code == 0 and report_file.exists() and not started


def test_helper_process_failure_names_the_problem(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    missing = tmp_path / "gone.safetensors"
    chunks = A._SharedQueue([("k", 0, 1)])
    signal = A._SharedQueue([])
    spec = A.HelperSpec(str(missing), [str(paths["anime"])], "custom", [1], False, 512, ["k"], np.eye(1), [0], [0],
                        [], chunks.fd, signal.fd)
    helper = A._Helper(spec)
    try:
        with pytest.raises(A.OrthoMechaError, match=r"gone\.safetensors"):
            helper.result(lambda: None)
    finally:
        helper.close()
        chunks.close()
        signal.close()


ORPHAN_PASS = """
import sys, time
import numpy as np
from ortho_mecha import analysis as A
from ortho_mecha.validate import align, open_models

base, (model,) = open_models(sys.argv[1], [sys.argv[2]])
alignment = align(base, [model])
keys = list(alignment.keys) * 2000  # minutes of work in chunks of 64 elements
chunks, signal = A._SharedQueue(A._chunk_tasks(alignment, keys, 64)), A._SharedQueue([])
spec = A.HelperSpec(str(base.path), [str(model.path)], alignment.arch, [1], False, 64, keys, np.eye(1), [0], [0],
                    [], chunks.fd, signal.fd)
helper = A._Helper(spec)
while not chunks.taken():  # the helper is at work
    time.sleep(0.01)
print(helper.process.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's reaper may be slow to reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_a_helper_whose_pass_is_killed_stops(tmp_path: Path) -> None:
    """A pass killed outright (SIGKILL: no clean-up runs) leaves no helper process working on."""
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    script = tmp_path / "orphan_pass.py"
    script.write_text(ORPHAN_PASS)
    pass_process = subprocess.Popen([sys.executable, str(script), str(paths["base"]), str(paths["anime"])],
                                    stdout=subprocess.PIPE, text=True)
    try:
        helper = int(pass_process.stdout.readline())  # once it has taken chunks
        assert _running(helper)
    finally:
        pass_process.kill()
        pass_process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(helper):
        time.sleep(0.05)
    assert not _running(helper), "the helper went on working for a pass that is gone"


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
    moved = A.with_delta_from(plain, [None, 0, None])
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


def test_identical_model_is_a_null_delta(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=["base", "anime"])
    same = tmp_path / "m" / "same.safetensors"
    same.write_bytes(paths["base"].read_bytes())
    rep = A.report(A.analyse(paths["base"], [paths["anime"], same]))
    assert rep["null"] == [False, True]
    assert rep["quality"]["grade"][1] == "D"


def test_memory_is_bounded_by_chunk(tmp_path: Path) -> None:
    """Reads go chunk by chunk: no read ever asks for more than the chunk size."""
    paths = write_family_files(tmp_path / "m", "custom", "fp32", members=MEMBERS[:4])
    sizes: list[int] = []
    from ortho_mecha.io import Model

    real_read = Model._read_raw  # every read of a file's bytes goes through it

    def spy(self, info, start, stop, scratch=None):
        sizes.append(stop - start)
        return real_read(self, info, start, stop, scratch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Model, "_read_raw", spy)
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
    assert A.signal_figures(np.zeros(3)) == (0.0, 0.0)


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
    base, models = open_models(tmp_path / "base.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    alignment = align(base, models)
    monkeypatch.setattr(A, "SIGNAL_BLOCK", 37)  # several blocks of whole rows per key
    rows_t = np.array([[1.0, 0.0], [-1.0, 1.0]])
    work = A._SignalWork(alignment, models, [1, 2], rows_t, [0, 1], torch.float32, ["blocks.0.weight"])
    short = min(shape[0], int(np.prod(shape[1:])))
    for r, delta in ((0, tensors["a"] - tensors["base"]), (1, tensors["b"] - tensors["a"])):
        expected = whole_delta_energy(delta, columns=A.SIGNAL_COLUMNS_PER_ROW * short)
        assert np.allclose(work._energies("blocks.0.weight", r), expected, rtol=1e-4, atol=1e-4 * expected[0])
