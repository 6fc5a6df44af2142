"""The methods as sd-mecha sees them: registration, typed signatures, recipes merged from real files, .mecha."""

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sd_mecha
import torch
from safetensors.torch import load_file, save_file
from sd_mecha.extensions import merge_methods

from ortho_mecha.mecha_config import register_base_config
from ortho_mecha.methods import (
    METHOD_OPTIONS,
    RECIPE_PARAMETERS,
    OptionError,
    ortho_project,
    ortho_superpose,
    orthomerge,
    scale_delta,
    texture_boost,
    validate_options,
)

IDENTIFIERS = ["ortho_project", "ortho_superpose", "orthomerge", "texture_boost", "scale_delta"]
SHAPES = {
    "blocks.0.conv.weight": (8, 4, 3, 3),
    "blocks.0.up.weight": (40, 2, 3, 3),
    "blocks.0.proj_in.weight": (6, 10),
    "blocks.0.proj_out.weight": (10, 6),
    "blocks.0.norm.weight": (6,),
}
MERGE = {"merge_dtype": torch.float64, "output_dtype": torch.float64, "threads": 0}


def space_names(spaces: object) -> set[str]:
    return {space.identifier for space in spaces}


def test_registered_by_importing_ortho_mecha_first() -> None:
    code = (
        "import ortho_mecha, sys; assert 'sd_mecha' not in sys.modules; import sd_mecha\n"
        "from sd_mecha.extensions.merge_methods import resolve\n"
        f"print(sorted(resolve(n).identifier for n in {IDENTIFIERS!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(IDENTIFIERS))


@pytest.mark.parametrize(
    ("method", "positional", "varargs", "returns"),
    [
        (ortho_project, ["weight"], "delta", "weight"),
        (ortho_superpose, ["weight"], "delta", "weight"),
        (orthomerge, ["weight"], "delta", "weight"),
        (texture_boost, ["weight", "weight", "delta"], None, "weight"),
        (scale_delta, ["delta"], None, "delta"),
    ],
)
def test_merge_spaces_in_the_signature(
    method: merge_methods.MergeMethod, positional: list[str], varargs: str | None, returns: str
) -> None:
    assert merge_methods.resolve(method.identifier) is method
    spaces = method.get_input_merge_spaces()
    tensors = [space_names(s) for s in spaces.args if space_names(s) != {"param"}]
    assert tensors == [{name} for name in positional]
    assert (space_names(spaces.vararg) == {varargs}) if varargs else not spaces.has_varargs()
    assert method.get_signature().return_annotation.data.merge_space.identifier == returns


@pytest.mark.parametrize("identifier", IDENTIFIERS)
def test_option_specs_match_the_signature(identifier: str) -> None:
    method = merge_methods.resolve(identifier)
    defaults = method.get_default_args()
    names = method.get_param_names()
    signature_defaults = dict(defaults.kwargs)
    signature_defaults.update(zip(names.args[len(names.args) - len(defaults.args) :], defaults.args, strict=True))
    options = {spec.name: spec.default for spec in METHOD_OPTIONS[identifier]}
    assert signature_defaults == options | RECIPE_PARAMETERS.get(identifier, {})
    assert validate_options(identifier, {}) == options


def test_validate_options_up_front() -> None:
    assert validate_options("orthomerge", {"theta_agg": "max", "alpha": 2})["alpha"] == 2.0
    with pytest.raises(OptionError, match=re.escape("the options are alpha, granularity, rcond")):
        validate_options("ortho_superpose", {"granularty": "row"})
    with pytest.raises(OptionError, match="use one of ortho_project"):
        validate_options("ortho_magic", {})
    with pytest.raises(ValueError, match=re.escape("'theta', 'magnitude', 'equal'")):
        validate_options("orthomerge", {"direction_weight": "theta "})
    with pytest.raises(OptionError, match="use true or false"):
        validate_options("orthomerge", {"conflict_aware": "false"})
    with pytest.raises(OptionError, match="is not a number"):
        validate_options("texture_boost", {"beta": "strong"})


# --- recipes on real files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(7)
    base = {key: torch.randn(shape, generator=gen) for key, shape in SHAPES.items()}
    paths = {"base": folder / "base.safetensors"}
    save_file(base, paths["base"])
    for name in ("a", "b", "t"):
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}, paths[name])
    return paths


@pytest.fixture(scope="module")
def nodes(files: dict[str, Path]) -> dict[str, sd_mecha.RecipeNode]:
    config = register_base_config(files["base"])
    return {name: sd_mecha.model(path, config=config) for name, path in files.items()}


def _row(nodes: dict[str, sd_mecha.RecipeNode], name: str, alpha: float) -> sd_mecha.RecipeNode:
    return scale_delta(sd_mecha.subtract(nodes[name], nodes["base"]), alpha=alpha)


RECIPES: dict[str, Callable[[dict], sd_mecha.RecipeNode]] = {
    "ortho_project": lambda n: ortho_project(n["base"], _row(n, "a", 0.8), _row(n, "b", 2.0), alpha=0.9),
    "ortho_superpose": lambda n: ortho_superpose(
        n["base"], _row(n, "a", 1.0), _row(n, "b", 0.5), granularity="row", rcond=1e-5
    ),
    "orthomerge": lambda n: orthomerge(
        n["base"], _row(n, "a", 1.0), _row(n, "b", 1.0), _row(n, "b", 1.0), theta_agg="median", conflict_aware=True
    ),
    "texture_boost": lambda n: texture_boost(
        orthomerge(n["base"], _row(n, "a", 1.0)), n["base"], sd_mecha.subtract(n["t"], n["base"]), 0.3, "orthogonal"
    ),
}


def _expected(identifier: str, t: dict[str, dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    """The same merge computed directly on the tensors of one key."""
    base, a, b, tex = (t[name][key].double() for name in ("base", "a", "b", "t"))
    if identifier == "ortho_project":
        return ortho_project.__wrapped__(base, 0.8 * (a - base), 2.0 * (b - base), alpha=0.9)
    if identifier == "ortho_superpose":
        return ortho_superpose.__wrapped__(base, a - base, 0.5 * (b - base), granularity="row", rcond=1e-5)
    if identifier == "orthomerge":
        return orthomerge.__wrapped__(base, a - base, b - base, b - base, theta_agg="median", conflict_aware=True)
    return texture_boost.__wrapped__(a, base, tex - base, 0.3, "orthogonal")


@pytest.mark.parametrize("identifier", list(RECIPES))
def test_recipe_merges_real_files(
    identifier: str, files: dict[str, Path], nodes: dict[str, sd_mecha.RecipeNode], tmp_path: Path
) -> None:
    out_path = tmp_path / "merged.safetensors"
    sd_mecha.merge(RECIPES[identifier](nodes), output=out_path, **MERGE)
    merged = load_file(out_path)
    tensors = {name: load_file(path) for name, path in files.items()}
    assert set(merged) == set(SHAPES)
    for key in SHAPES:
        torch.testing.assert_close(merged[key], _expected(identifier, tensors, key), rtol=0, atol=1e-9)


@pytest.mark.parametrize("identifier", list(RECIPES))
def test_mecha_round_trip(identifier: str, nodes: dict[str, sd_mecha.RecipeNode], tmp_path: Path) -> None:
    recipe = RECIPES[identifier](nodes)
    text = sd_mecha.serialize(recipe)
    assert f'merge "{identifier}"' in text
    path = tmp_path / "recipe.mecha"
    path.write_text(text)
    loaded = sd_mecha.deserialize_path(path)
    # sd-mecha 1.1.8 folds literals that compare equal (True == 1.0) into one node when re-serializing a
    # loaded recipe; values are cast per parameter, so the merge is unchanged and the text is stable after that.
    again = sd_mecha.serialize(loaded)
    assert sd_mecha.serialize(sd_mecha.deserialize(again)) == again
    original, reloaded = sd_mecha.merge(recipe, **MERGE), sd_mecha.merge(loaded, **MERGE)
    for key in SHAPES:
        assert torch.equal(original[key], reloaded[key]), key


def test_bad_option_in_a_recipe_fails_the_merge(nodes: dict[str, sd_mecha.RecipeNode]) -> None:
    recipe = orthomerge(nodes["base"], _row(nodes, "a", 1.0), theta_agg="average")
    with pytest.raises(OptionError, match=re.escape("use one of 'mean', 'median', 'max', 'sum'")):
        sd_mecha.merge(recipe, **MERGE)


def test_weight_where_a_delta_belongs_is_rejected_before_merging(nodes: dict[str, sd_mecha.RecipeNode]) -> None:
    # finalising the graph (as serialize does) checks merge spaces without reading a tensor
    with pytest.raises(TypeError, match="Merge-space constraints are unsatisfiable"):
        sd_mecha.serialize(ortho_superpose(nodes["base"], nodes["a"]))
