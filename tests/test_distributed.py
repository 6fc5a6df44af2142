"""The analysis pass sharded over a real Dask LocalCluster gives the local pass's numbers."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ortho_mecha import analysis as A
from ortho_mecha import distributed
from ortho_mecha.distributed import shard_keys, worker_pass
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.io import sampled_digest
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
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    with pytest.raises(OrthoMechaError, match="local:N needs a number"):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="local:two")
    for count in (0, 1000):
        with pytest.raises(OrthoMechaError, match=f"worker processes on this machine, from 1 to .*got {count}"):
            A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler=f"local:{count}")
    with pytest.raises(OrthoMechaError, match="cannot reach the Dask scheduler"):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="tcp://127.0.0.1:9")
    for bad in ("bogus", "tcp://", "http://127.0.0.1:8786", "inproc://x", "tls://127.0.0.1:8786", "host:port"):
        with pytest.raises(OrthoMechaError, match=f"'{bad}' is not a scheduler: give local:N"):
            A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler=bad)


def _worker_args(paths: dict[str, Path]) -> tuple:
    """worker_pass's arguments for the base and one model, as distributed_pass sends them."""
    base, models, _ = open_models(paths["base"], [paths["anime"]])
    alignment = align(base, models)
    rows_t = A.row_selection(1, 1, [None])
    plan = A.PassPlan(h_rows=[0], stat_rows=[0])
    return str(paths["base"]), [str(paths["anime"])], alignment.arch, rows_t, plan, alignment.keys, False, 2048, 0


def test_a_worker_refuses_a_file_that_is_not_the_clients(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=["base", "anime", "photo"])
    args = _worker_args(paths)
    digests = [sampled_digest([paths["base"]]), sampled_digest([paths["anime"]])]
    assert worker_pass(*args, digests).h_key  # the client's files: the pass runs
    copy = tmp_path / "copy.safetensors"
    shutil.copy(paths["base"], copy)
    assert sampled_digest([copy]) == digests[0]  # a copy (another name and mtime) is the same file to a worker
    # the worker sees another model at the client's path of anime (a stale copy on its storage, say)
    with pytest.raises(OrthoMechaError, match=r"anime.safetensors: this worker reads another file than the "
                                              r"client's at that path: every worker must see"):
        worker_pass(*args, [digests[0], sampled_digest([paths["photo"]])])
    paths["anime"].unlink()
    with pytest.raises(OrthoMechaError, match=r"on Dask worker .*anime.safetensors: not found on this worker"):
        worker_pass(*args, digests)


def test_a_scheduler_without_workers_is_said_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dask.distributed import LocalCluster

    monkeypatch.setattr(distributed, "WORKERLESS_SECONDS", 1.0)
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    with (LocalCluster(n_workers=0, dashboard_address=None) as cluster,
          pytest.raises(OrthoMechaError, match=r"has no workers \(waited 1 s\): start some with 'dask worker tcp://")):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler=cluster.scheduler_address)


def test_a_worker_without_ortho_mecha_is_said_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # such a worker cannot read the pass's task; only its own log said so, while the client waited for ever
    from dask.distributed import LocalCluster

    monkeypatch.setattr(distributed, "PACKAGE", "ortho-mecha-not-installed")  # what the workers lack
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    with (LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
          pytest.raises(OrthoMechaError, match="has no ortho-mecha-not-installed: install it there")):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler=cluster.scheduler_address)


def test_a_listener_that_is_not_a_scheduler_is_said_not_waited_for(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "CONNECT_SECONDS", 1.0)
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, then never answers (as a web server waiting
    accepted: list[socket.socket] = []               # for its request does)
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    try:
        with pytest.raises(OrthoMechaError, match="no Dask answer within 1 s"):
            A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler=address)

        async def in_a_running_loop() -> None:  # as after a test (or a caller) that left its event loop running
            distributed.answers(address)

        with ThreadPoolExecutor(1) as other, pytest.raises(TimeoutError):  # its own thread: this one may have one
            other.submit(asyncio.run, in_a_running_loop()).result()
    finally:
        silent.close()
        for conn in accepted:
            conn.close()


def test_a_bad_scheduler_is_refused_also_when_the_analysis_is_cached(tmp_path: Path, cli, cli_error) -> None:
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    assert cli("analyse", "--base", paths["base"], paths["anime"]).code == 0  # now cached
    assert "'foo' is not a scheduler" in cli_error("analyse", "--base", paths["base"], paths["anime"],
                                                   "--scheduler", "foo")


def test_without_dask_the_error_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # what an install without the extra has
    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=MEMBERS[:2])
    with pytest.raises(OrthoMechaError, match=r'not installed: pip install "ortho-mecha\[distributed\]"'):
        A.analyse(paths["base"], [paths["anime"]], use_cache=False, scheduler="local:1")
