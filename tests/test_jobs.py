"""Background jobs with real worker processes and a real diskcache in a temporary folder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ortho_mecha import jobs
from ortho_mecha.cache import open_cache
from ortho_mecha.errors import OrthoMechaError

WAIT_LIMIT_S = 15.0  # a safety net for a hung test, never a measured duration


@pytest.fixture(autouse=True)
def job_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own job store; workers still running afterwards are killed."""
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    for record in jobs.list_jobs():
        if record["state"] == "queued":
            jobs.cancel(record["id"])
    for record in jobs.list_jobs():
        if record["state"] == "running" and record["pid"] is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record["pid"], signal.SIGKILL)


def wait_until(job_id: str, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll ``status`` until ``condition`` holds; fail with the last record if it never does."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:
        record = jobs.status(job_id)
        if condition(record):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"job never reached the expected state; last record: {record}")
        time.sleep(0.05)


def finished(record: dict[str, Any]) -> bool:
    return record["state"] in jobs.FINISHED_STATES


def started(record: dict[str, Any]) -> bool:
    return record["state"] == "running" and record["progress"] is not None


def raw_record(job_id: str) -> dict[str, Any]:
    """The stored record, read without the scheduling that ``status`` does."""
    with open_cache("jobs") as cache:
        return cache.get(f"job:{job_id}")


def process_exists(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_job_runs_to_done_with_its_result() -> None:
    job_id = jobs.submit("sleep", {"seconds": 0.2, "steps": 4})
    record = wait_until(job_id, finished)
    assert record["state"] == "done"
    assert record["result"] == {"slept_s": 0.2, "steps": 4}
    assert record["progress"] == {"fraction": 1.0, "message": "step 4 of 4", "eta_s": 0.0}
    assert record["error"] is None
    assert record["submitted"] <= record["started"] <= record["ended"]
    log = Path(record["log"])
    assert log.parent == jobs.job_dir(job_id)
    assert f"job {job_id} done" in log.read_text()


def test_progress_is_visible_from_the_parent_while_running() -> None:
    job_id = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    record = wait_until(job_id, started)
    progress = record["progress"]
    assert 0 < progress["fraction"] < 1
    step = round(progress["fraction"] * 300)
    assert progress["message"] == f"step {step} of 300"
    assert progress["eta_s"] == pytest.approx(30 * (300 - step) / 300)
    assert record["pid"] is not None and process_exists(record["pid"])
    later = wait_until(job_id, lambda current: current["progress"]["fraction"] > progress["fraction"])
    assert later["state"] == "running"


def test_cancel_stops_a_running_job_between_chunks() -> None:
    job_id = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    pid = wait_until(job_id, started)["pid"]
    record = jobs.cancel(job_id)
    assert record["state"] == "cancelled"
    assert record["error"] is None  # it stopped by itself, through progress(), without being killed
    assert record["progress"]["fraction"] < 1
    wait_until(job_id, lambda _: not process_exists(pid))
    assert "stopped on request" in Path(record["log"]).read_text()


def test_cancel_kills_a_worker_that_does_not_respond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "KILL_GRACE_S", 0.2)  # a stopped process ignores SIGTERM: go on to SIGKILL soon
    job_id = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    pid = wait_until(job_id, started)["pid"]
    os.kill(pid, signal.SIGSTOP)  # a hung worker: it can neither see the request nor answer it
    record = jobs.cancel(job_id, grace=0.2)
    assert record["state"] == "cancelled"
    assert "ignored the cancel request" in record["error"]
    assert not process_exists(pid)


def test_cancel_while_a_job_is_starting_stops_it_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A running job that has not reported progress yet (its worker still importing torch, say) is stopped at
    once, not after the cancel grace, and is not said to have ignored the request."""
    monkeypatch.setattr(jobs, "_schedule", lambda cache: None)  # this test plays the worker itself
    job_id = jobs.submit("sleep", {"seconds": 30})
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", job_id], start_new_session=True)
    try:
        with open_cache("jobs") as cache:
            jobs._update(cache, job_id, {"state": "running", "started": time.time(), "pid": worker.pid})
        started_at = time.monotonic()
        record = jobs.cancel(job_id, grace=30)
        assert time.monotonic() - started_at < 10  # the 30 s grace was not waited out
        assert record["state"] == "cancelled" and record["error"] == "cancelled while it was starting"
        assert worker.wait(timeout=10) is not None  # stopped
    finally:
        worker.kill()
        worker.wait()


def test_cancel_a_queued_job_means_it_never_runs() -> None:
    first = jobs.submit("sleep", {"seconds": 0.5, "steps": 5})
    second = jobs.submit("sleep", {"seconds": 0.1})
    assert jobs.cancel(second)["state"] == "cancelled"
    assert wait_until(first, finished)["state"] == "done"
    record = jobs.status(second)
    assert record["state"] == "cancelled"
    assert record["started"] is None and record["pid"] is None


def test_a_killed_worker_is_detected_as_dead() -> None:
    job_id = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    pid = wait_until(job_id, started)["pid"]
    os.kill(pid, signal.SIGKILL)
    record = wait_until(job_id, finished)
    assert record["state"] == "failed"
    assert record["error"].startswith(f"worker process died (pid {pid})")


def test_a_worker_without_heartbeat_is_stopped_and_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    pid = wait_until(job_id, started)["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent
    monkeypatch.setattr(jobs, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(jobs, "KILL_GRACE_S", 0.2)
    record = wait_until(job_id, finished)
    assert record["state"] == "failed"
    assert record["error"].startswith("worker process stopped responding")
    assert not process_exists(pid)


def test_heavy_jobs_run_one_after_the_other_in_order() -> None:
    first = jobs.submit("sleep", {"seconds": 0.6, "steps": 6})
    second = jobs.submit("sleep", {"seconds": 0.1})
    third = jobs.submit("sleep", {"seconds": 0.1})
    assert [jobs.status(job)["state"] for job in (first, second, third)] == ["running", "queued", "queued"]
    records = [wait_until(job, finished) for job in (third, second, first)][::-1]
    assert [record["state"] for record in records] == ["done", "done", "done"]
    assert records[0]["ended"] <= records[1]["started"]
    assert records[1]["ended"] <= records[2]["started"]


def test_the_finishing_worker_starts_the_next_job_without_anyone_polling() -> None:
    first = jobs.submit("sleep", {"seconds": 0.3, "steps": 3})
    second = jobs.submit("sleep", {"seconds": 0.1})
    deadline = time.monotonic() + WAIT_LIMIT_S
    while raw_record(second)["state"] != "done":
        assert time.monotonic() < deadline, raw_record(second)
        time.sleep(0.05)
    assert raw_record(first)["state"] == "done"


def test_the_queue_moves_on_when_the_running_worker_crashed() -> None:
    first = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    second = jobs.submit("sleep", {"seconds": 0.1})
    pid = wait_until(first, started)["pid"]
    assert jobs.status(second)["state"] == "queued"
    os.kill(pid, signal.SIGKILL)
    assert wait_until(second, finished)["state"] == "done"
    assert jobs.status(first)["state"] == "failed"


def test_light_jobs_do_not_wait_for_the_heavy_one() -> None:
    heavy = jobs.submit("sleep", {"seconds": 30, "steps": 300})
    light = jobs.submit("sleep", {"seconds": 0.1}, heavy=False)
    assert wait_until(light, finished)["state"] == "done"
    assert jobs.status(heavy)["state"] == "running"


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(OrthoMechaError, match=r"unknown job kind 'os.system'; the registered kinds are: .*sleep"):
        jobs.submit("os.system", {"command": "true"})
    with pytest.raises(OrthoMechaError, match=r"unknown job kind 'analyze' \(did you mean 'analyse'\?\)"):
        jobs.submit("analyze", {})
    with pytest.raises(OrthoMechaError, match=r"unknown job kind \['sleep'\]"):
        jobs.submit(["sleep"], {})  # type: ignore[arg-type]
    assert jobs.list_jobs() == []


def test_parameters_must_be_json_data() -> None:
    with pytest.raises(OrthoMechaError, match="must be plain JSON data"):
        jobs.submit("sleep", {"seconds": float("nan")})
    with pytest.raises(OrthoMechaError, match="must be plain JSON data"):
        jobs.submit("sleep", {"path": Path("/tmp")})
    with pytest.raises(OrthoMechaError, match="must be a JSON object"):
        jobs.submit("sleep", [1, 2])  # type: ignore[arg-type]
    assert jobs.list_jobs() == []


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "", "A" * 32, "0" * 31])
def test_job_ids_from_outside_are_checked(job_id: str) -> None:
    with pytest.raises(OrthoMechaError, match="is not a job id"):
        jobs.status(job_id)
    with pytest.raises(OrthoMechaError, match="is not a job id"):
        jobs.job_dir(job_id)


def test_status_of_an_unknown_job_says_so() -> None:
    with pytest.raises(OrthoMechaError, match=r"no job 0{32} in .*never submitted"):
        jobs.status("0" * 32)


def test_a_job_error_of_ours_is_reported_as_is() -> None:
    job_id = jobs.submit("sleep", {"seconds": -1})
    record = wait_until(job_id, finished)
    assert record["state"] == "failed"
    assert record["error"] == "sleep job: seconds must be a number from 0 to 3600, got -1"


def test_any_other_exception_is_reported_with_its_type_and_traceback_in_the_log() -> None:
    job_id = jobs.submit("sleep", {"seconds": 0, "steps": 1, "fail": "the disk\nis full"})
    record = wait_until(job_id, finished)
    assert record["state"] == "failed"
    assert record["error"] == "RuntimeError: the disk is full"
    log = Path(record["log"]).read_text()
    assert "Traceback (most recent call last)" in log
    assert "in sleep_job" in log


def test_job_state_survives_a_reload_in_another_process() -> None:
    job_id = jobs.submit("sleep", {"seconds": 0.1, "steps": 2})
    wait_until(job_id, finished)
    code = "import json, sys; from ortho_mecha import jobs; print(json.dumps(jobs.status(sys.argv[1])))"
    seen = subprocess.run([sys.executable, "-c", code, job_id], capture_output=True, text=True, check=True)
    record = json.loads(seen.stdout)
    assert record == jobs.status(job_id)
    assert record["state"] == "done" and record["result"] == {"slept_s": 0.1, "steps": 2}
    assert [listed["id"] for listed in jobs.list_jobs()] == [job_id]


def test_list_jobs_is_newest_first() -> None:
    ids = [jobs.submit("sleep", {"seconds": 0}) for _ in range(3)]
    assert [record["id"] for record in jobs.list_jobs()] == ids[::-1]


def test_sleep_job_checks_its_parameters_before_sleeping() -> None:
    reports: list[dict[str, Any]] = []
    with pytest.raises(OrthoMechaError, match=r"unknown parameter\(s\) command; allowed: seconds, steps, fail"):
        jobs.sleep_job({"command": "rm"}, reports.append)
    with pytest.raises(OrthoMechaError, match="steps must be a whole number"):
        jobs.sleep_job({"steps": True}, reports.append)
    assert reports == []
    assert jobs.sleep_job({"seconds": 0, "steps": 2}, reports.append) == {"slept_s": 0, "steps": 2}
    assert [report["fraction"] for report in reports] == [0.5, 1.0]


def test_the_registry_names_importable_functions() -> None:
    for kind in jobs.JOB_KINDS:
        assert callable(jobs._job_function(kind)), kind


def test_a_worker_just_forked_counts_as_alive_before_its_exec() -> None:
    """Between fork and exec a worker still shows its launcher's command line (another worker's, when a finished job
    starts the next): another process checking on it then must not call it dead (a flaky 'worker died')."""
    job_id = "0" * 32
    seen_as = os.getpid()  # a live process whose command line names no job, as a worker's does before its exec
    assert jobs._worker_alive(seen_as, job_id, launched=time.time())
    assert not jobs._worker_alive(seen_as, job_id, launched=time.time() - 2 * jobs.LAUNCH_GRACE_S)
    assert not jobs._worker_alive(seen_as, job_id)


def _slow_merge(tmp_path: Path) -> tuple[str, Path, Path]:
    """A merge job of 400 small orthomerge keys, started: (job id, its output, the temporary file it writes)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "models"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.weight": torch.randn(48, 48, generator=generator) for i in range(400)}
    paths = {}
    for name, scale in (("base", 0.0), ("a", 0.05), ("b", 0.05)):
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()},
                  str(paths[name]))
    plan = {"base": str(paths["base"]), "method": "orthomerge", "output_dtype": "fp32",
            "rows": [{"model": str(paths["a"])}, {"model": str(paths["b"])}]}
    out = folder / "merged.safetensors"
    job_id = jobs.submit("merge", {"plan_data": plan, "out": str(out)})
    listing = jobs.job_dir(job_id) / jobs.PARTIALS_NAME
    deadline = time.monotonic() + 60
    temp: Path | None = None
    while temp is None or not temp.exists():  # the writer's temporary file (after check_writable's probe)
        assert time.monotonic() < deadline and not finished(jobs.status(job_id)), "the merge never started writing"
        lines = listing.read_text(encoding="utf-8").splitlines() if listing.exists() else []
        temp = Path(json.loads(lines[-1])) if len(lines) >= 2 else None
        time.sleep(0.01)
    return job_id, out, temp


def test_a_merge_worker_stopped_by_sigterm_is_cancelled_not_failed(tmp_path: Path) -> None:
    """The worker's SIGTERM (cancel's stop) used to surface as 'failed: MergeInterrupted: merge stopped by
    SIGTERM' when the merge caught it before cancel() recorded its own state."""
    job_id, out, temp = _slow_merge(tmp_path)
    os.kill(jobs.status(job_id)["pid"], signal.SIGTERM)
    record = wait_until(job_id, finished)
    assert record["state"] == "cancelled", record
    assert not temp.exists() and not out.exists()


def test_a_merge_worker_killed_on_cancel_leaves_no_half_output(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed after its cancel grace (a merge busy with one long key, here a stopped process) cannot clean
    up after itself: the canceller removes the temporary file it was writing, from the list the worker kept."""

    from ortho_mecha.fsutil import PARTIALS_ENV, partial_path

    monkeypatch.setattr(jobs, "KILL_GRACE_S", 0.2)
    job_id, out, temp = _slow_merge(tmp_path)
    listing = jobs.job_dir(job_id) / jobs.PARTIALS_NAME
    pid = jobs.status(job_id)["pid"]
    os.kill(pid, signal.SIGSTOP)  # busy past any grace: it can neither see the cancel nor clean up
    record = jobs.cancel(job_id, grace=0.2)
    # killed: after the grace, or at once when it had not reported progress yet (a loaded machine)
    assert record["state"] == "cancelled" and record["error"] is not None
    assert not temp.exists() and not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.safetensors", "b.safetensors", "base.safetensors"]
    # outside a worker nothing is listed
    monkeypatch.delenv(PARTIALS_ENV, raising=False)
    partial_path(out)
    assert len(listing.read_text(encoding="utf-8").splitlines()) == 2
