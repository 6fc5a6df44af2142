"""Execution details of ortho_mecha.merge that keep merges fast: torch threads shared among sd-mecha's
workers (and given back), and the cheap finite check of the writer, which must not miss or invent repairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ortho_mecha.merge import merge_plan
from ortho_mecha.plan import Plan, plan_from_dict
from tests.merge_fixtures import base_state, finetune, write_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("models"))


def plan_for(base: Path, models: list[Path], method: str = "ortho_superpose", output_dtype: str = "fp32") -> Plan:
    rows = [{"model": str(m)} for m in models]
    return plan_from_dict(
        {"base": str(base), "method": method, "rows": rows, "output_dtype": output_dtype}, base.parent
    )


@pytest.mark.parametrize(("threads", "shared"), [(2, True), (1, False), (0, False)])
def test_torch_threads_are_shared_among_workers_and_given_back(
    family: dict[str, Path], tmp_path: Path, threads: int, shared: bool
) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    def progress(info: dict) -> None:
        if "keys_done" in info:  # reported by sd-mecha's workers, key by key
            seen.append(torch.get_num_threads())

    merge_plan(
        plan_for(family["base"], [family["a"], family["b"]]),
        tmp_path / "out.safetensors",
        threads=threads,
        progress=progress,
    )
    assert torch.get_num_threads() == before
    assert set(seen) == {max(1, before // 2) if shared else before}


def test_finite_values_whose_sum_overflows_are_not_repaired(tmp_path: Path) -> None:
    base = base_state()
    base["input_blocks.0.0.bias"] = torch.full((8,), 40000.0)  # fp16 holds it; the fp16 sum of 8 overflows
    model = finetune(base, 21)
    model["input_blocks.0.0.bias"] = torch.full((8,), 40000.0)
    model["time_embed.0.bias"][2] = float("nan")
    paths = [tmp_path / "base.safetensors", tmp_path / "model.safetensors"]
    save_file(base, str(paths[0]))
    save_file(model, str(paths[1]))
    out = tmp_path / "out.safetensors"
    report = merge_plan(plan_for(paths[0], paths[1:], "add_difference", "fp16"), out)
    assert report["repairs"]["nonfinite"] == {"time_embed.0.bias": 1}
    merged = load_file(str(out))
    assert torch.equal(merged["input_blocks.0.0.bias"], torch.full((8,), 40000.0, dtype=torch.float16))
    assert merged["time_embed.0.bias"][2] == base["time_embed.0.bias"][2].half()


def test_merge_progress_says_the_keys_once_and_the_time_left(family: dict[str, Path], tmp_path: Path) -> None:
    """The dashboard showed "key 214 of 457 · merged 214 of 457 keys" and no time left."""
    from ortho_mecha.ui import describe_progress

    seen: list[dict] = []
    merge_plan(plan_for(family["base"], [family["a"], family["b"]]), tmp_path / "out.safetensors", threads=0,
               progress=lambda info: seen.append(dict(info)) if "keys_done" in info else None)
    last = seen[-1]
    assert last["keys_done"] == last["keys_total"] and last["eta_s"] == 0.0
    assert all(info["eta_s"] >= 0 for info in seen)
    line = describe_progress(seen[0])
    assert line.count(str(seen[0]["keys_total"])) == 1 and "left" in line
