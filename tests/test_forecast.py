"""The dry-run forecast: exact output size (header included), sensible memory and time, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from ortho_mecha.cli import main
from ortho_mecha.forecast import PROCESS_BASELINE, forecast
from ortho_mecha.merge import merge_plan
from ortho_mecha.plan import plan_from_dict
from tests.modelgen import write_family_files

MEMBERS = ["base", "anime", "photo", "anime_v2"]


def make_plan(tmp_path: Path, method: str = "ortho_superpose", rows: int = 3, dtype: str = "fp16"):
    folder = tmp_path / "m"
    paths = {n: folder / f"{n}.safetensors" for n in MEMBERS}
    if not all(p.exists() for p in paths.values()):
        paths = write_family_files(folder, "sdxl", "fp16", members=MEMBERS)
    chosen = [{"model": str(paths[n])} for n in MEMBERS[1 : 1 + rows]]
    return plan_from_dict({"base": str(paths["base"]), "method": method, "rows": chosen, "output_dtype": dtype},
                          tmp_path)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_output_size_matches_the_merge(tmp_path: Path, dtype: str) -> None:
    plan = make_plan(tmp_path, dtype=dtype)
    out = tmp_path / "out.safetensors"
    predicted = forecast(plan, out)
    merge_plan(plan, out)
    data = out.stat().st_size
    assert predicted.output_bytes == data  # the header too: exact, whatever the inputs' hashes
    assert predicted.fits_disk is True and predicted.free_disk_bytes > 0


def test_memory_and_time_grow_with_the_work(tmp_path: Path) -> None:
    one = forecast(make_plan(tmp_path, rows=1))
    three = forecast(make_plan(tmp_path, rows=3))
    assert PROCESS_BASELINE < one.peak_ram_bytes < three.peak_ram_bytes
    assert 0 < one.seconds <= three.seconds
    assert three.inputs_bytes > one.inputs_bytes
    rotation = forecast(make_plan(tmp_path, method="orthomerge", rows=3))
    assert rotation.seconds > three.seconds


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = make_plan(tmp_path)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(plan_file), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "peak RAM" in printed and "output:" in printed and "time:" in printed
    assert "time: under a second on this machine" in printed  # not "about 0 s", not "about under a second"
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_merge_cli_reports_survival(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = make_plan(tmp_path, method="weighted_sum", rows=2)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    assert main(["merge", str(plan_file), "--out", str(tmp_path / "o.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "survival (predicted: exact)" in printed
    assert printed.count("measured") == 2
