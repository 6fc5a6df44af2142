"""The compiled per-chunk kernels against float64 numpy references, and the pass with and without them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ortho_mecha import _kernels as kernels  # the test environment must have them built: no skip
from ortho_mecha import analysis as A
from tests.modelgen import write_family_files

MEMBERS = ["base", "anime", "photo", "anime_v2", "anime_photo_merge", "unrelated", "anime_opposite"]
STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def test_the_kernels_are_built() -> None:
    """The test environment must run the compiled path (the build is optional for users without a compiler)."""
    assert A._kernels is kernels


def _rows(mask: int, n: int) -> np.ndarray:
    return np.array([r for r in range(n) if mask >> r & 1], dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_files=st.integers(1, 11), n=st.integers(1, 1500),
       spare=st.integers(0, 40), zeros=st.floats(0, 0.7), kind=st.sampled_from([None, "F32", "F16", "BF16"]),
       h_mask=st.integers(0, 2**11 - 1), stat_mask=st.integers(0, 2**11 - 1), sign_rows=st.integers(0, 3))
@example(seed=1, n_files=8, n=1024, spare=0, zeros=0.3, kind=None, h_mask=255, stat_mask=255, sign_rows=0)
@example(seed=2, n_files=9, n=777, spare=3, zeros=0.3, kind="F16", h_mask=2**11 - 1, stat_mask=4, sign_rows=1)
def test_reduce_chunk_matches_float64(seed: int, n_files: int, n: int, spare: int, zeros: float, kind: str | None,
                                      h_mask: int, stat_mask: int, sign_rows: int) -> None:
    """Gram rows to float32 accuracy; sign counts and peaks exactly; for any tile tail, row subset (all rows:
    the mirrored triangle), fewer sign rows than files, and outputs that already hold sums."""
    rng = np.random.default_rng(seed)
    width = n + spare
    deltas = (rng.normal(size=(n_files, width)) * (rng.random((n_files, width)) > zeros)).astype(np.float32)
    if kind is None:
        src, base, x = deltas, None, deltas
    else:
        base = rng.normal(size=width).astype(np.float32) * 4
        values = torch.from_numpy(deltas + base).to(STORED[kind])
        src = values.view(torch.uint8).numpy()
        x = (values.float() - torch.from_numpy(base)).numpy()  # the deltas as torch forms them
    xs = x[:, :n].astype(np.float64)
    ns = max(1, n_files - sign_rows)
    h_rows, stat_rows = _rows(h_mask, n_files), _rows(stat_mask, ns)
    gram = np.full((len(h_rows), n_files), 7.0)
    agree, both, peaks = np.full((ns, ns), 7.0), np.full((ns, ns), 7.0), np.full(len(stat_rows), 0.5)
    kernels.reduce_chunk(src, kind or "F32", base, n, h_rows, gram, stat_rows, agree, both, peaks)
    expected = xs @ xs.T
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))[h_rows]
    assert np.all(np.abs(gram - 7.0 - expected[h_rows]) <= 1e-5 * scale + 1e-30)
    s = np.sign(xs[:ns])
    assert np.array_equal(agree[stat_rows], 7.0 + (s @ s.T)[stat_rows])
    assert np.array_equal(both[stat_rows], 7.0 + (np.abs(s) @ np.abs(s).T)[stat_rows])
    others = np.setdiff1d(np.arange(ns), stat_rows)
    assert (agree[others] == 7.0).all() and (both[others] == 7.0).all()
    assert np.array_equal(peaks, np.maximum(0.5, np.abs(xs[:ns]).max(axis=1))[stat_rows])


@pytest.fixture(params=["f16c", "portable"])
def halves(request: pytest.FixtureRequest) -> Iterator[str]:
    """F16 values converted by the CPU's F16C instructions (where it has them), or by the portable bit
    manipulation that CPUs without them use."""
    if kernels.use_f16c(request.param == "f16c") != (request.param == "f16c"):
        pytest.skip("this CPU has no F16C")
    yield request.param
    kernels.use_f16c(True)


@pytest.mark.parametrize(("kind", "width"), [("F16", 8), ("F16", 13), ("BF16", 8)])
def test_every_half_precision_value_converts_exactly(halves: str, kind: str, width: int) -> None:
    """All 65536 bit patterns (subnormals, infinities, NaNs included) convert as torch converts them: each
    value is read back as its product with a row of ones over a chunk of zeros elsewhere (13 wide: the value
    in the tail that F16C's 8 at a time leave)."""
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    ones = np.ones(width, dtype=np.float32)
    for group in bits:
        stored = np.zeros((257, width), dtype=np.uint16)
        stored[:256, width - 1] = group
        stored[256] = torch.from_numpy(ones).to(STORED[kind]).view(torch.uint16).numpy()
        gram = np.zeros((1, 257))
        kernels.reduce_chunk(stored.view(np.uint8), kind, np.zeros(width, dtype=np.float32), width,
                             np.array([256]), gram, A.NO_ROWS, None, None, None)
        expected = torch.from_numpy(group.view(np.int16)).view(STORED[kind]).double().numpy()
        np.testing.assert_array_equal(gram[0, :256], expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eigvalsh_is_scipys_syevr(dtype: type) -> None:
    rng = np.random.default_rng(3)
    m = rng.normal(size=(70, 150)).astype(dtype)
    gram = m @ m.T
    values = np.empty(70, dtype=dtype)
    kernels.eigvalsh(gram.copy(), values)
    expected = scipy.linalg.eigh(gram, eigvals_only=True, driver="evr")
    np.testing.assert_array_equal(values, expected)


def test_bad_arguments_are_refused_not_read_past() -> None:
    x = np.zeros((3, 16), dtype=np.float32)
    rows = np.arange(3, dtype=np.int64)
    gram, square, peaks = np.zeros((3, 3)), np.zeros((3, 3)), np.zeros(3)
    with pytest.raises(ValueError, match="out of range"):
        kernels.reduce_chunk(x, "F32", None, 17, rows, gram, rows, square, square.copy(), peaks)
    with pytest.raises(ValueError, match="out of range"):
        kernels.reduce_chunk(x, "F32", None, 16, np.array([3]), np.zeros((1, 3)), A.NO_ROWS, None, None, None)
    with pytest.raises(ValueError, match="out of range"):
        kernels.reduce_chunk(x, "F32", None, 16, rows, np.zeros((2, 3)), A.NO_ROWS, None, None, None)
    with pytest.raises(ValueError, match="unsupported kind"):
        kernels.reduce_chunk(x.view(np.uint8), "F8_E4M3", np.zeros(16, dtype=np.float32), 16, rows, gram,
                             A.NO_ROWS, None, None, None)
    with pytest.raises(TypeError):
        kernels.reduce_chunk(x.astype(np.float64), "F32", None, 16, rows, gram, A.NO_ROWS, None, None, None)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.reduce_chunk(x[:, ::2], "F32", None, 8, rows, gram, A.NO_ROWS, None, None, None)
    with pytest.raises(ValueError, match="square"):
        kernels.eigvalsh(np.zeros((3, 4), dtype=np.float32), np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize("case", ["uniform fp16", "mixed dtypes", "delta-from", "add one"])
def test_the_pass_without_the_kernels_gives_the_same_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              case: str) -> None:
    """The torch and numpy path (exact passes, and installs without a compiler) and the kernels agree: every
    branch of the chunk reduction, the row-subset pass of an added model included."""
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "cache"))
    paths = write_family_files(tmp_path / "m", "flux", "fp16", members=MEMBERS)
    names = MEMBERS[1:]
    if case == "mixed dtypes":
        bf16 = write_family_files(tmp_path / "b", "flux", "bf16", members=MEMBERS)
        paths["photo"] = bf16["photo"]
    froms = {paths["anime_v2"]: paths["anime"]} if case == "delta-from" else None

    def run() -> dict:
        if case == "add one":  # the cached pass of all but one, then the new model's row only
            A.analyse(paths["base"], [paths[n] for n in names[:-1]], chunk=700)
        return A.report(A.analyse(paths["base"], [paths[n] for n in names], delta_from=froms, chunk=700,
                                  use_cache=case == "add one"))

    fast = run()
    monkeypatch.setattr(A, "_kernels", None)
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "cache-torch"))
    slow = run()
    assert fast["conflict_ratio"] == slow["conflict_ratio"]
    assert fast["outliers"]["keys"] == slow["outliers"]["keys"]
    # peaks are exact; the per-key norms they are set against differ by float32 summation order
    assert np.allclose(fast["outliers"]["max_outlier"], slow["outliers"]["max_outlier"], rtol=1e-5)
    gram, other = np.array(fast["gram"]), np.array(slow["gram"])
    scale = np.sqrt(np.outer(np.diag(other), np.diag(other)))
    assert np.all(np.abs(gram - other) <= 1e-5 * scale)  # cosines within 1e-5
    for figure in ("effective_rank", "snr"):
        assert np.allclose(fast["signal"][figure], slow["signal"][figure], rtol=1e-4), figure


def test_read_reduce_chunk_reads_what_reduce_chunk_is_given_and_names_the_short_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n, rows = 1000, 3
    base = rng.normal(size=n).astype(np.float16)
    models = (base + rng.normal(size=(rows, n)) * 0.01).astype(np.float16)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"x" * 24 + base.tobytes() + models.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = np.array([24 + (1 + r) * 2 * n for r in range(rows)], dtype=np.int64)
        everything = np.arange(rows, dtype=np.int64)

        def outputs() -> tuple[np.ndarray, ...]:
            return np.zeros((rows, rows)), np.zeros((rows, rows)), np.zeros((rows, rows)), np.zeros(rows)

        read = outputs()
        stored, base_values = np.zeros((rows, 4 * n), dtype=np.uint8), np.zeros(n, dtype=np.float32)
        base_sq = kernels.read_reduce_chunk(np.full(rows, fd), offsets, fd, 24, "F16", stored, "F16", base_values,
                                            n, everything, read[0], everything, *read[1:])
        given = outputs()
        kernels.reduce_chunk(models.view(np.uint8), "F16", base.astype(np.float32), n, everything, given[0],
                             everything, *given[1:])
        for a, b in zip(read, given, strict=True):
            np.testing.assert_array_equal(a, b)
        assert base_sq == pytest.approx(float(np.sum(base.astype(np.float64) ** 2)), rel=1e-12)
        with pytest.raises(OSError) as short:  # row 2 runs past the end of the file
            kernels.read_reduce_chunk(np.full(rows, fd), offsets + 2 * n * np.array([0, 0, 1]), fd, 24, "F16",
                                      stored, "F16", base_values, n, everything, read[0], everything, *read[1:])
        assert short.value.filename == 2 and short.value.strerror == "file ends early"
    finally:
        os.close(fd)
