"""The dashboard under Streamlit's AppTest: every page from ``ui.PAGES``, the gate, errors, analyse → mix → merge
→ sweep.

Jobs run as the real app runs them, in detached worker processes; the tests poll like the page does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from ortho_mecha import ui
from tests.comfy_stub import ComfyStub, comfy_stub_fixture  # noqa: F401 - the comfy_stub fixture
from tests.modelgen import write_family_files

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
WAIT_S = 120


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("ORTHO_MECHA_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(tmp_path / "workspace"))
    monkeypatch.delenv("ORTHO_MECHA_PASSWORD", raising=False)
    previous = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield tmp_path / "workspace"
    config.set_option("server.address", previous)


def _app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=WAIT_S)


def _charts(at: AppTest) -> list:
    return list(at.get("vega_lite_chart"))


def _until(at: AppTest, done, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done(at):
        assert not at.exception, at.exception
        assert time.monotonic() < deadline, f"timed out waiting for {what}; errors: {[e.value for e in at.error]}"
        time.sleep(0.5)
        at.run()


def _errors(at: AppTest) -> list[str]:
    return [element.value for element in at.error]


def test_pages_are_the_ones_the_app_navigates() -> None:
    assert [page.title for page in ui.PAGES] == ["Analyse", "Mixer", "Merge", "Preview"]
    assert [page.default for page in ui.PAGES] == [True, False, False, False]
    for page in ui.PAGES:
        assert (Path(APP).parent / page.path).is_file()


@pytest.mark.slow
def test_every_page_renders_and_the_round_trip_merges(
    workspace: Path, comfy_stub: ComfyStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _app().run()
    assert not at.exception
    assert at.title[0].value == "Analyse"
    # First start: the demo family was written and its analysis started as a job named in the URL.
    assert (workspace / "models" / "demo" / "base.safetensors").is_file()
    assert len(at.query_params["analysis"]) == 32
    _until(at, lambda a: len(_charts(a)) >= 3, "the analysis heatmaps")
    assert not _errors(at)
    assert at.selectbox(key="an_base").value == "models/demo/base.safetensors"
    assert len(at.multiselect(key="an_models").value) == 7
    labels = [tab.label for tab in at.tabs]
    for label in ["Similarity", "Quality", "Lineage", "Model map", "Outliers", "Validation", "cosine similarity",
                  "new information", "conflict ratio"]:
        assert label in labels

    at.switch_page(ui.PAGES[1].path).run()
    assert not at.exception and not _errors(at)
    assert at.title[0].value == "Mixer"
    methods = at.selectbox(key="mix_method_1")
    assert "ortho_superpose" in methods.options
    assert any("survival" in str(frame.value.columns) for frame in at.dataframe)
    filled = at.session_state["plan"]  # the auto-fill's rows (DESIGN §4): parents, duplicates off, with reasons
    assert len(filled.rows) == 7 and len(filled.enabled_rows) < 7 and all(row.info for row in filled.rows)
    assert any("duplicate" in row.info for row in filled.rows if not row.enabled)
    v2 = next(row for row in filled.rows if row.model.name == "anime_v2.safetensors")
    assert v2.delta_from is not None and v2.delta_from.name == "anime.safetensors" and "its parent" in v2.info
    at.button(key="mix_autofill").click().run()
    assert at.session_state["plan"] == filled
    assert [i.value for i in at.info if "Auto-fill" in i.value] == ["Auto-fill: no change, the rows already are what "
                                                                     "it proposes."]  # the click did something
    assert any("carried about twice" in caption.value for caption in at.caption)  # its rows at repeat 2
    lost = [w.value for w in at.warning if w.value.startswith("This mix carries almost nothing of ")]
    assert len(lost) == 1 and "anime (survival" in lost[0] and "anime_opposite (survival" in lost[0]  # they cancel
    # The optimizer fills the rows from the analysis, a reason per row; the same report gives the same rows.
    at.button(key="mix_optimize").click().run()
    assert not at.exception and not _errors(at)
    optimized = at.session_state["plan"]
    assert all(row.info for row in optimized.rows)
    assert len(optimized.enabled_rows) < 7  # the demo's near-duplicate (and the merge of two) are left out
    assert any("duplicate" in row.info for row in optimized.rows if not row.enabled)
    at.button(key="mix_optimize").click().run()
    assert at.session_state["plan"] == optimized
    assert any(i.value.startswith("Optimize rows: no change") for i in at.info)
    at.text_input(key="mix_preset_name").set_value("bad/name").run()
    at.button(key="mix_save").click().run()
    assert any("preset name" in error for error in _errors(at))
    at.text_input(key="mix_preset_name").set_value("demo mix").run()
    at.button(key="mix_save").click().run()
    assert (workspace / "plans" / "demo mix.json").is_file()

    at.switch_page(ui.PAGES[2].path).run()
    assert at.title[0].value == "Merge"
    at.text_input(key="merge_name").set_value("../escape").run()
    said = [e for e in _errors(at) if "must be a file name" in e or "must not contain" in e]
    assert len(said) == 1 and at.button(key="merge_start").disabled  # said once, and nothing to click
    own = workspace / "merges" / "own.safetensors"  # a row that is an earlier merge, and the name typed is its
    own.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(optimized.enabled_rows[0].model, own)
    at.session_state["plan"] = replace(optimized, rows=(replace(optimized.rows[0], model=own), *optimized.rows[1:]))
    at.text_input(key="merge_name").set_value("own").run()
    assert any("own.safetensors is one of the plan's inputs" in w.value for w in at.warning)
    assert at.button(key="merge_start").disabled
    at.session_state["plan"] = optimized
    own.unlink()
    at.text_input(key="merge_name").set_value("round trip").run()
    at.button(key="merge_start").click().run()
    assert not _errors(at)
    _until(at, lambda a: any("written" in s.value for s in a.success), "the merge")
    assert (workspace / "merges" / "round trip.safetensors").is_file()
    assert [b.label for b in at.get("download_button")] == ["Download recipe (.mecha)", "Download script (.py)"]
    assert any("measured" in str(frame.value.columns) for frame in at.dataframe)
    assert any("Dry-run forecast for `round trip.safetensors`" in caption.value for caption in at.caption)
    at.run()  # the form, seen again, knows the name is taken now: no Merge over the file just written
    assert at.button(key="merge_start").disabled
    assert not any("exists already" in warning.value for warning in at.warning)  # it is the one just written,
    assert any(info.value == "`round trip.safetensors` is the file just written (below). For another one, choose a "
               "new name, e.g. `round trip-2.safetensors`, or tick 'Replace an existing file'." for info in at.info)
    at.text_input(key="merge_name").set_value("merged.safetensors").run()
    assert not at.button(key="merge_start").disabled

    # A URL naming no job says so once (the plan's restore and the job panel both said it)
    for page, url_name in ((ui.PAGES[2], "merge"), (ui.PAGES[0], "analysis")):
        stray = _app()
        stray.query_params[url_name] = "../../etc/passwd"
        stray.switch_page(page.path).run()
        assert not stray.exception and len(_errors(stray)) == 1, (url_name, _errors(stray))

    # A new session opened on the job's URL (a reload) shows the plan that job merged, not "make a plan first".
    reloaded = _app()
    reloaded.query_params["merge"] = at.query_params["merge"]
    reloaded.switch_page(ui.PAGES[2].path).run()
    assert not reloaded.exception and not _errors(reloaded)
    assert not any("Make a plan" in info.value for info in reloaded.info)
    assert reloaded.session_state["plan"] == optimized
    # the name field as the job had it (it read merged.safetensors above the result for round trip.safetensors)
    assert reloaded.text_input(key="merge_name").value == "round trip.safetensors"
    assert any(info.value.startswith("`round trip.safetensors` is the file just written") for info in reloaded.info)
    assert any("written" in s.value for s in reloaded.success)

    # Back from another page, whose links drop the page's query: the merge this session followed shows again.
    at.switch_page(ui.PAGES[1].path).run()
    at.query_params.pop("merge", None)
    at.switch_page(ui.PAGES[2].path).run()
    assert any("written" in s.value for s in at.success)
    assert at.query_params.get("merge") == reloaded.query_params["merge"]

    # Preview: an alpha sweep of the Mixer's plan through the stand-in ComfyUI, as a job, ends in the grid.
    monkeypatch.setenv("COMFYUI_API", comfy_stub.url)
    monkeypatch.setenv("COMFYUI_DIR", str(comfy_stub.root))
    shutil.copy(workspace / "merges" / "round trip.safetensors", workspace / "merges" / "an older one.safetensors")
    at.switch_page(ui.PAGES[3].path).run()
    assert not at.exception and not _errors(at)
    assert at.title[0].value == "Preview"
    picked = at.selectbox(key="pv_model")
    assert {"merges/an older one.safetensors", "merges/round trip.safetensors"} <= set(picked.options)
    assert any(option.startswith("models/") for option in picked.options)  # the inputs too, to compare with
    assert picked.value == "merges/round trip.safetensors"  # the merge just made, not the first name
    assert at.selectbox(key="pv_arch").value == "auto"
    captions = [c.value for c in at.caption]
    assert "Architecture: flux1, from its keys" in captions  # the demo merge's
    assert "Architecture: flux1, from the base's keys" in captions  # the swept plan's
    assert at.selectbox(key="sw_plan").value == "the Mixer's plan"
    at.text_input(key="sw_alphas").set_value("abc").run()  # said at once, before ComfyUI is asked anything
    assert any("alphas are numbers separated by commas" in error for error in _errors(at))
    assert at.button(key="sw_start").disabled and not comfy_stub.received
    at.text_input(key="sw_alphas").set_value("0,1")
    at.text_input(key="sw_name").set_value("two").run()
    at.button(key="sw_start").click().run()
    assert not _errors(at)
    _until(at, lambda a: a.get("image"), "the sweep grid")
    assert (workspace / "merges" / "sweeps" / "two" / "two_sweep.png").is_file()
    assert len(comfy_stub.received) == 2


def test_a_bad_job_id_in_the_url_is_an_error_message(workspace: Path) -> None:
    at = _app()
    at.query_params["analysis"] = "../../etc/passwd"
    at.run()
    assert not at.exception
    assert any("is not a job id" in error for error in _errors(at))


def test_a_job_over_files_outside_the_allowed_folders_is_not_shown(workspace: Path, tmp_path: Path) -> None:
    # a shared cache, or roots narrowed since: another configuration's jobs read files this one may not show
    from ortho_mecha import jobs

    paths = write_family_files(tmp_path / "elsewhere", "flux", "fp16", members=["base", "anime"])
    analysis = jobs.submit("analyse", {"base": str(paths["base"]), "models": [str(paths["anime"])]})
    plan = {"base": str(paths["base"]), "method": "weighted_sum", "rows": [{"model": str(paths["anime"])}]}
    merge = jobs.submit("merge", {"plan_data": plan, "out": str(tmp_path / "elsewhere" / "merged.safetensors")})
    deadline = time.monotonic() + WAIT_S
    while not all(jobs.status(j)["state"] in jobs.FINISHED_STATES for j in (analysis, merge)):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert [jobs.status(j)["state"] for j in (analysis, merge)] == ["done", "done"]  # they ran, over those files
    for page, url_name, job_id in ((ui.PAGES[0], "analysis", analysis), (ui.PAGES[2], "merge", merge)):
        at = _app()
        at.query_params[url_name] = job_id
        at.switch_page(page.path).run()
        assert not at.exception
        assert _errors(at) == [f"job `{job_id}` read model files outside the allowed model folders; it is not shown "
                               "here"], _errors(at)
        assert not _charts(at) and not at.success and not at.dataframe  # nothing of its result
        assert str(tmp_path / "elsewhere") not in str([*at.markdown, *at.caption, *at.code])
    # a link under the allowed folders to those files is left out, and said (the README used to invite links)
    (workspace / "models").mkdir(parents=True, exist_ok=True)
    (workspace / "models" / "linked.safetensors").symlink_to(paths["anime"])
    at = _app()
    at.switch_page(ui.PAGES[1].path).run()
    assert not at.exception
    assert any("1 link(s) under the model folders point outside them and are left out" in w.value and
               "linked.safetensors" in w.value for w in at.warning), [w.value for w in at.warning]


def test_a_job_of_another_kind_in_the_url_is_an_error_message(workspace: Path) -> None:
    # an analysis's id in ?merge= (or a merge's in ?analysis=, ?preview=) raised KeyError on the page (QA5 dash F4)
    from ortho_mecha import jobs

    sleeper = jobs.submit("sleep", {"seconds": 0}, heavy=False)
    for page, url_name in ((ui.PAGES[0], "analysis"), (ui.PAGES[2], "merge"), (ui.PAGES[3], "preview"),
                           (ui.PAGES[3], "sweep")):
        at = _app()
        at.query_params[url_name] = sleeper
        at.switch_page(page.path).run()
        assert not at.exception, (url_name, at.exception)
        assert [e for e in _errors(at) if "is not a" in e] == [
            f"job `{sleeper}` is not a{'n' if url_name == 'analysis' else ''} {ui.URL_KINDS[url_name]} job but a "
            "sleep one: open it on its own page"], _errors(at)


def test_every_page_renders_without_an_analysis(workspace: Path) -> None:
    (workspace / "models").mkdir(parents=True)  # no demo: the Analyse page says where to put models
    for page in ui.PAGES:
        at = _app()
        at.switch_page(page.path).run()
        assert not at.exception, page.title
        assert at.title[0].value == page.title
        assert not _errors(at)


def test_a_file_name_that_is_not_utf8_is_left_out_with_a_warning(workspace: Path) -> None:
    folder = workspace / "models" / "mine"
    family = write_family_files(folder, "custom", "fp16", members=["base", "anime"])
    (workspace / "models" / "demo").mkdir()  # no demo: only these files
    os.link(family["anime"], os.fsdecode(bytes(folder) + b"/caf\xe9.safetensors"))  # a Latin-1 name
    for page in ui.PAGES:
        at = _app()
        at.switch_page(page.path).run()
        assert not at.exception, page.title
        if page.title in ("Analyse", "Mixer"):
            assert any("caf\ufffd.safetensors: left out" in w.value for w in at.warning), page.title


def test_a_model_of_another_architecture_is_left_out_and_said_with_the_report(workspace: Path) -> None:
    mine = write_family_files(workspace / "models" / "mine", "flux", "fp16", members=["base", "anime", "photo"])
    write_family_files(workspace / "models" / "other", "sdxl", "fp16", members=["anime"])
    (workspace / "models" / "demo").mkdir()  # no demo: only these files
    at = _app().run()
    at.selectbox(key="an_base").set_value("models/mine/base.safetensors").run()
    at.multiselect(key="an_models").set_value(["models/mine/anime.safetensors", "models/mine/photo.safetensors",
                                               "models/other/anime.safetensors"]).run()
    at.button[0].click().run()
    _until(at, lambda a: len(_charts(a)) >= 3, "the analysis heatmaps")
    assert not _errors(at)
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("left out of the analysis: ") and "other/anime.safetensors" in w
               and "is it the same architecture?" in w for w in warnings), warnings
    assert at.session_state["report"]["models"] == [str(mine["anime"].resolve()), str(mine["photo"].resolve())]


def test_many_left_out_models_are_one_warning_with_the_list_folded() -> None:
    # a folder of another model's files still selected after the base changed gave 34 warnings above the report
    def page(count: int) -> None:
        from ortho_mecha import ui

        ui.left_out_warnings([f"m{i}.safetensors: shares only 0 of the 6 keys" for i in range(count)])

    few = AppTest.from_function(page, args=(2,)).run()
    assert [w.value for w in few.warning] == [f"left out of the analysis: m{i}.safetensors: shares only 0 of the 6 keys"
                                              for i in range(2)]
    many = AppTest.from_function(page, args=(34,)).run()
    assert [w.value for w in many.warning] == ["34 models were left out of the analysis; the reasons are listed below"]
    assert many.expander[0].label == "The 34 models left out"
    assert "m33.safetensors: shares only 0" in many.text[0].value


def test_lan_without_a_password_shows_only_how_to_set_one(workspace: Path) -> None:
    config.set_option("server.address", "0.0.0.0")
    at = _app().run()
    assert not at.exception
    assert any("ORTHO_MECHA_PASSWORD" in error for error in _errors(at))
    assert not at.title and not at.text_input


def test_lan_gate_refuses_a_wrong_password_and_admits_the_right_one(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORTHO_MECHA_PASSWORD", "s3cret")
    config.set_option("server.address", "0.0.0.0")
    at = _app().run()
    assert not at.title
    at.text_input[0].set_value("wrong")
    at.button[0].click().run()
    assert _errors(at) == ["wrong password"]
    assert not at.title
    at.text_input[0].set_value("s3cret")
    at.button[0].click().run()
    assert not at.exception
    assert at.title[0].value == "Analyse"


def test_lan_gate_makes_a_guesser_wait(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ortho_mecha import security

    monkeypatch.setattr(security, "SIGN_IN_LIMITER", security.SignInLimiter(free=2, first_wait=60.0))
    monkeypatch.setenv("ORTHO_MECHA_PASSWORD", "s3cret")
    config.set_option("server.address", "0.0.0.0")
    at = _app().run()
    for _ in range(2):
        at.text_input[0].set_value("guess")
        at.button[0].click().run()
        assert _errors(at) == ["wrong password"]
    at.text_input[0].set_value("s3cret")
    at.button[0].click().run()
    assert _errors(at) == ["too many wrong passwords from this address: try again in 60 s"]
    assert not at.title


def test_lan_gate_holds_for_a_page_asked_for_directly(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORTHO_MECHA_PASSWORD", "s3cret")
    config.set_option("server.address", "0.0.0.0")
    for page in ui.PAGES:
        at = _app()
        at.switch_page(page.path).run()
        assert not at.exception, page.title
        assert not at.title, page.title
        assert [box.label for box in at.text_input] == ["Password"]


def test_on_a_lan_the_preview_page_uses_the_servers_comfyui_settings(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared on the network, a browser cannot point the server at another address or folder."""
    from ortho_mecha import preview_job

    monkeypatch.setenv("COMFYUI_API", "http://127.0.0.1:8188")
    monkeypatch.setenv("COMFYUI_DIR", str(workspace / "comfy"))
    assert preview_job.comfy_settings("0.0.0.0", "http://10.0.0.5:22", "/etc") == (
        "http://127.0.0.1:8188", str(workspace / "comfy"))
    assert preview_job.comfy_settings("127.0.0.1", "http://10.0.0.5:8188", "/opt/ComfyUI") == (
        "http://10.0.0.5:8188", "/opt/ComfyUI")
    monkeypatch.setenv("ORTHO_MECHA_PASSWORD", "s3cret")
    config.set_option("server.address", "0.0.0.0")
    at = _app().run()
    at.text_input[0].set_value("s3cret")
    at.button[0].click().run()
    at.switch_page(ui.PAGES[3].path).run()
    assert not at.exception
    assert at.text_input(key="pv_api").disabled and at.text_input(key="pv_dir").disabled


@pytest.mark.slow
def test_a_stored_analysis_whose_files_changed_says_so_and_runs_again(workspace: Path) -> None:
    """A new session shows the last analysis at once, from its job; once a file it read has changed (same name,
    other weights), the Analyse and Mixer pages say which, and 'Analyse again' gives figures of the files now."""
    first = _app().run()
    _until(first, lambda a: len(_charts(a)) >= 3, "the demo analysis")
    assert not any("Changed since" in w.value for w in first.warning)
    demo = workspace / "models" / "demo"
    old = first.session_state["report"]["cos"]
    (demo / "photo.safetensors").write_bytes((demo / "anime_v2.safetensors").read_bytes())  # photo is now anime_v2

    again = _app().run()
    said = [w.value for w in again.warning if "Changed since" in w.value]
    assert said == ["Changed since this analysis read them: photo.safetensors. The figures shown are of the files "
                    "as they were."]
    again.switch_page(ui.PAGES[1].path).run()
    assert any(w.value.startswith("Changed since this analysis read them: photo.safetensors.") and
               w.value.endswith("Analyse them again on the Analyse page.") for w in again.warning)
    again.switch_page(ui.PAGES[0].path).run()
    again.button(key="analyse_again").click().run()
    _until(again, lambda a: len(_charts(a)) >= 3 and a.session_state["report"]["cos"] != old, "the new analysis")
    assert not any("Changed since" in w.value for w in again.warning)
    models = [Path(m).name for m in again.session_state["report"]["models"]]
    cos = again.session_state["report"]["cos"]
    assert cos[models.index("photo.safetensors")][models.index("anime_v2.safetensors")] > 0.999  # the files now


@pytest.mark.slow
def test_a_row_of_another_architecture_is_refused_on_the_mixer_and_the_merge_page(workspace: Path) -> None:
    """What `merge --dry-run` says of the inputs is said before Merge is clicked (not only by the failed job)."""
    at = _app().run()
    _until(at, lambda a: len(_charts(a)) >= 3, "the demo analysis")
    write_family_files(workspace / "models" / "other", "sdxl", "fp16", members=["base", "anime"])
    at.switch_page(ui.PAGES[1].path).run()
    rows_key = f"mix_rows_{at.session_state['mix']['version']}"
    at.session_state[rows_key] = {"edited_rows": {}, "deleted_rows": [], "added_rows": [
        {"enabled": True, "model": "models/other/anime.safetensors", "delta_from": "(base)", "alpha": 1.0,
         "repeat": 1}]}
    at.run()
    said = [e for e in _errors(at) if "anime.safetensors" in e and "same architecture" in e]
    assert len(said) == 1, _errors(at)
    at.switch_page(ui.PAGES[2].path).run()
    assert any("same architecture" in e for e in _errors(at)) and at.button(key="merge_start").disabled


@pytest.mark.slow
def test_analyse_comes_back_after_another_page_and_an_empty_mixer_leaves_no_plan(workspace: Path) -> None:
    at = _app().run()
    _until(at, lambda a: len(_charts(a)) >= 3, "the analysis heatmaps")
    at.switch_page(ui.PAGES[1].path).run()
    assert at.session_state["plan"] is not None
    del at.query_params["analysis"]  # a browser drops the page's URL parameters on the way to another page
    at.switch_page(ui.PAGES[0].path).run()
    assert not at.exception and not _errors(at)
    assert len(_charts(at)) >= 3
    assert at.selectbox(key="an_base").value == "models/demo/base.safetensors"
    assert len(at.multiselect(key="an_models").value) == 7
    # the Mixer with every row deleted shows no plan, and the Merge page has none to merge
    at.switch_page(ui.PAGES[1].path).run()
    mix = at.session_state["mix"]
    ui_rows_key = f"mix_rows_{mix['version']}"
    at.session_state[ui_rows_key] = {"edited_rows": {}, "added_rows": [], "deleted_rows": list(range(7))}
    at.run()
    assert "plan" not in at.session_state
    at.switch_page(ui.PAGES[2].path).run()
    assert not at.exception and any("plan" in info.value for info in at.info)
    # a method's settings stay while another method is tried
    at.switch_page(ui.PAGES[1].path).run()
    version = at.session_state["mix"]["version"]
    at.selectbox(key=f"mix_method_{version}").set_value("orthomerge").run()
    at.selectbox(key=f"mix_{version}_orthomerge_theta_agg").set_value("max").run()
    at.selectbox(key=f"mix_method_{version}").set_value("ties").run()
    at.selectbox(key=f"mix_method_{version}").set_value("orthomerge").run()
    assert not at.exception
    assert at.selectbox(key=f"mix_{version}_orthomerge_theta_agg").value == "max"
