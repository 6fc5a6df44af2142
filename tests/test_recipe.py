"""Plan → sd-mecha recipe: every method's mapping checked by value, serialization, the recipe CLI."""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import pytest
import sd_mecha
import torch
import tqdm
from sd_mecha.extensions import merge_methods

from ortho_mecha.cli import main
from ortho_mecha.mecha_config import model_node, register_base_config
from ortho_mecha.plan import METHODS, Plan, plan_from_dict
from ortho_mecha.recipe import build_recipe, recipe_text, script_text
from tests.merge_fixtures import NORM_SCALE, PREFIX, read, write_family, write_plan

QUIET = functools.partial(tqdm.tqdm, disable=True)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def weights(family: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Every fixture file's float tensors in float64, under the base's key names."""
    out = {}
    for name, path in family.items():
        state = {}
        for key, value in read(path).items():
            bare = key.removeprefix(PREFIX)
            bare = NORM_SCALE if bare == NORM_SCALE.removesuffix(".scale") + ".weight" else bare
            if value.is_floating_point():
                state[bare] = value.to(torch.float64)
        out[name] = state
    return out


def merged(recipe: sd_mecha.RecipeNode) -> dict[str, torch.Tensor]:
    out = sd_mecha.merge(
        recipe, merge_dtype=torch.float64, output_dtype=torch.float64, threads=0, tqdm=QUIET, check_extra_keys=False
    )
    return {k: v for k, v in out.items() if k != "__metadata__"}


def make_plan(family: dict[str, Path], method: str, rows: list[dict], **extra: object) -> Plan:
    return plan_from_dict({"base": "base.safetensors", "method": method, "rows": rows, **extra}, family["base"].parent)


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # sd-mecha passes Tensor parameters (add_difference's alpha) as float32 scalars: 0.8 is off by ~1e-8
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=2e-8, msg=lambda m, key=key: f"{key}: {m}")


def test_add_difference_sums_scaled_deltas_with_delta_from_and_repeat(family, weights) -> None:
    rows = [
        {"model": "a.safetensors", "alpha": 0.5},
        {"model": "pref.safetensors", "delta_from": "b.safetensors", "repeat": 2},
        {"model": "c16.safetensors", "alpha": 1.5},
    ]
    got = merged(build_recipe(make_plan(family, "add_difference", rows, options={"alpha": 0.8})))
    w = weights
    expected = {
        k: w["base"][k]
        + 0.8 * (0.5 * (w["a"][k] - w["base"][k]) + 2 * (w["pref"][k] - w["b"][k]) + 1.5 * (w["c16"][k] - w["base"][k]))
        for k in w["base"]
    }
    assert_close(got, expected)


def test_weighted_sum_is_the_weighted_mean_of_the_deltas(family, weights) -> None:
    rows = [
        {"model": "a.safetensors"},
        {"model": "b.safetensors", "alpha": 0.5, "repeat": 2},
        {"model": "dbf16.safetensors", "alpha": 2.0},
    ]
    got = merged(build_recipe(make_plan(family, "weighted_sum", rows)))
    w = weights
    expected = {k: (w["a"][k] + w["b"][k] + 2 * w["dbf16"][k]) / 4 for k in w["base"]}
    assert_close(got, expected)


def test_weighted_sum_with_all_weights_zero_returns_the_base(family, weights) -> None:
    rows = [{"model": "a.safetensors", "alpha": 0.0}, {"model": "b.safetensors", "alpha": 0.0}]
    assert_close(merged(build_recipe(make_plan(family, "weighted_sum", rows))), weights["base"])


def test_repeat_scales_ortho_project_and_superpose(family) -> None:
    for method in ("ortho_project", "ortho_superpose"):
        repeated = make_plan(family, method, [{"model": "a.safetensors", "repeat": 2}, {"model": "b.safetensors"}])
        scaled = make_plan(family, method, [{"model": "a.safetensors", "alpha": 2.0}, {"model": "b.safetensors"}])
        once = make_plan(family, method, [{"model": "a.safetensors"}, {"model": "b.safetensors"}])
        got = merged(build_recipe(repeated))
        assert all(torch.equal(got[k], v) for k, v in merged(build_recipe(scaled)).items())
        assert not torch.equal(got["label_emb.0.0.weight"], merged(build_recipe(once))["label_emb.0.0.weight"])


def test_repeat_lists_the_row_for_orthomerge(family) -> None:
    repeated = make_plan(family, "orthomerge", [{"model": "a.safetensors", "repeat": 2}, {"model": "b.safetensors"}])
    listed = make_plan(
        family, "orthomerge", [{"model": "a.safetensors"}, {"model": "a.safetensors"}, {"model": "b.safetensors"}]
    )
    expected = merged(build_recipe(listed))
    assert all(torch.equal(v, expected[k]) for k, v in merged(build_recipe(repeated)).items())


def test_texture_add_adds_beta_times_its_delta(family, weights) -> None:
    rows = [{"model": "a.safetensors"}]
    plain = merged(build_recipe(make_plan(family, "add_difference", rows)))
    texture = {"model": "tex.safetensors", "alpha": 0.3, "mode": "add"}
    boosted = merged(build_recipe(make_plan(family, "add_difference", rows, texture=texture)))
    w = weights
    assert_close(boosted, {k: plain[k] + 0.3 * (w["tex"][k] - w["base"][k]) for k in w["base"]})


def test_ties_elects_signs_like_the_paper(family, weights) -> None:
    rows = [{"model": "a.safetensors"}, {"model": "b.safetensors"}, {"model": "c16.safetensors", "repeat": 2}]
    got = merged(build_recipe(make_plan(family, "ties", rows, options={"alpha": 0.5})))
    w = weights
    for key, base in w["base"].items():
        deltas = torch.stack([w[n][key] - base for n in ("a", "b", "c16", "c16")])
        signs = torch.sign(deltas)
        agree = signs == torch.sign(signs.sum(0))
        mean = ((deltas * agree).sum(0) / agree.sum(0)).nan_to_num(0)
        torch.testing.assert_close(
            got[key], base + 0.5 * mean, rtol=0, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_dare_matches_sd_mechas_own_wrapper(family) -> None:
    config = register_base_config(family["base"])
    base, a, b = (model_node(family[n], config) for n in ("base", "a", "b"))
    rows = [{"model": "a.safetensors"}, {"model": "b.safetensors"}]
    # apply_stock=True: sd-mecha 1.1.8 reads that flag the wrong way round (plain DARE-TIES)
    reference = sd_mecha.add_ties_with_dare(base, a, b, probability=0.7, seed=5, apply_stock=True)
    got = merged(build_recipe(make_plan(family, "dare", rows, options={"probability": 0.7, "seed": 5})))
    expected = merged(reference)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_model_stock_is_sd_mechas_per_output_row_with_conv_kernels_flattened(family) -> None:
    """On matrices sd-mecha's n_model_stock; on convs the cosine is taken over each output channel's whole kernel
    (sd-mecha takes it over the kernel's width: one element on a 1×1 conv, where t = ±inf)."""
    config = register_base_config(family["base"])
    base_node, a, b = (model_node(family[n], config) for n in ("base", "a", "b"))
    rows = [{"model": "a.safetensors"}, {"model": "b.safetensors"}]
    got = merged(build_recipe(make_plan(family, "model_stock", rows)))
    sd = merged(sd_mecha.n_model_stock(base_node, a, b))
    base, deltas = read(family["base"]), [read(family[n]) for n in ("a", "b")]
    for key, value in got.items():
        if not base[key].is_floating_point():
            continue
        if base[key].dim() <= 2:
            torch.testing.assert_close(value, sd[key], rtol=0, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")
        else:
            d = [(x[key].double() - base[key].double()).reshape(base[key].shape[0], -1) for x in deltas]
            cos = torch.nn.functional.cosine_similarity(d[0], d[1], dim=-1)
            mean = (d[0] + d[1]) / 2
            expected = base[key].double() + ((2 * cos / (1 + cos)).unsqueeze(-1) * mean).reshape(base[key].shape)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-10)


def test_model_stock_of_rows_that_cancel_is_zero_not_infinite() -> None:
    from ortho_mecha.methods.stock import model_stock_rows

    delta = torch.randn(6, 4, 1, 1, dtype=torch.float64)  # a 1×1 conv, as an SD UNet's proj_in
    flipped = delta.clone()
    flipped[:3] *= -1  # half the output channels point against each other
    out = model_stock_rows.__wrapped__(delta, flipped)
    assert torch.isfinite(out).all() and torch.equal(out[:3], torch.zeros_like(out[:3]))
    torch.testing.assert_close(out[3:], delta[3:], rtol=0, atol=1e-12)  # agreeing rows: t = 1, the mean


def test_dare_is_the_dropped_rescaled_deltas_ties_mean(family, weights) -> None:
    """No model-stock factor: with probability 0 and k 1 DARE-TIES is plain TIES; with one row it is that row's
    dropped and rescaled delta (one row failed, and two rows came out scaled by a factor near 0)."""
    rows = [{"model": "a.safetensors"}, {"model": "b.safetensors"}]
    dare = merged(build_recipe(make_plan(family, "dare", rows, options={"probability": 0.0})))
    ties = merged(build_recipe(make_plan(family, "ties", rows)))
    assert all(torch.allclose(dare[k], ties[k], rtol=0, atol=1e-12) for k in ties)
    one = merged(build_recipe(make_plan(family, "dare", rows[:1], options={"probability": 0.5, "seed": 3})))
    w = weights
    for key, base in w["base"].items():
        delta, got = w["a"][key] - base, one[key] - base
        kept = got != 0
        torch.testing.assert_close(got[kept], 2.0 * delta[kept], rtol=1e-12, atol=1e-12)  # rescaled by 1/(1 − 0.5)
        if delta.numel() >= 64:
            assert 0.3 < kept.float().mean() < 0.7  # about half of the entries dropped


def test_geometric_median_of_two_deltas_lies_between_them(family, weights) -> None:
    rows = [{"model": "a.safetensors"}, {"model": "b.safetensors"}]
    got = merged(build_recipe(make_plan(family, "geometric_median", rows)))
    w = weights
    for key, base in w["base"].items():
        da, db, dm = w["a"][key] - base, w["b"][key] - base, got[key] - base
        # any point on the segment is a geometric median of two points: |a−m| + |m−b| = |a−b|
        torch.testing.assert_close((da - dm).norm() + (dm - db).norm(), (da - db).norm(), rtol=1e-9, atol=0)


def test_sd_mecha_public_add_difference_wrapper_still_raises(family) -> None:
    # sd-mecha 1.1.8: the wrapper compares merge spaces of unfinalized nodes and fails, so recipes resolve the
    # "add_difference" merge method by name; when this starts passing, the workaround can go.
    config = register_base_config(family["base"])
    base, a = model_node(family["base"], config), model_node(family["a"], config)
    with pytest.raises(AttributeError, match="identifier"):
        sd_mecha.add_difference(base, sd_mecha.subtract(a, base))
    assert merge_methods.resolve("add_difference").identifier == "add_difference"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mecha_text_round_trips_to_the_same_merge(family, method: str) -> None:
    rows = [{"model": "a.safetensors", "alpha": 0.7}, {"model": "pref.safetensors", "delta_from": "b.safetensors"}]
    plan = make_plan(family, method, rows, texture={"model": "tex.safetensors", "alpha": 0.1, "mode": "orthogonal"})
    text = recipe_text(plan)
    assert text.startswith("version ")
    assert (
        f'merge "{method if method in ("ortho_project", "ortho_superpose", "orthomerge") else "add_difference"}"'
        in text
    )
    direct, again = merged(build_recipe(plan)), merged(sd_mecha.deserialize(text))
    assert all(torch.equal(direct[k], again[k]) for k in direct)


def test_script_is_valid_python_naming_the_recipe(family) -> None:
    plan = make_plan(family, "ortho_superpose", [{"model": "a.safetensors"}])
    script = script_text(plan)
    compile(script, "merge_script.py", "exec")
    namespace: dict = {}
    exec(compile(script.split("\n\ndef main")[0], "head", "exec"), namespace)  # the constants only
    assert namespace["RECIPE"] == recipe_text(plan)
    assert namespace["PLAN"] == plan.to_json()
    assert namespace["BASE"] == str(plan.base)


ONE_ROW_PLAN = {"base": "base.safetensors", "method": "orthomerge", "rows": [{"model": "a.safetensors"}]}


def test_recipe_cli_writes_both_files_and_refuses_to_overwrite(family, tmp_path, capsys) -> None:
    plan_path = write_plan(family["base"].parent, ONE_ROW_PLAN, name="cli_plan.json")
    mecha, script = tmp_path / "out.mecha", tmp_path / "out.py"
    assert main(["recipe", str(plan_path), "--mecha", str(mecha), "--script", str(script)]) == 0
    assert mecha.read_text() == recipe_text(plan_from_dict(ONE_ROW_PLAN, family["base"].parent))
    assert os.stat(script).st_mode & stat.S_IXUSR
    capsys.readouterr()
    assert main(["recipe", str(plan_path), "--mecha", str(mecha)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and str(mecha) in err
    assert main(["recipe", str(plan_path), "--mecha", str(mecha), "--overwrite"]) == 0
    assert main(["recipe", str(plan_path)]) == 2
    assert "give --mecha OUT.mecha and/or --script OUT.py" in capsys.readouterr().err


def test_recipe_never_writes_over_its_plan_or_a_model_even_with_overwrite(family, tmp_path, capsys) -> None:
    plan_path = write_plan(family["base"].parent, ONE_ROW_PLAN, name="inputs_plan.json")
    plan = plan_from_dict(ONE_ROW_PLAN, family["base"].parent)
    before = {path: path.read_bytes() for path in (plan_path, plan.base, plan.rows[0].model)}
    for target in before:
        assert main(["recipe", str(plan_path), "--mecha", str(target), "--overwrite"]) == 2
        assert "is one of the inputs" in capsys.readouterr().err
    assert main(["recipe", str(plan_path), "--script", str(tmp_path / "new.safetensors")]) == 2
    assert "is named like a model file" in capsys.readouterr().err
    assert all(path.read_bytes() == data for path, data in before.items())


def test_recipe_checks_both_outputs_before_writing_either(family, tmp_path, capsys) -> None:
    plan_path = write_plan(family["base"].parent, ONE_ROW_PLAN, name="both_plan.json")
    mecha, script = tmp_path / "new.mecha", tmp_path / "old.py"
    script.write_text("# mine\n")
    assert main(["recipe", str(plan_path), "--mecha", str(mecha), "--script", str(script)]) == 2
    assert f"{script}: already exists" in capsys.readouterr().err
    assert not mecha.exists() and script.read_text() == "# mine\n"
    same = tmp_path / "same.x"
    assert main(["recipe", str(plan_path), "--mecha", str(same), "--script", str(same)]) == 2
    assert "given for both --mecha and --script" in capsys.readouterr().err
    assert not same.exists()


@pytest.mark.parametrize("method", ["model_stock", "geometric_median"])
def test_a_row_at_alpha_0_is_absent_from_model_stock_and_the_geometric_median(family, method) -> None:
    """A row at alpha 0 (or at 0 in a block group) leaves the merge as if it were not listed, as in a weighted sum:
    counted as a zero delta, it took Model Stock's t to 0 (the base came out) and halved the median's other row.
    With one delta left, both methods return it (Model Stock's t is 1 for one delta)."""
    alone = merged(build_recipe(make_plan(family, "add_difference", [{"model": "a.safetensors"}])))
    with_zero = merged(build_recipe(make_plan(family, method, [{"model": "a.safetensors"},
                                                               {"model": "b.safetensors", "alpha": 0.0}])))
    assert_close(with_zero, alone)
