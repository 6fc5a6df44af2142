"""Predicted survival against the survival measured on a real merge of the planted family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ortho_mecha import evaluate
from ortho_mecha.merge import merge_plan
from ortho_mecha.plan import plan_from_dict
from tests.modelgen import write_family_files

MEMBERS = ["base", "anime", "photo", "anime_v2", "anime_photo_merge", "unrelated"]


@pytest.mark.parametrize(
    ("method", "options"),
    [("weighted_sum", {}), ("ortho_superpose", {}), ("ortho_project", {}), ("ortho_superpose", {"alpha": 0.7})],
)
def test_predicted_survival_matches_measured(tmp_path: Path, method: str, options: dict) -> None:
    paths = write_family_files(tmp_path / "m", "flux", "fp32", members=MEMBERS)
    rows = [
        {"model": str(paths["anime"]), "alpha": 1.0},
        {"model": str(paths["photo"]), "alpha": 0.8, "repeat": 2},
        {"model": str(paths["anime_v2"]), "delta_from": str(paths["anime"]), "alpha": 1.0},
        {"model": str(paths["anime_photo_merge"]), "alpha": 0.5},
        {"model": str(paths["unrelated"]), "alpha": 1.0, "enabled": False},
    ]
    plan = plan_from_dict(
        {"base": str(paths["base"]), "method": method, "rows": rows, "options": options,
         "output_dtype": "fp32", "merge_dtype": "fp64"},
        tmp_path,
    )
    before = evaluate.predict(plan)
    out = tmp_path / "merged.safetensors"
    merge_plan(plan, out)
    after = evaluate.measure(plan, out)
    assert after["label"] == "exact"
    assert np.allclose(after["predicted"], before["predicted"])
    assert np.abs(np.array(after["measured"]) - np.array(after["predicted"])).max() < 0.02
    assert len(after["measured"]) == 4  # the disabled row is not a row of the merge


def test_orthomerge_estimate_follows_the_measured_survival_of_independent_deltas(tmp_path: Path) -> None:
    """Independent random deltas: the rotation carries its key's share of each, the rest is averaged; the
    estimate that counted every delta as all rotation said 1/√n where the merge gives about 1/n."""
    paths = write_family_files(tmp_path / "m", "flux", "fp32", members=["base", "anime", "photo", "unrelated"])
    rows = [{"model": str(paths[name])} for name in ("anime", "photo", "unrelated")]
    plan = plan_from_dict({"base": str(paths["base"]), "method": "orthomerge", "rows": rows,
                           "output_dtype": "fp32", "merge_dtype": "fp64"}, tmp_path)
    out = tmp_path / "merged.safetensors"
    merge_plan(plan, out)
    after = evaluate.measure(plan, out)
    assert after["label"] == "estimate"
    measured, predicted = np.array(after["measured"]), np.array(after["predicted"])
    assert np.abs(measured - predicted).max() < 0.05, (measured, predicted)
    assert np.all(predicted < 1 / np.sqrt(3) - 0.1)  # not the all-rotation figure


def test_a_plan_with_a_texture_says_its_prediction_is_before_the_texture(tmp_path: Path) -> None:
    paths = write_family_files(tmp_path / "m", "flux", "fp32", members=["base", "anime", "photo"])
    plan = plan_from_dict({"base": str(paths["base"]), "method": "weighted_sum",
                           "rows": [{"model": str(paths["anime"])}],
                           "texture": {"model": str(paths["photo"]), "alpha": 0.5, "mode": "add"}}, tmp_path)
    assert evaluate.predict(plan)["label"] == "exact, before the texture boost"


def test_fp16_rows_over_an_fp32_base_keep_their_rounding_noise_out_of_a_superpose(tmp_path: Path) -> None:
    # an fp32 base with fp16 fine-tunes (the usual mix): the rows' fp16 rounding is what separates a merge row from
    # the exact merge of the others; the fp32 base's floor could not see it, and the merge blew it up ~100× while
    # the survival read 1.000 (QA5 arch F0)
    from safetensors.torch import load_file

    from ortho_mecha.recipe import recipe_text
    from tests.modelgen import write_model

    base = write_family_files(tmp_path / "b", "flux", "fp32", members=["base"])["base"]
    fp16 = write_family_files(tmp_path / "m", "flux", "fp16", members=["anime", "photo", "anime_photo_merge"])
    exact = write_family_files(tmp_path / "x", "flux", "fp32", members=["anime", "photo", "anime_photo_merge"])
    stored = {k: v.double() for k, v in load_file(str(base)).items()}
    merge_row = {k: v.double() for k, v in load_file(str(fp16["anime_photo_merge"])).items()}
    write_model(tmp_path / "m" / "opposite.safetensors", {k: 2 * stored[k] - merge_row[k] for k in stored}, "fp16")

    def merged_norm(rows: dict[str, Path], names: list[str]) -> tuple[float, dict]:
        plan = plan_from_dict({"base": str(base), "method": "ortho_superpose", "output_dtype": "fp32",
                               "rows": [{"model": str(rows[n])} for n in names]}, tmp_path)
        out = tmp_path / f"{len(list(tmp_path.glob('*.safetensors')))}.safetensors"
        merge_plan(plan, out)
        got = load_file(str(out))
        return float(np.sqrt(sum(float((got[k].double() - stored[k]).square().sum()) for k in stored))), plan

    names = ["anime", "photo", "anime_photo_merge"]
    stored_rows, plan = merged_norm(fp16, names)
    exact_rows, _ = merged_norm(exact, names)  # the same relations in fp32: no rounding to fit
    assert stored_rows == pytest.approx(exact_rows, rel=0.02)
    assert "noise_unit=" in recipe_text(plan)
    survival = evaluate.measure(plan, tmp_path / "0.safetensors")
    assert np.abs(np.array(survival["measured"]) - np.array(survival["predicted"])).max() < 0.02
    rows = fp16 | {"opposite": tmp_path / "m" / "opposite.safetensors"}
    cancelled, _ = merged_norm(rows, ["anime_photo_merge", "opposite"])  # an fp16 opposite cancels its row
    assert cancelled < 0.05 * exact_rows
