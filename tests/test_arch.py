"""Architecture detection from key names and shapes, architecture ids and aliases, per-block grouping.

The key→shape dicts below hold each family's identifying keys at their real shapes (see
/work/shared/COMFYUI.md §4) plus a few ordinary keys; detection needs no tensor, so no files are
written except for the last tests, which detect through real demo files.
"""

from __future__ import annotations

import pytest

from ortho_mecha.arch import ARCH_IDS, block_of, block_sort_key, canonical_arch, detect
from ortho_mecha.io import Model
from ortho_mecha.validate import align

Shapes = dict[str, tuple[int, ...]]


def unet(context: int, label_emb: tuple[int, int] | None = None, channels: int = 320) -> Shapes:
    """UNet keys (SD1/SD2/SDXL); the cross-attention to_k input width is the text context."""
    shapes: Shapes = {
        "input_blocks.0.0.weight": (channels, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (channels, channels, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (channels, context),
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (2 * channels, context),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (4 * channels, context),
        "time_embed.0.weight": (4 * channels, channels),
        "out.2.weight": (4, channels, 3, 3),
    }
    if label_emb is not None:
        shapes["label_emb.0.0.weight"] = label_emb
    return shapes


def flux(img_in: int = 64, txt_in: int = 4096, **extra: tuple[int, ...]) -> Shapes:
    """Flux-family keys (canonical: norms as ``.weight``), hidden 3072."""
    shapes: Shapes = {
        "img_in.weight": (3072, img_in),
        "txt_in.weight": (3072, txt_in),
        "double_blocks.0.img_attn.norm.key_norm.weight": (128,),
        "double_blocks.0.img_attn.norm.query_norm.weight": (128,),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "single_blocks.0.linear1.weight": (21504, 3072),
        "final_layer.linear.weight": (64, 3072),
    }
    return shapes | extra


def lumina(dim: int, cap_feat: int) -> Shapes:
    """NextDiT keys (Z-Image and Lumina 2 share them; the width tells them apart)."""
    return {
        "cap_embedder.0.weight": (cap_feat,),
        "cap_embedder.1.weight": (dim, cap_feat),
        "noise_refiner.0.attention.k_norm.weight": (128,),
        "noise_refiner.0.attention.qkv.weight": (3 * dim, dim),
        "context_refiner.0.attention.qkv.weight": (3 * dim, dim),
        "layers.0.attention.qkv.weight": (3 * dim, dim),
        "x_embedder.weight": (dim, 64),
        "t_embedder.mlp.0.weight": (256, 256),
    }


FLUX_DEV = flux(**{"guidance_in.in_layer.weight": (3072, 256), "vector_in.in_layer.weight": (3072, 768)})
FLUX_SCHNELL = flux(**{"vector_in.in_layer.weight": (3072, 768)})
FLUX2_KLEIN = flux(
    img_in=128,
    txt_in=7680,
    **{
        "double_stream_modulation_img.lin.weight": (18432, 3072),
        "double_stream_modulation_txt.lin.weight": (18432, 3072),
        "single_stream_modulation.lin.weight": (9216, 3072),
    },
)
CHROMA = flux(
    **{"distilled_guidance_layer.norms.0.scale": (5120,), "distilled_guidance_layer.in_proj.weight": (5120, 64)}
)
CHROMA_RADIANCE = {k: v for k, v in CHROMA.items() if k != "img_in.weight"} | {
    "img_in_patch.weight": (3072, 3, 16, 16),
    "nerf_blocks.0.norm.scale": (64,),
}


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        pytest.param(unet(768), "sd1", id="sd1-context-768"),
        pytest.param(unet(2048, label_emb=(1280, 2816)), "sdxl", id="sdxl-label_emb-context-2048"),
        pytest.param(FLUX_DEV, "flux1", id="flux1-dev"),
        pytest.param(FLUX_SCHNELL, "flux1", id="flux1-schnell-no-guidance_in"),
        pytest.param(FLUX2_KLEIN, "flux2-klein", id="flux2-klein"),
        pytest.param(CHROMA, "chroma", id="chroma"),
        pytest.param(lumina(3840, 2560), "zimage", id="zimage-3840"),
        pytest.param(lumina(2304, 2304), "custom", id="lumina2-2304-is-custom"),
        pytest.param(unet(1024), "custom", id="sd2-context-1024-is-custom"),
        pytest.param(unet(1280, label_emb=(1536, 2560), channels=384), "custom", id="sdxl-refiner-is-custom"),
        pytest.param(unet(1024, label_emb=(1280, 1536)), "custom", id="sd2-unclip-is-custom"),
        pytest.param(CHROMA_RADIANCE, "custom", id="chroma-radiance-pixel-space-is-custom"),
        pytest.param({"embed.weight": (48, 24), "layers.0.attn.wqkv.weight": (144, 48)}, "custom", id="unknown"),
        pytest.param({}, "custom", id="empty"),
    ],
)
def test_detect(shapes: Shapes, expected: str) -> None:
    assert detect(shapes) == expected


def test_flux_key_alone_is_not_flux1() -> None:
    """The norm key without ``img_in`` is not enough (a file that merely resembles Flux)."""
    assert detect({k: v for k, v in FLUX_SCHNELL.items() if k != "img_in.weight"}) == "custom"


def test_sd1_without_cross_attention_is_custom() -> None:
    """A UNet whose context width cannot be read is not guessed to be SD1."""
    shapes = {k: v for k, v in unet(768).items() if not k.endswith("attn2.to_k.weight")}
    assert detect(shapes) == "custom"


def test_detection_expects_canonical_keys() -> None:
    """BFL files store norms as ``.scale``: detection runs on canonical keys, after validate's rename."""
    raw = {k.replace("key_norm.weight", "key_norm.scale"): v for k, v in FLUX_DEV.items()}
    assert detect(raw) == "custom"
    assert detect(FLUX_DEV) == "flux1"


@pytest.mark.parametrize(
    ("given", "expected"),
    [("chroma-flow", "chroma"), ("zimage-base", "zimage"), *[(a, a) for a in ARCH_IDS]],
)
def test_canonical_arch_accepts_ids_and_aliases(given: str, expected: str) -> None:
    assert canonical_arch(given) == expected


def test_canonical_arch_rejects_an_unknown_id_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'sd3'") as info:
        canonical_arch("sd3")
    message = str(info.value)
    for arch in (*ARCH_IDS, "chroma-flow", "zimage-base"):
        assert arch in message


@pytest.mark.parametrize(
    ("key", "block"),
    [
        ("double_blocks.3.img_attn.qkv.weight", "double_blocks.3"),
        ("single_blocks.37.linear1.weight", "single_blocks.37"),
        ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.4"),
        ("input_blocks.0.0.weight", "input_blocks.0"),
        ("output_blocks.11.0.in_layers.2.weight", "output_blocks.11"),
        ("middle_block.0.in_layers.2.weight", "middle_block"),
        ("middle_block.1.transformer_blocks.0.attn1.to_q.weight", "middle_block"),
        ("layers.12.attention.qkv.weight", "layers.12"),
        ("noise_refiner.0.attention.k_norm.weight", "noise_refiner.0"),
        ("context_refiner.1.feed_forward.w1.weight", "context_refiner.1"),
        ("down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q.weight", "down_blocks.2"),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "mid_block"),
        ("transformer_blocks.5.attn.to_q.weight", "transformer_blocks.5"),
        ("single_transformer_blocks.10.proj_out.weight", "single_transformer_blocks.10"),
        ("joint_blocks.7.x_block.attn.qkv.weight", "joint_blocks.7"),
        ("blocks.2.mlp.fc1.weight", "blocks.2"),
        ("nerf_blocks.0.norm.scale", "nerf_blocks.0"),
        ("model.diffusion_model.input_blocks.4.0.emb_layers.1.weight", "input_blocks.4"),
        ("img_in.weight", "img_in"),
        ("final_layer.adaLN_modulation.1.weight", "final_layer"),
        ("time_embed.0.weight", "time_embed"),
        ("x_pad_token", "x_pad_token"),
        # a name that merely contains a block word is not a block
        ("my_layers.3.weight", "my_layers"),
    ],
)
def test_block_of(key: str, block: str) -> None:
    assert block_of(key) == block


def test_block_sort_key_orders_indices_numerically() -> None:
    blocks = ["layers.10", "img_in", "layers.2", "double_blocks.1", "layers.1", "final_layer"]
    assert sorted(blocks, key=block_sort_key) == [
        "double_blocks.1", "final_layer", "img_in", "layers.1", "layers.2", "layers.10",
    ]


@pytest.mark.parametrize(("layout", "expected"), [("flux", "flux1"), ("sdxl", "sdxl"), ("custom", "custom")])
def test_detection_through_demo_files(make_family, layout: str, expected: str) -> None:
    """Real files: the flux demo stores ``.scale`` norms, the sdxl demo is a prefixed checkpoint with TE/VAE keys."""
    paths = make_family(layout, "fp16", members=["base", "anime"])
    with Model(paths["base"]) as base, Model(paths["anime"]) as anime:
        alignment = align(base, [anime])
        assert alignment.arch == expected
        assert alignment.checks[0].arch == expected


def test_arch_option_overrides_detection(make_family) -> None:
    paths = make_family("custom", "fp16", members=["base", "anime"])
    with Model(paths["base"]) as base, Model(paths["anime"]) as anime:
        assert align(base, [anime], arch="chroma-flow").arch == "chroma"
        assert align(base, [anime]).arch == "custom"


def test_arch_option_against_another_detected_arch_is_warned_about(make_family,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    paths = make_family("flux", "fp16", members=["base", "anime"])
    with Model(paths["base"]) as base, Model(paths["anime"]) as anime, caplog.at_level("WARNING"):
        assert align(base, [anime], arch="sdxl").arch == "sdxl"
        assert align(base, [anime], arch="flux1").arch == "flux1"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{paths['base']}: --arch sdxl given, but its keys and shapes are those of flux1; the report, "
                        "plans and previews will use sdxl"]


def test_unknown_arch_option_is_refused_listing_the_choices(make_family, capsys: pytest.CaptureFixture[str]) -> None:
    from ortho_mecha.cli import main

    paths = make_family("custom", "fp16", members=["base", "anime"])
    with pytest.raises(SystemExit) as info:
        main(["validate", "--base", str(paths["base"]), str(paths["anime"]), "--arch", "sd3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sd3'" in err
    assert "chroma-flow" in err and "flux2-klein" in err
