"""LoRA extraction: truncated SVD per key (Eckart–Young), kohya names ComfyUI loads, conv kernels, errors.

Every written LoRA is re-applied the way ComfyUI does it — ``W_base + (up.flatten(1) @ down.flatten(1))
· alpha / rank`` reshaped to the key's shape — and compared with the merged model in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.lora import ZERO_RTOL, extract_lora, factorise, lora_name
from tests.modelgen import stored

PREFIX = "model.diffusion_model."


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def reapply(lora: dict[str, torch.Tensor], name: str, base: torch.Tensor) -> torch.Tensor:
    """``base + up @ down · alpha / rank`` in float64, as ComfyUI applies a kohya LoRA."""
    up = lora[f"{name}.lora_up.weight"].to(torch.float64)
    down = lora[f"{name}.lora_down.weight"].to(torch.float64)
    alpha = float(lora[f"{name}.alpha"])
    product = (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
    return base.to(torch.float64) + product * (alpha / down.shape[0])


def tail(delta: torch.Tensor, rank: int) -> float:
    """sqrt(Σ σ² beyond the first ``rank``) of a key's delta (conv kernels flattened), float64 SVD."""
    sigma = torch.linalg.svdvals(delta.to(torch.float64).flatten(1))
    return float(sigma[rank:].pow(2).sum().sqrt())


def planted(shapes: dict[str, tuple[int, ...]], rank: int, seed: int = 0) -> tuple[dict, dict]:
    """float64 base and merged whose matrix deltas have rank exactly ``rank`` (1-D deltas: small noise)."""
    generator = torch.Generator().manual_seed(seed)
    base, merged = {}, {}
    for key, shape in shapes.items():
        base[key] = torch.randn(shape, generator=generator, dtype=torch.float64)
        if len(shape) == 1:
            merged[key] = base[key] + 0.01 * torch.randn(shape, generator=generator, dtype=torch.float64)
            continue
        cols = math.prod(shape[1:])
        u = torch.randn(shape[0], rank, generator=generator, dtype=torch.float64)
        v = torch.randn(rank, cols, generator=generator, dtype=torch.float64)
        merged[key] = base[key] + (0.1 * u @ v).reshape(shape)
    return base, merged


# -- the factorisation on plain tensors ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    true_rank=st.integers(1, 12),
    rank=st.integers(1, 14),
    seed=st.integers(0, 2**16),
)
@example(rows=3, cols=3, true_rank=3, rank=3, seed=555)  # a σ² just under the numerically-zero cut
def test_factorise_meets_the_eckart_young_bound(rows: int, cols: int, true_rank: int, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, true_rank, generator=generator, dtype=torch.float64)
    b = torch.randn(true_rank, cols, generator=generator, dtype=torch.float64)
    delta = a @ b
    low = factorise(delta, rank)
    sigma2 = torch.linalg.svdvals(delta).pow(2)
    keep = min(rank, rows, cols)
    norm = float(sigma2.sum().sqrt())
    error = float((delta - low.up @ low.down).norm())
    bound = float(sigma2[keep:].sum().sqrt())
    assert low.rank <= keep
    # Eckart–Young: never below the bound; above it only by the directions dropped as numerically zero
    # (σ² < ZERO_RTOL·σ₁² each), which the module documents
    dropped = keep * ZERO_RTOL * float(sigma2[0])
    assert bound - 1e-7 * norm <= error <= (bound**2 + dropped) ** 0.5 + 1e-7 * norm
    assert low.tail == pytest.approx(bound, abs=1e-6 * norm)
    assert low.total == pytest.approx(float(sigma2.sum()), rel=1e-12)
    assert low.energy == pytest.approx(float(sigma2[:keep].sum() / sigma2.sum()), abs=1e-10)


def test_factorise_hand_computed_diagonal() -> None:
    # σ = 3, 2, 1 on the diagonal: rank 2 keeps 9 + 4 of 14, error 1, factors carry sqrt(σ) each
    delta = torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))
    low = factorise(delta, 2)
    assert low.rank == 2
    assert (low.kept, low.total, low.tail) == pytest.approx((13.0, 14.0, 1.0))
    expected = torch.diag(torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(low.up @ low.down, expected, atol=1e-12, rtol=0)
    assert sorted(float(x) for x in low.up.abs().sum(0)) == pytest.approx([math.sqrt(2), math.sqrt(3)])


def test_factorise_tall_and_wide_agree_and_scaling_carries_the_sign() -> None:
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    tall, wide = factorise(delta, 3), factorise(delta.T.contiguous(), 3)
    torch.testing.assert_close(tall.up @ tall.down, (wide.up @ wide.down).T, atol=1e-10, rtol=0)
    flipped = tall.scaled(-2.5)
    torch.testing.assert_close(flipped.up @ flipped.down, -2.5 * tall.up @ tall.down, atol=1e-10, rtol=0)
    assert flipped.energy == pytest.approx(tall.energy)


def test_factorise_zero_delta_has_rank_zero() -> None:
    low = factorise(torch.zeros(3, 5), 2)
    assert (low.rank, low.total, low.energy) == (0, 0.0, 1.0)


def test_lora_names_follow_comfyui_unet_keys() -> None:
    assert lora_name("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert lora_name("double_blocks.0.img_attn.qkv.weight") == "lora_unet_double_blocks_0_img_attn_qkv"
    assert lora_name("pos_embed") is None


def test_a_diffusers_flux_transformer_gets_the_names_comfyui_maps_for_it(tmp_path) -> None:
    # ComfyUI loads a diffusers-layout Flux as its BFL model: lora_unet_transformer_blocks_… would match nothing
    # there; it maps the diffusers modules as lora_transformer_… (OneTrainer's names)
    shapes = {"x_embedder.weight": (16, 8), "context_embedder.weight": (16, 12),
              "transformer_blocks.0.attn.to_q.weight": (16, 16),
              "single_transformer_blocks.0.proj_out.weight": (16, 32), "transformer_blocks.0.norm1.linear.bias": (96,)}
    base, merged = planted(shapes, rank=2)
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "merged.safetensors", merged)
    out = tmp_path / "lora.safetensors"
    report = extract_lora(tmp_path / "merged.safetensors", tmp_path / "base.safetensors", 2, out, dtype="fp32")
    assert sorted(r.lora for r in report.keys) == [
        "lora_transformer_context_embedder", "lora_transformer_single_transformer_blocks_0_proj_out",
        "lora_transformer_transformer_blocks_0_attn_to_q", "lora_transformer_x_embedder"]
    lora = load_file(str(out))
    for result in report.keys:
        error = float((merged[result.key] - reapply(lora, result.lora, base[result.key])).norm())
        assert error <= 1e-6 * float((merged[result.key] - base[result.key]).norm())
    from ortho_mecha.io import Model
    from ortho_mecha.lora_rows import LoraModel

    with Model(tmp_path / "base.safetensors") as base_model:  # and it reads back as a LoRA row of that base
        row = LoraModel(Model(out), {k: v.shape for k, v in base_model.tensors.items()}, base_model.path)
    assert sorted(row.tensors) == sorted(r.key for r in report.keys)
    del shapes["context_embedder.weight"]  # not a diffusers Flux (one identifying key short): the usual names
    base, merged = planted(shapes, rank=2)
    save(tmp_path / "base2.safetensors", base)
    save(tmp_path / "merged2.safetensors", merged)
    other = extract_lora(tmp_path / "merged2.safetensors", tmp_path / "base2.safetensors", 2,
                         tmp_path / "l2.safetensors")
    assert all(r.lora.startswith("lora_unet_") for r in other.keys)


# -- files: re-applied LoRAs ---------------------------------------------------------------------------


def test_reapplied_lora_error_is_the_svd_tail_per_key(make_family, tmp_path, digests) -> None:
    paths = make_family("custom", "fp32", members=["base", "anime"])
    before = digests(paths["base"], paths["anime"])
    out = tmp_path / "anime_lora.safetensors"
    report = extract_lora(paths["anime"], paths["base"], 2, out, dtype="fp32")
    lora, base, merged = load_file(str(out)), stored(paths["base"]), stored(paths["anime"])
    matrices = [k for k, v in base.items() if v.ndim >= 2]
    assert [r.key for r in report.keys] == matrices
    for result in report.keys:
        delta = merged[result.key] - base[result.key]
        error = float((merged[result.key] - reapply(lora, result.lora, base[result.key])).norm())
        bound = tail(delta, 2)
        scale = float(delta.norm())
        assert error <= bound + 1e-5 * scale
        assert error == pytest.approx(bound, abs=1e-5 * scale)
        assert result.error == pytest.approx(bound, abs=1e-5 * scale)
        assert result.rank == 2
        assert float(lora[f"{result.lora}.alpha"]) == 2.0
    kept = sum(r.energy_kept * r.delta_norm**2 for r in report.keys) / sum(r.delta_norm**2 for r in report.keys)
    assert report.energy_kept == pytest.approx(kept)
    assert digests(paths["base"], paths["anime"]) == before


@pytest.mark.parametrize("extra", [0, 2])
def test_planted_low_rank_delta_is_recovered_exactly(tmp_path, extra: int) -> None:
    shapes = {"layers.0.proj.weight": (12, 20), "layers.1.proj.weight": (30, 8), "layers.0.norm.weight": (12,)}
    base, merged = planted(shapes, rank=3)
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "merged.safetensors", merged)
    out = tmp_path / "lora.safetensors"
    report = extract_lora(tmp_path / "merged.safetensors", tmp_path / "base.safetensors", 3 + extra, out, dtype="fp32")
    lora = load_file(str(out))
    for result in report.keys:
        delta_norm = float((merged[result.key] - base[result.key]).norm())
        error = float((merged[result.key] - reapply(lora, result.lora, base[result.key])).norm())
        assert error <= 1e-6 * delta_norm
        assert result.rank == 3  # numerically zero directions beyond the true rank are not written
        assert result.energy_kept == pytest.approx(1.0, abs=1e-12)
    assert report.one_d.keys == 1
    assert report.one_d.delta_norm == pytest.approx(
        float((merged["layers.0.norm.weight"] - base["layers.0.norm.weight"]).norm())
    )


def test_conv_kernels_and_1x1_convs(tmp_path) -> None:
    shapes = {
        f"{PREFIX}input_blocks.0.0.weight": (6, 4, 3, 3),
        f"{PREFIX}input_blocks.1.0.skip_connection.weight": (8, 6, 1, 1),
        f"{PREFIX}input_blocks.1.1.proj_in.weight": (8, 8),
        f"{PREFIX}input_blocks.1.1.norm.weight": (8,),
        f"{PREFIX}input_blocks.1.1.norm.bias": (8,),
        f"{PREFIX}out.2.weight": (4, 8, 3, 3),
        f"{PREFIX}out.2.bias": (4,),
    }
    base, merged = planted(shapes, rank=5, seed=1)
    save(tmp_path / "base.safetensors", {k: v.float() for k, v in base.items()})
    save(tmp_path / "merged.safetensors", {k: v.float() for k, v in merged.items()})
    out = tmp_path / "lora.safetensors"
    report = extract_lora(tmp_path / "merged.safetensors", tmp_path / "base.safetensors", 2, out, dtype="fp32")
    lora = load_file(str(out))
    assert lora["lora_unet_input_blocks_0_0.lora_down.weight"].shape == (2, 4, 3, 3)
    assert lora["lora_unet_input_blocks_0_0.lora_up.weight"].shape == (6, 2, 1, 1)
    assert lora["lora_unet_input_blocks_1_0_skip_connection.lora_down.weight"].shape == (2, 6, 1, 1)
    assert lora["lora_unet_input_blocks_1_0_skip_connection.lora_up.weight"].shape == (8, 2, 1, 1)
    assert lora["lora_unet_out_2.lora_up.weight"].shape == (4, 2, 1, 1)
    assert lora["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].shape == (2, 8)
    bases = {k.removeprefix(PREFIX): v.float().double() for k, v in base.items()}
    mergeds = {k.removeprefix(PREFIX): v.float().double() for k, v in merged.items()}
    for result in report.keys:
        error = float((mergeds[result.key] - reapply(lora, result.lora, bases[result.key])).norm())
        bound = tail(mergeds[result.key] - bases[result.key], 2)
        assert error == pytest.approx(bound, abs=1e-5 * float((mergeds[result.key] - bases[result.key]).norm()))
    assert report.one_d.keys == 3


def test_sdxl_layout_key_names(make_family, tmp_path) -> None:
    paths = make_family("sdxl", "fp16", members=["base", "anime"])
    out = tmp_path / "sdxl_lora.safetensors"
    report = extract_lora(paths["anime"], paths["base"], 4, out)
    lora = load_file(str(out))
    base = stored(paths["base"])
    expected = {
        "lora_unet_" + k.removeprefix(PREFIX).removesuffix(".weight").replace(".", "_")
        for k, v in base.items()
        if k.startswith(PREFIX) and v.ndim >= 2
    }
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora} == expected
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in lora
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in lora
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.alpha" in lora
    assert not any("diffusion_model" in k or "conditioner" in k or "first_stage" in k for k in lora)
    assert all(v.dtype == torch.float16 for k, v in lora.items() if not k.endswith(".alpha"))
    assert report.non_diffusion == 3  # two text-encoder keys and one VAE key, not in the LoRA
    anime = stored(paths["anime"])
    beside = [k for k in base if not k.startswith(PREFIX)]
    expected_norm = math.sqrt(sum(float((anime[k] - base[k]).square().sum()) for k in beside))
    assert expected_norm > 0 and report.non_diffusion_norm == pytest.approx(expected_norm, rel=1e-6)  # said, measured
    assert any(f"differ from the base's by norm {expected_norm:.4g}" in line for line in report.summary_lines())


def test_flux_layout_key_names_and_metadata(make_family, tmp_path) -> None:
    paths = make_family("flux", "bf16", members=["base", "anime"])
    out = tmp_path / "flux_lora.safetensors"
    report = extract_lora(paths["anime"], paths["base"], 8, out, dtype="bf16")
    lora = load_file(str(out))
    for name in (
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_1_txt_mlp_2",
        "lora_unet_single_blocks_1_linear1",
        "lora_unet_single_blocks_0_modulation_lin",
        "lora_unet_final_layer_adaLN_modulation_1",
        "lora_unet_img_in",
    ):
        assert lora[f"{name}.lora_down.weight"].dtype == torch.bfloat16
        assert float(lora[f"{name}.alpha"]) == lora[f"{name}.lora_down.weight"].shape[0]
    assert not any("norm" in k for k in lora)  # query/key norms (.scale) and biases are 1-D: not captured
    assert report.one_d.keys == sum(v.ndim == 1 for v in stored(paths["base"]).values())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8"
    assert meta["ortho_mecha_base"] == str(paths["base"]) and meta["ortho_mecha_merged"] == str(paths["anime"])
    assert meta["ortho_mecha_rank"] == "8"


def test_zero_deltas_are_skipped_and_uncaptured_keys_counted(tmp_path) -> None:
    shapes = {
        "layers.0.a.weight": (6, 5),
        "layers.0.b.weight": (6, 5),
        "layers.0.norm.weight": (6,),
        "pos_embed": (4, 6),
    }
    base, merged = planted(shapes, rank=2, seed=4)
    merged["layers.0.b.weight"] = base["layers.0.b.weight"].clone()
    save(tmp_path / "base.safetensors", base)
    save(tmp_path / "merged.safetensors", merged)
    report = extract_lora(tmp_path / "merged.safetensors", tmp_path / "base.safetensors", 4, tmp_path / "l.safetensors")
    assert [r.key for r in report.keys] == ["layers.0.a.weight"]
    assert report.zero_keys == 1
    assert (report.one_d.keys, report.unnamed.keys, report.unnamed.examples) == (1, 1, ["pos_embed"])
    lost = sum(float((merged[k] - base[k]).pow(2).sum()) for k in ("layers.0.norm.weight", "pos_embed"))
    total = float((merged["layers.0.a.weight"] - base["layers.0.a.weight"]).pow(2).sum())
    assert report.energy_kept == pytest.approx(1.0)
    assert report.energy_kept_all == pytest.approx(total / (total + lost), rel=1e-6)

    # only unnamed matrix keys differ: said so, not that the model equals the base
    base, merged = planted({"encoder.attn.w": (6, 5), "head.proj": (4, 5)}, rank=2, seed=5)
    save(tmp_path / "base2.safetensors", base)
    save(tmp_path / "merged2.safetensors", merged)
    with pytest.raises(OrthoMechaError, match=r"none of its matrix keys that differ from the base .* has a kohya "
                                              r"module name .*here e.g. 'encoder.attn.w'\): no LoRA can carry"):
        extract_lora(tmp_path / "merged2.safetensors", tmp_path / "base2.safetensors", 4, tmp_path / "l2.safetensors")
    assert not (tmp_path / "l2.safetensors").exists()


def test_a_text_encoder_only_change_is_named_not_called_equal(tmp_path) -> None:
    """A checkpoint whose diffusion model equals the base but whose text encoder changed: the error says where the
    difference is (it said the files were equal) and how to merge it."""
    from tests.modelgen import write_checkpoint_family

    family = write_checkpoint_family(tmp_path, "sd1", "fp32")
    tensors = load_file(str(family["base"]))
    key = next(k for k in tensors if k.startswith("cond_stage_model.") and tensors[k].ndim == 2
               and tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(tmp_path / "te_only.safetensors"))
    with pytest.raises(OrthoMechaError, match=r"equals the base .* on every matrix key of the diffusion model: its "
                                              r"text-encoder/VAE keys differ \(norm [0-9.e-]+\).*'components'"):
        extract_lora(tmp_path / "te_only.safetensors", family["base"], 4, tmp_path / "l.safetensors")
    assert not (tmp_path / "l.safetensors").exists()


# -- the command line ----------------------------------------------------------------------------------


def test_cli_writes_lora_and_json_report_and_leaves_inputs_alone(make_family, tmp_path, cli, digests) -> None:
    paths = make_family("custom", "fp16", members=["base", "anime_photo_merge"])
    before = digests(paths["base"], paths["anime_photo_merge"])
    out, report = tmp_path / "merge_lora.safetensors", tmp_path / "report.json"
    # the 0.5/0.5 merge of two rank-4 fine-tunes: rank 8 holds nearly all of it
    result = cli("extract-lora", paths["anime_photo_merge"], paths["base"], "--rank", 8, "--out", out, "--json", report)
    assert result.code == 0, result.err
    assert "kept" in result.out and "1-D keys" in result.out
    data = json.loads(report.read_text())
    assert data["rank"] == 8 and data["dtype"] == "fp16" and data["one_d"]["keys"] == 5
    assert {k["lora"] for k in data["keys"]} == {k.rsplit(".", 2)[0] for k in load_file(str(out)) if "lora_up" in k}
    assert 0.99 < data["energy_kept"] <= 1.0
    assert digests(paths["base"], paths["anime_photo_merge"]) == before


def test_cli_errors_are_one_line(make_family, tmp_path, cli, cli_error, digests) -> None:
    paths = make_family("custom", "fp16", members=["base", "anime"])
    base, model = paths["base"], paths["anime"]
    before = digests(base, model)
    out = tmp_path / "lora.safetensors"

    line = cli_error("extract-lora", tmp_path / "nope.safetensors", base, "--rank", 4, "--out", out)
    assert "nope.safetensors" in line and "no such file" in line
    line = cli_error("extract-lora", model, base, "--rank", 0, "--out", out)
    assert "--rank" in line and "≥ 1" in line

    tensors = stored(model)
    tensors["layers.0.attn.out.weight"] = torch.zeros(48, 40, dtype=torch.float64)
    odd = save(tmp_path / "odd.safetensors", {k: v.float() for k, v in tensors.items()})
    line = cli_error("extract-lora", odd, base, "--rank", 4, "--out", out)
    assert "odd.safetensors" in line and "layers.0.attn.out.weight" in line and "not built on this base" in line

    assert cli("extract-lora", model, base, "--rank", 4, "--out", out).code == 0
    first = digests(out)
    line = cli_error("extract-lora", model, base, "--rank", 2, "--out", out)
    assert "already exists" in line and "--overwrite" in line
    assert digests(out) == first
    assert cli("extract-lora", model, base, "--rank", 2, "--out", out, "--overwrite").code == 0
    assert digests(out) != first

    line = cli_error("extract-lora", model, base, "--rank", 4, "--out", model, "--overwrite")
    assert "input" in line
    line = cli_error("extract-lora", base, base, "--rank", 4, "--out", tmp_path / "same.safetensors")
    assert "no difference" in line
    assert not (tmp_path / "same.safetensors").exists()
    assert digests(base, model) == before

    # a report that cannot be written fails before the LoRA is written, not after (then rc 2 with the LoRA there)
    fresh = tmp_path / "fresh.safetensors"
    line = cli_error("extract-lora", model, base, "--rank", 4, "--out", fresh, "--json", tmp_path / "no" / "r.json")
    assert "the folder for the report does not exist" in line and not fresh.exists()
    compressed = tmp_path / "compressed"
    line = cli_error("compress", "--base", base, model, "--out", compressed, "--rank", 2, "--json",
                     tmp_path / "no" / "r.json")
    assert "the folder for the report does not exist" in line and not compressed.exists()


def test_api_refuses_bad_dtype_before_reading(tmp_path) -> None:
    with pytest.raises(OrthoMechaError, match="valid: fp16, bf16, fp32"):
        extract_lora(tmp_path / "a.safetensors", tmp_path / "b.safetensors", 4, tmp_path / "c.safetensors", "fp8")
