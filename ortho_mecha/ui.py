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

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st
from PIL import Image, ImageChops, ImageDraw

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
    """``st.navigation`` over :data:`PAGES` (paths taken from the app's folder, so any working directory works).

    Every page has its own address (``/analyse``, ``/mixer``, …); the app's root, a hidden page, opens the
    default one with the same query (Streamlit serves its default page at the root only, so a default
    page would answer its own address with "page not found").
    """
    pages = [st.Page(str(APP_DIR / page.path), title=page.title, icon=page.icon) for page in PAGES]
    start, spec = next((p, spec) for p, spec in zip(pages, PAGES, strict=True) if spec.default)

    def open_default_page() -> None:
        st.switch_page(start, query_params=st.query_params.to_dict())

    root = st.Page(open_default_page, title=spec.title, url_path=ROOT_PATH, default=True, visibility="hidden")
    return st.navigation([root, *pages])


ROOT_PATH = "root"  # the url path of navigation()'s hidden root page


def sign_in_navigation(address: str | None) -> Any:
    """``st.navigation`` for a session that has not given the password: at every page's address (the root's and
    each of :data:`PAGES`') the sign-in form, hidden from the menu. A Streamlit page is known by its address, so
    the rerun after signing in stays at the address the link named (``/mixer?mix=…``), now the page itself."""
    addresses = [ROOT_PATH, *(Path(page.path).stem for page in PAGES)]
    return st.navigation(
        [st.Page(lambda: sign_in(address), title="Sign in", url_path=path, default=path == ROOT_PATH)
         for path in addresses],
        position="hidden",
    )


@functools.cache
def page_icon() -> Image.Image:
    """The browser-tab icon: two overlapping discs, their overlap filled (a merge). Drawn here, so the tab
    asks no outside server for it (a material-symbol icon is fetched from fonts.gstatic.com)."""
    size = 64
    left, right = (4, 14, 44, 54), (20, 14, 60, 54)
    left_disc = Image.new("L", (size, size))
    ImageDraw.Draw(left_disc).ellipse(left, fill=255)
    right_disc = Image.new("L", (size, size))
    ImageDraw.Draw(right_disc).ellipse(right, fill=255)
    icon = Image.new("RGBA", (size, size))
    icon.paste((124, 77, 255, 255), mask=ImageChops.multiply(left_disc, right_disc))  # their overlap
    draw = ImageDraw.Draw(icon)
    for box in (left, right):
        draw.ellipse(box, outline=(124, 77, 255, 255), width=4)
    return icon


AUTHENTICATED = "authenticated"  # the session-state flag the sign-in sets


def gate_open() -> bool:
    """Whether this session may see the dashboard: bound to this machine only, or signed in."""
    return not security.password_required(st.get_option("server.address")) or bool(st.session_state.get(AUTHENTICATED))


def client_address() -> str:
    """The IP address of this session's browser, "localhost" when it is this machine (Streamlit gives None
    then; anything but text, e.g. under AppTest, counts the same)."""
    address = st.context.ip_address
    return address if isinstance(address, str) and address else "localhost"


def require_app() -> None:
    """Keep a page behind the app's password gate; call it first thing in every page.

    Streamlit runs the scripts of a folder named ``pages/`` beside the main script on their own (its
    legacy multipage mode) until some session has called ``st.navigation``: on a freshly started server, a
    link straight to ``/merge`` would run ``pages/merge.py`` without ``streamlit_app.py`` and its gate.
    This switches Streamlit to ``st.navigation`` mode (what ``st.navigation`` itself does, through the same
    internal flag), and a new session's first view of a page run on its own is run again, through the main
    script: with the gate closed that shows the sign-in at the page's address, query included, so the link
    (``/merge?merge=…``) opens its page once the password is given (a switch to the main script went to the
    root and dropped it); with the gate open the page gets the dashboard's page list (not Streamlit's plain
    list of the files). Only a session's first run: a rerun would drop a click. A later run with the gate
    closed (or any run under AppTest, which starts every run in the legacy mode) switches to the main
    script's sign-in.
    """
    from streamlit.runtime.pages_manager import PagesManager

    run_on_its_own = bool(PagesManager.uses_pages_directory)
    PagesManager.uses_pages_directory = False
    if run_on_its_own and not st.session_state.to_dict():
        st.rerun()
    if not gate_open():
        logger.warning("a page was asked for before the password was given; switching to the sign-in")
        st.switch_page(str(APP_DIR / "streamlit_app.py"))


def sign_in(address: str | None) -> None:
    """The sign-in form (or, with no password set on a LAN address, how to set one)."""
    try:
        password = security.configured_password(st.secrets)
        security.require_password_for_lan(address, password)
    except OrthoMechaError as error:
        st.error(str(error))
        return
    with st.form("login"):
        given = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        refused = security.attempt_sign_in(given, password, client_address())
        if refused is None:
            st.session_state[AUTHENTICATED] = True
            st.rerun()
        st.error(refused)


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
    """One line from a job's progress report: files, keys, signal SVDs, bytes read, ETA, message."""
    if not progress:
        return "starting…"
    parts = []
    if progress.get("cached"):
        parts.append("from the cache, no file read")
    if progress.get("files"):
        parts.append(f"{progress['files']} files")
    if progress.get("keys_total"):
        parts.append(f"key {progress.get('keys_done', 0)} of {progress['keys_total']}")
    if progress.get("signal_total"):
        parts.append(f"SVD signal {progress.get('signal_done', 0)} of {progress['signal_total']}")
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


def followed_job(name: str) -> str | None:
    """:func:`job_in_url`, and when the URL names none — back from another page, whose links drop this page's
    query — the job this session last followed under ``name``, put back into the URL."""
    remembered = f"followed_job_{name}"
    job_id = job_in_url(name)
    if job_id is None and st.session_state.get(remembered):
        job_id = st.session_state[remembered]
        st.query_params[name] = job_id
    st.session_state[remembered] = job_id
    return job_id


def start_job(kind: str, params: Mapping[str, Any], url_name: str, heavy: bool = True) -> str:
    """Submit a background job (a heavy one waits for the running heavy job) and put its id in the URL."""
    job_id = jobs.submit(kind, params, heavy=heavy)
    st.query_params[url_name] = job_id
    return job_id


def job_panel(url_name: str, what: str) -> dict[str, Any] | None:
    """Follow the job named in the URL (or last followed here, :func:`followed_job`): progress while it runs;
    its record once it has ended (None before)."""
    job_id = followed_job(url_name)
    if job_id is None:
        return None
    try:
        record = job_record(url_name, job_id)
    except OrthoMechaError as error:
        st.error(str(error))
        return None
    if not _inside_roots(record):
        st.error(f"job `{job_id}` read model files outside the allowed model folders; it is not shown here")
        return None
    if record["state"] in jobs.FINISHED_STATES:
        _show_outcome(record, what)
        return record
    _poll(job_id, what)
    return None


def job_record(url_name: str, job_id: str) -> dict[str, Any]:
    """The record of the job ``job_id``, named in the URL under ``url_name``; an error for an id that names no job,
    or a job of another kind than that name's (an analysis's id in ``?merge=``)."""
    record = jobs.status(job_id)
    kind = URL_KINDS[url_name]
    if record["kind"] != kind:
        raise OrthoMechaError(f"job `{job_id}` is not {_a(kind)} job but {_a(record['kind'])} one: open it on its "
                              "own page")
    return record


def _a(kind: str) -> str:
    """A job kind with its article: "an analyse", "a merge"."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _inside_roots(record: Mapping[str, Any]) -> bool:
    """Whether every model file an analysis or merge job read lies under the allowed folders or the dashboard's
    merges (a job of another configuration, over other folders, is not shown: a shared cache, or roots narrowed
    since). A file deleted since still counts where it was."""
    params = record["params"]
    try:
        if record["kind"] == "analyse":
            files = [params["base"], *params["models"], *(params.get("delta_from") or {}).values()]
        elif record["kind"] == "merge":
            from ortho_mecha.merge import job_plan

            files = job_plan(params).input_files()
        else:
            return True
    except (OrthoMechaError, KeyError, TypeError):  # parameters of no such job: nothing of it is shown
        return False
    from ortho_mecha import workspace

    roots = [*security.allowed_roots(), workspace.merges_dir()]  # the dashboard's merges are inputs too
    return all(security.inside_roots(path, roots) for path in files)


def merging_into(job_id: str | None) -> str | None:
    """The output file name of the merge job ``job_id`` while it is queued or running; None otherwise."""
    if job_id is None:
        return None
    try:
        record = job_record(MERGE_URL, job_id)
    except OrthoMechaError:
        return None
    return None if record["state"] in jobs.FINISHED_STATES else Path(record["params"]["out"]).name


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
LORA_URL = "lora"
MIX_URL = "mix"  # the Mixer's plan, kept by workspace.remember_mix
MIX_NOTICE = "mix_notice"  # what Auto-fill or Optimize rows changed, shown once by show_mix_notice
URL_KINDS = {ANALYSIS_URL: "analyse", MERGE_URL: "merge", PREVIEW_URL: "preview", SWEEP_URL: "sweep",
             LORA_URL: "extract-lora"}  # the job kind each URL name follows


LEFT_OUT_SHOWN = 3  # left-out models said one by one; more are listed in one folded warning


def left_out_warnings(problems: Sequence[str]) -> None:
    """The models an analysis left out, each with its reason: a warning each, or, when there are many (a folder
    of another model's files still selected), one warning and the list folded under it."""
    if len(problems) <= LEFT_OUT_SHOWN:
        for problem in problems:
            st.warning(f"left out of the analysis: {problem}")
        return
    st.warning(f"{len(problems)} models were left out of the analysis; the reasons are listed below")
    with st.expander(f"The {len(problems)} models left out"):
        st.text("\n".join(problems))  # plain text: file names are not Markdown


def remember_analysis(record: Mapping[str, Any]) -> None:
    """Keep a finished analysis job's parameters and report for the other pages."""
    st.session_state["analysis_job"] = record["id"]
    st.session_state["analysis_params"] = record["params"]
    st.session_state["report"] = record["result"]


def say_if_changed(report: Mapping[str, Any], params: Mapping[str, Any] | None) -> None:
    """Warn when files a finished analysis read have changed since (its ``fingerprints``): its figures are of the
    files as they were. With the analysis job's ``params``, a button runs it again (the analysis cache keeps
    the unchanged files quick); without, the warning points to the Analyse page."""
    from ortho_mecha import workspace

    changed = workspace.changed_files(report.get("fingerprints", {}), st.session_state.setdefault("_seen_files", {}))
    if not changed:
        return
    where = "" if params is not None else " Analyse them again on the Analyse page."
    st.warning(f"Changed since this analysis read them: {', '.join(Path(p).name for p in changed)}. The figures "
               f"shown are of the files as they were.{where}")
    if params is not None and st.button("Analyse again", icon=":material/refresh:", key="analyse_again"):
        with shown_errors():
            start_job("analyse", params, ANALYSIS_URL)
            st.rerun()


def written_by_followed(url_name: str, path: Path) -> bool:
    """Whether ``path`` is the output of the job this page follows under ``url_name`` (a merge's, a LoRA
    extraction's): just written, so no warning that it exists."""
    job_id = job_in_url(url_name)
    if job_id is None:
        return False
    try:
        record = job_record(url_name, job_id)
    except OrthoMechaError:
        return False
    result = (record.get("result") or {}) if record["state"] == "done" else {}
    output = result.get("output") or result.get("out")
    return output is not None and Path(output).resolve() == path.resolve()


def say_other_lineage(report: Mapping[str, Any]) -> None:
    """Warn of each analysed model of another lineage than the base (:func:`ortho_mecha.lineage.other_lineage`)."""
    from ortho_mecha.lineage import other_lineage, other_lineage_note

    for i, change in other_lineage(report).items():
        st.warning(f"{Path(report['models'][i]).name}: {other_lineage_note(change)}; the Mixer's auto-fill turns it "
                   "off.")


def say_just_written(target: Path, replace: bool) -> None:
    """Say that ``target`` is the file the job below just wrote, which is why its name cannot be used again, and
    propose the next free name (with ``replace``: or the page's 'Replace an existing file')."""
    from ortho_mecha import workspace

    free = workspace.free_output_name(target.parent, re.sub(r"-\d+$", "", target.stem))
    remedy = ", or tick 'Replace an existing file'" if replace else ""
    st.info(f"`{target.name}` is the file just written (below). For another one, choose a new name, e.g. "
            f"`{free}`{remedy}.")


def model_choices(roots: tuple[Path, ...] | None = None) -> Any:
    """:meth:`ModelChoices.scan <ortho_mecha.workspace.ModelChoices.scan>` of ``roots`` (default: the allowed
    roots), with a warning naming each file left out for a name a browser cannot carry."""
    from ortho_mecha import workspace

    choices = workspace.ModelChoices.scan(roots)
    for name in choices.unnamed:
        st.warning(f"{name}: left out, as its file name is not valid UTF-8 (a browser can neither show nor send it "
                   "back); rename the file to use it")
    if choices.outside:
        shown = ", ".join(str(p) for p in choices.outside[:3]) + (", …" if len(choices.outside) > 3 else "")
        st.warning(f"{len(choices.outside)} link(s) under the model folders point outside them and are left out "
                   f"({shown}): a link may only lead inside the allowed folders; to use those models, start the "
                   "dashboard with ORTHO_MECHA_ROOTS naming their folders too")
    return choices


def current_analysis(choices: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(parameters, report) of this session's analysis, else of the newest finished analysis job whose files are
    all among ``choices`` (a :class:`~ortho_mecha.workspace.ModelChoices`: under the allowed roots)."""
    if "report" in st.session_state:
        return st.session_state["analysis_params"], st.session_state["report"]
    done = [r for r in jobs.list_jobs() if r["kind"] == "analyse" and r["state"] == "done"
            and choices.holds(r["params"]["base"], *r["params"]["models"])]
    if not done:
        return None
    remember_analysis(done[0])
    return done[0]["params"], done[0]["result"]


def _kept(name: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in the session under ``name`` for ``key``: the latest key only (a page asks again for the
    same thing on every rerun, and seldom goes back to an older one)."""
    memo = st.session_state.setdefault(name, {})
    if key not in memo:
        memo.clear()
        memo[key] = compute()
    return memo[key]


def loaded_analysis(params: Mapping[str, Any]) -> Any:
    """The :class:`~ortho_mecha.analysis.Analysis` of ``params``, from the analysis cache (no file read)."""
    from ortho_mecha.analysis import analyse

    return _kept("_analyses", json.dumps(params, sort_keys=True),
                 lambda: analyse(params["base"], params["models"], params.get("delta_from") or {}))


# --- the Mixer -------------------------------------------------------------------------------------


def first_mix(choices: Any, analysis: tuple[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The Mixer's state in a new session: the plan its URL names (a reload, a shared link), else the auto-fill's
    rows for the analysis shown (one row per model), else an empty table."""
    from ortho_mecha import workspace

    if (mix_id := st.query_params.get(MIX_URL)) is not None:
        try:
            return workspace.table_from_plan(workspace.recall_mix(mix_id, choices), choices)
        except OrthoMechaError as error:  # a file of the linked plan went away, say: the table starts afresh
            st.error(f"The plan this page's link names cannot be shown, so the table starts from the analysis "
                     f"(or empty) instead: {error}")
    state = {"base": choices.default_base(), "rows": [], "method": "ortho_superpose", "options": {}, "texture": None,
             "analysis": st.session_state.get("analysis_job") if analysis is not None else None}
    if analysis is not None:
        with shown_errors():
            state["base"] = choices.label(analysis[1]["base"])
            try:  # the auto-fill (DESIGN §4): parents as delta-froms, redundant rows off, each with its reason
                filled = workspace.optimized_mix(analysis[1], state["method"], state, choices, search=False)
                state["rows"] = filled["rows"]
            except OrthoMechaError:  # nothing to merge (every model null or refused): the rows as analysed
                state["rows"] = workspace.table_rows_from_report(analysis[1], choices)
    return state


def remember_mix(plan: Any) -> None:
    """Keep the Mixer's valid plan and name it in the URL, so a reload or a copied link shows it again. The
    cache is written once per plan a session shows, not on each of the Mixer's reruns."""
    from ortho_mecha import workspace

    kept = st.session_state.get("_kept_mix")
    with shown_errors():
        if kept is None or kept[0] != plan:
            kept = st.session_state["_kept_mix"] = (plan, workspace.remember_mix(plan))
        st.query_params[MIX_URL] = kept[1]


def set_mix(state: dict[str, Any], notice: str | None = None) -> None:
    """Replace the Mixer's state; its widgets get fresh keys so they show the new values. ``notice``: a line
    :func:`show_mix_notice` shows once, on the Mixer's next run (what a button changed)."""
    previous = st.session_state.get("mix", {}).get("version", 0)
    st.session_state["mix"] = {**state, "version": previous + 1}
    if notice:
        st.session_state[MIX_NOTICE] = notice


def show_mix_notice() -> None:
    """The notice :func:`set_mix` left, once."""
    if notice := st.session_state.pop(MIX_NOTICE, None):
        st.info(notice, icon=":material/info:")


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


def components_panel(mix: Mapping[str, Any], choices: Any, base: str) -> dict[str, dict[str, Any]]:
    """The Mixer's "Text encoders" box when ``base`` is a full checkpoint: per component, where it comes from
    (:mod:`ortho_mecha.components`); the choices as ``components.from_table`` takes them ({} otherwise)."""
    from ortho_mecha import components
    from ortho_mecha.plan import METHODS

    carried: dict = {}
    with shown_errors():
        carried = components.base_components(choices.path(base))
    chosen_components: dict[str, dict[str, Any]] = {}
    if not carried:
        return chosen_components
    labels = choices.labels
    with st.container(border=True):
        st.markdown("**Text encoders**")
        st.caption("The base is a full checkpoint: choose where each of its text encoders and its VAE come from. "
                   "'merge with the plan' treats it like the diffusion model; 'own merge' merges the rows' deltas "
                   "on it with its own method and alpha (empty: the plan's).")
        method_choices = [None, *METHODS]
        for name in carried:
            now = (mix.get("components") or {}).get(name) or {}
            key = f"mix_te_{mix['version']}_{name}"
            source_column, model_column, te_method_column, alpha_column = st.columns([2, 3, 2, 1])
            sources = [components.PLAN, *components.SOURCES]
            source = source_column.selectbox(
                f"{components.LABELS[name]} ({name})", sources, format_func=components.SOURCE_LABELS.get,
                index=sources.index(now.get("source") or components.PLAN), key=f"{key}_source")
            entry = {"source": source}
            if source == "model":
                entry["model"] = model_column.selectbox(
                    "from model", labels, index=labels.index(now["model"]) if now.get("model") in labels else None,
                    placeholder="pick a model", key=f"{key}_model")
            if source == "merge":
                entry["method"] = te_method_column.selectbox(
                    "method", method_choices, index=method_choices.index(now.get("method")),
                    format_func=lambda m: "the plan's" if m is None else m, key=f"{key}_method")
                entry["alpha"] = alpha_column.number_input(
                    "alpha", min_value=0.0, value=now.get("alpha"), step=0.05, placeholder="plan's", key=f"{key}_alpha")
            chosen_components[name] = entry
    return chosen_components


def block_alphas_panel(mix: Mapping[str, Any], rows: list[dict[str, Any]], choices: Any, base: str) -> None:
    """The Mixer's "Block alphas" section: a row, a preset, each block group's alpha, and every row's alpha per
    group as a chart (:mod:`ortho_mecha.blocks`)."""
    from ortho_mecha import blocks, workspace
    from ortho_mecha.plan import ALPHA_RANGE

    with shown_errors():
        layout = blocks.base_layout(choices.path(base))
        numbered = [i for i, row in enumerate(rows) if row.get("model")]
        if not layout.groups or not numbered:
            st.info("Add rows first; each row's alpha can then differ by block group of the base's architecture.")
            return
        st.caption(f"{layout.arch} groups: {', '.join(layout.groups)}. A group's alpha replaces the row's alpha on "
                   "that group's keys; empty means the row's alpha. Presets scale the row's alpha per group.")
        pick, preset_column, apply_column = st.columns([2, 1, 1], vertical_alignment="bottom")
        index = pick.selectbox("Row", numbered, format_func=lambda i: f"{i + 1}: {rows[i]['model']}",
                               key="mix_block_row")
        preset = preset_column.selectbox("Block preset", list(blocks.PRESETS), key="mix_block_preset",
                                         help=" · ".join(f"{name}: {text}" for name, text in blocks.PRESETS.items()))
        if apply_column.button("Apply preset", key="mix_block_apply", width="stretch"):
            set_mix(workspace.with_block_preset(mix, index, preset, layout))
            st.rerun()
        current = layout.check(blocks.parse_cell(rows[index].get("block_alphas")), f"row {index + 1}", *ALPHA_RANGE)
        edited_alphas = {}
        for column, group in zip(st.columns(min(len(layout.groups), 6)) * len(layout.groups), layout.groups,
                                 strict=False):
            value = column.number_input(group, min_value=ALPHA_RANGE[0], max_value=ALPHA_RANGE[1],
                                        value=current.get(group), step=0.05, format="%.2f", placeholder="row alpha",
                                        key=f"mix_block_{mix['version']}_{index}_{group}")
            if value is not None:
                edited_alphas[group] = value
        if edited_alphas != current:
            set_mix(workspace.with_block_alphas(mix, index, edited_alphas))
            st.rerun()
        st.altair_chart(blocks.alpha_chart(workspace.block_alpha_frame(rows, layout), layout.groups), width="content")

def mix_rows(analysis: tuple[dict[str, Any], dict[str, Any]], mix: Mapping[str, Any], choices: Any) -> Any:
    """The :class:`~ortho_mecha.workspace.RowGram` of the Mixer's enabled rows from the cached analysis; None
    when the analysis was made against another base."""
    from ortho_mecha import workspace

    params, report = analysis
    if choices.path(mix["base"]) != Path(report["base"]).resolve():
        return None
    return workspace.row_gram(loaded_analysis(params), mix["rows"], choices)


def method_comparison(analysis: tuple[dict[str, Any], dict[str, Any]], mix: Mapping[str, Any], choices: Any) -> None:
    """Every method's predicted survival and interference for the Mixer's rows (:mod:`ortho_mecha.compare`):
    the per-method summary, the grouped survival chart and the survival per row and method."""
    from ortho_mecha import charts, compare

    rows = mix_rows(analysis, mix, choices)
    if rows is None or not rows.labels:
        st.info("No enabled row of the analysed models against this base to compare the methods on.")
        return
    result = compare.compare_rows(rows, mix["method"], mix["options"])
    interference = round(result.row_interference, 3) + 0.0  # no "-0.000"
    st.caption(f"The rows themselves: orthogonality {result.orthogonality:.3f} (mean 1 − cos² over pairs), "
               f"interference in a plain sum {interference:+.3f}. Each method at its default options, "
               f"**{mix['method']}** (outlined) at yours; pale bars are estimates, the others exact.")
    numbers = ["mean survival", "min survival", "interference", "norm ratio", *result.summary["method"]]
    three_places = {name: st.column_config.NumberColumn(name, format="%.3f") for name in numbers}
    st.dataframe(result.summary, hide_index=True, column_config=three_places)
    st.container(key="mix_compare").altair_chart(charts.survival_bars(result.rows), width="stretch")
    st.dataframe(result.survival_table(), hide_index=True, column_config=three_places)


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

    rows = mix_rows(analysis, mix, choices)
    if rows is None:
        st.info("The analysis was made against another base; analyse with this base to see predicted figures.")
        return None
    if rows.missing:
        st.warning(
            f"Left out of the figures (model or delta-from not in the analysis): {', '.join(rows.missing)}; "
            "add them on the Analyse page."
        )
    if not rows.labels:
        return None
    texture = bool((mix.get("texture") or {}).get("model"))
    survival, interference = workspace.mix_predictions(rows, mix["method"], mix["options"], texture)
    return MixFigures(rows.labels, survival, interference)


def say_lost_rows(survival: Any) -> None:
    """Warn of the rows the mix would carry (almost) nothing of (:func:`~ortho_mecha.workspace.lost_rows`)."""
    from ortho_mecha import workspace

    lost = workspace.lost_rows(survival)
    if silent := [Path(model).stem for model, _, alpha in lost if alpha == 0]:
        st.warning(f"{', '.join(silent)}: enabled at alpha 0, so the mix carries nothing of it; give it an alpha "
                   "(auto-fill sets 0 on the rows it turns off).")
    if cancelled := [(model, value) for model, value, alpha in lost if alpha != 0]:
        st.warning("This mix carries almost nothing of " + ", ".join(
            f"{Path(model).stem} (survival {round(value, 2) + 0.0:.2f})" for model, value in cancelled)
            + ": rows that oppose each other cancel (see Info); turn one of them off or lower its alpha.")


def say_repeat_scales(method: str, survival: Any) -> None:
    """Where a row's repeat scales its delta (ortho_superpose, ortho_project, add_difference), say that a row at
    repeat 2 is carried about twice: auto-fill gives repeat 2 to rows of new information, which surprised users
    of other tools, who expect a model's own strength."""
    from ortho_mecha.plan import METHODS

    if method in METHODS and METHODS[method].repeat == "scale" and method != "weighted_sum" and (
            survival["repeat"] > 1).any():
        st.caption("Survival is the share of a row's own change that the merge carries: a row at repeat 2 (auto-fill's "
                   "mark of new information) is carried about twice; set repeat 1 for a model's own strength.")


def latest_merge(choices: Any) -> str | None:
    """The label of the newest merge's output: the merge job the URL names when it is done, else the newest
    finished merge job's; None when there is none whose output is still a model file under the roots."""
    named = job_in_url(MERGE_URL)
    records = [r for r in jobs.list_jobs() if r["kind"] == "merge" and r["state"] == "done"]
    records.sort(key=lambda record: record["id"] != named)  # the URL's job first, then newest first
    for record in records:
        try:
            return choices.label(record["result"]["output"])
        except OrthoMechaError:  # moved, deleted or outside the roots now: try the next one
            continue
    return None


def extract_lora_panel(choices: Any, base: str) -> None:
    """The Mixer's "Extract LoRA": model (default the latest merge), base (default the Mixer's), rank, output
    name; starts an ``extract-lora`` job named in the URL and shows its progress and result."""
    from ortho_mecha import workspace

    labels = choices.labels
    latest = latest_merge(choices)
    left, middle = st.columns(2)
    model = left.selectbox("Model to extract", labels, index=labels.index(latest) if latest else None,
                           placeholder="choose the merged model", key=f"lora_model_{latest}",
                           help="the difference of this model from the base becomes the LoRA")
    lora_base = middle.selectbox("Its base", labels, index=labels.index(base), key=f"lora_base_{base}")
    left, middle, right = st.columns([1, 3, 1], vertical_alignment="bottom")
    rank = left.number_input("Rank", min_value=1, value=workspace.LORA_RANK, step=1, key="lora_rank",
                             help="LoRA rank, clamped per key to the smaller side of the matrix")
    stem = Path(model).stem if model else "merged"
    name = middle.text_input("LoRA file name", value=f"{stem}-lora.safetensors", key=f"lora_name_{stem}",
                             help=f"written to {workspace.loras_dir()}; letters, digits, '.', '_', '-' and spaces")
    params = None  # said as the fields change, as the Merge page does: a bad or taken name, the base as the model
    with shown_errors():
        if model is not None:
            target = workspace.loras_dir() / security.validate_output_name(name)
            if written_by_followed(LORA_URL, target):
                say_just_written(target, replace=False)
            else:
                params = workspace.lora_job_params(model, lora_base, int(rank), name, choices)
    if right.button("Extract LoRA", icon=":material/compress:", key="lora_start", disabled=params is None) and params:
        start_job("extract-lora", params, LORA_URL)
        st.rerun()
    record = job_panel(LORA_URL, "LoRA extraction")
    if record is not None and record["state"] == "done":
        result = record["result"]
        st.success(f"wrote {result['out']}")
        columns = st.columns(3)
        columns[0].metric("energy kept (matrix keys)", f"{result['energy_kept']:.2%}")
        columns[1].metric("energy kept (all keys)", f"{result['energy_kept_all']:.2%}")
        columns[2].metric("keys in the LoRA", len(result["keys"]))
        st.caption("\n\n".join(result["summary"][1:]))
        st.dataframe(workspace.lora_key_frame(result), hide_index=True,
                     column_config={"energy kept": st.column_config.ProgressColumn("energy kept", format="percent")})


# --- the Merge page --------------------------------------------------------------------------------


def job_params(url_name: str, job_id: str) -> dict[str, Any] | None:
    """The parameters of the job ``job_id`` named under ``url_name``; None for an id that names no job of that
    kind, or a job over files outside the allowed folders, which the page's :func:`job_panel` says (once)."""
    try:
        record = job_record(url_name, job_id)
    except OrthoMechaError:
        return None
    return record["params"] if _inside_roots(record) else None


def restore_merged_plan(job_id: str) -> Any:
    """The plan a merge job merged (kept in the job's parameters), made this session's plan; the Mixer shows it
    too when it has no state yet. For a page opened from a URL naming a merge job (a reload, a new tab). None for
    an id that names no job: the page's job panel says so (once)."""
    from ortho_mecha import workspace
    from ortho_mecha.merge import job_plan

    params = job_params(MERGE_URL, job_id)
    if params is None:
        return None
    plan = job_plan(params)
    st.session_state["plan"] = plan
    st.session_state.setdefault("merge_name", Path(params["out"]).name)  # the name field as the job had it
    if "mix" not in st.session_state:
        set_mix(workspace.table_from_plan(plan, model_choices()))
    return plan


def connect_comfy(api: str, folder: str) -> tuple[str, str | None]:
    """:func:`ortho_mecha.preview_job.connect`, with a spinner while ComfyUI is asked (a busy one answers late)."""
    from ortho_mecha import preview_job

    with st.spinner(f"Checking ComfyUI at {api.strip() or 'its default address'} …"):
        return preview_job.connect(api, folder)


def check_plan_inputs(plan: Any) -> None:
    """Raise what ``merge`` would say of ``plan``'s input files (a row of another architecture than the base,
    keys of other shapes, a file sd-mecha cannot merge), as ``merge --dry-run`` does; the outcome is kept per plan
    for the session (it reads every input's header)."""
    from ortho_mecha.merge import check_plan_inputs as check

    def refusal() -> OrthoMechaError | None:
        try:
            check(plan)
        except OrthoMechaError as error:
            return error
        return None

    if (error := _kept("_input_checks", plan.to_json(), refusal)) is not None:
        raise error


def plan_forecast(plan: Any, out: Path) -> Any:
    """The dry-run :class:`~ortho_mecha.forecast.Forecast` of merging ``plan`` into ``out`` after the input checks
    of :func:`check_plan_inputs`, kept per plan and output for the session (it reads the inputs' headers and, once
    per process, measures this machine)."""
    from ortho_mecha.forecast import forecast

    check_plan_inputs(plan)
    return _kept("_forecasts", (plan.to_json(), str(out)), lambda: forecast(plan, out))
