"""A checkpoint's text encoders and VAE in merge plans: detection, the plan field, real merges, recipes, Mixer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ortho_mecha import components
from ortho_mecha.components import COMPONENTS, Component, merge_settings, split
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.mecha_config import COMPONENT, derive_config
from ortho_mecha.merge import META_PLAN, merge_plan
from ortho_mecha.plan import Plan, load_plan, plan_from_dict, save_plan
from ortho_mecha.recipe import recipe_text
from tests.merge_fixtures import assert_same_merge, merge_three_ways
from tests.modelgen import POSITION_IDS, write_checkpoint_family

DIFFUSION = "model.diffusion_model."
ROWS = [{"model": "a.safetensors", "alpha": 0.8}, {"model": "b.safetensors", "delta_from": "c.safetensors"}]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoint_family(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoint_family(tmp_path_factory.mktemp("sdxl"), "sdxl", seed=1)


@pytest.fixture(scope="module")
def flux_aio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_checkpoint_family(tmp_path_factory.mktemp("flux_aio"), "flux_aio", seed=2)


def make_plan(family: dict[str, Path], method: str = "orthomerge", **extra: object) -> Plan:
    data = {"base": "base.safetensors", "method": method, "rows": ROWS, "output_dtype": "fp32"} | extra
    return plan_from_dict(data, family["base"].parent)


def merged_file(plan: Plan, out: Path) -> dict[str, torch.Tensor]:
    report = merge_plan(plan, out, overwrite=True, threads=0)
    assert report["repairs"]["nonfinite"] == {} and report["repairs"]["missing"] == []
    return load_file(str(out))


def keys_of(family: dict[str, Path], name: str) -> list[str]:
    return components.base_components(family["base"])[name]


def assert_equal_on(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], keys: list[str]) -> None:
    assert keys
    for key in keys:
        assert torch.equal(got[key].view(torch.uint8), expected[key].view(torch.uint8)), key


# -- detection ----------------------------------------------------------------------------------------


def test_components_are_found_by_prefix_in_table_order(sd1, sdxl, flux_aio) -> None:
    assert list(components.base_components(sd1["base"])) == ["clip_l", "vae"]
    assert list(components.base_components(sdxl["base"])) == ["clip_l", "clip_g", "vae"]
    assert list(components.base_components(flux_aio["base"])) == ["clip_l", "t5xxl", "vae"]  # ComfyUI's all-in-one
    assert POSITION_IDS in keys_of(sd1, "clip_l")
    assert components.base_components(sd1["diffusion_only"]) == {}
    assert [spec.id for spec in COMPONENTS] == ["clip_l", "clip_g", "clip_h", "t5xxl", "qwen3_4b", "qwen3_8b",
                                                "mistral3_24b", "vae"]


def test_split_needs_a_checkpoint_and_knows_the_refiner_and_sd2() -> None:
    unet = [f"{DIFFUSION}k{i}" for i in range(6)]
    assert split([*unet, "conditioner.embedders.0.model.ln_final.weight", "first_stage_model.x"]) == {
        "clip_g": ["conditioner.embedders.0.model.ln_final.weight"],  # the SDXL refiner's only text encoder
        "vae": ["first_stage_model.x"],
    }
    sd2_text = "cond_stage_model.model.ln_final.weight"
    assert split([*unet, sd2_text]) == {"clip_h": [sd2_text]}
    # five prefixed keys are not a checkpoint (ComfyUI's rule): nothing is set apart
    assert split([*unet[:5], "first_stage_model.x"]) == {}
    assert split(["first_stage_model.x", "layers.0.weight"]) == {}


@given(st.lists(st.sampled_from([
    *(prefix + "w" for spec in COMPONENTS for prefix in spec.prefixes),
    "conditioner.embedders.2.model.w", "cond_stage_model.other.w", "first_stage_model", "alphas_cumprod", "vae.w",
]), max_size=12))
def test_split_puts_each_key_in_at_most_one_component_by_its_prefix(extra: list[str]) -> None:
    keys = list(dict.fromkeys([f"{DIFFUSION}k{i}" for i in range(6)] + extra))
    found = split(keys)
    assert list(found) == [spec.id for spec in COMPONENTS if spec.id in found]  # table order
    listed = [key for group in found.values() for key in group]
    assert len(listed) == len(set(listed))
    prefixes = {spec.id: spec.prefixes for spec in COMPONENTS}
    assert all(key.startswith(prefixes[name]) for name, group in found.items() for key in group)
    assert {k for k in keys if components.component_of(k)} == set(listed)


def test_derived_config_groups_the_components_and_keeps_its_identifier(sd1, family) -> None:
    config = derive_config(sd1["base"])
    parts = config.components()
    assert list(parts) == [COMPONENT, "clip_l", "vae"]
    assert list(parts["clip_l"].keys()) == keys_of(sd1, "clip_l")
    assert all(key.startswith(DIFFUSION) for key in parts[COMPONENT].keys())  # noqa: SIM118 - a method here
    with safe_open(str(sd1["base"]), "pt") as f:
        assert set(config.keys()) == set(f.keys())
    assert list(derive_config(family["base"]).components()) == [COMPONENT]  # a diffusion-only file: one part


# -- the plan field -----------------------------------------------------------------------------------


CHOICES = {
    "clip_l": {"source": "model", "model": "a.safetensors"},
    "clip_g": {"source": "base"},
    "vae": {"source": "merge", "method": "weighted_sum", "alpha": 0.5},
}


def test_plan_round_trips_through_dict_json_and_files(sdxl, tmp_path) -> None:
    plan = make_plan(sdxl, components=CHOICES)
    assert plan.components == {
        "clip_l": Component("model", model=sdxl["a"]),
        "clip_g": Component("base"),
        "vae": Component("merge", method="weighted_sum", alpha=0.5),
    }
    assert plan_from_dict(plan.to_dict(), tmp_path) == plan
    assert plan_from_dict(json.loads(plan.to_json()), tmp_path) == plan
    assert plan.to_dict(relative_to=sdxl["base"].parent)["components"] == CHOICES
    assert sdxl["a"] in plan.input_files()
    saved = save_plan(plan, tmp_path / "te.json")
    assert load_plan(saved) == plan
    # a relative model path is taken against the plan file's folder, like every path of a plan
    folder = sdxl["base"].parent / "plans"
    folder.mkdir(exist_ok=True)
    data = plan.to_dict(relative_to=sdxl["base"].parent)
    data["base"], data["components"]["clip_l"]["model"] = "../base.safetensors", "../a.safetensors"
    data["rows"] = [row | {"model": f"../{row['model']}"} | ({"delta_from": f"../{row['delta_from']}"}
                                                           if row["delta_from"] else {}) for row in data["rows"]]
    (folder / "relative.json").write_text(json.dumps(data))
    assert load_plan(folder / "relative.json") == plan


def test_old_plans_read_and_write_as_before(sdxl) -> None:
    plan = make_plan(sdxl)
    assert plan.components == {}
    assert "components" not in plan.to_dict()
    assert make_plan(sdxl, components=None) == plan == make_plan(sdxl, components={})
    assert "pick_component" not in recipe_text(plan)
    assert recipe_text(make_plan(sdxl, components={})) == recipe_text(plan)


def test_merge_settings_default_to_the_plan_for_its_own_method(sdxl) -> None:
    plan = make_plan(sdxl, options={"alpha": 0.5, "theta_agg": "max", "conflict_aware": True})
    assert merge_settings(plan, Component("merge")) == ("orthomerge", plan.options)
    assert merge_settings(plan, Component("merge", alpha=0.2)) == ("orthomerge", plan.options | {"alpha": 0.2})
    assert merge_settings(plan, Component("merge", method="ties")) == (
        "ties", {"alpha": 1.0, "k": 1.0, "vote_sgn": False}
    )
    assert merge_settings(plan, Component("merge", method="ties", alpha=0)) == (
        "ties", {"alpha": 0.0, "k": 1.0, "vote_sgn": False}
    )


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ({"clip_g": {"source": "base"}}, "has no such component; it has: clip_l, vae"),
        ({"unet": {"source": "base"}}, "component 'unet': the base"),
        ({"vae": {"source": "bse"}}, "unknown source \"bse\"; did you mean 'base'? valid: base, model, merge"),
        ({"vae": {"source": "model"}}, "'model' goes with source 'model'"),
        ({"vae": {"source": "base", "model": "a.safetensors"}}, "'model' goes with source 'model'"),
        ({"vae": {"source": "base", "alpha": 0.5}}, "'method' and 'alpha' go with source 'merge' only"),
        ({"vae": {"source": "model", "model": "nope.safetensors"}}, "nope.safetensors does not exist"),
        ({"vae": {"source": "model", "model": "diffusion_only.safetensors"}}, "diffusion_only.safetensors lacks 3 of"),
        ({"vae": {"source": "merge", "method": "orthomerg"}}, "did you mean 'orthomerge'?"),
        ({"vae": {"source": "merge", "alpha": -1}}, "alpha -1 is not allowed; allowed: a number in [0, 2]"),
        ({"vae": {"source": "merge", "alpha": 50}}, "alpha 50 is not allowed; allowed: a number in [0, 2]"),
        ({"vae": {"source": "merge", "alpha": True}}, "alpha true is not allowed"),
        ({"vae": {"source": "merge", "weight": 1}}, "unknown field 'weight' in component 'vae'"),
        ({"vae": "base"}, "component 'vae' must be an object with a 'source'"),
        (["vae"], "'components' must be an object"),
    ],
)
def test_bad_components_are_refused_naming_the_plan_and_the_fix(sd1, tmp_path, choices, message) -> None:
    data = {"base": str(sd1["base"]), "method": "orthomerge", "rows": ROWS, "components": choices}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OrthoMechaError) as caught:
        plan_from_dict(data, sd1["base"].parent, path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")


def test_a_component_under_another_layouts_prefix_is_named_as_such(sd1, sdxl) -> None:
    """An SDXL checkpoint's CLIP-L (conditioner.embedders.0.transformer.) for an SD1.5 base (cond_stage_model.
    transformer.): the model does carry one, so the refusal says where each file keeps it, not that all is lacking."""
    choices = {"clip_l": {"source": "model", "model": str(sdxl["base"])}}
    with pytest.raises(OrthoMechaError) as caught:
        plan_from_dict({"base": str(sd1["base"]), "method": "orthomerge", "rows": ROWS, "components": choices},
                       sd1["base"].parent)
    message = str(caught.value)
    assert "carries its CLIP-L text encoder under 'conditioner.embedders.0.transformer.'" in message
    assert "under 'cond_stage_model.transformer.' (checkpoints of different layouts)" in message
    assert "lacks" not in message


def test_a_model_with_another_text_encoder_shape_is_refused(sd1, tmp_path) -> None:
    other = load_file(str(sd1["a"]))
    key = f"{'cond_stage_model.transformer.text_model.'}final_layer_norm.weight"
    other[key] = torch.ones(7)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(OrthoMechaError, match=r"key 'cond_stage_model.*' .* has shape \[7\], the base .* has \[32\]"):
        make_plan(sd1, components={"clip_l": {"source": "model", "model": str(tmp_path / "other.safetensors")}})


def test_a_diffusion_only_base_has_no_components(family) -> None:
    data = {"base": "base.safetensors", "method": "orthomerge", "rows": [{"model": "anime.safetensors"}],
            "components": {"vae": {"source": "base"}}}
    with pytest.raises(OrthoMechaError, match=r"it has: none \(it is a diffusion-only file\)"):
        plan_from_dict(data, family["base"].parent)


def test_own_merge_method_needs_its_rows(sd1) -> None:
    one_row = {"rows": [ROWS[0]], "components": {"vae": {"source": "merge", "method": "model_stock"}}}
    with pytest.raises(OrthoMechaError, match="component 'vae': method 'model_stock' needs at least 2 enabled rows"):
        plan_from_dict({"base": "base.safetensors", "method": "orthomerge", **one_row}, sd1["base"].parent)


def test_mixer_state_and_plan_go_both_ways(sdxl) -> None:
    from ortho_mecha import workspace

    plan = make_plan(sdxl, components=CHOICES)
    choices = workspace.ModelChoices.scan([sdxl["base"].parent])
    table = workspace.table_from_plan(plan, choices)
    assert table["components"]["clip_l"] == {"source": "model", "model": "a.safetensors", "method": None,
                                             "alpha": None}
    again = workspace.plan_from_table(table["base"], table["rows"], table["method"], table["options"],
                                      table["texture"], choices, table["components"])
    assert again.components == plan.components
    # 'merge with the plan' is the absence of a choice; an empty alpha box is the plan's alpha
    mixer = {"clip_l": {"source": "plan"}, "vae": {"source": "merge", "method": None, "alpha": float("nan")}}
    assert components.from_table(mixer, choices) == {"vae": Component("merge")}
    with pytest.raises(OrthoMechaError, match="CLIP-G text encoder: pick the model"):
        components.from_table({"clip_g": {"source": "model", "model": None}}, choices)


# -- real merges --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "flux_aio"])
def test_each_source_gives_exactly_its_tensors_and_leaves_the_rest_alone(layout, request, tmp_path) -> None:
    family = request.getfixturevalue(layout)
    texture = {"model": "c.safetensors", "alpha": 0.1, "mode": "add"}
    choices = {"clip_l": {"source": "model", "model": "a.safetensors"}, "vae": {"source": "base"}}
    if layout == "sdxl":
        choices["clip_g"] = {"source": "model", "model": "c.safetensors"}
    if layout == "flux_aio":
        choices["t5xxl"] = {"source": "model", "model": "c.safetensors"}
    got = merged_file(make_plan(family, components=choices, texture=texture), tmp_path / "chosen.safetensors")
    plain = merged_file(make_plan(family, texture=texture), tmp_path / "plain.safetensors")
    a, c, base = (load_file(str(family[n])) for n in ("a", "c", "base"))
    float_keys = [k for k in keys_of(family, "clip_l") if k != POSITION_IDS]
    assert_equal_on(got, a, float_keys)  # from a model: bit-identical, no texture added
    assert_equal_on(got, base, keys_of(family, "vae"))  # from the base: bit-identical
    if layout != "sd1":
        assert_equal_on(got, c, keys_of(family, "clip_g" if layout == "sdxl" else "t5xxl"))
    diffusion = [k for k in base if k.startswith(DIFFUSION)]
    assert_equal_on(got, plain, diffusion)  # the diffusion model does not see the choices
    assert not torch.equal(plain[float_keys[0]], a[float_keys[0]])  # and without them the encoder is merged


@pytest.mark.parametrize(("layout", "method", "alpha"), [("sd1", "weighted_sum", 0.5), ("sdxl", "ties", 0.7)])
def test_own_merge_equals_that_methods_merge_on_the_component(layout, method, alpha, request, tmp_path) -> None:
    family = request.getfixturevalue(layout)
    texture = {"model": "c.safetensors", "alpha": 0.2, "mode": "orthogonal"}
    own = {"source": "merge", "method": method, "alpha": alpha}
    got = merged_file(make_plan(family, components={"vae": own}, texture=texture), tmp_path / "own.safetensors")
    separate = make_plan(family, method, options={"alpha": alpha})  # no texture: a component's own merge has none
    expected = merged_file(separate, tmp_path / "separate.safetensors")
    assert_equal_on(got, expected, keys_of(family, "vae"))
    plain = merged_file(make_plan(family, texture=texture), tmp_path / "plain.safetensors")
    others = [k for k in plain if components.component_of(k) != "vae" and k != POSITION_IDS]
    assert_equal_on(got, plain, others)
    assert not torch.equal(got[keys_of(family, "vae")[0]], plain[keys_of(family, "vae")[0]])


def test_own_merge_without_a_method_is_the_plans_merge_at_its_own_alpha(sdxl, tmp_path) -> None:
    options = {"theta_agg": "max", "alpha": 0.9}
    got = make_plan(sdxl, options=options, components={"clip_g": {"source": "merge", "alpha": 0.4}})
    expected = make_plan(sdxl, options=options | {"alpha": 0.4})
    assert_equal_on(merged_file(got, tmp_path / "got.safetensors"), merged_file(expected, tmp_path / "exp.safetensors"),
                    keys_of(sdxl, "clip_g"))


def test_without_components_the_encoders_merge_with_the_plan_as_before(sd1, tmp_path) -> None:
    plan = make_plan(sd1, "add_difference", options={"alpha": 0.5}, merge_dtype="fp64",
                     texture={"model": "c.safetensors", "alpha": 0.2, "mode": "add"})
    got = merged_file(plan, tmp_path / "old.safetensors")
    w = {n: {k: v.double() for k, v in load_file(str(sd1[n])).items() if v.is_floating_point()}
         for n in ("base", "a", "b", "c")}
    for key in [*keys_of(sd1, "clip_l"), *keys_of(sd1, "vae")]:
        if key == POSITION_IDS:
            continue
        base = w["base"][key]
        summed = 0.8 * (w["a"][key] - base) + (w["b"][key] - w["c"][key])  # add_difference: the sum of the deltas
        expected = base + 0.5 * summed + 0.2 * (w["c"][key] - base)
        torch.testing.assert_close(got[key].double(), expected, rtol=0, atol=1e-6)


def test_cli_merge_of_a_checkpoint_with_components_passes_its_checks_and_repairs(sd1, tmp_path, cli) -> None:
    # the chosen model's text encoder holds a NaN: the merge repairs it with the base's value and says so
    poisoned = load_file(str(sd1["a"]))
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    poisoned[key][0, 0] = float("nan")
    save_file(poisoned, str(tmp_path / "poisoned.safetensors"))
    data = {"base": str(sd1["base"]), "method": "ortho_superpose", "output_dtype": "fp32",
            "rows": [{"model": str(sd1["a"])}, {"model": str(sd1["b"])}],
            "components": {"clip_l": {"source": "model", "model": "poisoned.safetensors"},
                           "vae": {"source": "merge", "method": "add_difference", "alpha": 0.3}}}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(data))
    out = tmp_path / "out.safetensors"
    result = cli("merge", plan_path, "--out", out)
    assert result.code == 0, result.err
    assert "1 key had NaN/Inf (1 element, replaced by the base's values)" in result.out
    assert "1 non-float key copied from the base" in result.out  # position_ids, as for any checkpoint
    assert "survival" in result.out
    got, base = load_file(str(out)), load_file(str(sd1["base"]))
    model = load_file(str(tmp_path / "poisoned.safetensors"))
    assert got[key][0, 0] == base[key][0, 0]
    assert torch.equal(got[key].flatten()[1:], model[key].flatten()[1:])
    assert torch.equal(got[POSITION_IDS], base[POSITION_IDS])


def test_mecha_text_and_script_reproduce_the_cli_merge_bit_for_bit(sdxl, tmp_path, cli) -> None:
    plan = make_plan(sdxl, merge_dtype="fp64", components=CHOICES,
                     texture={"model": "c.safetensors", "alpha": 0.1, "mode": "orthogonal"})
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    first, from_mecha, from_script, _ = merge_three_ways(plan_path, sdxl["base"], tmp_path, "--no-survival")
    mecha = (tmp_path / "recipe.mecha").read_text()
    assert 'merge "pick_component"' in mecha and 'merge "fallback"' in mecha
    with safe_open(str(first), "pt") as f:
        assert json.loads(f.metadata()[META_PLAN])["components"] == json.loads(plan.to_json())["components"]
    assert_same_merge(first, from_mecha, from_script)


# -- the Mixer ----------------------------------------------------------------------------------------


@pytest.fixture()
def app_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A dashboard workspace holding an SDXL checkpoint family (no demo), bound to localhost."""
    from streamlit import config

    folder = tmp_path / "workspace"
    write_checkpoint_family(folder / "models" / "ckpt", "sdxl", seed=2)
    monkeypatch.setenv("ORTHO_MECHA_WORKSPACE", str(folder))
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(folder))
    monkeypatch.delenv("ORTHO_MECHA_PASSWORD", raising=False)
    previous = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield folder
    config.set_option("server.address", previous)


def test_mixer_text_encoder_controls_edit_the_plan_and_round_trip_through_presets(app_workspace) -> None:
    from streamlit.testing.v1 import AppTest

    from ortho_mecha import ui

    models = app_workspace / "models" / "ckpt"
    preset = {
        "base": str(models / "base.safetensors"), "method": "orthomerge",
        "rows": [{"model": str(models / "a.safetensors")}, {"model": str(models / "b.safetensors")}],
        "components": {"clip_l": {"source": "model", "model": str(models / "b.safetensors")},
                       "vae": {"source": "merge", "method": "weighted_sum", "alpha": 0.5}},
    }
    (app_workspace / "plans").mkdir()
    (app_workspace / "plans" / "te.json").write_text(json.dumps(preset))
    app = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")
    at = AppTest.from_file(app, default_timeout=120)
    at.switch_page(ui.PAGES[1].path).run()
    assert not at.exception and not at.error
    at.selectbox(key="mix_preset").set_value("te").run()
    next(button for button in at.button if button.label == "Load").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    version = at.session_state["mix"]["version"]

    def widget(name: str, part: str) -> Any:  # an AppTest element
        kind = at.number_input if part == "alpha" else at.selectbox
        return kind(key=f"mix_te_{version}_{name}_{part}")

    # the preset's choices are shown, one line per component the base carries, and make the same plan
    assert [widget(n, "source").value for n in ("clip_l", "clip_g", "vae")] == ["model", "plan", "merge"]
    assert widget("clip_l", "model").value == "models/ckpt/b.safetensors"
    assert (widget("vae", "method").value, widget("vae", "alpha").value) == ("weighted_sum", 0.5)
    assert at.session_state["plan"] == load_plan(app_workspace / "plans" / "te.json")

    widget("clip_l", "source").set_value("base").run()
    widget("clip_g", "source").set_value("merge").run()
    widget("clip_g", "alpha").set_value(0.3).run()
    widget("vae", "source").set_value("plan").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    plan = at.session_state["plan"]
    assert plan.components == {"clip_l": Component("base"), "clip_g": Component("merge", alpha=0.3)}
    assert "pick_component" in recipe_text(plan)

    at.text_input(key="mix_preset_name").set_value("te two").run()
    at.button(key="mix_save").click().run()
    saved = json.loads((app_workspace / "plans" / "te two.json").read_text())
    assert saved["components"] == {"clip_l": {"source": "base"}, "clip_g": {"source": "merge", "alpha": 0.3}}

    # a base without text encoders: no such controls, and the plan has no components
    at.selectbox(key=f"mix_base_{version}").set_value("models/ckpt/diffusion_only.safetensors").run()
    assert not at.exception
    assert not [box for box in at.selectbox if box.key and box.key.startswith("mix_te_")]
    assert at.session_state["plan"].components == {}


def test_a_noise_schedule_buffer_keeps_the_bases_dtype(tmp_path: Path) -> None:
    """An SD checkpoint's top-level float buffers (``alphas_cumprod``, which A1111 samples with) are not weights:
    written in the base's float32 whatever the output dtype, with the base's values (they were rounded to fp16)."""
    from ortho_mecha.merge import output_bytes

    family = write_checkpoint_family(tmp_path, "sd1", "fp16")
    schedule = torch.cumprod(1.0 - torch.linspace(8.5e-4, 1.2e-2, 1000, dtype=torch.float64), 0).float()
    for name in ("base", "a", "b", "c"):
        tensors = load_file(str(family[name])) | {"alphas_cumprod": schedule}
        save_file(tensors, str(family[name]))
    plan = make_plan(family, "weighted_sum", output_dtype="fp16")
    out = tmp_path / "merged.safetensors"
    got = merged_file(plan, out)
    assert got["alphas_cumprod"].dtype == torch.float32 and torch.equal(got["alphas_cumprod"], schedule)
    assert got[f"{DIFFUSION}out.2.weight"].dtype == torch.float16
    assert output_bytes(plan) == out.stat().st_size  # the forecast knows the layout too
