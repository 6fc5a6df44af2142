"""The dashboard's workspace (``ortho_mecha.workspace``): demo, labels, the Mixer table ↔ plan, presets, figures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ortho_mecha import workspace
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.merge import job_plan
from ortho_mecha.plan import Plan, Row, Texture
from ortho_mecha.workspace import BASE_LABEL, ModelChoices
from tests.modelgen import write_family_files

MEMBERS = ["base", "anime", "photo", "anime_v2", "photo_copy"]


@pytest.fixture
def models(tmp_path: Path, make_family: Callable[..., dict[str, Path]]) -> tuple[dict[str, Path], ModelChoices]:
    paths = make_family(members=MEMBERS)
    return paths, ModelChoices.scan((tmp_path,))


def a_plan(paths: dict[str, Path]) -> Plan:
    return Plan(
        base=paths["base"].resolve(),
        method="ortho_superpose",
        rows=(
            Row(paths["anime"].resolve(), alpha=0.75, info="first"),
            Row(paths["anime_v2"].resolve(), delta_from=paths["anime"].resolve(), repeat=2),
            Row(paths["photo"].resolve(), enabled=False),
        ),
        options={"alpha": 1.5},
        texture=Texture(paths["photo_copy"].resolve(), 0.1, "orthogonal"),
    )


def test_labels_are_paths_inside_the_root_and_checked(models: tuple[dict[str, Path], ModelChoices],
                                                      tmp_path: Path) -> None:
    paths, choices = models
    assert choices.labels == sorted(f"custom-fp16-0/{name}.safetensors" for name in MEMBERS)
    assert choices.path("custom-fp16-0/anime.safetensors") == paths["anime"].resolve()
    assert choices.label(paths["photo"]) == "custom-fp16-0/photo.safetensors"
    with pytest.raises(OrthoMechaError, match="pick one from the list"):
        choices.path("../custom-fp16-0/anime.safetensors")
    outside = tmp_path.parent / "elsewhere.safetensors"
    with pytest.raises(OrthoMechaError):
        choices.label(outside)


def test_table_and_plan_round_trip(models: tuple[dict[str, Path], ModelChoices]) -> None:
    paths, choices = models
    plan = a_plan(paths)
    table = workspace.table_from_plan(plan, choices)
    assert table["base"] == "custom-fp16-0/base.safetensors"
    assert [row["delta_from"] for row in table["rows"]] == [BASE_LABEL, "custom-fp16-0/anime.safetensors", BASE_LABEL]
    assert table["texture"] == {"model": "custom-fp16-0/photo_copy.safetensors", "alpha": 0.1, "mode": "orthogonal"}
    again = workspace.plan_from_table(table["base"], table["rows"], table["method"], table["options"],
                                      table["texture"], choices)
    assert again == plan
    assert workspace.table_from_plan(again, choices) == table


def test_empty_cells_take_the_defaults_and_a_row_needs_a_model(models: tuple[dict[str, Path], ModelChoices]) -> None:
    _, choices = models
    row = {"enabled": True, "model": "custom-fp16-0/anime.safetensors", "delta_from": None, "alpha": float("nan"),
           "repeat": None, "info": None}
    plan = workspace.plan_from_table("custom-fp16-0/base.safetensors", [row], "weighted_sum", {}, None, choices)
    assert (plan.rows[0].alpha, plan.rows[0].repeat, plan.rows[0].delta_from, plan.rows[0].info) == (1.0, 1, None, "")
    with pytest.raises(OrthoMechaError, match="row 2 has no model"):
        workspace.plan_from_table("custom-fp16-0/base.safetensors", [row, {**row, "model": None}], "weighted_sum",
                                  {}, None, choices)


def test_presets_save_and_load_under_validated_names(models: tuple[dict[str, Path], ModelChoices],
                                                     tmp_path: Path) -> None:
    paths, choices = models
    ws = tmp_path / "ws"
    plan = a_plan(paths)
    assert workspace.list_presets(ws) == []
    saved = workspace.save_preset("  my mix-2 ", plan, workspace=ws)
    assert saved == ws / "plans" / "my mix-2.json"
    assert workspace.list_presets(ws) == ["my mix-2"]
    assert workspace.load_preset("my mix-2", choices, workspace=ws) == plan
    with pytest.raises(OrthoMechaError, match="tick 'Replace a preset of that name'"):
        workspace.save_preset("my mix-2", plan, workspace=ws)  # no silent overwrite, and the page's remedy
    workspace.save_preset("my mix-2", plan, overwrite=True, workspace=ws)
    for bad in ("", "../up", "a/b", "-dash", "x" * 81, "semi;colon"):
        with pytest.raises(OrthoMechaError, match="preset"):
            workspace.validate_preset_name(bad)
    with pytest.raises(OrthoMechaError, match="saved presets: my mix-2"):
        workspace.load_preset("other", choices, workspace=ws)


def test_a_preset_naming_files_outside_the_roots_is_refused(models: tuple[dict[str, Path], ModelChoices],
                                                            tmp_path: Path) -> None:
    paths, _ = models
    ws = tmp_path / "ws"
    workspace.save_preset("mix", a_plan(paths), workspace=ws)
    only_the_workspace = ModelChoices.scan((ws,))
    with pytest.raises(OrthoMechaError):
        workspace.load_preset("mix", only_the_workspace, workspace=ws)


def test_a_mixer_plan_is_kept_under_its_content_hash_and_checked_when_recalled(
    models: tuple[dict[str, Path], ModelChoices], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, choices = models
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "cache"))
    plan = a_plan(paths)
    mix_id = workspace.remember_mix(plan)
    assert len(mix_id) == 32 and workspace.remember_mix(plan) == mix_id  # the same plan, the same id
    assert workspace.recall_mix(mix_id, choices) == plan
    other = Plan(base=plan.base, method="orthomerge", rows=plan.rows)
    assert workspace.remember_mix(other) != mix_id
    for bad in ("../../etc/passwd", "A" * 32, "0" * 31, ""):
        with pytest.raises(OrthoMechaError, match="is not a Mixer plan id"):
            workspace.recall_mix(bad, choices)
    with pytest.raises(OrthoMechaError, match="no Mixer plan"):
        workspace.recall_mix("f" * 32, choices)
    with pytest.raises(OrthoMechaError):  # its files must lie inside the roots
        workspace.recall_mix(mix_id, ModelChoices.scan((tmp_path / "elsewhere",)))


def test_demo_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(tmp_path))
    first = workspace.ensure_demo(tmp_path)
    assert "base" in first and len(first) > 2
    stamps = {name: path.stat().st_mtime_ns for name, path in first.items()}
    second = workspace.ensure_demo(tmp_path)
    assert second == first
    assert {name: path.stat().st_mtime_ns for name, path in second.items()} == stamps
    for path in first.values():  # the user removed the demo's files: they stay removed
        path.unlink()
    assert workspace.ensure_demo(tmp_path) == {}


def test_optimizer_rows_keep_method_options_and_texture(models: tuple[dict[str, Path], ModelChoices]) -> None:
    from ortho_mecha.analysis import analyse, report

    paths, choices = models
    analysed = report(analyse(paths["base"], [paths[name] for name in MEMBERS[1:]]))
    mix = {"options": {"alpha": 0.5}, "texture": {"model": "custom-fp16-0/photo.safetensors", "alpha": 0.2,
                                                  "mode": "add"}}
    state = workspace.optimized_mix(analysed, "weighted_sum", mix, choices)
    assert (state["method"], state["options"], state["texture"]) == ("weighted_sum", {"alpha": 0.5}, mix["texture"])
    assert state["base"] == "custom-fp16-0/base.safetensors"
    assert [row["model"] for row in state["rows"]] == [choices.label(paths[name]) for name in MEMBERS[1:]]
    assert all(row["info"] for row in state["rows"])
    by_model = {row["model"]: row for row in state["rows"]}
    assert by_model["custom-fp16-0/anime_v2.safetensors"]["delta_from"] == "custom-fp16-0/anime.safetensors"
    duplicates = [by_model[f"custom-fp16-0/{name}.safetensors"] for name in ("photo", "photo_copy")]
    assert sorted(row["enabled"] for row in duplicates) == [False, True]  # one copy of a near-duplicate pair
    assert workspace.optimized_mix(analysed, "weighted_sum", mix, choices) == state  # deterministic
    # a model's block alphas stay through the optimizer (they were dropped without a word)
    with_blocks = mix | {"rows": [{"model": "custom-fp16-0/anime.safetensors", "block_alphas": "in=1, out=0"}]}
    again = {row["model"]: row for row in workspace.optimized_mix(analysed, "weighted_sum", with_blocks,
                                                                     choices)["rows"]}
    assert again["custom-fp16-0/anime.safetensors"]["block_alphas"] == "in=1, out=0"
    assert again["custom-fp16-0/anime_v2.safetensors"]["block_alphas"] == ""


def test_mix_changes_says_what_a_button_changed_and_when_it_changed_nothing() -> None:
    rows = [{"enabled": True, "model": "a", "delta_from": "(base)", "alpha": 1.0, "repeat": 1},
            {"enabled": True, "model": "b", "delta_from": "(base)", "alpha": 1.0, "repeat": 1},
            {"enabled": True, "model": "b", "delta_from": "(base)", "alpha": 0.5, "repeat": 1}]
    before = {"base": "base", "rows": rows}
    assert workspace.mix_changes(before, {"base": "base", "rows": [dict(r) for r in rows]}, "Auto-fill") == (
        "Auto-fill: no change, the rows already are what it proposes.")
    after = {"base": "base", "rows": [rows[0] | {"delta_from": "b", "repeat": 2}, rows[1] | {"enabled": False},
                                      {"enabled": True, "model": "c", "alpha": float("nan"), "repeat": 1}]}
    said = workspace.mix_changes(before, after, "Optimize rows")
    assert said == ("Optimize rows changed 4 things: a: delta-from (base) → b, repeat 1 → 2; b: off; c: added; "
                    "b: dropped.")  # the second row of b is gone; an empty alpha reads as 1, not as a change
    moved = workspace.mix_changes(before | {"base": "x"}, before, "Auto-fill")
    assert moved == "Auto-fill changed 1 thing: base x → base."
    many = [{"model": f"m{i}", "alpha": 1.0} for i in range(12)]
    said = workspace.mix_changes({"rows": many}, {"rows": [row | {"alpha": 0.5} for row in many]}, "Auto-fill")
    assert said.startswith("Auto-fill changed 12 things: m0: alpha 1 → 0.5;") and said.endswith("; and 5 more.")


def test_survival_frame_lists_predicted_and_measured() -> None:
    frame = workspace.survival_frame({"rows": ["/m/a.safetensors", "/m/b.safetensors"], "predicted": [1.0, 0.5],
                                      "measured": [0.75, 0.5], "label": "orthogonal"})
    assert list(frame["model"]) == ["a.safetensors", "b.safetensors"]
    assert list(frame.columns) == ["model", "predicted (orthogonal)", "measured", "measured − predicted"]
    assert list(frame["measured − predicted"]) == [-0.25, 0.0]


def test_merge_job_params_carry_the_plan_and_write_nothing(models: tuple[dict[str, Path], ModelChoices],
                                                           tmp_path: Path) -> None:
    paths, _ = models
    ws = tmp_path / "ws"
    params = workspace.merge_job_params(a_plan(paths), "out", workspace=ws)
    assert params == {"plan_data": a_plan(paths).to_dict(), "out": str(ws / "merges" / "out.safetensors"),
                      "overwrite": False, "plan_beside": str(ws / "merges" / "out.plan.json")}
    assert job_plan(params) == a_plan(paths)
    assert list((ws / "merges").iterdir()) == []  # the job writes the plan beside its merge once that is written
    (ws / "merges" / "out.safetensors").write_bytes(b"x")
    with pytest.raises(OrthoMechaError, match="already exists"):
        workspace.merge_job_params(a_plan(paths), "out.safetensors", workspace=ws)
    with pytest.raises(OrthoMechaError, match="not a path"):
        workspace.merge_job_params(a_plan(paths), "../out", workspace=ws)


def test_no_demo_is_written_outside_the_allowed_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORTHO_MECHA_ROOTS naming the user's own folders: the dashboard neither writes nor offers the demo."""
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(tmp_path / "mine"))
    assert workspace.ensure_demo(tmp_path / "workspace") == {}
    assert not (tmp_path / "workspace").exists()


def test_the_base_picker_starts_on_a_file_named_base(tmp_path: Path) -> None:
    for name in ("a_broken.safetensors", "sdxl/sdxl_base.safetensors", "style.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    choices = ModelChoices.scan((tmp_path,))
    assert choices.default_base() == "sdxl/sdxl_base.safetensors"
    assert choices.holds(tmp_path / "style.safetensors") and not choices.holds(tmp_path / "absent.safetensors")
    assert ModelChoices.scan((tmp_path / "empty",)).default_base() is None


def test_the_merge_form_offers_a_name_no_file_has(tmp_path: Path) -> None:
    assert workspace.free_output_name(tmp_path) == "merged.safetensors"
    (tmp_path / "merged.safetensors").write_bytes(b"")
    (tmp_path / "merged-2.safetensors").write_bytes(b"")
    assert workspace.free_output_name(tmp_path) == "merged-3.safetensors"


def test_an_unreadable_model_is_left_out_of_the_dashboards_analysis(models: tuple[dict[str, Path], ModelChoices],
                                                                    tmp_path: Path) -> None:
    paths, _ = models
    data = paths["photo"].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])  # truncated
    choices = ModelChoices.scan((tmp_path,))
    label = {path: name for name, path in choices.by_label.items()}
    base, anime, cut = label[paths["base"]], label[paths["anime"]], label[broken]
    params = workspace.analysis_params(choices, base, [anime, cut], {})
    assert params["models"] == [str(paths["anime"].resolve())]
    assert len(params["left_out"]) == 1 and params["left_out"][0].startswith(f"{broken.resolve()}: truncated")
    with pytest.raises(OrthoMechaError, match=r"broken\.safetensors: truncated.*choose files that can be read"):
        workspace.analysis_params(choices, cut, [anime], {})  # the base
    with pytest.raises(OrthoMechaError, match="truncated"):
        workspace.analysis_params(choices, base, [anime], {anime: cut})  # a delta-from
    assert workspace.unreadable([paths["base"], broken]).keys() == {broken}


def test_a_model_of_another_architecture_is_left_out_before_the_analysis(
    models: tuple[dict[str, Path], ModelChoices], tmp_path: Path
) -> None:
    paths, _ = models
    other = write_family_files(tmp_path / "other", "sdxl", "fp16", members=["anime"])["anime"]
    choices = ModelChoices.scan((tmp_path,))
    label = {path: name for name, path in choices.by_label.items()}
    params = workspace.analysis_params(choices, label[paths["base"]], [label[paths["anime"]], label[other]], {})
    assert params["models"] == [str(paths["anime"].resolve())]
    assert len(params["left_out"]) == 1 and "is it the same architecture?" in params["left_out"][0]
    with pytest.raises(OrthoMechaError, match="choose readable models of the base's architecture"):
        workspace.analysis_params(choices, label[paths["base"]], [label[other]], {})


def test_a_mixer_plan_naming_an_unreadable_file_is_refused(models: tuple[dict[str, Path], ModelChoices],
                                                           tmp_path: Path) -> None:
    """The Mixer neither shows figures for, nor keeps in the URL, a plan merge would fail on."""
    paths, _ = models
    data = paths["photo"].read_bytes()
    (tmp_path / "broken.safetensors").write_bytes(data[: len(data) // 2])
    choices = ModelChoices.scan((tmp_path,))
    label = {path: name for name, path in choices.by_label.items()}
    rows = [{"model": label[paths["anime"]]}, {"model": label[tmp_path / "broken.safetensors"]}]
    with pytest.raises(OrthoMechaError, match=r"broken\.safetensors: truncated.*remove or disable that row"):
        workspace.plan_from_table(label[paths["base"]], rows, "ortho_superpose", {}, None, choices)
    rows[1]["enabled"] = False  # a disabled row is not read by the merge
    assert workspace.plan_from_table(label[paths["base"]], rows, "ortho_superpose", {}, None, choices).rows


def test_changed_files_names_a_rewritten_replaced_or_missing_model_and_hashes_only_what_moved(tmp_path: Path) -> None:
    from ortho_mecha.io import Model

    paths = write_family_files(tmp_path, "sdxl", "fp16", members=["base", "anime", "photo", "anime_v2"])
    then = {}
    for path in paths.values():
        with Model(path) as model:
            then[str(path)] = model.fingerprint
    seen: dict = {}
    assert workspace.changed_files(then, seen) == []
    assert set(seen) == set(then)
    remembered = dict(seen)
    assert workspace.changed_files(then, seen) == [] and seen == remembered  # nothing moved: nothing hashed again
    paths["photo"].write_bytes(paths["anime_v2"].read_bytes())  # same name, another model's weights
    paths["anime"].unlink()
    assert workspace.changed_files(then, seen) == [str(paths["anime"]), str(paths["photo"])]


def test_lost_rows_are_those_the_mix_carries_almost_nothing_of() -> None:
    import pandas as pd

    survival = pd.DataFrame({"model": ["a", "b", "c", "d"], "alpha": [1.0, 1.0, 0.5, 0.0], "repeat": [1] * 4,
                             "survival (exact)": [0.5, 0.004, -0.2, -1e-4], "survival (plain average)": [0.0] * 4})
    assert workspace.lost_rows(survival) == [("b", 0.004, 1.0), ("c", -0.2, 0.5), ("d", -1e-4, 0.0)]
