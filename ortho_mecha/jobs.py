"""Long work (analysis, merge, preview sweep, LoRA extraction) in a detached worker process, its state in diskcache.

``submit(kind, params)`` records a job in ``open_cache("jobs")`` and starts
``python -m ortho_mecha.jobs JOB_ID`` in a session of its own, so the worker outlives a Streamlit
rerun or restart; any process (a reloaded page, a second browser, the CLI) follows it with
``status``/``list_jobs`` and stops it with ``cancel``.

Only the kinds in ``JOB_KINDS`` run: each names a function inside ortho_mecha by ``module:function``,
and ``params`` are JSON data, so nothing a browser sends is ever executed as code. A job function is
``fn(params, progress) -> result``; ``progress({"fraction": 0.4, "message": ..., "eta_s": ...})``
publishes its state and raises ``Cancelled`` once a cancel was requested, so the function stops
between chunks.

A job is ``queued``, ``running``, then ``done``, ``failed`` or ``cancelled``. Heavy jobs run one at a
time in submission order: the worker that finishes starts the next, and every ``submit``/``status``/
``list_jobs`` call starts it too when none is running, after marking workers that died (process gone or
no heartbeat for ``STALE_AFTER_S``) as failed. Every read-modify-write of a job record happens in a
diskcache transaction (an SQLite ``BEGIN IMMEDIATE``), which serialises the processes involved.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import diskcache

from ortho_mecha.cache import cache_dir, open_cache
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import PARTIALS_ENV, process_exists, remove_listed_partials

logger = logging.getLogger(__name__)

# The job kinds a worker may run, as "module:function" inside ortho_mecha. Add a line per new kind.
JOB_KINDS: dict[str, str] = {
    "analyse": "ortho_mecha.analysis:run_job",
    "sleep": "ortho_mecha.jobs:sleep_job",
    "merge": "ortho_mecha.merge:run_job",
    "preview": "ortho_mecha.preview_job:run_job",
    "sweep": "ortho_mecha.preview_job:sweep_job",
    "extract-lora": "ortho_mecha.lora:run_job",
}

FINISHED_STATES = frozenset({"done", "failed", "cancelled"})
HEARTBEAT_S = 0.5  # how often a worker writes its heartbeat and latest progress, and reads the cancel flag
STALE_AFTER_S = 30.0  # a running job whose heartbeat is older than this has a hung or vanished worker
CANCEL_GRACE_S = 5.0  # how long cancel() waits for the job to stop by itself before killing it
LAUNCH_GRACE_S = 30.0  # how long after its launch a worker may still show its launcher's command line
PARTIALS_NAME = "partials.jsonl"  # in a job's folder: the temporary files its worker made (fsutil.partial_path)
KILL_GRACE_S = 2.0  # how long a worker gets between SIGTERM and SIGKILL
LOG_NAME = "worker.log"

Progress = Callable[[Mapping[str, Any]], None]
JobFunction = Callable[[dict[str, Any], Progress], dict[str, Any]]
Record = dict[str, Any]

_JOB_ID = re.compile(r"[0-9a-f]{32}")
_HAVE_PROC = Path("/proc/self/cmdline").exists()
# Workers this process started, polled so that finished ones are reaped instead of lingering as zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


class Cancelled(Exception):
    """Raised by ``progress`` inside the worker once cancellation of its job was requested."""


# --- the public interface ------------------------------------------------------------------------


def submit(kind: str, params: Mapping[str, Any], heavy: bool = True) -> str:
    """Record a job and start its worker (a heavy one waits while another heavy job runs); return its id."""
    if not isinstance(kind, str) or kind not in JOB_KINDS:
        nearest = difflib.get_close_matches(str(kind), JOB_KINDS, n=1)
        hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
        raise OrthoMechaError(
            f"unknown job kind {kind!r}{hint}; the registered kinds are: {', '.join(sorted(JOB_KINDS))}"
        )
    job_id = uuid.uuid4().hex
    record: Record = {
        "id": job_id,
        "kind": kind,
        "params": _json_object(params, "the job parameters"),
        "heavy": heavy,
        "state": "queued",
        "submitted": time.time(),
        "started": None,
        "ended": None,
        "pid": None,
        "heartbeat": None,
        "cancel_requested": False,
        "progress": None,
        "result": None,
        "error": None,
        "log": str(job_dir(job_id) / LOG_NAME),
    }
    with open_cache("jobs") as cache:
        with cache.transact():
            record["seq"] = cache.incr("seq")
            cache.set(_key(job_id), record)
        logger.info("job %s (%s) submitted", job_id, kind)
        if heavy:
            _schedule(cache)
        elif _update(cache, job_id, _claim_changes(), only_if=_is_queued) is not None:
            _launch(cache, job_id)
    return job_id


def status(job_id: str) -> Record:
    """The job's record: state, progress, result or error, times, pid and the path of its log."""
    with open_cache("jobs") as cache:
        _schedule(cache)
        return _load(cache, job_id)


def list_jobs() -> list[Record]:
    """Every recorded job, newest first."""
    with open_cache("jobs") as cache:
        _schedule(cache)
        return sorted(_records(cache), key=lambda record: record["seq"], reverse=True)


def cancel(job_id: str, grace: float = CANCEL_GRACE_S) -> Record:
    """Stop a job: a queued one at once; a running one is asked, then killed if it ignores that for ``grace`` s."""
    with open_cache("jobs") as cache:
        record = _load(cache, job_id)
        if record["state"] == "queued":
            _update(cache, job_id, {"state": "cancelled", "ended": time.time()}, only_if=_is_queued)
        elif record["state"] == "running" and record["progress"] is None:
            # still starting (importing, opening files): nothing done that a clean stop would keep, so stop it now
            # rather than wait for a progress report it cannot yet make
            if record["pid"] is not None:
                _stop_worker(record["pid"], job_id)
            changes = {"state": "cancelled", "ended": time.time(), "error": "cancelled while it was starting"}
            _update(cache, job_id, changes, only_if=_is_running)
        elif record["state"] == "running":
            _update(cache, job_id, {"cancel_requested": True}, only_if=_is_running)
            deadline = time.monotonic() + grace
            while record["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
                record = _load(cache, job_id)
            if record["state"] == "running":
                if record["pid"] is not None:
                    _stop_worker(record["pid"], job_id)
                changes = {
                    "state": "cancelled",
                    "ended": time.time(),
                    "error": f"the job ignored the cancel request for {grace:g} s, so its worker was killed",
                }
                _update(cache, job_id, changes, only_if=_is_running)
                logger.warning("job %s: worker killed after ignoring the cancel request", job_id)
        _schedule(cache)
        return _load(cache, job_id)


def job_dir(job_id: str) -> Path:
    """The job's own folder (its worker log, and any files the job writes), beside the job records."""
    return cache_dir() / "job-files" / _check_id(job_id)


# --- the built-in job kind -----------------------------------------------------------------------


def sleep_job(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Sleep ``seconds`` in ``steps`` equal parts, reporting progress after each: a job that costs nothing.

    It exercises the machinery in tests and in the dashboard's smoke test. Parameters: ``seconds``
    (0–3600, default 1), ``steps`` (1–10000, default 10) and ``fail`` (a message: raise
    ``RuntimeError(fail)`` after the last step, to rehearse a failing job).
    """
    allowed = ("seconds", "steps", "fail")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise OrthoMechaError(f"sleep job: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    seconds = params.get("seconds", 1.0)
    steps = params.get("steps", 10)
    fail = params.get("fail")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise OrthoMechaError(f"sleep job: seconds must be a number from 0 to 3600, got {seconds!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10000:
        raise OrthoMechaError(f"sleep job: steps must be a whole number from 1 to 10000, got {steps!r}")
    if fail is not None and not isinstance(fail, str):
        raise OrthoMechaError(f"sleep job: fail must be a message (text), got {fail!r}")
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        remaining = seconds * (steps - step) / steps
        progress({"fraction": step / steps, "message": f"step {step} of {steps}", "eta_s": remaining})
    if fail:
        raise RuntimeError(fail)
    return {"slept_s": seconds, "steps": steps}


# --- the worker ----------------------------------------------------------------------------------


class _Reporter:
    """The ``progress`` callback of a running job, plus the heartbeat thread that publishes it.

    ``progress`` itself only keeps the latest report in memory and raises ``Cancelled`` when asked to
    stop, so a job may call it per key at no cost; every ``HEARTBEAT_S`` the thread writes the
    heartbeat and that report to the job record and reads the cancel flag back.
    """

    def __init__(self, cache: diskcache.Cache, job_id: str) -> None:
        self._cache = cache
        self._job_id = job_id
        self._lock = threading.Lock()
        self.latest: dict[str, Any] | None = None
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        self._thread.start()

    def __call__(self, info: Mapping[str, Any]) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"job {self._job_id} was cancelled")
        with self._lock:
            self.latest = dict(info)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while True:
            with self._lock:
                report = self.latest
            changes = {"heartbeat": time.time(), "progress": report}
            record = _update(self._cache, self._job_id, changes, only_if=_is_running)
            if record is not None and record["cancel_requested"]:
                self._cancel.set()
            if self._stop.wait(HEARTBEAT_S):
                return


def run_worker(job_id: str) -> int:
    """Run one claimed job to its end in this process and record the outcome; 0 unless there was nothing to run."""
    with open_cache("jobs") as cache:
        claimed = _update(cache, job_id, {"pid": os.getpid(), "heartbeat": time.time()}, only_if=_is_running)
        if claimed is None:
            logger.warning("job %s is not waiting for a worker (cancelled before it started?); nothing to run", job_id)
            return 1
        logger.info("job %s (%s) started with %s", job_id, claimed["kind"], claimed["params"])
        reporter = _Reporter(cache, job_id)

        def stopped(signum: int, frame: object) -> None:  # only cancel() or a stale-worker check sends it
            raise Cancelled(f"job {job_id} was stopped by {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, stopped)  # a stop recorded as cancelled, not as the job's own failure
        outcome = _run(claimed, reporter)
        reporter.stop()
        outcome.update(progress=reporter.latest, ended=time.time())
        _update(cache, job_id, outcome, only_if=_running_with(os.getpid()))
        logger.info("job %s %s", job_id, outcome["state"])
        _schedule(cache)
    return 0


def _run(record: Record, progress: Progress) -> dict[str, Any]:
    """Call the job's function; the changes to record: its result, or its state and one-line error."""
    try:
        result = _json_object(_job_function(record["kind"])(record["params"], progress), "the job's result")
    except Cancelled:
        logger.info("job %s stopped on request", record["id"])
        return {"state": "cancelled"}
    except OrthoMechaError as error:
        logger.exception("job %s failed", record["id"])
        return {"state": "failed", "error": _one_line(str(error))}
    except BaseException as error:  # the worker's last word: whatever went wrong is reported, traceback in the log
        logger.exception("job %s failed", record["id"])
        return {"state": "failed", "error": _one_line(f"{type(error).__name__}: {error}")}
    return {"state": "done", "result": result}


def _job_function(kind: str) -> JobFunction:
    if kind not in JOB_KINDS:
        raise OrthoMechaError(f"job kind {kind!r} is no longer registered; known kinds: {', '.join(sorted(JOB_KINDS))}")
    module_name, function_name = JOB_KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def main(argv: list[str]) -> int:
    """``python -m ortho_mecha.jobs JOB_ID``: the worker process's entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python -m ortho_mecha.jobs JOB_ID", file=sys.stderr)
        return 2
    return run_worker(_check_id(argv[0]))


# --- scheduling ----------------------------------------------------------------------------------


def _schedule(cache: diskcache.Cache) -> None:
    """Mark dead workers' jobs failed, then start the oldest queued heavy job if no heavy job runs."""
    _fail_dead_workers(cache)
    while (job_id := _claim_next_heavy(cache)) is not None:
        if _launch(cache, job_id):
            return


def _claim_next_heavy(cache: diskcache.Cache) -> str | None:
    with cache.transact():
        records = _records(cache)
        if any(record["heavy"] and record["state"] == "running" for record in records):
            return None
        queued = [record for record in records if record["heavy"] and record["state"] == "queued"]
        if not queued:
            return None
        job_id = min(queued, key=lambda record: record["seq"])["id"]
        _update(cache, job_id, _claim_changes())
        return job_id


def _claim_changes() -> dict[str, Any]:
    # The heartbeat starts now, so a launcher that dies before its worker starts leaves a job that goes stale.
    now = time.time()
    return {"state": "running", "started": now, "heartbeat": now}


def _launch(cache: diskcache.Cache, job_id: str) -> bool:
    """Start the worker of a claimed job in a new session; on failure mark the job failed and return False."""
    folder = job_dir(job_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOG_NAME, "ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "ortho_mecha.jobs", job_id],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=os.environ | {PARTIALS_ENV: str(folder / PARTIALS_NAME)},  # what a kill must clean up
            )
    except OSError as error:
        changes = {"state": "failed", "ended": time.time(), "error": f"could not start the worker process: {error}"}
        _update(cache, job_id, changes, only_if=_is_running)
        logger.error("job %s: could not start the worker: %s", job_id, error)
        return False
    _children[worker.pid] = worker
    _update(cache, job_id, {"pid": worker.pid}, only_if=_running_with(None))
    logger.info("job %s: worker pid %d", job_id, worker.pid)
    return True


def _fail_dead_workers(cache: diskcache.Cache) -> None:
    now = time.time()
    for record in _records(cache):
        if record["state"] != "running":
            continue
        pid, job_id = record["pid"], record["id"]
        if pid is not None and not _worker_alive(pid, job_id, launched=record["started"]):
            remove_listed_partials(job_dir(job_id) / PARTIALS_NAME)  # what it was writing when it died
            error = f"worker process died (pid {pid}) before the job ended; its log: {record['log']}"
        elif now - record["heartbeat"] > STALE_AFTER_S:
            if pid is not None:
                _stop_worker(pid, job_id)
            silent = now - record["heartbeat"]
            error = f"worker process stopped responding (no heartbeat for {silent:.0f} s) and was stopped"
        else:
            continue
        if _update(cache, job_id, {"state": "failed", "ended": now, "error": error}, only_if=_running_with(pid)):
            logger.error("job %s: %s", job_id, error)


def _worker_alive(pid: int, job_id: str, launched: float | None = None) -> bool:
    """Whether ``pid`` is still the worker of ``job_id`` (not gone, not a zombie, not a recycled pid). Within
    ``LAUNCH_GRACE_S`` of the job's ``launched`` time a live process counts whatever its command line: between
    its fork and its exec a worker still shows its launcher's (another worker's, the dashboard's)."""
    for child_pid, child in list(_children.items()):
        if child.poll() is not None:
            _children.pop(child_pid, None)
    if pid in _children:  # this process's own running child: alive even before its exec shows the job id
        return True
    if _HAVE_PROC:
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if job_id.encode() in arguments:
            return True
        launching = launched is not None and time.time() - launched < LAUNCH_GRACE_S
        return launching and arguments != [b""]  # a zombie's command line is empty
    return process_exists(pid)


def _stop_worker(pid: int, job_id: str) -> None:
    """SIGTERM the worker's process group, then SIGKILL it if the worker is still there after ``KILL_GRACE_S``;
    then remove the temporary files it was writing (a killed merge's half output)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _worker_alive(pid, job_id):
            break
        try:
            os.killpg(pid, sig)  # the worker leads its own session, so its group id is its pid
        except ProcessLookupError:
            break
        deadline = time.monotonic() + KILL_GRACE_S
        while _worker_alive(pid, job_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    remove_listed_partials(job_dir(job_id) / PARTIALS_NAME)


# --- records -------------------------------------------------------------------------------------


def _key(job_id: str) -> str:
    return f"job:{job_id}"


def _check_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise OrthoMechaError(f"{job_id!r} is not a job id (32 hexadecimal digits); pick the job from the job list")
    return job_id


def _load(cache: diskcache.Cache, job_id: str) -> Record:
    record = cache.get(_key(_check_id(job_id)))
    if record is None:
        raise OrthoMechaError(
            f"no job {job_id} in {cache.directory}; it was never submitted there or the cache was cleared"
        )
    return record


def _records(cache: diskcache.Cache) -> list[Record]:
    records = (cache.get(key) for key in cache.iterkeys() if isinstance(key, str) and key.startswith("job:"))
    return [record for record in records if record is not None]


def _update(
    cache: diskcache.Cache,
    job_id: str,
    changes: Mapping[str, Any],
    only_if: Callable[[Record], bool] | None = None,
) -> Record | None:
    """Apply ``changes`` atomically if the record exists and passes ``only_if``; the new record or None."""
    with cache.transact():
        record = cache.get(_key(job_id))
        if record is None or (only_if is not None and not only_if(record)):
            return None
        record.update(changes)
        cache.set(_key(job_id), record)
        return record


def _is_queued(record: Record) -> bool:
    return record["state"] == "queued"


def _is_running(record: Record) -> bool:
    return record["state"] == "running"


def _running_with(pid: int | None) -> Callable[[Record], bool]:
    """A check that the job still runs under worker ``pid`` (None: launched, worker pid not yet known)."""
    return lambda record: record["state"] == "running" and record["pid"] == pid


def _json_object(value: Any, what: str) -> dict[str, Any]:
    """A JSON round-trip copy of ``value``, which must be a JSON object (a dict of plain data)."""
    try:
        copy = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise OrthoMechaError(f"{what} must be plain JSON data: {error}") from error
    if not isinstance(copy, dict):
        raise OrthoMechaError(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    return copy


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    # Run the worker from the importable module, not from this ``__main__`` copy: a job function raises
    # ``ortho_mecha.jobs.Cancelled``, which must be the class the worker catches.
    from ortho_mecha.jobs import main as _main

    raise SystemExit(_main(sys.argv[1:]))
