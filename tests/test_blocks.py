"""Per-block alphas (issue 9): block groups per architecture, presets, the plan field, the recipe, real merges,
the predicted figures and the Mixer table."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sd_mecha
import torch
import tqdm
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from streamlit import config
from streamlit.testing.v1 import AppTest

from ortho_mecha import blocks, evaluate, metrics, workspace
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.merge import META_PLAN, merge_plan
from ortho_mecha.plan import METHODS, Plan, load_plan, plan_from_dict
from ortho_mecha.recipe import build_recipe, recipe_text
from ortho_mecha.validate import DIFFUSION_PREFIX, canonical_key
from tests.merge_fixtures import assert_same_merge, merge_three_ways
from tests.modelgen import write_family_files

QUIET = functools.partial(tqdm.tqdm, disable=True)
MEMBERS = ["base", "anime", "photo", "anime_v2"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family_files(tmp_path_factory.mktemp("sdxl"), "sdxl", "fp32", members=MEMBERS)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family_files(tmp_path_factory.mktemp("flux"), "flux", "fp32", members=MEMBERS)


def make_plan(paths: dict[str, Path], method: str, rows: list[dict], **extra: object) -> Plan:
    data = {"base": "base.safetensors", "method": method, "rows": rows, "merge_dtype": "fp64", **extra}
    return plan_from_dict(data, paths["base"].parent)


def merged(plan: Plan) -> dict[str, torch.Tensor]:
    out = sd_mecha.merge(build_recipe(plan), merge_dtype=torch.float64, output_dtype=torch.float64, threads=0,
                         tqdm=QUIET, check_extra_keys=False)
    return {k: v for k, v in out.items() if k != "__metadata__"}


def group_of_file_key(layout: blocks.BlockLayout, key: str) -> str | None:
    """The group of a base file's key (its canonical form); text-encoder / VAE keys of a checkpoint: none."""
    if DIFFUSION_PREFIX not in key and any(DIFFUSION_PREFIX in name for name in layout.names.values()):
        return None
    return layout.group_of(canonical_key(key.removeprefix(DIFFUSION_PREFIX)))


# --- groups per architecture ------------------------------------------------------------------------------


def test_unet_groups_are_in_mid_out_and_the_rest_is_in_none() -> None:
    keys = ["input_blocks.0.0.weight", "input_blocks.4.1.proj_in.weight", "middle_block.1.proj_in.weight",
            "output_blocks.2.0.in_layers.2.weight", "time_embed.0.weight", "label_emb.0.0.weight", "out.2.weight"]
    layout = blocks.layout_for_keys("sdxl", keys)
    assert layout.groups == ("in", "mid", "out")
    assert [layout.group_of(k) for k in keys] == ["in", "in", "mid", "out", None, None, None]


def test_flux_style_groups_are_double_and_single() -> None:
    keys = ["img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.3.linear1.weight",
            "final_layer.linear.weight", "distilled_guidance_layer.norms.0.weight"]
    for arch in ("flux1", "chroma", "flux2-klein"):
        layout = blocks.layout_for_keys(arch, keys)
        assert layout.groups == ("double", "single")
        assert [layout.group_of(k) for k in keys] == [None, "double", "single", None, None]
    # Flux.1 in diffusers' layout ("custom" to detection): the same two groups, on its own block names
    diffusers = ["x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.to_q.weight",
                 "single_transformer_blocks.3.proj_out.weight", "time_text_embed.timestep_embedder.linear_1.weight"]
    layout = blocks.layout_for_keys("custom", diffusers)
    assert layout.groups == ("double", "single")
    assert [layout.group_of(k) for k in diffusers] == [None, None, "double", "single", None]
    assert blocks.preset_alphas("structure", layout, 0.8) == {"double": 0.8, "single": 0.0}


def test_zimage_layers_are_split_into_thirds_of_the_base_layer_count() -> None:
    keys = [f"layers.{i}.attention.qkv.weight" for i in range(30)] + ["noise_refiner.0.attention.qkv.weight",
                                                                      "cap_embedder.1.weight"]
    layout = blocks.layout_for_keys("zimage", keys)
    assert layout.groups == ("layers.0-9", "layers.10-19", "layers.20-29")
    assert layout.group_of("layers.9.attention.qkv.weight") == "layers.0-9"
    assert layout.group_of("layers.10.attention.qkv.weight") == "layers.10-19"
    assert layout.group_of("noise_refiner.0.attention.qkv.weight") is None
    assert layout.group_of("cap_embedder.1.weight") is None
    assert blocks.layout_for_keys("zimage", [f"layers.{i}.w" for i in range(10)]).groups == (
        "layers.0-3", "layers.4-6", "layers.7-9")
    assert blocks.layout_for_keys("zimage", ["layers.0.w", "layers.1.w"]).groups == ("layers.0", "layers.1")
    # a range misspelt: the hint is the range holding its first layer, not the closest spelling (layers.10-19)
    with pytest.raises(OrthoMechaError, match=r"unknown block group 'layers.0-10'.*did you mean 'layers.0-9'\?"):
        layout.check({"layers.0-10": 1}, "plan.json row 1", 0.0, 1.0)
    with pytest.raises(OrthoMechaError, match=r"did you mean 'layers.20-29'\?"):
        layout.check({"layers.20-30": 1}, "plan.json row 1", 0.0, 1.0)
    # names are read in any case, so one group spelt twice is an error, not the last value silently
    with pytest.raises(OrthoMechaError, match=r"plan.json row 1: block group 'layers.0-9' is given twice"):
        layout.check({"layers.0-9": 1, "LAYERS.0-9": 0}, "plan.json row 1", 0.0, 1.0)


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=1, max_value=6))
def test_layer_ranges_cover_every_layer_once_as_evenly_as_possible(count: int, parts: int) -> None:
    ranges = blocks.split_layers(count, parts)
    assert len(ranges) == min(count, parts)
    assert [i for a, b in ranges for i in range(a, b + 1)] == list(range(count))
    sizes = [b - a + 1 for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_custom_groups_are_the_top_level_blocks() -> None:
    keys = ["embed.weight", "layers.0.attn.weight", "layers.10.attn.weight", "layers.2.ffn.weight", "head.bias"]
    layout = blocks.layout_for_keys("custom", keys)
    assert layout.groups == ("embed", "head", "layers.0", "layers.2", "layers.10")
    assert all(layout.group_of(k) is not None for k in keys)
    assert layout.group_of("layers.2.ffn.weight") == "layers.2"


def test_base_layout_reads_the_header_with_the_files_own_key_names(sdxl, flux) -> None:
    layout = blocks.base_layout(sdxl["base"])
    assert (layout.arch, layout.groups) == ("sdxl", ("in", "mid", "out"))
    assert all(name.startswith(DIFFUSION_PREFIX) for name in layout.names.values())  # TE / VAE keys: in no group
    assert layout.file_keys("mid") == [
        DIFFUSION_PREFIX + "middle_block.0.in_layers.2.weight",
        DIFFUSION_PREFIX + "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    ]
    flux_layout = blocks.base_layout(flux["base"])
    assert (flux_layout.arch, flux_layout.groups) == ("flux1", ("double", "single"))
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in flux_layout.file_keys("double")  # stored spelling


# --- presets and the table's text form --------------------------------------------------------------------


def test_presets_structure_and_style_are_complements_scaled_by_the_row_alpha() -> None:
    unet = blocks.layout_for_keys("sd1", ["input_blocks.0.0.weight", "middle_block.0.w", "output_blocks.0.0.w"])
    assert blocks.preset_alphas("structure", unet, 0.8) == {"in": 0.8, "mid": 0.8, "out": 0.0}
    assert blocks.preset_alphas("style", unet, 0.8) == {"in": 0.0, "mid": 0.0, "out": 0.8}
    assert blocks.preset_alphas("flat", unet, 0.8) == {}
    flux = blocks.layout_for_keys("flux1", ["double_blocks.0.w", "single_blocks.0.w"])
    assert blocks.preset_weights("structure", flux) == {"double": 1.0, "single": 0.0}
    custom = blocks.layout_for_keys("custom", ["embed.w", *(f"layers.{i}.w" for i in range(4))])
    structure = blocks.preset_weights("structure", custom)
    assert structure == {"layers.0": 1.0, "layers.1": 2 / 3, "layers.2": 1 / 3, "layers.3": 0.0}  # embed: row alpha
    for layout in (unet, flux, custom, blocks.layout_for_keys("zimage", [f"layers.{i}.w" for i in range(9)])):
        style = blocks.preset_weights("style", layout)
        structure = blocks.preset_weights("structure", layout)
        assert style.keys() == structure.keys() and all(style[g] + structure[g] == 1 for g in style)
    with pytest.raises(OrthoMechaError, match="unknown block preset 'bold'; valid: flat, structure, style"):
        blocks.preset_weights("bold", unet)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.-]{0,12}", fullmatch=True),
                       st.floats(min_value=0, max_value=2, allow_nan=False), max_size=6))
def test_cell_text_round_trips_exactly(block_alphas: dict[str, float]) -> None:
    assert blocks.parse_cell(blocks.format_cell(block_alphas)) == block_alphas
    assert blocks.format_cell({"in": 1.0, "out": 0.25, "mid": 1 / 3}) == "in=1, out=0.25, mid=0.3333333333333333"


def test_cell_text_errors_and_empty_cells() -> None:
    assert blocks.parse_cell(None) == {} and blocks.parse_cell(float("nan")) == {} and blocks.parse_cell(" ") == {}
    assert blocks.parse_cell("in = 1,out=0.25") == {"in": 1.0, "out": 0.25}
    for bad in ("in", "in=one", "in=1 out=0", "=1"):
        with pytest.raises(OrthoMechaError, match="write group=alpha pairs"):
            blocks.parse_cell(bad, "row 1")
    assert blocks.parse_cell("out=0,") == {"out": 0.0}  # a trailing comma: nothing more ('' could not be read)
    with pytest.raises(OrthoMechaError, match="row 1: group 'IN' is given twice"):  # the last one won silently
        blocks.parse_cell("in=0.5, IN=1", "row 1")


# --- the plan field -------------------------------------------------------------------------------------


def test_unknown_group_bad_values_and_non_objects_are_errors_naming_the_valid_groups(sdxl) -> None:
    with pytest.raises(OrthoMechaError, match=r"row 1 \(anime.safetensors\): unknown block group 'outt' for the "
                                              r"sdxl base; did you mean 'out'\? valid groups: in, mid, out"):
        make_plan(sdxl, "add_difference", [{"model": "anime.safetensors", "block_alphas": {"outt": 0}}])
    with pytest.raises(OrthoMechaError, match=r"block alpha out=2\.5 must be a number in 0–2"):
        make_plan(sdxl, "add_difference", [{"model": "anime.safetensors", "block_alphas": {"out": 2.5}}])
    with pytest.raises(OrthoMechaError, match="block alpha out=True"):
        make_plan(sdxl, "add_difference", [{"model": "anime.safetensors", "block_alphas": {"out": True}}])
    with pytest.raises(OrthoMechaError, match="'block_alphas' must be an object"):
        make_plan(sdxl, "add_difference", [{"model": "anime.safetensors", "block_alphas": [0, 1]}])


def test_block_alphas_round_trip_through_the_plan_file(sdxl, tmp_path) -> None:
    rows = [{"model": "anime.safetensors", "alpha": 0.5, "block_alphas": {"out": 0, "in": 1.5}},
            {"model": "photo.safetensors"}]
    plan = make_plan(sdxl, "ortho_superpose", rows)
    assert plan.rows[0].block_alphas == {"out": 0.0, "in": 1.5}
    capitals = make_plan(sdxl, "ortho_superpose", [{**rows[0], "block_alphas": {"OUT": 0, "In": 1.5}}, rows[1]])
    assert capitals == plan  # supermerger's IN/MID/OUT spelling names the same groups
    data = plan.to_dict()
    assert data["rows"][0]["block_alphas"] == {"out": 0.0, "in": 1.5}
    assert "block_alphas" not in data["rows"][1]
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert load_plan(path) == plan and load_plan(path).to_json() == plan.to_json()


def test_a_plan_without_block_alphas_is_written_and_recipied_as_before(sdxl) -> None:
    rows = [{"model": "anime.safetensors", "alpha": 0.7}, {"model": "photo.safetensors"}]
    old = make_plan(sdxl, "weighted_sum", rows)
    empty = make_plan(sdxl, "weighted_sum", [{**rows[0], "block_alphas": {}}, {**rows[1], "block_alphas": None}])
    assert empty == old and empty.to_json() == old.to_json() and "block_alphas" not in old.to_json()
    assert recipe_text(empty) == recipe_text(old)
    # no per-key literal: the only fallbacks are the rows' zero deltas on keys their files lack
    assert recipe_text(old).count('merge "fallback"') == len(rows) and "dict model" not in recipe_text(old)


# --- real merges ----------------------------------------------------------------------------------------


def _rows_for() -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(rows with block alphas, rows as the out group sees them, as the in group sees them, plain rows)."""
    photo = {"model": "photo.safetensors", "alpha": 0.7, "block_alphas": {"in": 1.25}}
    anime = {"model": "anime.safetensors", "alpha": 0.9, "repeat": 2, "block_alphas": {"out": 0, "in": 0.5}}
    third = {"model": "anime_v2.safetensors", "delta_from": "anime.safetensors"}
    listed = [anime, photo, third]
    strip = [{k: v for k, v in row.items() if k != "block_alphas"} for row in listed]
    as_out = [{**strip[0], "alpha": 0.0}, strip[1], strip[2]]
    as_in = [{**strip[0], "alpha": 0.5}, {**strip[1], "alpha": 1.25}, strip[2]]
    return listed, as_out, as_in, strip


# One method of each way rows are coupled (recipe._coefficients): normalised, n-scaled, scaled by repeat, listed.
@pytest.mark.parametrize("method", ["weighted_sum", "add_difference", "ortho_superpose", "orthomerge", "ties"])
def test_block_alphas_land_only_in_their_blocks(sdxl, method: str) -> None:
    listed, as_out, as_in, plain = (make_plan(sdxl, method, rows) for rows in _rows_for())
    layout = blocks.base_layout(sdxl["base"])
    got, out_ref, in_ref, plain_ref = merged(listed), merged(as_out), merged(as_in), merged(plain)
    groups = {key: group_of_file_key(layout, key) for key in got}
    assert {"in", "out", "mid", None} <= set(groups.values())
    for key, value in got.items():
        reference = {"out": out_ref, "in": in_ref}.get(groups[key], plain_ref)
        assert torch.equal(value, reference[key]), (method, key, groups[key])
    changed = [k for k in got if groups[k] in ("in", "out") and not torch.equal(got[k], plain_ref[k])]
    assert len(changed) == sum(groups[k] in ("in", "out") for k in got)  # every key of a listed group moved


def test_out_zero_gives_the_base_in_the_out_blocks_and_merges_the_rest(sdxl) -> None:
    plan = make_plan(sdxl, "add_difference", [{"model": "anime.safetensors", "block_alphas": {"out": 0}}])
    layout = blocks.base_layout(sdxl["base"])
    got = merged(plan)
    with safe_open(str(sdxl["base"]), "pt") as f:
        base = {k: f.get_tensor(k).to(torch.float64) for k in f.keys()}  # noqa: SIM118 - not iterable
    for key, value in got.items():
        if group_of_file_key(layout, key) == "out":
            assert torch.equal(value, base[key]), key
        else:
            assert not torch.equal(value, base[key]), key


def test_flux_single_blocks_at_zero_keep_the_base_under_ortho_superpose(flux) -> None:
    rows = [{"model": "anime.safetensors", "block_alphas": {"single": 0}}, {"model": "photo.safetensors"}]
    got = merged(make_plan(flux, "ortho_superpose", rows))
    zero = merged(make_plan(flux, "ortho_superpose", [{"model": "anime.safetensors", "alpha": 0},
                                                     {"model": "photo.safetensors"}]))
    plain = merged(make_plan(flux, "ortho_superpose", [{"model": "anime.safetensors"}, {"model": "photo.safetensors"}]))
    for key, value in got.items():
        assert torch.equal(value, (zero if key.startswith("single_blocks.") else plain)[key]), key


def test_recipe_uses_sd_mechas_literal_and_fallback_listing_only_the_groups_keys(sdxl) -> None:
    rows = [{"model": "anime.safetensors", "alpha": 0.5, "block_alphas": {"mid": 1.5}}]
    text = recipe_text(make_plan(sdxl, "ortho_project", rows))
    dicts = [line for line in text.splitlines() if line.startswith("dict ") and "middle_block" in line]
    assert dicts == [f"dict {DIFFUSION_PREFIX}middle_block.0.in_layers.2.weight=1.5 "
                     f"{DIFFUSION_PREFIX}middle_block.1.transformer_blocks.0.attn1.to_q.weight=1.5"]
    assert 'merge "fallback"' in text and "dict key=0.5" in text


def test_weighted_sum_stays_a_weighted_mean_within_each_group(sdxl) -> None:
    rows = [{"model": "anime.safetensors", "block_alphas": {"out": 0}}, {"model": "photo.safetensors", "alpha": 0.5}]
    got = merged(make_plan(sdxl, "weighted_sum", rows))
    photo_only = merged(make_plan(sdxl, "weighted_sum", [{"model": "photo.safetensors"}]))
    layout = blocks.base_layout(sdxl["base"])
    for key in got:
        if group_of_file_key(layout, key) == "out":  # anime's weight 0 there: photo's delta alone, not halved
            torch.testing.assert_close(got[key], photo_only[key], rtol=0, atol=1e-12)


def test_cli_merge_mecha_file_and_script_agree_bit_for_bit(sdxl, tmp_path) -> None:
    rows = [{"model": "anime.safetensors", "alpha": 0.8, "block_alphas": {"out": 0.25, "in": 1.5}},
            {"model": "photo.safetensors", "block_alphas": {"mid": 0}}]
    plan = make_plan(sdxl, "orthomerge", rows, output_dtype="fp32")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    first, from_mecha, from_script, _ = merge_three_ways(plan_path, sdxl["base"], tmp_path)
    with safe_open(str(first), "pt") as f:
        reference = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not iterable
        assert json.loads(f.metadata()[META_PLAN])["rows"][1]["block_alphas"] == {"mid": 0.0}
    assert_same_merge(first, from_mecha, from_script)
    plain = tmp_path / "plain.safetensors"
    merge_plan(make_plan(sdxl, "orthomerge", [{k: v for k, v in r.items() if k != "block_alphas"} for r in rows],
                         output_dtype="fp32"), plain)
    with safe_open(str(plain), "pt") as f:
        assert not all(torch.equal(f.get_tensor(k), reference[k]) for k in reference)


# --- predicted figures ------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=2**31 - 1), st.sampled_from(sorted(METHODS)))
def test_per_key_weights_equal_to_the_row_weights_predict_what_row_weights_do(seed: int, method: str) -> None:
    generator = np.random.default_rng(seed)
    x = generator.normal(size=(5, 3, 7))  # 5 keys, 3 rows
    grams = np.einsum("kil,kjl->kij", x, x)
    weights = generator.uniform(0.1, 2.0, size=3)
    repeats = [1, 2, 1]
    flat = metrics.predicted_survival(grams, method, weights, {}, repeats)
    keyed = metrics.predicted_survival(grams, method, np.tile(weights, (5, 1)), {}, repeats)
    np.testing.assert_array_equal(flat, keyed)


def test_per_key_weights_scale_each_keys_contribution_by_hand() -> None:
    grams = np.array([[[4.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 9.0]]])  # 2 keys, 2 orthogonal rows
    weights = np.array([[1.0, 0.5], [0.0, 2.0]])
    got = metrics.predicted_survival(grams, "add_difference", weights, {"alpha": 1.0})
    np.testing.assert_allclose(got, [(4 * 1 + 1 * 0) / 5, (1 * 0.5 + 9 * 2) / 10])


def test_predicted_survival_with_block_alphas_matches_the_measured(flux, tmp_path) -> None:
    rows = [{"model": str(flux["anime"]), "block_alphas": {"single": 0.25}},
            {"model": str(flux["photo"]), "alpha": 0.8, "block_alphas": {"double": 0}},
            {"model": str(flux["anime_v2"]), "delta_from": str(flux["anime"]), "block_alphas": {"double": 2}}]
    plan = plan_from_dict({"base": str(flux["base"]), "method": "ortho_superpose", "rows": rows,
                           "output_dtype": "fp32", "merge_dtype": "fp64"}, tmp_path)
    plain = plan_from_dict({"base": str(flux["base"]), "method": "ortho_superpose",
                            "rows": [{k: v for k, v in r.items() if k != "block_alphas"} for r in rows]}, tmp_path)
    out = tmp_path / "merged.safetensors"
    merge_plan(plan, out)
    after = evaluate.measure(plan, out)
    assert after["label"] == "exact"
    assert np.abs(np.array(after["measured"]) - np.array(after["predicted"])).max() < 0.01
    assert np.abs(np.array(after["predicted"]) - np.array(evaluate.predict(plain)["predicted"])).max() > 0.1


# --- the Mixer table and its figures ----------------------------------------------------------------------


def test_table_round_trips_block_alphas_and_figures_follow_them(flux) -> None:
    choices = workspace.ModelChoices.scan((flux["base"].parent,))
    plan = make_plan(flux, "add_difference", [{"model": "anime.safetensors", "block_alphas": {"single": 0}},
                                              {"model": "photo.safetensors"}])
    table = workspace.table_from_plan(plan, choices)
    assert [row["block_alphas"] for row in table["rows"]] == ["single=0", ""]
    again = workspace.plan_from_table(table["base"], table["rows"], table["method"], table["options"],
                                      table["texture"], choices)
    assert again.rows == plan.rows
    bad = [{**table["rows"][0], "block_alphas": "singel=0"}]
    with pytest.raises(OrthoMechaError, match=r"unknown block group 'singel'.*did you mean 'single'"):
        workspace.plan_from_table(table["base"], bad, "add_difference", {}, None, choices)

    from ortho_mecha.analysis import analyse

    analysis = analyse(plan.base, [flux["anime"], flux["photo"]])
    with_blocks = workspace.mix_predictions(workspace.row_gram(analysis, table["rows"], choices), "add_difference", {})
    plain_rows = [{**row, "block_alphas": ""} for row in table["rows"]]
    plain = workspace.mix_predictions(workspace.row_gram(analysis, plain_rows, choices), "add_difference", {})
    column = "survival (exact)"
    weight = {k: np.array([0.0 if k.startswith("single_blocks.") else 1.0, 1.0]) for k in analysis.h_key}
    along = sum(h[:2, :2] @ weight[k] for k, h in analysis.h_key.items())  # <Δ_k, δ_ik> summed over the keys
    own = sum(np.diag(h[:2, :2]) for h in analysis.h_key.values())
    np.testing.assert_allclose(with_blocks[0][column], along / own, rtol=1e-9)
    assert with_blocks[0][column][0] < plain[0][column][0] - 0.1
    assert not np.allclose(with_blocks[1], plain[1])  # interference follows the per-key weights too
    boosted = workspace.mix_predictions(workspace.row_gram(analysis, table["rows"], choices), "add_difference", {},
                                        texture=True)[0]
    assert "survival (exact, before the texture boost)" in boosted.columns  # as the Merge page labels it


# --- the Mixer's Block alphas section under AppTest -----------------------------------------------------------

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


@pytest.fixture()
def dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A workspace with a small SDXL family and a saved two-row plan; the app bound to loopback."""
    root = tmp_path / "workspace"
    monkeypatch.setenv("ORTHO_MECHA_WORKSPACE", str(root))
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(root))
    monkeypatch.delenv("ORTHO_MECHA_PASSWORD", raising=False)
    write_family_files(root / "models" / "fam", "sdxl", "fp16", members=["base", "anime", "photo"])
    (root / "plans").mkdir(parents=True)
    rows = [{"model": "../models/fam/anime.safetensors", "alpha": 0.8}, {"model": "../models/fam/photo.safetensors"}]
    (root / "plans" / "start.json").write_text(json.dumps(
        {"base": "../models/fam/base.safetensors", "method": "add_difference", "rows": rows}))
    previous = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield root
    config.set_option("server.address", previous)


def _load(at: AppTest, preset: str) -> None:
    at.selectbox(key="mix_preset").set_value(preset).run()
    next(button for button in at.button if button.label == "Load").click().run()
    assert not at.exception and not [e.value for e in at.error]


def test_mixer_block_alphas_presets_inputs_chart_and_preset_round_trip(dashboard: Path) -> None:
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("pages/mixer.py").run()
    _load(at, "start")
    assert [row.block_alphas for row in at.session_state["plan"].rows] == [{}, {}]
    assert any("sdxl groups: in, mid, out" in caption.value for caption in at.caption)

    at.selectbox(key="mix_block_preset").set_value("structure").run()
    at.button(key="mix_block_apply").click().run()  # row 1 (anime, alpha 0.8)
    at.selectbox(key="mix_block_row").set_value(1).run()
    at.selectbox(key="mix_block_preset").set_value("style").run()
    at.button(key="mix_block_apply").click().run()
    assert not at.exception and not [e.value for e in at.error]
    plan = at.session_state["plan"]
    assert [row.block_alphas for row in plan.rows] == [{"in": 0.8, "mid": 0.8, "out": 0.0},
                                                       {"in": 0.0, "mid": 0.0, "out": 1.0}]

    version = at.session_state["mix"]["version"]
    assert at.number_input(key=f"mix_block_{version}_1_out").value == 1.0
    at.number_input(key=f"mix_block_{version}_1_mid").set_value(0.5).run()
    at.number_input(key=f"mix_block_{at.session_state['mix']['version']}_1_in").set_value(1.5).run()
    assert at.session_state["plan"].rows[1].block_alphas == {"in": 1.5, "mid": 0.5, "out": 1.0}
    charts = [chart for chart in at.get("vega_lite_chart") if "alpha per block group" in chart.proto.spec]
    assert len(charts) == 1
    assert all(f'"{group}"' in charts[0].proto.spec for group in ("in", "mid", "out"))  # the x axis's order

    at.text_input(key="mix_preset_name").set_value("blocks").run()
    at.button(key="mix_save").click().run()
    saved = json.loads((dashboard / "plans" / "blocks.json").read_text())
    assert [row.get("block_alphas") for row in saved["rows"]] == [{"in": 0.8, "mid": 0.8, "out": 0.0},
                                                                 {"in": 1.5, "mid": 0.5, "out": 1.0}]
    expected = at.session_state["plan"]
    _load(at, "start")
    assert at.session_state["plan"].rows[0].block_alphas == {}
    _load(at, "blocks")
    assert at.session_state["plan"] == expected


def test_the_alpha_chart_lists_rows_in_the_tables_order() -> None:
    """Its legend was sorted as text: "10: …" came before "2: …"."""
    layout = blocks.layout_for_keys("zimage", [f"layers.{i}.w" for i in range(9)])
    labels = [f"{n}: model{n}" for n in range(1, 12)]
    frame = blocks.alpha_frame(labels, [1.0] * 11, [{}] * 11, layout)
    spec = blocks.alpha_chart(frame, layout.groups).to_dict()
    assert spec["layer"][0]["encoding"]["color"]["sort"] == labels
