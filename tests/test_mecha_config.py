"""Model configs derived from the base's header: stable identifiers, key aliases, input checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sd_mecha
import torch
from safetensors.torch import save_file
from sd_mecha.extensions import model_configs

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.mecha_config import check_model, derive_config, key_aliases, register_base_config
from tests.merge_fixtures import NORM_SCALE, PREFIX, base_state, cast, finetune, prefixed, write_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("models"))


def test_identifier_depends_on_keys_and_shapes_only(family: dict[str, Path], tmp_path: Path) -> None:
    ident = derive_config(family["base"]).identifier
    assert re.fullmatch(r"[a-z0-9_]+\+[0-9a-f]{16}-ortho_mecha", ident)
    half = tmp_path / "half.safetensors"
    save_file(cast(base_state(), torch.float16), str(half))
    assert derive_config(half).identifier == ident  # same layout, other dtype
    other = base_state()
    other["time_embed.0.bias"] = torch.zeros(17)
    save_file(other, str(tmp_path / "other.safetensors"))
    assert derive_config(tmp_path / "other.safetensors").identifier != ident


def test_config_lists_exactly_the_base_keys_all_optional(family: dict[str, Path]) -> None:
    config = derive_config(family["base"])
    state = base_state()
    assert set(config.keys()) == set(state)
    for key, meta in config.keys().items():
        assert tuple(meta.shape) == tuple(state[key].shape)
        assert meta.dtype == state[key].dtype
        assert meta.optional


def test_registration_is_idempotent_and_resolvable(family: dict[str, Path]) -> None:
    ident = register_base_config(family["base"])
    assert register_base_config(family["base"]) == ident
    assert model_configs.resolve(ident).identifier == ident


def test_aliases_cover_prefix_and_norm_scale_renames() -> None:
    aliases = key_aliases(["a.norm.weight", NORM_SCALE, "b.weight"])
    assert set(aliases["a.norm.weight"]) == {"a.norm.scale", f"{PREFIX}a.norm.scale", f"{PREFIX}a.norm.weight"}
    stem = NORM_SCALE.removesuffix(".scale")
    assert set(aliases[NORM_SCALE]) == {f"{stem}.weight", f"{PREFIX}{stem}.weight", f"{PREFIX}{NORM_SCALE}"}
    assert aliases["b.weight"] == (f"{PREFIX}b.weight",)


def test_aliases_of_a_checkpoint_base_leave_non_diffusion_keys_alone() -> None:
    keys = [f"{PREFIX}k{i}.weight" for i in range(6)] + ["cond_stage_model.x.weight"]
    aliases = key_aliases(keys)
    assert aliases[f"{PREFIX}k0.weight"] == ("k0.weight",)
    assert aliases["cond_stage_model.x.weight"] == ()


def test_an_alias_never_names_another_base_key_or_two_keys() -> None:
    aliases = key_aliases(["x.norm.weight", "x.norm.scale"])  # both spellings present in the base itself
    assert "x.norm.scale" not in aliases["x.norm.weight"]
    assert "x.norm.weight" not in aliases["x.norm.scale"]
    assert not set(aliases["x.norm.weight"]) & set(aliases["x.norm.scale"])


def test_prefixed_model_lines_up_through_aliases(family: dict[str, Path]) -> None:
    ident = register_base_config(family["base"])
    check = check_model(ident, family["base"], family["pref"])
    assert (check.shared, check.missing, check.extra) == (len(base_state()), 0, 0)


def test_recipe_nodes_use_the_derived_config_never_a_guessed_one(family: dict[str, Path]) -> None:
    # the fixture's keys resemble SDXL's (input_blocks, label_emb): sd-mecha must not pick its own config
    ident = register_base_config(family["base"])
    node = sd_mecha.model(family["pref"], config=ident)
    text = sd_mecha.serialize(sd_mecha.subtract(node, sd_mecha.model(family["base"], config=ident)))
    configs = re.findall(r'^model .* model_config="([^"]+)"', text, re.M)
    assert configs == [ident, ident]
    merged = sd_mecha.merge(node, threads=0, output_dtype=torch.float32, check_extra_keys=False)
    expected = prefixed(finetune(base_state(), 6))
    assert torch.equal(merged[NORM_SCALE], expected[PREFIX + NORM_SCALE.removesuffix(".scale") + ".weight"])


def test_extra_and_missing_keys_are_counted(family: dict[str, Path], tmp_path: Path) -> None:
    state = finetune(base_state(), 9)
    del state["time_embed.0.bias"]
    state["lora_leftover.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    check = check_model(register_base_config(family["base"]), family["base"], path)
    assert (check.missing, check.extra) == (1, 1)


def test_shape_mismatch_names_both_files(family: dict[str, Path], tmp_path: Path) -> None:
    state = finetune(base_state(), 9)
    state["middle_block.1.proj_in.weight"] = torch.zeros(8, 9)
    path = tmp_path / "wide.safetensors"
    save_file(state, str(path))
    with pytest.raises(OrthoMechaError) as caught:
        check_model(register_base_config(family["base"]), family["base"], path)
    message = str(caught.value)
    assert message.startswith(f"{path}: key 'middle_block.1.proj_in.weight' has shape [8, 9]")
    assert f"the base {family['base']} has [8, 8]" in message


def test_fewer_than_half_the_keys_shared_is_an_error(family: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "stranger.safetensors"
    save_file({"input_blocks.0.0.bias": torch.zeros(8), "other.weight": torch.zeros(2)}, str(path))
    with pytest.raises(
        OrthoMechaError, match=r"shares only 1 of the 11 keys of the base .*base.safetensors \(9% < 50%\)"
    ):
        check_model(register_base_config(family["base"]), family["base"], path)


def test_scaled_fp8_is_refused_with_the_reason(family: dict[str, Path], tmp_path: Path) -> None:
    state = cast(finetune(base_state(), 9), torch.float8_e4m3fn)
    state["time_embed.0.scale_weight"] = torch.tensor([2.0])
    path = tmp_path / "scaled.safetensors"
    save_file(state, str(path))
    with pytest.raises(OrthoMechaError, match=r"scaled fp8 model .* a dequantised copy with .ortho-mecha convert "):
        check_model(register_base_config(family["base"]), family["base"], path)
    with pytest.raises(OrthoMechaError, match=r"scaled fp8"):
        derive_config(path)
