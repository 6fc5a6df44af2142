"""The analysis pass sharded over a real Dask LocalCluster gives the local pass's numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ortho_mecha import analysis as A
from ortho_mecha.distributed import shard_keys
from ortho_mecha.validate import align, open_models
from tests.modelgen import write_family_files

pytest.importorskip("dask.distributed")

MEMBERS = ["base", "anime", "photo", "anime_v2", "unrelated"]


def test_local_cluster_matches_local_pass(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "flux", "fp16", members=MEMBERS)
    models = [paths[n] for n in MEMBERS[1:]]
    delta_from = {str(paths["anime_v2"]): str(paths["anime"])}
    local = A.analyse(paths["base"], models, delta_from, use_cache=False, chunk=2048)
    spread = A.analyse(paths["base"], models, delta_from, use_cache=False, chunk=2048, scheduler="local:2")
    assert local.keys == spread.keys
    for key in local.keys:
        assert np.allclose(spread.h_key[key], local.h_key[key], rtol=1e-12, atol=0)
    assert np.allclose(spread.h, local.h, rtol=1e-12, atol=0)
    assert np.array_equal(spread.both, local.both) and np.array_equal(spread.agree, local.agree)
    for mine, theirs in zip(local.stats, spread.stats, strict=True):
        assert mine.max_abs == theirs.max_abs
        assert mine.signal == theirs.signal
        assert mine.noise_sq == pytest.approx(theirs.noise_sq, rel=1e-12)
    assert A.report(spread)["quality"] == A.report(local)["quality"]


def test_shards_cover_every_key_once(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "sdxl", "fp16", members=MEMBERS[:2])
    base, models, _ = open_models(paths["base"], [paths["anime"]])
    alignment = align(base, models)
    for n in (1, 3, 7, 100):
        shards = shard_keys(alignment, n)
        flat = [k for shard in shards for k in shard]
        assert sorted(flat) == sorted(alignment.keys)
        assert len(shards) == min(n, len(alignment.keys))


def test_bad_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    from ortho_mecha.errors import OrthoMechaError

    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    with pytest.raises(OrthoMechaError, match="local:N needs a number"):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="local:two")
    with pytest.raises(OrthoMechaError, match="cannot reach the Dask scheduler"):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="tcp://127.0.0.1:9")
    with pytest.raises(OrthoMechaError, match="'bogus' is not a scheduler: give local:N"):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="bogus")


def test_a_bad_scheduler_is_refused_also_when_the_analysis_is_cached(tmp_path: Path, cli, cli_error) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    assert cli("analyse", "--base", paths["base"], paths["anime"]).code == 0  # now cached
    assert "'foo' is not a scheduler" in cli_error("analyse", "--base", paths["base"], paths["anime"],
                                                   "--scheduler", "foo")


def test_without_dask_the_error_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ortho_mecha.errors import OrthoMechaError

    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # what an install without the extra has
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    with pytest.raises(OrthoMechaError, match=r'not installed: pip install "ortho-mecha\[distributed\]"'):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="local:1")
