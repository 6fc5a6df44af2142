"""LoRA rows: a kohya LoRA file as a row whose delta is its product, in analysis, plans, merges and the Mixer.

Every expected delta is formed here independently, in float64: ``up.flatten(1) @ down.flatten(1) · alpha / r``
reshaped to the base key (alpha missing: scale 1), the way ComfyUI applies a kohya LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sd_mecha
import torch
from safetensors.torch import load_file, save_file

from ortho_mecha.analysis import analyse, report
from ortho_mecha.demo import family_weights, low_rank_delta, random_base, sdxl_layout
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.lora import extract_lora
from ortho_mecha.lora_rows import diffusers_unet_key, is_lora_file
from ortho_mecha.mecha_config import register_base_config
from ortho_mecha.merge import META_RECIPE, execute, merge_plan
from ortho_mecha.optimize import plan_from_report
from ortho_mecha.plan import plan_from_dict
from ortho_mecha.recipe import recipe_text, write_recipe
from ortho_mecha.workspace import (
    LORA_INFO,
    ModelChoices,
    lora_labels,
    mix_predictions,
    plan_from_table,
    row_gram,
    table_from_plan,
)

PREFIX = "model.diffusion_model."
ROOT = Path(__file__).resolve().parent.parent

# canonical key → (rank, alpha or None) of the hand-made SDXL LoRA: linear, cross-attention, conv and mid keys
HAND = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (4, 2.0),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (2, None),
    "input_blocks.1.0.in_layers.2.weight": (3, 1.5),
    "middle_block.1.transformer_blocks.0.attn1.to_q.weight": (2, 8.0),
    "output_blocks.3.1.proj_out.weight": (3, None),
}
# the same modules in kohya's older diffusers spelling
DIFFUSERS = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "input_blocks.1.0.in_layers.2.weight": "lora_unet_down_blocks_0_resnets_0_conv1",
    "middle_block.1.transformer_blocks.0.attn1.to_q.weight":
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
    "output_blocks.3.1.proj_out.weight": "lora_unet_up_blocks_1_attentions_0_proj_out",
}
TE_MODULE = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def kohya_name(canon: str) -> str:
    return "lora_unet_" + canon.removesuffix(".weight").replace(".", "_")


def expected_delta(lora: dict[str, torch.Tensor], module: str, shape: tuple[int, ...]) -> torch.Tensor:
    up = lora[f"{module}.lora_up.weight"].to(torch.float64)
    down = lora[f"{module}.lora_down.weight"].to(torch.float64)
    scale = float(lora[f"{module}.alpha"]) / down.shape[0] if f"{module}.alpha" in lora else 1.0
    return (up.flatten(1) @ down.flatten(1) * scale).reshape(shape)


def hand_lora(shapes: dict[str, tuple[int, ...]], names: dict[str, str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Rank 2–4 modules (with and without alpha, a conv key) under ``names``, plus a text-encoder module."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for canon, (rank, alpha) in HAND.items():
        shape = shapes[canon]
        module = names[canon]
        tensors[f"{module}.lora_down.weight"] = 0.2 * torch.randn(rank, *shape[1:], generator=generator)
        tensors[f"{module}.lora_up.weight"] = 0.2 * torch.randn(shape[0], rank, *[1] * (len(shape) - 2),
                                                               generator=generator)
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
    tensors[f"{TE_MODULE}.lora_down.weight"] = torch.randn(2, 64, generator=generator)
    tensors[f"{TE_MODULE}.lora_up.weight"] = torch.randn(256, 2, generator=generator)
    return tensors


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An SDXL-checkpoint-layout base and fine-tune (fp32), a hand-made LoRA in both spellings."""
    folder = tmp_path_factory.mktemp("sdxl")
    weights = family_weights("sdxl", seed=3)
    paths = {name: save(folder / f"{name}.safetensors", {k: v.float() for k, v in weights[name].items()})
             for name in ("base", "anime", "photo")}
    shapes = {k.removeprefix(PREFIX): tuple(v.shape) for k, v in weights["base"].items() if k.startswith(PREFIX)}
    paths["lora"] = save(folder / "hand_lora.safetensors", hand_lora(shapes, {k: kohya_name(k) for k in HAND}))
    paths["lora_diffusers"] = save(folder / "hand_lora_diffusers.safetensors", hand_lora(shapes, DIFFUSERS))
    return paths


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Flux-layout base, a fine-tune changing matrices only (rank 4) and a LoRA extracted exactly from it."""
    folder = tmp_path_factory.mktemp("flux")
    generator = torch.Generator().manual_seed(5)
    from ortho_mecha.demo import flux_layout

    base = random_base(flux_layout(), generator)
    delta = low_rank_delta(base, generator, rank=4, noise=0.0)
    tuned = {k: w + delta[k] if w.ndim >= 2 else w for k, w in base.items()}
    paths = {
        "base": save(folder / "base.safetensors", {k: v.float() for k, v in base.items()}),
        "tuned": save(folder / "tuned.safetensors", {k: v.float() for k, v in tuned.items()}),
    }
    paths["lora"] = folder / "tuned_lora.safetensors"
    extract_lora(paths["tuned"], paths["base"], 8, paths["lora"], dtype="fp32")
    return paths


def brute_force(sdxl: dict[str, Path], rows: list[str]) -> np.ndarray:
    """The rows' float64 delta Gram: a LoRA's product on its keys (0 elsewhere), ``model − base`` otherwise."""
    base = {k.removeprefix(PREFIX): v.to(torch.float64) for k, v in load_file(str(sdxl["base"])).items()
            if k.startswith(PREFIX)}
    flats = []
    for name in rows:
        data = load_file(str(sdxl[name]))
        if is_lora_file(sdxl[name]):
            names = DIFFUSERS if name == "lora_diffusers" else {k: kohya_name(k) for k in HAND}
            parts = [expected_delta(data, names[k], w.shape) if k in HAND else torch.zeros_like(w)
                     for k, w in base.items()]
        else:
            parts = [data[PREFIX + k].to(torch.float64) - w for k, w in base.items()]
        flats.append(torch.cat([p.flatten() for p in parts]))
    x = torch.stack(flats)
    return (x @ x.T).numpy()


def cosine(g: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.diag(g))
    return g / np.outer(d, d)


# -- mapping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("canon", "diffusers"), [
    ("input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
    ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
    ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
    ("output_blocks.3.0.skip_connection.weight", "up_blocks.1.resnets.0.conv_shortcut.weight"),
    ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),  # SD1: no attention at level 0
    ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
    ("output_blocks.7.1.transformer_blocks.0.ff.net.2.weight",
     "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2.weight"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("out.2.weight", "conv_out.weight"),
    ("double_blocks.0.img_attn.qkv.weight", None),
    ("layers.3.attn.out.weight", None),
])
def test_diffusers_spelling_of_unet_keys(canon: str, diffusers: str | None) -> None:
    assert diffusers_unet_key(canon) == diffusers


def test_detection_from_the_header(sdxl, flux) -> None:
    assert is_lora_file(sdxl["lora"]) and is_lora_file(flux["lora"])
    assert not is_lora_file(sdxl["base"]) and not is_lora_file(flux["tuned"])


# -- analysis -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exact", "tol"), [(False, 1e-5), (True, 1e-9)])
def test_lora_row_of_h_equals_brute_force_float64(sdxl, exact: bool, tol: float) -> None:
    rows = ["anime", "lora", "photo"]
    rep = report(analyse(sdxl["base"], [sdxl[r] for r in rows], exact=exact, rank_samples=2, use_cache=False))
    expected = brute_force(sdxl, rows)
    np.testing.assert_allclose(rep["gram"], expected, rtol=tol, atol=tol * np.abs(expected).max())
    np.testing.assert_allclose(rep["cos"], cosine(expected), atol=tol)
    np.testing.assert_allclose(rep["norms"], np.sqrt(np.diag(expected)), rtol=tol)
    assert rep["lora"] == [False, True, False]
    assert not rep["null"][1]
    assert rep["conflict_ratio"][0][1] > 0  # sign conflicts counted on the LoRA's keys like any row's
    assert len(rep["signal"]["effective_rank"]) == 3


def test_diffusers_named_lora_is_the_same_row(sdxl) -> None:
    rep = report(analyse(sdxl["base"], [sdxl["lora"], sdxl["lora_diffusers"]], exact=True, use_cache=False))
    np.testing.assert_allclose(rep["cos"][0][1], 1.0, atol=1e-12)
    np.testing.assert_allclose(rep["norms"][0], rep["norms"][1], rtol=1e-12)


def test_lora_extracted_from_a_fine_tune_points_where_it_does(flux) -> None:
    rep = report(analyse(flux["base"], [flux["tuned"], flux["lora"]], use_cache=False))
    assert rep["cos"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert rep["norms"][1] == pytest.approx(rep["norms"][0], rel=1e-5)
    check = rep["validation"]["models"][1]
    assert check["lora"]["mapped_keys"] == check["shared"] > 0
    assert 4 <= check["lora"]["rank"] <= 8  # the planted rank 4, plus float32 rounding directions at most


def test_validation_reports_mapped_and_set_aside_modules(sdxl, cli, tmp_path) -> None:
    rep = report(analyse(sdxl["base"], [sdxl["lora"]], use_cache=False))
    summary = rep["validation"]["models"][0]["lora"]
    assert summary["mapped_keys"] == len(HAND) and summary["set_aside"] == 1 and summary["unmatched"] == 0
    assert summary["set_aside_examples"] == [TE_MODULE]
    result = cli("validate", "--base", sdxl["base"], sdxl["lora"])
    assert result.code == 0
    assert f"kohya LoRA (rank ≤ 4): {len(HAND)} modules mapped" in result.out
    assert "1 text-encoder modules set aside" in result.out
    plan = tmp_path / "lora_plan.json"  # merge says the same, not "keys the base does not have"
    plan.write_text(json.dumps({"base": str(sdxl["base"]), "method": "ortho_superpose",
                                "rows": [{"model": str(sdxl["lora"])}]}), encoding="utf-8")
    merged = cli("merge", plan, "--out", tmp_path / "lora_merged.safetensors", "--no-survival")
    assert merged.code == 0, merged.err
    assert "set aside: 1 text-encoder modules of LoRA rows" in merged.out and "ignored:" not in merged.out


def test_cached_analysis_adds_a_lora_as_one_new_row(sdxl) -> None:
    first = analyse(sdxl["base"], [sdxl["anime"], sdxl["photo"]])
    second = analyse(sdxl["base"], [sdxl["anime"], sdxl["photo"], sdxl["lora"]])
    again = analyse(sdxl["base"], [sdxl["anime"], sdxl["photo"], sdxl["lora"]])
    assert first.bytes_read > 0 and second.bytes_read > 0 and again.bytes_read == 0
    np.testing.assert_array_equal(again.h, second.h)
    np.testing.assert_allclose(second.h[:2, :2], first.h, rtol=1e-12)


def test_lora_and_delta_from_are_refused_in_analysis(sdxl) -> None:
    with pytest.raises(OrthoMechaError, match="is a LoRA: its delta is its product"):
        analyse(sdxl["base"], [sdxl["lora"], sdxl["anime"]], {str(sdxl["lora"]): str(sdxl["anime"])})
    with pytest.raises(OrthoMechaError, match="a LoRA \\(a delta, not a model\\)"):
        analyse(sdxl["base"], [sdxl["anime"], sdxl["lora"]], {str(sdxl["anime"]): str(sdxl["lora"])})
    with pytest.raises(OrthoMechaError, match="a LoRA \\(a delta, not a model\\)"):  # as an extra delta-from file
        analyse(sdxl["base"], [sdxl["anime"]], {str(sdxl["anime"]): str(sdxl["lora"])})
    with pytest.raises(OrthoMechaError, match="is a LoRA; the base must be a full model") as refused:
        analyse(sdxl["lora"], [sdxl["anime"]], use_cache=False)
    assert refused.value.path == str(sdxl["lora"])


# -- errors on the file itself ----------------------------------------------------------------------------------


def test_lora_for_another_model_names_unmatched_modules(sdxl, flux) -> None:
    with pytest.raises(OrthoMechaError, match=r"match no key, e.g. lora_unet_") as error:
        analyse(sdxl["base"], [flux["lora"]], use_cache=False)
    assert str(flux["lora"]) in str(error.value) and "Give the base it was trained on" in str(error.value)


def test_flux_loras_in_diffusers_or_peft_names_are_named_for_what_they_are(flux, tmp_path) -> None:
    kohya = load_file(str(flux["lora"]))
    renamed = {k.replace("lora_unet_", "lora_transformer_"): v for k, v in kohya.items()}
    diffusers = save(tmp_path / "diffusers_names.safetensors", renamed)
    with pytest.raises(OrthoMechaError, match=r"module names are diffusers' \(lora_transformer_…\).*lora_unet_"):
        analyse(flux["base"], [diffusers], use_cache=False)
    peft = save(tmp_path / "peft.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)})
    with pytest.raises(OrthoMechaError, match=rf"{peft}: is a LoRA in PEFT/diffusers key names"):
        analyse(flux["base"], [peft], use_cache=False)


@pytest.mark.parametrize(("suffixes", "what"), [
    ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"), "a LyCORIS LoHa adapter"),
    ((".lokr_w1", ".lokr_w2"), "a LyCORIS LoKr adapter"),
    ((".diff", ".diff_b"), "a full-difference adapter"),
])
def test_adapters_of_other_formats_are_named_for_what_they_are(flux, tmp_path, suffixes, what, cli_error) -> None:
    """A LoHa, LoKr or ComfyUI .diff file was "custom, is it the same architecture?", blaming the base."""
    module = "lora_unet_single_blocks_0_linear1"
    adapter = save(tmp_path / "adapter.safetensors", {module + suffix: torch.zeros(4, 4) for suffix in suffixes})
    with pytest.raises(OrthoMechaError, match=rf"{adapter}: is {what}.*not a model or a kohya LoRA"):
        analyse(flux["base"], [adapter], use_cache=False)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": str(flux["base"]), "method": "ortho_superpose",
                                "rows": [{"model": str(adapter)}]}), encoding="utf-8")
    assert f"is {what}" in cli_error("merge", plan, "--out", tmp_path / "out.safetensors")


def test_a_few_unmatched_modules_are_reported_not_fatal(flux, tmp_path) -> None:
    tensors = load_file(str(flux["lora"]))
    modules = {k.partition(".")[0] for k in tensors}
    assert len(modules) >= 20  # one stray module is within MAX_UNMATCHED
    tensors["lora_unet_not_in_this_model.lora_down.weight"] = torch.ones(1, 3)
    tensors["lora_unet_not_in_this_model.lora_up.weight"] = torch.ones(3, 1)
    path = save(tmp_path / "stray.safetensors", tensors)
    rep = report(analyse(flux["base"], [flux["lora"], path], use_cache=False))
    assert rep["validation"]["models"][1]["lora"]["unmatched_examples"] == ["lora_unet_not_in_this_model"]
    assert rep["cos"][0][1] == pytest.approx(1.0, abs=1e-9)


def test_a_lora_is_refused_only_when_most_of_its_modules_match_no_key(flux, tmp_path) -> None:
    # a Flux LoRA on Chroma (no modulation layers) leaves about a third of its modules unmatched, and ComfyUI applies
    # the rest: refused at 5 %, it is taken (and its unmatched modules said); most modules unmatched: another model
    tensors = load_file(str(flux["lora"]))
    modules = sorted({k.partition(".")[0] for k in tensors})

    def with_strays(count: int) -> Path:
        stray = dict(tensors)
        for i in range(count):
            stray[f"lora_unet_not_here_{i}.lora_down.weight"] = torch.ones(1, 3)
            stray[f"lora_unet_not_here_{i}.lora_up.weight"] = torch.ones(3, 1)
        return save(tmp_path / f"stray{count}.safetensors", stray)

    third = with_strays(len(modules) // 2)  # a third of all modules
    rep = report(analyse(flux["base"], [third], use_cache=False))
    assert rep["validation"]["models"][0]["lora"]["unmatched"] == len(modules) // 2
    with pytest.raises(OrthoMechaError, match="diffusion modules match no key"):
        analyse(flux["base"], [with_strays(len(modules) + 1)], use_cache=False)


@pytest.mark.parametrize(("tensors", "message"), [
    ({"lora_unet_img_in.hada_w1_a": torch.ones(2, 2), "lora_unet_img_in.lora_down.weight": torch.ones(1, 64)},
     "LyCORIS"),
    ({"lora_unet_img_in.lora_down.weight": torch.ones(1, 64)}, "has no 'lora_up.weight'"),
    ({"lora_unet_img_in.lora_down.weight": torch.ones(2, 64), "lora_unet_img_in.lora_up.weight": torch.ones(64, 3)},
     "do not form a product"),
    ({"lora_unet_img_in.lora_down.weight": torch.ones(2, 65), "lora_unet_img_in.lora_up.weight": torch.ones(64, 2)},
     "does not fit 'img_in.weight'"),
    ({"lora_unet_img_in.lora_down.weight": torch.ones(2, 64), "lora_unet_img_in.lora_up.weight": torch.ones(64, 2),
      "lora_unet_img_in.alpha": torch.ones(2)}, "alpha holds 2 values"),
    ({"lora_te1_x.lora_down.weight": torch.ones(2, 4), "lora_te1_x.lora_up.weight": torch.ones(4, 2)},
     "no diffusion \\(lora_unet_\\*\\) modules"),
])
def test_broken_lora_files_are_refused(flux, tmp_path, tensors: dict, message: str) -> None:
    path = save(tmp_path / "broken.safetensors", tensors)
    with pytest.raises(OrthoMechaError, match=message) as error:
        analyse(flux["base"], [path], use_cache=False)
    assert error.value.path == str(path)


# -- plans and merges ---------------------------------------------------------------------------------------------


def materialise(sdxl: dict[str, Path], folder: Path) -> Path:
    """base + the LoRA's product as a full model (float64, so the subtraction in the merge gives it back)."""
    base = load_file(str(sdxl["base"]))
    lora = load_file(str(sdxl["lora"]))
    out = {}
    for key, value in base.items():
        canon = key.removeprefix(PREFIX)
        delta = expected_delta(lora, kohya_name(canon), value.shape) if canon in HAND and key != canon else 0.0
        out[key] = value.to(torch.float64) + delta
    return save(folder / "materialised.safetensors", out)


def plan_for(sdxl: dict[str, Path], method: str, model: Path, **extra: object):
    rows = [{"model": str(model), "alpha": 0.7}, {"model": str(sdxl["anime"]), "repeat": 2}]
    return plan_from_dict({"base": str(sdxl["base"]), "method": method, "rows": rows, "merge_dtype": "fp64",
                           "output_dtype": "fp32", **extra}, sdxl["base"].parent)


@pytest.mark.parametrize("method", ["weighted_sum", "ortho_superpose"])
def test_merge_with_a_lora_row_equals_the_materialised_product(sdxl, tmp_path, method: str) -> None:
    with_lora, with_model = tmp_path / "lora.safetensors", tmp_path / "model.safetensors"
    report_lora = merge_plan(plan_for(sdxl, method, sdxl["lora"]), with_lora)
    merge_plan(plan_for(sdxl, method, materialise(sdxl, tmp_path)), with_model)
    got, want = load_file(str(with_lora)), load_file(str(with_model))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
    base = load_file(str(sdxl["base"]))
    assert not torch.equal(got[PREFIX + next(iter(HAND))], base[PREFIX + next(iter(HAND))])
    lora_input = next(i for i in report_lora["inputs"] if i["path"] == str(sdxl["lora"]))
    assert lora_input["shared"] == len(HAND) and lora_input["extra"] == 0 and lora_input["set_aside"] == 1  # TE module
    assert report_lora["repairs"]["missing"] == []  # untouched keys got a zero delta, not a copy of the base


def test_diffusers_named_lora_merges_like_the_original_names(sdxl, tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge_plan(plan_for(sdxl, "add_difference", sdxl["lora"]), a)
    merge_plan(plan_for(sdxl, "add_difference", sdxl["lora_diffusers"]), b)
    got, want = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mecha_file_and_script_reproduce_a_lora_merge(sdxl, tmp_path) -> None:
    plan = plan_for(sdxl, "ortho_superpose", sdxl["lora"])
    first, from_mecha, from_script = (tmp_path / f"{n}.safetensors" for n in ("first", "mecha", "script"))
    mecha, script = tmp_path / "recipe.mecha", tmp_path / "merge.py"
    merge_plan(plan, first)
    write_recipe(plan, mecha, script)
    text = mecha.read_text()
    assert "_kohya_lora-ortho_mecha" in text and 'merge "fallback"' in text
    register_base_config(sdxl["base"])
    execute(sd_mecha.deserialize_path(mecha), from_mecha, base=sdxl["base"], merge_dtype="fp64", output_dtype="fp32")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script), str(from_script)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    reference = load_file(str(first))
    for path in (from_mecha, from_script):
        tensors = load_file(str(path))
        assert all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert recipe_text(plan) in load_meta(first)


def load_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()[META_RECIPE]


def test_plan_refuses_lora_delta_from_rules(sdxl) -> None:
    folder = sdxl["base"].parent
    bad = [
        ({"model": "hand_lora.safetensors", "delta_from": "anime.safetensors"}, "is a LoRA: its delta is its product"),
        ({"model": "anime.safetensors", "delta_from": "hand_lora.safetensors"}, "a LoRA \\(a delta, not a model\\)"),
    ]
    for row, message in bad:
        with pytest.raises(OrthoMechaError, match=f"row 1 \\(.*\\): .*{message}"):
            plan_from_dict({"base": "base.safetensors", "method": "weighted_sum", "rows": [row]}, folder)
    with pytest.raises(OrthoMechaError, match="is a LoRA; the base must be a full model"):
        plan_from_dict({"base": "hand_lora.safetensors", "method": "weighted_sum",
                        "rows": [{"model": "anime.safetensors"}]}, folder)
    with pytest.raises(OrthoMechaError, match=r"texture model .* is a LoRA"):
        plan_from_dict({"base": "base.safetensors", "method": "weighted_sum", "rows": [{"model": "anime.safetensors"}],
                        "texture": {"model": "hand_lora.safetensors"}}, folder)


# -- proposals and the Mixer --------------------------------------------------------------------------------------


def test_optimizer_keeps_a_lora_row_on_the_base_and_never_uses_it_as_delta_from(flux) -> None:
    # the LoRA is the fine-tune's own delta: without the rule the fine-tune's parent would be the LoRA
    rep = report(analyse(flux["base"], [flux["tuned"], flux["lora"]], use_cache=False))
    proposal = plan_from_report(rep)
    assert [row["delta_from"] for row in proposal["rows"]] == [None, None]
    assert "LoRA: its product is its delta" in proposal["rows"][1]["info"]
    plan_from_dict(proposal, flux["base"].parent)  # a valid plan


def test_mixer_rows_with_a_lora(sdxl) -> None:
    choices = ModelChoices.scan([sdxl["base"].parent])
    rows = [
        {"enabled": True, "model": "hand_lora.safetensors", "delta_from": "(base)", "alpha": 0.5, "repeat": 1},
        {"enabled": True, "model": "anime.safetensors", "delta_from": "(base)", "alpha": 1.0, "repeat": 1},
    ]
    assert lora_labels(rows, choices) == ["hand_lora.safetensors"]
    plan = plan_from_table("base.safetensors", rows, "ortho_superpose", {}, None, choices)
    assert table_from_plan(plan, choices)["rows"][0]["info"] == LORA_INFO
    analysis = analyse(sdxl["base"], [sdxl["lora"], sdxl["anime"]], exact=True)
    gram = row_gram(analysis, rows, choices)
    expected = brute_force(sdxl, ["lora", "anime"])
    np.testing.assert_allclose(gram.gram, expected, rtol=1e-9)
    survival, _ = mix_predictions(gram, "ortho_superpose", plan.options)
    assert len(survival) == 2
    with pytest.raises(OrthoMechaError, match="is a LoRA"):
        plan_from_table("base.safetensors", [{**rows[0], "delta_from": "anime.safetensors"}], "weighted_sum", {},
                        None, choices)


def test_report_json_marks_lora_rows(sdxl, tmp_path, cli) -> None:
    out = tmp_path / "report.json"
    assert cli("analyse", "--base", sdxl["base"], sdxl["anime"], sdxl["lora"], "--json", out).code == 0
    assert json.loads(out.read_text())["lora"] == [False, True]


def test_sdxl_layout_has_the_keys_the_hand_lora_names() -> None:
    shapes = {k.removeprefix(PREFIX) for k in sdxl_layout()}
    assert set(HAND) <= shapes


def test_mixer_page_marks_and_plans_a_lora_row(flux, tmp_path, monkeypatch) -> None:
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    from ortho_mecha import ui

    workspace = tmp_path / "workspace"
    models = workspace / "models"
    models.mkdir(parents=True)
    for name in ("base", "tuned", "lora"):
        (models / flux[name].name).write_bytes(flux[name].read_bytes())
    monkeypatch.setenv("ORTHO_MECHA_WORKSPACE", str(workspace))
    monkeypatch.setenv("ORTHO_MECHA_ROOTS", str(workspace))
    monkeypatch.delenv("ORTHO_MECHA_PASSWORD", raising=False)
    previous = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    try:
        at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120)
        at.session_state["mix"] = {
            "base": "models/base.safetensors", "method": "weighted_sum", "options": {}, "texture": None, "version": 1,
            "rows": [{"enabled": True, "model": "models/tuned_lora.safetensors", "delta_from": "(base)",
                      "alpha": 1.0, "repeat": 1, "info": ""}],
        }
        at.switch_page(ui.PAGES[1].path).run()
        assert not at.exception and not [e.value for e in at.error]
        assert any("LoRA rows (models/tuned_lora.safetensors)" in c.value for c in at.caption)
        plan = at.session_state["plan"]
        assert plan.rows[0].model.name == "tuned_lora.safetensors"
        assert any("_kohya_lora-ortho_mecha" in str(block.value) for block in at.code)
    finally:
        config.set_option("server.address", previous)


def test_key_sharded_worker_passes_bind_the_lora_like_the_client(sdxl) -> None:
    # what each Dask worker runs (distributed.worker_pass re-opens the files by path and aligns them again)
    from ortho_mecha.analysis import PassPlan, combine_passes, row_selection
    from ortho_mecha.distributed import shard_keys, worker_pass
    from ortho_mecha.io import Model, sampled_digest
    from ortho_mecha.validate import align

    files = [str(sdxl["anime"]), str(sdxl["lora"])]
    digests = [sampled_digest([Path(p)]) for p in (sdxl["base"], *files)]
    alignment = align(Model(sdxl["base"]), [Model(f) for f in files])
    rows_t = row_selection(2, 2, [None, None])
    plan = PassPlan(h_rows=[0, 1], stat_rows=[0, 1])
    parts = [worker_pass(str(sdxl["base"]), files, alignment.arch, rows_t, plan, keys, True, 1 << 12, 0, digests)
             for keys in shard_keys(alignment, 3)]
    h = np.sum(list(combine_passes(parts).h_key.values()), axis=0)
    np.testing.assert_allclose(h, brute_force(sdxl, ["anime", "lora"]), rtol=1e-9)


def test_measured_survival_of_a_lora_row_matches_the_prediction(sdxl, tmp_path) -> None:
    from ortho_mecha.evaluate import measure

    plan = plan_for(sdxl, "ortho_superpose", sdxl["lora"])
    out = tmp_path / "merged.safetensors"
    merge_plan(plan, out)
    survival = measure(plan, out)
    np.testing.assert_allclose(survival["measured"], survival["predicted"], atol=1e-5)
    assert survival["measured"][0] == pytest.approx(0.7, abs=1e-5)  # its alpha: superpose keeps α·δ whole
