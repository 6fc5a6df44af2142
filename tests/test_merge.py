"""The merge pipeline end to end on tiny real files: output, metadata, repairs, reproduction, safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ortho_mecha.cli import main
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.hashing import sha256_file
from ortho_mecha.merge import (
    META_HASHES,
    META_PLAN,
    META_RECIPE,
    MergeInterrupted,
    _check_free_space,
    _OutputWriter,
    convert,
    merge_plan,
    run_job,
)
from ortho_mecha.plan import Plan, load_plan, plan_from_dict
from ortho_mecha.recipe import recipe_text
from tests.merge_fixtures import (
    INT_KEY,
    ROOT,
    assert_same_merge,
    base_state,
    finetune,
    merge_three_ways,
    read,
    sha256,
    write_family,
    write_plan,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("models"))


ROWS = [
    {"model": "a.safetensors", "alpha": 0.8},
    {"model": "pref.safetensors", "delta_from": "b.safetensors"},
    {"model": "c16.safetensors"},
    {"model": "dbf16.safetensors", "alpha": 0.5},
    {"model": "e8.safetensors", "repeat": 2},
]


def make_plan(family: dict[str, Path], method: str = "ortho_superpose", **extra: object) -> Plan:
    data = {"base": "base.safetensors", "method": method, "rows": ROWS, "output_dtype": "fp32"} | extra
    return plan_from_dict(data, family["base"].parent)


def header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open is not iterable


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


def test_plan_merges_into_a_file_shaped_like_the_base_with_full_metadata(family, tmp_path) -> None:
    before = {name: sha256(path) for name, path in family.items()}
    plan = make_plan(family, texture={"model": "tex.safetensors", "alpha": 0.2, "mode": "orthogonal"})
    out = tmp_path / "merged.safetensors"
    seen: list[dict] = []
    report = merge_plan(plan, out, progress=seen.append)
    tensors, metadata = header(out)
    base = read(family["base"])
    assert list(tensors) == sorted(base) or set(tensors) == set(base)
    assert {k: v.dtype for k, v in tensors.items()} == {k: v.dtype for k, v in base.items()}
    assert torch.equal(tensors[INT_KEY], base[INT_KEY])
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert metadata[META_RECIPE] == recipe_text(plan)
    assert metadata[META_PLAN] == plan.to_json()
    assert json.loads(metadata[META_HASHES]) == {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in plan.input_files()
    }
    assert report["sha256"] == json.loads(metadata[META_HASHES])
    assert report["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["repairs"] == {"nonfinite": {}, "missing": [], "non_float": [INT_KEY]}
    assert report["output"] == str(out) and report["keys"] == len(base) and report["rows"] == 5
    assert seen[-1]["fraction"] == 1.0 and seen[-1]["keys_total"] == len(base)
    assert {name: sha256(path) for name, path in family.items()} == before
    assert leftovers(tmp_path) == []


def test_output_dtypes_fp8_and_bf16_with_fp64_arithmetic(family, tmp_path) -> None:
    for output_dtype, torch_dtype in (("fp8_e4m3fn", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
        out = tmp_path / f"{output_dtype}.safetensors"
        merge_plan(make_plan(family, "orthomerge", output_dtype=output_dtype, merge_dtype="fp64"), out, threads=0)
        tensors, _ = header(out)
        assert {v.dtype for k, v in tensors.items() if k != INT_KEY} == {torch_dtype}


def test_values_are_the_recipes_values(family, tmp_path) -> None:
    plan = make_plan(family, "add_difference", rows=[{"model": "pref.safetensors", "alpha": 0.5}])
    out = tmp_path / "sum.safetensors"
    merge_plan(plan, out)
    tensors, _ = header(out)
    base, pref = read(family["base"]), read(family["pref"])
    key = "middle_block.1.proj_in.weight"
    expected = base[key] + 0.5 * (pref["model.diffusion_model." + key] - base[key])
    torch.testing.assert_close(tensors[key], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "options"), [("orthomerge", {}), ("orthomerge", {"conflict_aware": True}),
                                                 ("dare", {})])
def test_mecha_file_and_script_reproduce_the_merge_bit_for_bit(family, tmp_path, method, options) -> None:
    """Also with a true beside a 1.0 in the recipe (conflict_aware, dare's options), which sd-mecha 1.1.8 writes
    as one literal when it serializes a loaded recipe: the script records the recipe as written."""
    data = make_plan(family, method, merge_dtype="fp64").to_dict()
    plan_path = write_plan(tmp_path, data | {"options": data["options"] | options})
    first, from_mecha, from_script, printed = merge_three_ways(plan_path, family["base"], tmp_path)
    assert json.loads(printed)["output"] == str(from_script)
    assert_same_merge(first, from_mecha, from_script)
    assert header(from_script)[1][META_PLAN] == header(first)[1][META_PLAN]


def test_a_weight_stored_as_integers_is_refused_naming_the_key(family, tmp_path) -> None:
    """The analysis reads a float key stored as integers in a fine-tune as the base's value; merge summed the integers
    in as weights, with no word."""
    state = finetune(base_state(), 13)
    state["time_embed.0.bias"] = torch.arange(state["time_embed.0.bias"].numel(), dtype=torch.int32)
    odd = tmp_path / "ints.safetensors"
    save_file(state, str(odd))
    plan = plan_from_dict({"base": str(family["base"]), "method": "add_difference", "rows": [{"model": str(odd)}]},
                          tmp_path)
    with pytest.raises(OrthoMechaError, match=r"key 'time_embed.0.bias' is stored as I32, not floating point"):
        merge_plan(plan, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_nan_elements_are_replaced_by_the_base_values(family, tmp_path) -> None:
    state = finetune(base_state(), 11)
    state["time_embed.0.weight"][3, 5] = float("nan")
    state["time_embed.0.bias"][0] = float("inf")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    plan = plan_from_dict(
        {
            "base": str(family["base"]),
            "method": "add_difference",
            "rows": [{"model": str(bad)}],
            "output_dtype": "fp32",
        },
        tmp_path,
    )
    report = merge_plan(plan, tmp_path / "repaired.safetensors")
    assert report["repairs"]["nonfinite"] == {"time_embed.0.weight": 1, "time_embed.0.bias": 1}
    tensors, _ = header(tmp_path / "repaired.safetensors")
    base = read(family["base"])
    assert tensors["time_embed.0.weight"][3, 5] == base["time_embed.0.weight"][3, 5]
    assert tensors["time_embed.0.bias"][0] == base["time_embed.0.bias"][0]
    assert torch.equal(tensors["time_embed.0.weight"][4], state["time_embed.0.weight"][4])


def test_missing_keys_come_from_the_base_and_extra_keys_are_counted(family, tmp_path) -> None:
    state = finetune(base_state(), 12)
    del state["out.2.weight"]
    state["extra.weight"] = torch.ones(2)
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    plan = plan_from_dict(
        {
            "base": str(family["base"]),
            "method": "weighted_sum",
            "rows": [{"model": str(partial)}],
            "output_dtype": "fp32",
        },
        tmp_path,
    )
    report = merge_plan(plan, tmp_path / "filled.safetensors")
    assert report["repairs"]["missing"] == []  # the row's delta is zero there: the merge makes the key
    assert report["extra_keys_ignored"] == 1
    assert report["inputs"][0]["missing"] == 1
    tensors, _ = header(tmp_path / "filled.safetensors")
    assert torch.equal(tensors["out.2.weight"], read(family["base"])["out.2.weight"])
    assert "extra.weight" not in tensors


@pytest.mark.parametrize("method", ["add_difference", "ortho_superpose", "orthomerge"])
def test_a_key_missing_from_one_row_is_a_zero_delta_of_that_row_only(family, tmp_path, method) -> None:
    state = finetune(base_state(), 12)
    del state["out.2.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    rows = [{"model": str(partial)}, {"model": str(family["a"])}]
    plan = plan_from_dict({"base": str(family["base"]), "method": method, "rows": rows, "output_dtype": "fp32"},
                          tmp_path)
    report = merge_plan(plan, tmp_path / "merged.safetensors")
    assert report["repairs"]["missing"] == []
    tensors, _ = header(tmp_path / "merged.safetensors")
    base, other = read(family["base"])["out.2.weight"], read(family["a"])["out.2.weight"]
    # the other row's delta alone: every method returns a single non-zero delta in full
    torch.testing.assert_close(tensors["out.2.weight"], other, rtol=0, atol=1e-6)
    assert not torch.equal(tensors["out.2.weight"], base)


def test_a_texture_that_lacks_a_key_adds_nothing_there_and_the_rows_merge_stays(family, tmp_path) -> None:
    state = finetune(base_state(), 14)
    del state["out.2.weight"]
    save_file(state, str(tmp_path / "detail.safetensors"))
    rows = [{"model": str(family["a"])}]
    plan = plan_from_dict({"base": str(family["base"]), "method": "ortho_superpose", "rows": rows,
                           "output_dtype": "fp32", "texture": {"model": "detail.safetensors", "alpha": 0.3}}, tmp_path)
    report = merge_plan(plan, tmp_path / "merged.safetensors")
    assert report["repairs"]["missing"] == []  # it used to fail the key, then copy the base's value into it
    torch.testing.assert_close(read(tmp_path / "merged.safetensors")["out.2.weight"], read(family["a"])["out.2.weight"],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["add_difference", "ortho_superpose"])
def test_a_key_a_delta_from_lacks_is_read_as_the_base_as_the_analysis_reads_it(family, tmp_path, method) -> None:
    """A pruned parent (a delta-from missing a key): there the row's delta is model − base, in the merge as in the
    analysis, so the exact prediction holds (it said 1.000 and the merge delivered 0 on such keys)."""
    parent = finetune(base_state(), 12)
    del parent["out.2.weight"]
    save_file(parent, str(tmp_path / "parent.safetensors"))
    child = finetune(parent | {"out.2.weight": base_state()["out.2.weight"]}, 13)
    save_file(child, str(tmp_path / "child.safetensors"))
    rows = [{"model": "child.safetensors", "delta_from": "parent.safetensors"}]
    plan = plan_from_dict({"base": str(family["base"]), "method": method, "rows": rows, "output_dtype": "fp32"},
                          tmp_path)
    report = run_job({"plan_data": plan.to_dict(), "out": str(tmp_path / "merged.safetensors")}, lambda *_: None)
    merged = read(tmp_path / "merged.safetensors")
    torch.testing.assert_close(merged["out.2.weight"], child["out.2.weight"], rtol=0, atol=1e-6)
    survival = report["survival"]
    assert survival["predicted"] == pytest.approx([1.0]) and survival["measured"] == pytest.approx([1.0], abs=1e-6)


def test_the_file_does_not_depend_on_the_order_the_keys_are_merged_in(family, tmp_path) -> None:
    """sd-mecha's threads finish keys in any order; each key's bytes have a fixed place (the base's key order), so
    the same plan gives the same bytes and the printed sha256 checks a reproduction."""
    from ortho_mecha.io import DTYPES, Model

    with Model(family["a"]) as model:
        layout = {key: (DTYPES[info.dtype], tuple(info.shape)) for key, info in model.tensors.items()}
        values = {key: model.read_tensor(key, dtype=dtype) for key, (dtype, _) in layout.items()}
        for name, order in (("forward", list(layout)), ("backward", list(reversed(layout)))):
            writer = _OutputWriter(tmp_path / f"{name}.safetensors", layout, {"m": "x"}, model)
            for key in order:
                writer[key] = values[key].clone()  # written, a value lets go of its data
            writer.finish()
    assert sha256(tmp_path / "forward.safetensors") == sha256(tmp_path / "backward.safetensors")
    assert read(tmp_path / "backward.safetensors").keys() == values.keys()


def test_existing_output_is_refused_before_merging(family, tmp_path, capsys) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OrthoMechaError, match="already exists; choose another name or pass --overwrite"):
        merge_plan(make_plan(family), out)
    assert out.read_bytes() == b"keep me" and leftovers(tmp_path) == []
    from ortho_mecha.merge import run_job  # the dashboard's job says what its page offers, not a flag
    with pytest.raises(OrthoMechaError, match="already exists; choose another name, or tick 'Replace an existing"):
        run_job({"plan_data": make_plan(family).to_dict(), "out": str(out)}, lambda _: None)
    assert out.read_bytes() == b"keep me"
    plan_path = write_plan(tmp_path, make_plan(family).to_dict())
    assert main(["merge", str(plan_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err
    assert main(["merge", str(plan_path), "--out", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "repairs: 1 non-float key copied from the base" in printed
    assert hashlib.sha256(family["base"].read_bytes()).hexdigest() in printed
    assert header(out)[0].keys() == read(family["base"]).keys()


def test_output_may_not_replace_an_input(family) -> None:
    with pytest.raises(OrthoMechaError, match="would replace one of its own inputs"):
        merge_plan(make_plan(family), family["b"], overwrite=True)


def test_a_failed_merge_leaves_no_file(family, tmp_path) -> None:
    class Boom(Exception):
        pass

    def fail_at_third_key(info: dict) -> None:
        if info.get("keys_done") == 3:
            raise Boom("cancelled")

    out = tmp_path / "failed.safetensors"
    with pytest.raises(Boom):
        merge_plan(make_plan(family), out, threads=2, progress=fail_at_third_key)
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_stops_the_merge_and_removes_the_partial_file(family, tmp_path) -> None:
    def terminate_at_second_key(info: dict) -> None:
        if info.get("keys_done") == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "terminated.safetensors"
    with pytest.raises(MergeInterrupted, match="SIGTERM"):
        merge_plan(make_plan(family), out, threads=2, progress=terminate_at_second_key)
    assert not out.exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_while_the_merge_stops_is_ignored(tmp_path) -> None:
    """After Ctrl-C the merge's threads finish their keys for a few seconds; a second Ctrl-C then aborted the process
    (SIGABRT, "terminate called without an active exception", 2 of 3 tries) or printed a traceback (QA10). The
    first one stops the merge and removes the half file; the ones after it are ignored."""
    gen = torch.Generator().manual_seed(0)
    base = {f"k{i}.weight": torch.randn(1024, 1024, generator=gen).half() for i in range(8)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for name in "abc":
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).half() for k, v in base.items()},
                  str(tmp_path / f"{name}.safetensors"))
    plan = write_plan(tmp_path, {"base": "base.safetensors", "method": "orthomerge",
                                 "rows": [{"model": f"{name}.safetensors"} for name in "abc"]})
    command = [sys.executable, "-m", "ortho_mecha", "merge", str(plan), "--out", str(tmp_path / "o.safetensors")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=os.environ | {"PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not any(".partial-" in p.name for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        assert run.poll() is None, run.stderr.read() if run.stderr else ""
        time.sleep(0.05)
    time.sleep(0.5)  # keys are being merged on sd-mecha's threads
    run.send_signal(signal.SIGINT)
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "ortho-mecha: interrupted" in err and "Traceback" not in err and "terminate called" not in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.safetensors").exists()


def test_stale_partials_of_dead_processes_are_removed(family, tmp_path) -> None:
    out = tmp_path / "x.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out.with_name(f".{out.name}.partial-{int(dead.stdout)}-0a1b2c3d")
    older = out.with_name(f".{out.name}.partial-{int(dead.stdout)}")  # as earlier versions named them
    alive = out.with_name(f".{out.name}.partial-{os.getppid()}-0a1b2c3d")
    for path in (stale, older, alive):
        path.write_bytes(b"half")
    merge_plan(make_plan(family), out)
    assert leftovers(tmp_path) == [alive.name]


def test_a_merge_never_replaces_a_file_that_appeared_while_it_ran(family, tmp_path) -> None:
    out = tmp_path / "x.safetensors"

    def another_merge_finishes_first(info: dict) -> None:
        if info.get("keys_done") == 2 and not out.exists():
            out.write_bytes(b"the other merge's result")

    with pytest.raises(OrthoMechaError, match="already exists: it was written by something else meanwhile"):
        merge_plan(make_plan(family), out, progress=another_merge_finishes_first)
    assert out.read_bytes() == b"the other merge's result" and leftovers(tmp_path) == []
    out.unlink()
    merge_plan(make_plan(family), out, overwrite=True, progress=another_merge_finishes_first)  # asked: replaced
    assert out.read_bytes() != b"the other merge's result"


def test_an_input_changed_during_the_merge_fails_it_and_nothing_is_written(family, tmp_path) -> None:
    plan = make_plan(family)
    row = plan.rows[0].model
    out = tmp_path / "changed.safetensors"

    def copied_over_at_the_second_key(info: dict) -> None:
        if info.get("keys_done") == 2:
            os.utime(row, ns=(row.stat().st_atime_ns, row.stat().st_mtime_ns + 10**9))

    with pytest.raises(OrthoMechaError, match=rf"{row}: changed while it was being merged"):
        merge_plan(plan, out, progress=copied_over_at_the_second_key)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_full_disk_still_removes_the_temporary_file(tmp_path) -> None:
    """Closing the temporary file flushes what is buffered; on a full disk that fails too, and the file must go."""

    class FullDisk:
        def close(self) -> None:
            raise OSError(28, "No space left on device")

    temp = tmp_path / ".m.safetensors.partial-1-ab"
    temp.write_bytes(b"half a merge")
    writer = object.__new__(_OutputWriter)  # only its file and handle matter here
    writer.path, writer._fh = temp, FullDisk()
    writer.abort()
    assert not temp.exists()


def test_free_space_check_and_bad_device_or_threads(family, tmp_path) -> None:
    with pytest.raises(OrthoMechaError, match=r"not enough free disk space for the merge: it needs about"):
        _check_free_space(tmp_path, 2**60)
    with pytest.raises(OrthoMechaError, match=r"unknown device 'gpu0'"):
        merge_plan(make_plan(family), tmp_path / "d.safetensors", device="gpu0")
    with pytest.raises(OrthoMechaError, match=r"threads must be 0"):
        merge_plan(make_plan(family), tmp_path / "d.safetensors", threads=-1)


def test_run_job_merges_and_checks_its_params(family, tmp_path) -> None:
    plan_path = write_plan(tmp_path, make_plan(family, "ortho_project").to_dict())
    seen: list[dict] = []
    report = run_job({"plan": str(plan_path), "out": str(tmp_path / "job.safetensors")}, seen.append)
    assert report["method"] == "ortho_project" and Path(report["output"]).exists() and seen
    with pytest.raises(OrthoMechaError, match="merge job: 'out' must be a file path"):
        run_job({"plan": str(plan_path)}, seen.append)


def test_a_merge_job_writes_its_plan_beside_the_output_only_once_merged(family, tmp_path) -> None:
    out, beside = tmp_path / "m.safetensors", tmp_path / "m.plan.json"
    first = make_plan(family, "ortho_project")
    run_job({"plan_data": first.to_dict(), "out": str(out), "plan_beside": str(beside)}, lambda info: None)
    assert load_plan(beside) == first
    written = out.read_bytes()

    def cancel(info: dict) -> None:
        raise KeyboardInterrupt("cancelled")

    second = make_plan(family, "weighted_sum")
    with pytest.raises(KeyboardInterrupt):  # a cancelled replacement: the pair stays as it was
        run_job({"plan_data": second.to_dict(), "out": str(out), "overwrite": True, "plan_beside": str(beside)},
                cancel)
    assert load_plan(beside) == first and out.read_bytes() == written
    run_job({"plan_data": second.to_dict(), "out": str(out), "overwrite": True, "plan_beside": str(beside)},
            lambda info: None)
    assert load_plan(beside) == second and out.read_bytes() != written


def test_superpose_by_matrix_row_merges_and_reports_an_estimated_survival(family, tmp_path, capsys) -> None:
    data = {"base": "base.safetensors", "method": "ortho_superpose", "rows": ROWS[:3],
            "options": {"granularity": "row"}}
    plan = write_plan(family["base"].parent, data, "row_plan.json")
    assert main(["merge", str(plan), "--out", str(tmp_path / "rows.safetensors")]) == 0
    assert "survival (predicted: estimate)" in capsys.readouterr().out


def test_dry_run_checks_what_the_merge_would_refuse(family, tmp_path, capsys) -> None:
    state = finetune(base_state(), 13)
    state["time_embed.0.weight"] = torch.zeros(16, 9)
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd))
    data = {"base": str(family["base"]), "method": "add_difference", "rows": [{"model": str(odd)}]}
    plan = write_plan(tmp_path, data, "odd_plan.json")
    assert main(["merge", str(plan), "--out", str(tmp_path / "never.safetensors"), "--dry-run"]) == 2
    assert f"{odd}: key 'time_embed.0.weight' has shape [16, 9]" in capsys.readouterr().err
    fine = write_plan(tmp_path, make_plan(family).to_dict(), "fine_plan.json")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    assert main(["merge", str(fine), "--out", str(taken), "--dry-run"]) == 2
    assert f"{taken}: already exists" in capsys.readouterr().err
    assert main(["merge", str(fine), "--out", str(taken), "--dry-run", "--overwrite"]) == 0
    assert taken.read_bytes() == b"mine"
    assert main(["merge", str(fine), "--out", str(tmp_path / "n.safetensors"), "--dry-run", "--device", "potato"]) == 2
    assert "unknown device 'potato'" in capsys.readouterr().err
    assert main(["merge", str(fine), "--out", str(tmp_path / "n.safetensors"), "--dry-run", "--threads", "-1"]) == 2
    assert "threads must be 0" in capsys.readouterr().err
    folder = tmp_path / "a-folder.safetensors"
    folder.mkdir()
    assert main(["merge", str(fine), "--out", str(folder), "--dry-run", "--overwrite"]) == 2
    assert f"{folder}: is a folder; give the output a file name inside it" in capsys.readouterr().err
    sharded = dict(data, rows=[{"model": str(tmp_path / "x.safetensors.index.json")}])
    assert main(["merge", str(write_plan(tmp_path, sharded, "sharded_plan.json")), "--out",
                 str(tmp_path / "never.safetensors"), "--dry-run"]) == 2
    assert "is a sharded model; merge needs one file: write it with 'ortho-mecha convert" in capsys.readouterr().err


def test_a_write_failure_names_the_users_file_not_the_temporary_one(family, tmp_path, monkeypatch) -> None:
    from ortho_mecha import merge as merge_mod

    def full_disk(self) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_mod._OutputWriter, "finish", full_disk)
    out = tmp_path / "full.safetensors"
    with pytest.raises(OrthoMechaError) as caught:
        merge_plan(make_plan(family), out)
    assert str(caught.value) == f"{out}: cannot write the output (No space left on device); nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_bad_plan_in_one_line(tmp_path, capsys) -> None:
    plan_path = write_plan(tmp_path, {"base": "none.safetensors", "method": "orthomerge", "rows": []})
    assert main(["merge", str(plan_path), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ortho-mecha: error: {plan_path}: base ")


def test_hashes_are_cached_by_fingerprint(family, tmp_path, cache_dir) -> None:
    from ortho_mecha.cache import open_cache

    path = tmp_path / "h.safetensors"
    path.write_bytes(family["a"].read_bytes())
    digest = sha256_file(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    stat = path.stat()
    with open_cache("hashes") as cache:  # a planted value proves the second call reads the cache, not the file
        cache.set(("sha256", str(path.resolve()), stat.st_size, stat.st_mtime_ns), "planted")
    assert sha256_file(path) == "planted"
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert sha256_file(path) == digest


def test_superpose_keeps_a_small_delta_at_a_row_alpha_under_one(tmp_path: Path) -> None:
    """Row alphas scale the deltas before ortho_superpose; its rounding floor scales with them, per key with
    block alphas: a bf16 fine-tune 0.6 % off its base merges at exactly its alpha on every key."""
    gen = torch.Generator().manual_seed(7)
    keys = {f"double_blocks.{i}.img_attn.qkv.weight": (32, 16) for i in range(2)}
    keys |= {f"single_blocks.{i}.linear1.weight": (32, 16) for i in range(2)} | {"img_in.weight": (32, 16)}
    keys["double_blocks.0.img_attn.norm.key_norm.weight"] = (16,)  # with img_in: a Flux.1 layout
    base = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in keys.items()}
    model = {k: (w.float() * (1 + 0.006 * torch.randn(w.shape, generator=gen))).to(torch.bfloat16)
             for k, w in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(model, str(tmp_path / "ft.safetensors"))
    row = {"model": "ft.safetensors", "alpha": 0.5}
    for block_alphas, expected in (({}, {"double": 0.5, "single": 0.5, "img_in": 0.5}),
                                   ({"double": 1.0, "single": 0.0}, {"double": 1.0, "single": 0.0, "img_in": 0.5})):
        plan = plan_from_dict({"base": "base.safetensors", "method": "ortho_superpose", "output_dtype": "fp32",
                               "rows": [row | ({"block_alphas": block_alphas} if block_alphas else {})]}, tmp_path)
        out = tmp_path / f"merged{len(block_alphas)}.safetensors"
        merge_plan(plan, out)
        merged = read(out)
        for key, w in base.items():
            delta = model[key].double() - w.double()
            share = float(((merged[key].double() - w.double()) * delta).sum() / delta.square().sum())
            assert share == pytest.approx(expected[key.split("_blocks")[0].removesuffix(".weight")], abs=1e-6), key


@pytest.mark.parametrize("method", ["ortho_superpose", "ortho_project", "orthomerge"])
def test_a_nan_in_one_row_costs_only_its_elements(family, tmp_path, method) -> None:
    """The methods that mix elements (Grams, rotations) merge the finite rest of a key whose input has a NaN
    or Inf; only those elements are repaired (the base's values, counted), the other row's delta is kept."""
    state = finetune(base_state(), 11)
    state["time_embed.0.weight"][3, 5] = float("nan")
    state["time_embed.0.bias"][0] = float("inf")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    rows = [{"model": str(bad)}, {"model": str(family["a"])}]
    clean_rows = [{"model": str(bad.with_name("clean.safetensors"))}, {"model": str(family["a"])}]
    state["time_embed.0.weight"][3, 5] = base_state()["time_embed.0.weight"][3, 5]
    state["time_embed.0.bias"][0] = base_state()["time_embed.0.bias"][0]
    save_file(state, str(bad.with_name("clean.safetensors")))
    reports, merged = [], []
    for name, plan_rows in (("bad", rows), ("clean", clean_rows)):
        plan = plan_from_dict({"base": str(family["base"]), "method": method, "rows": plan_rows,
                               "output_dtype": "fp32"}, tmp_path)
        reports.append(merge_plan(plan, tmp_path / f"{method}-{name}.safetensors"))
        merged.append(read(tmp_path / f"{method}-{name}.safetensors"))
    assert reports[0]["repairs"]["nonfinite"] == {"time_embed.0.weight": 1, "time_embed.0.bias": 1}
    base = read(family["base"])
    for key in ("time_embed.0.weight", "time_embed.0.bias"):
        bad_element = (3, 5) if key.endswith("weight") else (0,)
        assert merged[0][key][bad_element] == base[key][bad_element]
        keep = torch.ones_like(merged[0][key], dtype=torch.bool)
        keep[bad_element] = False
        assert not torch.equal(merged[0][key][keep], base[key][keep])  # the key was merged, not reset
        # as if the bad elements held the base's values (a zero delta there)
        assert torch.allclose(merged[0][key][keep], merged[1][key][keep], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dare", "model_stock"])
def test_a_zero_dimensional_key_merges_with_sd_mechas_methods(tmp_path, method) -> None:
    """sd-mecha's dare and model_stock return a 0-d key (SDXL's logit_scale) as shape [1]: written as the base's []."""
    states = [base_state(), finetune(base_state(), 1), finetune(base_state(), 2)]
    for i, state in enumerate(states):
        state["logit_scale"] = torch.tensor(4.6 + 0.01 * i)
        save_file(state, str(tmp_path / f"m{i}.safetensors"))
    plan = plan_from_dict({"base": "m0.safetensors", "method": method, "output_dtype": "fp32",
                           "rows": [{"model": "m1.safetensors"}, {"model": "m2.safetensors"}]}, tmp_path)
    merge_plan(plan, tmp_path / "out.safetensors")
    merged = read(tmp_path / "out.safetensors")
    assert merged["logit_scale"].shape == () and torch.isfinite(merged["logit_scale"])


def test_a_bf16_base_merges_to_bf16_and_an_fp16_overflow_is_an_error(tmp_path: Path, capsys) -> None:
    """Flux-like bf16 weights beyond fp16's range: a plan naming no output dtype writes bf16; one asking for fp16 is
    refused naming the key, and no file is left (before, the values became Inf and were 'repaired' with Inf)."""
    gen = torch.Generator().manual_seed(3)
    base = {"img_in.weight": torch.randn(16, 8, generator=gen), "img_in.bias": torch.randn(16, generator=gen)}
    base["img_in.bias"][0] = 1e5
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    for name, seed in (("a", 1), ("b", 2)):
        noise = torch.Generator().manual_seed(seed)
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=noise)).to(torch.bfloat16)
                   for k, v in base.items()}, str(tmp_path / f"{name}.safetensors"))
    rows = [{"model": "a.safetensors"}, {"model": "b.safetensors"}]
    plan = plan_from_dict({"base": "base.safetensors", "method": "ortho_superpose", "rows": rows}, tmp_path)
    assert plan.output_dtype == "bf16"
    report = merge_plan(plan, tmp_path / "bf16.safetensors")
    assert report["output_dtype"] == "bf16" and not report["repairs"]["nonfinite"]
    assert torch.isfinite(read(tmp_path / "bf16.safetensors")["img_in.bias"].float()).all()
    fp16 = plan_from_dict({"base": "base.safetensors", "method": "ortho_superpose", "rows": rows,
                           "output_dtype": "fp16"}, tmp_path)
    with pytest.raises(OrthoMechaError, match=r"'img_in\.bias' has 1 value beyond the range of the output "
                       r"dtype F16 \(the largest there: 9\.\d+e\+04\); write it as bf16 or fp32"):
        merge_plan(fp16, tmp_path / "fp16.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "base.safetensors",
                                                            "bf16.safetensors"]
    with pytest.raises(OrthoMechaError, match=r"'img_in\.bias' has 1 value beyond .*convert's --dtype"):
        convert(tmp_path / "base.safetensors", tmp_path / "fp16copy.safetensors", dtype="fp16")
    assert not (tmp_path / "fp16copy.safetensors").exists()
    fp8 = plan_from_dict({"base": "base.safetensors", "method": "ortho_superpose", "rows": rows,
                          "output_dtype": "fp8_e4m3fn"}, tmp_path)  # no Inf in e4m3fn: a cast saturates at 448
    with pytest.raises(OrthoMechaError, match=r"'img_in\.bias' has 1 value beyond the range of the output dtype "
                       r"F8_E4M3 \(the largest there: 9\.\d+e\+04\)"):
        merge_plan(fp8, tmp_path / "fp8.safetensors")
    assert not (tmp_path / "fp8.safetensors").exists()


def test_a_merged_value_beyond_fp16_is_an_error_even_where_the_base_fits(tmp_path: Path) -> None:
    """The base fits fp16 (40000) but the rows' deltas add up beyond it: before, the Inf was 'repaired' with the
    base's value, dropping the merge there without a word."""
    base = {"w": torch.full((4, 4), 40000.0)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for name in ("a", "b"):
        save_file({"w": base["w"] + 20000.0}, str(tmp_path / f"{name}.safetensors"))
    plan = plan_from_dict({"base": "base.safetensors", "method": "add_difference", "output_dtype": "fp16",
                           "rows": [{"model": "a.safetensors"}, {"model": "b.safetensors"}]}, tmp_path)
    with pytest.raises(OrthoMechaError, match=r"out\.safetensors: 'w' has 16 values beyond the range of the output "
                                              r"dtype F16 \(the largest there: 8e\+04\)"):  # the file is named
        merge_plan(plan, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_survival_that_cannot_be_measured_is_a_warning_after_the_merge(family, tmp_path, capsys) -> None:
    state = finetune(base_state(), 13)
    state["time_embed.0.weight"][0, 0] = float("nan")  # repaired in the output; the inputs' Gram is NaN
    save_file(state, str(tmp_path / "nan.safetensors"))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": str(family["base"]), "method": "ortho_superpose",
                                "rows": [{"model": "nan.safetensors"}, {"model": str(family["a"])}]}))
    assert main(["merge", str(plan), "--out", str(tmp_path / "out.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "survival could not be measured" in captured.err and "predicted" not in captured.out
    assert (tmp_path / "out.safetensors").is_file()


def noise_merge_survival(folder: Path, method: str, names: str, keys: int, scale: Callable[[str, str], float]) -> dict:
    """The merge report's survival (predicted and measured) for fine-tunes ``names`` of a base of ``keys`` random
    256 × 256 keys, row ``name``'s delta on ``key`` independent noise of standard deviation ``scale(name, key)``."""
    gen = torch.Generator().manual_seed(5)
    base = {f"k{i}.weight": torch.randn(256, 256, generator=gen) for i in range(keys)}
    save_file(base, str(folder / "base.safetensors"))
    for name in names:
        save_file({k: v + scale(name, k) * torch.randn(v.shape, generator=gen) for k, v in base.items()},
                  str(folder / f"{name}.safetensors"))
    rows = [{"model": f"{name}.safetensors"} for name in names]
    plan = plan_from_dict({"base": "base.safetensors", "method": method, "rows": rows, "output_dtype": "fp32"},
                          folder)
    report = run_job({"plan_data": plan.to_dict(), "out": str(folder / "merged.safetensors")}, lambda *_: None)
    return report["survival"]


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_survival_is_predicted_near_what_the_merge_gives(tmp_path, method) -> None:
    """Three fine-tunes of independent noise: TIES keeps ~0.44 of each (only sign-agreeing entries, averaged) and
    DARE ~0.9 (entries dropped at 0.9 rarely meet, and each kept one is rescaled by 10). The prediction used to be
    the plain mean, 0.33 for both (a QA finding: 2.7× low for DARE)."""
    survival = noise_merge_survival(tmp_path, method, "abc", 4, lambda name, key: 0.01)
    assert survival["predicted"] == pytest.approx(survival["measured"], rel=0.06)
    assert min(survival["measured"]) > (0.4 if method == "ties" else 0.8)


@pytest.mark.parametrize(("method", "tolerance"), [("ties", 0.06), ("dare", 0.06), ("geometric_median", 1e-3)])
def test_survival_is_predicted_key_by_key_when_one_row_changed_one_key_most(tmp_path, method, tolerance) -> None:
    """Row d puts almost all of its change into one key (a QA finding: an outlier key). These methods merge key by
    key, so d's energy there must not reach the other keys' sign election or median: predicted from the Gram
    summed over the keys, TIES read 0.56 for a, b and c where the merge gave 0.37, the median 0.32 for 0.19."""
    def scale(name: str, key: str) -> float:
        return (0.2 if key == "k0.weight" else 0.002) if name == "d" else 0.01

    survival = noise_merge_survival(tmp_path, method, "abcd", 8, scale)
    assert survival["predicted"] == pytest.approx(survival["measured"], rel=tolerance)
    assert max(survival["measured"][:3]) < 0.9  # the rows really lose to one another: not a trivial 1 = 1


def test_a_texture_model_of_another_architecture_is_named_as_the_texture(tmp_path: Path) -> None:
    """The dashboard's input check named the file only, which read as one of the rows'."""
    from ortho_mecha.merge import check_plan_inputs
    from tests.modelgen import write_family_files

    flux = write_family_files(tmp_path / "flux", "flux", "fp16", members=["base", "anime"])
    other = write_family_files(tmp_path / "sdxl", "sdxl", "fp16", members=["base"])
    rows = [{"model": str(flux["anime"])}]
    plan = plan_from_dict({"base": str(flux["base"]), "method": "add_difference", "rows": rows,
                           "texture": {"model": str(other["base"]), "alpha": 0.2}}, tmp_path)
    with pytest.raises(OrthoMechaError, match=r"^the texture model: .*sdxl/base\.safetensors"):
        check_plan_inputs(plan)
    check_plan_inputs(plan_from_dict({"base": str(flux["base"]), "method": "add_difference", "rows": rows},
                                     tmp_path))  # the rows are fine
