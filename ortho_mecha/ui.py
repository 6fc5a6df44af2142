"""Streamlit helpers shared by the dashboard's pages — the only ortho_mecha module that imports streamlit.

- :data:`PAGES`: the page list ``streamlit_app.py`` navigates over (and the tests walk); each page starts
  with :func:`require_app`, so it never runs without the app's password gate.
- :func:`shown_errors`: a block whose failures appear as one ``st.error`` line, never a traceback.
- :func:`job_panel`: a background job followed from the URL (``?job=…``), polled by an
  ``st.fragment(run_every=…)``, with progress, ETA and a cancel button; a reload or a second tab shows
  the same job.
- :func:`current_analysis`: the analysis the Mixer and Merge pages work from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from ortho_mecha import jobs, security
from ortho_mecha.errors import OrthoMechaError

if TYPE_CHECKING:
    from ortho_mecha.methods.deltas import OptionSpec


logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a running job's panel refreshes


@dataclass(frozen=True)
class PageSpec:
    path: str  # relative to the app's folder
    title: str
    icon: str
    default: bool = False


PAGES: tuple[PageSpec, ...] = (
    PageSpec("pages/analyse.py", "Analyse", ":material/grid_on:", default=True),
    PageSpec("pages/mixer.py", "Mixer", ":material/tune:"),
    PageSpec("pages/merge.py", "Merge", ":material/merge:"),
    PageSpec("pages/preview.py", "Preview", ":material/image:"),
)

APP_DIR = Path(__file__).resolve().parent.parent


def navigation() -> Any:
    """``st.navigation`` over :data:`PAGES` (paths taken from the app's folder, so any working directory works)."""
    return st.navigation(
        [st.Page(str(APP_DIR / page.path), title=page.title, icon=page.icon, default=page.default) for page in PAGES]
    )


AUTHENTICATED = "authenticated"  # the session-state flag the sign-in sets


def gate_open() -> bool:
    """Whether this session may see the dashboard: bound to this machine only, or signed in."""
    return not security.password_required(st.get_option("server.address")) or bool(st.session_state.get(AUTHENTICATED))


def require_app() -> None:
    """Keep a page behind the app's password gate; call it first thing in every page.

    Streamlit runs the scripts of a folder named ``pages/`` beside the main script on their own (its
    legacy multipage mode) until some session has called ``st.navigation``: on a freshly started server, a
    link straight to ``/merge`` would run ``pages/merge.py`` without ``streamlit_app.py`` and its gate.
    This switches Streamlit to ``st.navigation`` mode (what ``st.navigation`` itself does, through the same
    internal flag) and, when the gate is closed, starts over through the main script, which asks for the
    password. (The browser then shows an empty page until it is reloaded.) With the gate open, a page run
    on its own still shows; only that first view has Streamlit's plain page list in the sidebar.
    """
    from streamlit.runtime.pages_manager import PagesManager

    PagesManager.uses_pages_directory = False
    if not gate_open():
        logger.warning("a page was asked for before the password was given; running the app's sign-in instead")
        st.rerun()


@contextmanager
def shown_errors() -> Iterator[None]:
    """Run a block; an error a user can cause is shown as its message, anything else as a one-line failure."""
    try:
        yield
    except OrthoMechaError as error:
        st.error(str(error))
    except Exception as error:  # a bug: one line for the user, the traceback in the server log
        logger.exception("dashboard action failed")
        st.error(f"unexpected failure ({type(error).__name__}): {error}; the server log has the details")


# --- jobs ------------------------------------------------------------------------------------------


def describe_progress(progress: Mapping[str, Any] | None) -> str:
    """One line from a job's progress report: files, keys, bytes read, ETA, message."""
    if not progress:
        return "starting…"
    parts = []
    if progress.get("cached"):
        parts.append("from the cache, no file read")
    if progress.get("files"):
        parts.append(f"{progress['files']} files")
    if progress.get("keys_total"):
        parts.append(f"key {progress.get('keys_done', 0)} of {progress['keys_total']}")
    if progress.get("bytes"):
        parts.append(f"{progress['bytes'] / 2**20:.1f} MiB read")
    if progress.get("eta_s") is not None:
        parts.append(f"about {_duration(progress['eta_s'])} left")
    if progress.get("message"):
        parts.append(str(progress["message"]))
    return " · ".join(parts) or "working…"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def job_in_url(name: str) -> str | None:
    """The job id the URL names under ``name`` (``?analysis=…``), if any."""
    value = st.query_params.get(name)
    return value or None


def start_job(kind: str, params: Mapping[str, Any], url_name: str, heavy: bool = True) -> str:
    """Submit a background job (a heavy one waits for the running heavy job) and put its id in the URL."""
    job_id = jobs.submit(kind, params, heavy=heavy)
    st.query_params[url_name] = job_id
    return job_id


def job_panel(url_name: str, what: str) -> dict[str, Any] | None:
    """Follow the job named in the URL: progress while it runs; its record once it has ended (None before)."""
    job_id = job_in_url(url_name)
    if job_id is None:
        return None
    try:
        record = jobs.status(job_id)
    except OrthoMechaError as error:
        st.error(str(error))
        return None
    if record["state"] in jobs.FINISHED_STATES:
        _show_outcome(record, what)
        return record
    _poll(job_id, what)
    return None


def _show_outcome(record: Mapping[str, Any], what: str) -> None:
    if record["state"] == "failed":
        st.error(f"{what} failed: {record['error']}")
    elif record["state"] == "cancelled":
        st.warning(f"{what} was cancelled" + (f": {record['error']}" if record.get("error") else ""))


@st.fragment(run_every=POLL_S)
def _poll(job_id: str, what: str) -> None:
    record = jobs.status(job_id)
    if record["state"] in jobs.FINISHED_STATES:
        st.rerun(scope="app")
    progress = record.get("progress") or {}
    label = "waiting for another job to finish" if record["state"] == "queued" else describe_progress(progress)
    st.progress(min(max(float(progress.get("fraction") or 0.0), 0.0), 1.0), text=f"{what}: {label}")
    st.caption(f"job `{job_id}` · {record['state']}")
    if st.button("Cancel", key=f"cancel-{job_id}", icon=":material/cancel:"):
        with shown_errors():
            jobs.cancel(job_id)
            st.rerun(scope="app")


# --- the current analysis --------------------------------------------------------------------------

ANALYSIS_URL = "analysis"
MERGE_URL = "merge"
PREVIEW_URL = "preview"
SWEEP_URL = "sweep"


def remember_analysis(record: Mapping[str, Any]) -> None:
    """Keep a finished analysis job's parameters and report for the other pages."""
    st.session_state["analysis_job"] = record["id"]
    st.session_state["analysis_params"] = record["params"]
    st.session_state["report"] = record["result"]


def current_analysis() -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(parameters, report) of this session's analysis, else of the newest finished analysis job."""
    if "report" in st.session_state:
        return st.session_state["analysis_params"], st.session_state["report"]
    done = [r for r in jobs.list_jobs() if r["kind"] == "analyse" and r["state"] == "done"]
    if not done:
        return None
    remember_analysis(done[0])
    return done[0]["params"], done[0]["result"]


def loaded_analysis(params: Mapping[str, Any]) -> Any:
    """The :class:`~ortho_mecha.analysis.Analysis` of ``params``, from the analysis cache (no file read)."""
    key = json.dumps(params, sort_keys=True)
    memo = st.session_state.setdefault("_analyses", {})
    if key not in memo:
        from ortho_mecha.analysis import analyse

        memo.clear()
        memo[key] = analyse(params["base"], params["models"], params.get("delta_from") or {})
    return memo[key]


# --- the Mixer -------------------------------------------------------------------------------------


def set_mix(state: dict[str, Any]) -> None:
    """Replace the Mixer's state; its widgets get fresh keys so they show the new values."""
    previous = st.session_state.get("mix", {}).get("version", 0)
    st.session_state["mix"] = {**state, "version": previous + 1}


def option_widget(spec: OptionSpec, value: Any, key: str) -> Any:
    """The widget of one method option, built from its spec: checkbox, select box or bounded number input."""
    value = spec.default if value is None else value
    key = f"{key}_{spec.name}"
    if isinstance(spec.default, bool):
        return st.checkbox(spec.name, value=bool(value), help=spec.help, key=key)
    if spec.choices:
        index = spec.choices.index(value) if value in spec.choices else spec.choices.index(spec.default)
        return st.selectbox(spec.name, spec.choices, index=index, help=spec.help, key=key)
    low = None if spec.minimum is None or spec.exclusive else spec.minimum
    high = None if spec.maximum is None or spec.exclusive else spec.maximum
    if isinstance(spec.default, int):
        return st.number_input(spec.name, min_value=_int(low), max_value=_int(high), value=int(value), step=1,
                               help=spec.help, key=key)
    step = 0.05 if low is not None and high is not None and high - low <= 2 else 0.1
    return st.number_input(spec.name, min_value=low, max_value=high, value=float(value), step=step, format="%g",
                           help=f"{spec.help} · allowed {spec.range_text()}", key=key)


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


@dataclass(frozen=True)
class MixFigures:
    labels: list[str]
    survival: Any  # pd.DataFrame, one row per enabled row
    interference: Any  # np.ndarray, the rows' pairwise cosines


def mix_figures(
    analysis: tuple[dict[str, Any], dict[str, Any]], mix: Mapping[str, Any], choices: Any
) -> MixFigures | None:
    """Predicted survival and interference of the Mixer's enabled rows, from the cached analysis; None if none fit."""
    from ortho_mecha import workspace

    params, report = analysis
    if choices.path(mix["base"]) != Path(report["base"]).resolve():
        st.info("The analysis was made against another base; analyse with this base to see predicted figures.")
        return None
    rows = workspace.row_gram(loaded_analysis(params), mix["rows"], choices)
    if rows.missing:
        st.warning(
            f"Left out of the figures (model or delta-from not in the analysis): {', '.join(rows.missing)}; "
            "add them on the Analyse page."
        )
    if not rows.labels:
        return None
    survival, interference = workspace.mix_predictions(rows, mix["method"], mix["options"])
    return MixFigures(rows.labels, survival, interference)


# --- the Merge page --------------------------------------------------------------------------------


def restore_merged_plan(job_id: str) -> Any:
    """The plan a merge job merged (saved beside its output), made this session's plan; the Mixer shows it
    too when it has no state yet. For a page opened from a URL naming a merge job (a reload, a new tab)."""
    from ortho_mecha import workspace
    from ortho_mecha.plan import load_plan

    plan = load_plan(jobs.status(job_id)["params"]["plan"])
    st.session_state["plan"] = plan
    if "mix" not in st.session_state:
        set_mix(workspace.table_from_plan(plan, workspace.ModelChoices.scan()))
    return plan


def plan_forecast(plan: Any, out: Path) -> Any:
    """The dry-run :class:`~ortho_mecha.forecast.Forecast` of merging ``plan`` into ``out``, kept per plan and
    output for the session (it reads the inputs' headers and, once per process, measures this machine)."""
    key = (plan.to_json(), str(out))
    memo = st.session_state.setdefault("_forecasts", {})
    if key not in memo:
        from ortho_mecha.forecast import forecast

        memo.clear()
        memo[key] = forecast(plan, out)
    return memo[key]
