"""The plan: JSON in and out, relative paths, defaults, and every validation error by its message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.plan import METHODS, Plan, Row, Texture, load_plan, plan_from_dict, save_plan
from tests.merge_fixtures import write_family, write_plan


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("models"))


def plan_data(**changes: object) -> dict:
    data = {
        "base": "base.safetensors",
        "method": "orthomerge",
        "rows": [
            {"model": "a.safetensors", "delta_from": None, "alpha": 1.0, "repeat": 1, "enabled": True},
            {"model": "b.safetensors", "alpha": 0.5, "repeat": 2, "info": "kept: new information 0.9"},
        ],
        "options": {"theta_agg": "median"},
        "texture": {"model": "tex.safetensors", "alpha": 0.2, "mode": "add"},
        "output_dtype": "bf16",
        "merge_dtype": "fp32",
    }
    data.update(changes)
    return data


def test_relative_paths_resolve_against_the_plan_folder_and_defaults_fill_in(family: dict[str, Path]) -> None:
    folder = family["base"].parent
    plan = load_plan(write_plan(folder, plan_data()))
    assert plan.base == family["base"].resolve()
    assert [row.model for row in plan.rows] == [family["a"].resolve(), family["b"].resolve()]
    assert plan.rows[1].delta_from is None and plan.rows[1].enabled and plan.rows[1].repeat == 2
    assert plan.options == {"alpha": 1.0, "theta_agg": "median", "conflict_aware": False, "direction_weight": "theta",
                            "precision": "float64"}
    assert plan.texture == Texture(family["tex"].resolve(), 0.2, "add")
    assert plan.input_files() == [family[n].resolve() for n in ("base", "a", "b", "tex")]


def test_plan_from_elsewhere_resolves_against_its_own_folder(family: dict[str, Path], tmp_path: Path) -> None:
    rel = Path("..") / family["base"].parent.name
    data = plan_data(base=str(rel / "base.safetensors"), rows=[{"model": str(rel / "a.safetensors")}], texture=None)
    sub = family["base"].parent.parent / "plans"
    sub.mkdir(exist_ok=True)
    plan = load_plan(write_plan(sub, data))
    assert plan.base == family["base"].resolve()
    assert plan.rows == (Row(family["a"].resolve()),)


def test_save_and_load_round_trip_writes_relative_paths_atomically(family: dict[str, Path]) -> None:
    folder = family["base"].parent
    plan = plan_from_dict(plan_data(), folder)
    target = folder / "saved.json"
    target.unlink(missing_ok=True)
    save_plan(plan, target)
    written = json.loads(target.read_text())
    assert written["base"] == "base.safetensors"
    assert written["rows"][1]["info"] == "kept: new information 0.9"
    assert load_plan(target) == plan
    with pytest.raises(OrthoMechaError, match="already exists"):
        save_plan(plan, target)
    save_plan(plan, target, overwrite=True)
    assert not [p for p in folder.iterdir() if p.name.startswith(".saved.json")]


def test_to_json_keeps_absolute_paths_without_a_folder(family: dict[str, Path]) -> None:
    plan = plan_from_dict(plan_data(texture=None), family["base"].parent)
    data = json.loads(plan.to_json())
    assert data["base"] == str(family["base"].resolve())
    assert data["texture"] is None
    assert plan_from_dict(data, "/nonexistent") == plan


def test_every_method_validates_with_its_defaults(family: dict[str, Path]) -> None:
    for name, spec in METHODS.items():
        plan = plan_from_dict(plan_data(method=name, options={}), family["base"].parent)
        assert plan.options == spec.defaults()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rows": [{"model": "missing.safetensors"}]}, r"row 1 \(missing.safetensors\): model .*does not exist"),
        ({"base": "nobase.safetensors"}, r"base .*nobase.safetensors does not exist"),
        ({"rows": [{"model": "a.safetensors", "alpha": 2.5}]}, r"row 1 \(a.safetensors\): alpha 2.5 is outside 0–2"),
        ({"rows": [{"model": "a.safetensors", "alpha": -0.1}]}, r"alpha -0.1 is outside 0–2"),
        ({"rows": [{"model": "a.safetensors", "alpha": True}]}, r"alpha true must be a number in 0–2"),
        ({"rows": [{"model": "a.safetensors", "alpha": "1"}]}, r'alpha "1" must be a number in 0–2'),
        ({"rows": [{"model": "a.safetensors", "repeat": 4}]}, r"repeat 4 must be an integer 1, 2 or 3"),
        ({"rows": [{"model": "a.safetensors", "repeat": 0}]}, r"repeat 0 must be an integer 1, 2 or 3"),
        ({"rows": [{"model": "a.safetensors", "repeat": 1.5}]}, r"repeat 1.5 must be an integer 1, 2 or 3"),
        (
            {
                "rows": [
                    {"model": "a.safetensors", "delta_from": "b.safetensors"},
                    {"model": "b.safetensors", "delta_from": "a.safetensors"},
                ]
            },
            r"delta-from cycle a.safetensors ← b.safetensors ← a.safetensors",
        ),
        ({"rows": [{"model": "a.safetensors", "delta_from": "a.safetensors"}]}, r"delta-from cycle a.safetensors ←"),
        ({"method": "orthomerg"}, r"unknown method 'orthomerg'; did you mean 'orthomerge'\? valid: ortho_project"),
        ({"method": "TIES"}, r"unknown method 'TIES'; did you mean 'ties'\? valid: ortho_project"),
        ({"method": "slerp"}, r"unknown method 'slerp'; .*valid: ortho_project, ortho_superpose, orthomerge"),
        ({"options": {"theta": "mean"}}, r"method 'orthomerge' has no option 'theta'; did you mean 'theta_agg'\?"),
        ({"options": {"theta_agg": "avg"}}, r"option 'theta_agg' .* is \"avg\"; allowed: \"mean\", \"median\""),
        ({"options": {"conflict_aware": 1}}, r"option 'conflict_aware' .* is 1; allowed: true, false"),
        ({"options": {"alpha": -1}}, r"option 'alpha' of method 'orthomerge' is -1; allowed: a number in \[0, 2\]"),
        ({"options": {"alpha": 50}}, r"option 'alpha' of method 'orthomerge' is 50; allowed: a number in \[0, 2\]"),
        (
            {"method": "geometric_median", "options": {"maxiter": 2.5}},
            r"option 'maxiter' .* is 2.5; allowed: an integer in \[1, 10000\]",
        ),
        ({"merge_dtype": "fp8_e4m3fn"}, r"unknown merge_dtype 'fp8_e4m3fn'; .*valid: fp16, bf16, fp32, fp64"),
        ({"output_dtype": "fp12"}, r"unknown output_dtype 'fp12'; did you mean 'fp\d\d'\? valid: .*, fp8_e4m3fn"),
        ({"texture": {"model": "tex.safetensors", "alpha": 0.6}}, r"texture alpha 0.6 is outside 0–0.5"),
        ({"texture": {"model": "tex.safetensors", "mode": "ortho"}}, r"unknown texture mode 'ortho'; did you mean"),
        ({"rows": [{"model": "a.safetensors", "enabled": False}]}, r"no enabled rows; enable at least one model"),
        ({"rows": []}, r"no enabled rows"),
        ({"method": "model_stock", "options": {}}, None),
        ({"rows": [{"model": "a.ckpt"}]}, r"'.ckpt' is a pickle checkpoint"),
        ({"rows": [{"model": "x-00001-of-00002.safetensors"}]}, r"is a sharded model; merge needs one file"),
        ({"texure": None}, r"unknown field 'texure' in the plan; did you mean 'texture'\?"),
        ({"rows": [{"model": "a.safetensors", "weight": 1}]}, r"unknown field 'weight' in row 1"),
        ({"rows": [{"model": 3}]}, r"row 1 'model' must be a file path"),
        ({"rows": [{"model": "./base.safetensors"}]}, r"row 1 \(base.safetensors\): the model is the plan's base"),
        ({"base": "gone.safetensors"}, r"base .*gone.safetensors does not exist; fix the path$"),
    ],
)
def test_validation_errors_name_the_plan_file(family: dict[str, Path], changes: dict, message: str | None) -> None:
    folder = family["base"].parent
    path = write_plan(folder, plan_data(**changes), name="bad.json")
    if message is None:  # model_stock with the two rows of plan_data is valid; with one row it is not
        load_plan(path)
        one = write_plan(folder, plan_data(**changes, rows=[{"model": "a.safetensors"}]), name="bad.json")
        with pytest.raises(OrthoMechaError, match=r"needs at least 2 enabled rows, got 1"):
            load_plan(one)
        return
    with pytest.raises(OrthoMechaError, match=message) as caught:
        load_plan(path)
    assert str(caught.value).startswith(f"{path}: ")



def test_a_folder_named_like_a_model_is_said_to_be_a_folder(family: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    for changes in ({"base": str(folder)}, {"rows": [{"model": str(folder)}]}):
        path = write_plan(family["base"].parent, plan_data(**changes), name="folder.json")
        with pytest.raises(OrthoMechaError, match=r"dir\.safetensors is a folder, not a model file; fix the path"):
            load_plan(path)

def test_a_delta_from_naming_the_base_is_the_default(family: dict[str, Path]) -> None:
    folder = family["base"].parent
    spelled = plan_from_dict(plan_data(rows=[{"model": "a.safetensors", "delta_from": "./base.safetensors"}]), folder)
    assert spelled == plan_from_dict(plan_data(rows=[{"model": "a.safetensors"}]), folder)
    assert spelled.rows[0].delta_from is None


def test_disabled_rows_are_not_checked_for_files(family: dict[str, Path]) -> None:
    rows = [{"model": "a.safetensors"}, {"model": "gone.safetensors", "enabled": False}]
    plan = plan_from_dict(plan_data(rows=rows), family["base"].parent)
    assert [row.model.name for row in plan.enabled_rows] == ["a.safetensors"]


def test_invalid_json_and_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(OrthoMechaError, match=r"no such plan file"):
        load_plan(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"base": ')
    with pytest.raises(OrthoMechaError, match=r"bad.json: not valid JSON \(line 1"):
        load_plan(bad)


def test_plans_built_in_code_are_checked_too(family: dict[str, Path]) -> None:
    with pytest.raises(OrthoMechaError, match=r"^plan: row 1 .*alpha 3 is outside"):
        Plan(family["base"], "ortho_project", (Row(family["a"], alpha=3),))
