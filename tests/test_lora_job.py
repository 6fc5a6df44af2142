"""The ``extract-lora`` background job: a real worker process through ortho_mecha.jobs, its parameters from the
dashboard's workspace helper, and no file left behind by a failed, refused or cancelled extraction."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from ortho_mecha import jobs, lora, workspace
from ortho_mecha.errors import OrthoMechaError
from tests.modelgen import stored, write_family_files

WAIT_LIMIT_S = 120.0  # a safety net for a hung worker, never a measured duration


def wait_done(job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while (record := jobs.status(job_id))["state"] not in jobs.FINISHED_STATES:
        assert time.monotonic() < deadline, f"the job never finished; last record: {record}"
        time.sleep(0.1)
    return record


@pytest.fixture
def models(tmp_path: Path) -> tuple[workspace.ModelChoices, Path]:
    """A workspace with a base and two fine-tunes under models/, the only allowed root."""
    space = tmp_path / "workspace"
    write_family_files(space / "models", "custom", "fp32", members=["base", "anime", "photo"])
    return workspace.ModelChoices.scan([space]), space


def test_the_job_writes_the_lora_and_reports_kept_energy(models, digests) -> None:
    choices, space = models
    before = digests(space / "models")
    params = workspace.lora_job_params("models/anime.safetensors", "models/base.safetensors", 2, "anime r2", choices,
                                       space)
    out = space / "loras" / "anime r2.safetensors"
    assert params == {"model": str(space / "models" / "anime.safetensors"),
                      "base": str(space / "models" / "base.safetensors"), "rank": 2, "out": str(out)}
    record = wait_done(jobs.submit("extract-lora", params))
    assert record["state"] == "done", record["error"]
    result = record["result"]
    assert result["out"] == str(out) and out.is_file()
    # The same figures as the library call, and the per-key table the Mixer shows.
    direct = lora.extract_lora(params["model"], params["base"], 2, space / "direct.safetensors")
    assert result["energy_kept"] == pytest.approx(direct.energy_kept)
    frame = workspace.lora_key_frame(result)
    assert list(frame["key"]) == [k.key for k in direct.keys]
    assert list(frame["energy kept"]) == pytest.approx([k.energy_kept for k in direct.keys])
    assert (frame["rank"] <= 2).all() and result["summary"][0].startswith(f"wrote {out}")
    assert set(load_file(str(out))) == set(load_file(str(space / "direct.safetensors")))
    assert record["progress"]["keys_total"] == len(stored(space / "models" / "base.safetensors"))
    assert digests(space / "models") == before

    # A second extraction to the same name is refused before it starts, and the job never overwrites.
    with pytest.raises(OrthoMechaError, match="already exists"):
        workspace.lora_job_params("models/photo.safetensors", "models/base.safetensors", 2, "anime r2", choices,
                                  space)
    written = out.read_bytes()
    record = wait_done(jobs.submit("extract-lora", {**params, "model": str(space / "models" / "photo.safetensors")}))
    assert record["state"] == "failed" and "already exists" in record["error"]
    assert out.read_bytes() == written


def test_a_failed_job_leaves_no_file(models, tmp_path) -> None:
    _, space = models
    other = write_family_files(tmp_path / "other", "flux", "fp32", members=["base"])["base"]
    out = space / "loras" / "mismatch.safetensors"
    out.parent.mkdir(parents=True)
    params = {"model": str(other), "base": str(space / "models" / "base.safetensors"), "rank": 2, "out": str(out)}
    record = wait_done(jobs.submit("extract-lora", params))
    assert record["state"] == "failed"
    assert list(out.parent.iterdir()) == []
    record = wait_done(jobs.submit("extract-lora", {**params, "rank": "8"}))
    assert record["state"] == "failed" and "'rank' must be a whole number" in record["error"]


def test_a_cancelled_extraction_writes_nothing(models) -> None:
    _, space = models
    out = space / "loras" / "cancelled.safetensors"
    out.parent.mkdir(parents=True)
    seen: list[dict] = []

    def progress(info: dict) -> None:  # what the worker's progress does once a cancel was asked for
        seen.append(dict(info))
        if len(seen) == 3:
            raise jobs.Cancelled("cancelled")

    params = {"model": str(space / "models" / "anime.safetensors"), "base": str(space / "models" / "base.safetensors"),
              "rank": 2, "out": str(out)}
    with pytest.raises(jobs.Cancelled):
        lora.run_job(params, progress)
    assert [info["keys_done"] for info in seen] == [0, 1, 2]
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("model", "base", "rank", "name", "message"),
    [
        ("models/anime.safetensors", "models/base.safetensors", 0, "x", "whole number ≥ 1"),
        ("models/base.safetensors", "models/base.safetensors", 4, "x", "is the base itself"),
        ("../outside.safetensors", "models/base.safetensors", 4, "x", "not one of the model files"),
        ("models/anime.safetensors", "models/base.safetensors", 4, "../x", "must be a file name"),
    ],
)
def test_job_parameters_are_checked_before_the_job(models, model, base, rank, name, message) -> None:
    choices, space = models
    with pytest.raises(OrthoMechaError, match=message):
        workspace.lora_job_params(model, base, rank, name, choices, space)


def test_a_lora_as_the_model_is_refused_before_the_job(models) -> None:
    """It was refused only once the job ran ("LoRA extraction failed: … is a kohya LoRA")."""
    choices, space = models
    lora.extract_lora(space / "models" / "anime.safetensors", space / "models" / "base.safetensors", 2,
                      space / "models" / "anime lora.safetensors")
    choices = workspace.ModelChoices.scan([space])
    with pytest.raises(OrthoMechaError, match=r"'models/anime lora\.safetensors' is a kohya LoRA, not a full model"):
        workspace.lora_job_params("models/anime lora.safetensors", "models/base.safetensors", 2, "x", choices, space)
