"""Lineage from the file Gram: planted families of seeded random deltas (the base is the origin)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_mecha import lineage
from ortho_mecha.gram import squared_distances

DIM = 3000


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM)
    return v / np.linalg.norm(v)


def gram(vectors: list[np.ndarray]) -> np.ndarray:
    x = np.stack(vectors)
    return x @ x.T


@pytest.mark.parametrize("seed", range(3))
def test_fine_tune_of_a_fine_tune_is_traced_to_its_real_parent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = unit(rng)
    k = a + 0.4 * unit(rng)  # fine-tune of a
    kk = k + 0.3 * unit(rng)  # fine-tune of k: nearer to a than to the base, but its parent is k
    other = 1.2 * unit(rng)
    found = lineage.lineage(gram([kk, other, k, a]), 4, [0.5] * 4)
    assert [item["parent"] for item in found] == [2, None, 3, None]
    assert all(item["mix"] is None for item in found)
    assert found[0]["confidence"] > 0.5 and found[2]["confidence"] > 0.5


@pytest.mark.parametrize("b_norm", [1.0, 1.5, 0.7])
@pytest.mark.parametrize("seed", range(3))
def test_half_half_merge_is_found_with_its_weights(seed: int, b_norm: float) -> None:
    rng = np.random.default_rng(seed)
    a, b = unit(rng), b_norm * unit(rng)
    merged = 0.5 * a + 0.5 * b
    child = a + 0.3 * unit(rng)  # a fine-tune of a, to tempt the fit
    found = lineage.lineage(gram([a, merged, b, child]), 4, [0.5] * 4)
    mix = found[1]["mix"]
    assert found[1]["parent"] is None
    assert mix is not None and set(mix) == {0, 2}
    assert abs(mix[0] - 0.5) < 0.05 and abs(mix[2] - 0.5) < 0.05
    assert found[1]["confidence"] > 0.9
    # the ingredients are not children of the merge
    assert found[0]["parent"] is None and found[2]["parent"] is None
    assert found[3]["parent"] == 0


def test_parent_with_many_small_fine_tunes_is_not_a_merge_of_them() -> None:
    rng = np.random.default_rng(5)
    p = unit(rng)
    kids = [p + 0.2 * unit(rng) for _ in range(6)]  # their mean is within 0.1 of p
    found = lineage.lineage(gram([p, *kids]), 7, [0.5] * 7)
    assert found[0] == {
        "parent": None,
        "mix": None,
        "confidence": found[0]["confidence"],
        "residual": None,
        "duplicate_of": None,
    }
    assert [item["parent"] for item in found[1:]] == [0] * 6


def test_merge_can_use_an_extra_delta_from_file() -> None:
    rng = np.random.default_rng(2)
    a, b = unit(rng), unit(rng)
    found = lineage.lineage(gram([0.3 * a + 0.6 * b, a, b]), 1, [0.5])  # files 1, 2 are extras
    assert found[0]["mix"] is not None
    assert found[0]["mix"] == pytest.approx({1: 0.3, 2: 0.6}, abs=1e-6)


def test_duplicates_keep_the_higher_quality_model_and_chain_into_groups() -> None:
    rng = np.random.default_rng(3)
    a = unit(rng)
    twin = a + 0.05 * unit(rng)  # D = 0.0025 < 0.01
    triplet = twin + 0.05 * unit(rng)
    other = unit(rng)
    h = gram([a, twin, other, triplet])
    assert lineage.duplicates(h, [0.3, 0.9, 0.5, 0.1]) == {0: 1, 3: 1}
    assert lineage.duplicates(h, [0.5, 0.5, 0.5, 0.5]) == {1: 0, 3: 0}  # a tie keeps the first listed
    found = lineage.lineage(h, 4, [0.3, 0.9, 0.5, 0.1])
    assert [item["duplicate_of"] for item in found] == [1, None, None, 1]


def test_near_but_not_duplicate_models_are_kept_apart() -> None:
    rng = np.random.default_rng(4)
    a = unit(rng)
    near = a + 0.2 * unit(rng)  # D = 0.04: a fine-tune, not a copy
    assert lineage.duplicates(gram([a, near]), [0.5, 0.5]) == {}


def test_parent_rule_thresholds() -> None:
    # file 0 at distance² 1 from the base; file 1 at distance² 0.45 from file 0 (< 0.5·1) and nearer the base
    h = np.array([[1.0, 0.775], [0.775, 0.9]])
    assert squared_distances(h)[0, 1] == pytest.approx(0.35)
    assert lineage.parent(h, 0, [1]) == 1
    assert lineage.parent(h, 1, [0]) is None  # file 0 is further from the base than file 1
    far = np.array([[1.0, 0.6], [0.6, 0.9]])  # D = 0.7 ≥ 0.5
    assert lineage.parent(far, 0, [1]) is None


def test_null_model_has_the_base_as_parent() -> None:
    rng = np.random.default_rng(0)
    found = lineage.lineage(gram([np.zeros(DIM), unit(rng)]), 2, [0.0, 0.5])
    assert found[0]["parent"] is None and found[0]["mix"] is None and found[0]["confidence"] == 1.0


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.floats(0.05, 2.0), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_nnls_on_gram_recovers_planted_non_negative_weights(weights: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    sources = [rng.standard_normal(200) for _ in weights]
    target = sum(w * s for w, s in zip(weights, sources, strict=True))
    h = gram([target, *sources])
    w, residual = lineage.nnls_on_gram(h, 0, list(range(1, len(weights) + 1)))
    np.testing.assert_allclose(w, weights, atol=1e-5)
    assert residual < 1e-5


@settings(max_examples=30, deadline=None)
@given(points=st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=8))
def test_model_map_reproduces_planar_distances_with_the_base_last(points: list[tuple[float, float]]) -> None:
    plane = np.linalg.qr(np.random.default_rng(0).standard_normal((10, 2)))[0]  # a plane through the base
    files = [plane @ np.array(p) for p in points]
    coords = lineage.model_map(gram(files))
    assert coords.shape == (len(points) + 1, 2)
    everything = np.stack([*files, np.zeros(10)])
    want = np.linalg.norm(everything[:, None] - everything[None], axis=-1)
    got = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_model_map_is_deterministic_and_puts_far_models_far() -> None:
    rng = np.random.default_rng(9)
    a = unit(rng)
    h = gram([a, a + 0.1 * unit(rng), 3.0 * unit(rng)])
    coords = lineage.model_map(h)
    np.testing.assert_array_equal(coords, lineage.model_map(h.copy()))
    base = coords[-1]
    assert np.linalg.norm(coords[2] - base) > 2 * np.linalg.norm(coords[0] - base)


def test_an_ingredient_is_not_explained_by_its_own_merge() -> None:
    # photo = 2·merge + opposite exactly, with non-negative weights; but merge was made from photo
    rng = np.random.default_rng(6)
    anime, photo = 2.0 * unit(rng), 2.0 * unit(rng)
    files = [anime, -anime, 0.5 * anime + 0.5 * photo, photo, photo + 0.02 * unit(rng)]
    found = lineage.lineage(gram(files), 5, [0.8, 0.7, 0.8, 0.9, 0.6])
    assert found[2]["mix"] == pytest.approx({0: 0.5, 3: 0.5}, abs=1e-6)
    assert found[3]["mix"] is None and found[3]["parent"] is None
    assert found[4]["duplicate_of"] == 3 and found[4]["mix"] is None


# H of a real analysis (fp32/fp16/bf16/fp8 files): p32, q16, qbf (q16 in bf16), pq = 0.6·δp + 0.4·δq, oppP = −δp,
# r32, pR_fp8 = 40·δr in fp8, p32copy; as `analyse --json` wrote it
PQ_H = np.array([
    [2.4135057964e-02, -1.34220925e-04, -1.33617611e-04, 1.4427631463e-02, -2.4135057658e-02, -2.32417231e-04,
     -9.4637683400e-03, 2.4135057964e-02],
    [-1.34220925e-04, 2.5941052590e-02, 2.5932118676e-02, 1.0294747461e-02, 1.34221594e-04, 4.6894088e-05,
     1.5286652810e-03, -1.34220925e-04],
    [-1.33617611e-04, 2.5932118676e-02, 2.6105664489e-02, 1.0293182731e-02, 1.33618112e-04, 5.2251558e-05,
     1.6881123280e-03, -1.33617611e-04],
    [1.4427631463e-02, 1.0294747461e-02, 1.0293182731e-02, 1.2774632958e-02, -1.4427630965e-02, -1.19475124e-04,
     -5.0193855260e-03, 1.4427631463e-02],
    [-2.4135057658e-02, 1.34221594e-04, 1.33618112e-04, -1.4427630965e-02, 2.4135057728e-02, 2.32417087e-04,
     9.4637624110e-03, -2.4135057658e-02],
    [-2.32417231e-04, 4.6894088e-05, 5.2251558e-05, -1.19475124e-04, 2.32417087e-04, 2.6300334832e-02,
     1.0508536618780, -2.32417231e-04],
    [-9.4637683400e-03, 1.5286652810e-03, 1.6881123280e-03, -5.0193855260e-03, 9.4637624110e-03, 1.0508536618780,
     42.065248146304, -9.4637683400e-03],
    [2.4135057964e-02, -1.34220925e-04, -1.33617611e-04, 1.4427631463e-02, -2.4135057658e-02, -2.32417231e-04,
     -9.4637683400e-03, 2.4135057964e-02],
])


def test_a_merge_is_reported_with_its_fewest_ingredients() -> None:
    """NNLS has many equal fits when a file's exact opposite is among the sources (0.7·δp + 0.1·(−δp) = 0.6·δp):
    the reported mix is the one without the cancelling pair, and a scaled copy is one ingredient, not three."""
    quality = [0.87, 0.35, 0.35, 0.55, 0.78, 0.27, 0.27, 0.87]
    items = lineage.lineage(PQ_H, 8, quality)
    pq = items[3]["mix"]
    assert set(pq) == {0, 1} and pq[0] == pytest.approx(0.6, abs=2e-3) and pq[1] == pytest.approx(0.4, abs=2e-3)
    assert set(items[5]["mix"]) == {6}  # r32: pR_fp8 / 40


def _ancestors(found: list[lineage.LineageItem], i: int) -> set[int]:
    """Every file model ``i`` was made from, through parents and mixes (extra files past the models have none)."""
    seen: set[int] = set()
    stack = [i]
    while stack:
        current = stack.pop()
        if current >= len(found):
            continue
        item = found[current]
        for source in ([item["parent"]] if item["parent"] is not None else []) + list(item["mix"] or {}):
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return seen


@pytest.mark.parametrize("seed", range(3))
def test_a_merge_whose_ingredient_has_a_fine_tune_is_found_without_a_cycle(seed: int) -> None:
    """t12 merges t1 and t2; t1b is t1's fine-tune. t1 sits within the parent threshold of t12, so the fit of t12
    is retried with its fine-tunes: the real ingredient t1 is taken, not its fine-tune t1b (which made t1 a
    fine-tune of t12 and t12 a mix of t1b: each its own ancestor)."""
    rng = np.random.default_rng(seed)
    d1, d2 = unit(rng), unit(rng)
    t1, t2 = d1, d2
    t1b, t12 = t1 + 0.3 * d2, 0.52 * d1 + 0.48 * d2
    found = lineage.lineage(gram([t1, t1b, t2, t12]), 4, [0.5] * 4)
    assert found[3]["mix"] is not None and set(found[3]["mix"]) == {0, 2}
    assert found[3]["mix"] == pytest.approx({0: 0.52, 2: 0.48}, abs=0.01)
    assert [item["parent"] for item in found[:3]] == [None, 0, None]
    assert all(i not in _ancestors(found, i) for i in range(4))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.integers(3, 9))
def test_no_model_is_its_own_ancestor(seed: int, size: int) -> None:
    """Random families of fine-tunes and merges of earlier files: parents and mixes never form a cycle."""
    rng = np.random.default_rng(seed)
    files = [unit(rng)]
    for _ in range(size - 1):
        made = rng.integers(3)
        if made == 0 or len(files) < 2:
            files.append(unit(rng) * rng.uniform(0.5, 1.5))  # another fine-tune of the base
        elif made == 1:
            files.append(files[rng.integers(len(files))] + rng.uniform(0.1, 0.5) * unit(rng))  # a fine-tune
        else:
            a, b = rng.choice(len(files), 2, replace=False)
            w = rng.uniform(0.3, 0.7)
            files.append(w * files[a] + (1 - w) * files[b])  # a merge
    order = rng.permutation(size)
    found = lineage.lineage(gram([files[i] for i in order]), size, [0.5] * size)
    assert all(i not in _ancestors(found, i) for i in range(size))
