"""The alpha sweep against the stand-in ComfyUI: merges at each alpha, same seed, a labelled grid."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from ortho_mecha.lora import extract_lora
from ortho_mecha.plan import plan_from_dict
from ortho_mecha.sweep import grid, parse_alphas
from tests.comfy_stub import ComfyStub, comfy_stub_fixture  # noqa: F401 - the comfy_stub fixture
from tests.modelgen import write_family_files

MEMBERS = ["base", "anime", "photo"]


def write_plan(tmp_path: Path) -> Path:
    paths = write_family_files(tmp_path / "m", "sdxl", "fp16", members=MEMBERS)
    plan = plan_from_dict(
        {"base": str(paths["base"]), "method": "ortho_superpose",
         "rows": [{"model": str(paths["anime"])}, {"model": str(paths["photo"])}]},
        tmp_path,
    )
    path = tmp_path / "mix.json"
    path.write_text(plan.to_json())
    return path


def test_sweep_merges_previews_and_grids(comfy_stub: ComfyStub, tmp_path: Path, cli: Callable,
                                         digests: Callable) -> None:
    plan = write_plan(tmp_path)
    inputs = sorted((tmp_path / "m").glob("*.safetensors"))
    before = digests(*inputs)
    out = tmp_path / "sweep"
    argv = ["preview", "--plan", plan, "--alphas", "0,1", "--compare", "--prompt", "a fox",
            "--seed", "5", "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", out]
    result = cli(*argv)
    assert result.code == 0, result.err
    assert "architecture sdxl (detected from base.safetensors" in result.err  # no --arch: the plan's base tells
    merges = sorted(out.glob("*.safetensors"))
    assert [p.name for p in merges] == ["mix_sweep_alpha0.safetensors", "mix_sweep_alpha1.safetensors"]
    saved = json.loads((out / "mix_sweep_alpha1.plan.json").read_text())
    assert saved["options"]["alpha"] == 1.0
    seeds = {value for body in comfy_stub.received for node in body["prompt"].values()
             for name, value in node["inputs"].items() if name in ("seed", "noise_seed")}
    assert seeds == {5}
    assert len(comfy_stub.received) == 2 + 1 + 2  # two alphas, the base, two models
    sheet = Image.open(out / "mix_sweep.png")
    cell = Image.open(next(out.glob("mix_sweep_alpha0_seed5_*.png")))
    assert sheet.width == 5 * cell.width
    assert digests(*inputs) == before
    # alpha 0 is the base: a second run reuses the merges it made and refuses to overwrite the grid
    again = cli(*argv)
    assert again.code == 2 and "mix_sweep.png" in again.err and "already exists" in again.err


def test_a_sweep_on_a_terminal_shows_its_merges_and_previews(comfy_stub: ComfyStub, tmp_path: Path, cli: Callable,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep was silent through every merge and render, for minutes with real models (QA7 finding 6)."""
    plan = write_plan(tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stderr, standing in for a terminal
    result = cli("preview", "--plan", plan, "--alphas", "0.5,1", "--prompt", "a fox", "--api", comfy_stub.url,
                 "--comfy-dir", comfy_stub.root, "--out", tmp_path / "sweep")
    assert result.code == 0, result.err
    for said in ("merging alpha 0.5", "merging alpha 1", "previewing alpha 0.5", "previewing alpha 1: "):
        assert said in result.err
    assert result.err.index("merging alpha 1") < result.err.index("previewing alpha 0.5")


def test_a_plan_named_x_plan_json_gives_files_named_x(comfy_stub: ComfyStub, tmp_path: Path, cli: Callable) -> None:
    """mix.plan.json gave mix.plan_sweep_alpha1.plan.json and mix.plan_sweep.png (QA7 finding 11)."""
    plan = write_plan(tmp_path).rename(tmp_path / "mix.plan.json")
    out = tmp_path / "sweep"
    result = cli("preview", "--plan", plan, "--alphas", "1", "--prompt", "a fox", "--api", comfy_stub.url,
                 "--comfy-dir", comfy_stub.root, "--out", out)
    assert result.code == 0, result.err
    assert (out / "mix_sweep.png").is_file() and (out / "mix_sweep_alpha1.plan.json").is_file()


def test_compare_previews_a_lora_row_as_the_base_plus_the_lora(comfy_stub: ComfyStub, tmp_path: Path,
                                                                cli: Callable, cli_error: Callable) -> None:
    paths = write_family_files(tmp_path / "m", "sdxl", "fp16", members=MEMBERS)
    lora = Path(extract_lora(paths["photo"], paths["base"], 4, tmp_path / "m" / "photo_lora.safetensors").out)
    plan = tmp_path / "mix.json"
    plan.write_text(plan_from_dict({"base": str(paths["base"]), "method": "ortho_superpose",
                                    "rows": [{"model": str(paths["anime"])}, {"model": str(lora), "alpha": 0.5}]},
                                   tmp_path).to_json())
    out = tmp_path / "sweep"
    result = cli("preview", "--plan", plan, "--alphas", "1", "--compare", "--prompt", "a fox",
                 "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", out)
    assert result.code == 0, result.err
    loaded = [node["inputs"]["ckpt_name"] for body in comfy_stub.received for node in body["prompt"].values()
              if "ckpt_name" in node["inputs"]]
    assert len(loaded) == 4 and not any(name.startswith("photo_lora") for name in loaded)  # never the LoRA itself
    assert any(name.startswith("mix_sweep_photo_lora.") for name in loaded)
    on_base = json.loads((out / "mix_sweep_photo_lora.plan.json").read_text())
    assert on_base["method"] == "add_difference" and on_base["rows"][0]["alpha"] == 0.5
    assert "photo_lora+base:" in result.out and (out / "mix_sweep.png").is_file()
    for arch in ([], ["--arch", "sdxl"]):  # the LoRA itself: refused before ComfyUI is asked, with what to do
        line = cli_error("preview", lora, *arch, "--prompt", "a fox", "--api", comfy_stub.url,
                         "--out", tmp_path / "one")
        assert f"{lora}: is a LoRA" in line and "--compare" in line


def test_compare_tells_rows_of_the_same_file_name_apart(comfy_stub: ComfyStub, tmp_path: Path, cli: Callable) -> None:
    """Trainers save every LoRA as pytorch_lora_weights.safetensors, kept in a folder each: the second one's merge
    took the first one's name, and the sweep failed ("was not merged from this sweep's plan")."""
    paths = write_family_files(tmp_path / "m", "sdxl", "fp16", members=MEMBERS)
    for name in ("photo", "anime"):
        (tmp_path / name).mkdir()
    loras = [Path(extract_lora(paths[name], paths["base"], 4, tmp_path / name / "lora.safetensors").out)
             for name in ("photo", "anime")]
    plan = tmp_path / "mix.json"
    plan.write_text(plan_from_dict({"base": str(paths["base"]), "method": "ortho_superpose",
                                    "rows": [{"model": str(lora)} for lora in loras]}, tmp_path).to_json())
    out = tmp_path / "sweep"
    result = cli("preview", "--plan", plan, "--alphas", "1", "--compare", "--prompt", "a fox",
                 "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", out)
    assert result.code == 0, result.err
    assert "photo/lora+base:" in result.out and "anime/lora+base:" in result.out
    assert (out / "mix_sweep_photo_lora.safetensors").is_file() and (out / "mix_sweep_anime_lora.safetensors").is_file()


def test_parse_alphas_and_errors(tmp_path: Path, cli_error: Callable) -> None:
    assert parse_alphas("0.5, 1,1.5,1") == [0.5, 1.0, 1.5]
    plan = write_plan(tmp_path)
    common = ["--arch", "sdxl", "--prompt", "p", "--out", tmp_path / "o"]
    assert "between 0 and 2" in cli_error("preview", "--plan", plan, "--alphas", "3", *common)
    assert "numbers separated by commas" in cli_error("preview", "--plan", plan, "--alphas", "a,b", *common)
    assert "one or more values" in cli_error("preview", "--plan", plan, "--alphas", "", *common)  # not the defaults
    assert "not both" in cli_error("preview", tmp_path / "x.safetensors", "--plan", plan, *common)
    assert "needs a MODEL" in cli_error("preview", *common)


def png(color: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grid_lays_out_columns() -> None:
    sheet = Image.open(io.BytesIO(grid([("a", [png("red"), png("red")]), ("b", [png("blue")])])))
    label = 16  # 10 px text (the least) and its margins
    assert sheet.size == (64, label + 48)
    assert sheet.getpixel((5, label + 5)) == (255, 0, 0)
    assert sheet.getpixel((32 + 5, label + 5)) == (0, 0, 255)
    assert sheet.getpixel((32 + 5, label + 24 + 5)) == (255, 255, 255)  # the shorter column stays blank


def test_grid_labels_grow_with_the_images() -> None:
    """A 5-column grid of 1024-px images is shown screen-wide at a fifth of its size: 10 px labels became ~2 px."""
    sheet = Image.open(io.BytesIO(grid([(f"alpha {a}", [png("gray", (1024, 1024))]) for a in range(5)])))
    label = sheet.height - 1024
    inked = [y for y in range(label) if any(sheet.getpixel((x, y)) != (255, 255, 255) for x in range(0, 1024, 2))]
    assert label >= 60 and max(inked) - min(inked) >= 30  # text ~46 px tall, ~9 px at a fifth


def test_a_long_label_stays_in_its_column() -> None:
    """A model's long file name ran over the next column's label; it is cut with '…' at its column's edge."""
    name = "juggernautXL_juggXIByRundiffusion_v11_fp16_pruned"
    sheet = Image.open(io.BytesIO(grid([(name, [png("gray", (128, 128))]), ("b", [png("gray", (128, 128))])])))
    label = sheet.height - 128
    first = [x for x in range(sheet.width) for y in range(label) if sheet.getpixel((x, y)) != (255, 255, 255)
             and x < 128]
    assert first and max(first) < 128 - 2  # inside its column, short of the margin
    ink_of_b = [x for x in range(128, 256) for y in range(label) if sheet.getpixel((x, y)) != (255, 255, 255)]
    assert ink_of_b and min(ink_of_b) >= 128 + 2  # the next column holds its own label only


def test_sweep_checks_comfyui_before_merging(comfy_stub: ComfyStub, tmp_path: Path, cli_error: Callable) -> None:
    """ComfyUI down, or unable to run the workflow: the sweep stops before writing any merge."""
    plan = write_plan(tmp_path)
    out = tmp_path / "sweep"
    common = ["preview", "--plan", plan, "--alphas", "0.5,1", "--arch", "sdxl", "--prompt", "p", "--out", out]
    comfy_stub.missing_classes.add("KSamplerAdvanced")
    assert "KSamplerAdvanced" in cli_error(*common, "--api", comfy_stub.url)
    comfy_stub.stop()
    assert "connection refused" in cli_error(*common, "--api", comfy_stub.url)
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.plan.json"))


def test_a_sweep_without_comfy_dir_is_refused_before_merging_unless_comfyui_will_see_the_merges(
    comfy_stub: ComfyStub, tmp_path: Path, cli: Callable, cli_error: Callable
) -> None:
    plan = write_plan(tmp_path)
    comfy_stub.add_standard_files()
    common = ["preview", "--plan", plan, "--alphas", "1", "--arch", "sdxl", "--prompt", "p", "--api", comfy_stub.url]
    out = tmp_path / "sweep"
    error = cli_error(*common, "--out", out)
    assert "ComfyUI only sees the sweep's merges in its models/checkpoints folder: set COMFYUI_DIR" in error
    assert not out.exists()  # nothing merged, and the folder made for it is gone again
    inside = comfy_stub.root / "models" / "checkpoints" / "sweeps"  # where ComfyUI lists the merges
    error = cli_error(*common, "--compare", "--out", inside)
    assert "base.safetensors: is not in ComfyUI's checkpoints list" in error
    comfy_stub.add_file("checkpoints", "base.safetensors", b"another base")  # ComfyUI's own, not the plan's
    error = cli_error(*common, "--compare", "--out", inside)
    assert "base.safetensors: ComfyUI at" in error and "lists a 'base.safetensors'" in error
    assert not list(inside.glob("*.safetensors"))
    result = cli(*common, "--out", inside)
    assert result.code == 0, result.err
    assert comfy_stub.received[-1]["prompt"]["1"]["inputs"]["ckpt_name"] == "sweeps/mix_sweep_alpha1.safetensors"


def test_a_compared_model_with_a_long_name_gets_short_image_names(comfy_stub: ComfyStub, tmp_path: Path,
                                                                  cli: Callable) -> None:
    """A model's own name may be 236 characters; its cell's images were named after it in full and the sweep failed
    at the very end with "File name too long" (QA5 dash F6)."""
    paths = write_family_files(tmp_path / "m", "flux", "fp16", members=MEMBERS)
    long_name = tmp_path / "m" / f"very_long_model_name_{'x' * 200}_v1.safetensors"
    paths["anime"].rename(long_name)
    plan = tmp_path / "mix.json"
    plan.write_text(plan_from_dict({"base": str(paths["base"]), "method": "weighted_sum",
                                    "rows": [{"model": str(long_name)}, {"model": str(paths["photo"])}]},
                                   tmp_path).to_json())
    out = tmp_path / "a_sweep_name_of_some_length"
    result = cli("preview", "--plan", plan, "--alphas", "1", "--compare", "--prompt", "a fox",
                 "--api", comfy_stub.url, "--comfy-dir", comfy_stub.root, "--out", out)
    assert result.code == 0, result.err
    names = [p.name for p in out.iterdir()]
    assert max(len(n) for n in names) < 160, names
    assert len([n for n in names if n.startswith("mix_sweep_very_long_model_name_x")]) == 1  # its one image


def test_a_sweep_named_sweep_does_not_say_it_twice() -> None:
    from ortho_mecha.sweep import sweep_stem

    assert [sweep_stem(n) for n in ("mix", "sweep", "my Sweep", "sweeper")] == [
        "mix_sweep", "sweep", "my Sweep", "sweeper_sweep"]
