"""The Mixer's "Compare methods" and "Extract LoRA" sections under Streamlit's AppTest, with real jobs.

The models are a small planted family in the workspace; the analysis, the merge and the extraction run as
the app runs them, in detached worker processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from ortho_mecha import jobs, ui
from ortho_mecha import workspace as space
from ortho_mecha.plan import METHODS
from tests.modelgen import write_family_files
from tests.test_app import (
    _app,
    _errors,
    _until,
    workspace,  # noqa: F401 - the fixture
)

MIXER = ui.PAGES[1].path
MEMBERS = ["base", "anime", "photo", "anime_v2"]


def _run_job(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    job_id = jobs.submit(kind, params)
    deadline = time.monotonic() + 120
    while (record := jobs.status(job_id))["state"] not in jobs.FINISHED_STATES:
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    assert record["state"] == "done", record["error"]
    return record


def _by_label(widgets: Any, label: str) -> Any:
    return next(widget for widget in widgets if widget.label == label)


def _frame_with(at: AppTest, column: str) -> Any:
    return next(frame.value for frame in at.dataframe if column in frame.value.columns)


@pytest.fixture()
def analysed(workspace: Path) -> Path:  # noqa: F811 - the fixture imported above
    paths = write_family_files(workspace / "models" / "fam", "custom", "fp32", members=MEMBERS)
    _run_job("analyse", {"base": str(paths["base"]), "models": [str(paths[m]) for m in MEMBERS[1:]]})
    return workspace


@pytest.mark.slow
def test_compare_methods_and_extract_lora(analysed: Path) -> None:
    at = _app()
    at.switch_page(MIXER).run()
    assert not at.exception and not _errors(at)
    assert [e.label for e in at.expander][-2:] == ["Compare methods", "Extract LoRA"]

    # Compare: one summary line per method, the Mixer's method marked current, a survival column per method.
    summary = _frame_with(at, "norm ratio")
    assert list(summary["method"]) == list(METHODS)
    assert list(summary.loc[summary["current"], "method"]) == ["ortho_superpose"]
    survival = _frame_with(at, "geometric_median")
    assert list(survival["row"]) == [f"models/fam/{m}.safetensors" for m in MEMBERS[1:]]
    repeats = [row.repeat for row in at.session_state["plan"].rows]  # the auto-fill's: 2 for a row of new information
    assert survival["ortho_superpose"].tolist() == pytest.approx(repeats, abs=1e-6)  # each carried whole, r times
    assert any("pale bars are estimates" in caption.value for caption in at.caption)
    charts = [chart for chart in at.get("vega_lite_chart") if "xOffset" in chart.proto.spec]
    assert len(charts) == 1
    at.selectbox(key="mix_method_1").set_value("add_difference").run()
    summary = _frame_with(at, "norm ratio")
    assert list(summary.loc[summary["current"], "method"]) == ["add_difference"]

    # Extract LoRA: no merge yet, so the model is chosen; the base follows the Mixer's.
    model = _by_label(at.selectbox, "Model to extract")
    assert model.value is None
    assert _by_label(at.selectbox, "Its base").value == "models/fam/base.safetensors"
    assert at.number_input(key="lora_rank").value == space.LORA_RANK
    model.set_value("models/fam/anime.safetensors").run()
    assert _by_label(at.text_input, "LoRA file name").value == "anime-lora.safetensors"
    at.number_input(key="lora_rank").set_value(2).run()
    _by_label(at.text_input, "LoRA file name").set_value("../escape").run()  # said at once, with no button
    assert any("must be a file name" in error or "must not contain" in error for error in _errors(at))
    assert at.button(key="lora_start").disabled and "lora" not in at.query_params
    _by_label(at.text_input, "LoRA file name").set_value("anime r2").run()
    at.button(key="lora_start").click().run()
    assert not _errors(at)
    assert len(at.query_params["lora"]) == 32
    _until(at, lambda a: any("wrote" in s.value for s in a.success), "the LoRA extraction")
    assert (analysed / "loras" / "anime r2.safetensors").is_file()
    keys = _frame_with(at, "energy kept")
    assert len(keys) > 0 and ((keys["energy kept"] > 0) & (keys["energy kept"] <= 1 + 1e-9)).all()
    assert (keys["rank"] <= 2).all()
    assert [m.label for m in at.metric] == ["energy kept (matrix keys)", "energy kept (all keys)", "keys in the LoRA"]
    assert not _errors(at) and at.button(key="lora_start").disabled  # the file just written: no "exists" error,
    assert any(info.value == "`anime r2.safetensors` is the file just written (below). For another one, choose a new "
               "name, e.g. `anime r2-2.safetensors`." for info in at.info)  # but why the button is off, and a free name


@pytest.mark.slow
def test_extract_lora_defaults_to_the_latest_merge(analysed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    choices = space.ModelChoices.scan()
    rows = space.table_rows_from_report(jobs.list_jobs()[0]["result"], choices)
    plan = space.plan_from_table("models/fam/base.safetensors", rows[:2], "add_difference", {}, None, choices)
    _run_job("merge", space.merge_job_params(plan, "two"))
    at = _app()
    at.switch_page(MIXER).run()
    assert not at.exception and not _errors(at)
    assert _by_label(at.selectbox, "Model to extract").value == "merges/two.safetensors"
    assert _by_label(at.text_input, "LoRA file name").value == "two-lora.safetensors"
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(analysed / "models"))  # the user's folders, not the workspace
    at = _app()
    at.switch_page(MIXER).run()
    assert not at.exception and not _errors(at)
    assert _by_label(at.selectbox, "Model to extract").value == "two.safetensors"  # the dashboard's own merges


def test_no_predicted_figures_for_a_plan_that_cannot_be_merged(analysed: Path) -> None:
    at = _app()
    at.switch_page(MIXER).run()
    assert not _errors(at) and _frame_with(at, "model") is not None  # the survival table is shown
    mix = at.session_state["mix"]
    mix["rows"][0]["block_alphas"] = "nowhere=1"  # a group the base does not have: the plan is refused
    mix["version"] += 1  # a new table, from the rows
    at.run()
    assert any("nowhere" in error for error in _errors(at))
    assert any("predicted for a plan that can be merged" in info.value for info in at.info)
    assert "plan" not in at.session_state


@pytest.mark.slow
def test_a_reload_shows_the_mixers_plan_again(analysed: Path) -> None:
    at = _app()
    at.switch_page(MIXER).run()
    mix = at.session_state["mix"]
    mix["rows"][1].update(alpha=0.35, enabled=False)
    mix["method"] = "orthomerge"
    mix["version"] += 1
    at.run()
    assert not _errors(at)
    edited = at.session_state["plan"]
    mix_id = at.query_params[ui.MIX_URL]

    # A new session (a reload, a copied link): the URL's plan, not rows freshly made from the analysis.
    reloaded = _app()
    reloaded.query_params[ui.MIX_URL] = mix_id
    reloaded.switch_page(MIXER).run()
    assert not _errors(reloaded)
    assert reloaded.session_state["plan"] == edited
    assert reloaded.session_state["plan"].rows[1].alpha == 0.35 and not reloaded.session_state["plan"].rows[1].enabled

    # An id that is not kept: said so, and the Mixer starts from the analysis.
    unknown = _app()
    unknown.query_params[ui.MIX_URL] = "0" * 32
    unknown.switch_page(MIXER).run()
    assert any("The plan this page's link names cannot be shown, so the table starts from the analysis" in error
               and "no Mixer plan" in error for error in _errors(unknown))
    assert unknown.session_state["plan"].method == "ortho_superpose"
    assert all(row.alpha == 1.0 for row in unknown.session_state["plan"].rows)
